//! Golden test: every shipped model's parameter count (and GMACs where the reference gives
//! them) equals the reference table `tests/reference/params.tsv`, and the table and the
//! shipped specs list the same models.

use std::collections::BTreeMap;
use std::path::Path;

use dlc::session::{Select, compile};

struct Reference {
    params: u64,
    gmacs: Option<String>,
    source: String,
}

fn reference() -> BTreeMap<(String, String), Reference> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/params.tsv"),
    )
    .expect("reference table");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            assert_eq!(cols.len(), 5, "malformed reference row: {l}");
            let key = (cols[0].to_string(), cols[1].to_string());
            let gmacs = (cols[3] != "-").then(|| cols[3].to_string());
            (
                key,
                Reference {
                    params: cols[2].parse().expect("params"),
                    gmacs,
                    source: cols[4].to_string(),
                },
            )
        })
        .collect()
}

#[test]
fn shipped_models_match_the_reference() {
    let mut expected = reference();
    let specs = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs");
    let mut files: Vec<_> = std::fs::read_dir(&specs)
        .expect("specs/")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    let mut failures = Vec::new();
    let mut checked = 0;
    for file in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "dlc"))
    {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let compiled = match compile(file, Select::All(None), &[]) {
            Ok(c) => c,
            Err(diags) => {
                failures.push(format!(
                    "{name} does not compile:\n{}",
                    diags
                        .iter()
                        .map(|d| d.render_plain(100))
                        .collect::<String>()
                ));
                continue;
            }
        };
        for m in &compiled.models {
            let Some(r) = expected.remove(&(name.clone(), m.name.clone())) else {
                failures.push(format!(
                    "{name}: model `{}` has no reference entry in tests/reference/params.tsv",
                    m.name
                ));
                continue;
            };
            checked += 1;
            let cost = m.graph.total_cost();
            if cost.params != r.params {
                failures.push(format!(
                    "{}: {} params, reference ({}) says {}",
                    m.name, cost.params, r.source, r.params
                ));
            }
            if let Some(g) = r.gmacs {
                let got = cost
                    .macs
                    .map(|m| format!("{:.3}", m as f64 / 1e9))
                    .unwrap_or_default();
                if got != g {
                    failures.push(format!(
                        "{}: {got} GMACs, reference ({}) says {g}",
                        m.name, r.source
                    ));
                }
            }
        }
    }
    for ((file, model), _) in expected {
        failures.push(format!(
            "reference row {file} {model} matches no shipped model"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 22, "only {checked} models checked");
}

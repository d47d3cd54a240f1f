//! The command line as a user runs it: exit codes, model selection, `--set`, formats,
//! and snapshots of the parameter tables of shipped specs.

use std::process::{Command, Output};

fn dlc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dlc"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("NO_COLOR", "1")
        .output()
        .expect("run dlc")
}

fn ok(args: &[&str]) -> String {
    let out = dlc(args);
    assert!(
        out.status.success(),
        "dlc {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn fails(args: &[&str]) -> String {
    let out = dlc(args);
    assert_eq!(out.status.code(), Some(1), "dlc {args:?} should exit 1");
    String::from_utf8(out.stderr).expect("utf-8 output")
}

#[test]
fn resnet50_params_match_torchvision() {
    let out = ok(&["params", "specs/resnet.dlc", "--model", "resnet50"]);
    assert!(out.contains("Total params: 25,557,032"), "{out}");
    assert!(out.contains("MACs: 4.089 G"), "{out}");
    insta::assert_snapshot!("resnet50_table", out);
}

#[test]
fn deeper_tables_unfold_repeated_blocks() {
    let folded = ok(&["params", "specs/resnet.dlc", "--model", "resnet18"]);
    assert!(folded.contains("0..1 (basic ×2)"), "{folded}");
    let deep = ok(&[
        "params",
        "specs/resnet.dlc",
        "--model",
        "resnet18",
        "--depth",
        "4",
    ]);
    assert!(deep.contains("downsample (group)"), "{deep}");
    assert!(
        !deep.contains('×'),
        "nothing is folded at full depth:\n{deep}"
    );
    insta::assert_snapshot!("resnet18_depth4_table", deep);
}

#[test]
fn d2l_tables() {
    insta::assert_snapshot!(
        "lenet_table",
        ok(&["params", "specs/lenet.dlc", "--model", "lenet"])
    );
    insta::assert_snapshot!(
        "d2l_resnet18_table",
        ok(&[
            "params",
            "specs/resnet.dlc",
            "--model",
            "d2l_resnet18",
            "--depth",
            "3"
        ])
    );
    insta::assert_snapshot!(
        "alexnet_table",
        ok(&["params", "specs/alexnet.dlc", "--model", "alexnet"])
    );
}

#[test]
fn check_lists_every_model_and_template() {
    let out = ok(&["check", "specs/resnet.dlc", "specs/vgg.dlc"]);
    for m in [
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "d2l_resnet18",
        "vgg16_bn",
        "d2l_vgg11_small",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(&format!("{m}: "))),
            "{m} missing:\n{out}"
        );
    }
    assert!(
        out.contains("resnet: template, used through variants (needs layers, block)"),
        "{out}"
    );
}

#[test]
fn several_models_need_a_choice() {
    let err = fails(&["params", "specs/resnet.dlc"]);
    assert!(err.contains("dlc::ambiguous_model"), "{err}");
    assert!(err.contains("resnet18, resnet34, resnet50"), "{err}");
    let err = fails(&["graph", "specs/resnet.dlc", "--model", "resnet05"]);
    assert!(err.contains("did you mean `resnet50`?"), "{err}");
}

#[test]
fn set_overrides_a_parameter_on_every_subcommand() {
    let out = ok(&[
        "check",
        "specs/lenet.dlc",
        "--model",
        "lenet",
        "--set",
        "classes=5",
    ]);
    assert!(out.contains("→ output [N, 5]  61,281 params"), "{out}");
    let json = ok(&[
        "params",
        "specs/resnet.dlc",
        "--model",
        "resnet",
        "--set",
        "layers=[1, 1, 1, 1]",
        "--set",
        "block=basic",
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(
        v["total_params"], 5_418_792,
        "ResNet-10: resnet18 layout with one block per stage"
    );
    let dot = ok(&[
        "graph",
        "specs/mlp.dlc",
        "--model",
        "mlp",
        "--set",
        "hidden=32",
    ]);
    assert!(dot.contains("[N, 32]"), "{dot}");
    let err = fails(&[
        "check",
        "specs/lenet.dlc",
        "--model",
        "lenet",
        "--set",
        "clases=5",
    ]);
    assert!(err.contains("did you mean `--set classes=...`?"), "{err}");
    let err = fails(&[
        "check",
        "specs/lenet.dlc",
        "--model",
        "lenet",
        "--set",
        "classes=[5",
    ]);
    assert!(err.contains("dlc::syntax"), "{err}");
}

#[test]
fn json_report_has_totals_and_layers() {
    let json = ok(&[
        "params",
        "specs/resnet.dlc",
        "--model",
        "resnet50",
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["model"], "resnet50");
    assert_eq!(v["total_params"], 25_557_032);
    assert_eq!(v["trainable_params"], 25_557_032);
    assert_eq!(v["macs"], 4_089_184_256u64);
    assert_eq!(v["buffers"], 53_120);
    let layers = v["layers"].as_array().expect("layers");
    let conv1 = layers
        .iter()
        .find(|l| l["name"] == "layer1.0.conv1")
        .expect("layer1.0.conv1");
    assert_eq!(conv1["op"], "conv");
    assert_eq!(conv1["params"], 4096);
    assert_eq!(conv1["output_shape"], serde_json::json!(["N", 64, 56, 56]));
    let sum: u64 = layers
        .iter()
        .map(|l| l["params"].as_u64().expect("params"))
        .sum();
    assert_eq!(sum, 25_557_032, "layer params add up to the total");
}

#[test]
fn graph_is_dot_with_block_clusters() {
    let dot = ok(&["graph", "specs/resnet.dlc", "--model", "resnet18"]);
    assert!(dot.starts_with("digraph \"resnet18\" {"), "{dot}");
    assert!(dot.contains("subgraph \"cluster_layer1\""), "{dot}");
    assert!(
        dot.contains("subgraph \"cluster_layer2.0.downsample\""),
        "{dot}"
    );
    assert!(dot.trim_end().ends_with('}'));
    let edges = dot.lines().filter(|l| l.contains(" -> ")).count();
    assert!(edges > 60, "{edges} edges");
}

#[test]
fn errors_exit_one_with_every_diagnostic() {
    let err = fails(&["check", "tests/fixtures/err/0021_many_errors.dlc"]);
    assert_eq!(err.matches("dlc::").count(), 3, "{err}");
    assert!(err.contains("3 problems found"), "{err}");
    let err = fails(&["check", "does/not/exist.dlc"]);
    assert!(err.contains("dlc::io"), "{err}");
}

#[test]
fn help_teaches() {
    let help = ok(&["--help"]);
    for word in ["check", "params", "graph", "Examples:"] {
        assert!(help.contains(word), "{help}");
    }
    let help = ok(&["params", "--help"]);
    assert!(
        help.contains("--depth") && help.contains("--set") && help.contains("--format"),
        "{help}"
    );
}

/// Every `$ dlc ...` example in the README shows what the command prints today.
#[test]
fn readme_examples_are_current() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let mut checked = 0;
    let mut in_block = false;
    let mut examples: Vec<(String, Vec<String>)> = Vec::new();
    let mut current: Option<usize> = None;
    for line in readme.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            current = None;
            continue;
        }
        if !in_block {
            continue;
        }
        if let Some(cmd) = line.strip_prefix("$ ") {
            examples.push((cmd.to_string(), Vec::new()));
            current = Some(examples.len() - 1);
        } else if let Some(i) = current {
            examples[i].1.push(line.to_string());
        }
    }
    for (cmd, expected) in examples {
        // Training, evaluation and prediction need a trained run: their outputs are records.
        if ["dlc train", "dlc eval", "dlc predict"]
            .iter()
            .any(|c| cmd.starts_with(c))
        {
            continue;
        }
        let (cmd, head) = match cmd.split_once(" | head -") {
            Some((c, n)) => (c.to_string(), n.trim().parse::<usize>().ok()),
            None if cmd.contains('|') => continue,
            None => (cmd, None),
        };
        // Expand `dir/*.ext` as a shell would.
        let mut args: Vec<String> = Vec::new();
        for word in cmd.split_whitespace().skip(1) {
            match word.split_once("/*") {
                Some((dir, ext)) => {
                    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
                    let mut files: Vec<String> = std::fs::read_dir(root.join(dir))
                        .expect("glob folder")
                        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                        .filter(|n| n.ends_with(ext))
                        .map(|n| format!("{dir}/{n}"))
                        .collect();
                    files.sort();
                    args.extend(files);
                }
                None => args.push(word.to_string()),
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = dlc(&args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut got: Vec<&str> = text.lines().collect();
        if let Some(n) = head {
            got.truncate(n);
        }
        while got.last().is_some_and(|l| l.trim().is_empty()) {
            got.pop();
        }
        assert_eq!(
            got.join("\n"),
            expected.join("\n"),
            "README example `{cmd}` is out of date"
        );
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} README examples found");
}

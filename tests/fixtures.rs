//! Data-driven fixtures. Every `tests/fixtures/ok/*.dlc` must compile: its snapshot holds the
//! `check` line and the layer table of each model. Every `tests/fixtures/err/*.dlc` must
//! fail: its snapshot holds every rendered diagnostic (no colour, 80 columns).
//! Adding a test case is adding a file; `cargo insta review` accepts new snapshots.

use std::path::Path;

use dlc::report;
use dlc::session::{Select, compile};

/// Compiles a fixture and renders what a user would see.
fn check(path: &Path) -> Result<String, String> {
    let rel = path
        .strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap_or(path);
    match compile(rel, Select::All(None), &[]) {
        Ok(c) => Ok(c
            .models
            .iter()
            .map(|m| {
                format!(
                    "{}\n\n{}\n",
                    report::check_line(m),
                    report::table::render(m, 3)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")),
        Err(diags) => Err(diags
            .iter()
            .map(|d| d.render_plain(80))
            .collect::<Vec<_>>()
            .join("\n")),
    }
}

#[test]
fn ok_fixtures_compile() {
    insta::glob!("fixtures/ok/*.dlc", |path| {
        match check(path) {
            Ok(out) => insta::assert_snapshot!(out),
            Err(diags) => panic!("{} should compile:\n{diags}", path.display()),
        }
    });
}

#[test]
fn err_fixtures_fail_with_diagnostics() {
    insta::glob!("fixtures/err/*.dlc", |path| {
        match check(path) {
            Ok(out) => panic!("{} should fail, but compiled:\n{out}", path.display()),
            Err(diags) => {
                assert!(
                    diags.contains("dlc::"),
                    "every diagnostic has a code:\n{diags}"
                );
                assert!(
                    diags.contains("help:"),
                    "every diagnostic has help:\n{diags}"
                );
                insta::assert_snapshot!(diags);
            }
        }
    });
}

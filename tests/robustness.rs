//! Hostile input never crashes the compiler: binary junk, an empty file, 20,000 nested
//! parentheses and a 10 MB spec each end in a diagnostic or a result, through the real CLI
//! (which is what a user runs), never in a panic or a stack overflow.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, bytes).expect("write temp spec");
    path
}

fn dlc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dlc"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run dlc")
}

/// Runs `dlc check` and asserts a clean failure with the given diagnostic code.
fn fails_cleanly(path: &Path, code: &str) {
    let out = dlc(&["check", path.to_str().expect("utf-8 path")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1, got {:?}; stderr:\n{stderr}",
        out.status
    );
    assert!(stderr.contains(code), "expected {code} in:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn binary_junk_is_a_syntax_error() {
    let junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fails_cleanly(&write("junk.dlc", &junk), "dlc::syntax");
}

#[test]
fn empty_file_has_no_model() {
    let path = write("empty.dlc", b"");
    let out = dlc(&["params", path.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("dlc::no_model"));
}

#[test]
fn deep_parentheses_are_refused() {
    let text = format!(
        "model m {{ input x: [{}3{}] }}",
        "(".repeat(20_000),
        ")".repeat(20_000)
    );
    fails_cleanly(&write("parens.dlc", text.as_bytes()), "dlc::too_deep");
}

#[test]
fn long_operator_chains_and_prefixes_are_handled() {
    let sum = vec!["1"; 50_000].join(" + ");
    fails_cleanly(
        &write(
            "sum.dlc",
            format!("model m {{ input x: [{sum}] }}").as_bytes(),
        ),
        "dlc::too_long",
    );
    let nots = "not ".repeat(50_000);
    let text = format!("model m {{ input x: [4]\n let b = {nots}true\n linear(4) }}");
    let out = dlc(&[
        "check",
        write("nots.dlc", text.as_bytes())
            .to_str()
            .expect("utf-8 path"),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn ten_megabyte_spec_compiles() {
    let line = "linear(8) relu linear(8) relu linear(8) relu linear(8) relu\n";
    let lines = 10 * 1024 * 1024 / line.len() + 1;
    let text = format!("model big {{\n input x: [8]\n{}}}\n", line.repeat(lines));
    assert!(text.len() >= 10 * 1024 * 1024);
    let path = write("big.dlc", text.as_bytes());
    let out = dlc(&["check", path.to_str().expect("utf-8 path")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected_params = (lines * 4 * (8 * 8 + 8)).to_string();
    let grouped: String = expected_params
        .chars()
        .rev()
        .collect::<Vec<_>>()
        .chunks(3)
        .map(|c| c.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join(",")
        .chars()
        .rev()
        .collect();
    assert!(stdout.contains(&format!("{grouped} params")), "{stdout}");
}

#[test]
fn runaway_repeat_is_stopped() {
    let path = write(
        "runaway.dlc",
        b"model m { input x: [4]\n repeat 100000000 { relu } }",
    );
    fails_cleanly(&path, "dlc::too_large");
}

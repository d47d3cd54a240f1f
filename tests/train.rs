//! `dlc train` and `dlc eval` end to end on the shipped Fashion-MNIST subset: files written,
//! resuming, evaluation agreeing with training's own test accuracy, divergence stopped,
//! checkpoints checked against their spec, and recipe mistakes as diagnostics.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dlc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dlc"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("NO_COLOR", "1")
        .output()
        .expect("run dlc")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

const SUBSET: &str = "data/fashion-mnist-subset";

fn train(out: &Path, extra: &[&str]) -> Output {
    let out = out.to_str().expect("utf-8");
    let mut args = vec![
        "train",
        "specs/lenet_bn.dlc",
        "--model",
        "lenet_bn_relu",
        "--data",
        SUBSET,
        "--out",
        out,
        "-q",
    ];
    args.extend(extra);
    dlc(&args)
}

#[test]
fn train_resume_and_evaluate() {
    let out = run_dir("train-resume");
    let first = train(&out, &["--epochs", "1"]);
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("data: Fashion-MNIST from data/fashion-mnist-subset"),
        "the run says which data it used:\n{}",
        text(&first)
    );
    for f in [
        "metrics.csv",
        "metrics.json",
        "curves.png",
        "model.safetensors",
        "optimizer.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} written");
    }
    // Resume to two epochs: the first epoch is kept, one more is trained.
    let second = train(&out, &["--epochs", "2", "--resume"]);
    assert!(second.status.success(), "{}", text(&second));
    assert!(
        text(&second).contains("resuming after epoch 1"),
        "{}",
        text(&second)
    );
    let csv = std::fs::read_to_string(out.join("metrics.csv")).expect("csv");
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 3, "header and two epochs:\n{csv}");
    assert!(rows[0].starts_with("epoch,lr,train_loss,train_acc,test_loss,test_acc"));
    let test_acc: f64 = rows[2]
        .split(',')
        .nth(5)
        .and_then(|v| v.parse().ok())
        .expect("test_acc");
    assert!(
        test_acc > 0.5,
        "the BN/ReLU LeNet learns on the subset: {test_acc}"
    );

    // Evaluating the checkpoint reproduces the run's last test accuracy.
    let ckpt = out.join("model.safetensors");
    let eval = dlc(&[
        "eval",
        "specs/lenet_bn.dlc",
        "--model",
        "lenet_bn_relu",
        "--data",
        SUBSET,
        "--weights",
        ckpt.to_str().expect("utf-8"),
    ]);
    assert!(eval.status.success(), "{}", text(&eval));
    let report = text(&eval);
    assert!(
        report.contains(&format!("test accuracy {test_acc:.4}")),
        "eval agrees with training ({test_acc:.4}):\n{report}"
    );
    assert!(
        report.contains("Ankle boot"),
        "per-class rows with names:\n{report}"
    );

    // A checkpoint of another model is refused with a diagnostic.
    let wrong = dlc(&[
        "eval",
        "specs/lenet.dlc",
        "--model",
        "lenet",
        "--data",
        SUBSET,
        "--weights",
        ckpt.to_str().expect("utf-8"),
    ]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(text(&wrong).contains("dlc::checkpoint"), "{}", text(&wrong));
}

#[test]
fn divergence_stops_the_run_and_keeps_the_checkpoint() {
    let out = run_dir("train-diverge");
    let dir = out.to_str().expect("utf-8");
    let ok = dlc(&[
        "train",
        "specs/mlp.dlc",
        "--model",
        "mlp",
        "--data",
        SUBSET,
        "--out",
        dir,
        "--epochs",
        "1",
        "-q",
    ]);
    assert!(ok.status.success(), "{}", text(&ok));
    let before = std::fs::read(out.join("model.safetensors")).expect("checkpoint");
    let bad = dlc(&[
        "train",
        "specs/mlp.dlc",
        "--model",
        "mlp",
        "--data",
        SUBSET,
        "--out",
        dir,
        "--epochs",
        "2",
        "--resume",
        "--lr",
        "1e30",
        "-q",
    ]);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    assert!(text(&bad).contains("dlc::diverged"), "{}", text(&bad));
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).expect("checkpoint"),
        before,
        "the last good checkpoint is untouched"
    );
}

#[test]
fn recipe_mistakes_are_diagnostics() {
    let spec = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bad-recipe.dlc");
    std::fs::write(
        &spec,
        "model m {\n    input x: [1, 28, 28]\n    flatten linear(10)\n    train {\n        optimizer: sgd(lr: 0.1, momentun: 0.9)\n        epochs: -1\n        batchsize: 64\n    }\n}\n",
    )
    .expect("write spec");
    let out = dlc(&[
        "train",
        spec.to_str().expect("utf-8"),
        "--data",
        SUBSET,
        "-q",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out);
    assert!(err.contains("did you mean `momentum`?"), "{err}");
    assert!(err.contains("`epochs` must be a positive integer"), "{err}");
    assert!(
        err.contains("unknown training setting `batchsize`")
            && err.contains("did you mean `batch`?"),
        "{err}"
    );
    let missing = dlc(&[
        "train",
        "specs/lenet.dlc",
        "--model",
        "lenet",
        "--data",
        "no/such/dir",
        "-q",
    ]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing).contains("dlc::data"), "{}", text(&missing));
    let not_classifier = dlc(&[
        "train",
        "specs/resnet.dlc",
        "--model",
        "resnet18",
        "--data",
        SUBSET,
        "-q",
    ]);
    assert!(
        text(&not_classifier).contains("--set classes=10"),
        "{}",
        text(&not_classifier)
    );
}

#[test]
fn a_killed_run_resumes_from_its_last_checkpoint() {
    let out = run_dir("train-killed");
    let dir = out.to_str().expect("utf-8");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dlc"))
        .args([
            "train",
            "specs/mlp.dlc",
            "--model",
            "mlp",
            "--data",
            SUBSET,
            "--out",
            dir,
            "--epochs",
            "50",
            "-q",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start training");
    // Kill it in the middle of a later epoch, once the first checkpoint exists.
    let ckpt = out.join("model.safetensors");
    let started = std::time::Instant::now();
    while !ckpt.is_file() && started.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill().expect("kill");
    child.wait().expect("wait");
    let done = std::fs::read_to_string(out.join("metrics.csv"))
        .expect("metrics")
        .lines()
        .count()
        - 1;
    assert!(done >= 1, "at least one epoch was saved");
    let target = (done + 1).to_string();
    let resumed = dlc(&[
        "train",
        "specs/mlp.dlc",
        "--model",
        "mlp",
        "--data",
        SUBSET,
        "--out",
        dir,
        "--epochs",
        &target,
        "--resume",
        "-q",
    ]);
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert!(
        text(&resumed).contains(&format!("resuming after epoch {done}")),
        "{}",
        text(&resumed)
    );
    let csv = std::fs::read_to_string(out.join("metrics.csv")).expect("metrics");
    assert_eq!(csv.lines().count() - 1, done + 1, "{csv}");
}

#[test]
fn a_pytorch_state_dict_loads_by_name() {
    // `lenet.safetensors` was written from a PyTorch state dict (keys `0.weight`, `3.bias`, …;
    // see scripts/torch_fixtures.py), in float64 and with extra tensors: it loads as is.
    let out = dlc(&[
        "predict",
        "specs/lenet.dlc",
        "--weights",
        "tests/fixtures/torch/lenet.safetensors",
        "--format",
        "json",
        "examples/images/trouser.jpg",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let probs = v["images"][0]["probabilities"]
        .as_array()
        .expect("probabilities");
    assert_eq!(probs.len(), 10);
    let total: f64 = probs.iter().map(|p| p.as_f64().expect("number")).sum();
    assert!((total - 1.0).abs() < 1e-4, "{total}");
}

#[test]
fn fine_tuning_starts_from_weights_and_keeps_frozen_ones() {
    let pretrained = run_dir("train-pretrained");
    let first = train(&pretrained, &["--epochs", "1"]);
    assert!(first.status.success(), "{}", text(&first));
    let weights = pretrained.join("model.safetensors");
    let out = run_dir("train-fine-tune");
    let run = train(
        &out,
        &[
            "--epochs",
            "1",
            "--init",
            weights.to_str().expect("utf-8"),
            "--freeze",
            "0.*",
            "--freeze",
            "1.*",
        ],
    );
    assert!(run.status.success(), "{}", text(&run));
    assert!(text(&run).contains("init: "), "{}", text(&run));
    let before = dlc::train::checkpoint::load(&weights).expect("loads");
    let after = dlc::train::checkpoint::load(&out.join("model.safetensors")).expect("loads");
    let changed = |name: &str| -> bool {
        let diff: f32 = (&before.tensors[name] - &after.tensors[name])
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar())
            .expect("difference");
        diff > 0.0
    };
    for frozen in ["0.weight", "0.bias", "1.weight", "1.bias"] {
        assert!(!changed(frozen), "{frozen} was frozen but changed");
    }
    for trained in ["4.weight", "9.weight", "15.bias"] {
        assert!(changed(trained), "{trained} was trained but did not change");
    }

    let none = train(&out, &["--epochs", "1", "--freeze", "layer1.*"]);
    assert_eq!(none.status.code(), Some(1), "{}", text(&none));
    assert!(
        text(&none).contains("dlc::freeze") && text(&none).contains("matches no parameter"),
        "{}",
        text(&none)
    );
}

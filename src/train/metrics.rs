//! Per-epoch statistics: the line printed after each epoch, `metrics.csv`, `metrics.json`
//! and the progress bar.

use std::path::Path;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::config::Recipe;
use crate::diagnostics::Diag;
use crate::elaborate::Model;

/// What one epoch measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    /// 1-based epoch.
    pub epoch: usize,
    /// Learning rate used.
    pub lr: f64,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Training accuracy over the epoch.
    pub train_acc: f64,
    /// Mean test loss after the epoch.
    pub test_loss: f64,
    /// Test accuracy after the epoch.
    pub test_acc: f64,
    /// Wall time of the epoch, evaluation included.
    pub seconds: f64,
    /// Training throughput.
    pub examples_per_sec: f64,
}

impl EpochStats {
    /// `epoch 3/10: loss 0.512, train acc 0.812, test acc 0.795, 2301.4 examples/sec, 26.1 s`.
    pub fn line(&self) -> String {
        format!(
            "epoch {}: loss {:.3}, train acc {:.3}, test acc {:.3}, {:.1} examples/sec, {:.1} s",
            self.epoch,
            self.train_loss,
            self.train_acc,
            self.test_acc,
            self.examples_per_sec,
            self.seconds
        )
    }
}

fn io(path: &Path, e: impl std::fmt::Display) -> Diag {
    Diag::new("dlc::io", format!("cannot write `{}`: {e}", path.display()))
        .help("check the --out folder")
}

/// Writes `metrics.csv`, `metrics.json` and `curves.png` for the run so far (atomically each).
pub fn write(
    out: &Path,
    model: &Model,
    recipe: &Recipe,
    data: &str,
    history: &[EpochStats],
) -> Result<(), Diag> {
    let mut csv =
        String::from("epoch,lr,train_loss,train_acc,test_loss,test_acc,seconds,examples_per_sec\n");
    for s in history {
        csv.push_str(&format!(
            "{},{},{:.6},{:.6},{:.6},{:.6},{:.3},{:.1}\n",
            s.epoch,
            s.lr,
            s.train_loss,
            s.train_acc,
            s.test_loss,
            s.test_acc,
            s.seconds,
            s.examples_per_sec
        ));
    }
    write_atomic(&out.join("metrics.csv"), csv.as_bytes())?;
    let json = serde_json::json!({
        "model": model.name,
        "params": model.params.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
        "data": data,
        "recipe": format!("{recipe:?}"),
        "epochs": history,
    });
    write_atomic(&out.join("metrics.json"), format!("{json:#}\n").as_bytes())?;
    super::plot::curves(&out.join("curves.png"), &model.name, history)
}

/// Reads the epochs recorded in `metrics.json`.
pub fn read(out: &Path) -> Result<Vec<EpochStats>, Diag> {
    let path = out.join("metrics.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Diag::new("dlc::io", format!("cannot read `{}`: {e}", path.display()))
            .help("resume a run folder written by `dlc train`")
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        Diag::new(
            "dlc::io",
            format!("`{}` is not valid JSON: {e}", path.display()),
        )
        .help("start a new run")
    })?;
    serde_json::from_value(v["epochs"].clone()).map_err(|e| {
        Diag::new(
            "dlc::io",
            format!("`{}` has no readable epochs: {e}", path.display()),
        )
        .help("start a new run")
    })
}

/// Writes a file through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Diag> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// The progress bar of one epoch (hidden when not wanted or not on a terminal).
pub fn progress(show: bool, steps: usize, epoch: usize, epochs: usize) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(steps as u64),
        if show {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) =
        ProgressStyle::with_template("epoch {prefix} {bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}")
    {
        bar.set_style(style);
    }
    bar.set_prefix(format!("{epoch}/{epochs}"));
    bar
}

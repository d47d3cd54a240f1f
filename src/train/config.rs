//! The training recipe: the model's `train { }` settings, checked, with defaults and the
//! command line's overrides applied.

use crate::diagnostics::{Diag, did_you_mean};
use crate::elaborate::{Model, Setting, TrainSetting};
use crate::lower::Init;

use super::optim::Optimizer;

/// How the learning rate changes from epoch to epoch.
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// The base rate throughout.
    Constant,
    /// Multiplied by `gamma` every `every` epochs.
    Step { every: usize, gamma: f64 },
    /// Cosine annealing from the base rate to `min_lr` over the run.
    Cosine { min_lr: f64 },
}

impl Schedule {
    /// The learning rate for `epoch` (0-based) of `epochs`.
    pub fn lr(&self, base: f64, epoch: usize, epochs: usize) -> f64 {
        match self {
            Schedule::Constant => base,
            Schedule::Step { every, gamma } => base * gamma.powi((epoch / (*every).max(1)) as i32),
            Schedule::Cosine { min_lr } => {
                let t = epoch as f64 / epochs.max(1) as f64;
                min_lr + (base - min_lr) * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0
            }
        }
    }
}

/// The data set a model trains on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DataSet {
    /// Fashion-MNIST images (image classifiers).
    #[default]
    FashionMnist,
    /// The Time Machine as characters (language models).
    TimeMachine,
    /// English–French sentence pairs (translation models).
    FraEng,
}

/// Everything `dlc train` needs to know.
#[derive(Clone, Debug, PartialEq)]
pub struct Recipe {
    /// What to train on.
    pub data: DataSet,
    /// Tokens per training sequence (language models).
    pub steps: usize,
    /// Use only the first this many tokens of the text for training (d2l: 10,000).
    pub tokens: Option<usize>,
    /// Translation: how many sentence pairs to train on (d2l: 600).
    pub pairs: usize,
    /// Passes over the training set.
    pub epochs: usize,
    /// Examples per step.
    pub batch: usize,
    /// The optimiser.
    pub optimizer: Optimizer,
    /// The learning-rate schedule.
    pub schedule: Schedule,
    /// Weight initialisation.
    pub init: Init,
    /// Seed for initialisation, shuffling and dropout.
    pub seed: u64,
    /// Largest global gradient norm, if clipping.
    pub clip: Option<f64>,
    /// Per-channel normalisation of the inputs after scaling to [0, 1].
    pub normalize: Option<(f64, f64)>,
}

impl Default for Recipe {
    fn default() -> Self {
        Recipe {
            data: DataSet::FashionMnist,
            steps: 35,
            tokens: None,
            pairs: 600,
            epochs: 10,
            batch: 256,
            optimizer: Optimizer::Sgd {
                lr: 0.1,
                momentum: 0.0,
                weight_decay: 0.0,
                nesterov: false,
            },
            schedule: Schedule::Constant,
            init: Init::Torch,
            seed: 0,
            clip: None,
            normalize: None,
        }
    }
}

/// Command-line overrides of the recipe.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--epochs`.
    pub epochs: Option<usize>,
    /// `--batch`.
    pub batch: Option<usize>,
    /// `--lr`.
    pub lr: Option<f64>,
    /// `--seed`.
    pub seed: Option<u64>,
}

const SETTINGS: &[&str] = &[
    "data",
    "epochs",
    "batch",
    "optimizer",
    "schedule",
    "loss",
    "init",
    "seed",
    "clip",
    "normalize",
    "steps",
    "tokens",
    "pairs",
];

/// Reads the model's `train { }` settings; every problem is a diagnostic at its value.
pub fn recipe(model: &Model, overrides: &Overrides) -> Result<Recipe, Vec<Diag>> {
    let mut r = Recipe::default();
    let mut diags = Vec::new();
    for s in &model.train {
        if let Err(d) = apply(&mut r, s) {
            diags.push(d);
        }
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    if let Some(e) = overrides.epochs {
        r.epochs = e;
    }
    if let Some(b) = overrides.batch {
        r.batch = b;
    }
    if let Some(lr) = overrides.lr {
        r.optimizer = r.optimizer.with_lr(lr);
    }
    if let Some(seed) = overrides.seed {
        r.seed = seed;
    }
    Ok(r)
}

fn bad(s: &TrainSetting, expected: &str) -> Diag {
    Diag::new(
        "dlc::bad_setting",
        format!("`{}` must be {expected}", s.name.name),
    )
    .label(s.span, "this value")
    .help(format!("for example: {}", example(&s.name.name)))
}

fn example(name: &str) -> &'static str {
    match name {
        "data" => "`data: fashion_mnist`, `data: time_machine` or `data: fra_eng`",
        "pairs" => "`pairs: 600` (sentence pairs to train on)",
        "steps" => "`steps: 35` (tokens per training sequence)",
        "tokens" => "`tokens: 10000` (train on the first 10,000 tokens of the text)",
        "epochs" => "`epochs: 10`",
        "batch" => "`batch: 256`",
        "optimizer" => {
            "`optimizer: sgd(lr: 0.9)`, `sgd(lr: 0.1, momentum: 0.9, weight_decay: 5e-4, nesterov: true)`, `adam(lr: 0.001)`, `adamw(lr: 0.001, weight_decay: 0.01)`"
        }
        "schedule" => "`schedule: constant`, `step(every: 10, gamma: 0.1)`, `cosine(min_lr: 0)`",
        "loss" => "`loss: cross_entropy`",
        "init" => "`init: xavier` or `init: torch`",
        "seed" => "`seed: 42`",
        "clip" => "`clip: 1.0` (largest gradient norm)",
        "normalize" => "`normalize: [0.2860, 0.3530]` (mean, std)",
        _ => "see docs/language.md",
    }
}

fn number(v: &Setting) -> Option<f64> {
    match v {
        Setting::Int(n) => Some(*n as f64),
        Setting::Float(x) => Some(*x),
        _ => None,
    }
}

fn positive_int(s: &TrainSetting) -> Result<usize, Diag> {
    match s.value {
        Setting::Int(n) if n > 0 => Ok(n as usize),
        _ => Err(bad(s, "a positive integer")),
    }
}

/// Arguments of a call setting, by keyword or position, checked against the allowed names.
fn call_args<'a>(
    s: &TrainSetting,
    args: &'a [(Option<String>, Setting)],
    names: &[&'a str],
) -> Result<Vec<(&'a str, f64)>, Diag> {
    let mut out = Vec::new();
    for (i, (k, v)) in args.iter().enumerate() {
        let name = match k {
            Some(k) => names.iter().find(|n| *n == k).copied().ok_or_else(|| {
                let hint = did_you_mean(k, names.iter().copied())
                    .map(|h| format!("did you mean `{h}`? "))
                    .unwrap_or_default();
                Diag::new(
                    "dlc::bad_setting",
                    format!("`{}` has no argument `{k}`", s.name.name),
                )
                .label(s.span, "here")
                .help(format!("{hint}arguments: {}", names.join(", ")))
            })?,
            None => names
                .get(i)
                .copied()
                .ok_or_else(|| bad(s, "a call with fewer arguments"))?,
        };
        let value = match v {
            Setting::Bool(b) => f64::from(u8::from(*b)),
            v => number(v).ok_or_else(|| bad(s, &format!("a call whose `{name}` is a number")))?,
        };
        out.push((name, value));
    }
    Ok(out)
}

fn get(args: &[(&str, f64)], name: &str, default: f64) -> f64 {
    args.iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .unwrap_or(default)
}

fn apply(r: &mut Recipe, s: &TrainSetting) -> Result<(), Diag> {
    match s.name.name.as_str() {
        "data" => match &s.value {
            Setting::Name(n) if n == "fashion_mnist" => r.data = DataSet::FashionMnist,
            Setting::Name(n) if n == "time_machine" => r.data = DataSet::TimeMachine,
            Setting::Name(n) if n == "fra_eng" => r.data = DataSet::FraEng,
            _ => {
                return Err(bad(
                    s,
                    "a known data set (`fashion_mnist`, `time_machine`, `fra_eng`)",
                ));
            }
        },
        "pairs" => r.pairs = positive_int(s)?,
        "steps" => r.steps = positive_int(s)?,
        "tokens" => r.tokens = Some(positive_int(s)?),
        "epochs" => r.epochs = positive_int(s)?,
        "batch" => r.batch = positive_int(s)?,
        "seed" => match s.value {
            Setting::Int(n) if n >= 0 => r.seed = n as u64,
            _ => return Err(bad(s, "a non-negative integer")),
        },
        "clip" => match number(&s.value) {
            Some(x) if x > 0.0 => r.clip = Some(x),
            _ => return Err(bad(s, "a positive number")),
        },
        "loss" => match &s.value {
            Setting::Name(n) if n == "cross_entropy" => {}
            _ => return Err(bad(s, "`cross_entropy`")),
        },
        "init" => match &s.value {
            Setting::Name(n) if Init::parse(n).is_some() => {
                r.init = Init::parse(n).unwrap_or_default()
            }
            _ => return Err(bad(s, "`torch` or `xavier`")),
        },
        "normalize" => match &s.value {
            Setting::List(xs) if xs.len() == 2 => match (number(&xs[0]), number(&xs[1])) {
                (Some(m), Some(sd)) if sd > 0.0 => r.normalize = Some((m, sd)),
                _ => return Err(bad(s, "`[mean, std]` with a positive std")),
            },
            _ => return Err(bad(s, "`[mean, std]`")),
        },
        "optimizer" => {
            r.optimizer = match &s.value {
                Setting::Call(name, args) if name == "sgd" => {
                    let a = call_args(s, args, &["lr", "momentum", "weight_decay", "nesterov"])?;
                    Optimizer::Sgd {
                        lr: get(&a, "lr", 0.1),
                        momentum: get(&a, "momentum", 0.0),
                        weight_decay: get(&a, "weight_decay", 0.0),
                        nesterov: get(&a, "nesterov", 0.0) != 0.0,
                    }
                }
                Setting::Call(name, args) if name == "adam" || name == "adamw" => {
                    let a = call_args(s, args, &["lr", "beta1", "beta2", "eps", "weight_decay"])?;
                    let (lr, beta1, beta2, eps) = (
                        get(&a, "lr", 1e-3),
                        get(&a, "beta1", 0.9),
                        get(&a, "beta2", 0.999),
                        get(&a, "eps", 1e-8),
                    );
                    if name == "adam" {
                        Optimizer::Adam {
                            lr,
                            beta1,
                            beta2,
                            eps,
                            weight_decay: get(&a, "weight_decay", 0.0),
                        }
                    } else {
                        Optimizer::AdamW {
                            lr,
                            beta1,
                            beta2,
                            eps,
                            weight_decay: get(&a, "weight_decay", 0.01),
                        }
                    }
                }
                Setting::Name(n) if n == "sgd" || n == "adam" || n == "adamw" => {
                    let call = TrainSetting {
                        value: Setting::Call(n.clone(), Vec::new()),
                        ..s.clone()
                    };
                    return apply(r, &call);
                }
                _ => return Err(bad(s, "`sgd(...)`, `adam(...)` or `adamw(...)`")),
            };
            if r.optimizer.lr() <= 0.0 {
                return Err(bad(s, "an optimiser with a positive `lr`"));
            }
        }
        "schedule" => {
            r.schedule = match &s.value {
                Setting::Name(n) if n == "constant" => Schedule::Constant,
                Setting::Call(n, args) if n == "step" => {
                    let a = call_args(s, args, &["every", "gamma"])?;
                    Schedule::Step {
                        every: get(&a, "every", 10.0).max(1.0) as usize,
                        gamma: get(&a, "gamma", 0.1),
                    }
                }
                Setting::Call(n, args) if n == "cosine" => {
                    let a = call_args(s, args, &["min_lr"])?;
                    Schedule::Cosine {
                        min_lr: get(&a, "min_lr", 0.0),
                    }
                }
                Setting::Name(n) if n == "cosine" => Schedule::Cosine { min_lr: 0.0 },
                _ => {
                    return Err(bad(
                        s,
                        "`constant`, `step(every, gamma)` or `cosine(min_lr)`",
                    ));
                }
            }
        }
        other => {
            let hint = did_you_mean(other, SETTINGS.iter().copied())
                .map(|h| format!("did you mean `{h}`? "))
                .unwrap_or_default();
            return Err(Diag::new(
                "dlc::bad_setting",
                format!("unknown training setting `{other}`"),
            )
            .label(s.name.span, "not a setting")
            .help(format!("{hint}settings: {}", SETTINGS.join(", "))));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        assert_eq!(Schedule::Constant.lr(0.1, 5, 10), 0.1);
        assert!(
            (Schedule::Step {
                every: 2,
                gamma: 0.5
            }
            .lr(0.1, 5, 10)
                - 0.025)
                .abs()
                < 1e-12
        );
        assert!((Schedule::Cosine { min_lr: 0.0 }.lr(0.1, 0, 10) - 0.1).abs() < 1e-12);
        assert!((Schedule::Cosine { min_lr: 0.0 }.lr(0.1, 5, 10) - 0.05).abs() < 1e-12);
    }
}

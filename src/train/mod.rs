//! Training and evaluation of image classifiers (and, in [`language`] and [`translation`], of
//! character language models and translation models): data, loss, optimiser, schedule, metrics, checkpoints. `dlc train`, `dlc eval` and `dlc predict` are thin layers over this module.

pub mod checkpoint;
pub mod config;
pub mod language;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod translation;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor};

use crate::data::{self, Batches, Dataset, Order, Transform};
use crate::diagnostics::Diag;
use crate::elaborate::Model;
use crate::lower::Network;
use config::Recipe;
use metrics::EpochStats;
use optim::Stepper;

/// Where and how a run writes and reports.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The run's folder (`metrics.csv`, `metrics.json`, `curves.png`, `model.safetensors`).
    pub out: PathBuf,
    /// Fashion-MNIST folder; `None` looks for the full set, then the shipped subset.
    pub data: Option<PathBuf>,
    /// Continue from the checkpoint in `out`.
    pub resume: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Identifies the spec, model and overrides; stored in checkpoints and checked on resume.
    pub spec_hash: String,
    /// Weights to start from (`--init`): those whose names and shapes fit, as
    /// [`checkpoint::restore_matching`].
    pub init: Option<PathBuf>,
    /// Patterns of the parameters to freeze (`--freeze`), as [`crate::lower::State::freeze`].
    pub freeze: Vec<String>,
}

/// Prepares a fresh network for fine-tuning: loads the `opts.init` weights that fit, then
/// freezes the parameters that match each pattern of `opts.freeze` (they keep their values,
/// get no gradient, and the optimiser leaves them out). A pattern that matches no parameter
/// is an error.
pub fn init_and_freeze(net: &mut Network, model: &Model, opts: &RunOptions) -> Result<(), Diag> {
    if let Some(path) = &opts.init {
        let loaded = checkpoint::load(path)?;
        let (matched, skipped) =
            checkpoint::restore_matching(path, &loaded, &net.state.variables())?;
        eprintln!(
            "init: {} tensors from {}{}",
            matched.len(),
            path.display(),
            if skipped.is_empty() {
                String::new()
            } else {
                format!(
                    " ({} of another shape kept fresh: {})",
                    skipped.len(),
                    skipped.join(", ")
                )
            }
        );
    }
    for pattern in &opts.freeze {
        if net.state.freeze(pattern) == 0 {
            let first = net.state.params.keys().next().cloned().unwrap_or_default();
            return Err(Diag::new(
                "dlc::freeze",
                format!("`--freeze {pattern}` matches no parameter of `{}`", model.name),
            )
            .help(format!(
                "parameters are named `<layer>.<kind>` (the first is `{first}`); `*` matches any run of characters, as in `layer1.*`"
            )));
        }
    }
    Ok(())
}

/// A failure inside the lowered network (a bug in dlc once `dlc check` accepted the model).
pub fn runtime_error(e: candle_core::Error) -> Diag {
    Diag::new("dlc::runtime", format!("the network failed to run: {e}"))
        .help("this is a bug in dlc if `dlc check` accepts the model; please report it")
}

/// The input shape `(C, H, W)` and class count of an image classifier, or why it is not one.
pub fn classifier_shape(model: &Model) -> Result<((usize, usize, usize), usize), Diag> {
    let g = &model.graph;
    let not_classifier = |why: String| {
        Diag::new(
            "dlc::not_trainable",
            format!("`{}` cannot be trained on images: {why}", model.name),
        )
        .help("`dlc train` trains models with one image input [C, H, W] and one output [classes]")
    };
    let (&[input], &[output]) = (g.inputs.as_slice(), g.outputs.as_slice()) else {
        return Err(not_classifier(format!(
            "it has {} inputs and {} outputs",
            g.inputs.len(),
            g.outputs.len()
        )));
    };
    let known = |n: petgraph::graph::NodeIndex| -> Vec<usize> {
        g.dag[n].outputs[0]
            .0
            .iter()
            .skip(1)
            .map(|d| d.known().unwrap_or(0) as usize)
            .collect()
    };
    let (i, o) = (known(input), known(output));
    match (i.as_slice(), o.as_slice()) {
        (&[c, h, w], &[k]) if (c == 1 || c == 3) && h > 0 && w > 0 && k > 0 => Ok(((c, h, w), k)),
        _ => Err(not_classifier(format!(
            "its input is {} and its output {}",
            g.dag[input].outputs[0], g.dag[output].outputs[0]
        ))),
    }
}

/// The images' preprocessing for a model input of `(C, H, W)`.
pub fn transform(shape: (usize, usize, usize), recipe: &Recipe) -> Transform {
    let t = Transform::to_shape(shape.0, shape.1, shape.2);
    match recipe.normalize {
        Some((m, s)) => t.normalize(&vec![m as f32; shape.0], &vec![s as f32; shape.0]),
        None => t,
    }
}

fn tensors(batch: data::Batch, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let shape = batch.shape;
    let (images, labels) = batch.into_parts();
    let n = labels.len();
    Ok((
        Tensor::from_vec(images, shape.to_vec(), device)?,
        Tensor::from_vec(labels, n, device)?,
    ))
}

/// Accuracy over a data set, per-class accuracy and the confusion matrix (rows: truth).
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// Fraction correct.
    pub accuracy: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// `confusion[truth][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
}

impl Evaluation {
    /// Accuracy of each class.
    pub fn per_class(&self) -> Vec<f64> {
        self.confusion
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let total: u64 = row.iter().sum();
                if total == 0 {
                    0.0
                } else {
                    row[i] as f64 / total as f64
                }
            })
            .collect()
    }
}

/// Runs the network in inference mode over a data set.
pub fn evaluate(
    net: &mut Network,
    data: &Dataset,
    transform: &Transform,
    batch: usize,
    classes: usize,
) -> Result<Evaluation, Diag> {
    let device = net.state.device.clone();
    let mut confusion = vec![vec![0u64; classes]; classes];
    let mut loss_sum = 0.0;
    for b in Batches::new(data, batch, Order::Sequential, transform)? {
        let (x, y) = tensors(b, &device).map_err(runtime_error)?;
        let logits = net.infer(&[x]).map_err(runtime_error)?.remove(0);
        let loss = candle_nn::loss::cross_entropy(&logits, &y)
            .and_then(|l| l.to_scalar::<f32>())
            .map_err(runtime_error)?;
        loss_sum += loss as f64 * y.dim(0).unwrap_or(0) as f64;
        let pred = logits
            .argmax(D::Minus1)
            .and_then(|p| p.to_vec1::<u32>())
            .map_err(runtime_error)?;
        let truth = y.to_vec1::<u32>().map_err(runtime_error)?;
        for (p, t) in pred.iter().zip(&truth) {
            confusion[*t as usize][(*p as usize).min(classes - 1)] += 1;
        }
    }
    let total: u64 = confusion.iter().flatten().sum();
    let correct: u64 = (0..classes).map(|i| confusion[i][i]).sum();
    Ok(Evaluation {
        accuracy: correct as f64 / total.max(1) as f64,
        loss: loss_sum / total.max(1) as f64,
        confusion,
    })
}

/// Trains `model` by `recipe`, writing metrics and checkpoints under `opts.out`; prints one
/// line per epoch like d2l. Returns every epoch's statistics (earlier ones too when resuming).
/// A model that reads token ids, or whose recipe names a text, trains as a language model.
pub fn train(model: &Model, recipe: &Recipe, opts: &RunOptions) -> Result<Vec<EpochStats>, Diag> {
    if recipe.data == config::DataSet::FraEng || translation::is_translator(model) {
        return translation::train(model, recipe, opts);
    }
    if recipe.data == config::DataSet::TimeMachine || language::reads_tokens(model) {
        return language::train(model, recipe, opts);
    }
    let (shape, classes) = classifier_shape(model)?;
    let (train_set, test_set, source) = data::fashion_mnist(opts.data.as_deref())?;
    if classes != train_set.classes().len() {
        return Err(Diag::new(
            "dlc::not_trainable",
            format!(
                "`{}` predicts {classes} classes but Fashion-MNIST has {}",
                model.name,
                train_set.classes().len()
            ),
        )
        .help(format!(
            "set the class count: `--set classes={}`",
            train_set.classes().len()
        )));
    }
    eprintln!("data: {source}");
    eprintln!(
        "      {} training and {} test images, resized to {}×{}×{}",
        train_set.len(),
        test_set.len(),
        shape.0,
        shape.1,
        shape.2
    );
    std::fs::create_dir_all(&opts.out).map_err(|e| {
        Diag::new(
            "dlc::io",
            format!("cannot create `{}`: {e}", opts.out.display()),
        )
        .help("choose another --out folder")
    })?;
    let device = Device::Cpu;
    let mut net = Network::new(model, &device, DType::F32, recipe.init, recipe.seed)
        .map_err(runtime_error)?;
    init_and_freeze(&mut net, model, opts)?;
    let mut stepper = Stepper::new(recipe.optimizer.clone(), &net.state.trainable());
    let mut history: Vec<EpochStats> = Vec::new();
    let model_path = opts.out.join("model.safetensors");
    let optim_path = opts.out.join("optimizer.safetensors");
    if opts.resume {
        history = resume(&mut net, &mut stepper, &model_path, &optim_path, opts)?;
        eprintln!(
            "resuming after epoch {} from {}",
            history.len(),
            model_path.display()
        );
    }
    let tf = transform(shape, recipe);
    let steps_per_epoch = train_set.len().div_ceil(recipe.batch);
    for epoch in history.len()..recipe.epochs {
        let lr = recipe
            .schedule
            .lr(recipe.optimizer.lr(), epoch, recipe.epochs);
        let started = Instant::now();
        let bar = metrics::progress(opts.progress, steps_per_epoch, epoch + 1, recipe.epochs);
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0u64, 0u64);
        let order = Order::Shuffled {
            seed: recipe.seed,
            epoch: epoch as u64,
        };
        for (step, b) in Batches::new(&train_set, recipe.batch, order, &tf)?.enumerate() {
            let (x, y) = tensors(b, &device).map_err(runtime_error)?;
            let n = y.dim(0).unwrap_or(0) as u64;
            let logits = net.forward(&[x], true).map_err(runtime_error)?.remove(0);
            let loss = candle_nn::loss::cross_entropy(&logits, &y).map_err(runtime_error)?;
            let loss_value = loss.to_scalar::<f32>().map_err(runtime_error)? as f64;
            if !loss_value.is_finite() {
                bar.abandon();
                return Err(Diag::new("dlc::diverged", format!("the loss became {loss_value} at epoch {}, step {}", epoch + 1, step + 1))
                    .help(format!(
                        "lower the learning rate (--lr) or add gradient clipping (`clip: 1.0`); the last good checkpoint is kept in {}",
                        opts.out.display()
                    )));
            }
            let mut grads = loss.backward().map_err(runtime_error)?;
            if let Some(max_norm) = recipe.clip {
                optim::clip_grad_norm(&mut grads, &net.state.trainable(), max_norm)
                    .map_err(runtime_error)?;
            }
            stepper.step(&grads, lr).map_err(runtime_error)?;
            let pred = logits.argmax(D::Minus1).map_err(runtime_error)?;
            correct += pred
                .eq(&y)
                .and_then(|m| m.to_dtype(DType::U32))
                .and_then(|m| m.sum_all())
                .and_then(|s| s.to_scalar::<u32>())
                .map_err(runtime_error)? as u64;
            loss_sum += loss_value * n as f64;
            seen += n;
            let rate = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "loss {:.3}, acc {:.3}, {rate:.0} examples/s",
                loss_sum / seen as f64,
                correct as f64 / seen as f64
            ));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let train_seconds = started.elapsed().as_secs_f64();
        let eval = evaluate(&mut net, &test_set, &tf, recipe.batch.max(256), classes)?;
        let stats = EpochStats {
            epoch: epoch + 1,
            lr,
            train_loss: loss_sum / seen.max(1) as f64,
            train_acc: correct as f64 / seen.max(1) as f64,
            test_loss: eval.loss,
            test_acc: eval.accuracy,
            seconds: started.elapsed().as_secs_f64(),
            examples_per_sec: seen as f64 / train_seconds.max(1e-9),
        };
        eprintln!("{}", stats.line());
        history.push(stats);
        save(
            &net,
            &stepper,
            &model_path,
            &optim_path,
            model,
            opts,
            history.len(),
        )?;
        metrics::write(&opts.out, model, recipe, &source.to_string(), &history)?;
    }
    Ok(history)
}

fn save(
    net: &Network,
    stepper: &Stepper,
    model_path: &Path,
    optim_path: &Path,
    model: &Model,
    opts: &RunOptions,
    epoch: usize,
) -> Result<(), Diag> {
    let meta = HashMap::from([
        (checkpoint::SPEC_HASH.to_string(), opts.spec_hash.clone()),
        (checkpoint::MODEL.to_string(), model.name.clone()),
        (checkpoint::EPOCH.to_string(), epoch.to_string()),
    ]);
    let tensors: BTreeMap<String, Tensor> = net
        .state
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    // The optimiser state first: a crash between the two writes leaves a model checkpoint
    // that is one epoch older than the optimiser's, which `--resume` detects.
    let mut optim_meta = meta.clone();
    optim_meta.insert("dlc.steps".to_string(), stepper.steps.to_string());
    checkpoint::save(optim_path, &stepper.state, optim_meta)?;
    checkpoint::save(model_path, &tensors, meta)
}

fn resume(
    net: &mut Network,
    stepper: &mut Stepper,
    model_path: &Path,
    optim_path: &Path,
    opts: &RunOptions,
) -> Result<Vec<EpochStats>, Diag> {
    let loaded = checkpoint::load(model_path)?;
    if loaded.metadata.get(checkpoint::SPEC_HASH) != Some(&opts.spec_hash) {
        return Err(Diag::new("dlc::checkpoint", format!("`{}` was trained from another spec, model or --set values", model_path.display()))
            .help("resume with the same spec file, --model and --set values, or start a new run with another --out"));
    }
    let epoch: usize = loaded
        .metadata
        .get(checkpoint::EPOCH)
        .and_then(|e| e.parse().ok())
        .unwrap_or(0);
    checkpoint::restore(model_path, &loaded, &net.state.variables(), true)?;
    // The two files are renamed one after the other: a run killed between the renames leaves
    // an optimiser state one epoch ahead of the weights. The weights are what matter; the
    // optimiser's running averages then restart.
    let optim = checkpoint::load(optim_path)?;
    let optim_epoch = optim
        .metadata
        .get(checkpoint::EPOCH)
        .and_then(|e| e.parse::<usize>().ok());
    if optim_epoch == Some(epoch) {
        stepper.steps = optim
            .metadata
            .get("dlc.steps")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        stepper.state = optim.tensors.into_iter().collect();
    } else {
        eprintln!(
            "warning: `{}` is not from epoch {epoch} (the run was stopped while saving); the optimiser state restarts",
            optim_path.display()
        );
    }
    let history = metrics::read(&opts.out)?;
    Ok(history.into_iter().take(epoch).collect())
}

/// The network of `model` in f32 for inference, with the weights of `path` loaded; also
/// returns the checkpoint's metadata.
pub fn inference_network(
    model: &Model,
    path: &Path,
) -> Result<(Network, HashMap<String, String>), Diag> {
    let mut net = Network::new(
        model,
        &Device::Cpu,
        DType::F32,
        crate::lower::Init::Torch,
        0,
    )
    .map_err(runtime_error)?;
    let meta = load_weights(&mut net, path)?;
    Ok((net, meta))
}

/// Loads a checkpoint, or any safetensors file whose names match the layers (a PyTorch state
/// dict saved as safetensors, say), into the network; returns the file's metadata.
pub fn load_weights(net: &mut Network, path: &Path) -> Result<HashMap<String, String>, Diag> {
    let loaded = checkpoint::load(path)?;
    checkpoint::restore(path, &loaded, &net.state.variables(), false)?;
    Ok(loaded.metadata)
}

/// A stable hash (FNV-1a, 64 bits) of the spec's sources, the model and its overrides.
pub fn spec_hash(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for part in parts {
        for b in part.bytes().chain([0u8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    format!("{h:016x}")
}

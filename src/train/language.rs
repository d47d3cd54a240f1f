//! Training character-level language models on The Time Machine, as d2l's chapter on
//! recurrent networks does: random subsequences of `steps` characters, cross-entropy of every
//! next character, perplexity as the measure, a sample of generated text as it learns.
//!
//! A model trains here when its one input is token ids `tokens[T]` and its one output is
//! `[N, T, vocab]`. The first `tokens` characters (d2l: 10,000) are the training text; the
//! characters that follow (up to 5,000) are held out, and their perplexity is the test measure.

use std::time::Instant;

use candle_core::{D, DType, Device, Tensor};

use super::config::Recipe;
use super::metrics::{self, EpochStats};
use super::optim::{self, Stepper};
use super::{RunOptions, resume, runtime_error, save};
use crate::data::text::Corpus;
use crate::diagnostics::{Diag, thousands};
use crate::elaborate::Model;
use crate::lower::Network;

/// Held-out characters after the training text.
const HELD_OUT: usize = 5_000;

/// The prompt of the samples printed while training (d2l's).
pub const PROMPT: &str = "time traveller";

/// Whether `model` reads token ids (and so trains as a language model).
pub fn reads_tokens(model: &Model) -> bool {
    let g = &model.graph;
    g.inputs.iter().any(|i| g.dag[*i].outputs[0].is_tokens())
}

/// The vocabulary size a language model predicts, or why the model is not one.
pub fn vocab_size(model: &Model) -> Result<usize, Diag> {
    let g = &model.graph;
    let not_lm = |why: String| {
        Diag::new(
            "dlc::not_trainable",
            format!(
                "`{}` cannot be trained as a language model: {why}",
                model.name
            ),
        )
        .help("a language model has one input `tokens[T]` and one output [T, vocab]")
    };
    let (&[input], &[output]) = (g.inputs.as_slice(), g.outputs.as_slice()) else {
        return Err(not_lm(format!(
            "it has {} inputs and {} outputs",
            g.inputs.len(),
            g.outputs.len()
        )));
    };
    let (i, o) = (&g.dag[input].outputs[0], &g.dag[output].outputs[0]);
    match (
        i.is_tokens(),
        i.rank(),
        o.rank(),
        o.0.last().and_then(|d| d.known()),
    ) {
        (true, 2, 3, Some(v)) if o.0[1] == i.0[1] => Ok(v as usize),
        _ => Err(not_lm(format!("its input is {i} and its output {o}"))),
    }
}

/// Mean cross-entropy of the next token and next-token accuracy over `logits` [N, T, V].
fn loss_and_correct(logits: &Tensor, targets: &Tensor) -> candle_core::Result<(Tensor, u64)> {
    let v = logits.dim(D::Minus1)?;
    let flat = logits.reshape(((), v))?;
    let y = targets.flatten_all()?;
    let loss = candle_nn::loss::cross_entropy(&flat, &y)?;
    let correct = flat
        .argmax(D::Minus1)?
        .eq(&y)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()? as u64;
    Ok((loss, correct))
}

fn ids(rows: Vec<u32>, n: usize, steps: usize, device: &Device) -> candle_core::Result<Tensor> {
    Tensor::from_vec(rows, (n, steps), device)
}

/// Mean loss and accuracy over `text` cut into consecutive subsequences of `steps`.
fn evaluate(
    net: &mut Network,
    text: &[u32],
    steps: usize,
    batch: usize,
) -> Result<(f64, f64), Diag> {
    let device = net.state.device.clone();
    let starts: Vec<usize> = (0..text.len().saturating_sub(1) / steps)
        .map(|i| i * steps)
        .collect();
    let (mut loss_sum, mut correct, mut seen) = (0.0, 0u64, 0u64);
    for chunk in starts.chunks(batch.max(1)) {
        let x: Vec<u32> = chunk
            .iter()
            .flat_map(|&s| text[s..s + steps].to_vec())
            .collect();
        let y: Vec<u32> = chunk
            .iter()
            .flat_map(|&s| text[s + 1..s + steps + 1].to_vec())
            .collect();
        let run = || -> candle_core::Result<(f64, u64)> {
            let x = ids(x, chunk.len(), steps, &device)?;
            let y = ids(y, chunk.len(), steps, &device)?;
            let logits = net.infer(&[x])?.remove(0);
            let (loss, c) = loss_and_correct(&logits, &y)?;
            Ok((loss.to_scalar::<f32>()? as f64, c))
        };
        let (loss, c) = run().map_err(runtime_error)?;
        let n = (chunk.len() * steps) as u64;
        loss_sum += loss * n as f64;
        correct += c;
        seen += n;
    }
    Ok((
        loss_sum / seen.max(1) as f64,
        correct as f64 / seen.max(1) as f64,
    ))
}

/// Continues `prompt` by `count` characters, each the most likely next one (d2l's
/// `predict_ch8`); characters outside the vocabulary read as `<unk>`.
pub fn generate(
    net: &mut Network,
    corpus: &Corpus,
    prompt: &str,
    count: usize,
) -> Result<String, Diag> {
    let device = net.state.device.clone();
    let mut seq: Vec<u32> = prompt
        .chars()
        .map(|c| corpus.vocab.id(&c.to_string()))
        .collect();
    if seq.is_empty() {
        seq.push(corpus.vocab.id(" "));
    }
    let mut out = prompt.to_string();
    for _ in 0..count {
        let next = (|| -> candle_core::Result<u32> {
            let x = ids(seq.clone(), 1, seq.len(), &device)?;
            let logits = net.infer(&[x])?.remove(0);
            logits
                .get(0)?
                .get(seq.len() - 1)?
                .argmax(0)?
                .to_scalar::<u32>()
        })()
        .map_err(runtime_error)?;
        seq.push(next);
        out.push_str(corpus.vocab.token(next));
    }
    Ok(out)
}

/// Trains a language model by `recipe` on The Time Machine, with the same run folder, metrics,
/// checkpoints and resume as image training; the metrics' accuracy is next-character accuracy
/// and the test figures are the held-out text's.
pub fn train(model: &Model, recipe: &Recipe, opts: &RunOptions) -> Result<Vec<EpochStats>, Diag> {
    let vocab = vocab_size(model)?;
    let full = Corpus::time_machine(opts.data.as_deref(), None)?;
    if vocab != full.vocab.len() {
        return Err(Diag::new(
            "dlc::not_trainable",
            format!(
                "`{}` predicts {vocab} tokens but the text has a vocabulary of {}",
                model.name,
                full.vocab.len()
            ),
        )
        .help(format!(
            "set the vocabulary size: `--set vocab={}`",
            full.vocab.len()
        )));
    }
    let train_len = recipe
        .tokens
        .unwrap_or(full.ids.len() * 9 / 10)
        .min(full.ids.len());
    let held_out = full.ids[train_len..(train_len + HELD_OUT).min(full.ids.len())].to_vec();
    let text = Corpus {
        ids: full.ids[..train_len].to_vec(),
        ..full.clone()
    };
    let per_epoch = text.batches_per_epoch(recipe.batch, recipe.steps);
    if per_epoch == 0 {
        return Err(Diag::new(
            "dlc::not_trainable",
            format!(
                "{} training characters make no batch of {} sequences of {}",
                thousands(train_len as u64),
                recipe.batch,
                recipe.steps
            ),
        )
        .help("use more `tokens`, a smaller `batch` or fewer `steps`"));
    }
    eprintln!("data: {}", full.describe());
    eprintln!(
        "      training on the first {} characters ({per_epoch} batches of {}×{} per epoch), {} held out",
        thousands(train_len as u64),
        recipe.batch,
        recipe.steps,
        thousands(held_out.len() as u64)
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
    super::init_and_freeze(&mut net, model, opts)?;
    let mut stepper = Stepper::new(recipe.optimizer.clone(), &net.state.trainable());
    let model_path = opts.out.join("model.safetensors");
    let optim_path = opts.out.join("optimizer.safetensors");
    let mut history = Vec::new();
    if opts.resume {
        history = resume(&mut net, &mut stepper, &model_path, &optim_path, opts)?;
        eprintln!(
            "resuming after epoch {} from {}",
            history.len(),
            model_path.display()
        );
    }
    let sample_every = (recipe.epochs / 10).max(1);
    for epoch in history.len()..recipe.epochs {
        let lr = recipe
            .schedule
            .lr(recipe.optimizer.lr(), epoch, recipe.epochs);
        let started = Instant::now();
        let bar = metrics::progress(opts.progress, per_epoch, epoch + 1, recipe.epochs);
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0u64, 0u64);
        for (x, y) in text.batches(recipe.batch, recipe.steps, recipe.seed, epoch as u64) {
            let n = x.len() as u64;
            let x = ids(x, recipe.batch, recipe.steps, &device).map_err(runtime_error)?;
            let y = ids(y, recipe.batch, recipe.steps, &device).map_err(runtime_error)?;
            let logits = net.forward(&[x], true).map_err(runtime_error)?.remove(0);
            let (loss, c) = loss_and_correct(&logits, &y).map_err(runtime_error)?;
            let loss_value = loss.to_scalar::<f32>().map_err(runtime_error)? as f64;
            if !loss_value.is_finite() {
                bar.abandon();
                return Err(Diag::new(
                    "dlc::diverged",
                    format!("the loss became {loss_value} at epoch {}", epoch + 1),
                )
                .help(format!(
                    "lower the learning rate (--lr) or clip gradients (`clip: 1`); the last good checkpoint is kept in {}",
                    opts.out.display()
                )));
            }
            let mut grads = loss.backward().map_err(runtime_error)?;
            if let Some(max_norm) = recipe.clip {
                optim::clip_grad_norm(&mut grads, &net.state.trainable(), max_norm)
                    .map_err(runtime_error)?;
            }
            stepper.step(&grads, lr).map_err(runtime_error)?;
            loss_sum += loss_value * n as f64;
            correct += c;
            seen += n;
            let rate = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "perplexity {:.2}, {rate:.0} tokens/s",
                (loss_sum / seen as f64).exp()
            ));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let train_seconds = started.elapsed().as_secs_f64();
        let (test_loss, test_acc) = evaluate(&mut net, &held_out, recipe.steps, 64)?;
        let stats = EpochStats {
            epoch: epoch + 1,
            lr,
            train_loss: loss_sum / seen.max(1) as f64,
            train_acc: correct as f64 / seen.max(1) as f64,
            test_loss,
            test_acc,
            seconds: started.elapsed().as_secs_f64(),
            examples_per_sec: seen as f64 / train_seconds.max(1e-9),
        };
        eprintln!(
            "epoch {}: perplexity {:.2} (held-out {:.2}), next-char acc {:.3}, {:.0} tokens/sec, {:.1} s",
            stats.epoch,
            stats.train_loss.exp(),
            stats.test_loss.exp(),
            stats.train_acc,
            stats.examples_per_sec,
            stats.seconds
        );
        if (epoch + 1) % sample_every == 0 || epoch + 1 == recipe.epochs {
            eprintln!("  {}", generate(&mut net, &full, PROMPT, 50)?);
        }
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
        metrics::write(&opts.out, model, recipe, &full.describe(), &history)?;
    }
    Ok(history)
}

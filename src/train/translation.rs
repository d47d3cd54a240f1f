//! Training encoder–decoder translation models on English–French pairs, as d2l's
//! `train_seq2seq` does: teacher forcing (the decoder reads `<bos>` and the target shifted by
//! one), d2l's masked cross-entropy, greedy decoding and BLEU on d2l's four probe sentences.
//!
//! A model trains here when it has two token inputs — the source sentence first, the
//! decoder's input second — and one output `[N, T, target vocabulary]`. The loss of a batch is
//! d2l's: each sentence's cross-entropy averaged over all `steps` positions with the padding
//! weighted 0, summed over the batch; the loss reported per epoch is that sum over the epoch
//! divided by the number of real target tokens.

use std::time::Instant;

use candle_core::{D, DType, Device, Tensor};

use super::config::Recipe;
use super::metrics::{self, EpochStats};
use super::optim::{self, Stepper};
use super::{RunOptions, resume, runtime_error, save};
use crate::data::shuffled_order;
use crate::data::translation::{BOS, EOS, PAD, Pairs, bleu};
use crate::diagnostics::Diag;
use crate::elaborate::Model;
use crate::lower::Network;

/// d2l's probe sentences and their reference translations.
pub const PROBES: [(&str, &str); 4] = [
    ("go .", "va !"),
    ("i lost .", "j'ai perdu ."),
    ("he's calm .", "il est calme ."),
    ("i'm home .", "je suis chez moi ."),
];

/// Whether `model` has the shape of a translation model: two token inputs, one output.
pub fn is_translator(model: &Model) -> bool {
    let g = &model.graph;
    g.inputs.len() == 2
        && g.outputs.len() == 1
        && g.inputs.iter().all(|i| g.dag[*i].outputs[0].is_tokens())
}

/// The `(source, target)` vocabulary sizes the model was built for, or why it cannot train
/// on `pairs`.
fn check_vocabularies(model: &Model, pairs: &Pairs) -> Result<(), Diag> {
    let g = &model.graph;
    let out = &g.dag[g.outputs[0]].outputs[0];
    let predicted = out.0.last().and_then(|d| d.known()).unwrap_or(0) as usize;
    let declared = |name: &str| {
        model
            .params
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.parse::<usize>().ok())
    };
    let (src, tgt) = (pairs.src.vocab.len(), pairs.tgt.vocab.len());
    let src_ok = declared("src_vocab").is_none_or(|v| v == src);
    if out.rank() != 3 || predicted != tgt || !src_ok {
        return Err(Diag::new(
            "dlc::not_trainable",
            format!(
                "`{}` is built for other vocabularies than the data's ({src} source and {tgt} target tokens); it predicts {out}",
                model.name
            ),
        )
        .help(format!("set them from the data: `--set src_vocab={src} --set tgt_vocab={tgt}`")));
    }
    Ok(())
}

fn ids(rows: Vec<u32>, n: usize, len: usize, device: &Device) -> candle_core::Result<Tensor> {
    Tensor::from_vec(rows, (n, len), device)
}

/// `<bos>` followed by each target row without its last token.
fn decoder_input(targets: &[u32], steps: usize) -> Vec<u32> {
    targets
        .chunks(steps)
        .flat_map(|row| std::iter::once(BOS).chain(row[..steps - 1].iter().copied()))
        .collect()
}

/// d2l's masked loss of a batch: per sentence the mean over all positions of the
/// cross-entropy with padding weighted 0, summed over the sentences. Also the number of
/// correctly predicted real tokens.
fn masked_loss(
    logits: &Tensor,
    targets: &Tensor,
    valid: &Tensor,
) -> candle_core::Result<(Tensor, u64)> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = log_probs
        .gather(&targets.unsqueeze(2)?, 2)?
        .squeeze(2)?
        .neg()?;
    let loss = (picked * valid)?.mean(1)?.sum_all()?;
    let correct = logits
        .argmax(D::Minus1)?
        .eq(targets)?
        .to_dtype(valid.dtype())?
        .mul(valid)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()? as u64;
    Ok((loss, correct))
}

/// 1 where a row's position holds a real token, 0 on padding.
fn valid_mask(valid: &[usize], steps: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = valid
        .iter()
        .flat_map(|&v| (0..steps).map(move |t| if t < v { 1.0 } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (valid.len(), steps), device)
}

/// Translates a preprocessed sentence greedily: the decoder's most likely next word, fed
/// back, until `<eos>` or `steps` words (d2l's `predict_seq2seq`).
pub fn translate(net: &mut Network, pairs: &Pairs, sentence: &str) -> Result<String, Diag> {
    let device = net.state.device.clone();
    let words: Vec<&str> = sentence.split(' ').collect();
    let src = pairs.src.vocab.encode(&words, pairs.steps);
    let mut out: Vec<u32> = vec![BOS];
    for _ in 0..pairs.steps {
        let next = (|| -> candle_core::Result<u32> {
            let x = ids(src.clone(), 1, pairs.steps, &device)?;
            let y = ids(out.clone(), 1, out.len(), &device)?;
            let logits = net.infer(&[x, y])?.remove(0);
            logits
                .get(0)?
                .get(out.len() - 1)?
                .argmax(0)?
                .to_scalar::<u32>()
        })()
        .map_err(runtime_error)?;
        if next == EOS {
            break;
        }
        out.push(next);
    }
    Ok(out[1..]
        .iter()
        .map(|&t| pairs.tgt.vocab.token(t))
        .collect::<Vec<_>>()
        .join(" "))
}

/// Mean teacher-forced loss (d2l's, per real token) and mean BLEU (k = 2) over the probes,
/// with their translations.
fn probe(net: &mut Network, pairs: &Pairs) -> Result<(f64, f64, Vec<String>), Diag> {
    let device = net.state.device.clone();
    let steps = pairs.steps;
    let (mut src, mut tgt, mut valid) = (Vec::new(), Vec::new(), Vec::new());
    for (s, t) in PROBES {
        let t_words: Vec<&str> = t.split(' ').collect();
        src.extend(
            pairs
                .src
                .vocab
                .encode(&s.split(' ').collect::<Vec<_>>(), steps),
        );
        let row = pairs.tgt.vocab.encode(&t_words, steps);
        valid.push(row.iter().filter(|&&x| x != PAD).count());
        tgt.extend(row);
    }
    let n = PROBES.len();
    let loss = (|| -> candle_core::Result<f64> {
        let x = ids(src, n, steps, &device)?;
        let dec = ids(decoder_input(&tgt, steps), n, steps, &device)?;
        let y = ids(tgt, n, steps, &device)?;
        let logits = net.infer(&[x, dec])?.remove(0);
        let mask = valid_mask(&valid, steps, &device)?;
        let (loss, _) = masked_loss(&logits, &y, &mask)?;
        Ok(loss.to_scalar::<f32>()? as f64)
    })()
    .map_err(runtime_error)?;
    let mut lines = Vec::new();
    let mut total = 0.0;
    for (s, t) in PROBES {
        let pred = translate(net, pairs, s)?;
        let score = bleu(
            &pred
                .split(' ')
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>(),
            &t.split(' ').collect::<Vec<_>>(),
            2,
        );
        total += score;
        lines.push(format!("{s} => {pred}, bleu {score:.3}"));
    }
    let tokens: usize = valid.iter().sum();
    Ok((loss / tokens.max(1) as f64, total / n as f64, lines))
}

/// Trains a translation model by `recipe` on the sentence pairs, with the same run folder,
/// metrics, checkpoints and resume as image training. In the metrics, `train_acc` is the
/// fraction of real target tokens predicted right under teacher forcing; `test_loss` and
/// `test_acc` are the probes' loss and mean BLEU.
pub fn train(model: &Model, recipe: &Recipe, opts: &RunOptions) -> Result<Vec<EpochStats>, Diag> {
    let pairs = Pairs::load(opts.data.as_deref(), recipe.pairs, recipe.steps)?;
    check_vocabularies(model, &pairs)?;
    eprintln!("data: {}", pairs.describe());
    std::fs::create_dir_all(&opts.out).map_err(|e| {
        Diag::new(
            "dlc::io",
            format!("cannot create `{}`: {e}", opts.out.display()),
        )
        .help("choose another --out folder")
    })?;
    let device = Device::Cpu;
    let steps = pairs.steps;
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
    let per_epoch = pairs.len().div_ceil(recipe.batch);
    let report_every = (recipe.epochs / 10).max(1);
    for epoch in history.len()..recipe.epochs {
        let lr = recipe
            .schedule
            .lr(recipe.optimizer.lr(), epoch, recipe.epochs);
        let started = Instant::now();
        let bar = metrics::progress(opts.progress, per_epoch, epoch + 1, recipe.epochs);
        let (mut loss_sum, mut correct, mut tokens, mut sentences) = (0.0f64, 0u64, 0u64, 0u64);
        let order = shuffled_order(pairs.len(), recipe.seed, epoch as u64);
        for rows in order.chunks(recipe.batch) {
            let n = rows.len();
            let src = Pairs::rows(&pairs.src, rows, steps);
            let tgt = Pairs::rows(&pairs.tgt, rows, steps);
            let valid: Vec<usize> = rows.iter().map(|&r| pairs.tgt.valid[r]).collect();
            let (loss, c) = (|| -> candle_core::Result<(Tensor, u64)> {
                let x = ids(src, n, steps, &device)?;
                let dec = ids(decoder_input(&tgt, steps), n, steps, &device)?;
                let y = ids(tgt, n, steps, &device)?;
                let logits = net.forward(&[x, dec], true)?.remove(0);
                masked_loss(&logits, &y, &valid_mask(&valid, steps, &device)?)
            })()
            .map_err(runtime_error)?;
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
            loss_sum += loss_value;
            correct += c;
            tokens += valid.iter().sum::<usize>() as u64;
            sentences += n as u64;
            bar.set_message(format!("loss {:.3}", loss_sum / tokens.max(1) as f64));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let train_seconds = started.elapsed().as_secs_f64();
        let (probe_loss, probe_bleu, lines) = probe(&mut net, &pairs)?;
        let stats = EpochStats {
            epoch: epoch + 1,
            lr,
            train_loss: loss_sum / tokens.max(1) as f64,
            train_acc: correct as f64 / tokens.max(1) as f64,
            test_loss: probe_loss,
            test_acc: probe_bleu,
            seconds: started.elapsed().as_secs_f64(),
            examples_per_sec: sentences as f64 / train_seconds.max(1e-9),
        };
        eprintln!(
            "epoch {}: loss {:.3}, token acc {:.3}, probe bleu {:.3}, {:.0} sentences/sec, {:.1} s",
            stats.epoch,
            stats.train_loss,
            stats.train_acc,
            stats.test_acc,
            stats.examples_per_sec,
            stats.seconds
        );
        if (epoch + 1) % report_every == 0 || epoch + 1 == recipe.epochs {
            for l in &lines {
                eprintln!("  {l}");
            }
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
        metrics::write(&opts.out, model, recipe, &pairs.describe(), &history)?;
    }
    Ok(history)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_input_is_shifted_behind_bos() {
        assert_eq!(
            decoder_input(&[7, 8, 3, 1, 9, 3, 1, 1], 4),
            [2, 7, 8, 3, 2, 9, 3, 1]
        );
    }

    #[test]
    fn masked_loss_follows_d2l() {
        let dev = Device::Cpu;
        // Two sentences of 3 positions over a vocabulary of 2; uniform logits: every
        // position's cross-entropy is ln 2.
        let logits = Tensor::zeros((2, 3, 2), DType::F32, &dev).unwrap();
        let y = Tensor::new(&[[1u32, 0, 1], [0, 1, 1]], &dev).unwrap();
        let mask = valid_mask(&[3, 1], 3, &dev).unwrap();
        let (loss, _) = masked_loss(&logits, &y, &mask).unwrap();
        // d2l: (3·ln2/3) + (1·ln2/3), summed over the batch.
        let want = std::f32::consts::LN_2 * (1.0 + 1.0 / 3.0);
        assert!((loss.to_scalar::<f32>().unwrap() - want).abs() < 1e-6);
    }
}

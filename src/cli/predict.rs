//! `dlc predict`: classify image files with a trained checkpoint, or continue a prompt with a
//! trained language model.
//!
//! Each PNG or JPEG is decoded, converted to the model's input channels (RGB to grey with
//! ITU-R BT.601 luma, grey to RGB by replication), then preprocessed exactly as training
//! does: the data module's bilinear resize, scaling to [0, 1] and the recipe's
//! normalisation (`dlc::train::transform` through `dlc::data::make_batch`).

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use dlc::data::{self, Dataset, Transform};
use dlc::diagnostics::Diag;
use dlc::lower::{Init, Network};
use dlc::train::{self, checkpoint, config};
use serde_json::json;

use super::ModelArgs;

/// Images run through the network at once.
const CHUNK: usize = 32;

/// Arguments of `dlc predict`.
#[derive(Args, Debug)]
#[command(
    after_help = "Images: PNG or JPEG, greyscale or RGB (alpha is ignored), any size. They are \
converted to the model's input channels (RGB to grey with ITU-R BT.601 luma for 1-channel models, \
grey replicated for 3-channel ones), resized bilinearly to the input's H×W, scaled to [0, 1] and \
normalised as in training.\n\nFashion-MNIST images are white on black: the garment is bright on a \
dark background. A photo of a dark object on a light background must be inverted first (dlc does \
not invert automatically).\n\nExample:\n  dlc predict specs/lenet_bn.dlc --model lenet_bn_relu \
--weights runs/lenet/model.safetensors --top 3 shoe.png\n\nLanguage models (token inputs) continue a \
prompt instead, one most likely character at a time:\n  dlc predict specs/rnn.dlc --model gru \
--weights runs/gru/model.safetensors --prompt \"time traveller\" --chars 50"
)]
pub struct PredictArgs {
    /// The spec file the checkpoint was trained from.
    #[arg(value_name = "SPEC")]
    file: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// The weights: a `model.safetensors` from `dlc train`, or any safetensors file whose
    /// names match the spec's layers.
    #[arg(long, value_name = "CKPT")]
    weights: PathBuf,
    /// How many of the most likely classes to print per image.
    #[arg(long, value_name = "K", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    top: u32,
    /// `table` for people; `json` adds every class's probability and the raw logits.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// PNG or JPEG files to classify.
    #[arg(value_name = "IMAGE", required_unless_present = "prompt")]
    images: Vec<PathBuf>,
    /// Language models: the text to continue.
    #[arg(long, value_name = "TEXT", conflicts_with = "images")]
    prompt: Option<String>,
    /// Language models: how many characters to add to the prompt.
    #[arg(long, value_name = "N", default_value_t = 50)]
    chars: usize,
    /// Language models: the text the model was trained on (its vocabulary); default the
    /// shipped Time Machine.
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

/// One decoded image, ready for the network.
struct Input {
    path: PathBuf,
    /// `(width, height)` of the file.
    size: (u32, u32),
    /// Whether the file has colour channels.
    colour: bool,
    /// `C × H × W` values, preprocessed as in training.
    values: Vec<f32>,
}

/// One image's result.
struct Prediction {
    logits: Vec<f32>,
    probs: Vec<f64>,
}

/// Classifies the images and prints the most likely classes.
pub fn run(args: PredictArgs) -> ExitCode {
    let compiled = match super::compile_one(&args.file, &args.model) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let model = &compiled.models[0];
    let attach = |d: Diag| compiled.program.sources.attach(d);
    if let Some(prompt) = &args.prompt {
        return continue_prompt(model, &args, prompt);
    }
    let (shape, classes) = match train::classifier_shape(model) {
        Ok(s) => s,
        Err(d) => return super::report(vec![attach(d)]),
    };
    let recipe = match config::recipe(model, &config::Overrides::default()) {
        Ok(r) => r,
        Err(diags) => return super::report(diags.into_iter().map(attach).collect()),
    };
    let mut net = match Network::new(model, &Device::Cpu, DType::F32, Init::Torch, 0) {
        Ok(n) => n,
        Err(e) => return super::report(vec![train::runtime_error(e)]),
    };
    // Every problem at once: the checkpoint and each image.
    let mut problems = Vec::new();
    match train::load_weights(&mut net, &args.weights) {
        Ok(meta) => {
            if let Some(trained) = meta.get(checkpoint::MODEL).filter(|m| **m != model.name) {
                eprintln!(
                    "warning: `{}` was trained as `{trained}`, not `{}`; its layers fit, but check --model",
                    args.weights.display(),
                    model.name
                );
            }
        }
        Err(d) => problems.push(d),
    }
    let transform = train::transform(shape, &recipe);
    let mut inputs = Vec::with_capacity(args.images.len());
    for path in &args.images {
        match load(path, &transform) {
            Ok(input) => inputs.push(input),
            Err(d) => problems.push(d),
        }
    }
    if !problems.is_empty() {
        return super::report(problems.into_iter().map(attach).collect());
    }
    let predictions = match predict(&mut net, &inputs, shape) {
        Ok(p) => p,
        Err(d) => return super::report(vec![d]),
    };
    for input in &inputs {
        if light_background(input, &transform, shape) {
            eprintln!(
                "note: `{}` has a light background; Fashion-MNIST models expect a bright object on a dark \
                 background (invert the image first)",
                input.path.display()
            );
        }
    }
    let names = class_names(classes);
    let top = (args.top as usize).min(classes);
    let text = match args.format {
        Format::Table => table(&inputs, &predictions, &names, top, shape),
        Format::Json => json(model, &args, &inputs, &predictions, &names, top, shape),
    };
    super::emit(text.trim_end());
    ExitCode::SUCCESS
}

/// Fashion-MNIST's names for 10 classes, else `class 0`, `class 1`, …
fn class_names(classes: usize) -> Vec<String> {
    if classes == data::FASHION_MNIST_CLASSES.len() {
        data::FASHION_MNIST_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        (0..classes).map(|i| format!("class {i}")).collect()
    }
}

fn image_error(path: &Path, what: impl std::fmt::Display) -> Diag {
    Diag::new(
        "dlc::image",
        format!("cannot decode `{}`: {what}", path.display()),
    )
    .help("pass a PNG or JPEG image (greyscale or RGB)")
}

/// Reads, decodes and preprocesses one image file.
fn load(path: &Path, transform: &Transform) -> Result<Input, Diag> {
    let bytes = std::fs::read(path).map_err(|e| {
        Diag::new("dlc::io", format!("cannot read `{}`: {e}", path.display()))
            .help("check the image's path")
    })?;
    let reader = image::io::Reader::new(Cursor::new(&bytes[..]))
        .with_guessed_format()
        .map_err(|e| image_error(path, e))?;
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg) => {}
        Some(other) => {
            return Err(image_error(
                path,
                format!("it is {other:?}, not PNG or JPEG"),
            ));
        }
        None => return Err(image_error(path, "it is neither a PNG nor a JPEG file")),
    }
    // The decoders return errors for bad input; a panic in one must not end the run either.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || reader.decode()))
        .map_err(|_| image_error(path, "the decoder failed on this file"))?
        .map_err(|e| image_error(path, e))?;
    let (width, height) = (decoded.width(), decoded.height());
    if width == 0 || height == 0 {
        return Err(image_error(path, format!("it is {width}×{height} pixels")));
    }
    let colour = decoded.color().has_color();
    let (rows, cols) = (height as usize, width as usize);
    let values = if transform.channels == 3 && colour {
        // Each of R, G, B through the same resize and its own channel's normalisation.
        let rgb = decoded.to_rgb8().into_raw();
        let mut values = Vec::with_capacity(transform.output_shape(rows, cols).0 * rows * cols);
        for c in 0..3 {
            let plane: Vec<u8> = rgb.iter().skip(c).step_by(3).copied().collect();
            let pick = |v: &[f32]| match v.len() {
                0 => Vec::new(),
                1 => vec![v[0]],
                _ => vec![v[c]],
            };
            let one = Transform {
                channels: 1,
                size: transform.size,
                mean: pick(&transform.mean),
                std: pick(&transform.std),
            };
            values.extend(preprocess(path, plane, rows, cols, &one)?);
        }
        values
    } else {
        // One grey plane; the transform replicates it for 3-channel models.
        let grey = if colour {
            luma601(&decoded.to_rgb8().into_raw())
        } else {
            decoded.to_luma8().into_raw()
        };
        preprocess(path, grey, rows, cols, transform)?
    };
    Ok(Input {
        path: path.to_path_buf(),
        size: (width, height),
        colour,
        values,
    })
}

/// ITU-R BT.601 luma of packed RGB bytes, rounded as PIL's `convert("L")` does.
fn luma601(rgb: &[u8]) -> Vec<u8> {
    rgb.chunks_exact(3)
        .map(|p| {
            ((p[0] as u32 * 19_595 + p[1] as u32 * 38_470 + p[2] as u32 * 7_471 + 0x8000) >> 16)
                as u8
        })
        .collect()
}

/// Runs one grey `rows × cols` image through the training pipeline's transform.
fn preprocess(
    path: &Path,
    grey: Vec<u8>,
    rows: usize,
    cols: usize,
    transform: &Transform,
) -> Result<Vec<f32>, Diag> {
    let one = Dataset::new(grey, vec![0], rows, cols, vec![String::new()])
        .map_err(|d| image_error(path, d.message))?;
    Ok(data::make_batch(&one, &[0], transform)?.images)
}

/// Runs the network in inference mode; softmax in f64 on the logits.
fn predict(
    net: &mut Network,
    inputs: &[Input],
    (c, h, w): (usize, usize, usize),
) -> Result<Vec<Prediction>, Diag> {
    let mut out = Vec::with_capacity(inputs.len());
    for chunk in inputs.chunks(CHUNK) {
        let values: Vec<f32> = chunk
            .iter()
            .flat_map(|i| i.values.iter().copied())
            .collect();
        let x = Tensor::from_vec(values, (chunk.len(), c, h, w), &Device::Cpu)
            .map_err(train::runtime_error)?;
        let logits = net.infer(&[x]).map_err(train::runtime_error)?.remove(0);
        let logits = logits
            .to_dtype(DType::F32)
            .and_then(|l| l.to_vec2::<f32>())
            .map_err(train::runtime_error)?;
        out.extend(logits.into_iter().map(|logits| Prediction {
            probs: softmax(&logits),
            logits,
        }));
    }
    Ok(out)
}

fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &l| m.max(l as f64));
    let exps: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// Class indices by decreasing probability (ties: lower index first).
fn ranking(probs: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    order
}

/// Whether the image's border is mostly light, judged on the first preprocessed channel
/// undone to [0, 1].
fn light_background(
    input: &Input,
    transform: &Transform,
    (_, h, w): (usize, usize, usize),
) -> bool {
    if h == 0 || w == 0 || input.values.len() < h * w {
        return false;
    }
    let (m, s) = match (transform.mean.first(), transform.std.first()) {
        (Some(&m), Some(&s)) => (m, s),
        _ => (0.0, 1.0),
    };
    let plane = &input.values[..h * w];
    let border: Vec<f32> = (0..h)
        .flat_map(|y| (0..w).map(move |x| (y, x)))
        .filter(|&(y, x)| y == 0 || x == 0 || y == h - 1 || x == w - 1)
        .map(|(y, x)| plane[y * w + x] * s + m)
        .collect();
    border.iter().sum::<f32>() / border.len() as f32 > 0.5
}

fn describe(input: &Input, (c, h, w): (usize, usize, usize)) -> String {
    let kind = if input.colour { "RGB" } else { "grey" };
    format!("{}×{} {kind} → {c}×{h}×{w}", input.size.0, input.size.1)
}

fn table(
    inputs: &[Input],
    preds: &[Prediction],
    names: &[String],
    top: usize,
    shape: (usize, usize, usize),
) -> String {
    let width = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    for (input, p) in inputs.iter().zip(preds) {
        let order = ranking(&p.probs);
        let best = order[0];
        out.push_str(&format!(
            "{}: {} ({:.1}%)  [{}]\n",
            input.path.display(),
            names[best],
            100.0 * p.probs[best],
            describe(input, shape)
        ));
        for (rank, &k) in order.iter().take(top).enumerate() {
            out.push_str(&format!(
                "  {:>2}. {:<width$}  {:>6.2}%\n",
                rank + 1,
                names[k],
                100.0 * p.probs[k]
            ));
        }
    }
    out
}

fn json(
    model: &dlc::elaborate::Model,
    args: &PredictArgs,
    inputs: &[Input],
    preds: &[Prediction],
    names: &[String],
    top: usize,
    shape: (usize, usize, usize),
) -> String {
    let images: Vec<_> = inputs
        .iter()
        .zip(preds)
        .map(|(input, p)| {
            let order = ranking(&p.probs);
            let best = order[0];
            let top: Vec<_> = order
                .iter()
                .take(top)
                .map(|&k| json!({"index": k, "class": names[k], "probability": p.probs[k]}))
                .collect();
            json!({
                "image": input.path.display().to_string(),
                "width": input.size.0,
                "height": input.size.1,
                "colour": input.colour,
                "predicted": best,
                "class": names[best],
                "probability": p.probs[best],
                "top": top,
                "probabilities": p.probs,
                "logits": p.logits,
            })
        })
        .collect();
    let doc = json!({
        "model": model.name,
        "weights": args.weights.display().to_string(),
        "input": [shape.0, shape.1, shape.2],
        "classes": names,
        "images": images,
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// Continues `prompt` with a language model's most likely characters and prints the text.
fn continue_prompt(model: &dlc::elaborate::Model, args: &PredictArgs, prompt: &str) -> ExitCode {
    let result = (|| -> Result<String, Diag> {
        let vocab = train::language::vocab_size(model)?;
        let corpus = data::text::Corpus::time_machine(args.data.as_deref(), None)?;
        if vocab != corpus.vocab.len() {
            return Err(Diag::new(
                "dlc::not_trainable",
                format!(
                    "`{}` predicts {vocab} tokens but the text has a vocabulary of {}",
                    model.name,
                    corpus.vocab.len()
                ),
            )
            .help("pass the text the model was trained on with --data"));
        }
        let (mut net, _) = train::inference_network(model, &args.weights)?;
        train::language::generate(&mut net, &corpus, &prompt.to_lowercase(), args.chars)
    })();
    match result {
        Ok(text) => {
            super::emit(&text);
            ExitCode::SUCCESS
        }
        Err(d) => super::report(vec![d]),
    }
}

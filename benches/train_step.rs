//! Training and inference speed (issue 5's benchmark table): dlc's lowered network against
//! the same network written by hand with candle-nn layers, and against PyTorch on the CPU, all
//! measured in one run on this machine, with each column's peak memory.
//!
//! Rows (the names select them):
//! - `lenet`: d2l's LeNet train step, batch 256, 1×28×28 (`specs/lenet.dlc` `lenet`)
//! - `resnet`: d2l's ResNet-18 train step, batch 32, 1×96×96 (`specs/resnet.dlc` `d2l_resnet18`)
//! - `mobilenet`: torchvision's MobileNetV2 train step, batch 32, 3×96×96, 10 classes
//!   (`specs/mobilenet.dlc` `mobilenet_v2` with `--set size=96 --set classes=10`)
//! - `lstm`, `gru`: d2l's character model train step, one-hot 28 → 256 hidden, 35 time steps,
//!   batch 32, linear to 28, cross-entropy over every step (`specs/rnn.dlc` `lstm`, `gru`)
//! - `infer1`, `infer32`: torchvision's ResNet-18 inference, batch 1 and 32, 3×224×224
//!   (`specs/resnet.dlc` `resnet18`): forward in evaluation mode, no gradients
//! - groups: `rnn` (lstm, gru), `infer` (infer1, infer32), `train` (the first five), `all`
//!
//! A training step is: forward in training mode, cross-entropy, backward, plain SGD update
//! (lr 0.1), on one fixed random batch; an inference step is one forward pass. Each column
//! warms up (2 steps by default), then times every step; the table shows the median and the
//! minimum in milliseconds per step. The timed steps are split into rounds (5 by default) that
//! take turns between the columns (dlc, candle-nn, PyTorch, dlc, ...), so that a change in the
//! machine's load does not fall on one column only; PyTorch runs as a child process kept alive
//! between its turns.
//!
//! Peak memory: before each timed turn of a column the process's resident high-water mark is
//! reset (`train_step/memory.rs`; PyTorch's child does the same for itself); the column's peak
//! is the highest mark over its turns, in MiB. The dlc and candle-nn columns share this
//! process, and the allocator (mimalloc, set as in the `dlc` binary never to hand freed pages
//! back) keeps every page any column or earlier row touched: in a run of several rows or both
//! Rust columns, a peak is at least the largest footprint so far. For a column's own peak,
//! run one row and one Rust column per process (`lenet --only dlc,torch`, then `lenet --only
//! candle`). The table also prints each process's resident size before the first step.
//!
//! Columns:
//! - `dlc`: `dlc::lower::Network` built from the spec, updated by `dlc::train::optim::Stepper`
//!   (SGD, no momentum or weight decay); inference is `Network::infer` (evaluation mode, no gradients).
//!   Where the spec or model does not exist (yet), the column says "not built" and why.
//! - `candle-nn`: the same layers written with `candle_nn::conv2d` / `linear` / `batch_norm`
//!   / `rnn::lstm` / `rnn::gru` and candle's own `avg_pool2d` / `max_pool2d`, updated by
//!   `candle_nn::SGD` (`train_step/mobilenet.rs`, `char_rnn.rs`, `resnet18.rs`). This is the
//!   baseline a candle user would write, even though candle's pooling backward is wrong in
//!   general (see `src/lower/pool.rs`). Candle has no pooling backward when the kernel differs
//!   from the stride, so d2l ResNet's stem `maxpool(3, stride: 2, pad: 1)` is written as
//!   `max_pool2d(2)`, which gives the same 24×24 output; that pooling is the one place where
//!   the two columns do not compute the same function, and it holds no parameters. The
//!   inference net's weights are plain tensors (as loaded from a checkpoint), so candle records
//!   no graph.
//! - `PyTorch`: `benches/train_step_torch.py` run by `$DLC_TORCH_PYTHON` (default
//!   `/work/venv/bin/python`) with `torch.set_num_threads(<cores>)`; inference under
//!   `torch.no_grad()`. Left out, with one line saying why, when that python, its torch or
//!   torchvision is missing.
//!
//! Before timing, the bench asserts that every column trains the same number of parameters.
//!
//! Usage (options after `--`, or the environment variables in brackets):
//!
//! ```text
//! cargo bench --bench train_step                                   # every row, all columns
//! cargo bench --bench train_step -- --markdown                     # + the README table
//! cargo bench --bench train_step -- lenet --steps 30               # one row, 30 timed steps
//! cargo bench --bench train_step -- lenet --breakdown              # + forward/backward/update
//! ```
//!
//! - row names as above [DLC_BENCH_NETS=lenet,resnet]; default `all`
//! - `--steps N`: timed steps per column [DLC_BENCH_STEPS]; default 20 (LeNet, LSTM, GRU,
//!   inference batch 1), 5 (the others)
//! - `--rounds N`: turns the timed steps are split into [DLC_BENCH_ROUNDS]; default 5
//! - `--warmup N`: untimed steps first [DLC_BENCH_WARMUP]; default 2
//! - `--only dlc,candle,torch`: the columns to run [DLC_BENCH_ONLY]; default all three
//! - `--no-torch`: leave out PyTorch (same as `--only dlc,candle`)
//! - `--breakdown`: also a table of forward (+ loss) / backward / optimiser medians
//!   [DLC_BENCH_BREAKDOWN=1]. For a profile of one column:
//!   `perf record -g target/release/deps/train_step-<hash> lenet --only dlc --steps 30`
//! - `--layers`: also dlc's layers one by one, forward and backward, each alone on the
//!   activations of the real forward pass, summed by op [DLC_BENCH_LAYERS=1] (training rows)
//! - `--markdown`: also the table for the README's "Speed" section, with a header line naming
//!   the machine, the date, the versions and this command [DLC_BENCH_MARKDOWN=1]
//! - `--freeze PATTERN` (repeatable): the dlc column freezes the parameters whose names match
//!   (`*` any run of characters; `dlc::lower::State::freeze`) and trains the others, as a
//!   fine-tuning step would; run it with `--only dlc`, the other columns train everything
//! - `--threads N`: PyTorch's thread count [DLC_BENCH_THREADS]; default the number of cores
//!   (candle's pool follows `RAYON_NUM_THREADS`, else the number of cores)

/// The allocator of the `dlc` binary (`src/main.rs`), so that the dlc and candle-nn columns
/// run as they would there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Device, Module, ModuleT, Result, Tensor, Var};
use candle_nn::{Conv2dConfig, Optimizer as _, VarBuilder, VarMap};
use dlc::elaborate::Model;
use dlc::lower::{Init, Network};
use dlc::session::{Select, compile};
use dlc::train::optim::{Optimizer, Stepper};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "train_step/char_rnn.rs"]
mod char_rnn;
#[path = "train_step/markdown.rs"]
mod markdown;
#[path = "train_step/memory.rs"]
mod memory;
#[path = "train_step/mobilenet.rs"]
mod mobilenet;
#[path = "train_step/resnet18.rs"]
mod resnet18;

use char_rnn::CandleCharRnn;
use mobilenet::CandleMobilenetV2;
use resnet18::CandleResnet18;

const LR: f64 = 0.1;
const SEED: u64 = 0;

/// One benchmarked row: a network and what is timed (a training step, or inference).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Net {
    Lenet,
    Resnet,
    Mobilenet,
    Lstm,
    Gru,
    /// torchvision's ResNet-18, inference on one 224×224 image.
    Infer1,
    /// torchvision's ResNet-18, inference on 32 images of 224×224.
    Infer32,
}

/// What a row feeds the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Input {
    /// Images `[N, channels, height, width]`, uniform in [0, 1), one label each.
    Image(usize, usize, usize),
    /// Token ids `[N, time steps]` over `vocab`, and the next token at every step.
    Tokens { steps: usize, vocab: usize },
}

/// d2l's character models: vocabulary of The Time Machine, hidden units, time steps.
const VOCAB: usize = 28;
const HIDDEN: usize = 256;
const TIME_STEPS: usize = 35;

/// Every row, in table order.
const ALL: [Net; 7] = [
    Net::Lenet,
    Net::Resnet,
    Net::Mobilenet,
    Net::Lstm,
    Net::Gru,
    Net::Infer1,
    Net::Infer32,
];

impl Net {
    /// The name `benches/train_step_torch.py --net` knows it by.
    fn key(self) -> &'static str {
        match self {
            Net::Lenet => "lenet",
            Net::Resnet => "resnet",
            Net::Mobilenet => "mobilenet",
            Net::Lstm => "lstm",
            Net::Gru => "gru",
            Net::Infer1 => "infer1",
            Net::Infer32 => "infer32",
        }
    }
    fn title(self) -> &'static str {
        match self {
            Net::Lenet => "LeNet (lenet)",
            Net::Resnet => "ResNet-18 (d2l_resnet18)",
            Net::Mobilenet => "MobileNetV2 (mobilenet_v2, 3×96×96)",
            Net::Lstm => "LSTM (lstm, 28→256, 35 steps)",
            Net::Gru => "GRU (gru, 28→256, 35 steps)",
            Net::Infer1 | Net::Infer32 => "ResNet-18 inference (resnet18, 3×224×224)",
        }
    }
    /// The row's name in the README table.
    fn label(self) -> &'static str {
        match self {
            Net::Lenet => "LeNet train step (`lenet`), batch 256, 1×28×28",
            Net::Resnet => "ResNet-18 train step (`d2l_resnet18`), batch 32, 1×96×96",
            Net::Mobilenet => "MobileNetV2 train step (`mobilenet_v2`), batch 32, 3×96×96",
            Net::Lstm => "LSTM train step (`lstm`), batch 32, 35 steps, 28→256",
            Net::Gru => "GRU train step (`gru`), batch 32, 35 steps, 28→256",
            Net::Infer1 => "ResNet-18 inference (`resnet18`), batch 1, 3×224×224",
            Net::Infer32 => "ResNet-18 inference (`resnet18`), batch 32, 3×224×224",
        }
    }
    /// Spec file, model, and `--set` parameters of the dlc column.
    fn spec(self) -> (&'static str, &'static str, &'static [&'static str]) {
        match self {
            Net::Lenet => ("specs/lenet.dlc", "lenet", &[]),
            Net::Resnet => ("specs/resnet.dlc", "d2l_resnet18", &[]),
            Net::Mobilenet => (
                "specs/mobilenet.dlc",
                "mobilenet_v2",
                &["size=96", "classes=10"],
            ),
            Net::Lstm => ("specs/rnn.dlc", "lstm", &[]),
            Net::Gru => ("specs/rnn.dlc", "gru", &[]),
            Net::Infer1 | Net::Infer32 => ("specs/resnet.dlc", "resnet18", &[]),
        }
    }
    fn batch(self) -> usize {
        match self {
            Net::Lenet => 256,
            Net::Infer1 => 1,
            Net::Resnet | Net::Mobilenet | Net::Lstm | Net::Gru | Net::Infer32 => 32,
        }
    }
    fn input(self) -> Input {
        match self {
            Net::Lenet => Input::Image(1, 28, 28),
            Net::Resnet => Input::Image(1, 96, 96),
            Net::Mobilenet => Input::Image(3, 96, 96),
            Net::Lstm | Net::Gru => Input::Tokens {
                steps: TIME_STEPS,
                vocab: VOCAB,
            },
            Net::Infer1 | Net::Infer32 => Input::Image(3, 224, 224),
        }
    }
    /// Outputs per prediction.
    fn classes(self) -> usize {
        match self {
            Net::Lenet | Net::Resnet | Net::Mobilenet => CLASSES,
            Net::Lstm | Net::Gru => VOCAB,
            Net::Infer1 | Net::Infer32 => 1000,
        }
    }
    /// Whether a step trains (else it is a forward pass in evaluation mode, no gradients).
    fn trains(self) -> bool {
        !matches!(self, Net::Infer1 | Net::Infer32)
    }
    fn default_steps(self) -> usize {
        match self {
            Net::Lenet | Net::Lstm | Net::Gru | Net::Infer1 => 20,
            Net::Resnet | Net::Mobilenet | Net::Infer32 => 5,
        }
    }
    fn parse(s: &str) -> Option<Vec<Net>> {
        match s {
            "lenet" => Some(vec![Net::Lenet]),
            "resnet" | "resnet18" | "d2l_resnet18" => Some(vec![Net::Resnet]),
            "mobilenet" | "mobilenet_v2" => Some(vec![Net::Mobilenet]),
            "lstm" => Some(vec![Net::Lstm]),
            "gru" => Some(vec![Net::Gru]),
            "rnn" => Some(vec![Net::Lstm, Net::Gru]),
            "infer1" => Some(vec![Net::Infer1]),
            "infer32" => Some(vec![Net::Infer32]),
            "infer" | "inference" => Some(vec![Net::Infer1, Net::Infer32]),
            "train" => Some(ALL.into_iter().filter(|n| n.trains()).collect()),
            "all" => Some(ALL.to_vec()),
            _ => None,
        }
    }
}

/// Classes of the image-classification training rows.
const CLASSES: usize = 10;

/// Command-line and environment options.
struct Opts {
    nets: Vec<Net>,
    steps: Option<usize>,
    rounds: Option<usize>,
    warmup: usize,
    breakdown: bool,
    layers: bool,
    markdown: bool,
    dlc: bool,
    candle: bool,
    torch: bool,
    threads: usize,
    python: PathBuf,
    freeze: Vec<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench train_step -- \
         [lenet|resnet|mobilenet|lstm|gru|infer1|infer32|rnn|infer|train|all]... [--steps N] \
         [--rounds N] [--warmup N] [--only dlc,candle,torch] [--no-torch] [--breakdown] [--layers] \
         [--markdown] [--threads N] [--freeze PATTERN]..."
    );
    std::process::exit(2)
}

fn parse_only(s: &str, o: &mut Opts) {
    o.dlc = false;
    o.candle = false;
    o.torch = false;
    for c in s.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        match c {
            "dlc" => o.dlc = true,
            "candle" | "candle-nn" => o.candle = true,
            "torch" | "pytorch" => o.torch = true,
            _ => {
                eprintln!("unknown column `{c}` (expected dlc, candle, torch)");
                usage()
            }
        }
    }
}

fn parse_opts() -> Opts {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let num = |what: &str, v: &str| -> usize {
        v.parse().unwrap_or_else(|_| {
            eprintln!("{what}: expected a number, got `{v}`");
            usage()
        })
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut o = Opts {
        nets: Vec::new(),
        steps: env("DLC_BENCH_STEPS").map(|v| num("DLC_BENCH_STEPS", &v)),
        rounds: env("DLC_BENCH_ROUNDS").map(|v| num("DLC_BENCH_ROUNDS", &v)),
        warmup: env("DLC_BENCH_WARMUP")
            .map(|v| num("DLC_BENCH_WARMUP", &v))
            .unwrap_or(2),
        breakdown: env("DLC_BENCH_BREAKDOWN").is_some_and(|v| v != "0"),
        layers: env("DLC_BENCH_LAYERS").is_some_and(|v| v != "0"),
        markdown: env("DLC_BENCH_MARKDOWN").is_some_and(|v| v != "0"),
        dlc: true,
        candle: true,
        torch: true,
        threads: env("DLC_BENCH_THREADS")
            .map(|v| num("DLC_BENCH_THREADS", &v))
            .unwrap_or(cores),
        python: PathBuf::from(
            env("DLC_TORCH_PYTHON").unwrap_or_else(|| "/work/venv/bin/python".into()),
        ),
        freeze: Vec::new(),
    };
    if let Some(only) = env("DLC_BENCH_ONLY") {
        parse_only(&only, &mut o);
    }
    let mut nets: Vec<Net> = Vec::new();
    if let Some(list) = env("DLC_BENCH_NETS") {
        for n in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            nets.extend(Net::parse(n).unwrap_or_else(|| {
                eprintln!("DLC_BENCH_NETS: unknown net `{n}`");
                usage()
            }));
        }
    }
    let mut args = std::env::args().skip(1);
    let mut cli_nets: Vec<Net> = Vec::new();
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next().unwrap_or_else(|| {
                eprintln!("{name} needs a value");
                usage()
            })
        };
        match a.as_str() {
            // `cargo bench` passes `--bench` to every bench binary.
            "--bench" => {}
            "--steps" => o.steps = Some(num("--steps", &value("--steps"))),
            "--rounds" => o.rounds = Some(num("--rounds", &value("--rounds"))),
            "--warmup" => o.warmup = num("--warmup", &value("--warmup")),
            "--threads" => o.threads = num("--threads", &value("--threads")),
            "--only" => parse_only(&value("--only"), &mut o),
            "--no-torch" => o.torch = false,
            "--breakdown" => o.breakdown = true,
            "--layers" => o.layers = true,
            "--markdown" => o.markdown = true,
            "--freeze" => o.freeze.push(value("--freeze")),
            "-h" | "--help" => usage(),
            s if s.starts_with('-') => {
                eprintln!("unknown option `{s}`");
                usage()
            }
            s => cli_nets.extend(Net::parse(s).unwrap_or_else(|| {
                eprintln!(
                    "unknown net `{s}` (expected lenet, resnet, mobilenet, lstm, gru, infer1, \
                     infer32, rnn, infer, train, all)"
                );
                usage()
            })),
        }
    }
    if !cli_nets.is_empty() {
        nets = cli_nets;
    }
    if nets.is_empty() {
        nets = ALL.to_vec();
    }
    // Table order, each row once.
    nets = ALL.into_iter().filter(|n| nets.contains(n)).collect();
    o.nets = nets;
    o
}

/// Milliseconds of each timed step, split into phases.
#[derive(Default, Clone)]
struct Timings {
    step: Vec<f64>,
    forward: Vec<f64>,
    backward: Vec<f64>,
    update: Vec<f64>,
    first_loss: Option<f64>,
    last_loss: Option<f64>,
    /// The highest resident high-water mark over the timed turns, MiB (see `memory`).
    peak_mib: Option<f64>,
}

impl Timings {
    /// Keeps the higher of the peak so far and `peak` (one turn's).
    fn record_peak(&mut self, peak: Option<f64>) {
        if let Some(p) = peak {
            self.peak_mib = Some(self.peak_mib.map_or(p, |q| q.max(p)));
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Something that trains: forward + loss, then an SGD update from the gradients.
trait Trainer {
    fn loss(&mut self, x: &Tensor, y: &Tensor) -> Result<Tensor>;
    fn update(&mut self, grads: &GradStore) -> Result<()>;
}

/// Something that predicts: a forward pass in evaluation mode.
trait Inferer {
    fn infer(&mut self, x: &Tensor) -> Result<Tensor>;
}

/// One Rust column of a row: what it runs.
enum Column<'a> {
    Train(&'a mut dyn Trainer),
    Infer(&'a mut dyn Inferer),
}

/// Mean cross-entropy over every prediction: logits `[…, classes]` against labels `[…]` (one
/// per image, or one per time step of every sequence).
fn loss_over_all(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let classes = logits.dim(D::Minus1)?;
    candle_nn::loss::cross_entropy(&logits.reshape(((), classes))?, &labels.flatten_all()?)
}

/// Runs `n` steps of a column (see [`run_steps`], [`run_inference`]); when `timed`, also
/// records the process's peak resident memory during them.
fn run_column(
    c: &mut Column,
    x: &Tensor,
    y: &Tensor,
    n: usize,
    out: &mut Timings,
    timed: bool,
) -> Result<()> {
    let measured = timed && memory::reset_peak();
    match c {
        Column::Train(t) => run_steps(*t, x, y, n, out, timed)?,
        Column::Infer(t) => run_inference(*t, x, n, out, timed)?,
    }
    if measured {
        out.record_peak(memory::peak_mib());
    }
    Ok(())
}

/// Runs `n` forward passes; when `timed`, appends each one's time (as step and forward).
fn run_inference(
    t: &mut dyn Inferer,
    x: &Tensor,
    n: usize,
    out: &mut Timings,
    timed: bool,
) -> Result<()> {
    for _ in 0..n {
        let t0 = Instant::now();
        let y = t.infer(x)?;
        drop(y);
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if timed {
            out.step.push(ms);
            out.forward.push(ms);
            out.backward.push(0.0);
            out.update.push(0.0);
        }
    }
    Ok(())
}

/// Runs `n` steps, keeping the first and last loss in `out`; when `timed`, also appends each
/// step's timings.
fn run_steps(
    t: &mut dyn Trainer,
    x: &Tensor,
    y: &Tensor,
    n: usize,
    out: &mut Timings,
    timed: bool,
) -> Result<()> {
    for _ in 0..n {
        let t0 = Instant::now();
        let loss = t.loss(x, y)?;
        let value = loss.to_scalar::<f32>()? as f64;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        t.update(&grads)?;
        drop(grads);
        let t3 = Instant::now();
        if out.first_loss.is_none() {
            out.first_loss = Some(value);
        }
        out.last_loss = Some(value);
        if timed {
            let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
            out.step.push(ms(t0, t3));
            out.forward.push(ms(t0, t1));
            out.backward.push(ms(t1, t2));
            out.update.push(ms(t2, t3));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (a) dlc

struct DlcTrainer {
    model: Model,
    net: Network,
    stepper: Stepper,
}

impl DlcTrainer {
    /// Compiles and lowers the row's spec; `Err` says in one line why the column is not built
    /// (a spec or model not there yet, or one that does not compile or lower). The parameters
    /// matching a `freeze` pattern are frozen.
    fn new(net_kind: Net, freeze: &[String]) -> std::result::Result<Self, String> {
        let (file, model, sets) = net_kind.spec();
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        if !path.exists() {
            return Err(format!("{file} not found"));
        }
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let compiled = compile(&path, Select::One(Some(model)), &sets).map_err(|d| {
            let first = d.first().map(|d| d.to_string()).unwrap_or_default();
            format!("{file} model `{model}` does not compile: {first}")
        })?;
        let model = compiled.models.into_iter().next().expect("one model");
        let mut net = Network::new(&model, &Device::Cpu, DType::F32, Init::Torch, SEED)
            .map_err(|e| format!("{file} model `{}` does not lower: {e}", model.name))?;
        for pattern in freeze {
            if net.state.freeze(pattern) == 0 {
                return Err(format!(
                    "--freeze {pattern}: no parameter of `{}` matches",
                    model.name
                ));
            }
        }
        let sgd = Optimizer::Sgd {
            lr: LR,
            momentum: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        };
        let stepper = Stepper::new(sgd, &net.state.trainable());
        Ok(DlcTrainer {
            model,
            net,
            stepper,
        })
    }

    /// Every layer timed alone, forward and backward, through the same `dlc::lower` functions
    /// that `Network` calls, on the activations the real forward pass produces (inputs are
    /// variables, so their gradients are computed, except the network's input, as in the real
    /// backward). Rows in graph order with medians over `reps`, and the loss last. `None` if
    /// the net has an op this profile does not know.
    fn layer_profile(
        &self,
        x: &Tensor,
        labels: &Tensor,
        reps: usize,
    ) -> Result<Option<Vec<LayerRow>>> {
        use dlc::ops::Op;
        let g = &self.model.graph;
        let params = &self.net.state.params;
        let tensor = |name: &str| params.get(name).map(|v| v.as_tensor().clone());
        let mut rows = Vec::new();
        // Each node's output, and whether it is the network's input (no gradient wanted).
        let mut values: Vec<Option<(Tensor, bool)>> = vec![None; g.dag.node_count()];
        let mut last = None;
        for idx in g.dag.node_indices() {
            let node = &g.dag[idx];
            let ins: Vec<(Tensor, bool)> = g
                .inputs_of(idx)
                .iter()
                .filter_map(|o| values[o.node.index()].clone())
                .collect();
            match node.op {
                Op::Input(_) => {
                    values[idx.index()] = Some((x.clone(), true));
                    continue;
                }
                Op::Output => {
                    last = ins.first().map(|v| v.0.clone());
                    values[idx.index()] = ins.into_iter().next();
                    continue;
                }
                _ => {}
            }
            let name = node.name.clone();
            let (w, b) = (
                tensor(&format!("{name}.weight")),
                tensor(&format!("{name}.bias")),
            );
            let op = node.op.clone();
            let f = |xs: &[Tensor]| -> Result<Tensor> {
                let x = &xs[0];
                match &op {
                    Op::Conv(c) => dlc::lower::conv::conv2d(x, w.as_ref().unwrap(), b.as_ref(), c),
                    Op::Linear(_) => dlc::lower::linear::linear(x, w.as_ref().unwrap(), b.as_ref()),
                    Op::Activation(a) => dlc::lower::activation::activate(x, *a),
                    Op::Pool(p) => dlc::lower::pool::pool2d(x, p),
                    Op::AdaptiveAvgPool(p) => dlc::lower::pool::adaptive_avg_pool2d(
                        x,
                        (p.size.0 as usize, p.size.1 as usize),
                    ),
                    Op::Flatten(fl) => x.flatten_from(fl.start),
                    Op::BatchNorm(bn) => Ok(dlc::lower::norm::batch_norm_train(
                        x,
                        w.as_ref().unwrap(),
                        b.as_ref().unwrap(),
                        bn.eps,
                    )?
                    .0),
                    Op::Add => xs[1..].iter().try_fold(x.clone(), |acc, t| acc + t),
                    // Timed as the identity: the mask multiply is not part of the profile.
                    Op::Dropout(_) => Ok(x.clone()),
                    _ => candle_core::bail!("unsupported"),
                }
            };
            let in_channels = ins
                .first()
                .map_or(0, |(t, _)| t.dims().get(1).copied().unwrap_or(0));
            let kind = match &node.op {
                Op::Conv(c) if c.groups > 1 && c.groups as usize == in_channels => {
                    format!("conv {}×{} depthwise", c.kernel.0, c.kernel.1)
                }
                Op::Conv(c) if c.groups > 1 => {
                    format!("conv {}×{} grouped", c.kernel.0, c.kernel.1)
                }
                Op::Conv(c) => format!("conv {}×{}", c.kernel.0, c.kernel.1),
                Op::Activation(a) => format!("{a:?}").to_lowercase(),
                Op::Pool(p) => p.name().to_string(),
                other => format!("{other:?}")
                    .split(['(', ' ', '{'])
                    .next()
                    .unwrap_or("?")
                    .to_lowercase(),
            };
            let args: Vec<Tensor> = ins
                .iter()
                .map(|(t, is_input)| {
                    if *is_input {
                        Ok(t.clone())
                    } else {
                        Ok(Var::from_tensor(t)?.as_tensor().clone())
                    }
                })
                .collect::<Result<_>>()?;
            let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
            let mut out = None;
            for i in 0..reps + 1 {
                let t0 = Instant::now();
                let y = match f(&args) {
                    Ok(y) => y,
                    Err(_) => return Ok(None),
                };
                let t1 = Instant::now();
                let grads = y.backward()?;
                let t2 = Instant::now();
                drop(grads);
                if i > 0 {
                    fwd.push((t1 - t0).as_secs_f64() * 1e3);
                    bwd.push((t2 - t1).as_secs_f64() * 1e3);
                }
                out = Some(y.detach());
            }
            let out = out.expect("reps ran");
            // Multiply-adds of the GEMM-like ops; the backward computes one such product per
            // gradient: the weight's, and the input's unless the input is the network's.
            let macs = match &node.op {
                Op::Conv(c) => Some(
                    out.elem_count() as f64
                        * (in_channels / c.groups as usize) as f64
                        * (c.kernel.0 * c.kernel.1) as f64,
                ),
                Op::Linear(_) => Some(out.elem_count() as f64 * x_features(&args[0]) as f64),
                _ => None,
            };
            let input_grad = !ins.first().is_some_and(|(_, is_input)| *is_input);
            rows.push(LayerRow {
                name,
                op: kind,
                shape: format!("{:?}", out.dims()),
                forward: median(&fwd),
                backward: median(&bwd),
                flops: macs.map(|m| (2.0 * m, 2.0 * m * if input_grad { 2.0 } else { 1.0 })),
            });
            values[idx.index()] = Some((out, false));
        }
        // The loss on the logits.
        let Some(logits) = last else { return Ok(None) };
        let logits = Var::from_tensor(&logits)?.as_tensor().clone();
        let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
        for i in 0..reps + 1 {
            let t0 = Instant::now();
            let loss = candle_nn::loss::cross_entropy(&logits, labels)?;
            let _ = loss.to_scalar::<f32>()?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            let t2 = Instant::now();
            drop(grads);
            if i > 0 {
                fwd.push((t1 - t0).as_secs_f64() * 1e3);
                bwd.push((t2 - t1).as_secs_f64() * 1e3);
            }
        }
        rows.push(LayerRow {
            name: "loss".into(),
            op: "cross_entropy".into(),
            shape: "[]".into(),
            forward: median(&fwd),
            backward: median(&bwd),
            flops: None,
        });
        Ok(Some(rows))
    }
}

/// One layer's timings, from [`DlcTrainer::layer_profile`].
struct LayerRow {
    name: String,
    op: String,
    shape: String,
    forward: f64,
    backward: f64,
    /// Floating-point operations of the forward and the backward pass (convolutions and
    /// linear layers).
    flops: Option<(f64, f64)>,
}

/// The last dim of a linear layer's input.
fn x_features(x: &Tensor) -> usize {
    x.dims().last().copied().unwrap_or(0)
}

impl Trainer for DlcTrainer {
    fn loss(&mut self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let logits = self.net.forward(std::slice::from_ref(x), true)?.remove(0);
        loss_over_all(&logits, y)
    }
    fn update(&mut self, grads: &GradStore) -> Result<()> {
        self.stepper.step(grads, LR)
    }
}

impl Inferer for DlcTrainer {
    fn infer(&mut self, x: &Tensor) -> Result<Tensor> {
        Ok(self.net.infer(std::slice::from_ref(x))?.remove(0))
    }
}

// ---------------------------------------------------------------------------------------------
// (b) the same nets written with candle-nn

/// d2l's LeNet: conv(6, 5, pad 2) sigmoid avgpool(2), conv(16, 5) sigmoid avgpool(2),
/// linear 120, 84, 10 with sigmoids between.
struct CandleLenet {
    c1: candle_nn::Conv2d,
    c2: candle_nn::Conv2d,
    f1: candle_nn::Linear,
    f2: candle_nn::Linear,
    f3: candle_nn::Linear,
}

impl CandleLenet {
    fn new(vb: VarBuilder) -> Result<Self> {
        let pad2 = Conv2dConfig {
            padding: 2,
            ..Default::default()
        };
        Ok(CandleLenet {
            c1: candle_nn::conv2d(1, 6, 5, pad2, vb.pp("0"))?,
            c2: candle_nn::conv2d(6, 16, 5, Default::default(), vb.pp("3"))?,
            f1: candle_nn::linear(16 * 5 * 5, 120, vb.pp("7"))?,
            f2: candle_nn::linear(120, 84, vb.pp("9"))?,
            f3: candle_nn::linear(84, CLASSES, vb.pp("11"))?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let sig = candle_nn::ops::sigmoid;
        let x = sig(&self.c1.forward(x)?)?.avg_pool2d(2)?;
        let x = sig(&self.c2.forward(&x)?)?.avg_pool2d(2)?;
        let x = x.flatten_from(1)?;
        let x = sig(&self.f1.forward(&x)?)?;
        let x = sig(&self.f2.forward(&x)?)?;
        self.f3.forward(&x)
    }
}

/// d2l's `Residual`: two 3×3 convs with bias and batch norm, a 1×1 conv projection when the
/// shape changes.
struct Residual {
    conv1: candle_nn::Conv2d,
    bn1: candle_nn::BatchNorm,
    conv2: candle_nn::Conv2d,
    bn2: candle_nn::BatchNorm,
    conv3: Option<candle_nn::Conv2d>,
}

impl Residual {
    fn new(cin: usize, c: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let k3 = Conv2dConfig {
            padding: 1,
            stride,
            ..Default::default()
        };
        let k3s1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv3 = if stride != 1 || cin != c {
            Some(candle_nn::conv2d(
                cin,
                c,
                1,
                Conv2dConfig {
                    stride,
                    ..Default::default()
                },
                vb.pp("conv3"),
            )?)
        } else {
            None
        };
        Ok(Residual {
            conv1: candle_nn::conv2d(cin, c, 3, k3, vb.pp("conv1"))?,
            bn1: candle_nn::batch_norm(c, 1e-5, vb.pp("bn1"))?,
            conv2: candle_nn::conv2d(c, c, 3, k3s1, vb.pp("conv2"))?,
            bn2: candle_nn::batch_norm(c, 1e-5, vb.pp("bn2"))?,
            conv3,
        })
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.bn1.forward_t(&self.conv1.forward(x)?, train)?.relu()?;
        let y = self.bn2.forward_t(&self.conv2.forward(&y)?, train)?;
        let shortcut = match &self.conv3 {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        (y + shortcut)?.relu()
    }
}

/// d2l's ResNet-18 on 1×96×96: 7×7 stem, four stages of two residuals, global average pool.
struct CandleResnet {
    stem: candle_nn::Conv2d,
    stem_bn: candle_nn::BatchNorm,
    blocks: Vec<Residual>,
    fc: candle_nn::Linear,
}

impl CandleResnet {
    fn new(vb: VarBuilder) -> Result<Self> {
        let stem = candle_nn::conv2d(
            1,
            64,
            7,
            Conv2dConfig {
                padding: 3,
                stride: 2,
                ..Default::default()
            },
            vb.pp("0.0"),
        )?;
        let stem_bn = candle_nn::batch_norm(64, 1e-5, vb.pp("0.1"))?;
        let mut blocks = Vec::new();
        let mut cin = 64;
        for (i, c) in [64, 128, 256, 512].into_iter().enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
            blocks.push(Residual::new(
                cin,
                c,
                stride,
                vb.pp(format!("{}.0", i + 1)),
            )?);
            blocks.push(Residual::new(c, c, 1, vb.pp(format!("{}.1", i + 1)))?);
            cin = c;
        }
        let fc = candle_nn::linear(512, CLASSES, vb.pp("fc"))?;
        Ok(CandleResnet {
            stem,
            stem_bn,
            blocks,
            fc,
        })
    }
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let x = self
            .stem_bn
            .forward_t(&self.stem.forward(x)?, train)?
            .relu()?;
        // d2l: MaxPool2d(3, stride 2, padding 1). Candle's max_pool2d has no padding and no
        // backward for kernel != stride; 2×2 / 2 gives the same [N, 64, 24, 24].
        let mut x = x.max_pool2d(2)?;
        for b in &self.blocks {
            x = b.forward(&x, train)?;
        }
        let x = x.mean(D::Minus1)?.mean(D::Minus1)?;
        self.fc.forward(&x)
    }
}

enum CandleNet {
    Lenet(CandleLenet),
    Resnet(CandleResnet),
    Mobilenet(CandleMobilenetV2),
    CharRnn(CandleCharRnn),
}

struct CandleTrainer {
    net: CandleNet,
    sgd: candle_nn::SGD,
    params: usize,
}

impl CandleTrainer {
    fn new(kind: Net) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = match kind {
            Net::Lenet => CandleNet::Lenet(CandleLenet::new(vb)?),
            Net::Resnet => CandleNet::Resnet(CandleResnet::new(vb)?),
            Net::Mobilenet => CandleNet::Mobilenet(CandleMobilenetV2::new(CLASSES, vb)?),
            Net::Lstm | Net::Gru => {
                CandleNet::CharRnn(CandleCharRnn::new(kind == Net::Lstm, VOCAB, HIDDEN, vb)?)
            }
            Net::Infer1 | Net::Infer32 => candle_core::bail!("{kind:?} is not a training row"),
        };
        // The VarMap also holds batch norm's running statistics: not trainable.
        let trainable: Vec<Var> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| !k.ends_with(".running_mean") && !k.ends_with(".running_var"))
            .map(|(_, v)| v.clone())
            .collect();
        let params = trainable.iter().map(|v| v.elem_count()).sum();
        let sgd = candle_nn::SGD::new(trainable, LR)?;
        Ok(CandleTrainer { net, sgd, params })
    }
}

impl Trainer for CandleTrainer {
    fn loss(&mut self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let logits = match &self.net {
            CandleNet::Lenet(n) => n.forward(x)?,
            CandleNet::Resnet(n) => n.forward(x, true)?,
            CandleNet::Mobilenet(n) => n.forward(x, true)?,
            CandleNet::CharRnn(n) => n.forward(x)?,
        };
        loss_over_all(&logits, y)
    }
    fn update(&mut self, grads: &GradStore) -> Result<()> {
        self.sgd.step(grads)
    }
}

impl Inferer for CandleResnet18 {
    fn infer(&mut self, x: &Tensor) -> Result<Tensor> {
        self.forward(x)
    }
}

// ---------------------------------------------------------------------------------------------
// (c) PyTorch, through benches/train_step_torch.py

/// `benches/train_step_torch.py --serve` for one net: warmed up, answering "N" with N timed
/// steps, so that its steps interleave with the Rust columns' rounds.
struct TorchServer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    params: usize,
    version: String,
    /// The script's resident size once its model is built, MiB.
    resident_mib: Option<f64>,
}

/// The last non-empty line of a finished child's stderr, for a one-line reason.
fn stderr_tail(child: &mut Child) -> String {
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    err.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output")
        .trim()
        .to_string()
}

impl TorchServer {
    /// Starts the script and waits for its warm-up; `Err` is a one-line reason to leave the
    /// PyTorch column out.
    fn start(o: &Opts, net: Net) -> std::result::Result<TorchServer, String> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/train_step_torch.py");
        let mut child = Command::new(&o.python)
            .arg(&script)
            .args([
                "--serve",
                "--net",
                net.key(),
                "--warmup",
                &o.warmup.to_string(),
            ])
            .args(["--threads", &o.threads.to_string(), "--lr", &LR.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", o.python.display()))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut server = TorchServer {
            child,
            stdin,
            stdout,
            params: 0,
            version: String::new(),
            resident_mib: None,
        };
        let v = server.read()?;
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            return Err(e.to_string());
        }
        server.params = v["params"].as_u64().unwrap_or(0) as usize;
        server.resident_mib = v["resident_mib"].as_f64();
        server.version = format!(
            "torch {} ({} threads)",
            v["torch"].as_str().unwrap_or("?"),
            v["threads"].as_u64().unwrap_or(0)
        );
        Ok(server)
    }

    /// The next JSON line of the script's stdout.
    fn read(&mut self) -> std::result::Result<serde_json::Value, String> {
        let mut line = String::new();
        loop {
            line.clear();
            match self.stdout.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    let _ = self.child.wait();
                    return Err(format!(
                        "benches/train_step_torch.py stopped: {}",
                        stderr_tail(&mut self.child)
                    ));
                }
                Ok(_) if line.trim_start().starts_with('{') => {
                    return serde_json::from_str(line.trim())
                        .map_err(|e| format!("bad JSON from benches/train_step_torch.py: {e}"));
                }
                Ok(_) => {}
            }
        }
    }

    /// Runs `n` timed steps and appends them to `out`.
    fn steps(&mut self, n: usize, out: &mut Timings) -> std::result::Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "{n}")
            .and_then(|_| stdin.flush())
            .map_err(|e| format!("benches/train_step_torch.py: {e}"))?;
        let v = self.read()?;
        let list = |k: &str| -> Vec<f64> {
            v.get(k)
                .and_then(|a| a.as_array())
                .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                .unwrap_or_default()
        };
        let step = list("step_ms");
        if step.len() != n {
            return Err(format!(
                "benches/train_step_torch.py returned {} timings for {n} steps",
                step.len()
            ));
        }
        out.step.extend(step);
        out.forward.extend(list("forward_ms"));
        out.backward.extend(list("backward_ms"));
        out.update.extend(list("update_ms"));
        out.first_loss = v["first_loss"].as_f64();
        out.last_loss = v["last_loss"].as_f64();
        out.record_peak(v["peak_mib"].as_f64());
        Ok(())
    }
}

impl Drop for TorchServer {
    fn drop(&mut self) {
        // Closing stdin ends the script's request loop.
        self.stdin.take();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------

/// The fixed batch: images uniform in [0, 1) with labels uniform over the classes, or token
/// ids uniform over the vocabulary with a target id at every step.
fn batch(net: Net) -> Result<(Tensor, Tensor)> {
    let mut rng = StdRng::seed_from_u64(42);
    let n = net.batch();
    let classes = net.classes() as u32;
    let cpu = &Device::Cpu;
    match net.input() {
        Input::Image(c, h, w) => {
            let xs: Vec<f32> = (0..n * c * h * w).map(|_| rng.random::<f32>()).collect();
            let ys: Vec<u32> = (0..n).map(|_| rng.random_range(0..classes)).collect();
            Ok((
                Tensor::from_vec(xs, (n, c, h, w), cpu)?,
                Tensor::from_vec(ys, n, cpu)?,
            ))
        }
        Input::Tokens { steps, vocab } => {
            let mut ids = |_| rng.random_range(0..vocab as u32);
            let xs: Vec<u32> = (0..n * steps).map(&mut ids).collect();
            let ys: Vec<u32> = (0..n * steps).map(&mut ids).collect();
            Ok((
                Tensor::from_vec(xs, (n, steps), cpu)?,
                Tensor::from_vec(ys, (n, steps), cpu)?,
            ))
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn cell(t: Option<&Timings>) -> String {
    match t {
        Some(t) => format!("{:.1} ({:.1})", median(&t.step), min(&t.step)),
        None => "–".into(),
    }
}

fn ratio(a: Option<&Timings>, b: Option<&Timings>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}×", median(&a.step) / median(&b.step)),
        _ => "–".into(),
    }
}

fn fmt_loss(l: Option<f64>) -> String {
    l.map(|l| format!("{l:.3}")).unwrap_or_else(|| "?".into())
}

fn fmt_mib(m: Option<f64>) -> String {
    m.map(|m| format!("{m:.0}")).unwrap_or_else(|| "–".into())
}

/// One measured row of the table.
struct Row {
    net: Net,
    /// Timed steps per column.
    steps: usize,
    /// Parameters every column trains (checked equal).
    params: usize,
    /// Timings by column key (`dlc`, `candle`, `torch`).
    cols: HashMap<&'static str, Timings>,
    /// Columns asked for but not built, with the reason.
    not_built: HashMap<&'static str, String>,
    /// Resident size of this process with the row's Rust columns built, MiB.
    resident_mib: Option<f64>,
    /// Resident size of the PyTorch process with its model built, MiB.
    torch_resident_mib: Option<f64>,
}

impl Row {
    /// A column's cell in the human table: median (min), or why it is missing.
    fn cell(&self, key: &str) -> String {
        match (self.cols.get(key), self.not_built.get(key)) {
            (Some(t), _) => cell(Some(t)),
            (None, Some(_)) if key == "dlc" => "not built".into(),
            (None, Some(_)) => "left out".into(),
            (None, None) => cell(None),
        }
    }
}

/// The columns, in table order: key, title.
const COLUMNS: [(&str, &str); 3] = [
    ("dlc", "dlc"),
    ("candle", "candle-nn"),
    ("torch", "PyTorch"),
];

fn main() -> Result<()> {
    memory::keep_freed_pages();
    let o = parse_opts();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    eprintln!(
        "train_step: {cores} cores, candle {} threads, load average {} at start",
        candle_core::utils::get_num_threads(),
        loadavg()
    );
    let mut torch_enabled = o.torch;
    if torch_enabled && !o.python.exists() {
        println!(
            "PyTorch column left out: {} not found (set DLC_TORCH_PYTHON)",
            o.python.display()
        );
        torch_enabled = false;
    }
    let mut torch_version: Option<String> = None;
    let mut rows: Vec<Row> = Vec::new();
    let mut layer_tables: Vec<(Net, usize, Vec<LayerRow>)> = Vec::new();
    for &net in &o.nets {
        let steps = o.steps.unwrap_or(net.default_steps()).max(1);
        let rounds = o.rounds.unwrap_or(5).clamp(1, steps);
        let (x, y) = batch(net)?;
        let mut not_built: HashMap<&'static str, String> = HashMap::new();

        // Build every column and check that they train the same number of parameters.
        let mut params: Option<(&str, usize)> = None;
        let mut agree = |who: &'static str, n: usize| match params {
            None => params = Some((who, n)),
            Some((first, m)) => assert_eq!(
                n,
                m,
                "{}: {who} trains {n} parameters but {first} trains {m}: not the same architecture",
                net.title()
            ),
        };
        let mut dlc_trainer = None;
        let mut candle_trainer = None;
        let mut candle_inferer = None;
        if o.dlc {
            match DlcTrainer::new(net, &o.freeze) {
                Ok(t) => {
                    agree("dlc", t.net.state.param_count());
                    dlc_trainer = Some(t);
                }
                Err(why) => {
                    eprintln!("{}: dlc column not built: {why}", net.title());
                    not_built.insert("dlc", why);
                }
            }
        }
        if o.candle {
            if net.trains() {
                let t = CandleTrainer::new(net)?;
                agree("candle-nn", t.params);
                candle_trainer = Some(t);
            } else {
                let t = CandleResnet18::new(net.classes())?;
                agree("candle-nn", t.params);
                candle_inferer = Some(t);
            }
        }
        let mut columns: Vec<(&'static str, Column)> = Vec::new();
        if let Some(t) = dlc_trainer.as_mut() {
            columns.push((
                "dlc",
                if net.trains() {
                    Column::Train(t)
                } else {
                    Column::Infer(t)
                },
            ));
        }
        if let Some(t) = candle_trainer.as_mut() {
            columns.push(("candle", Column::Train(t)));
        }
        if let Some(t) = candle_inferer.as_mut() {
            columns.push(("candle", Column::Infer(t)));
        }
        let resident_mib = memory::resident_mib();
        let mut torch = None;
        if torch_enabled {
            eprintln!(
                "{}: starting PyTorch ({} warm-up steps) ...",
                net.title(),
                o.warmup
            );
            match TorchServer::start(&o, net) {
                Ok(s) => {
                    agree("PyTorch", s.params);
                    torch_version = Some(s.version.clone());
                    torch = Some(s);
                }
                Err(why) => {
                    eprintln!("{}: PyTorch column left out: {why}", net.title());
                    not_built.insert("torch", why);
                }
            }
        }
        let torch_resident_mib = torch.as_ref().and_then(|s| s.resident_mib);
        let p = params.map(|p| p.1).unwrap_or(0);

        let mut cols: HashMap<&'static str, Timings> = HashMap::new();
        for (k, c) in columns.iter_mut() {
            eprintln!(
                "{}: {k}, {p} params, {} warm-up steps ...",
                net.title(),
                o.warmup
            );
            run_column(c, &x, &y, o.warmup, cols.entry(*k).or_default(), false)?;
        }
        // Rounds interleave the columns, so that a change in the machine's load hits all of them.
        for r in 0..rounds {
            let n = steps * (r + 1) / rounds - steps * r / rounds;
            eprintln!(
                "{}: round {}/{rounds}, {n} timed steps per column ...",
                net.title(),
                r + 1
            );
            for (k, c) in columns.iter_mut() {
                run_column(c, &x, &y, n, cols.entry(*k).or_default(), true)?;
            }
            if let Some(s) = torch.as_mut()
                && let Err(why) = s.steps(n, cols.entry("torch").or_default())
            {
                eprintln!("{}: PyTorch column left out: {why}", net.title());
                torch = None;
                cols.remove("torch");
                not_built.insert("torch", why);
            }
        }
        drop(torch);
        drop(columns);
        if o.layers {
            match dlc_trainer.as_ref() {
                Some(_) if !net.trains() => {
                    println!("{}: --layers profiles training rows only", net.title())
                }
                Some(t) => {
                    eprintln!("{}: dlc layer by layer ...", net.title());
                    let reps = if net == Net::Lenet { 5 } else { 2 };
                    match t.layer_profile(&x, &y, reps)? {
                        Some(rows) => layer_tables.push((net, reps, rows)),
                        None => println!(
                            "{}: --layers met an op it does not know (skipped)",
                            net.title()
                        ),
                    }
                }
                None => println!("--layers needs the dlc column"),
            }
        }
        rows.push(Row {
            net,
            steps,
            params: p,
            cols,
            not_built,
            resident_mib,
            torch_resident_mib,
        });
    }
    let end_load = loadavg();

    println!();
    println!(
        "Training step (or forward pass, for inference), ms per step: median (min) over the timed \
         steps, after {} warm-up steps; columns interleaved in rounds. Fixed batch, SGD lr {LR}, \
         f32, CPU, {cores} cores; load average {end_load} at the end. Peak: the process's \
         resident high-water mark while the column ran its timed steps, MiB.",
        o.warmup
    );
    if let Some(v) = &torch_version {
        println!("PyTorch: {v}.");
    }
    println!();
    println!(
        "| net | batch | params | steps | dlc | candle-nn | PyTorch | dlc / candle-nn | dlc / PyTorch \
         | peak MiB dlc / candle-nn / PyTorch |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        let cols = &row.cols;
        let peaks: Vec<String> = COLUMNS
            .iter()
            .map(|(k, _)| fmt_mib(cols.get(k).and_then(|t| t.peak_mib)))
            .collect();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.net.title(),
            row.net.batch(),
            row.params,
            row.steps,
            row.cell("dlc"),
            row.cell("candle"),
            row.cell("torch"),
            ratio(cols.get("dlc"), cols.get("candle")),
            ratio(cols.get("dlc"), cols.get("torch")),
            peaks.join(" / "),
        );
    }
    println!();
    println!(
        "Resident before the first step, MiB: this process with the row's Rust columns built; \
         the PyTorch process (interpreter, torch's libraries, model):"
    );
    for row in &rows {
        println!(
            "- {}, batch {}: {}, PyTorch {}",
            row.net.title(),
            row.net.batch(),
            fmt_mib(row.resident_mib),
            fmt_mib(row.torch_resident_mib)
        );
    }
    for row in &rows {
        for (k, why) in &row.not_built {
            let what = if *k == "dlc" { "not built" } else { "left out" };
            println!(
                "- {}, batch {}: {k} {what}: {why}",
                row.net.title(),
                row.net.batch()
            );
        }
    }
    println!();
    println!(
        "Loss at the first and the last step (a check that every column trains; inits differ):"
    );
    for Row { net, cols, .. } in rows.iter().filter(|r| r.net.trains()) {
        let parts: Vec<String> = COLUMNS
            .iter()
            .filter_map(|(k, name)| {
                cols.get(k).map(|t| {
                    format!(
                        "{name} {} → {}",
                        fmt_loss(t.first_loss),
                        fmt_loss(t.last_loss)
                    )
                })
            })
            .collect();
        println!("- {}: {}", net.title(), parts.join(", "));
    }
    if o.breakdown {
        println!();
        println!("Where a step goes, median ms: forward (with the loss) / backward / SGD update.");
        println!();
        println!("| net | column | forward | backward | update | step |");
        println!("|---|---|---:|---:|---:|---:|");
        for Row { net, cols, .. } in &rows {
            for (k, name) in COLUMNS {
                if let Some(t) = cols.get(k) {
                    println!(
                        "| {} | {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
                        net.title(),
                        median(&t.forward),
                        median(&t.backward),
                        median(&t.update),
                        median(&t.step)
                    );
                }
            }
        }
    }
    for (net, reps, layers) in &layer_tables {
        let total: f64 = layers.iter().map(|l| l.forward + l.backward).sum();
        let share = |t: f64| 100.0 * t / total;
        println!();
        println!(
            "{}, dlc layer by layer: each op timed alone (median of {reps}) on the real activations, \
             backward from that op's output; sum over layers {total:.1} ms.",
            net.title()
        );
        // op, layers, forward ms, backward ms, forward and backward FLOPs.
        type OpTotal = (String, usize, f64, f64, Option<(f64, f64)>);
        let mut by_op: Vec<OpTotal> = Vec::new();
        for l in layers {
            match by_op.iter_mut().find(|o| o.0 == l.op) {
                Some(o) => {
                    o.1 += 1;
                    o.2 += l.forward;
                    o.3 += l.backward;
                    o.4 = o.4.zip(l.flops).map(|(a, b)| (a.0 + b.0, a.1 + b.1));
                }
                None => by_op.push((l.op.clone(), 1, l.forward, l.backward, l.flops)),
            }
        }
        by_op.sort_by(|a, b| (b.2 + b.3).total_cmp(&(a.2 + a.3)));
        println!();
        println!(
            "| op | layers | forward ms | backward ms | share of sum | GFLOP/s forward / backward |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        for (op, n, f, b, flops) in &by_op {
            let rate = flops.map_or("–".to_string(), |(ff, fb)| {
                format!("{:.1} / {:.1}", ff / f / 1e6, fb / b / 1e6)
            });
            println!(
                "| {op} | {n} | {f:.1} | {b:.1} | {:.1}% | {rate} |",
                share(f + b)
            );
        }
        let mut top: Vec<&LayerRow> = layers.iter().collect();
        top.sort_by(|a, b| (b.forward + b.backward).total_cmp(&(a.forward + a.backward)));
        top.truncate(15);
        println!();
        println!(
            "| layer (top {}) | op | output | forward ms | backward ms | share of sum |",
            top.len()
        );
        println!("|---|---|---|---:|---:|---:|");
        for l in top {
            println!(
                "| {} | {} | {} | {:.2} | {:.2} | {:.1}% |",
                l.name,
                l.op,
                l.shape,
                l.forward,
                l.backward,
                share(l.forward + l.backward)
            );
        }
    }
    if o.markdown {
        println!();
        println!("README table (`--markdown`):");
        println!();
        markdown::print(&rows, &o, torch_version.as_deref(), &end_load);
    }
    Ok(())
}

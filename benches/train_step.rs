//! Training-step speed: dlc's lowered network against the same network written by hand with
//! candle-nn layers, and against PyTorch on the CPU, all measured in one run on this machine.
//!
//! A step is: forward in training mode, cross-entropy, backward, plain SGD update (lr 0.1),
//! on one fixed random batch (for the character models, 32 sequences of 35 ids and a label
//! for every character). Each column warms up (2 steps by default), then times every step;
//! the table shows the median and the minimum in milliseconds per step. The timed steps are
//! split into rounds (5 by default) that take turns between the columns (dlc, candle-nn,
//! PyTorch, dlc, ...), so that a change in the machine's load does not fall on one column only;
//! PyTorch runs as a child process kept alive between its turns.
//!
//! Columns:
//! - `dlc`: `dlc::lower::Network` built from the spec, updated by `dlc::train::optim::Stepper`
//!   (SGD, no momentum or weight decay).
//! - `candle-nn`: the same layers written with `candle_nn::conv2d` / `linear` / `batch_norm`
//!   and candle's own `avg_pool2d` / `max_pool2d`, updated by `candle_nn::SGD`. This is the
//!   baseline a candle user would write, even though candle's pooling backward is wrong in
//!   general (see `src/lower/pool.rs`). Candle has no pooling backward when the kernel differs
//!   from the stride, so ResNet's stem `maxpool(3, stride: 2, pad: 1)` is written as
//!   `max_pool2d(2)`, which gives the same 24×24 output; that pooling is the one place where
//!   the two columns do not compute the same function, and it holds no parameters. The
//!   character models use `candle_nn::lstm` / `gru` stepped by `RNN::seq` (one input
//!   projection per step), `candle_nn::encoding::one_hot` and `linear`.
//! - `PyTorch`: `benches/train_step_torch.py` run by `$DLC_TORCH_PYTHON` (default
//!   `/work/venv/bin/python`) with `torch.set_num_threads(<cores>)`; left out, with one line
//!   saying why, when that python or its torch is missing.
//!
//! Before timing, the bench asserts that every column trains the same number of parameters.
//!
//! Usage (options after `--`, or the environment variables in brackets):
//!
//! ```text
//! cargo bench --bench train_step                                   # both nets, all columns
//! cargo bench --bench train_step -- lenet --steps 30               # one net, 30 timed steps
//! cargo bench --bench train_step -- lenet --breakdown              # + forward/backward/update
//! ```
//!
//! - `lenet`, `resnet` (or `d2l_resnet18`), `lstm`, `gru`, `rnn` (both), `all`: the nets
//!   [DLC_BENCH_NETS=lenet,resnet,lstm,gru]
//! - `--steps N`: timed steps per column [DLC_BENCH_STEPS]; default 20 (LeNet), 5 (ResNet),
//!   10 (LSTM, GRU)
//! - `--rounds N`: turns the timed steps are split into [DLC_BENCH_ROUNDS]; default 5
//! - `--warmup N`: untimed steps first [DLC_BENCH_WARMUP]; default 2
//! - `--only dlc,candle,torch`: the columns to run [DLC_BENCH_ONLY]; default all three
//! - `--no-torch`: leave out PyTorch (same as `--only dlc,candle`)
//! - `--breakdown`: also a table of forward (+ loss) / backward / optimiser medians
//!   [DLC_BENCH_BREAKDOWN=1]. For a profile of one column:
//!   `perf record -g target/release/deps/train_step-<hash> lenet --only dlc --steps 30`
//! - `--layers`: also dlc's layers one by one, forward and backward, each alone on the
//!   activations of the real forward pass, summed by op [DLC_BENCH_LAYERS=1]
//! - `--threads N`: PyTorch's thread count [DLC_BENCH_THREADS]; default the number of cores
//!   (candle's pool follows `RAYON_NUM_THREADS`, else the number of cores)

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

const LR: f64 = 0.1;
const SEED: u64 = 0;

/// One benchmarked network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Net {
    Lenet,
    Resnet,
    /// d2l's character LSTM: one-hot 28 → LSTM 256 → linear 28 at every step.
    Lstm,
    /// The same with a GRU.
    Gru,
}

impl Net {
    fn key(self) -> &'static str {
        match self {
            Net::Lenet => "lenet",
            Net::Resnet => "resnet",
            Net::Lstm => "lstm",
            Net::Gru => "gru",
        }
    }
    fn title(self) -> &'static str {
        match self {
            Net::Lenet => "LeNet (lenet)",
            Net::Resnet => "ResNet-18 (d2l_resnet18)",
            Net::Lstm => "LSTM 28→256, 35 steps (lstm)",
            Net::Gru => "GRU 28→256, 35 steps (gru)",
        }
    }
    fn spec(self) -> (&'static str, &'static str) {
        match self {
            Net::Lenet => ("specs/lenet.dlc", "lenet"),
            Net::Resnet => ("specs/resnet.dlc", "d2l_resnet18"),
            Net::Lstm => ("specs/rnn.dlc", "lstm"),
            Net::Gru => ("specs/rnn.dlc", "gru"),
        }
    }
    fn batch(self) -> usize {
        match self {
            Net::Lenet => 256,
            Net::Resnet | Net::Lstm | Net::Gru => 32,
        }
    }
    /// One example: an image `[C, H, W]`, or a sequence of `STEPS` character ids.
    fn example(self) -> Vec<usize> {
        match self {
            Net::Lenet => vec![1, 28, 28],
            Net::Resnet => vec![1, 96, 96],
            Net::Lstm | Net::Gru => vec![STEPS],
        }
    }
    /// Classes predicted: per image, or per character (the vocabulary).
    fn classes(self) -> usize {
        match self {
            Net::Lenet | Net::Resnet => 10,
            Net::Lstm | Net::Gru => VOCAB,
        }
    }
    fn default_steps(self) -> usize {
        match self {
            Net::Lenet => 20,
            Net::Resnet => 5,
            Net::Lstm | Net::Gru => 10,
        }
    }
    fn parse(s: &str) -> Option<Vec<Net>> {
        match s {
            "lenet" => Some(vec![Net::Lenet]),
            "resnet" | "resnet18" | "d2l_resnet18" => Some(vec![Net::Resnet]),
            "lstm" => Some(vec![Net::Lstm]),
            "gru" => Some(vec![Net::Gru]),
            "rnn" => Some(vec![Net::Lstm, Net::Gru]),
            "all" => Some(vec![Net::Lenet, Net::Resnet, Net::Lstm, Net::Gru]),
            _ => None,
        }
    }
}

const CLASSES: usize = 10;
/// The character models' vocabulary (d2l's Time Machine) and sequence length.
const VOCAB: usize = 28;
const STEPS: usize = 35;
const HIDDEN: usize = 256;

/// Command-line and environment options.
struct Opts {
    nets: Vec<Net>,
    steps: Option<usize>,
    rounds: Option<usize>,
    warmup: usize,
    breakdown: bool,
    layers: bool,
    dlc: bool,
    candle: bool,
    torch: bool,
    threads: usize,
    python: PathBuf,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench train_step -- [lenet|resnet|lstm|gru|rnn|all]... [--steps N] [--rounds N] \
         [--warmup N] [--only dlc,candle,torch] [--no-torch] [--breakdown] [--layers] [--threads N]"
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
        dlc: true,
        candle: true,
        torch: true,
        threads: env("DLC_BENCH_THREADS")
            .map(|v| num("DLC_BENCH_THREADS", &v))
            .unwrap_or(cores),
        python: PathBuf::from(
            env("DLC_TORCH_PYTHON").unwrap_or_else(|| "/work/venv/bin/python".into()),
        ),
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
            "-h" | "--help" => usage(),
            s if s.starts_with('-') => {
                eprintln!("unknown option `{s}`");
                usage()
            }
            s => cli_nets.extend(Net::parse(s).unwrap_or_else(|| {
                eprintln!("unknown net `{s}` (expected lenet, resnet, lstm, gru, rnn, all)");
                usage()
            })),
        }
    }
    if !cli_nets.is_empty() {
        nets = cli_nets;
    }
    if nets.is_empty() {
        nets = vec![Net::Lenet, Net::Resnet, Net::Lstm, Net::Gru];
    }
    nets.dedup();
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
    fn new(net_kind: Net) -> Result<Self> {
        let (file, model) = net_kind.spec();
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let compiled = compile(&path, Select::One(Some(model)), &[]).unwrap_or_else(|d| {
            panic!(
                "`{}` model `{model}` does not compile: {:?}",
                path.display(),
                d.first()
            )
        });
        let model = compiled.models.into_iter().next().expect("one model");
        let net = Network::new(&model, &Device::Cpu, DType::F32, Init::Torch, SEED)?;
        let sgd = Optimizer::Sgd {
            lr: LR,
            momentum: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        };
        let stepper = Stepper::new(sgd, &net.state.params);
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
                    _ => candle_core::bail!("unsupported"),
                }
            };
            let kind = match &node.op {
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
            rows.push(LayerRow {
                name,
                op: kind,
                shape: format!("{:?}", out.dims()),
                forward: median(&fwd),
                backward: median(&bwd),
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
}

impl Trainer for DlcTrainer {
    fn loss(&mut self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let logits = self.net.forward(std::slice::from_ref(x), true)?.remove(0);
        // A language model predicts at every step: [N, T, vocab] → [N·T, vocab].
        let classes = logits.dim(D::Minus1)?;
        candle_nn::loss::cross_entropy(&logits.reshape(((), classes))?, y)
    }
    fn update(&mut self, grads: &GradStore) -> Result<()> {
        self.stepper.step(grads, LR)
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

/// The recurrent layer of [`CandleCharModel`].
enum CandleCell {
    Lstm(candle_nn::LSTM),
    Gru(candle_nn::GRU),
}

/// d2l's character model with candle-nn's recurrent layers: one-hot ids, one LSTM or GRU
/// layer stepped by `RNN::seq`, a linear layer to the vocabulary at every step.
struct CandleCharModel {
    rnn: CandleCell,
    linear: candle_nn::Linear,
}

impl CandleCharModel {
    fn new(kind: Net, vb: VarBuilder) -> Result<Self> {
        let rnn = match kind {
            Net::Gru => CandleCell::Gru(candle_nn::gru(
                VOCAB,
                HIDDEN,
                Default::default(),
                vb.pp("rnn"),
            )?),
            _ => CandleCell::Lstm(candle_nn::lstm(
                VOCAB,
                HIDDEN,
                Default::default(),
                vb.pp("rnn"),
            )?),
        };
        let linear = candle_nn::linear(HIDDEN, VOCAB, vb.pp("linear"))?;
        Ok(CandleCharModel { rnn, linear })
    }
    /// ids `[N, T]` → logits `[N·T, vocab]`.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        use candle_nn::RNN;
        let x = candle_nn::encoding::one_hot(ids.clone(), VOCAB, 1f32, 0f32)?;
        // candle-nn's GRU `states_to_tensor` concatenates instead of stacking: stack the
        // hidden states here for both.
        let hs: Vec<Tensor> = match &self.rnn {
            CandleCell::Lstm(l) => l.seq(&x)?.into_iter().map(|s| s.h).collect(),
            CandleCell::Gru(g) => g.seq(&x)?.into_iter().map(|s| s.h).collect(),
        };
        let y = self.linear.forward(&Tensor::stack(&hs, 1)?)?;
        y.reshape(((), VOCAB))
    }
}

enum CandleNet {
    Lenet(CandleLenet),
    Resnet(CandleResnet),
    Chars(CandleCharModel),
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
            Net::Lstm | Net::Gru => CandleNet::Chars(CandleCharModel::new(kind, vb)?),
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
            CandleNet::Chars(n) => n.forward(x)?,
        };
        candle_nn::loss::cross_entropy(&logits, y)
    }
    fn update(&mut self, grads: &GradStore) -> Result<()> {
        self.sgd.step(grads)
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
        };
        let v = server.read()?;
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            return Err(e.to_string());
        }
        server.params = v["params"].as_u64().unwrap_or(0) as usize;
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

/// The fixed batch: images uniform in [0, 1) with labels uniform over the classes, or
/// character ids uniform over the vocabulary with one label per character.
fn batch(net: Net) -> Result<(Tensor, Tensor)> {
    let mut rng = StdRng::seed_from_u64(42);
    let mut dims = vec![net.batch()];
    dims.extend(net.example());
    let count: usize = dims.iter().product();
    let classes = net.classes() as u32;
    let x = match net {
        Net::Lenet | Net::Resnet => {
            let xs: Vec<f32> = (0..count).map(|_| rng.random::<f32>()).collect();
            Tensor::from_vec(xs, dims, &Device::Cpu)?
        }
        Net::Lstm | Net::Gru => {
            let ids: Vec<u32> = (0..count).map(|_| rng.random_range(0..classes)).collect();
            Tensor::from_vec(ids, dims, &Device::Cpu)?
        }
    };
    let labels = match net {
        Net::Lenet | Net::Resnet => net.batch(),
        Net::Lstm | Net::Gru => count,
    };
    let ys: Vec<u32> = (0..labels).map(|_| rng.random_range(0..classes)).collect();
    Ok((x, Tensor::from_vec(ys, labels, &Device::Cpu)?))
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

/// The columns, in table order: key, title.
const COLUMNS: [(&str, &str); 3] = [
    ("dlc", "dlc"),
    ("candle", "candle-nn"),
    ("torch", "PyTorch"),
];

fn main() -> Result<()> {
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
    let mut rows: Vec<(Net, usize, usize, HashMap<&'static str, Timings>)> = Vec::new();
    let mut layer_tables: Vec<(Net, usize, Vec<LayerRow>)> = Vec::new();
    for &net in &o.nets {
        let steps = o.steps.unwrap_or(net.default_steps()).max(1);
        let rounds = o.rounds.unwrap_or(5).clamp(1, steps);
        let (x, y) = batch(net)?;

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
        if o.dlc {
            let t = DlcTrainer::new(net)?;
            agree("dlc", t.net.state.param_count());
            dlc_trainer = Some(t);
        }
        if o.candle {
            let t = CandleTrainer::new(net)?;
            agree("candle-nn", t.params);
            candle_trainer = Some(t);
        }
        let mut trainers: Vec<(&'static str, &mut dyn Trainer)> = Vec::new();
        if let Some(t) = dlc_trainer.as_mut() {
            trainers.push(("dlc", t));
        }
        if let Some(t) = candle_trainer.as_mut() {
            trainers.push(("candle", t));
        }
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
                    println!("PyTorch column left out: {why}");
                    torch_enabled = false;
                }
            }
        }
        let p = params.map(|p| p.1).unwrap_or(0);

        let mut cols: HashMap<&'static str, Timings> = HashMap::new();
        for (k, t) in trainers.iter_mut() {
            eprintln!(
                "{}: {k}, {p} params, {} warm-up steps ...",
                net.title(),
                o.warmup
            );
            run_steps(*t, &x, &y, o.warmup, cols.entry(*k).or_default(), false)?;
        }
        // Rounds interleave the columns, so that a change in the machine's load hits all of them.
        for r in 0..rounds {
            let n = steps * (r + 1) / rounds - steps * r / rounds;
            eprintln!(
                "{}: round {}/{rounds}, {n} timed steps per column ...",
                net.title(),
                r + 1
            );
            for (k, t) in trainers.iter_mut() {
                run_steps(*t, &x, &y, n, cols.entry(*k).or_default(), true)?;
            }
            if let Some(s) = torch.as_mut()
                && let Err(why) = s.steps(n, cols.entry("torch").or_default())
            {
                println!("PyTorch column left out: {why}");
                torch = None;
                cols.remove("torch");
            }
        }
        drop(torch);
        drop(trainers);
        if o.layers {
            match dlc_trainer.as_ref() {
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
        rows.push((net, steps, p, cols));
    }
    let end_load = loadavg();

    println!();
    println!(
        "Training step, ms per step: median (min) over the timed steps, after {} warm-up steps; \
         columns interleaved in rounds. Fixed batch, SGD lr {LR}, f32, CPU, {cores} cores; \
         load average {end_load} at the end.",
        o.warmup
    );
    if let Some(v) = &torch_version {
        println!("PyTorch: {v}.");
    }
    println!();
    println!(
        "| net | batch | params | steps | dlc | candle-nn | PyTorch | dlc / candle-nn | dlc / PyTorch |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (net, steps, p, cols) in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            net.title(),
            net.batch(),
            p,
            steps,
            cell(cols.get("dlc")),
            cell(cols.get("candle")),
            cell(cols.get("torch")),
            ratio(cols.get("dlc"), cols.get("candle")),
            ratio(cols.get("dlc"), cols.get("torch")),
        );
    }
    println!();
    println!(
        "Loss at the first and the last step (a check that every column trains; inits differ):"
    );
    for (net, _, _, cols) in &rows {
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
        for (net, _, _, cols) in &rows {
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
        let mut by_op: Vec<(String, usize, f64, f64)> = Vec::new();
        for l in layers {
            match by_op.iter_mut().find(|o| o.0 == l.op) {
                Some(o) => {
                    o.1 += 1;
                    o.2 += l.forward;
                    o.3 += l.backward;
                }
                None => by_op.push((l.op.clone(), 1, l.forward, l.backward)),
            }
        }
        by_op.sort_by(|a, b| (b.2 + b.3).total_cmp(&(a.2 + a.3)));
        println!();
        println!("| op | layers | forward ms | backward ms | share of sum |");
        println!("|---|---:|---:|---:|---:|");
        for (op, n, f, b) in &by_op {
            println!("| {op} | {n} | {f:.1} | {b:.1} | {:.1}% |", share(f + b));
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
    Ok(())
}

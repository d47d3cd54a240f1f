//! Subcommands, one file each; they do I/O and printing, the library does the work.

mod check;
mod eval;
mod graph;
mod params;
mod predict;
mod train;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use dlc::diagnostics::Diag;

/// dlc — a compiler for neural networks written as text.
///
/// Write an architecture in a `.dlc` spec, then check it, count its parameters and MACs,
/// draw its graph, and train it. See docs/language.md for the language.
#[derive(Parser, Debug)]
#[command(name = "dlc", version, about, long_about = None, propagate_version = true)]
#[command(
    after_help = "Examples:\n  dlc check specs/*.dlc\n  dlc params specs/resnet.dlc --model resnet50\n  dlc params specs/lenet.dlc --format json\n  dlc params specs/mlp.dlc --model mlp --set hidden=512\n  dlc graph specs/resnet.dlc --model resnet18 | dot -Tsvg > resnet18.svg\n  dlc train specs/lenet.dlc\n  dlc eval specs/lenet.dlc --weights runs/<run>/model.safetensors\n  dlc predict specs/lenet.dlc --weights runs/<run>/model.safetensors shoe.png"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Parse and shape-check specs: one line per model, or every diagnostic (exit 1).
    Check(check::CheckArgs),
    /// Print a model's layer table: output shapes, parameters and MACs, with totals.
    Params(params::ParamsArgs),
    /// Print a model's graph as Graphviz DOT (blocks as clusters) on stdout.
    Graph(graph::GraphArgs),
    /// Train an image classifier on Fashion-MNIST: progress, metrics, curves, checkpoints.
    Train(train::TrainArgs),
    /// Evaluate a checkpoint on the test set: accuracy, per class, confusion matrix.
    Eval(eval::EvalArgs),
    /// Classify PNG/JPEG images with a checkpoint: the top classes and their probabilities.
    Predict(predict::PredictArgs),
}

/// Options every subcommand takes to choose and configure a model.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// The model to use, when the file defines several.
    #[arg(long, short)]
    model: Option<String>,
    /// Override a model parameter: `--set classes=5`, `--set layers=[2,2,2,2]` (repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE")]
    sets: Vec<String>,
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Check(a) => check::run(a),
        Command::Params(a) => params::run(a),
        Command::Graph(a) => graph::run(a),
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Predict(a) => predict::run(a),
    }
}

/// Limits the tensor kernels to `n` threads (candle reads rayon's variable).
fn set_threads(n: usize) {
    // SAFETY: called before any other thread reads the environment (the compiler thread is
    // the only one running, and no kernel has started yet).
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string()) };
}

/// Identifies a spec, its imports, the model and its overrides.
fn spec_hash(compiled: &dlc::session::Compiled, model: &ModelArgs) -> String {
    let mut parts: Vec<&str> = compiled.program.sources.files().map(|f| &*f.text).collect();
    let name = compiled
        .models
        .first()
        .map(|m| m.name.as_str())
        .unwrap_or("");
    parts.push(name);
    parts.extend(model.sets.iter().map(String::as_str));
    dlc::train::spec_hash(&parts)
}

/// `20261127-214512` (UTC) for run folder names.
fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Compiles the one model a subcommand works on, or prints why it cannot.
fn compile_one(
    file: &std::path::Path,
    model: &ModelArgs,
) -> Result<dlc::session::Compiled, ExitCode> {
    dlc::session::compile(
        file,
        dlc::session::Select::One(model.model.as_deref()),
        &model.sets,
    )
    .map_err(report)
}

/// Writes to stdout; a closed pipe (`dlc params ... | head`) ends the program quietly.
fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{text}").and_then(|_| out.flush()).is_err() {
        std::process::exit(0);
    }
}

/// Prints diagnostics to stderr and returns the failure exit code.
fn report(diags: Vec<Diag>) -> ExitCode {
    let n = diags.len();
    for d in diags {
        eprintln!("{:?}", miette::Report::new(d));
    }
    if n > 1 {
        eprintln!("error: {n} problems found");
    }
    ExitCode::FAILURE
}

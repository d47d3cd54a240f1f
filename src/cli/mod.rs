//! Subcommands, one file each; they do I/O and printing, the library does the work.

mod check;
mod graph;
mod params;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use dlc::diagnostics::Diag;

/// dlc — a compiler for neural networks written as text.
///
/// Write an architecture in a `.dlc` spec, then check it, count its parameters and MACs,
/// and draw its graph. See docs/language.md for the language.
#[derive(Parser, Debug)]
#[command(name = "dlc", version, about, long_about = None, propagate_version = true)]
#[command(
    after_help = "Examples:\n  dlc check specs/*.dlc\n  dlc params specs/resnet.dlc --model resnet50\n  dlc params specs/lenet.dlc --format json\n  dlc graph specs/resnet.dlc --model resnet18 | dot -Tsvg > resnet18.svg\n  dlc params specs/mlp.dlc --set hidden=512"
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
    }
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

//! `dlc graph`: Graphviz DOT on stdout.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use dlc::report;
use dlc::session::{Select, compile};

use super::ModelArgs;

/// Arguments of `dlc graph`.
#[derive(Args, Debug)]
pub struct GraphArgs {
    /// The spec file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
}

/// Prints the chosen model as DOT.
pub fn run(args: GraphArgs) -> ExitCode {
    match compile(
        &args.file,
        Select::One(args.model.model.as_deref()),
        &args.model.sets,
    ) {
        Ok(c) => {
            for m in &c.models {
                super::emit(report::dot::render(m).trim_end());
            }
            ExitCode::SUCCESS
        }
        Err(diags) => super::report(diags),
    }
}

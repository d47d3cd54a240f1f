//! `dlc params`: the layer table or its JSON form.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use dlc::report;

use super::ModelArgs;

/// Output formats of `dlc params`.
#[derive(ValueEnum, Debug, Clone, Copy)]
enum Format {
    /// A torchinfo-style table.
    Table,
    /// One JSON object with totals and every layer.
    Json,
}

/// Arguments of `dlc params`.
#[derive(Args, Debug)]
pub struct ParamsArgs {
    /// The spec file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// How many levels of blocks to expand; deeper levels are summed into their parent row,
    /// and identical repeated blocks at the last level shown are folded as `×N`.
    #[arg(long, short, default_value_t = 2)]
    depth: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// Prints the table (or JSON) of the chosen model.
pub fn run(args: ParamsArgs) -> ExitCode {
    let compiled = match super::compile_one(&args.file, &args.model) {
        Ok(c) => c,
        Err(code) => return code,
    };
    for m in &compiled.models {
        match args.format {
            Format::Table => super::emit(&report::table::render(m, args.depth)),
            Format::Json => super::emit(&format!("{:#}", report::json::render(m))),
        }
    }
    ExitCode::SUCCESS
}

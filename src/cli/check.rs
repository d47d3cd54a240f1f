//! `dlc check`: parse and shape-check.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use dlc::report;
use dlc::session::{Select, compile};

use super::ModelArgs;

/// Arguments of `dlc check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Spec files to check.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
}

/// Checks every file; prints one line per model or every diagnostic.
pub fn run(args: CheckArgs) -> ExitCode {
    let mut diags = Vec::new();
    for file in &args.files {
        match compile(
            file,
            Select::All(args.model.model.as_deref()),
            &args.model.sets,
        ) {
            Ok(c) => {
                if c.models.is_empty() {
                    super::emit(&format!(
                        "{}: no models ({} blocks)",
                        file.display(),
                        c.program.blocks.len()
                    ));
                }
                for m in &c.models {
                    super::emit(&report::check_line(m));
                }
                for (name, missing) in &c.templates {
                    super::emit(&format!(
                        "{name}: template, used through variants (needs {})",
                        missing.join(", ")
                    ));
                }
            }
            Err(ds) => diags.extend(ds),
        }
    }
    if diags.is_empty() {
        ExitCode::SUCCESS
    } else {
        super::report(diags)
    }
}

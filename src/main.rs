//! The `dlc` command line.

mod cli;

use std::process::ExitCode;

/// Stack for the compiler thread: deep but legal specs must not overflow.
const STACK_BYTES: usize = 256 << 20;

fn main() -> ExitCode {
    let args = <cli::Cli as clap::Parser>::parse();
    let worker = std::thread::Builder::new()
        .stack_size(STACK_BYTES)
        .spawn(move || cli::run(args));
    match worker.map(|h| h.join()) {
        Ok(Ok(code)) => code,
        _ => {
            eprintln!("dlc: internal error; please report it with the input that caused it");
            ExitCode::from(101)
        }
    }
}

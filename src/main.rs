//! The `dlc` command line.

mod cli;

use std::process::ExitCode;

/// mimalloc keeps freed pages for reuse: with glibc's allocator a ResNet-18 training step
/// spent a sixth of its time in page faults on freshly mapped activation buffers.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

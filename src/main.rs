//! The `dlc` command line.

mod cli;

use std::process::ExitCode;

/// mimalloc keeps freed pages for reuse: with glibc's allocator a ResNet-18 training step
/// spent a sixth of its time in page faults on freshly mapped activation buffers.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tells mimalloc never to hand freed pages back to the system. By default it does so 10 ms
/// after they are freed, and a training step frees and allocates the same activation
/// buffers every step, more than 10 ms apart: the kernel then zeroes every page again on
/// first touch (12% of a ResNet-18 step in `clear_page`). The process stays at its peak
/// resident size, which it reaches every step anyway.
fn keep_freed_pages() {
    unsafe extern "C" {
        fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    }
    /// `mi_option_purge_delay` in mimalloc's `mi_option_t`; -1 means never.
    const PURGE_DELAY: std::ffi::c_int = 15;
    // SAFETY: mimalloc's documented API, linked in by the `mimalloc` crate; setting an option
    // has no preconditions.
    unsafe { mi_option_set(PURGE_DELAY, -1) };
}

/// Stack for the compiler thread: deep but legal specs must not overflow.
const STACK_BYTES: usize = 256 << 20;

fn main() -> ExitCode {
    keep_freed_pages();
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

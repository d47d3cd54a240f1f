//! Peak resident memory of this process (Linux): the kernel's high-water mark `VmHWM`, reset
//! before each column's turn by writing `5` to `/proc/self/clear_refs`, so that the figure is
//! the peak while that column ran. Freed heap memory is not handed back to the system there:
//! that would make the first step of every turn fault in and zero its buffers again, a cost
//! a training loop never pays. Pages a column keeps after its first turn therefore count
//! toward its peak (they are its own when one row and one Rust column run per process), as do
//! pages another column or an earlier row in the same process touched: the allocator is
//! configured as in the `dlc` binary ([`keep_freed_pages`]), which keeps them for reuse. `benches/train_step_torch.py` does the same inside the
//! PyTorch process.

/// Resets the high-water mark to the current resident size. `false` where the kernel does not allow it (not Linux, or an old
/// kernel): peaks are then left out.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The resident high-water mark since the last [`reset_peak`], in MiB.
pub fn peak_mib() -> Option<f64> {
    status_kib("VmHWM:").map(|k| k as f64 / 1024.0)
}

/// The resident size now, in MiB (after asking mimalloc to hand freed memory back; the pages
/// [`keep_freed_pages`] keeps stay).
pub fn resident_mib() -> Option<f64> {
    release_freed_pages();
    status_kib("VmRSS:").map(|k| k as f64 / 1024.0)
}

/// A `kB` field of `/proc/self/status`.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

/// mimalloc never hands freed pages back to the system by itself, as in the `dlc` binary
/// (`src/main.rs`): each training step reuses the previous step's pages.
pub fn keep_freed_pages() {
    // SAFETY: see `release_freed_pages`.
    unsafe { mi_option_set(PURGE_DELAY, -1) };
}

unsafe extern "C" {
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    fn mi_collect(force: bool);
}

/// `mi_option_purge_delay` in mimalloc's `mi_option_t`; -1 means never.
const PURGE_DELAY: std::ffi::c_int = 15;

/// Returns mimalloc's free pages to the system now, from every thread's heap: purging without
/// delay while it collects, then its usual delay again (which keeps freed pages for reuse
/// while a column runs).
fn release_freed_pages() {
    // SAFETY: mimalloc's documented API, linked in by the `mimalloc` crate; reading and setting
    // an option and collecting free memory have no preconditions.
    unsafe {
        let delay = mi_option_get(PURGE_DELAY);
        mi_option_set(PURGE_DELAY, 0);
        // Every thread's heap holds its own free pages: collect on each worker of rayon's
        // pool (where the kernels allocate), then on this thread.
        rayon::broadcast(|_| mi_collect(true));
        mi_collect(true);
        mi_option_set(PURGE_DELAY, delay);
    }
}

//! Peak resident memory of this process (Linux): the kernel's high-water mark `VmHWM`, reset
//! before each column's turn by writing `5` to `/proc/self/clear_refs`, so that the figure is
//! the peak while that column ran. Freed heap memory is handed back to the system first
//! (mimalloc's `mi_collect`, the bench's allocator as it is the `dlc` binary's), so that one
//! column's freed buffers do not count as the next one's.
//! `benches/train_step_torch.py` does the same inside the PyTorch process.

/// Hands freed heap memory back to the system, then resets the high-water mark to the
/// current resident size. `false` where the kernel does not allow it (not Linux, or an old
/// kernel): peaks are then left out.
pub fn reset_peak() -> bool {
    trim_heap();
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The resident high-water mark since the last [`reset_peak`], in MiB.
pub fn peak_mib() -> Option<f64> {
    status_kib("VmHWM:").map(|k| k as f64 / 1024.0)
}

/// The resident size now, in MiB (after handing freed heap memory back).
pub fn resident_mib() -> Option<f64> {
    trim_heap();
    status_kib("VmRSS:").map(|k| k as f64 / 1024.0)
}

/// A `kB` field of `/proc/self/status`.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

/// Returns mimalloc's free pages to the system now, from every thread's heap: purging without
/// delay while it collects, then its usual delay again (which keeps freed pages for reuse
/// while a column runs).
fn trim_heap() {
    unsafe extern "C" {
        fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
        fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
        fn mi_collect(force: bool);
    }
    /// `mi_option_purge_delay` in mimalloc's `mi_option_t`.
    const PURGE_DELAY: std::ffi::c_int = 15;
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

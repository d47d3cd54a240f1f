//! Peak resident memory of this process (Linux): the kernel's high-water mark `VmHWM`, reset
//! before each column's turn by writing `5` to `/proc/self/clear_refs`, so that the figure is
//! the peak while that column ran. Freed heap memory is handed back to the system first
//! (`malloc_trim`, glibc), so that one column's freed buffers do not count as the next one's.
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

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    unsafe extern "C" {
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: glibc's malloc_trim only releases free memory; it has no preconditions.
    unsafe {
        malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

//! Shared pieces of our CPU kernels: the element types with their per-thread scratch buffers,
//! and reductions that vectorise without changing with the thread count.

use std::cell::RefCell;

use candle_core::WithDType;

/// Element types of the kernels (f32 and f64), each with a scratch buffer per thread.
pub(crate) trait Float: WithDType {
    /// Runs `f` on `len` elements of scratch space with unspecified contents. The calling
    /// thread's buffer is reused from call to call (it keeps its largest size); a nested call
    /// on the same thread gets a fresh allocation.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;

    /// `e^self`.
    fn exp(self) -> Self;
}

macro_rules! float {
    ($t:ty) => {
        impl Float for $t {
            fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
                thread_local! {
                    static SCRATCH: RefCell<Vec<$t>> = const { RefCell::new(Vec::new()) };
                }
                SCRATCH.with(|cell| match cell.try_borrow_mut() {
                    Ok(mut buf) => {
                        if buf.len() < len {
                            buf.resize(len, 0.0);
                        }
                        f(&mut buf[..len])
                    }
                    Err(_) => f(&mut vec![0.0; len]),
                })
            }

            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
        }
    };
}
float!(f32);
float!(f64);

/// The sum of `x` in eight interleaved partial sums (so that it vectorises), then in order.
#[inline(always)]
pub(crate) fn sum<T: Float>(x: &[T]) -> T {
    const LANES: usize = 8;
    let mut lanes = [T::zero(); LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    let tail = chunks.remainder().iter().fold(T::zero(), |a, &v| a + v);
    lanes.iter().fold(tail, |a, &v| a + v)
}

/// `Σ f(a, b)` over pairs, in the lane order of [`sum`] (over the shorter length).
#[inline(always)]
pub(crate) fn sum_zip<T: Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    const LANES: usize = 8;
    let mut lanes = [T::zero(); LANES];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (xa, xb) in (&mut ca).zip(&mut cb) {
        for k in 0..LANES {
            lanes[k] += f(xa[k], xb[k]);
        }
    }
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(T::zero(), |acc, (&u, &v)| acc + f(u, v));
    lanes.iter().fold(tail, |acc, &v| acc + v)
}

/// Runs `f` compiled for the widest vector instructions this CPU has (AVX-512, or AVX2 with
/// FMA, on x86-64; detected at run time by `pulp`, as `gemm` does). Only code inlined into `f`
/// benefits, hence `#[inline(always)]` on the vector helpers it calls.
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

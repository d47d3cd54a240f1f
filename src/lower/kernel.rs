//! Shared pieces of our CPU kernels: the element types with their per-thread scratch buffers,
//! output buffers zeroed on the whole pool or chunk by chunk in the tasks that fill them, a
//! strided gather, and reductions that vectorise without changing with the thread count.

use std::cell::RefCell;
use std::mem::MaybeUninit;

use candle_core::{CpuStorage, Layout, Result, WithDType, bail};
use rayon::prelude::*;

/// Element types of the kernels (f32 and f64), each with a scratch buffer per thread.
pub(crate) trait Float: WithDType {
    /// Runs `f` on `len` elements of scratch space with unspecified contents. The calling
    /// thread's buffer is reused from call to call (it keeps its largest size); a nested call
    /// on the same thread gets a fresh allocation.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;

    /// `e^self` (f32: [`exp_f32`], which vectorises; f64: the C library's).
    fn exp(self) -> Self;
}

macro_rules! float {
    ($t:ty, $exp:path) => {
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
                $exp(self)
            }
        }
    };
}
float!(f32, exp_f32);
float!(f64, f64::exp);

/// `e^x` for f32 without a library call, so that loops over it vectorise: Cephes' `expf`
/// (`x = n·ln 2 + r`, a degree-6 polynomial for `e^r` on `|r| ≤ ln 2 / 2`, then `2^n` put in
/// the exponent bits); relative error below 2·10⁻⁷. Inputs are clamped to `[−87.3, 88.7]`
/// (so `e^x` below about `f32::MIN_POSITIVE` is about that, and above `e^88.7` infinite); NaN stays
/// NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer (|x·log2 e| < 2²²).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.336_55, 88.722_84);
    let rounded = x * LOG2E + ROUND;
    let n = rounded - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * pow2(rounded)
}

/// `2^n` from `rounded = n + 1.5·2²³` (`−127 < n ≤ 128` an integer), whose low mantissa bits
/// hold `n`: integer arithmetic on the bits, which vectorises, where `n as i32` (a saturating
/// conversion, NaN-checked) runs lane by lane and made `exp_f32` four times slower.
#[inline(always)]
fn pow2(rounded: f32) -> f32 {
    const ROUND_BITS: u32 = 12_582_912.0f32.to_bits();
    f32::from_bits(rounded.to_bits().wrapping_sub(ROUND_BITS).wrapping_add(127) << 23)
}

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
    // Loops, not `fold`, here and below: a closure given to an iterator adapter is compiled
    // in the adapter's own instance, outside the caller's `vectorized` context.
    let mut total = T::zero();
    for &v in chunks.remainder() {
        total += v;
    }
    for v in lanes {
        total += v;
    }
    total
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
    let mut total = T::zero();
    for (&u, &v) in ca.remainder().iter().zip(cb.remainder()) {
        total += f(u, v);
    }
    for v in lanes {
        total += v;
    }
    total
}

/// Buffers of at least this many elements are zeroed by [`zeroed`] on the whole pool.
const PARALLEL_ZEROING: usize = 1 << 16;

/// A vector of `len` zeros. A large one is zeroed on every thread of rayon's pool, each its
/// own share, where `vec![0; len]` zeroes on the calling thread alone while the pool waits
/// (the kernels' output and gradient buffers: several MiB per op).
pub(crate) fn zeroed<T: Float>(len: usize) -> Vec<T> {
    if len < PARALLEL_ZEROING {
        return vec![T::zero(); len];
    }
    let mut v = Vec::with_capacity(len);
    let share = len.div_ceil(rayon::current_num_threads());
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(share)
        .for_each(|part| part.fill(MaybeUninit::new(T::zero())));
    // SAFETY: the loop above wrote all `len` elements.
    unsafe { v.set_len(len) };
    v
}

/// A vector of `len` elements filled in parallel chunks of `chunk` elements: `f(k, out)` gets
/// chunk `k` zeroed and fills it (or adds to it). Each chunk is zeroed by the task that fills
/// it, just before, while it is in that core's cache: zeroing the whole buffer first
/// ([`zeroed`]) is a pass over memory of its own, and for the activations of a large layer
/// (28 MB for MobileNetV2's [32, 96, 48, 48]) it leaves none of them in cache.
pub(crate) fn par_chunks_zeroed<T: Float>(
    len: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(k, part)| {
            part.fill(MaybeUninit::new(T::zero()));
            // SAFETY: every element of `part` was initialised on the line above, and
            // `MaybeUninit<T>` has the layout of `T`.
            let part = unsafe { &mut *(part as *mut [MaybeUninit<T>] as *mut [T]) };
            f(k, part);
        });
    // SAFETY: the chunks cover all `len` elements, and each was initialised by its task.
    unsafe { v.set_len(len) };
    v
}

/// `dst[t] = src[t · stride]`.
#[inline(always)]
pub(crate) fn gather<T: Float>(dst: &mut [T], src: &[T], stride: usize) {
    match stride {
        1 => dst.copy_from_slice(&src[..dst.len()]),
        2 => gather_strided::<T, 2>(dst, src, 2),
        _ => gather_strided::<T, 0>(dst, src, stride),
    }
}

/// [`gather`] for `stride > 1`, fixed at compile time when `S > 0` (then `stride = S`): every
/// element but the last from a whole `stride`-element chunk of `src`, where the last may
/// have fewer after it. With `S = 2` the compiler loads whole vectors and shuffles the even
/// elements out; `iter().step_by(2)` ran element by element, 3–5× slower over the rows of
/// ResNet's stride-2 stem.
#[inline(always)]
fn gather_strided<T: Float, const S: usize>(dst: &mut [T], src: &[T], stride: usize) {
    let stride = if S > 0 { S } else { stride };
    let Some((last, body)) = dst.split_last_mut() else {
        return;
    };
    *last = src[body.len() * stride];
    for (d, chunk) in body.iter_mut().zip(src.chunks_exact(stride)) {
        *d = chunk[0];
    }
}

/// Runs `f` compiled for the widest vector instructions this CPU has (AVX-512, or AVX2 with
/// FMA, on x86-64; detected at run time by `pulp`, as `gemm` does). Only code inlined into `f`
/// benefits, hence `#[inline(always)]` on the vector helpers it calls.
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// The contiguous elements of a custom op's operand (our ops make their operands contiguous
/// before they apply, so anything else is a bug, reported as an error).
pub(crate) fn elements<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("kernel operand is not contiguous ({:?})", l.dims()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_is_all_zeros_at_every_size() {
        for len in [
            0,
            1,
            PARALLEL_ZEROING - 1,
            PARALLEL_ZEROING,
            3 * PARALLEL_ZEROING + 7,
        ] {
            let v = zeroed::<f32>(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x == 0.0));
        }
    }

    /// `par_chunks_zeroed` hands every chunk over zeroed (the last one shorter), with its
    /// index, and keeps what each task wrote.
    #[test]
    fn par_chunks_zeroed_fills_every_chunk() {
        for (len, chunk) in [(0, 4), (1, 4), (10, 4), (12, 4), (100_003, 1 << 14)] {
            let v = par_chunks_zeroed::<f64>(len, chunk, |k, part| {
                assert!(part.iter().all(|&x| x == 0.0));
                assert!(part.len() == chunk || (k + 1) * chunk >= len);
                for (i, x) in part.iter_mut().enumerate() {
                    *x = (k * chunk + i) as f64;
                }
            });
            assert_eq!(v, (0..len).map(|i| i as f64).collect::<Vec<_>>());
        }
    }

    /// `gather` takes every `stride`-th element for every stride and length, including a
    /// source that ends right after the last element taken.
    #[test]
    fn gather_takes_every_stride_th_element() {
        for stride in 1..5 {
            for len in 0..40 {
                let src: Vec<f32> = (0..(len.max(1) - 1) * stride + 1)
                    .map(|v| v as f32)
                    .collect();
                let mut dst = vec![-1.0; len];
                gather(&mut dst, &src, stride);
                let want: Vec<f32> = (0..len).map(|t| (t * stride) as f32).collect();
                assert_eq!(dst, want, "stride {stride}, {len} elements");
            }
        }
    }

    #[test]
    fn exp_f32_is_within_two_ulp_of_libm() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, exact) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((ours - exact) / exact).abs());
            x += 0.000_37;
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
        assert!((0.0..1.2e-38).contains(&exp_f32(-1e4)));
        assert!(exp_f32(89.0).is_infinite());
    }
}

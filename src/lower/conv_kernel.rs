//! CPU kernels of 2-D convolution on contiguous `[N, C, H, W]` data, f32 and f64: the forward
//! pass and the gradients of the input, the weight and the bias, each computed on its own so
//! that a gradient nobody needs costs nothing.
//!
//! Four algorithms:
//! - **im2col + GEMM**, the general one. The windows of a chunk of samples are unrolled into a
//!   `[C/groups · kh · kw, samples · H'·W']` matrix in a per-thread scratch buffer, and one GEMM
//!   per group (the `gemm` crate, candle's own) computes the output, the unrolled input gradient
//!   (folded back by col2im), or the weight gradient. A pointwise convolution (1×1, stride 1, no
//!   padding) of one sample reads the input itself as that matrix. Chunks hold enough samples
//!   for [`GEMM_COLUMNS`] columns, so that layers with small images still make wide GEMMs;
//!   short output rows unroll through a table ([`Unroll`]).
//! - **Shifted taps** for stride-1 convolutions whose padding adds few columns: one GEMM per
//!   kernel tap on a shifted view of the padded input, nothing unrolled (see [`Shifts`]).
//! - **Winograd's F(2×2, 3×3)** for 3×3, stride-1 convolutions of at least 16 channels on
//!   planes that whole 2×2 tiles cover with little waste (ResNet's 3×3 layers): 16 GEMMs on
//!   transformed tiles, 16 multiplications per tile where im2col takes 36 ([`winograd`]).
//! - **Direct loops** for depthwise convolution (one input channel per group, several groups),
//!   where each group's GEMM would have a single row: each output plane is a sum of shifted,
//!   scaled copies of its input plane, split by the stride into phase planes so that every
//!   kernel tap is one long vector operation (see [`Phases`]).
//!
//! Threads: rayon's global pool, the one candle's CPU kernels and `gemm` use, sized by
//! `RAYON_NUM_THREADS` (which the CLI's `--threads` sets). The batch is split into chunks, as
//! many as a multiple of the threads where it can be; when there are at least as many chunks
//! as threads they run in parallel, each GEMM on one thread, else they run in turn and the
//! forward pass splits each chunk's output channels between the threads. Sums over the batch (weight and bias
//! gradients) are taken in a fixed order, so results do not depend on thread scheduling.

use std::ops::Range;

use candle_core::{Result, bail};
use gemm::Parallelism;
use rayon::prelude::*;

use super::kernel::{Float, gather, par_chunks_zeroed, sum, sum_zip, vectorized, zeroed};
use crate::ops::conv::{Conv2d, window_out};

mod winograd;

/// GEMM width (output positions) a chunk of samples aims for: narrower GEMMs run far below
/// the machine's peak, wider ones only need more scratch memory.
const GEMM_COLUMNS: usize = 512;

/// Most elements an unrolled chunk (im2col matrix) may hold; a chunk never has less than one
/// sample.
const MAX_SCRATCH: usize = 1 << 22;

/// The sizes of one convolution call: input `[n, c, h, w]`, weight `[o, c/groups, kh, kw]`,
/// output `[n, o, oh, ow]`. Stride, padding and dilation are `(along H, along W)`; padding is
/// the same on both sides of an axis, and rows or columns that no window reaches are ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub o: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride.
    pub stride: (usize, usize),
    /// Zero padding on each side.
    pub pad: (usize, usize),
    /// Dilation.
    pub dilation: (usize, usize),
    /// Channel groups.
    pub groups: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

impl Geometry {
    /// The geometry of `cfg` applied to an input and a weight of the given dims; an error
    /// when they do not fit together.
    pub fn new(cfg: &Conv2d, x: &[usize], weight: &[usize]) -> Result<Self> {
        let &[n, c, h, w] = x else {
            bail!("conv: input must be [N, C, H, W], got {x:?}");
        };
        let groups = cfg.groups as usize;
        let o = cfg.out as usize;
        let (kh, kw) = (cfg.kernel.0 as usize, cfg.kernel.1 as usize);
        if groups == 0 || !c.is_multiple_of(groups) || !o.is_multiple_of(groups) {
            bail!("conv: {c} input and {o} output channels cannot be split into {groups} groups");
        }
        if weight != [o, c / groups, kh, kw] {
            bail!(
                "conv: weight is {weight:?}, expected {:?}",
                [o, c / groups, kh, kw]
            );
        }
        let axis = |len: usize, k: usize, s: u64, p: u64, d: u64| {
            if s == 0 || d == 0 || k == 0 {
                bail!("conv: kernel, stride and dilation must be positive");
            }
            match window_out(len as u64, k as u64, s, p, d, false) {
                Some(out) => Ok(out as usize),
                None => bail!("conv: kernel {k} (dilation {d}, padding {p}) does not fit in {len}"),
            }
        };
        let oh = axis(h, kh, cfg.stride.0, cfg.pad.0, cfg.dilation.0)?;
        let ow = axis(w, kw, cfg.stride.1, cfg.pad.1, cfg.dilation.1)?;
        let pair = |p: (u64, u64)| (p.0 as usize, p.1 as usize);
        Ok(Geometry {
            n,
            c,
            h,
            w,
            o,
            kh,
            kw,
            stride: pair(cfg.stride),
            pad: pair(cfg.pad),
            dilation: pair(cfg.dilation),
            groups,
            oh,
            ow,
        })
    }

    /// Input channels per group.
    fn cg(&self) -> usize {
        self.c / self.groups
    }

    /// Output channels per group.
    fn og(&self) -> usize {
        self.o / self.groups
    }

    /// Rows of the unrolled input of one group: `cg · kh · kw`.
    fn ck(&self) -> usize {
        self.cg() * self.kh * self.kw
    }

    fn hw(&self) -> usize {
        self.h * self.w
    }

    fn ohw(&self) -> usize {
        self.oh * self.ow
    }

    /// 1×1, stride 1, no padding: the input is its own unrolled matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.stride == (1, 1)
            && self.pad == (0, 0)
            && self.oh == self.h
            && self.ow == self.w
    }

    /// Output positions `[lo, hi)` along H whose tap `i` reads the input, not padding.
    fn rows(&self, i: usize) -> Range<usize> {
        taps(
            self.oh,
            self.h,
            self.stride.0,
            i * self.dilation.0,
            self.pad.0,
        )
    }

    /// Output positions `[lo, hi)` along W whose tap `j` reads the input, not padding.
    fn cols(&self, j: usize) -> Range<usize> {
        taps(
            self.ow,
            self.w,
            self.stride.1,
            j * self.dilation.1,
            self.pad.1,
        )
    }

    /// The input row read by output row `oy` at tap `i` (inside [`Self::rows`]).
    fn in_row(&self, oy: usize, i: usize) -> usize {
        oy * self.stride.0 + i * self.dilation.0 - self.pad.0
    }

    /// The input column read by output column `ox` at tap `j` (inside [`Self::cols`]).
    fn in_col(&self, ox: usize, j: usize) -> usize {
        ox * self.stride.1 + j * self.dilation.1 - self.pad.1
    }
}

/// The positions `p < out` with `0 <= p·stride + offset − pad < len`.
fn taps(out: usize, len: usize, stride: usize, offset: usize, pad: usize) -> Range<usize> {
    let lo = pad.saturating_sub(offset).div_ceil(stride).min(out);
    let hi = (len + pad)
        .saturating_sub(offset)
        .div_ceil(stride)
        .clamp(lo, out);
    lo..hi
}

/// Which algorithm computes a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Algorithm {
    /// im2col + GEMM; any geometry.
    Gemm,
    /// Direct loops; only for one input channel per group.
    Direct,
    /// One GEMM per kernel tap on shifted views of the padded input; only for stride 1 and
    /// one group.
    Shifted,
    /// Winograd's F(2×2, 3×3): 16 GEMMs on transformed tiles; only for 3×3 kernels, stride
    /// and dilation 1, one group, padding at most 2 ([`winograd`]).
    Winograd,
}

impl Algorithm {
    /// The faster algorithm for `g`.
    pub fn choose(g: &Geometry) -> Algorithm {
        if g.cg() == 1 && g.groups > 1 {
            Algorithm::Direct
        } else if winograd::pays(g) {
            Algorithm::Winograd
        } else if Shifts::pay(g) {
            Algorithm::Shifted
        } else {
            Algorithm::Gemm
        }
    }
}

/// The convolution `x ⋆ w + b`: `[n, o, oh, ow]`, row-major.
pub(crate) fn forward<T: Float>(
    g: &Geometry,
    alg: Algorithm,
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
) -> Vec<T> {
    check_len(x, g.n * g.c * g.hw(), "input");
    check_len(w, g.o * g.ck(), "weight");
    if let Some(b) = b {
        check_len(b, g.o, "bias");
    }
    match alg {
        Algorithm::Gemm => forward_gemm(g, x, w, b),
        Algorithm::Direct => forward_direct(g, x, w, b),
        Algorithm::Shifted => forward_shifted(g, x, w, b),
        Algorithm::Winograd => winograd::forward(g, x, w, b),
    }
}

/// The gradient of the input, `[n, c, h, w]`, from the output gradient `dy`.
pub(crate) fn input_grad<T: Float>(g: &Geometry, alg: Algorithm, dy: &[T], w: &[T]) -> Vec<T> {
    check_len(dy, g.n * g.o * g.ohw(), "output gradient");
    check_len(w, g.o * g.ck(), "weight");
    match alg {
        Algorithm::Gemm => input_grad_gemm(g, dy, w),
        Algorithm::Direct => input_grad_direct(g, dy, w),
        Algorithm::Shifted => input_grad_shifted(g, dy, w),
        Algorithm::Winograd => winograd::input_grad(g, dy, w),
    }
}

/// The gradient of the weight, `[o, c/groups, kh, kw]`, from the input and the output
/// gradient.
pub(crate) fn weight_grad<T: Float>(g: &Geometry, alg: Algorithm, x: &[T], dy: &[T]) -> Vec<T> {
    check_len(x, g.n * g.c * g.hw(), "input");
    check_len(dy, g.n * g.o * g.ohw(), "output gradient");
    match alg {
        Algorithm::Gemm => weight_grad_gemm(g, x, dy),
        Algorithm::Direct => weight_grad_direct(g, x, dy),
        Algorithm::Shifted => weight_grad_shifted(g, x, dy),
        Algorithm::Winograd => winograd::weight_grad(g, x, dy),
    }
}

/// The gradient of the bias, `[o]`: `dy` summed over the batch and the positions.
pub(crate) fn bias_grad<T: Float>(g: &Geometry, dy: &[T]) -> Vec<T> {
    check_len(dy, g.n * g.o * g.ohw(), "output gradient");
    let mut db = vec![T::zero(); g.o];
    let ohw = g.ohw();
    db.par_iter_mut().enumerate().for_each(|(o, db)| {
        vectorized(
            #[inline(always)]
            || {
                for s in 0..g.n {
                    *db += sum(&dy[(s * g.o + o) * ohw..][..ohw]);
                }
            },
        )
    });
    db
}

fn check_len<T>(data: &[T], len: usize, what: &str) {
    assert_eq!(data.len(), len, "conv kernel: {what} has the wrong size");
}

// ---- im2col + GEMM ----

/// How the batch is split into chunks of samples.
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Samples per chunk (the last chunk may have fewer).
    chunk: usize,
    /// Number of chunks.
    chunks: usize,
    /// Threads of the pool.
    threads: usize,
}

impl Plan {
    /// The plan of im2col + GEMM: `oh·ow` columns and `ck · oh·ow` scratch per sample.
    fn new(g: &Geometry) -> Plan {
        Plan::with(g, g.ohw(), g.ck() * g.ohw())
    }

    /// Chunks of samples that make GEMMs of about [`GEMM_COLUMNS`] columns, `per_sample`
    /// columns and `scratch` elements each, as many chunks as a multiple of the threads where
    /// the batch allows it, so that every thread gets the same share (32 samples in chunks
    /// of 15, 15 and 2 left one of two threads idle for half the time).
    fn with(g: &Geometry, per_sample: usize, scratch: usize) -> Plan {
        let threads = rayon::current_num_threads().max(1);
        let n = g.n.max(1);
        let per_sample = per_sample.max(1);

        let chunk = GEMM_COLUMNS
            .div_ceil(per_sample)
            .min(MAX_SCRATCH / scratch.max(1))
            .clamp(1, n);
        let chunks = n.div_ceil(chunk).next_multiple_of(threads).min(n);
        let chunk = n.div_ceil(chunks);
        Plan {
            chunk,
            chunks: n.div_ceil(chunk),
            threads,
        }
    }

    /// Whether chunks run in parallel (else each GEMM uses the pool).
    fn parallel_chunks(&self) -> bool {
        self.threads > 1 && self.chunks >= self.threads
    }

    /// The GEMM's own parallelism when chunks run in parallel or not.
    fn gemm_par(&self, parallel_chunks: bool) -> Parallelism {
        if parallel_chunks || self.threads == 1 {
            Parallelism::None
        } else {
            Parallelism::Rayon(self.threads)
        }
    }
}

/// A vector of `n · per_sample` elements (`per_sample` per sample) filled chunk by chunk:
/// `f(first_sample, out_chunk, par)` on each chunk of the plan's samples, handed over zeroed,
/// in parallel when the plan says so (each chunk then zeroed by the task that fills it, see
/// [`par_chunks_zeroed`]); `f` gets the GEMM parallelism to use.
fn fill_chunks<T: Float>(
    n: usize,
    per_sample: usize,
    plan: &Plan,
    f: impl Fn(usize, &mut [T], Parallelism) + Sync,
) -> Vec<T> {
    let len = n * per_sample;
    if len == 0 {
        return Vec::new();
    }
    let step = plan.chunk * per_sample;
    if plan.parallel_chunks() {
        let par = plan.gemm_par(true);
        par_chunks_zeroed(len, step, |i, o| f(i * plan.chunk, o, par))
    } else {
        let par = plan.gemm_par(false);
        let mut out = zeroed(len);
        out.chunks_mut(step)
            .enumerate()
            .for_each(|(i, o)| f(i * plan.chunk, o, par));
        out
    }
}

/// Runs `f(rows, dst_rows, par)` on the rows of `dst` (`row_len` elements each): with a
/// parallel `par`, on one block of rows per thread, each block's GEMMs on its own thread;
/// else on all rows with `par`. A GEMM that uses the pool wakes the threads at every call,
/// while a convolution that runs several GEMMs (one per tap) wakes them once this way.
fn split_rows<T: Float>(
    dst: &mut [T],
    row_len: usize,
    par: Parallelism,
    f: impl Fn(Range<usize>, &mut [T], Parallelism) + Sync,
) {
    let rows = dst.len() / row_len.max(1);
    match par {
        Parallelism::Rayon(threads) if threads > 1 && rows >= 2 * threads => {
            let block = rows.div_ceil(threads);
            dst.par_chunks_mut(block * row_len)
                .enumerate()
                .for_each(|(k, d)| {
                    let start = k * block;
                    f(start..start + d.len() / row_len, d, Parallelism::None)
                });
        }
        _ => f(0..rows, dst, par),
    }
}

/// A matrix operand of [`matmul`]: its elements and (row, column) strides.
pub(crate) type Mat<'a, T> = (&'a [T], usize, usize);

/// The elements a `rows × cols` matrix with strides `(rs, cs)` spans.
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `dst[m×n] = (dst +) lhs[m×k] · rhs[k×n]`, with `gemm`.
pub(crate) fn matmul<T: Float>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, dst_cs): (&mut [T], usize, usize),
    lhs: Mat<'_, T>,
    rhs: Mat<'_, T>,
    accumulate: bool,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(extent(m, n, dst_rs, dst_cs) <= dst.len(), "matmul: dst");
    // SAFETY: `dst` is in bounds (checked above) and borrowed mutably, so it overlaps
    // neither operand.
    unsafe {
        gemm_into(
            dst.as_mut_ptr(),
            (m, n, k),
            (dst_rs, dst_cs),
            lhs,
            rhs,
            accumulate,
            par,
        )
    }
}

/// `lhs[m×k] · rhs[k×n]` as a new row-major `m × n` matrix, which the GEMM writes without
/// its being zeroed first (`matmul` into `vec![0; m·n]` writes every element twice).
pub(crate) fn matmul_new<T: Float>(
    (m, n, k): (usize, usize, usize),
    lhs: Mat<'_, T>,
    rhs: Mat<'_, T>,
    par: Parallelism,
) -> Vec<T> {
    let mut dst = Vec::with_capacity(m * n);
    if m > 0 && n > 0 {
        // SAFETY: the capacity holds the dense `m × n` destination, which overlaps neither
        // operand. Without `accumulate` the GEMM reads no element of it and writes every one
        // (gemm-common sets the destination's factor to zero and stores `lhs·rhs` alone, or
        // zeros for `k = 0`), so all `m·n` elements are initialised for `set_len`.
        unsafe {
            gemm_into(dst.as_mut_ptr(), (m, n, k), (n, 1), lhs, rhs, false, par);
            dst.set_len(m * n);
        }
    }
    dst
}

/// `dst = (dst +) lhs · rhs` through a pointer, with `gemm`; checks the operands' extents.
///
/// # Safety
/// `dst` must be valid for writes (and, with `accumulate`, initialised reads) of the
/// `m × n` matrix with strides `(dst_rs, dst_cs)`, and overlap neither operand.
unsafe fn gemm_into<T: Float>(
    dst: *mut T,
    (m, n, k): (usize, usize, usize),
    (dst_rs, dst_cs): (usize, usize),
    lhs: Mat<'_, T>,
    rhs: Mat<'_, T>,
    accumulate: bool,
    par: Parallelism,
) {
    assert!(extent(m, k, lhs.1, lhs.2) <= lhs.0.len(), "matmul: lhs");
    assert!(extent(k, n, rhs.1, rhs.2) <= rhs.0.len(), "matmul: rhs");
    // SAFETY: every element the GEMM reads is inside its operand (checked above), the strides
    // are non-negative, and the caller vouches for `dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        );
    }
}

/// Output rows shorter than this unroll through a table ([`Unroll`]). Measured, im2col and
/// col2im of a whole batch on one thread, table against rows: 3-wide rows (ResNet-18's
/// [32, 512, 3, 3]) 0.9 / 1.1 ms against 2.8 / 1.8 ms, 6-wide 1.2 / 1.4 against 2.6 / 2.0; but
/// 10-wide (LeNet's second layer) 2.3 / 2.3 against 1.7 / 1.4, 28-wide 3.1 / 3.3 against
/// 1.3 / 1.5.
const SHORT_ROW: usize = 8;

/// How [`im2col`] and [`col2im`] walk the windows: by output row, one slice copy (or fill)
/// per row and tap; or, for rows shorter than [`SHORT_ROW`] (ResNet's late 6-, 3- and 7-wide
/// layers), through a table of the input element that each element of an unrolled row reads,
/// built once per kernel call, where a copy call per row of a few elements costs more than
/// the row itself.
struct Unroll {
    /// `[kh · kw][oh · ow]`: the position in the input plane, or `h · w` for padding.
    table: Option<Vec<u32>>,
}

impl Unroll {
    fn new(g: &Geometry) -> Unroll {
        let (hw, ohw) = (g.hw(), g.ohw());
        if g.ow >= SHORT_ROW || u32::try_from(hw).is_err() {
            return Unroll { table: None };
        }
        let mut table = vec![hw as u32; g.kh * g.kw * ohw];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let tap = &mut table[(i * g.kw + j) * ohw..][..ohw];
                for oy in g.rows(i) {
                    for ox in g.cols(j) {
                        tap[oy * g.ow + ox] = (g.in_row(oy, i) * g.w + g.in_col(ox, j)) as u32;
                    }
                }
            }
        }
        Unroll { table: Some(table) }
    }
}

/// Unrolls the windows of one sample's group (`x`: `[cg, h, w]` from its start) into `col`:
/// row `(ci, i, j)` at `col[row · ld ..][.. oh·ow]` holds the input under tap `(i, j)` of
/// channel `ci` for every output position, zero where it reads padding.
fn im2col<T: Float>(g: &Geometry, u: &Unroll, x: &[T], col: &mut [T], ld: usize) {
    for row in 0..g.ck() {
        im2col_row(g, u, x, row, &mut col[row * ld..][..g.ohw()]);
    }
}

/// [`im2col`] of one sample's group on the whole pool, a share of the rows per thread: for a
/// batch of one sample, where the chunks of samples give the threads nothing to share.
fn im2col_parallel<T: Float>(g: &Geometry, u: &Unroll, x: &[T], col: &mut [T], ld: usize) {
    col[..g.ck() * ld]
        .par_chunks_mut(ld)
        .enumerate()
        .for_each(|(row, dst)| im2col_row(g, u, x, row, &mut dst[..g.ohw()]));
}

/// Row `(ci, i, j)` of [`im2col`] (`row = (ci · kh + i) · kw + j`) into `dst` (`oh·ow`).
#[inline(always)]
fn im2col_row<T: Float>(g: &Geometry, u: &Unroll, x: &[T], row: usize, dst: &mut [T]) {
    let (hw, ow, kk) = (g.hw(), g.ow, g.kh * g.kw);
    let (ci, tap) = (row / kk, row % kk);
    let xc = &x[ci * hw..][..hw];
    if let Some(table) = &u.table {
        let taps = &table[tap * g.ohw()..][..g.ohw()];
        for (d, &at) in dst.iter_mut().zip(taps) {
            *d = xc.get(at as usize).copied().unwrap_or(T::zero());
        }
        return;
    }
    let (i, j) = (tap / g.kw, tap % g.kw);
    let (rows, cols) = (g.rows(i), g.cols(j));
    let start = |oy| g.in_row(oy, i) * g.w + g.in_col(cols.start, j);
    copy_window(dst, ow, (rows.clone(), cols.clone()), xc, start, g.stride.1);
}

/// Fills `dst` (rows of `width`) from `src`: rows `rows`, columns `cols` of each take every
/// `stride`-th element of `src` from `start(row)` on; every other element is zero (padding).
#[inline(always)]
fn copy_window<T: Float>(
    dst: &mut [T],
    width: usize,
    (rows, cols): (Range<usize>, Range<usize>),
    src: &[T],
    start: impl Fn(usize) -> usize,
    stride: usize,
) {
    dst[..rows.start * width].fill(T::zero());
    dst[rows.end * width..].fill(T::zero());
    for r in rows {
        let row = &mut dst[r * width..][..width];
        row[..cols.start].fill(T::zero());
        row[cols.end..].fill(T::zero());
        if !cols.is_empty() {
            gather(&mut row[cols.clone()], &src[start(r)..], stride);
        }
    }
}

/// Folds an unrolled gradient back (the transpose of [`im2col`]): adds row `(ci, i, j)` of
/// `dcol` to the input positions its taps read, in `dx`: `[cg, h, w]` from its start.
fn col2im<T: Float>(g: &Geometry, u: &Unroll, dcol: &[T], ld: usize, dx: &mut [T]) {
    let (hw, ow) = (g.hw(), g.ow);
    if let Some(table) = &u.table {
        // The same order of additions as the row walk below: tap by tap, position by position.
        let kk = g.kh * g.kw;
        for ci in 0..g.cg() {
            let dxc = &mut dx[ci * hw..][..hw];
            for (t, taps) in table.chunks_exact(g.ohw()).enumerate() {
                let src = &dcol[(ci * kk + t) * ld..][..g.ohw()];
                for (&at, &v) in taps.iter().zip(src) {
                    if let Some(d) = dxc.get_mut(at as usize) {
                        *d += v;
                    }
                }
            }
        }
        return;
    }
    for ci in 0..g.cg() {
        let dxc = &mut dx[ci * hw..][..hw];
        for i in 0..g.kh {
            let rows = g.rows(i);
            for j in 0..g.kw {
                let cols = g.cols(j);
                if cols.is_empty() {
                    continue;
                }
                let row = (ci * g.kh + i) * g.kw + j;
                let src = &dcol[row * ld..][..g.ohw()];
                for oy in rows.clone() {
                    let start = g.in_row(oy, i) * g.w + g.in_col(cols.start, j);
                    scatter_axpy(
                        &mut dxc[start..],
                        T::one(),
                        &src[oy * ow..][cols.clone()],
                        g.stride.1,
                    );
                }
            }
        }
    }
}

/// Copies `og` rows of `ohw` elements for each of `bs` samples from `dy` (`[bs, o, ohw]`,
/// group offset `first` channels in) into `dst`: `[og, bs · ohw]`.
fn gather_group<T: Float>(g: &Geometry, dy: &[T], first: usize, bs: usize, dst: &mut [T]) {
    let (og, ohw) = (g.og(), g.ohw());
    let cols = bs * ohw;
    for s in 0..bs {
        for oc in 0..og {
            dst[oc * cols + s * ohw..][..ohw]
                .copy_from_slice(&dy[(s * g.o + first + oc) * ohw..][..ohw]);
        }
    }
}

fn forward_gemm<T: Float>(g: &Geometry, x: &[T], w: &[T], b: Option<&[T]>) -> Vec<T> {
    let plan = Plan::new(g);
    let (cg, og, ck, hw, ohw) = (g.cg(), g.og(), g.ck(), g.hw(), g.ohw());
    let unroll = Unroll::new(g);
    fill_chunks(g.n, g.o * ohw, &plan, |s0, y, par| {
        let bs = y.len() / (g.o * ohw);
        let cols = bs * ohw;
        let direct = g.pointwise() && bs == 1;
        let col_len = if direct { 0 } else { ck * cols };
        let tmp_len = if bs > 1 { og * cols } else { 0 };
        let x = &x[s0 * g.c * hw..][..bs * g.c * hw];
        T::with_scratch(col_len + tmp_len, |buf| {
            let (col, tmp) = buf.split_at_mut(col_len);
            for grp in 0..g.groups {
                let wg = &w[grp * og * ck..][..og * ck];
                let rhs: Mat<'_, T> = if direct {
                    (&x[grp * cg * hw..], hw, 1)
                } else if bs == 1 && matches!(par, Parallelism::Rayon(_)) {
                    im2col_parallel(g, &unroll, &x[grp * cg * hw..], col, cols);
                    (&*col, cols, 1)
                } else {
                    for s in 0..bs {
                        im2col(
                            g,
                            &unroll,
                            &x[(s * g.c + grp * cg) * hw..],
                            &mut col[s * ohw..],
                            cols,
                        );
                    }
                    (&*col, cols, 1)
                };
                let dst: &mut [T] = if bs == 1 {
                    &mut y[grp * og * ohw..][..og * ohw]
                } else {
                    &mut *tmp
                };
                split_rows(dst, cols, par, |rows, dst, par| {
                    if let Some(b) = b {
                        let b = &b[grp * og..][rows.clone()];
                        for (row, &b) in dst.chunks_mut(cols).zip(b) {
                            row.fill(b);
                        }
                    }
                    matmul(
                        (rows.len(), cols, ck),
                        (dst, cols, 1),
                        (&wg[rows.start * ck..], ck, 1),
                        rhs,
                        b.is_some(),
                        par,
                    );
                });
                if bs > 1 {
                    for s in 0..bs {
                        for oc in 0..og {
                            y[(s * g.o + grp * og + oc) * ohw..][..ohw]
                                .copy_from_slice(&tmp[oc * cols + s * ohw..][..ohw]);
                        }
                    }
                }
            }
        });
    })
}

fn input_grad_gemm<T: Float>(g: &Geometry, dy: &[T], w: &[T]) -> Vec<T> {
    let plan = Plan::new(g);
    let (cg, og, ck, hw, ohw) = (g.cg(), g.og(), g.ck(), g.hw(), g.ohw());
    let unroll = Unroll::new(g);
    fill_chunks(g.n, g.c * hw, &plan, |s0, dx, par| {
        let bs = dx.len() / (g.c * hw);
        let cols = bs * ohw;
        let direct = g.pointwise() && bs == 1;
        let dcol_len = if direct { 0 } else { ck * cols };
        let tmp_len = if bs > 1 { og * cols } else { 0 };
        let dy = &dy[s0 * g.o * ohw..][..bs * g.o * ohw];
        T::with_scratch(dcol_len + tmp_len, |buf| {
            let (dcol, tmp) = buf.split_at_mut(dcol_len);
            for grp in 0..g.groups {
                // Wᵀ of the group: [ck, og].
                let wt: Mat<'_, T> = (&w[grp * og * ck..][..og * ck], 1, ck);
                let rhs: Mat<'_, T> = if bs == 1 {
                    (&dy[grp * og * ohw..][..og * ohw], ohw, 1)
                } else {
                    gather_group(g, dy, grp * og, bs, tmp);
                    (&*tmp, cols, 1)
                };
                if direct {
                    let dst = &mut dx[grp * cg * hw..][..cg * hw];
                    matmul((ck, cols, og), (dst, hw, 1), wt, rhs, false, par);
                } else {
                    matmul((ck, cols, og), (&mut *dcol, cols, 1), wt, rhs, false, par);
                    for s in 0..bs {
                        col2im(
                            g,
                            &unroll,
                            &dcol[s * ohw..],
                            cols,
                            &mut dx[(s * g.c + grp * cg) * hw..],
                        );
                    }
                }
            }
        });
    })
}

fn weight_grad_gemm<T: Float>(g: &Geometry, x: &[T], dy: &[T]) -> Vec<T> {
    let (cg, og, ck, hw, ohw) = (g.cg(), g.og(), g.ck(), g.hw(), g.ohw());
    let unroll = Unroll::new(g);
    sum_over_chunks(g.n, g.o * g.ck(), &Plan::new(g), |s0, bs, dw, par| {
        let cols = bs * ohw;
        let direct = g.pointwise() && bs == 1;
        let col_len = if direct { 0 } else { ck * cols };
        let tmp_len = if bs > 1 { og * cols } else { 0 };
        let x = &x[s0 * g.c * hw..][..bs * g.c * hw];
        let dy = &dy[s0 * g.o * ohw..][..bs * g.o * ohw];
        T::with_scratch(col_len + tmp_len, |buf| {
            let (col, tmp) = buf.split_at_mut(col_len);
            for grp in 0..g.groups {
                let lhs: Mat<'_, T> = if bs == 1 {
                    (&dy[grp * og * ohw..][..og * ohw], ohw, 1)
                } else {
                    gather_group(g, dy, grp * og, bs, tmp);
                    (&*tmp, cols, 1)
                };
                // colᵀ: [cols, ck].
                let rhs: Mat<'_, T> = if direct {
                    (&x[grp * cg * hw..][..cg * hw], 1, hw)
                } else {
                    for s in 0..bs {
                        im2col(
                            g,
                            &unroll,
                            &x[(s * g.c + grp * cg) * hw..],
                            &mut col[s * ohw..],
                            cols,
                        );
                    }
                    (&*col, 1, cols)
                };
                let dst = &mut dw[grp * og * ck..][..og * ck];
                matmul((og, ck, cols), (dst, ck, 1), lhs, rhs, true, par);
            }
        });
    })
}

/// A weight gradient of `len` elements summed over the plan's chunks of `n` samples:
/// `add_chunk(s0, bs, dw, par)` adds the gradient of the `bs` samples from `s0` on to `dw`.
/// Chunks are dealt to at most `threads` workers, in runs of consecutive chunks; each worker
/// sums its chunks into a partial gradient, and the partials are added in order, so the
/// result does not depend on thread scheduling.
fn sum_over_chunks<T: Float>(
    n: usize,
    len: usize,
    plan: &Plan,
    add_chunk: impl Fn(usize, usize, &mut [T], Parallelism) + Sync,
) -> Vec<T> {
    if n == 0 {
        return zeroed(len);
    }
    let per_worker = plan.chunks.div_ceil(plan.threads);
    let workers = plan.chunks.div_ceil(per_worker);
    let par = plan.gemm_par(workers > 1);
    let partial = |worker: usize| -> Vec<T> {
        let mut dw = zeroed(len);
        for chunk in worker * per_worker..((worker + 1) * per_worker).min(plan.chunks) {
            let s0 = chunk * plan.chunk;
            add_chunk(s0, plan.chunk.min(n - s0), &mut dw, par);
        }
        dw
    };
    let mut parts: Vec<Vec<T>> = if workers > 1 {
        (0..workers).into_par_iter().map(partial).collect()
    } else {
        vec![partial(0)]
    };
    let mut dw = parts.swap_remove(0);
    for p in &parts {
        add(&mut dw, p);
    }
    dw
}

// ---- stride 1: one GEMM per kernel tap on shifted views ----
//
// With stride 1, tap `(i, j)` of output `(oy, ox)` reads element `(oy + i·dh, ox + j·dw)` of
// the zero-padded input plane. The padded planes (`hp × wp`, `len` elements) of a chunk's
// samples lie one after another, channel-major (`[c, bs, len]`), and the output is computed
// at the same pitch: output `(s, oy, ox)` is column `s·len + oy·wp + ox`. Output column `q`
// then reads column `q + i·dh·wp + j·dw` under tap `(i, j)`, so the input under one tap is a
// strided view of the padded planes, and the convolution is the sum over taps of
// `W[:, :, i, j] · view`: nothing is unrolled, and the GEMM packs its operand straight from
// the planes. The columns between real outputs (`ox ≥ ow`, and the rows between samples) are
// computed and dropped in the forward pass, and hold zeros in the output gradient, so they
// add nothing to the other gradients. This pays when the padding adds few columns.

/// The padded-plane layout of a stride-1 geometry.
#[derive(Clone, Copy, Debug)]
struct Shifts {
    /// Columns of a padded plane (its pitch).
    wp: usize,
    /// Elements of a padded plane.
    len: usize,
}

impl Shifts {
    fn new(g: &Geometry) -> Shifts {
        let wp = g.w + 2 * g.pad.1;
        Shifts {
            wp,
            len: (g.h + 2 * g.pad.0) * wp,
        }
    }

    /// Whether [`Algorithm::Shifted`] computes `g`, and beats im2col + GEMM: stride 1, one
    /// group, several taps over at least [`SHIFTED_MIN_CHANNELS`] input channels, and padded
    /// planes at most a quarter larger than the output planes. (Measured on ResNet-18's 3×3
    /// layers, batch 32: 24×24 planes, 17% more columns, run the forward and input gradient
    /// 20–25% faster than im2col; 12×12, 36% more, break even; 6×6 and 3×3 run slower.)
    fn pay(g: &Geometry) -> bool {
        let s = Shifts::new(g);
        g.stride == (1, 1)
            && g.groups == 1
            && g.kh * g.kw > 1
            && g.c >= SHIFTED_MIN_CHANNELS
            && g.ohw() > 0
            && g.oh + g.dilation.0 * (g.kh - 1) == g.h + 2 * g.pad.0
            && g.ow + g.dilation.1 * (g.kw - 1) == s.wp
            && 4 * s.len <= 5 * g.ohw()
    }

    /// How far tap `(i, j)` reads from the output column.
    fn tap(&self, g: &Geometry, i: usize, j: usize) -> usize {
        i * g.dilation.0 * self.wp + j * g.dilation.1
    }

    /// Output columns of `bs` samples: up to the last real output.
    fn span(&self, g: &Geometry, bs: usize) -> usize {
        (bs - 1) * self.len + (g.oh - 1) * self.wp + g.ow
    }

    /// Copies `x` (`[bs, c, h, w]`) into padded planes `xp` (`[c, bs, len]`).
    fn pad<T: Float>(&self, g: &Geometry, x: &[T], bs: usize, xp: &mut [T]) {
        let (top, left) = g.pad;
        for (plane, dst) in xp.chunks_mut(self.len).enumerate() {
            let (ci, s) = (plane / bs, plane % bs);
            let src = &x[(s * g.c + ci) * g.hw()..][..g.hw()];
            dst[..top * self.wp].fill(T::zero());
            dst[(top + g.h) * self.wp..].fill(T::zero());
            for (r, row) in src.chunks(g.w).enumerate() {
                let d = &mut dst[(top + r) * self.wp..][..self.wp];
                d[..left].fill(T::zero());
                d[left..left + g.w].copy_from_slice(row);
                d[left + g.w..].fill(T::zero());
            }
        }
    }

    /// Copies the inside of padded planes `xp` (`[c, bs, len]`) into `x` (`[bs, c, h, w]`),
    /// the inverse of [`Self::pad`].
    fn unpad<T: Float>(&self, g: &Geometry, xp: &[T], bs: usize, x: &mut [T]) {
        let (top, left) = g.pad;
        for (plane, src) in xp.chunks(self.len).enumerate() {
            let (ci, s) = (plane / bs, plane % bs);
            let dst = &mut x[(s * g.c + ci) * g.hw()..][..g.hw()];
            for (r, row) in dst.chunks_mut(g.w).enumerate() {
                row.copy_from_slice(&src[(top + r) * self.wp + left..][..g.w]);
            }
        }
    }

    /// Copies `y` (`[bs, rows, oh, ow]`) into `wide` (`[rows, span]`, output columns), zeros
    /// between the real outputs.
    fn widen<T: Float>(&self, g: &Geometry, y: &[T], rows: usize, bs: usize, wide: &mut [T]) {
        let span = self.span(g, bs);
        wide.fill(T::zero());
        for (r, dst) in wide.chunks_mut(span).enumerate() {
            for s in 0..bs {
                let src = &y[(s * rows + r) * g.ohw()..][..g.ohw()];
                for (oy, row) in src.chunks(g.ow).enumerate() {
                    dst[s * self.len + oy * self.wp..][..g.ow].copy_from_slice(row);
                }
            }
        }
    }

    /// Copies the real outputs of `wide` (`[rows, span]`) into `y` (`[bs, rows, oh, ow]`),
    /// the inverse of [`Self::widen`].
    fn narrow<T: Float>(&self, g: &Geometry, wide: &[T], rows: usize, bs: usize, y: &mut [T]) {
        let span = self.span(g, bs);
        for (r, src) in wide.chunks(span).enumerate() {
            for s in 0..bs {
                let dst = &mut y[(s * rows + r) * g.ohw()..][..g.ohw()];
                for (oy, row) in dst.chunks_mut(g.ow).enumerate() {
                    row.copy_from_slice(&src[s * self.len + oy * self.wp..][..g.ow]);
                }
            }
        }
    }

    /// The chunks of samples: `len` columns and a padded input and a wide output per sample.
    fn plan(&self, g: &Geometry) -> Plan {
        Plan::with(g, self.len, (g.c + g.o) * self.len)
    }

    /// Runs `f(span, planes, wide)` for a chunk of `bs` samples on this thread's scratch:
    /// `planes` for the padded input planes (`[c, bs, len]`), `wide` for the output columns
    /// (`[o, span]`).
    fn with_buffers<T: Float>(
        &self,
        g: &Geometry,
        bs: usize,
        f: impl FnOnce(usize, &mut [T], &mut [T]),
    ) {
        let span = self.span(g, bs);
        let planes = g.c * bs * self.len;
        T::with_scratch(planes + g.o * span, |buf| {
            let (planes, wide) = buf.split_at_mut(planes);
            f(span, planes, wide)
        });
    }

    /// Every kernel tap: its index `i · kw + j` in a weight's `kh · kw` block, and how far it
    /// reads from the output column ([`Self::tap`]).
    fn taps(&self, g: &Geometry) -> impl Iterator<Item = (usize, usize)> {
        let (sh, g) = (*self, *g);
        (0..g.kh).flat_map(move |i| (0..g.kw).map(move |j| (i * g.kw + j, sh.tap(&g, i, j))))
    }
}

/// Fewest input channels for [`Algorithm::Shifted`]: each tap's GEMM sums over that many.
const SHIFTED_MIN_CHANNELS: usize = 16;

fn forward_shifted<T: Float>(g: &Geometry, x: &[T], w: &[T], b: Option<&[T]>) -> Vec<T> {
    let sh = Shifts::new(g);
    let plan = sh.plan(g);
    let (c, o, kk) = (g.c, g.o, g.kh * g.kw);
    fill_chunks(g.n, o * g.ohw(), &plan, |s0, y, par| {
        let bs = y.len() / (o * g.ohw());
        let x = &x[s0 * c * g.hw()..][..bs * c * g.hw()];
        sh.with_buffers(g, bs, |span, xp, wide| {
            sh.pad(g, x, bs, xp);
            split_rows(wide, span, par, |rows, wide, par| {
                if let Some(b) = b {
                    for (row, &b) in wide.chunks_mut(span).zip(&b[rows.clone()]) {
                        row.fill(b);
                    }
                }
                for (t, shift) in sh.taps(g) {
                    matmul(
                        (rows.len(), span, c),
                        (&mut *wide, span, 1),
                        (&w[rows.start * c * kk + t..], c * kk, kk),
                        (&xp[shift..], bs * sh.len, 1),
                        b.is_some() || t > 0,
                        par,
                    );
                }
            });
            sh.narrow(g, wide, o, bs, y);
        });
    })
}

fn input_grad_shifted<T: Float>(g: &Geometry, dy: &[T], w: &[T]) -> Vec<T> {
    let sh = Shifts::new(g);
    let plan = sh.plan(g);
    let (c, o, kk) = (g.c, g.o, g.kh * g.kw);
    fill_chunks(g.n, c * g.hw(), &plan, |s0, dx, par| {
        let bs = dx.len() / (c * g.hw());
        let dy = &dy[s0 * o * g.ohw()..][..bs * o * g.ohw()];
        sh.with_buffers(g, bs, |span, dxp, wide| {
            sh.widen(g, dy, o, bs, wide);
            dxp.fill(T::zero());
            for (t, shift) in sh.taps(g) {
                // Wᵀ of the tap: [c, o].
                matmul(
                    (c, span, o),
                    (&mut dxp[shift..], bs * sh.len, 1),
                    (&w[t..], kk, c * kk),
                    (&*wide, span, 1),
                    true,
                    par,
                );
            }
            sh.unpad(g, dxp, bs, dx);
        });
    })
}

fn weight_grad_shifted<T: Float>(g: &Geometry, x: &[T], dy: &[T]) -> Vec<T> {
    let sh = Shifts::new(g);
    let (c, o, kk) = (g.c, g.o, g.kh * g.kw);
    sum_over_chunks(g.n, g.o * g.ck(), &sh.plan(g), |s0, bs, dw, par| {
        let x = &x[s0 * c * g.hw()..][..bs * c * g.hw()];
        let dy = &dy[s0 * o * g.ohw()..][..bs * o * g.ohw()];
        sh.with_buffers(g, bs, |span, xp, wide| {
            sh.pad(g, x, bs, xp);
            sh.widen(g, dy, o, bs, wide);
            for (t, shift) in sh.taps(g) {
                // dW of the tap, [o, c], += dy · viewᵀ.
                matmul(
                    (o, c, span),
                    (&mut dw[t..], c * kk, kk),
                    (&*wide, span, 1),
                    (&xp[shift..], 1, bs * sh.len),
                    true,
                    par,
                );
            }
        });
    })
}

// ---- depthwise: direct loops over polyphase planes ----
//
// A depthwise group has one input channel, so its "GEMM" would have a single row. Instead each
// input plane is padded and split by the stride into `sh · sw` phase planes,
// `phase(a, b)[u][v] = padded[u·sh + a][v·sw + b]`, of `HP × WP` elements. Tap `(i, j)` of
// output `(oy, ox)` reads `padded[oy·sh + i·dh][ox·sw + j·dw]`, which is element
// `(oy + i·dh / sh, ox + j·dw / sw)` of phase `(i·dh % sh, j·dw % sw)`. With the output laid
// out at the same pitch `WP` (columns from `ow` on are slack), every tap is then one long
// `axpy` or dot product over the whole plane, with no bounds inside the loop.

/// The polyphase layout of one geometry's planes.
#[derive(Clone, Copy, Debug)]
struct Phases {
    /// Rows and columns of one phase plane.
    hp: usize,
    wp: usize,
    /// Elements of an output plane at pitch `wp` up to its last real element:
    /// `(oh − 1) · wp + ow`.
    span: usize,
}

impl Phases {
    /// The layout of `g`'s planes; `g` must have one input channel per group (the direct
    /// algorithm's).
    fn new(g: &Geometry) -> Phases {
        assert_eq!(
            g.cg(),
            1,
            "direct convolution needs one input channel per group"
        );
        let (sh, sw) = g.stride;
        let hp = (g.h + 2 * g.pad.0).div_ceil(sh);
        let wp = (g.w + 2 * g.pad.1).div_ceil(sw);
        let span = if g.oh == 0 || g.ow == 0 {
            0
        } else {
            (g.oh - 1) * wp + g.ow
        };
        Phases { hp, wp, span }
    }

    /// Elements of all phase planes of one input plane.
    fn len(&self, g: &Geometry) -> usize {
        g.stride.0 * g.stride.1 * self.hp * self.wp
    }

    /// Where tap `(i, j)` starts in the phase planes of one input plane.
    #[inline(always)]
    fn tap(&self, g: &Geometry, i: usize, j: usize) -> usize {
        let (di, dj) = (i * g.dilation.0, j * g.dilation.1);
        let phase = (di % g.stride.0) * g.stride.1 + dj % g.stride.1;
        phase * self.hp * self.wp + (di / g.stride.0) * self.wp + dj / g.stride.1
    }

    /// For phase `(a, b)`: its rows `u` and columns `v` that hold input elements, not
    /// padding, and the input row and column of `(u, v)`.
    fn real(&self, g: &Geometry, a: usize, b: usize) -> (Range<usize>, Range<usize>) {
        (
            taps(self.hp, g.h, g.stride.0, a, g.pad.0),
            taps(self.wp, g.w, g.stride.1, b, g.pad.1),
        )
    }

    /// Splits the input plane `x` (`[h, w]`) into `phases`.
    #[inline(always)]
    fn split<T: Float>(&self, g: &Geometry, x: &[T], phases: &mut [T]) {
        split_phases(x, (g.h, g.w), g.pad, g.stride, (self.hp, self.wp), phases);
    }

    /// Writes the input-plane elements of `phases` into `dx` (`[h, w]`), the inverse of
    /// [`Self::split`].
    #[inline(always)]
    fn merge<T: Float>(&self, g: &Geometry, phases: &[T], dx: &mut [T]) {
        let (sh, sw) = g.stride;
        for a in 0..sh {
            for b in 0..sw {
                let plane = &phases[(a * sw + b) * self.hp * self.wp..][..self.hp * self.wp];
                let (rows, cols) = self.real(g, a, b);
                if cols.is_empty() {
                    continue;
                }
                for u in rows {
                    let iy = u * sh + a - g.pad.0;
                    let ix = cols.start * sw + b - g.pad.1;
                    let src = &plane[u * self.wp..][cols.clone()];
                    scatter(&mut dx[iy * g.w + ix..], src, sw);
                }
            }
        }
    }

    /// Copies the output plane `dy` (`[oh, ow]`) to pitch `wp`, slack columns zero.
    #[inline(always)]
    fn widen<T: Float>(&self, g: &Geometry, dy: &[T], wide: &mut [T]) {
        for oy in 0..g.oh {
            let row = &mut wide[oy * self.wp..];
            row[..g.ow].copy_from_slice(&dy[oy * g.ow..][..g.ow]);
            if oy + 1 < g.oh {
                row[g.ow..self.wp].fill(T::zero());
            }
        }
    }

    /// Copies the real columns of an output plane at pitch `wp` into `y` (`[oh, ow]`).
    #[inline(always)]
    fn narrow<T: Float>(&self, g: &Geometry, wide: &[T], y: &mut [T]) {
        for oy in 0..g.oh {
            y[oy * g.ow..][..g.ow].copy_from_slice(&wide[oy * self.wp..][..g.ow]);
        }
    }
}

/// Splits a plane `x` (`h × w`), zero-padded by `pad` before its rows and its columns, into
/// its `sh · sw` phase planes of `hp × wp` (`stride = (sh, sw)`): element `(u, v)` of plane
/// `(a, b)` is element `(u·sh + a, v·sw + b)` of the padded plane, zero where that is padding
/// or lies past it. Depthwise convolution's [`Phases`], and Winograd's tiles (stride 2).
#[inline(always)]
fn split_phases<T: Float>(
    x: &[T],
    (h, w): (usize, usize),
    (top, left): (usize, usize),
    (sh, sw): (usize, usize),
    (hp, wp): (usize, usize),
    phases: &mut [T],
) {
    for a in 0..sh {
        for b in 0..sw {
            let plane = &mut phases[(a * sw + b) * hp * wp..][..hp * wp];
            let (rows, cols) = (taps(hp, h, sh, a, top), taps(wp, w, sw, b, left));
            let start = |u| (u * sh + a - top) * w + cols.start * sw + b - left;
            copy_window(plane, wp, (rows.clone(), cols.clone()), x, start, sw);
        }
    }
}

fn forward_direct<T: Float>(g: &Geometry, x: &[T], w: &[T], b: Option<&[T]>) -> Vec<T> {
    let (og, hw, ohw, kk) = (g.og(), g.hw(), g.ohw(), g.kh * g.kw);
    let p = Phases::new(g);
    if ohw == 0 {
        return Vec::new();
    }
    // One task per input plane `(s, ci)`: its `og` output planes are consecutive in `y`.
    par_chunks_zeroed(g.n * g.o * ohw, og * ohw, |plane, ys| {
        let phase_len = p.len(g);
        T::with_scratch(phase_len + p.span, |buf| {
            vectorized(
                #[inline(always)]
                || {
                    let (phases, wide) = buf.split_at_mut(phase_len);
                    p.split(g, &x[plane * hw..][..hw], phases);
                    for (k, yp) in ys.chunks_mut(ohw).enumerate() {
                        let o = (plane % g.c) * og + k;
                        wide.fill(b.map_or(T::zero(), |b| b[o]));
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let src = &phases[p.tap(g, i, j)..][..p.span];
                                axpy(wide, w[o * kk + i * g.kw + j], src);
                            }
                        }
                        p.narrow(g, wide, yp);
                    }
                },
            )
        });
    })
}

fn input_grad_direct<T: Float>(g: &Geometry, dy: &[T], w: &[T]) -> Vec<T> {
    let (og, hw, ohw, kk) = (g.og(), g.hw(), g.ohw(), g.kh * g.kw);
    let p = Phases::new(g);
    if hw == 0 {
        return Vec::new();
    }
    par_chunks_zeroed(g.n * g.c * hw, hw, |plane, dxp| {
        let phase_len = p.len(g);
        T::with_scratch(phase_len + p.span, |buf| {
            vectorized(
                #[inline(always)]
                || {
                    let (phases, wide) = buf.split_at_mut(phase_len);
                    phases.fill(T::zero());
                    let (s, ci) = (plane / g.c, plane % g.c);
                    for o in ci * og..(ci + 1) * og {
                        p.widen(g, &dy[(s * g.o + o) * ohw..][..ohw], wide);
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let dst = &mut phases[p.tap(g, i, j)..][..p.span];
                                axpy(dst, w[o * kk + i * g.kw + j], wide);
                            }
                        }
                    }
                    p.merge(g, phases, dxp);
                },
            )
        });
    })
}

fn weight_grad_direct<T: Float>(g: &Geometry, x: &[T], dy: &[T]) -> Vec<T> {
    let (og, hw, ohw, kk) = (g.og(), g.hw(), g.ohw(), g.kh * g.kw);
    let p = Phases::new(g);
    let mut dw = zeroed(g.o * kk);
    // One task per input channel: the weights of its `og` outputs are consecutive.
    dw.par_chunks_mut(og * kk)
        .enumerate()
        .for_each(|(ci, dws)| {
            let phase_len = p.len(g);
            T::with_scratch(phase_len + p.span, |buf| {
                vectorized(
                    #[inline(always)]
                    || {
                        let (phases, wide) = buf.split_at_mut(phase_len);
                        for s in 0..g.n {
                            p.split(g, &x[(s * g.c + ci) * hw..][..hw], phases);
                            for (k, dwo) in dws.chunks_mut(kk).enumerate() {
                                let o = ci * og + k;
                                p.widen(g, &dy[(s * g.o + o) * ohw..][..ohw], wide);
                                for i in 0..g.kh {
                                    for j in 0..g.kw {
                                        let src = &phases[p.tap(g, i, j)..][..p.span];
                                        dwo[i * g.kw + j] += sum_zip(wide, src, |d, v| d * v);
                                    }
                                }
                            }
                        }
                    },
                )
            });
        });
    dw
}

// ---- vector helpers ----

/// `dst[t · stride] = src[t]`.
#[inline(always)]
fn scatter<T: Float>(dst: &mut [T], src: &[T], stride: usize) {
    if stride == 1 {
        dst[..src.len()].copy_from_slice(src);
    } else {
        assert!(src.is_empty() || (src.len() - 1) * stride < dst.len());
        for (d, &v) in dst.iter_mut().step_by(stride).zip(src) {
            *d = v;
        }
    }
}

/// `dst[t] += a · src[t]`.
#[inline(always)]
fn axpy<T: Float>(dst: &mut [T], a: T, src: &[T]) {
    let src = &src[..dst.len()];
    for (d, &v) in dst.iter_mut().zip(src) {
        *d += a * v;
    }
}

/// `dst[t · stride] += a · src[t]`.
#[inline(always)]
fn scatter_axpy<T: Float>(dst: &mut [T], a: T, src: &[T], stride: usize) {
    if stride == 1 {
        for (d, &v) in dst[..src.len()].iter_mut().zip(src) {
            *d += a * v;
        }
    } else {
        assert!(src.is_empty() || (src.len() - 1) * stride < dst.len());
        for (d, &v) in dst.iter_mut().step_by(stride).zip(src) {
            *d += a * v;
        }
    }
}

/// `dst += src`, elementwise.
#[inline(always)]
fn add<T: Float>(dst: &mut [T], src: &[T]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::gradcheck::random;

    /// `matmul_new` equals `matmul` into zeros, on every path of the GEMM: `k = 0` (zeros),
    /// `k ≤ 2`, matrix-vector products (`m = 1`, `n = 1`), small and blocked products, and
    /// strided, transposed operands, serial and on the pool.
    #[test]
    fn matmul_new_is_matmul_into_zeros() {
        for (m, n, k) in [
            (3, 4, 0),
            (5, 7, 2),
            (1, 9, 30),
            (9, 1, 30),
            (6, 5, 4),
            (70, 300, 129),
        ] {
            let values = |len: usize, seed| random(&[len], seed).to_vec1::<f64>().unwrap();
            let (lhs, rhs) = (values(m * k * 2, 1), values(k * n + 3, 2));
            let (a, b): (Mat<'_, f64>, Mat<'_, f64>) = ((&lhs, 1, 2 * m), (&rhs[3..], n, 1));
            for par in [Parallelism::None, Parallelism::Rayon(2)] {
                let mut want = vec![0.0; m * n];
                matmul((m, n, k), (&mut want, n, 1), a, b, false, par);
                assert_eq!(matmul_new((m, n, k), a, b, par), want, "{m}×{n}×{k}");
            }
        }
    }

    fn data(dims: &[usize], seed: u64) -> Vec<f64> {
        random(dims, seed).flatten_all().unwrap().to_vec1().unwrap()
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn taps_are_the_positions_that_read_the_input() {
        for (out, len, stride, offset, pad) in [
            (5, 5, 1, 0, 1),
            (5, 5, 1, 2, 1),
            (4, 7, 2, 0, 1),
            (3, 7, 3, 4, 1),
            (4, 4, 1, 6, 3),
            (6, 6, 1, 4, 2),
        ] {
            let r = taps(out, len, stride, offset, pad);
            let expected: Vec<usize> = (0..out)
                .filter(|p| {
                    (0..len as isize).contains(&((p * stride + offset) as isize - pad as isize))
                })
                .collect();
            assert_eq!(
                r.collect::<Vec<_>>(),
                expected,
                "{out} {len} {stride} {offset} {pad}"
            );
        }
    }

    #[test]
    fn direct_and_gemm_agree_with_one_input_channel_per_group() {
        let cfg =
            |out, k: (u64, u64), s: (u64, u64), p: (u64, u64), d: (u64, u64), groups| Conv2d {
                out,
                kernel: k,
                stride: s,
                pad: p,
                dilation: d,
                groups,
                bias: true,
            };
        for (c, x) in [
            (cfg(8, (3, 3), (1, 1), (1, 1), (1, 1), 8), [3, 8, 9, 7]),
            (cfg(8, (3, 3), (2, 2), (1, 1), (1, 1), 4), [2, 4, 9, 8]),
            (cfg(6, (5, 5), (1, 1), (2, 2), (1, 1), 1), [4, 1, 12, 10]),
            (cfg(4, (3, 2), (2, 3), (2, 0), (2, 1), 2), [2, 2, 11, 13]),
        ] {
            agrees_with_im2col(Algorithm::Direct, &c, x);
        }
    }

    #[test]
    fn shifted_taps_agree_with_im2col() {
        let cfg = |out, k: (u64, u64), p: (u64, u64), d: (u64, u64), bias| Conv2d {
            out,
            kernel: k,
            stride: (1, 1),
            pad: p,
            dilation: d,
            groups: 1,
            bias,
        };
        for (c, x) in [
            (cfg(5, (3, 3), (1, 1), (1, 1), true), [3, 4, 9, 7]),
            (cfg(3, (3, 3), (0, 0), (1, 1), false), [2, 6, 8, 8]),
            (cfg(4, (5, 3), (2, 0), (1, 1), true), [5, 3, 10, 6]),
            (cfg(6, (3, 2), (3, 1), (2, 1), true), [4, 2, 7, 9]),
            (cfg(2, (3, 3), (1, 1), (1, 1), true), [40, 3, 5, 5]),
            // one sample: the output channels are split between the threads
            (cfg(9, (3, 3), (1, 1), (1, 1), true), [1, 5, 8, 6]),
        ] {
            agrees_with_im2col(Algorithm::Shifted, &c, x);
        }
    }

    /// Asserts that `alg` computes the output and the gradients of the input and the weight
    /// of `c` on an input of dims `x` as im2col + GEMM does, in f64.
    fn agrees_with_im2col(alg: Algorithm, c: &Conv2d, x: [usize; 4]) {
        let w = [
            c.out as usize,
            x[1] / c.groups as usize,
            c.kernel.0 as usize,
            c.kernel.1 as usize,
        ];
        let g = Geometry::new(c, &x, &w).unwrap();
        let (xs, ws, bs) = (data(&x, 1), data(&w, 2), data(&[g.o], 3));
        let dy = data(&[g.n, g.o, g.oh, g.ow], 4);
        let b = c.bias.then_some(&bs[..]);
        let (a, e) = (alg, Algorithm::Gemm);
        let d = max_diff(&forward(&g, a, &xs, &ws, b), &forward(&g, e, &xs, &ws, b));
        assert!(d < 1e-13, "{alg:?} forward {c:?} {x:?}: {d}");
        let d = max_diff(&input_grad(&g, a, &dy, &ws), &input_grad(&g, e, &dy, &ws));
        assert!(d < 1e-13, "{alg:?} input gradient {c:?} {x:?}: {d}");
        let d = max_diff(&weight_grad(&g, a, &xs, &dy), &weight_grad(&g, e, &xs, &dy));
        assert!(d < 1e-12, "{alg:?} weight gradient {c:?} {x:?}: {d}");
    }

    /// Winograd's F(2×2, 3×3) equals im2col + GEMM: odd and even planes (tiles past the
    /// edge), every padding from 0 to 2 and different ones along H and W, planes smaller than
    /// a tile, one sample (the pool shares each chunk) and many (chunks in parallel).
    #[test]
    fn winograd_agrees_with_im2col() {
        let cfg = |out, p: (u64, u64), bias| Conv2d {
            out,
            kernel: (3, 3),
            stride: (1, 1),
            pad: p,
            dilation: (1, 1),
            groups: 1,
            bias,
        };
        for (c, x) in [
            (cfg(5, (1, 1), true), [3, 4, 9, 7]),
            (cfg(3, (0, 0), false), [2, 6, 8, 8]),
            (cfg(4, (2, 2), true), [2, 3, 5, 6]),
            (cfg(6, (2, 0), true), [4, 2, 7, 9]),
            (cfg(2, (0, 1), false), [2, 3, 3, 4]),
            (cfg(3, (1, 2), true), [2, 2, 1, 2]),
            (cfg(4, (1, 1), true), [70, 3, 4, 4]),
            (cfg(17, (1, 1), true), [1, 18, 12, 10]),
            (cfg(16, (1, 1), false), [5, 16, 6, 6]),
        ] {
            agrees_with_im2col(Algorithm::Winograd, &c, x);
        }
    }

    #[test]
    fn each_algorithm_is_chosen_where_it_is_fastest() {
        let cfg = |k, s, p, d| Conv2d {
            out: 64,
            kernel: (k, k),
            stride: (s, s),
            pad: (p, p),
            dilation: (d, d),
            groups: 1,
            bias: false,
        };
        let choose = |c: Conv2d, x: [usize; 4]| {
            let w = [64, x[1], c.kernel.0 as usize, c.kernel.1 as usize];
            Algorithm::choose(&Geometry::new(&c, &x, &w).unwrap())
        };
        use Algorithm::{Gemm, Shifted, Winograd};
        // ResNet-18's 3×3 layers at 96×96: Winograd where whole tiles cover the planes.
        assert_eq!(choose(cfg(3, 1, 1, 1), [32, 64, 24, 24]), Winograd);
        assert_eq!(choose(cfg(3, 1, 1, 1), [32, 64, 12, 12]), Winograd);
        assert_eq!(choose(cfg(3, 1, 1, 1), [32, 64, 6, 6]), Gemm);
        assert_eq!(choose(cfg(3, 1, 1, 1), [32, 64, 3, 3]), Gemm);
        // Shifted taps where Winograd does not apply and padding adds little.
        assert_eq!(choose(cfg(3, 1, 2, 2), [32, 64, 48, 48]), Shifted);
        assert_eq!(choose(cfg(3, 1, 2, 2), [32, 64, 12, 12]), Gemm);
        assert_eq!(choose(cfg(3, 2, 1, 1), [32, 64, 24, 24]), Gemm);
        assert_eq!(choose(cfg(3, 1, 1, 1), [32, 3, 24, 24]), Gemm);
        assert_eq!(choose(cfg(1, 1, 0, 1), [32, 64, 24, 24]), Gemm);
    }

    #[test]
    fn unrolling_by_table_and_by_row_agree() {
        let cfg = |k: (u64, u64), s: (u64, u64), p: (u64, u64), d: (u64, u64)| Conv2d {
            out: 2,
            kernel: k,
            stride: s,
            pad: p,
            dilation: d,
            groups: 1,
            bias: false,
        };
        for (c, x) in [
            (cfg((5, 5), (1, 1), (2, 2), (1, 1)), [1, 2, 9, 7]),
            (cfg((3, 3), (2, 2), (1, 1), (1, 1)), [1, 3, 7, 8]),
            (cfg((3, 2), (2, 3), (2, 0), (2, 1)), [1, 2, 11, 13]),
        ] {
            let w = [2, x[1], c.kernel.0 as usize, c.kernel.1 as usize];
            let g = Geometry::new(&c, &x, &w).unwrap();
            let (table, rows) = (Unroll::new(&g), Unroll { table: None });
            assert!(table.table.is_some());
            let len = g.ck() * g.ohw();
            let xs = data(&x, 1);
            let [mut a, mut b] = [vec![7.0; len], vec![7.0; len]];
            im2col(&g, &table, &xs, &mut a, g.ohw());
            im2col(&g, &rows, &xs, &mut b, g.ohw());
            assert_eq!(a, b, "im2col {c:?}");
            for u in [&table, &rows] {
                let mut p = vec![7.0; len];
                im2col_parallel(&g, u, &xs, &mut p, g.ohw());
                assert_eq!(p, b, "im2col on the pool {c:?}");
            }
            let dcol = data(&[len], 2);
            let [mut a, mut b] = [vec![0.5; g.c * g.hw()], vec![0.5; g.c * g.hw()]];
            col2im(&g, &table, &dcol, g.ohw(), &mut a);
            col2im(&g, &rows, &dcol, g.ohw(), &mut b);
            assert_eq!(a, b, "col2im {c:?}");
        }
    }
}

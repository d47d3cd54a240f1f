//! Pooling over `[N, C, H, W]`: max and average pooling as our own candle custom ops, and
//! adaptive average pooling from differentiable candle ops.
//!
//! Candle's own pooling (0.11) is not usable for training: its `max_pool2d` backward scales the
//! gradient of every max by `1/k²`, both backwards upsample the output gradient to the whole input
//! (so with `H % k != 0` rows that no window reads get gradient too), both pools have no backward
//! when the kernel differs from the stride, and neither supports padding or ceil mode. So [`pool2d`] is a [`CustomOp1`] (CPU, f32
//! and f64) whose backward is a second custom op computing the exact input gradient.
//!
//! Semantics are PyTorch's `nn.MaxPool2d` / `nn.AvgPool2d` (dilation 1):
//! - the output size is [`window_out`], the rule shape inference uses, ceil mode included;
//! - window `i` covers padded rows `[i·s − p, i·s − p + k)`, clipped to `[0, H)` for reading;
//! - max pooling treats padding as −∞, NaN propagates, and the gradient goes to the first
//!   maximum in row-major window order;
//! - average pooling divides by the window clipped to the padded input, `[.., min(.., H + p))`,
//!   when `count_pad` (PyTorch's `count_include_pad=True`), else by the number of real elements.
//!
//! [`activate_pool2d`] pools `f(x)` for a ReLU, ReLU6 or sigmoid `f` whose only reader the
//! pooling is (lowering pass `fuse_activation_pool`): `f` is applied to each input plane in
//! scratch and its derivative multiplied into the input gradient, so `f(x)` and its gradient
//! are never stored; the arithmetic is that of the two ops apart.

use candle_core::backend::BackendStorage;
use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType, bail,
};

use rayon::prelude::*;

use super::activation::Pointwise;
use super::kernel::{Float, elements, gather, vectorized, zeroed};
use crate::ops::conv::window_out;
use crate::ops::pool::{Pool2d, PoolKind};

/// Max or average pooling of `x: [N, C, H, W]` (CPU, f32 or f64), differentiable.
///
/// The output is `[N, C, H', W']` with `H'`, `W'` as [`Pool2d::infer`] computes them.
pub fn pool2d(x: &Tensor, cfg: &Pool2d) -> Result<Tensor> {
    pool_with(x, None, cfg)
}

/// [`pool2d`] of `f(x)`, for the activation `f` whose only reader is the pooling layer
/// (LeNet's sigmoid before average pooling, AlexNet's and VGG's ReLU before max pooling):
/// the pooling applies `f` to each element as it reads it, and its backward multiplies by
/// `f'` from the input, so `f(x)` and its gradient are never stored. The same arithmetic as
/// the two ops apart, so the same results to the bit.
pub fn activate_pool2d(x: &Tensor, f: Pointwise, cfg: &Pool2d) -> Result<Tensor> {
    pool_with(x, Some(f), cfg)
}

fn pool_with(x: &Tensor, pre: Option<Pointwise>, cfg: &Pool2d) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    Geometry::new(cfg, h, w)?;
    if !x.device().is_cpu() {
        bail!("{}: only the CPU is supported", cfg.name());
    }
    x.contiguous()?.apply_op1(PoolFwd {
        cfg: cfg.clone(),
        pre,
        keep_argmax: x.track_op(),
        argmax: Mutex::new(None),
    })
}

/// PyTorch's `adaptive_avg_pool2d`: output cell `(i, j)` is the mean of input rows
/// `[⌊i·H/h⌋, ⌈(i+1)·H/h⌉)` and columns `[⌊j·W/w⌋, ⌈(j+1)·W/w⌉)`.
///
/// The mean over a rectangle is separable, so this is `A_h · X · A_wᵀ` with two small averaging
/// matrices, built from candle matmuls (any dtype and device candle's matmul supports).
pub fn adaptive_avg_pool2d(x: &Tensor, out: (usize, usize)) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = out;
    if oh == 0 || ow == 0 || h == 0 || w == 0 {
        bail!("adaptive_avgpool: cannot pool [{h}, {w}] to [{oh}, {ow}]");
    }
    if out == (1, 1) {
        return x.mean_keepdim(3)?.mean_keepdim(2);
    }
    let ah = averaging_matrix(h, oh, x)?; // [oh, h]
    let aw = averaging_matrix(w, ow, x)?; // [ow, w]
    // Columns: [N·C·H, W] · [W, ow].
    let t = x.reshape((n * c * h, w))?.matmul(&aw.t()?)?;
    // Rows: [N·C·ow, H] · [H, oh].
    let t = t
        .reshape((n * c, h, ow))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n * c * ow, h))?
        .matmul(&ah.t()?)?;
    t.reshape((n, c, ow, oh))?.transpose(2, 3)?.contiguous()
}

/// `[out, len]`: row `i` averages the adaptive bin `[⌊i·len/out⌋, ⌈(i+1)·len/out⌉)`.
fn averaging_matrix(len: usize, out: usize, like: &Tensor) -> Result<Tensor> {
    let mut m = vec![0f64; out * len];
    for i in 0..out {
        let (lo, hi) = (i * len / out, ((i + 1) * len).div_ceil(out));
        let v = 1.0 / (hi - lo) as f64;
        m[i * len + lo..i * len + hi].fill(v);
    }
    Tensor::from_vec(m, (out, len), like.device())?.to_dtype(like.dtype())
}

/// One output row (or column) of windows: the input range it reads and the length of the window
/// clipped to the padded input (the `count_pad` divisor factor).
#[derive(Clone, Copy, Debug)]
struct Span {
    lo: usize,
    hi: usize,
    padded_len: usize,
}

/// The windows of one pooling config on one input size.
#[derive(Clone, Debug)]
struct Geometry {
    max: bool,
    count_pad: bool,
    rows: Vec<Span>,
    cols: Vec<Span>,
    /// Window, stride and padding along W.
    kw: usize,
    sw: usize,
    pw: usize,
}

impl Geometry {
    fn new(cfg: &Pool2d, h: usize, w: usize) -> Result<Self> {
        let name = cfg.name();
        let (k, s, p) = (cfg.kernel, cfg.stride, cfg.pad);
        if k.0 == 0 || k.1 == 0 || s.0 == 0 || s.1 == 0 {
            bail!("{name}: kernel {k:?} and stride {s:?} must be positive");
        }
        if 2 * p.0 > k.0 || 2 * p.1 > k.1 {
            bail!("{name}: padding {p:?} is more than half the window {k:?}");
        }
        let spans = |n: usize, k: u64, s: u64, p: u64| -> Result<Vec<Span>> {
            let Some(out) = window_out(n as u64, k, s, p, 1, cfg.ceil) else {
                bail!("{name}: window {k} (padding {p}) is larger than the input size {n}");
            };
            let (k, s, p) = (k as usize, s as usize, p as usize);
            Ok((0..out as usize)
                .map(|i| {
                    // In padded coordinates (shifted by +p) to stay unsigned.
                    let start = i * s;
                    let end = (start + k).min(n + 2 * p);
                    Span {
                        lo: start.max(p).min(n + p) - p,
                        hi: end.clamp(p, n + p) - p,
                        padded_len: end - start,
                    }
                })
                .collect())
        };
        Ok(Geometry {
            max: cfg.kind == PoolKind::Max,
            count_pad: cfg.count_pad,
            rows: spans(h, cfg.kernel.0, cfg.stride.0, cfg.pad.0)?,
            cols: spans(w, cfg.kernel.1, cfg.stride.1, cfg.pad.1)?,
            kw: cfg.kernel.1 as usize,
            sw: cfg.stride.1 as usize,
            pw: cfg.pad.1 as usize,
        })
    }

    fn out_hw(&self) -> (usize, usize) {
        (self.rows.len(), self.cols.len())
    }

    /// The average-pooling divisor of window `(r, c)`.
    fn divisor(&self, r: &Span, c: &Span) -> usize {
        if self.count_pad {
            r.padded_len * c.padded_len
        } else {
            (r.hi - r.lo) * (c.hi - c.lo)
        }
    }

    /// The divisor of every window, row-major `[oh, ow]` (zero for a window without
    /// elements, whose average is zero).
    fn divisors<T: WithDType>(&self) -> Vec<T> {
        let mut d = Vec::with_capacity(self.rows.len() * self.cols.len());
        for r in &self.rows {
            d.extend(
                self.cols
                    .iter()
                    .map(|c| T::from_f64(self.divisor(r, c) as f64)),
            );
        }
        d
    }

    /// Whether the windows along W tile the input rows: no padding, window = stride, so
    /// column `j` reads `[j·k, j·k + k)`.
    fn tiled_cols(&self) -> bool {
        self.pw == 0 && self.kw == self.sw && self.cols.iter().all(|c| c.hi - c.lo == self.kw)
    }

    /// Window reads of one call: the cost estimate that decides on threads.
    fn work(&self, planes: usize) -> usize {
        let kh = self.rows.first().map_or(0, |r| r.padded_len);
        let kw = self.cols.first().map_or(0, |c| c.padded_len);
        planes * self.rows.len() * self.cols.len() * kh * kw
    }
}

/// Below this many window reads a call runs on one thread.
const PARALLEL_WORK: usize = 1 << 18;

/// Runs `f(plane_index, out_plane, index_plane)` on every plane of `out` (`plane` elements
/// each) and, when given, of `index` (the same number of elements); in parallel on rayon's
/// pool (the threads of candle's and our other kernels, `RAYON_NUM_THREADS`) when `work` is
/// large.
fn for_each_plane<T: Send>(
    out: &mut [T],
    index: Option<&mut [u32]>,
    plane: usize,
    work: usize,
    f: impl Fn(usize, &mut [T], Option<&mut [u32]>) + Sync,
) {
    if plane == 0 || out.is_empty() {
        return;
    }
    match (index, work < PARALLEL_WORK) {
        (None, true) => out
            .chunks_mut(plane)
            .enumerate()
            .for_each(|(i, o)| f(i, o, None)),
        (None, false) => out
            .par_chunks_mut(plane)
            .enumerate()
            .for_each(|(i, o)| f(i, o, None)),
        (Some(ix), true) => out
            .chunks_mut(plane)
            .zip(ix.chunks_mut(plane))
            .enumerate()
            .for_each(|(i, (o, ix))| f(i, o, Some(ix))),
        (Some(ix), false) => out
            .par_chunks_mut(plane)
            .zip(ix.par_chunks_mut(plane))
            .enumerate()
            .for_each(|(i, (o, ix))| f(i, o, Some(ix))),
    }
}

/// `v` is NaN (without a float trait bound).
#[inline]
fn is_nan<T: PartialOrd>(v: T) -> bool {
    v.partial_cmp(&v).is_none()
}

/// Marks a window without input elements in the saved argmax.
const NO_INPUT: u32 = u32::MAX;

/// One output row of max pooling, over the input rows `r` of a plane of width `w`: the first
/// maximum of each window, PyTorch's rule: a later element wins only if strictly greater, or
/// NaN; −∞ for an empty window. `at` gets each maximum's position (`h · W + w` in the plane;
/// the window's first element when all are −∞, [`NO_INPUT`] for an empty window).
///
/// `phases` holds the plane's rows split by the stride into phase rows of `len` elements
/// ([`split_phases`]), in which window column `dk` of every output is one contiguous run: the
/// windows are updated tap by tap, in window order, with vector compares and selects (inlined
/// into the caller's [`vectorized`] pass over the plane).
#[inline(always)]
fn max_row<T: WithDType>(
    (phases, len): (&[T], usize),
    w: usize,
    r: &Span,
    g: &Geometry,
    out: &mut [T],
    at: &mut [u32],
) {
    let neg_inf = T::from_f64(f64::NEG_INFINITY);
    for ((o, a), c) in out.iter_mut().zip(at.iter_mut()).zip(&g.cols) {
        *o = neg_inf;
        *a = if r.lo == r.hi || c.lo == c.hi {
            NO_INPUT
        } else {
            (r.lo * w + c.lo) as u32
        };
    }
    let (ow, s, pad) = (out.len(), g.sw, g.pw);
    let step = s as u32;
    for h in r.lo..r.hi {
        let row = &phases[h * s * len..][..s * len];
        for dk in 0..g.kw {
            let run = &row[(dk % s) * len + dk / s..][..ow];
            // Position of output j's element at this tap: (h·w + dk − pad) + j·s; only ever
            // kept for an input element, so its wrap-around for padding is never seen.
            let mut pos = (h * w + dk).wrapping_sub(pad) as u32;
            for ((o, a), &v) in out.iter_mut().zip(at.iter_mut()).zip(run) {
                let take = v > *o || is_nan(v);
                *o = if take { v } else { *o };
                *a = if take { pos } else { *a };
                pos = pos.wrapping_add(step);
            }
        }
    }
}

/// Elements per phase row of [`split_phases`] for `ow` outputs per row: every window column
/// `dk` reads `ow` of them from offset `dk / stride`.
fn phase_len(g: &Geometry, ow: usize) -> usize {
    ow + (g.kw - 1) / g.sw + 1
}

/// Splits each row of the plane `x` (width `w`) by the stride `s` into `s` phase rows of `len`
/// elements: phase `ph` holds `x[j · s + ph − pad]` at `j`, −∞ outside the row. Once per
/// plane, where [`max_row`] reads every input row for each of the one to `kh / s + 1` output
/// rows whose windows hold it.
#[inline(always)]
fn split_phases<T: Float>(x: &[T], w: usize, g: &Geometry, len: usize, phases: &mut [T]) {
    let (s, pad) = (g.sw, g.pw);
    let neg_inf = T::from_f64(f64::NEG_INFINITY);
    for (row, split) in x.chunks_exact(w).zip(phases.chunks_exact_mut(s * len)) {
        for (ph, dst) in split.chunks_exact_mut(len).enumerate() {
            // The j with 0 ≤ j·s + ph − pad < w.
            let lo = pad.saturating_sub(ph).div_ceil(s).min(len);
            let hi = (w + pad).saturating_sub(ph).div_ceil(s).clamp(lo, len);
            dst[..lo].fill(neg_inf);
            dst[hi..].fill(neg_inf);
            if hi > lo {
                gather(&mut dst[lo..hi], &row[lo * s + ph - pad..], s);
            }
        }
    }
}

/// `dst[i] += src[i]` (inlined into a [`vectorized`] caller).
#[inline(always)]
fn add_row<T: Float>(dst: &mut [T], src: &[T]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// `sum / divisor`, or zero for a window without elements (`divisor` zero): the average of
/// a window, and each element's share of its gradient.
#[inline(always)]
fn average<T: Float>(sum: T, divisor: T) -> T {
    if divisor == T::zero() {
        T::zero()
    } else {
        sum / divisor
    }
}

/// Average pooling of one plane `x` (width `w`) into `out` (`[oh, ow]`), given the windows'
/// `divisors` (`[oh, ow]`, zero for an empty window): each output row first sums its input
/// rows into `rows` (scratch, `w` long) with vector adds, then sums each window's columns.
#[inline(always)]
fn avg_plane<T: Float>(
    x: &[T],
    w: usize,
    g: &Geometry,
    divisors: &[T],
    out: &mut [T],
    rows: &mut [T],
) {
    let ow = g.cols.len();
    let tiled = g.tiled_cols();
    for ((r, o), d) in g
        .rows
        .iter()
        .zip(out.chunks_exact_mut(ow))
        .zip(divisors.chunks_exact(ow))
    {
        rows.fill(T::zero());
        for hh in r.lo..r.hi {
            add_row(rows, &x[hh * w..][..w]);
        }
        if tiled {
            o.fill(T::zero());
            for t in 0..g.kw {
                for (o, &v) in o.iter_mut().zip(rows[t..].iter().step_by(g.kw)) {
                    *o += v;
                }
            }
        } else {
            for (o, c) in o.iter_mut().zip(&g.cols) {
                *o = rows[c.lo..c.hi].iter().fold(T::zero(), |a, &v| a + v);
            }
        }
        for (o, &d) in o.iter_mut().zip(d) {
            *o = average(*o, d);
        }
    }
}

/// The input gradient of [`avg_plane`] for one plane: each output row spreads its shares
/// `grad / divisor` over its windows' columns in `shares` (scratch, `w` long), then adds that
/// row to each of its input rows with vector adds.
#[inline(always)]
fn avg_plane_grad<T: Float>(
    grad: &[T],
    w: usize,
    g: &Geometry,
    divisors: &[T],
    gi: &mut [T],
    shares: &mut [T],
) {
    let ow = g.cols.len();
    let tiled = g.tiled_cols();
    for ((r, go), d) in g
        .rows
        .iter()
        .zip(grad.chunks_exact(ow))
        .zip(divisors.chunks_exact(ow))
    {
        shares.fill(T::zero());
        if tiled {
            for (chunk, (&v, &d)) in shares.chunks_exact_mut(g.kw).zip(go.iter().zip(d)) {
                chunk.fill(average(v, d));
            }
        } else {
            for (c, (&v, &d)) in g.cols.iter().zip(go.iter().zip(d)) {
                let s = average(v, d);
                shares[c.lo..c.hi].iter_mut().for_each(|x| *x += s);
            }
        }
        for hh in r.lo..r.hi {
            add_row(&mut gi[hh * w..][..w], shares);
        }
    }
}

/// The pooled output of `f(x)` for the contiguous `x: [n, c, h, w]` (`f` the
/// pre-activation, if any) and, for max pooling with `keep_argmax`, the position of each
/// output's maximum in its plane ([`NO_INPUT`] for an empty window), for the backward pass.
fn forward<T: Float>(
    x: &[T],
    (n, c, h, w): (usize, usize, usize, usize),
    g: &Geometry,
    pre: Option<Pointwise>,
    keep_argmax: bool,
) -> (Vec<T>, Option<Vec<u32>>) {
    let (oh, ow) = g.out_hw();
    let mut out = zeroed(n * c * oh * ow);
    let mut index = (g.max && keep_argmax).then(|| vec![NO_INPUT; out.len()]);
    let divisors = g.divisors::<T>();
    for_each_plane(
        &mut out,
        index.as_deref_mut(),
        oh * ow,
        g.work(n * c),
        |plane, o, mut ix| {
            let x = &x[plane * h * w..][..h * w];
            let activated = if pre.is_some() { h * w } else { 0 };
            let len = phase_len(g, ow);
            let rows_len = if g.max { h * g.sw * len } else { w };
            T::with_scratch(activated + rows_len, |buf| {
                let (fx, rows) = buf.split_at_mut(activated);
                // The plane's activations, in one vectorised pass into scratch.
                let x = match pre {
                    Some(f) => {
                        vectorized(
                            #[inline(always)]
                            || f.apply_into(x, fx),
                        );
                        &*fx
                    }
                    None => x,
                };
                if g.max {
                    let mut scratch = Vec::new();
                    let at = match ix.as_deref_mut() {
                        Some(ix) => ix,
                        None => {
                            scratch.resize(oh * ow, 0);
                            &mut scratch[..]
                        }
                    };
                    vectorized(
                        #[inline(always)]
                        || {
                            split_phases(x, w, g, len, rows);
                            for (i, r) in g.rows.iter().enumerate() {
                                let (o, at) = (&mut o[i * ow..][..ow], &mut at[i * ow..][..ow]);
                                max_row((rows, len), w, r, g, o, at);
                            }
                        },
                    );
                } else {
                    vectorized(
                        #[inline(always)]
                        || avg_plane(x, w, g, &divisors, o, rows),
                    )
                }
            });
        },
    );
    (out, index)
}

/// The input gradient `[n, c, h, w]` of average pooling, or of max pooling from the argmax
/// its forward pass saved, given the contiguous output gradient `grad: [n, c, oh, ow]`; with
/// a pre-activation `(f, x)`, of the pooling of `f(x)` with respect to `x`.
fn backward<T: Float>(
    grad: &[T],
    (n, c, h, w): (usize, usize, usize, usize),
    argmax: Option<&[u32]>,
    g: &Geometry,
    pre: Option<(Pointwise, &[T])>,
) -> Vec<T> {
    let (oh, ow) = g.out_hw();
    let mut out = zeroed(n * c * h * w);
    let divisors = g.divisors::<T>();
    for_each_plane(&mut out, None, h * w, g.work(n * c), |plane, gi, _| {
        let go = &grad[plane * oh * ow..][..oh * ow];
        if let Some(argmax) = argmax {
            let ix = &argmax[plane * oh * ow..][..oh * ow];
            for (&at, &d) in ix.iter().zip(go) {
                if at != NO_INPUT {
                    gi[at as usize] += d;
                }
            }
        } else {
            T::with_scratch(w, |shares| {
                vectorized(
                    #[inline(always)]
                    || avg_plane_grad(go, w, g, &divisors, gi, shares),
                )
            });
        }
        if let Some((f, x)) = pre {
            let x = &x[plane * h * w..][..h * w];
            vectorized(
                #[inline(always)]
                || f.scale_by_derivative(gi, x),
            );
        }
    });
    out
}

/// The forward op; its backward is [`PoolGrad`]. Max pooling keeps the argmax of every window
/// (when the input is tracked), so that its backward is a scatter.
struct PoolFwd {
    cfg: Pool2d,
    /// The activation applied to the input before pooling.
    pre: Option<Pointwise>,
    keep_argmax: bool,
    argmax: Mutex<Option<Arc<Vec<u32>>>>,
}

impl CustomOp1 for PoolFwd {
    fn name(&self) -> &'static str {
        "dlc-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims4()?;
        let (n, c, h, w) = dims;
        let g = Geometry::new(&self.cfg, h, w)?;
        let (out, argmax) = match s {
            CpuStorage::F32(_) => {
                let (y, ix) = forward::<f32>(elements(s, l)?, dims, &g, self.pre, self.keep_argmax);
                (CpuStorage::F32(y), ix)
            }
            CpuStorage::F64(_) => {
                let (y, ix) = forward::<f64>(elements(s, l)?, dims, &g, self.pre, self.keep_argmax);
                (CpuStorage::F64(y), ix)
            }
            _ => bail!("{}: only f32 and f64 are supported", self.cfg.name()),
        };
        *self.argmax.lock().unwrap_or_else(|e| e.into_inner()) = argmax.map(Arc::new);
        let (oh, ow) = g.out_hw();
        Ok((out, Shape::from((n, c, oh, ow))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let argmax = self
            .argmax
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if self.cfg.kind == PoolKind::Max && argmax.is_none() {
            bail!(
                "{} backward: the forward pass kept no argmax",
                self.cfg.name()
            );
        }
        let op = PoolGrad {
            cfg: self.cfg.clone(),
            pre: self.pre,
            input: arg.dims4()?,
            argmax,
        };
        Ok(Some(grad_res.contiguous()?.apply_op2_no_bwd(arg, &op)?))
    }
}

/// `(dL/dy, x) -> dL/dx` for [`PoolFwd`] (not itself differentiable): `input` is the
/// forward input's dims, `argmax` the maxima the forward pass kept (max pooling); the input
/// `x` itself is read for the derivative of the pre-activation, if any.
struct PoolGrad {
    cfg: Pool2d,
    pre: Option<Pointwise>,
    input: (usize, usize, usize, usize),
    argmax: Option<Arc<Vec<u32>>>,
}

impl CustomOp2 for PoolGrad {
    fn name(&self) -> &'static str {
        "dlc-pool2d-grad"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = self.input;
        let g = Geometry::new(&self.cfg, h, w)?;
        let (oh, ow) = g.out_hw();
        if l.dims() != [n, c, oh, ow] {
            bail!(
                "{} backward: gradient shape {:?}, expected {:?}",
                self.cfg.name(),
                l.dims(),
                [n, c, oh, ow]
            );
        }
        if xl.dims() != [n, c, h, w] {
            bail!(
                "{} backward: input shape {:?}, expected {:?}",
                self.cfg.name(),
                xl.dims(),
                [n, c, h, w]
            );
        }
        let argmax = self.argmax.as_deref().map(Vec::as_slice);
        let out = match s {
            CpuStorage::F32(_) => {
                let pre = match self.pre {
                    Some(f) => Some((f, elements::<f32>(xs, xl)?)),
                    None => None,
                };
                CpuStorage::F32(backward(elements(s, l)?, self.input, argmax, &g, pre))
            }
            CpuStorage::F64(_) => {
                let pre = match self.pre {
                    Some(f) => Some((f, elements::<f64>(xs, xl)?)),
                    None => None,
                };
                CpuStorage::F64(backward(elements(s, l)?, self.input, argmax, &g, pre))
            }
            _ => bail!(
                "{} backward: only f32 and f64 are supported, got {:?}",
                self.cfg.name(),
                s.dtype()
            ),
        };
        Ok((out, Shape::from(self.input)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Dim, Shape as IrShape};
    use crate::lower::gradcheck::{check_grads, max_abs_diff, random, random_distinct};
    use crate::ops::pool::AdaptiveAvgPool;
    use candle_core::{DType, Device, IndexOp};

    const TOL: f64 = 1e-6;

    fn cfg(kind: PoolKind, k: (u64, u64), s: (u64, u64), p: (u64, u64), ceil: bool) -> Pool2d {
        Pool2d {
            kind,
            kernel: k,
            stride: s,
            pad: p,
            ceil,
            count_pad: true,
        }
    }

    fn max(k: u64, s: u64, p: u64, ceil: bool) -> Pool2d {
        cfg(PoolKind::Max, (k, k), (s, s), (p, p), ceil)
    }

    fn avg(k: u64, s: u64, p: u64, ceil: bool, count_pad: bool) -> Pool2d {
        Pool2d {
            count_pad,
            ..cfg(PoolKind::Avg, (k, k), (s, s), (p, p), ceil)
        }
    }

    fn ir_shape(dims: &[usize]) -> IrShape {
        IrShape::new(dims.iter().map(|&d| Dim::Known(d as u64)).collect())
    }

    fn known(s: IrShape) -> Vec<usize> {
        s.0.iter().map(|d| d.known().unwrap() as usize).collect()
    }

    /// `pool2d`, asserting its output shape is what shape inference says.
    fn pool(x: &Tensor, c: &Pool2d) -> Result<Tensor> {
        let y = pool2d(x, c)?;
        assert_eq!(
            y.dims(),
            known(c.infer(&ir_shape(x.dims())).unwrap()),
            "{c:?} on {:?}",
            x.dims()
        );
        Ok(y)
    }

    /// `adaptive_avg_pool2d`, asserting its output shape is what shape inference says.
    fn adaptive(x: &Tensor, out: (usize, usize)) -> Result<Tensor> {
        let y = adaptive_avg_pool2d(x, out)?;
        let op = AdaptiveAvgPool {
            size: (out.0 as u64, out.1 as u64),
            global: false,
        };
        assert_eq!(y.dims(), known(op.infer(&ir_shape(x.dims())).unwrap()));
        Ok(y)
    }

    /// `[1, 1, h, w]` holding `scale · (0, 1, 2, …)` row-major.
    fn iota(h: usize, w: usize, scale: f64) -> Tensor {
        let v: Vec<f64> = (0..h * w).map(|i| scale * i as f64).collect();
        Tensor::from_vec(v, (1, 1, h, w), &Device::Cpu).unwrap()
    }

    fn plane(y: &Tensor) -> Vec<Vec<f64>> {
        y.i((0, 0)).unwrap().to_vec2().unwrap()
    }

    fn assert_close(a: &[Vec<f64>], b: &[Vec<f64>]) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (ra, rb) in a.iter().zip(b) {
            assert_eq!(ra.len(), rb.len(), "{a:?} vs {b:?}");
            for (x, y) in ra.iter().zip(rb) {
                assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
            }
        }
    }

    // ---- forward values, hand-checked ----

    #[test]
    fn max_and_avg_2x2() {
        let x = iota(4, 4, 1.0);
        let y = pool(&x, &max(2, 2, 0, false)).unwrap();
        assert_close(&plane(&y), &[vec![5., 7.], vec![13., 15.]]);
        let y = pool(&x, &avg(2, 2, 0, false, true)).unwrap();
        assert_close(&plane(&y), &[vec![2.5, 4.5], vec![10.5, 12.5]]);
    }

    #[test]
    fn max_padding_is_minus_infinity() {
        // k3 s2 p1 on 4×4 of 0, −1, …, −15: padding as 0 would make every output 0.
        let y = pool(&iota(4, 4, -1.0), &max(3, 2, 1, false)).unwrap();
        assert_close(&plane(&y), &[vec![0., -1.], vec![-4., -5.]]);
        let y = pool(&iota(4, 4, 1.0), &max(3, 2, 1, false)).unwrap();
        assert_close(&plane(&y), &[vec![5., 7.], vec![13., 15.]]);
    }

    #[test]
    fn avg_padding_with_and_without_count_pad() {
        // k3 s2 p1 on 4×4 of 0..16: windows rows/cols {0,1} and {1,2,3}.
        let x = iota(4, 4, 1.0);
        let y = pool(&x, &avg(3, 2, 1, false, true)).unwrap();
        assert_close(
            &plane(&y),
            &[vec![10. / 9., 24. / 9.], vec![51. / 9., 90. / 9.]],
        );
        let y = pool(&x, &avg(3, 2, 1, false, false)).unwrap();
        assert_close(&plane(&y), &[vec![2.5, 4.], vec![8.5, 10.]]);
    }

    #[test]
    fn ceil_mode() {
        // Max k3 s2 on 6×6 (v = 6h + w): ceil adds a window over rows/cols {4, 5}.
        let x = iota(6, 6, 1.0);
        assert_eq!(pool(&x, &max(3, 2, 0, false)).unwrap().dims(), [1, 1, 2, 2]);
        let y = pool(&x, &max(3, 2, 0, true)).unwrap();
        assert_close(
            &plane(&y),
            &[
                vec![14., 16., 17.],
                vec![26., 28., 29.],
                vec![32., 34., 35.],
            ],
        );
        // Avg k2 s2 ceil on 5×5 (v = 5h + w): the last windows hold 1 row/col and divide by it.
        let y = pool(&iota(5, 5, 1.0), &avg(2, 2, 0, true, true)).unwrap();
        assert_close(
            &plane(&y),
            &[
                vec![3., 5., 6.5],
                vec![13., 15., 16.5],
                vec![20.5, 22.5, 24.],
            ],
        );
    }

    #[test]
    fn ceil_mode_with_padding_clips_the_divisor_to_the_padded_input() {
        // Avg k3 s2 p1 ceil on 6×6 (v = 6h + w): 4 windows per axis (floor gives 3); the last
        // covers real row 5 and one pad row, so it counts 2 with count_pad and 1 without.
        let x = iota(6, 6, 1.0);
        let c = avg(3, 2, 1, true, true);
        assert_eq!(
            pool(
                &x,
                &Pool2d {
                    ceil: false,
                    ..c.clone()
                }
            )
            .unwrap()
            .dims()[2],
            3
        );
        let y = plane(&pool(&x, &c).unwrap());
        assert_eq!((y.len(), y[0].len()), (4, 4));
        assert!((y[3][3] - 35. / 4.).abs() < 1e-12);
        assert!((y[0][3] - 16. / 6.).abs() < 1e-12);
        assert!((y[0][0] - 14. / 9.).abs() < 1e-12);
        let y = plane(&pool(&x, &avg(3, 2, 1, true, false)).unwrap());
        assert!((y[3][3] - 35.).abs() < 1e-12);
        assert!((y[0][3] - 8.).abs() < 1e-12);
        assert!((y[0][0] - 3.5).abs() < 1e-12);
    }

    #[test]
    fn non_square_kernel_stride_and_padding() {
        // Max kernel (2,3) stride (1,2) pad (1,1) on 3×4 (v = 4h + w): rows windows
        // {0}, {0,1}, {1,2}, {2}; column windows {0,1}, {1,2,3}.
        let c = cfg(PoolKind::Max, (2, 3), (1, 2), (1, 1), false);
        let y = pool(&iota(3, 4, 1.0), &c).unwrap();
        assert_close(
            &plane(&y),
            &[vec![1., 3.], vec![5., 7.], vec![9., 11.], vec![9., 11.]],
        );
        let c = Pool2d {
            kind: PoolKind::Avg,
            count_pad: false,
            ..c
        };
        let y = pool(&iota(3, 4, 1.0), &c).unwrap();
        assert_close(
            &plane(&y),
            &[vec![0.5, 2.], vec![2.5, 4.], vec![6.5, 8.], vec![8.5, 10.]],
        );
    }

    #[test]
    fn max_and_argmax_follow_pytorchs_rule_window_by_window() {
        // Small integers make ties; −∞ rows and columns make windows with no finite element;
        // a NaN must win over everything after it.
        let (h, w) = (7, 9);
        let mut x: Vec<f64> = (0..2 * h * w).map(|i| ((i * 7) % 5) as f64).collect();
        x[..w].fill(f64::NEG_INFINITY);
        for r in 0..h {
            x[r * w + w - 1] = f64::NEG_INFINITY;
        }
        x[h * w + 3 * w + 4] = f64::NAN;
        for (k, s, p, ceil) in [
            ((3, 3), (2, 2), (1, 1), false),
            ((3, 2), (1, 3), (1, 1), true),
            ((2, 3), (2, 1), (0, 1), true),
            ((4, 4), (3, 3), (2, 2), true),
        ] {
            let c = cfg(PoolKind::Max, k, s, p, ceil);
            let g = Geometry::new(&c, h, w).unwrap();
            let (y, at) = forward::<f64>(&x, (1, 2, h, w), &g, None, true);
            let at = at.unwrap();
            let (oh, ow) = g.out_hw();
            for plane in 0..2 {
                let xp = &x[plane * h * w..][..h * w];
                for (i, r) in g.rows.iter().enumerate() {
                    for (j, cs) in g.cols.iter().enumerate() {
                        // The rule as PyTorch's CPU kernel writes it.
                        let mut best = (r.lo * w + cs.lo, f64::NEG_INFINITY);
                        for hh in r.lo..r.hi {
                            for ww in cs.lo..cs.hi {
                                let v = xp[hh * w + ww];
                                if v > best.1 || v.is_nan() {
                                    best = (hh * w + ww, v);
                                }
                            }
                        }
                        let o = plane * oh * ow + i * ow + j;
                        let what = format!("{c:?} plane {plane} ({i}, {j})");
                        assert_eq!(at[o] as usize, best.0, "{what}");
                        assert!(
                            y[o] == best.1 || (y[o].is_nan() && best.1.is_nan()),
                            "{what}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn nan_propagates_through_max() {
        let x =
            Tensor::from_vec(vec![1.0f32, f32::NAN, 3.0, 2.0], (1, 1, 2, 2), &Device::Cpu).unwrap();
        let y = pool(&x, &max(2, 2, 0, false)).unwrap();
        assert!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0].is_nan());
    }

    #[test]
    fn rejects_bad_configs() {
        let x = random(&[1, 1, 4, 4], 1);
        assert!(pool2d(&x, &max(2, 0, 0, false)).is_err());
        assert!(pool2d(&x, &max(2, 2, 2, false)).is_err());
        assert!(pool2d(&x, &max(5, 1, 0, false)).is_err());
        assert!(pool2d(&random(&[4, 4], 1), &max(2, 2, 0, false)).is_err());
        let ints = Tensor::zeros((1, 1, 4, 4), DType::U32, &Device::Cpu).unwrap();
        assert!(pool2d(&ints, &max(2, 2, 0, false)).is_err());
    }

    // ---- against candle's own pooling where it is right ----

    #[test]
    fn forward_matches_candle_without_padding() {
        for dtype in [DType::F32, DType::F64] {
            let x = random(&[2, 3, 9, 8], 5).to_dtype(dtype).unwrap();
            for (k, s) in [(2, 2), (3, 3), (3, 2), (2, 1)] {
                let ours = pool(&x, &max(k, s, 0, false)).unwrap();
                let theirs = x.max_pool2d_with_stride(k as usize, s as usize).unwrap();
                assert_eq!(max_abs_diff(&ours, &theirs), 0.0, "max k{k} s{s} {dtype:?}");
                let ours = pool(&x, &avg(k, s, 0, false, true)).unwrap();
                let theirs = x.avg_pool2d_with_stride(k as usize, s as usize).unwrap();
                assert!(
                    max_abs_diff(&ours, &theirs) < 1e-6,
                    "avg k{k} s{s} {dtype:?}"
                );
            }
        }
    }

    #[test]
    fn avg_gradient_matches_candle_where_it_is_right() {
        // Candle's average-pooling backward is right for k = s dividing the input.
        for dtype in [DType::F32, DType::F64] {
            let x = random(&[2, 3, 8, 12], 6).to_dtype(dtype).unwrap();
            let r = random(&[2, 3, 4, 6], 7).to_dtype(dtype).unwrap();
            let grad = |f: &dyn Fn(&Tensor) -> Tensor| {
                let v = candle_core::Var::from_tensor(&x).unwrap();
                let g = (f(v.as_tensor()) * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                g.get(v.as_tensor()).unwrap().clone()
            };
            let ours = grad(&|t| pool(t, &avg(2, 2, 0, false, true)).unwrap());
            let theirs = grad(&|t| t.avg_pool2d(2).unwrap());
            assert!(max_abs_diff(&ours, &theirs) < 1e-6, "{dtype:?}");
        }
    }

    #[test]
    fn untracked_input_pools_without_keeping_the_argmax() {
        let x = random_distinct(&[1, 2, 6, 6], 8);
        let tracked = candle_core::Var::from_tensor(&x).unwrap();
        let a = pool(&x, &max(3, 2, 1, false)).unwrap();
        let b = pool(tracked.as_tensor(), &max(3, 2, 1, false)).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
    }

    #[test]
    fn f32_matches_f64() {
        let x = random(&[2, 3, 11, 10], 9);
        for c in [
            max(3, 2, 1, true),
            avg(3, 2, 1, true, false),
            avg(3, 1, 1, false, true),
        ] {
            let a = pool(&x, &c).unwrap();
            let b = pool(&x.to_dtype(DType::F32).unwrap(), &c).unwrap();
            assert_eq!(b.dtype(), DType::F32);
            assert!(max_abs_diff(&a, &b) < 1e-6, "{c:?}");
        }
    }

    #[test]
    fn any_input_layout() {
        // Transposed, offset, and broadcast views pool like their contiguous copies.
        let x = random(&[2, 3, 7, 9], 2);
        let views = [
            x.transpose(2, 3).unwrap(),
            x.narrow(1, 1, 2).unwrap().narrow(3, 2, 5).unwrap(),
            x.i((.., 0..1)).unwrap().broadcast_as((2, 4, 7, 9)).unwrap(),
        ];
        for v in views {
            assert!(!v.is_contiguous());
            for c in [max(3, 2, 1, true), avg(2, 1, 1, false, false)] {
                let a = pool(&v, &c).unwrap();
                let b = pool(&v.contiguous().unwrap(), &c).unwrap();
                assert_eq!(max_abs_diff(&a, &b), 0.0);
            }
        }
    }

    #[test]
    fn large_inputs_use_threads_and_agree() {
        // Above PARALLEL_WORK: the threaded forward and backward must agree with single planes.
        let x = random(&[4, 16, 48, 48], 4);
        let r = random(&[4, 16, 24, 24], 5);
        for c in [max(3, 2, 1, false), avg(3, 2, 1, false, false)] {
            assert!(Geometry::new(&c, 48, 48).unwrap().work(64) >= PARALLEL_WORK);
            let run = |x: &Tensor, r: &Tensor| {
                let v = candle_core::Var::from_tensor(x).unwrap();
                let y = pool(v.as_tensor(), &c).unwrap();
                let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
                (y, g.get(v.as_tensor()).unwrap().clone())
            };
            let (y_all, g_all) = run(&x, &r);
            for (n, ch) in [(0, 0), (0, 15), (3, 7), (2, 9)] {
                let one = |t: &Tensor| t.i((n..n + 1, ch..ch + 1)).unwrap();
                let (y, g) = run(&one(&x), &one(&r));
                assert_eq!(max_abs_diff(&y, &one(&y_all)), 0.0);
                assert_eq!(max_abs_diff(&g, &one(&g_all)), 0.0);
            }
        }
    }

    // ---- gradients ----

    #[test]
    fn max_gradient_is_one_per_max_not_a_quarter() {
        let x = candle_core::Var::from_tensor(&random_distinct(&[1, 2, 4, 4], 3)).unwrap();
        let y = pool(x.as_tensor(), &max(2, 2, 0, false)).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap();
        // 1 at each window's max (where x equals the upsampled output), 0 elsewhere.
        let at_max = x
            .as_tensor()
            .eq(&y.upsample_nearest2d(4, 4).unwrap())
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        assert_eq!(max_abs_diff(g, &at_max), 0.0);
        assert_eq!(g.sum_all().unwrap().to_scalar::<f64>().unwrap(), 8.0);
    }

    #[test]
    fn max_gradient_ties_go_to_the_first_element() {
        let x = candle_core::Var::from_tensor(
            &Tensor::ones((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let y = pool(x.as_tensor(), &max(2, 2, 0, false)).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let g: Vec<Vec<f32>> = g
            .get(x.as_tensor())
            .unwrap()
            .i((0, 0))
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(
            g,
            [
                [1., 0., 1., 0.],
                [0., 0., 0., 0.],
                [1., 0., 1., 0.],
                [0., 0., 0., 0.]
            ]
        );
    }

    #[test]
    fn overlapping_max_windows_accumulate() {
        let x = candle_core::Var::from_tensor(&iota(3, 4, 1.0)).unwrap();
        let y = pool(x.as_tensor(), &max(3, 1, 1, false)).unwrap();
        // k3 s1 p1 on 3×4 of 0..12: 12 windows; the 4 that contain 11 (the global max) pick it.
        let g = y.sum_all().unwrap().backward().unwrap();
        let g = plane(g.get(x.as_tensor()).unwrap());
        let total: f64 = g.iter().flatten().sum();
        assert_eq!(total, 12.0);
        assert_eq!(g[2][3], 4.0); // windows (1..3, 2..4) all see 11
    }

    fn gradcheck_pool(c: Pool2d, dims: [usize; 4], seed: u64) {
        let x = match c.kind {
            PoolKind::Max => random_distinct(&dims, seed),
            PoolKind::Avg => random(&dims, seed),
        };
        check_grads(|t| pool(&t[0], &c), &[x], TOL);
    }

    /// The gradient of `Σ r · f(x)` with respect to `x`.
    fn grad_of(x: &Tensor, r: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
        let v = candle_core::Var::from_tensor(x).unwrap();
        let g = (f(v.as_tensor()) * r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        g.get(v.as_tensor()).unwrap().clone()
    }

    #[test]
    fn fused_activation_is_the_two_ops_to_the_bit() {
        use crate::lower::activation::activate;
        use crate::ops::activation::Activation;
        let configs = [
            avg(2, 2, 0, false, true),
            avg(3, 2, 1, true, false),
            max(2, 2, 0, false),
            max(3, 2, 1, false),
            max(3, 2, 0, true),
        ];
        for dtype in [DType::F32, DType::F64] {
            // Values around 0 and 6, so that ReLU and ReLU6 clip some and keep others.
            let x = ((random(&[2, 3, 9, 7], 21) * 8.0).unwrap() - 1.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            for a in [Activation::Sigmoid, Activation::Relu, Activation::Relu6] {
                let f = Pointwise::of(a).unwrap();
                for c in &configs {
                    let apart = |t: &Tensor| pool(&activate(t, a).unwrap(), c).unwrap();
                    let fused = |t: &Tensor| activate_pool2d(t, f, c).unwrap();
                    let what = format!("{a:?} {c:?} {dtype:?}");
                    assert_eq!(max_abs_diff(&fused(&x), &apart(&x)), 0.0, "forward {what}");
                    let r = random(apart(&x).dims(), 22).to_dtype(dtype).unwrap();
                    let (gf, ga) = (grad_of(&x, &r, fused), grad_of(&x, &r, apart));
                    assert_eq!(max_abs_diff(&gf, &ga), 0.0, "gradient {what}");
                }
            }
        }
    }

    #[test]
    fn grad_fused_sigmoid_avg_and_relu_max() {
        let x = random(&[2, 2, 6, 7], 23);
        let c = avg(2, 2, 0, false, true);
        check_grads(
            |t| activate_pool2d(&t[0], Pointwise::Sigmoid, &c),
            &[x],
            TOL,
        );
        let x = random_distinct(&[2, 2, 6, 7], 24);
        let c = max(3, 2, 1, false);
        check_grads(|t| activate_pool2d(&t[0], Pointwise::Relu, &c), &[x], TOL);
    }

    #[test]
    fn grad_max_k2s2() {
        gradcheck_pool(max(2, 2, 0, false), [2, 2, 6, 7], 10);
    }

    #[test]
    fn grad_max_k3s2p1_resnet_stem() {
        gradcheck_pool(max(3, 2, 1, false), [2, 2, 7, 8], 11);
    }

    #[test]
    fn grad_max_k3s2_ceil_googlenet() {
        let c = max(3, 2, 0, true);
        assert_eq!(
            pool(&random(&[1, 1, 8, 8], 0), &c).unwrap().dims(),
            [1, 1, 4, 4]
        );
        gradcheck_pool(c, [1, 3, 8, 9], 12);
    }

    #[test]
    fn grad_max_k3s1p1() {
        gradcheck_pool(max(3, 1, 1, false), [1, 2, 5, 6], 13);
    }

    #[test]
    fn grad_avg_k2s2_lenet() {
        gradcheck_pool(avg(2, 2, 0, false, true), [2, 2, 6, 7], 14);
    }

    #[test]
    fn grad_avg_k3s1p1_count_pad() {
        gradcheck_pool(avg(3, 1, 1, false, true), [1, 2, 5, 6], 15);
        gradcheck_pool(avg(3, 1, 1, false, false), [1, 2, 5, 6], 16);
    }

    #[test]
    fn grad_avg_ceil_with_padding() {
        gradcheck_pool(avg(3, 2, 1, true, true), [1, 2, 6, 7], 17);
        gradcheck_pool(avg(3, 2, 1, true, false), [1, 2, 6, 7], 18);
    }

    #[test]
    fn grad_non_square() {
        for kind in [PoolKind::Max, PoolKind::Avg] {
            for ceil in [false, true] {
                let c = cfg(kind, (2, 3), (1, 2), (1, 1), ceil);
                gradcheck_pool(c.clone(), [1, 2, 5, 8], 19);
                gradcheck_pool(
                    Pool2d {
                        count_pad: false,
                        ..c
                    },
                    [1, 2, 5, 8],
                    20,
                );
            }
        }
    }

    #[test]
    fn grad_through_a_non_contiguous_input() {
        let x = random_distinct(&[1, 2, 6, 7], 21);
        check_grads(
            |t| pool(&t[0].transpose(2, 3)?, &max(3, 2, 1, true)),
            std::slice::from_ref(&x),
            TOL,
        );
        check_grads(
            |t| pool(&t[0].transpose(2, 3)?, &avg(3, 2, 1, true, false)),
            &[x],
            TOL,
        );
    }

    #[test]
    fn grad_f32_matches_f64() {
        for c in [max(3, 2, 1, true), avg(3, 2, 1, true, false)] {
            let x64 = random_distinct(&[1, 2, 7, 7], 22);
            let grad = |x: &Tensor| {
                let v = candle_core::Var::from_tensor(x).unwrap();
                let r = random(&[1, 2, 4, 4], 23).to_dtype(x.dtype()).unwrap();
                let y = pool(v.as_tensor(), &c).unwrap();
                let g = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
                g.get(v.as_tensor()).unwrap().clone()
            };
            let a = grad(&x64);
            let b = grad(&x64.to_dtype(DType::F32).unwrap());
            assert_eq!(b.dtype(), DType::F32);
            assert!(max_abs_diff(&a, &b) < 1e-6);
        }
    }

    // ---- adaptive average pooling ----

    /// PyTorch's adaptive average pooling, written out directly.
    fn adaptive_reference(x: &Tensor, (oh, ow): (usize, usize)) -> Tensor {
        let (n, c, h, w) = x.dims4().unwrap();
        let x = x.to_dtype(DType::F64).unwrap();
        let mut out = Vec::new();
        for b in 0..n {
            for ch in 0..c {
                let p: Vec<Vec<f64>> = x.i((b, ch)).unwrap().to_vec2().unwrap();
                for i in 0..oh {
                    for j in 0..ow {
                        let (h0, h1) = (i * h / oh, ((i + 1) * h).div_ceil(oh));
                        let (w0, w1) = (j * w / ow, ((j + 1) * w).div_ceil(ow));
                        let sum: f64 = (h0..h1).flat_map(|r| p[r][w0..w1].iter()).sum();
                        out.push(sum / ((h1 - h0) * (w1 - w0)) as f64);
                    }
                }
            }
        }
        Tensor::from_vec(out, (n, c, oh, ow), &Device::Cpu).unwrap()
    }

    #[test]
    fn adaptive_matches_the_direct_definition() {
        for ((h, w), out) in [
            ((13, 13), (6, 6)),
            ((7, 7), (1, 1)),
            ((5, 7), (3, 2)),
            ((5, 5), (7, 7)),
            ((8, 6), (4, 3)),
            ((6, 9), (1, 4)),
        ] {
            let x = random(&[2, 3, h, w], 30);
            let y = adaptive(&x, out).unwrap();
            assert!(
                max_abs_diff(&y, &adaptive_reference(&x, out)) < 1e-12,
                "{h}×{w} -> {out:?}"
            );
            let y32 = adaptive(&x.to_dtype(DType::F32).unwrap(), out).unwrap();
            assert_eq!(y32.dtype(), DType::F32);
            assert!(max_abs_diff(&y32, &y) < 1e-6);
        }
    }

    #[test]
    fn adaptive_to_a_divisor_is_plain_average_pooling() {
        let x = random(&[2, 3, 12, 8], 31);
        let a = adaptive(&x, (4, 2)).unwrap();
        let b = pool(&x, &cfg(PoolKind::Avg, (3, 4), (3, 4), (0, 0), false)).unwrap();
        assert!(max_abs_diff(&a, &b) < 1e-12);
    }

    #[test]
    fn adaptive_non_contiguous_input() {
        let x = random(&[2, 3, 9, 13], 32);
        let v = x.transpose(2, 3).unwrap();
        let y = adaptive(&v, (6, 4)).unwrap();
        assert!(max_abs_diff(&y, &adaptive_reference(&v.contiguous().unwrap(), (6, 4))) < 1e-12);
    }

    #[test]
    fn grad_adaptive_alexnet_13_to_6() {
        check_grads(
            |t| adaptive(&t[0], (6, 6)),
            &[random(&[1, 2, 13, 13], 33)],
            TOL,
        );
    }

    #[test]
    fn grad_adaptive_global() {
        check_grads(
            |t| adaptive(&t[0], (1, 1)),
            &[random(&[2, 3, 5, 4], 34)],
            TOL,
        );
    }

    #[test]
    fn grad_adaptive_uneven_and_upsampling() {
        check_grads(
            |t| adaptive(&t[0], (3, 2)),
            &[random(&[1, 2, 5, 7], 35)],
            TOL,
        );
        check_grads(
            |t| adaptive(&t[0], (4, 5)),
            &[random(&[1, 1, 3, 4], 36)],
            TOL,
        );
    }
}

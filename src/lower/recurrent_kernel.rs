//! One `rnn`, `gru` or `lstm` layer in one direction as one custom op over the whole sequence,
//! forward and backward through time by hand (CPU, f32 and f64).
//!
//! The op takes the layer's input `[N·T, I]` (rows sample after sample), its weights as one
//! matrix `[W_ih | W_hh | b_hh | b_ih]` (`[gates·H, I + H + 2]`) and the initial state
//! `[S, N, H]` (`S = 2` for an LSTM: state then cell). It returns `[S·N, T, H]`: the state (and
//! cell) after every step, at the input's time positions (a reverse direction runs from
//! `T − 1` down to 0), so that the layer's sequence output is the op's output itself (GRU,
//! RNN) or its first `N` rows (LSTM) and the final state a slice. Gate order and formulas are
//! PyTorch's (see `recurrent.rs`); the GRU's `b_hn` stays inside `r ⊙ (W_hn h + b_hn)`.
//!
//! The forward projects the inputs of all steps in one GEMM `x W_ihᵀ` (on the whole pool),
//! then per step does one GEMM `h W_hhᵀ` and one fused pass for the biases, the gate
//! nonlinearities and the new state. The backward per step is one fused pass for the gradients
//! of the gates' pre-activations and one GEMM `dgates · W_hh` for the previous state's
//! gradient; each block of samples then computes its share of the weights' gradient on its own
//! thread, while its gates' gradients are in that core's cache (one GEMM for an LSTM or RNN,
//! two and column sums for a GRU, see `weight_grad`; the shares are added in block order),
//! and the input's gradient is computed over all steps at the end. Keeping
//! the input projection inside the op keeps its `[N·T, gates·H]` gradient out of candle's
//! backward, which would allocate, zero and add a buffer of that size for it. The forward's
//! per-step GEMM reads a transposed copy of `W_hh` in panels of `PANEL` columns (made once
//! per call), the layout in which `gemm` multiplies without repacking the weight at every
//! step. Samples are independent, so the batch is cut into one block per thread of
//! rayon's pool and each block runs all its steps alone: no synchronisation per step, and each
//! per-step GEMM single-threaded (at d2l's sizes, 16 × 1024 × 256 per step and thread; one
//! block with both threads in each GEMM measured slower).
//!
//! What the backward needs beyond the outputs (the gates after their nonlinearity: LSTM
//! `i, f, g, o, tanh c`; GRU `r, z, n` and `W_hn h + b_hn`) is kept from the forward inside the
//! op instance (one instance per forward call), in a mutex since candle hands the op to the
//! backward by shared reference. Returning it as extra output planes would make candle build
//! and add zero-padded gradients of those planes for every slice taken from the output.
//!
//! The f32 sigmoid and tanh use `kernel::exp_f32`, a polynomial `e^x` (relative error below
//! 2e-7) that the compiler vectorises, where the C library's `expf` runs one element at a
//! time; f64 uses the standard library's functions so that the f64 comparisons with PyTorch
//! hold to rounding.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType, bail,
};
use gemm::Parallelism;
use rayon::prelude::*;

use super::conv_kernel::{matmul, matmul_new};
use super::kernel::{Float, elements, exp_f32, vectorized, zeroed};
use crate::ops::sequence::Cell;

/// Runs one layer in one direction over `steps` steps: `x [N·T, I]` the input (rows
/// sample-major), `w [gates·H, I + H + 2]` the weights `[W_ih | W_hh | b_hh | b_ih]`,
/// `state0 [S, N, H]` the initial state (and cell for an LSTM, `S = 2`). Returns the state
/// (and cell) after every step, `[S·N, T, H]`, differentiable in all three inputs. CPU only,
/// f32 or f64.
pub fn recurrence(
    cell: Cell,
    x: &Tensor,
    w: &Tensor,
    state0: &Tensor,
    steps: usize,
    reverse: bool,
) -> Result<Tensor> {
    if !x.device().is_cpu() {
        bail!("{}: only the CPU is supported", cell.name());
    }
    if !matches!(x.dtype(), DType::F32 | DType::F64) {
        bail!(
            "{}: only f32 and f64 are supported, got {:?}",
            cell.name(),
            x.dtype()
        );
    }
    let (rows, i) = x.dims2()?;
    let (s, h) = (planes(cell), state0.dim(2)?);
    if steps == 0 {
        bail!("{}: the sequence has no steps", cell.name());
    }
    let (n, t) = (rows / steps, steps);
    if n == 0 || h == 0 {
        bail!("{}: empty batch or hidden size", cell.name());
    }
    let g = cell.gates() as usize * h;
    if rows % steps != 0 || w.dims() != [g, i + h + 2] || state0.dims() != [s, n, h] {
        bail!(
            "{}: input {:?} over {steps} steps, weights {:?}, initial state {:?} for hidden size {h}",
            cell.name(),
            x.dims(),
            w.dims(),
            state0.dims()
        );
    }
    let op = RecurrenceOp {
        dims: Dims {
            cell,
            reverse,
            n,
            t,
            i,
            h,
        },
        saved: Mutex::new(None),
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &state0.contiguous()?, op)
}

/// Planes of the state: 2 (state and cell) for an LSTM, else 1.
fn planes(cell: Cell) -> usize {
    if cell == Cell::Lstm { 2 } else { 1 }
}

/// The sizes of one recurrence.
#[derive(Clone, Copy, Debug)]
struct Dims {
    cell: Cell,
    reverse: bool,
    /// Batch.
    n: usize,
    /// Steps.
    t: usize,
    /// Input features.
    i: usize,
    /// Hidden size.
    h: usize,
}

impl Dims {
    /// Gate rows `gates·H`.
    fn g(&self) -> usize {
        self.cell.gates() as usize * self.h
    }

    /// Columns of the weights `[W_ih | W_hh | b_hh | b_ih]`.
    fn width(&self) -> usize {
        self.i + self.h + 2
    }

    /// Values kept per sample and step for the backward, in units of `H`.
    fn saved(&self) -> usize {
        match self.cell {
            Cell::Rnn { .. } => 0,
            Cell::Gru => 4,
            Cell::Lstm => 5,
        }
    }

    /// The time position of the `s`-th step taken.
    fn time(&self, s: usize) -> usize {
        if self.reverse { self.t - 1 - s } else { s }
    }

    /// Samples per block: the batch cut into one block per thread.
    fn block(&self) -> usize {
        self.n
            .div_ceil(rayon::current_num_threads().clamp(1, self.n))
    }
}

/// The f32/f64 element types with the gate nonlinearities.
trait Gate: Float {
    /// `1 / (1 + e^−x)`.
    fn sigmoid(self) -> Self;
    /// `tanh x`.
    fn tanh(self) -> Self;
}

impl Gate for f32 {
    #[inline(always)]
    fn sigmoid(self) -> f32 {
        1.0 / (1.0 + exp_f32(-self))
    }

    #[inline(always)]
    fn tanh(self) -> f32 {
        2.0 / (1.0 + exp_f32(-2.0 * self)) - 1.0
    }
}

impl Gate for f64 {
    #[inline(always)]
    fn sigmoid(self) -> f64 {
        1.0 / (1.0 + (-self).exp())
    }

    #[inline(always)]
    fn tanh(self) -> f64 {
        f64::tanh(self)
    }
}

/// The op of [`recurrence`]; `saved` holds the forward's gate values for the backward.
struct RecurrenceOp {
    dims: Dims,
    saved: Mutex<Option<CpuStorage>>,
}

/// `buf` cut into `count` blocks of `len` elements (the last one shorter), or `count` empty
/// slices when `buf` is empty.
fn blocks<T>(buf: &mut [T], len: usize, count: usize) -> Vec<&mut [T]> {
    if buf.is_empty() {
        (0..count).map(|_| <&mut [T]>::default()).collect()
    } else {
        buf.chunks_mut(len).collect()
    }
}

/// The GEMM parallelism over the whole pool.
fn pool() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        threads => Parallelism::Rayon(threads),
    }
}

/// A row stride of at least `len` elements that is not a multiple of 256 elements: the
/// backward's per-step GEMM reads a little of every row of the gates' gradients in turn, and
/// rows a multiple of 1 KiB apart (d2l's LSTM: `4·H = 1024` f32, 4 KiB) fall in a few sets of
/// the L1 cache, which then holds only a handful of them. (The forward's `W_hhᵀ` had the same
/// problem in one `[H, G]` matrix; measured on the LSTM row, padding it took the forward from
/// 9.1–9.5 to 7.9–8.4 ms, before it moved to [`PANEL`]-wide panels.)
fn padded_stride(len: usize) -> usize {
    if len.is_multiple_of(256) {
        len + 16
    } else {
        len
    }
}

/// Columns per panel of the forward's `W_hhᵀ`. The per-step GEMM `h W_hhᵀ` multiplies the
/// weight unpacked, reading `PANEL` consecutive elements of every row in turn: within a panel
/// those rows are adjacent, one sequential stream, where rows of the whole `[H, G]` matrix lie
/// `4·G` bytes apart and every step of `k` starts a new page. One GEMM per panel; on d2l's
/// LSTM (16 × 1024 × 256 per thread and step, one thread) 131 → 151 GFLOP/s.
const PANEL: usize = 64;

/// The forward over all steps: returns the states `[S·N, T, H]` and the saved gate values
/// `[N, T, saved·H]`.
fn forward<T: Gate>(d: Dims, x: &[T], w: &[T], state0: &[T]) -> (Vec<T>, Vec<T>) {
    let (n, tt, h, g, k, wc) = (d.n, d.t, d.h, d.g(), d.saved() * d.h, d.width());
    // The input projections of all steps, x W_ihᵀ.
    let xp = matmul_new((n * tt, g, d.i), (x, d.i, 1), (w, 1, wc), pool());
    let bias_h: Vec<T> = (0..g).map(|j| w[j * wc + d.i + h]).collect();
    let bias_x: Vec<T> = (0..g).map(|j| w[j * wc + d.i + h + 1]).collect();
    // W_hhᵀ [H, G] cut into panels of `PANEL` columns, each panel `[H, PANEL]` row-major.
    let panels = g.div_ceil(PANEL);
    let mut out = zeroed(planes(d.cell) * n * tt * h);
    let mut saved = zeroed(n * tt * k);
    // In the calling thread's scratch, which it keeps from call to call: a fresh buffer of
    // this size (over 1 MiB for d2l's LSTM) came back from the allocator as new pages that the
    // kernel zeroes, at every call.
    T::with_scratch(panels * h * PANEL, |w_t| {
        // Panel by panel on the pool, each written in order from its `PANEL` rows of `w`.
        w_t.par_chunks_mut(h * PANEL)
            .zip(w.par_chunks(PANEL * wc))
            .for_each(|(panel, rows)| {
                let width = rows.len() / wc;
                for (c, out) in panel.chunks_exact_mut(PANEL).enumerate() {
                    for (jj, v) in out[..width].iter_mut().enumerate() {
                        *v = rows[jj * wc + d.i + c];
                    }
                }
            });
        let w_t = &*w_t;
        let rows = d.block();
        let count = n.div_ceil(rows);
        let (hs, cs) = out.split_at_mut(n * tt * h);
        let hs = blocks(hs, rows * tt * h, count);
        let cs = blocks(cs, rows * tt * h, count);
        let sv = blocks(&mut saved, rows * tt * k, count);
        let jobs: Vec<_> = hs.into_iter().zip(cs).zip(sv).enumerate().collect();
        jobs.into_par_iter().for_each(|(b, ((hs, cs), sv))| {
            let (r0, m) = (b * rows, rows.min(n - b * rows));
            T::with_scratch(m * (g + 2 * h), |scratch| {
                let (gh, state) = scratch.split_at_mut(m * g);
                let (hst, cst) = state.split_at_mut(m * h);
                hst.copy_from_slice(&state0[r0 * h..][..m * h]);
                if d.cell == Cell::Lstm {
                    cst.copy_from_slice(&state0[(n + r0) * h..][..m * h]);
                }
                for s in 0..tt {
                    let t = d.time(s);
                    // gh = h W_hhᵀ, one panel of columns at a time
                    for (p, panel) in w_t.chunks_exact(h * PANEL).enumerate() {
                        let j0 = p * PANEL;
                        matmul(
                            (m, PANEL.min(g - j0), h),
                            (&mut gh[j0..], g, 1),
                            (hst, h, 1),
                            (panel, PANEL, 1),
                            false,
                            Parallelism::None,
                        );
                    }
                    for r in 0..m {
                        let x = &xp[((r0 + r) * tt + t) * g..][..g];
                        let ghr = &gh[r * g..][..g];
                        let at = (r * tt + t) * h;
                        let hrow = &mut hst[r * h..][..h];
                        let crow = &mut cst[r * h..][..h];
                        let save = &mut sv[(r * tt + t) * k..][..k];
                        vectorized(
                            #[inline(always)]
                            || {
                                step_forward(
                                    d.cell,
                                    h,
                                    x,
                                    ghr,
                                    (&bias_x, &bias_h),
                                    hrow,
                                    crow,
                                    save,
                                )
                            },
                        );
                        hs[at..][..h].copy_from_slice(hrow);
                        if d.cell == Cell::Lstm {
                            cs[at..][..h].copy_from_slice(crow);
                        }
                    }
                }
            });
        });
    });
    (out, saved)
}

/// One step of one sample: `x` the projected input, `gh` = `h W_hhᵀ` (both without bias),
/// `bias` = `(b_ih, b_hh)`, `h`/`c` the state and cell (replaced by the new ones), `save` what
/// the backward needs.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn step_forward<T: Gate>(
    cell: Cell,
    hd: usize,
    x: &[T],
    gh: &[T],
    (bx, bh): (&[T], &[T]),
    h: &mut [T],
    c: &mut [T],
    save: &mut [T],
) {
    let (h, c) = (&mut h[..hd], &mut c[..cell_len(cell, hd)]);
    match cell {
        Cell::Rnn { relu } => {
            let [x, bx, gh, bh] = [x, bx, gh, bh].map(|v| &v[..hd]);
            for j in 0..hd {
                let pre = (x[j] + bx[j]) + (gh[j] + bh[j]);
                h[j] = if relu {
                    if pre > T::zero() { pre } else { T::zero() }
                } else {
                    pre.tanh()
                };
            }
        }
        Cell::Gru => {
            let [xr, xz, xn] = runs(x, hd);
            let [bxr, bxz, bxn] = runs(bx, hd);
            let [ghr, ghz, ghn] = runs(gh, hd);
            let [bhr, bhz, bhn] = runs(bh, hd);
            let [sr, sz, sn, shn] = runs_mut(save, hd);
            for j in 0..hd {
                let r = ((xr[j] + bxr[j]) + (ghr[j] + bhr[j])).sigmoid();
                let z = ((xz[j] + bxz[j]) + (ghz[j] + bhz[j])).sigmoid();
                let hn = ghn[j] + bhn[j];
                let nn = ((xn[j] + bxn[j]) + r * hn).tanh();
                let hp = h[j];
                h[j] = nn + z * (hp - nn);
                sr[j] = r;
                sz[j] = z;
                sn[j] = nn;
                shn[j] = hn;
            }
        }
        Cell::Lstm => {
            let [xi, xf, xg, xo] = runs(x, hd);
            let [bxi, bxf, bxg, bxo] = runs(bx, hd);
            let [ghi, ghf, ghg, gho] = runs(gh, hd);
            let [bhi, bhf, bhg, bho] = runs(bh, hd);
            let [si, sf, sg, so, stc] = runs_mut(save, hd);
            for j in 0..hd {
                let i = ((xi[j] + bxi[j]) + (ghi[j] + bhi[j])).sigmoid();
                let f = ((xf[j] + bxf[j]) + (ghf[j] + bhf[j])).sigmoid();
                let gg = ((xg[j] + bxg[j]) + (ghg[j] + bhg[j])).tanh();
                let o = ((xo[j] + bxo[j]) + (gho[j] + bho[j])).sigmoid();
                let cn = f * c[j] + i * gg;
                let tc = cn.tanh();
                c[j] = cn;
                h[j] = o * tc;
                si[j] = i;
                sf[j] = f;
                sg[j] = gg;
                so[j] = o;
                stc[j] = tc;
            }
        }
    }
}

/// Elements of the cell state of one sample: `hd` for an LSTM, none for the others.
#[inline(always)]
fn cell_len(cell: Cell, hd: usize) -> usize {
    if cell == Cell::Lstm { hd } else { 0 }
}

/// `v[..K · len]` cut into `K` runs of `len` elements. Loops over `0..len` that index runs
/// (rather than `v[q · len + j]`) have no bounds checks inside, so they vectorise.
#[inline(always)]
fn runs<const K: usize, T>(v: &[T], len: usize) -> [&[T]; K] {
    let mut out = [&v[..0]; K];
    let mut rest = &v[..K * len];
    for run in &mut out {
        (*run, rest) = rest.split_at(len);
    }
    out
}

/// [`runs`] of a mutable slice.
#[inline(always)]
fn runs_mut<const K: usize, T>(v: &mut [T], len: usize) -> [&mut [T]; K] {
    let mut out: [&mut [T]; K] = [(); K].map(|()| <&mut [T]>::default());
    let mut rest = &mut v[..K * len];
    for run in &mut out {
        (*run, rest) = std::mem::take(&mut rest).split_at_mut(len);
    }
    out
}

/// The gradients of [`forward`] for `dout [S·N, T, H]`, the gradient arriving on its output
/// `out`: returns those of the input `[N·T, I]` (when `input_grad`), of the weights
/// `[gates·H, I + H + 2]` and of the initial state `[S, N, H]`.
#[allow(clippy::too_many_arguments)]
fn backward<T: Gate>(
    d: Dims,
    x: &[T],
    input_grad: bool,
    w: &[T],
    state0: &[T],
    out: &[T],
    saved: &[T],
    dout: &[T],
) -> (Option<Vec<T>>, Vec<T>, Vec<T>) {
    let (n, tt, h, g, k, wc) = (d.n, d.t, d.h, d.g(), d.saved() * d.h, d.width());
    let lstm = d.cell == Cell::Lstm;
    let plane = n * tt * h;
    // Rows of the gates' gradients, `gp` apart (see `padded_stride`): each step's GEMM reads
    // one row of every sample in its block.
    let gp = padded_stride(g);
    let mut dxp = zeroed(n * tt * gp);
    // The gradient of `h W_hhᵀ + b_hh`: the GRU's differs from `dxp` in the n gate.
    let mut dgh = if d.cell == Cell::Gru {
        zeroed(n * tt * gp)
    } else {
        Vec::new()
    };
    let mut dstate0 = vec![T::zero(); planes(d.cell) * n * h];
    let rows = d.block();
    let count = n.div_ceil(rows);
    let dx = blocks(&mut dxp, rows * tt * gp, count);
    let dg = blocks(&mut dgh, rows * tt * gp, count);
    let (dh0, dc0) = dstate0.split_at_mut(n * h);
    let dh0 = blocks(dh0, rows * h, count);
    let dc0 = blocks(dc0, rows * h, count);
    let jobs: Vec<_> = dx
        .into_iter()
        .zip(dg)
        .zip(dh0)
        .zip(dc0)
        .enumerate()
        .collect();
    let parts: Vec<Vec<T>> = jobs
        .into_par_iter()
        .map(|(b, (((dx, dg), dh0), dc0))| {
            let (r0, m) = (b * rows, rows.min(n - b * rows));
            T::with_scratch(2 * m * h, |scratch| {
                let (dh, dc) = scratch.split_at_mut(m * h);
                dh.fill(T::zero());
                dc.fill(T::zero());
                for s in (0..tt).rev() {
                    let t = d.time(s);
                    let prev = (s > 0).then(|| d.time(s - 1));
                    for r in 0..m {
                        let sample = r0 + r;
                        let at = (sample * tt + t) * h;
                        let (hp, cp) = match prev {
                            Some(tp) => {
                                let p = (sample * tt + tp) * h;
                                (
                                    &out[p..][..h],
                                    if lstm {
                                        &out[plane + p..][..h]
                                    } else {
                                        &[][..]
                                    },
                                )
                            }
                            None => (
                                &state0[sample * h..][..h],
                                if lstm {
                                    &state0[(n + sample) * h..][..h]
                                } else {
                                    &[][..]
                                },
                            ),
                        };
                        let grads = StepGrads {
                            h: &out[at..][..h],
                            hp,
                            cp,
                            dh_out: &dout[at..][..h],
                            dc_out: if lstm {
                                &dout[plane + at..][..h]
                            } else {
                                &[][..]
                            },
                            save: &saved[(sample * tt + t) * k..][..k],
                        };
                        let dxr = &mut dx[(r * tt + t) * gp..][..g];
                        let dgr: &mut [T] = if dg.is_empty() {
                            &mut []
                        } else {
                            &mut dg[(r * tt + t) * gp..][..g]
                        };
                        let dhr = &mut dh[r * h..][..h];
                        let dcr = &mut dc[r * h..][..h];
                        vectorized(
                            #[inline(always)]
                            || grads.run(d.cell, h, dxr, dgr, dhr, dcr),
                        );
                    }
                    // dh (+)= dgates · W_hh
                    let gates: &[T] = if dg.is_empty() { &*dx } else { &*dg };
                    matmul(
                        (m, h, g),
                        (dh, h, 1),
                        (&gates[t * gp..], tt * gp, 1),
                        (&w[d.i..], wc, 1),
                        d.cell == Cell::Gru,
                        Parallelism::None,
                    );
                }
                dh0.copy_from_slice(dh);
                if lstm {
                    dc0.copy_from_slice(dc);
                }
            });
            // The weights' gradient over this block's samples, on this thread, while its
            // gates' gradients are still in its cache.
            let block = Dims { n: m, ..d };
            let dg = (!dg.is_empty()).then_some(&*dg);
            weight_grad(
                block,
                &x[r0 * tt * d.i..][..m * tt * d.i],
                (&*dx, dg, gp),
                &state0[r0 * h..],
                &out[r0 * tt * h..][..m * tt * h],
            )
        })
        .collect();
    // The blocks' gradients added in order, so that the sum does not depend on scheduling.
    let mut parts = parts.into_iter();
    let mut dw = parts.next().unwrap_or_else(|| vec![T::zero(); g * wc]);
    for part in parts {
        vectorized(
            #[inline(always)]
            || {
                for (a, &b) in dw.iter_mut().zip(&part) {
                    *a += b;
                }
            },
        );
    }
    let dx = input_grad.then(|| {
        // dx = dxp W_ih
        matmul_new((n * tt, d.i, g), (&dxp, gp, 1), (w, wc, 1), pool())
    });
    (dx, dw, dstate0)
}

/// `[dW_ih | dW_hh | db_hh | db_ih]` from the gradients of `x W_ihᵀ + b_ih` and of
/// `h W_hhᵀ + b_hh` over all steps (`dxp`, `dgh`: `[N, T, gates·H]`, rows `gp` apart; no
/// `dgh` where it equals `dxp`), the input `x` and the states `hs [N, T, H]` of the `N`
/// samples of `d` (a block of the batch), on the calling thread.
///
/// Each step's pre-activations are `[x | h_prev | 1 | 1] · [W_ih | W_hh | b_hh | b_ih]ᵀ`, so
/// the rows `[x | h_prev | 1 | 1]` of all steps, `[N·T, I + H + 2]`, give the whole gradient
/// in one GEMM where both gradients are the same (LSTM, RNN): `dw = dxpᵀ · rows`, packing
/// `dxp` once. (As two GEMMs, `dW_ih` alone, `1024 × 28` for d2l's LSTM, ran at a third of
/// the speed of `dW_hh` and packed all of `dxp` again for it.) The GRU's differ in the n
/// gate: `dW_hh` and `db_hh` come from `dgh`, the rest from `dxp`.
fn weight_grad<T: Gate>(
    d: Dims,
    x: &[T],
    (dxp, dgh, gp): (&[T], Option<&[T]>, usize),
    state0: &[T],
    hs: &[T],
) -> Vec<T> {
    let (n, tt, h, g, wc, i) = (d.n, d.t, d.h, d.g(), d.width(), d.i);
    // On this thread (a block's own), as everything here: `zeroed` would share the zeroing
    // with the pool's other thread, which is busy with its own block.
    let mut rows = vec![T::zero(); n * tt * wc];
    rows.chunks_mut(tt * wc)
        .enumerate()
        .for_each(|(sample, rows)| {
            for s in 0..tt {
                let t = d.time(s);
                let prev = if s == 0 {
                    &state0[sample * h..][..h]
                } else {
                    &hs[(sample * tt + d.time(s - 1)) * h..][..h]
                };
                let (row_x, rest) = rows[t * wc..][..wc].split_at_mut(i);
                let (row_h, ones) = rest.split_at_mut(h);
                row_x.copy_from_slice(&x[(sample * tt + t) * i..][..i]);
                row_h.copy_from_slice(prev);
                ones.fill(T::one());
            }
        });
    let Some(dgh) = dgh else {
        return matmul_new(
            (g, wc, n * tt),
            (dxp, 1, gp),
            (&rows, wc, 1),
            Parallelism::None,
        );
    };
    let mut dw = zeroed(g * wc);
    // dW_hh from dgh, dW_ih from dxp, the biases' gradients their column sums.
    for (columns, grads) in [(i..i + h, dgh), (0..i, dxp)] {
        matmul(
            (g, columns.len(), n * tt),
            (&mut dw[columns.start..], wc, 1),
            (grads, 1, gp),
            (&rows[columns.start..], wc, 1),
            false,
            Parallelism::None,
        );
    }
    for (column, grads) in [(i + h, dgh), (i + h + 1, dxp)] {
        for (j, v) in column_sums(grads, g, gp).into_iter().enumerate() {
            dw[j * wc + column] = v;
        }
    }
    dw
}

/// The sums of the columns of a row-major matrix with `width` columns, rows `stride` apart.
fn column_sums<T: Gate>(m: &[T], width: usize, stride: usize) -> Vec<T> {
    let mut sums = vec![T::zero(); width];
    vectorized(
        #[inline(always)]
        || {
            for row in m.chunks(stride) {
                for (a, &v) in sums.iter_mut().zip(row) {
                    *a += v;
                }
            }
        },
    );
    sums
}

/// What one backward step of one sample reads: the new state `h`, the previous state and
/// cell `hp`/`cp`, the gradients arriving on the state and cell outputs, the saved gates.
struct StepGrads<'a, T> {
    h: &'a [T],
    hp: &'a [T],
    cp: &'a [T],
    dh_out: &'a [T],
    dc_out: &'a [T],
    save: &'a [T],
}

impl<T: Gate> StepGrads<'_, T> {
    /// Writes the gradients of the gates' pre-activations on the input side `dx` (and, GRU,
    /// on the recurrent side `dg`); `dh`/`dc` hold the gradient of the new state and cell
    /// from later steps and are replaced by the parts of the previous ones that do not go
    /// through `W_hh` (the GEMM adds the rest).
    #[inline(always)]
    fn run(&self, cell: Cell, hd: usize, dx: &mut [T], dg: &mut [T], dh: &mut [T], dc: &mut [T]) {
        let one = T::one();
        let [h, dh_out] = [self.h, self.dh_out].map(|v| &v[..hd]);
        let dh = &mut dh[..hd];
        match cell {
            Cell::Rnn { relu } => {
                let dx = &mut dx[..hd];
                for j in 0..hd {
                    let dht = dh[j] + dh_out[j];
                    let y = h[j];
                    dx[j] = if relu {
                        if y > T::zero() { dht } else { T::zero() }
                    } else {
                        dht * (one - y * y)
                    };
                }
            }
            Cell::Gru => {
                let [r, z, nn, hn] = runs(self.save, hd);
                let [dxr, dxz, dxn] = runs_mut(dx, hd);
                let [dgr, dgz, dgn] = runs_mut(dg, hd);
                let hp = &self.hp[..hd];
                for j in 0..hd {
                    let (r, z, nn, hn) = (r[j], z[j], nn[j], hn[j]);
                    let dht = dh[j] + dh_out[j];
                    let dn = dht * (one - z) * (one - nn * nn);
                    let dz = dht * (hp[j] - nn) * z * (one - z);
                    let dr = dn * hn * r * (one - r);
                    dxr[j] = dr;
                    dxz[j] = dz;
                    dxn[j] = dn;
                    dgr[j] = dr;
                    dgz[j] = dz;
                    dgn[j] = dn * r;
                    dh[j] = dht * z;
                }
            }
            Cell::Lstm => {
                let [i, f, gg, o, tc] = runs(self.save, hd);
                let [dxi, dxf, dxg, dxo] = runs_mut(dx, hd);
                let [cp, dc_out] = [self.cp, self.dc_out].map(|v| &v[..hd]);
                let dc = &mut dc[..hd];
                for j in 0..hd {
                    let (i, f, gg, o, tc) = (i[j], f[j], gg[j], o[j], tc[j]);
                    let dht = dh[j] + dh_out[j];
                    let dct = dc[j] + dc_out[j] + dht * o * (one - tc * tc);
                    dxi[j] = dct * gg * i * (one - i);
                    dxf[j] = dct * cp[j] * f * (one - f);
                    dxg[j] = dct * i * (one - gg * gg);
                    dxo[j] = dht * tc * o * (one - o);
                    dc[j] = dct * f;
                }
            }
        }
    }
}

/// Runs `$body` with `$t` bound to the element type of `$dtype` (f32 or f64).
macro_rules! by_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            other => bail!("recurrence: only f32 and f64 are supported, got {other:?}"),
        }
    };
}

/// The CPU storage inside a storage.
fn cpu(s: &Storage) -> Result<&CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => bail!("recurrence: only the CPU is supported"),
    }
}

impl CustomOp3 for RecurrenceOp {
    fn name(&self) -> &'static str {
        "dlc-recurrence"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims;
        let (out, saved) = by_dtype!(s1.dtype(), E => {
            let (out, saved) = forward::<E>(d, elements(s1, l1)?, elements(s2, l2)?, elements(s3, l3)?);
            (E::to_cpu_storage_owned(out), E::to_cpu_storage_owned(saved))
        });
        *self.saved.lock().expect("recurrence: poisoned") = Some(saved);
        Ok((out, Shape::from((planes(d.cell) * d.n, d.t, d.h))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        state0: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims;
        let grad = grad.contiguous()?;
        let saved = self.saved.lock().expect("recurrence: poisoned");
        let Some(saved) = saved.as_ref() else {
            bail!("recurrence: backward before forward")
        };
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (ss, sl) = state0.storage_and_layout();
        let (os, ol) = res.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (xs, ws, ss, os, gs) = (cpu(&xs)?, cpu(&ws)?, cpu(&ss)?, cpu(&os)?, cpu(&gs)?);
        let dev = x.device();
        by_dtype!(x.dtype(), E => {
            let (dx, dw, ds0) = backward::<E>(
                d,
                elements(xs, xl)?,
                x.track_op(),
                elements(ws, wl)?,
                elements(ss, sl)?,
                elements(os, ol)?,
                E::cpu_storage_as_slice(saved)?,
                elements(gs, gl)?,
            );
            Ok((
                dx.map(|dx| Tensor::from_vec(dx, x.shape(), dev)).transpose()?,
                Some(Tensor::from_vec(dw, w.shape(), dev)?),
                Some(Tensor::from_vec(ds0, state0.shape(), dev)?),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::gradcheck::{check_grads, random};

    /// Checks the gradients of every input for every cell, both directions, with the loss on
    /// every output element (so gradients arrive on the final state and cell as well as on
    /// the sequence). `N = 3`, `T = 4`, `I = 2`, `H = 3`.
    #[test]
    fn gradients_match_finite_differences() {
        let (n, t, h, features) = (3, 4, 3, 2);
        for cell in [
            Cell::Rnn { relu: false },
            Cell::Rnn { relu: true },
            Cell::Gru,
            Cell::Lstm,
        ] {
            let g = cell.gates() as usize * h;
            for reverse in [false, true] {
                let inputs = [
                    random(&[n * t, features], 1),
                    random(&[g, features + h + 2], 2),
                    random(&[planes(cell), n, h], 3),
                ];
                check_grads(
                    |x| recurrence(cell, &x[0], &x[1], &x[2], t, reverse),
                    &inputs,
                    1e-6,
                );
            }
        }
    }

    #[test]
    fn gate_nonlinearities_are_accurate() {
        // f32 on `kernel::exp_f32` (which has its own test); f64 on the standard library.
        for x in [-100.0f32, -30.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 30.0, 100.0] {
            assert!((Gate::tanh(x) - x.tanh()).abs() < 2e-7, "tanh {x}");
            assert!(
                (Gate::sigmoid(x) - 1.0 / (1.0 + (-x).exp())).abs() < 2e-7,
                "sigmoid {x}"
            );
        }
        assert!(Gate::sigmoid(f32::NAN).is_nan() && Gate::tanh(f32::NAN).is_nan());
    }
}

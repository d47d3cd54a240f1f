//! CPU kernels of training-mode batch normalisation on contiguous `[N, C, S]` data (`S` is
//! the product of the dims after the channel axis), f32 and f64.
//!
//! Each step is one or two passes over the data, parallel over channels (reductions) or over
//! `[S]` rows (elementwise), with the per-channel numbers in f64:
//! - statistics: the mean, then the biased variance around it (two passes, as exact as the
//!   composed version);
//! - forward: `y = (x − mean) · (w · inv_std) + b`, optionally followed by a ReLU or ReLU6
//!   (fused: the backward passes below then mask `dy` by the output on the fly);
//! - backward sums: `Σ dy` and `Σ dy · (x − mean)` per channel, which give the bias and weight
//!   gradients;
//! - input gradient: `dx = a · dy + b · (x − mean) + d` with per-channel coefficients made from
//!   those sums (see [`input_grad_coefficients`]).

use rayon::prelude::*;

use super::activation::Clamp;
use super::kernel::{Float, par_chunks_zeroed, sum, sum_zip, vectorized, zeroed};

/// The extent of one batch-norm call: `n` samples, `c` channels, `s` elements per channel and
/// sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    /// Batch size.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Elements per channel and sample.
    pub s: usize,
}

impl Extent {
    /// The extent of a tensor of `dims` (`[N, C, ...]`); `None` below rank 2.
    pub fn of(dims: &[usize]) -> Option<Self> {
        match dims {
            [n, c, rest @ ..] => Some(Extent {
                n: *n,
                c: *c,
                s: rest.iter().product(),
            }),
            _ => None,
        }
    }

    /// Elements per channel over the batch.
    pub fn count(&self) -> usize {
        self.n * self.s
    }

    fn len(&self) -> usize {
        self.n * self.c * self.s
    }

    /// Row `(i, ch)` of `data`: the `s` elements of channel `ch` in sample `i`.
    fn row<'a, T>(&self, data: &'a [T], i: usize, ch: usize) -> &'a [T] {
        &data[(i * self.c + ch) * self.s..][..self.s]
    }
}

/// Per-channel numbers (`[c]`, f64).
pub(crate) type PerChannel = Vec<f64>;

/// The batch mean and biased variance of every channel.
pub(crate) fn stats<T: Float>(e: &Extent, x: &[T]) -> (PerChannel, PerChannel) {
    assert_eq!(x.len(), e.len(), "batch norm: input has the wrong size");
    let count = e.count().max(1) as f64;
    (0..e.c)
        .into_par_iter()
        .map(|ch| {
            vectorized(
                #[inline(always)]
                || {
                    // Plain loops, not `map(..).sum()`: the closures of iterator adapters
                    // are compiled in the adapters' own instances, without the vector
                    // instructions `vectorized` enables (see `grad_sums`).
                    let mut total = 0.0;
                    for i in 0..e.n {
                        total += sum(e.row(x, i, ch)).to_f64();
                    }
                    let mean = total / count;
                    let m = T::from_f64(mean);
                    let mut squares = 0.0;
                    for i in 0..e.n {
                        let r = e.row(x, i, ch);
                        squares += sum_zip(r, r, |v, _| (v - m) * (v - m)).to_f64();
                    }
                    (mean, squares / count)
                },
            )
        })
        .unzip()
}

/// `y = (x − mean) · scale + shift` per channel, then `clamp` if given (NaN stays NaN).
pub(crate) fn normalize<T: Float>(
    e: &Extent,
    x: &[T],
    mean: &[f64],
    (scale, shift): (&[f64], &[f64]),
    clamp: Option<Clamp>,
) -> Vec<T> {
    assert_eq!(x.len(), e.len(), "batch norm: input has the wrong size");
    if e.s == 0 {
        return Vec::new();
    }
    par_chunks_zeroed(e.len(), e.s, |r, yr| {
        vectorized(
            #[inline(always)]
            || {
                let ch = r % e.c;
                let (m, a, b) = (
                    T::from_f64(mean[ch]),
                    T::from_f64(scale[ch]),
                    T::from_f64(shift[ch]),
                );
                let xr = &x[r * e.s..][..e.s];
                match clamp {
                    Some(c) => {
                        let c = c.of_type::<T>();
                        for (y, &v) in yr.iter_mut().zip(xr) {
                            *y = c.apply((v - m) * a + b);
                        }
                    }
                    None => {
                        for (y, &v) in yr.iter_mut().zip(xr) {
                            *y = (v - m) * a + b;
                        }
                    }
                }
            },
        )
    })
}

/// Per channel, `Σ dy` and `Σ dy · (x − mean)`.
///
/// With `clamped`, the output of a fused clamp and the clamp, `dy` is first taken through the
/// clamp's backward (zeroed where the output is clipped).
pub(crate) fn grad_sums<T: Float>(
    e: &Extent,
    x: &[T],
    dy: &[T],
    clamped: Option<(&[T], Clamp)>,
    mean: &[f64],
) -> (PerChannel, PerChannel) {
    assert_eq!(x.len(), e.len(), "batch norm: input has the wrong size");
    assert_eq!(dy.len(), e.len(), "batch norm: gradient has the wrong size");
    (0..e.c)
        .into_par_iter()
        .map(|ch| {
            T::with_scratch(if clamped.is_some() { e.s } else { 0 }, |masked| {
                vectorized(
                    #[inline(always)]
                    || {
                        let m = T::from_f64(mean[ch]);
                        // A plain loop, not `fold`: a closure passed to `fold` is compiled
                        // in `fold`'s own instance, without the vector instructions
                        // `vectorized` enables (perf: SSE code, 2% of a ResNet-18 step).
                        let (mut sdy, mut sdyx) = (0.0, 0.0);
                        for i in 0..e.n {
                            let (xr, mut dr) = (e.row(x, i, ch), e.row(dy, i, ch));
                            if let Some((y, c)) = clamped {
                                let c = c.of_type::<T>();
                                for ((t, &d), &y) in masked.iter_mut().zip(dr).zip(e.row(y, i, ch))
                                {
                                    *t = c.grad(d, y);
                                }
                                dr = masked;
                            }
                            sdy += sum(dr).to_f64();
                            sdyx += sum_zip(dr, xr, |d, v| d * (v - m)).to_f64();
                        }
                        (sdy, sdyx)
                    },
                )
            })
        })
        .unzip()
}

/// The coefficients `(a, b, d)` of `dx = a · dy + b · (x − mean) + d`, per channel, from the
/// weight, the inverse standard deviation, `Σ dy` and `Σ dy · x̂` over the `count` elements of
/// a channel: `dx = w · inv_std · (dy − Σdy / M − x̂ · Σ(dy · x̂) / M)` with
/// `x̂ = (x − mean) · inv_std`.
pub(crate) fn input_grad_coefficients(
    count: usize,
    weight: &[f64],
    inv_std: &[f64],
    sum_dy: &[f64],
    sum_dy_xhat: &[f64],
) -> (PerChannel, PerChannel, PerChannel) {
    let m = count.max(1) as f64;
    let mut coef = (Vec::new(), Vec::new(), Vec::new());
    for ch in 0..weight.len() {
        let a = weight[ch] * inv_std[ch];
        coef.0.push(a);
        coef.1.push(-a * inv_std[ch] * sum_dy_xhat[ch] / m);
        coef.2.push(-a * sum_dy[ch] / m);
    }
    coef
}

/// `dx = a · dy + b · (x − mean) + d` per channel, `dy` through the clamp as in
/// [`grad_sums`].
pub(crate) fn input_grad<T: Float>(
    e: &Extent,
    x: &[T],
    dy: &[T],
    clamped: Option<(&[T], Clamp)>,
    mean: &[f64],
    (a, b, d): (&[f64], &[f64], &[f64]),
) -> Vec<T> {
    assert_eq!(x.len(), e.len(), "batch norm: input has the wrong size");
    assert_eq!(dy.len(), e.len(), "batch norm: gradient has the wrong size");
    if e.s == 0 {
        return Vec::new();
    }
    par_chunks_zeroed(e.len(), e.s, |r, dxr| {
        vectorized(
            #[inline(always)]
            || {
                let ch = r % e.c;
                let (m, a, b, d) = (
                    T::from_f64(mean[ch]),
                    T::from_f64(a[ch]),
                    T::from_f64(b[ch]),
                    T::from_f64(d[ch]),
                );
                let (xr, dr) = (&x[r * e.s..][..e.s], &dy[r * e.s..][..e.s]);
                match clamped {
                    Some((y, c)) => {
                        let (yr, c) = (&y[r * e.s..][..e.s], c.of_type::<T>());
                        for (((g, &v), &u), &y) in dxr.iter_mut().zip(xr).zip(dr).zip(yr) {
                            *g = a * c.grad(u, y) + b * (v - m) + d;
                        }
                    }
                    None => {
                        for ((g, &v), &u) in dxr.iter_mut().zip(xr).zip(dr) {
                            *g = a * u + b * (v - m) + d;
                        }
                    }
                }
            },
        )
    })
}

/// Layer norm over contiguous rows of `d` elements (the last axis): `y = x̂ · w + b` with
/// `x̂ = (x − mean) · rstd` per row, `rstd = 1 / √(var + eps)` of the row's biased variance.
/// Returns `y` and each row's `(mean, rstd)` in f64. Parallel over blocks of rows; each row is
/// read twice while it is in cache (mean, then the variance around it).
pub(crate) fn layer_norm<T: Float>(
    x: &[T],
    d: usize,
    (w, b): (&[T], &[T]),
    eps: f64,
) -> (Vec<T>, Vec<(f64, f64)>) {
    assert!(
        d > 0 && x.len().is_multiple_of(d),
        "layer norm: rows of {d}"
    );
    assert!(
        w.len() == d && b.len() == d,
        "layer norm: weight and bias of {d}"
    );
    let rows = x.len() / d;
    let mut y = zeroed(x.len());
    let mut stats = vec![(0.0, 0.0); rows];
    let block = rows_per_block(d);
    y.par_chunks_mut(block * d)
        .zip(stats.par_chunks_mut(block))
        .zip(x.par_chunks(block * d))
        .for_each(|((yb, sb), xb)| {
            vectorized(
                #[inline(always)]
                || {
                    for ((yr, s), xr) in yb.chunks_mut(d).zip(sb.iter_mut()).zip(xb.chunks(d)) {
                        let mean = sum(xr).to_f64() / d as f64;
                        let m = T::from_f64(mean);
                        let var = sum_zip(xr, xr, |v, _| (v - m) * (v - m)).to_f64() / d as f64;
                        let rstd = 1.0 / (var + eps).sqrt();
                        let r = T::from_f64(rstd);
                        for (((y, &v), &w), &b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                            *y = (v - m) * r * w + b;
                        }
                        *s = (mean, rstd);
                    }
                },
            )
        });
    (y, stats)
}

/// The backward pass of [`layer_norm`] in one read of `x` and `dy`: the input gradient
/// `dx = rstd · (g − mean(g) − x̂ · mean(g · x̂))` with `g = dy · w`, and the weight and bias
/// gradients `Σ dy · x̂` and `Σ dy` over the rows (in f64; per block of rows, then summed in
/// block order, so the result does not depend on the thread count).
pub(crate) fn layer_norm_backward<T: Float>(
    x: &[T],
    dy: &[T],
    d: usize,
    w: &[T],
    stats: &[(f64, f64)],
) -> (Vec<T>, PerChannel, PerChannel) {
    assert_eq!(
        x.len(),
        dy.len(),
        "layer norm backward: gradient of the wrong size"
    );
    assert_eq!(
        x.len(),
        stats.len() * d,
        "layer norm backward: statistics per row"
    );
    let mut dx = zeroed(x.len());
    let block = rows_per_block(d);
    let partial: Vec<(Vec<f64>, Vec<f64>)> = dx
        .par_chunks_mut(block * d)
        .zip(x.par_chunks(block * d))
        .zip(dy.par_chunks(block * d))
        .zip(stats.par_chunks(block))
        .map(|(((dxb, xb), dyb), sb)| {
            let mut dw = vec![0.0; d];
            let mut db = vec![0.0; d];
            T::with_scratch(2 * d, |scratch| {
                let (xhat, g) = scratch.split_at_mut(d);
                vectorized(
                    #[inline(always)]
                    || {
                        let rows = dxb.chunks_mut(d).zip(xb.chunks(d)).zip(dyb.chunks(d));
                        for (((dxr, xr), dyr), &(mean, rstd)) in rows.zip(sb) {
                            let (m, r) = (T::from_f64(mean), T::from_f64(rstd));
                            for (((h, gi), &v), (&u, &wi)) in xhat
                                .iter_mut()
                                .zip(g.iter_mut())
                                .zip(xr)
                                .zip(dyr.iter().zip(w))
                            {
                                *h = (v - m) * r;
                                *gi = u * wi;
                            }
                            let mean_g = T::from_f64(sum(g).to_f64() / d as f64);
                            let mean_gh =
                                T::from_f64(sum_zip(g, xhat, |a, b| a * b).to_f64() / d as f64);
                            for ((o, &gi), &h) in dxr.iter_mut().zip(&*g).zip(&*xhat) {
                                *o = r * (gi - mean_g - h * mean_gh);
                            }
                            for (((sw, sb), &u), &h) in
                                dw.iter_mut().zip(db.iter_mut()).zip(dyr).zip(&*xhat)
                            {
                                *sw += (u * h).to_f64();
                                *sb += u.to_f64();
                            }
                        }
                    },
                )
            });
            (dw, db)
        })
        .collect();
    let mut dw = vec![0.0; d];
    let mut db = vec![0.0; d];
    for (pw, pb) in partial {
        for (a, v) in dw.iter_mut().zip(pw) {
            *a += v;
        }
        for (a, v) in db.iter_mut().zip(pb) {
            *a += v;
        }
    }
    (dx, dw, db)
}

/// Rows of `d` elements per parallel block of the layer-norm kernels: about 16k elements, so
/// that blocks are worth a task but there are enough of them for both cores.
fn rows_per_block(d: usize) -> usize {
    (16_384 / d).max(1)
}

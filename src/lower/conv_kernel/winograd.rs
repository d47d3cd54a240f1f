//! Winograd's minimal filtering F(2×2, 3×3) (Lavin and Gray, "Fast Algorithms for
//! Convolutional Neural Networks", 2016) for 3×3 convolutions with stride 1, dilation 1 and
//! one group: ResNet's 3×3 layers. Each 2×2 tile of an output plane is computed from the 4×4
//! tile of the padded input under it with 16 multiplications per channel pair, where im2col +
//! GEMM takes 36.
//!
//! With `d` a 4×4 input tile, `k` a 3×3 kernel and `y` the 2×2 output tile,
//! `y = Aᵀ [(G k Gᵀ) ⊙ (Bᵀ d B)] A`, where (points 0, 1, −1, ∞)
//!
//! ```text
//!      [1  0 −1  0]        [1   0   0]
//! Bᵀ = [0  1  1  0]    G = [½   ½   ½]    Aᵀ = [1  1  1  0]
//!      [0 −1  1  0]        [½  −½   ½]         [0  1 −1 −1]
//!      [0  1  0 −1]        [0   0   1]
//! ```
//!
//! Every entry is 0, ±1 or ±½, so the transforms only add and halve. Summed over the input
//! channels, the element-wise product is one matrix product for each of the 16 positions `ξ`
//! of a 4×4 tile: `M[ξ] (o × tiles) = U[ξ] (o × c) · V[ξ] (c × tiles)`, with `U = G k Gᵀ` of
//! every kernel and `V = Bᵀ d B` of every tile.
//!
//! - **Input gradient:** with stride 1, it is the convolution of the output gradient, padded
//!   by `2 − pad`, with the kernels flipped and their two channel axes swapped; the same
//!   algorithm computes it.
//! - **Weight gradient:** the transposed algorithm F(3×3, 2×2) on the same points. With `q` a
//!   2×2 tile of the output gradient, every tile adds `Gᵀ [(A q Aᵀ) ⊙ (Bᵀ d B)] G` to its
//!   kernel's gradient; summed over tiles, for each `ξ`, `M[ξ] (o × c) = Q[ξ] (o × tiles) ·
//!   V[ξ]ᵀ (tiles × c)`, and `dW = Gᵀ M G`.
//!
//! Tiles that stick out past an odd output edge read zeros (the padded input and the output
//! gradient are extended with zeros) and their outputs past the edge are dropped.
//!
//! Layouts of a chunk of `bs` samples: tile `(ty, tx)` of sample `s` is column
//! `s · th · pitch + ty · pitch + tx` of `cols = bs · th · pitch`, where `pitch = tw + 1`
//! leaves one slack column per tile row (computed and dropped; zero in `Q`). `V`:
//! `[c][16][cols]`, `Q`: `[o][16][cols]`, `M`: `[16][o][cols]` (forward) or `[16][o][c]`
//! (weight gradient), `U`: `[o][16][c]`. Each transform writes one channel's block per task,
//! each GEMM one `ξ`'s block, so the pool shares them without locks.

use gemm::Parallelism;
use rayon::prelude::*;

use super::{Geometry, Plan, fill_chunks, matmul, split_phases, sum_over_chunks};
use crate::lower::kernel::{Float, gather, vectorized, zeroed};

/// Positions of a transformed (4×4) tile.
const XI: usize = 16;

/// Fewest input and output channels for which the transforms pay: each transformed tile is
/// used by every output channel's GEMM row, each transformed kernel by every tile.
const MIN_CHANNELS: usize = 16;

/// Whether F(2×2, 3×3) computes `g` ([`fits`]) and beats the other algorithms: at least
/// [`MIN_CHANNELS`] input and output channels, and GEMMs with at most 55% of im2col's
/// multiplications, counting the slack column of every tile row. Measured on ResNet-18's
/// layers, batch 32, both cores, best of 5, against the algorithm chosen without it (forward
/// / weight gradient / input gradient, ms): 24×24 planes (48%) 5.7 / 6.4 / 6.1 against
/// shifted taps' 6.8 / 7.6 / 7.0; 12×12 (52%) 6.2 / 6.8 / 6.9 against im2col's 7.9 / 8.9 /
/// 7.8; but 6×6 (59%) 5.4 / 7.2 / 5.9 against 5.4 / 6.0 / 6.0, where the transforms cost
/// what the GEMMs save.
pub(super) fn pays(g: &Geometry) -> bool {
    let t = Tiles::new(g);
    fits(g)
        && g.c >= MIN_CHANNELS
        && g.o >= MIN_CHANNELS
        && g.ohw() > 0
        && 20 * XI * t.per_sample() <= 11 * 9 * g.ohw()
}

/// Whether F(2×2, 3×3) computes `g`: a 3×3 kernel, stride and dilation 1, one group, padding
/// at most 2.
fn fits(g: &Geometry) -> bool {
    g.kh == 3
        && g.kw == 3
        && g.stride == (1, 1)
        && g.dilation == (1, 1)
        && g.groups == 1
        && g.pad.0 <= 2
        && g.pad.1 <= 2
}

/// The 2×2 output tiles of a plane: `th` rows of `tw`.
#[derive(Clone, Copy, Debug)]
struct Tiles {
    th: usize,
    tw: usize,
}

impl Tiles {
    fn new(g: &Geometry) -> Tiles {
        Tiles {
            th: g.oh.div_ceil(2),
            tw: g.ow.div_ceil(2),
        }
    }

    /// Columns per tile row: `tw` tiles and one slack column, so that the 16 elements of
    /// every tile lie at fixed offsets from its index in a plane's phase planes, and each
    /// transform is one pass over a whole plane.
    fn pitch(&self) -> usize {
        self.tw + 1
    }

    /// GEMM columns per sample: `th` tile rows at [`Self::pitch`].
    fn per_sample(&self) -> usize {
        self.th * self.pitch()
    }

    /// The chunks of samples: about [`super::GEMM_COLUMNS`] tiles each, with room for `V`
    /// and `M` (or `Q`).
    fn plan(&self, g: &Geometry) -> Plan {
        Plan::with(g, self.per_sample(), XI * (g.c + g.o) * self.per_sample())
    }
}

/// The convolution `x ⋆ w + b`, as [`super::forward`].
pub(super) fn forward<T: Float>(g: &Geometry, x: &[T], w: &[T], b: Option<&[T]>) -> Vec<T> {
    assert!(fits(g), "winograd: unsupported geometry {g:?}");
    let u = transform_weight((g.o, g.c), w, |oc, e| oc * g.c * 9 + e, 9);
    convolve(g, x, &u, b)
}

/// The gradient of the input, as [`super::input_grad`]: the forward algorithm on `dy` with
/// flipped, channel-swapped kernels.
pub(super) fn input_grad<T: Float>(g: &Geometry, dy: &[T], w: &[T]) -> Vec<T> {
    assert!(fits(g), "winograd: unsupported geometry {g:?}");
    let adjoint = Geometry {
        c: g.o,
        h: g.oh,
        w: g.ow,
        o: g.c,
        pad: (2 - g.pad.0, 2 - g.pad.1),
        oh: g.h,
        ow: g.w,
        ..*g
    };
    // Kernel (ci, oc) is kernel (oc, ci) of `w` turned by 180°.
    let u = transform_weight((g.c, g.o), w, |ci, e| ci * 9 + 8 - e, g.c * 9);
    convolve(&adjoint, dy, &u, None)
}

/// The gradient of the weight, as [`super::weight_grad`].
pub(super) fn weight_grad<T: Float>(g: &Geometry, x: &[T], dy: &[T]) -> Vec<T> {
    assert!(fits(g), "winograd: unsupported geometry {g:?}");
    let t = Tiles::new(g);
    let (c, o) = (g.c, g.o);
    let m = sum_over_chunks(g.n, XI * o * c, &t.plan(g), |s0, bs, m, par| {
        let cols = bs * t.per_sample();
        let pool = matches!(par, Parallelism::Rayon(_));
        let x = &x[s0 * c * g.hw()..][..bs * c * g.hw()];
        let dy = &dy[s0 * o * g.ohw()..][..bs * o * g.ohw()];
        T::with_scratch(XI * (c + o) * cols, |buf| {
            let (v, q) = buf.split_at_mut(XI * c * cols);
            transform_input(g, t, x, bs, v, pool);
            transform_output_grad(g, t, dy, bs, q, pool);
            for_each_block(m, o * c, pool, |xi, m| {
                // M[ξ] (o × c) += Q[ξ] (o × cols) · V[ξ]ᵀ (cols × c).
                matmul(
                    (o, c, cols),
                    (m, c, 1),
                    (&q[xi * cols..], XI * cols, 1),
                    (&v[xi * cols..], 1, XI * cols),
                    true,
                    Parallelism::None,
                );
            });
        });
    });
    // dW = Gᵀ M G for every kernel.
    let mut dw = zeroed(o * c * 9);
    dw.par_chunks_mut(c * 9).enumerate().for_each(|(oc, dw)| {
        for (ci, k) in dw.chunks_exact_mut(9).enumerate() {
            let tile: [T; XI] = std::array::from_fn(|xi| m[(xi * o + oc) * c + ci]);
            k.copy_from_slice(&kernel_of(tile));
        }
    });
    dw
}

/// `G k Gᵀ` of every kernel of a `rows × cols` weight `w`, kernel `(r, col)` having element
/// `e` (row-major) at `w[at(r, e) + col · stride]`: `U` as `[rows][16][cols]`.
fn transform_weight<T: Float>(
    (rows, cols): (usize, usize),
    w: &[T],
    at: impl Fn(usize, usize) -> usize + Sync,
    stride: usize,
) -> Vec<T> {
    let mut u = zeroed(rows * XI * cols);
    u.par_chunks_mut(XI * cols).enumerate().for_each(|(r, u)| {
        // The row's kernels element by element, then G down their columns (`down[a][j]`:
        // row `a` of G k, column `j`), then G along the rows of that.
        let mut k = vec![T::zero(); 9 * cols];
        for (e, k) in k.chunks_exact_mut(cols).enumerate() {
            gather(k, &w[at(r, e)..], stride);
        }
        let mut down = vec![T::zero(); 12 * cols];
        vectorized(
            #[inline(always)]
            || {
                let k = |e: usize| &k[e * cols..][..cols];
                for j in 0..3 {
                    expand_into(&mut down, j, 3, k(j), k(3 + j), k(6 + j));
                }
                let down = |a: usize, j: usize| &down[(3 * a + j) * cols..][..cols];
                for a in 0..4 {
                    expand_into(u, 4 * a, 1, down(a, 0), down(a, 1), down(a, 2));
                }
            },
        );
    });
    u
}

/// `G · (a, b, c)` element-wise, into rows `first + i · step` (`i` = 0..4) of `dst` (rows of
/// `a.len()`).
#[inline(always)]
fn expand_into<T: Float>(dst: &mut [T], first: usize, step: usize, a: &[T], b: &[T], c: &[T]) {
    let n = a.len();
    let half = T::from_f64(0.5);
    let row = |i: usize| (first + i * step) * n;
    dst[row(0)..][..n].copy_from_slice(a);
    map3(&mut dst[row(1)..][..n], a, b, c, |a, b, c| {
        (a + b + c) * half
    });
    map3(&mut dst[row(2)..][..n], a, b, c, |a, b, c| {
        (a - b + c) * half
    });
    dst[row(3)..][..n].copy_from_slice(c);
}

/// `Gᵀ` times four elements: three.
#[inline(always)]
fn fold<T: Float>(v: [T; 4]) -> [T; 3] {
    let half = T::from_f64(0.5);
    [
        v[0] + (v[1] + v[2]) * half,
        (v[1] - v[2]) * half,
        (v[1] + v[2]) * half + v[3],
    ]
}

/// `Gᵀ m G` of a transformed 4×4 tile (row-major): a 3×3 kernel, row-major.
fn kernel_of<T: Float>(m: [T; XI]) -> [T; 9] {
    let down: [[T; 3]; 4] = std::array::from_fn(|b| fold(std::array::from_fn(|a| m[4 * a + b])));
    let mut k = [T::zero(); 9];
    for (i, row) in k.chunks_exact_mut(3).enumerate() {
        row.copy_from_slice(&fold(std::array::from_fn(|b| down[b][i])));
    }
    k
}

/// The forward algorithm with transformed kernels `u` (`[o][16][c]`): `y = conv(x) + b`.
fn convolve<T: Float>(g: &Geometry, x: &[T], u: &[T], b: Option<&[T]>) -> Vec<T> {
    let t = Tiles::new(g);
    let (c, o) = (g.c, g.o);
    fill_chunks(g.n, o * g.ohw(), &t.plan(g), |s0, y, par| {
        let bs = y.len() / (o * g.ohw());
        let cols = bs * t.per_sample();
        let pool = matches!(par, Parallelism::Rayon(_));
        let x = &x[s0 * c * g.hw()..][..bs * c * g.hw()];
        T::with_scratch(XI * (c + o) * cols, |buf| {
            let (v, m) = buf.split_at_mut(XI * c * cols);
            transform_input(g, t, x, bs, v, pool);
            for_each_block(m, o * cols, pool, |xi, m| {
                // M[ξ] (o × cols) = U[ξ] (o × c) · V[ξ] (c × cols).
                matmul(
                    (o, cols, c),
                    (m, cols, 1),
                    (&u[xi * c..], XI * c, 1),
                    (&v[xi * cols..], XI * cols, 1),
                    false,
                    Parallelism::None,
                );
            });
            transform_output(g, t, m, bs, b, y, pool);
        });
    })
}

/// Runs `f(k, block)` on the consecutive `len`-element blocks of `data`, on the pool or in turn.
fn for_each_block<T: Float>(
    data: &mut [T],
    len: usize,
    pool: bool,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    if pool {
        data.par_chunks_mut(len)
            .enumerate()
            .for_each(|(k, d)| f(k, d));
    } else {
        data.chunks_mut(len).enumerate().for_each(|(k, d)| f(k, d));
    }
}

/// The 16 rows of a transform's output, `len` elements each from `start` on.
fn sixteen<T>(data: &mut [T], row_len: usize, start: usize, len: usize) -> [&mut [T]; XI] {
    let mut rows = data.chunks_exact_mut(row_len);
    std::array::from_fn(|_| &mut rows.next().expect("16 rows")[start..][..len])
}

/// `V = Bᵀ d B` of every 4×4 tile of the zero-padded planes of `x` (`[bs, c, h, w]`), into
/// `v`: `[c][16][cols]`.
fn transform_input<T: Float>(g: &Geometry, t: Tiles, x: &[T], bs: usize, v: &mut [T], pool: bool) {
    let cols = bs * t.per_sample();
    let n = t.per_sample();
    // Phase planes of the padded input, `pitch` wide: `th + 1` rows, and one row more for
    // the slack column of the last tile row, which reads one element past its plane's rows.
    let len = (t.th + 2) * t.pitch();
    for_each_block(v, XI * cols, pool, |ci, v| {
        let mut phases = vec![T::zero(); 4 * len];
        let mut half_done = vec![T::zero(); XI * n];
        for s in 0..bs {
            let plane = &x[(s * g.c + ci) * g.hw()..][..g.hw()];
            let shape = (t.th + 2, t.pitch());
            split_phases(plane, (g.h, g.w), g.pad, (2, 2), shape, &mut phases);
            let out = sixteen(v, cols, s * n, n);
            vectorized(
                #[inline(always)]
                || input_tiles(&phases, (len, t.pitch()), &mut half_done, out),
            );
        }
    });
}

/// `Bᵀ d B` of every tile of one plane from its phase planes (`len` each, `pitch` wide):
/// element `(a, k)` of tile `j = ty · pitch + tx` is `phases[2·(a % 2) + k % 2]` at
/// `j + (a / 2) · pitch + k / 2`. `e` (16 rows like `out`) holds `Bᵀ d`.
#[inline(always)]
fn input_tiles<T: Float>(
    phases: &[T],
    (len, pitch): (usize, usize),
    e: &mut [T],
    out: [&mut [T]; XI],
) {
    let n = out[0].len();
    let d =
        |a: usize, k: usize| &phases[(2 * (a % 2) + k % 2) * len + (a / 2) * pitch + k / 2..][..n];
    // Bᵀ d down the columns: e0 = d0 − d2, e1 = d1 + d2, e2 = d2 − d1, e3 = d1 − d3.
    let mut rows = e.chunks_exact_mut(n);
    for a in 0..4 {
        for k in 0..4 {
            let dst = rows.next().expect("16 rows");
            match a {
                0 => map2(dst, d(0, k), d(2, k), |p, q| p - q),
                1 => map2(dst, d(1, k), d(2, k), |p, q| p + q),
                2 => map2(dst, d(2, k), d(1, k), |p, q| p - q),
                _ => map2(dst, d(1, k), d(3, k), |p, q| p - q),
            }
        }
    }
    // (Bᵀ d) B along the rows, the same combinations of columns.
    for (a, [v0, v1, v2, v3]) in quads(out).into_iter().enumerate() {
        let e = |k: usize| &e[(4 * a + k) * n..][..n];
        map2(v0, e(0), e(2), |p, q| p - q);
        map2(v1, e(1), e(2), |p, q| p + q);
        map2(v2, e(2), e(1), |p, q| p - q);
        map2(v3, e(1), e(3), |p, q| p - q);
    }
}

/// The 16 rows of a transformed tile as four groups of four (a row of the 4×4 tile each).
fn quads<R>(rows: [R; XI]) -> [[R; 4]; 4] {
    let mut rows = rows.into_iter();
    std::array::from_fn(|_| std::array::from_fn(|_| rows.next().expect("16 rows")))
}

/// `dst[i] = f(a[i], b[i])`.
#[inline(always)]
fn map2<T: Float>(dst: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T) {
    for ((d, &a), &b) in dst.iter_mut().zip(a).zip(b) {
        *d = f(a, b);
    }
}

/// `dst[i] = f(a[i], b[i], c[i])`.
#[inline(always)]
fn map3<T: Float>(dst: &mut [T], a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> T) {
    for (((d, &a), &b), &c) in dst.iter_mut().zip(a).zip(b).zip(c) {
        *d = f(a, b, c);
    }
}

/// `Q = A q Aᵀ` of every 2×2 tile of the output gradient `dy` (`[bs, o, oh, ow]`, extended
/// with zeros to whole tiles, and zero in the slack columns), into `q`: `[o][16][cols]`.
fn transform_output_grad<T: Float>(
    g: &Geometry,
    t: Tiles,
    dy: &[T],
    bs: usize,
    q: &mut [T],
    pool: bool,
) {
    let cols = bs * t.per_sample();
    let len = t.per_sample();
    for_each_block(q, XI * cols, pool, |oc, q| {
        let mut phases = vec![T::zero(); 4 * len];
        for s in 0..bs {
            let plane = &dy[(s * g.o + oc) * g.ohw()..][..g.ohw()];
            let shape = (t.th, t.pitch());
            split_phases(plane, (g.oh, g.ow), (0, 0), (2, 2), shape, &mut phases);
            let out = sixteen(q, cols, s * len, len);
            vectorized(
                #[inline(always)]
                || output_grad_tiles(&phases, out),
            );
        }
    });
}

/// `A q Aᵀ` of every tile of one plane of the output gradient from its four phase planes
/// (element `(a, b)` of tile `j` is `phases[2a + b]` at `j`).
#[inline(always)]
fn output_grad_tiles<T: Float>(phases: &[T], out: [&mut [T]; XI]) {
    let n = out[0].len();
    let q = |e: usize| &phases[e * n..][..n];
    // The rows of A q are p0 = q0, p1 = q0 + q1, p2 = q0 − q1, p3 = −q1; along each row,
    // (even, odd) → (even, even + odd, even − odd, −odd).
    for (a, [v0, v1, v2, v3]) in quads(out).into_iter().enumerate() {
        let (q0e, q0o, q1e, q1o) = (q(0), q(1), q(2), q(3));
        let p = |x: T, y: T| match a {
            0 => x,
            1 => x + y,
            2 => x - y,
            _ => T::zero() - y,
        };
        map2(v0, q0e, q1e, p);
        map2(v3, q0o, q1o, |x, y| T::zero() - p(x, y));
        map2(v1, v0, v3, |pe, minus_po| pe - minus_po);
        map2(v2, v0, v3, |pe, minus_po| pe + minus_po);
    }
}

/// `y = Aᵀ M A + b` of every tile, from `m` (`[16][o][cols]`) into the output planes `y`
/// (`[bs, o, oh, ow]`), dropping the slack columns and what lies past an odd edge.
fn transform_output<T: Float>(
    g: &Geometry,
    t: Tiles,
    m: &[T],
    bs: usize,
    b: Option<&[T]>,
    y: &mut [T],
    pool: bool,
) {
    let cols = bs * t.per_sample();
    let (n, pitch) = (t.per_sample(), t.pitch());
    for_each_block(y, g.ohw(), pool, |plane, y| {
        let (s, oc) = (plane / g.o, plane % g.o);
        let bias = b.map_or(T::zero(), |b| b[oc]);
        // y00, y01, y10 and y11 of every tile, `n` each, and room for `Aᵀ m`.
        let mut tiles = vec![T::zero(); 12 * n];
        let ms: [&[T]; XI] = std::array::from_fn(|xi| &m[(xi * g.o + oc) * cols + s * n..][..n]);
        vectorized(
            #[inline(always)]
            || output_tiles(&ms, bias, &mut tiles),
        );
        for (oy, row) in y.chunks_exact_mut(g.ow).enumerate() {
            let (ty, a) = (oy / 2, oy % 2);
            let at = |b: usize| &tiles[(2 * a + b) * n + ty * pitch..][..t.tw];
            interleave(row, at(0), at(1));
        }
    });
}

/// `Aᵀ m A + bias` of each tile (`ms[ξ][j]`), into `tiles`: y00, y01, y10 and y11 of every
/// tile, `n` each, then `Aᵀ m` (8 rows of `n`).
#[inline(always)]
fn output_tiles<T: Float>(ms: &[&[T]; XI], bias: T, tiles: &mut [T]) {
    let n = ms[0].len();
    let (y, r) = tiles.split_at_mut(4 * n);
    // Aᵀ m down the columns: r0 = m0 + m1 + m2, r1 = m1 − m2 − m3 (rows of the tile).
    for (b, r) in r.chunks_exact_mut(2 * n).enumerate() {
        let (r0, r1) = r.split_at_mut(n);
        map3(r0, ms[b], ms[4 + b], ms[8 + b], |p, q, s| p + q + s);
        map3(r1, ms[4 + b], ms[8 + b], ms[12 + b], |p, q, s| p - q - s);
    }
    // Then along the rows, the same combinations, plus the bias.
    let r = |b: usize, row: usize| &r[(2 * b + row) * n..][..n];
    for (k, y) in y.chunks_exact_mut(n).enumerate() {
        let row = k / 2;
        if k % 2 == 0 {
            map3(y, r(0, row), r(1, row), r(2, row), |p, q, s| {
                p + q + s + bias
            });
        } else {
            map3(y, r(1, row), r(2, row), r(3, row), |p, q, s| {
                p - q - s + bias
            });
        }
    }
}

/// `row[2k] = a[k]`, `row[2k + 1] = b[k]`, as far as `row` goes.
#[inline(always)]
fn interleave<T: Float>(row: &mut [T], a: &[T], b: &[T]) {
    let whole = row.len() / 2;
    let mut pairs = row.chunks_exact_mut(2);
    for ((p, &a), &b) in (&mut pairs).zip(a).zip(b) {
        p[0] = a;
        p[1] = b;
    }
    if let [last] = pairs.into_remainder() {
        *last = a[whole];
    }
}

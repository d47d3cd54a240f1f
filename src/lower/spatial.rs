//! Resizing the spatial axes: `upsample` (nearest and bilinear, PyTorch's `F.interpolate`),
//! `pad` and `crop`, all from differentiable candle ops (`index_select`, whose backward is
//! `index_add`; `pad_with_zeros`; `narrow`).
//!
//! Upsampling is separable: along H, then along W, each output row (column) reads one source
//! row (nearest) or blends two (bilinear). The source rows and weights are PyTorch's, computed
//! once per layer when the network is built.

use candle_core::{Result, Tensor};

use crate::ops::spatial::{Upsample, UpsampleMode};

/// For one axis: the source indices of every output position and, for bilinear, the second
/// source and the two weights.
#[derive(Clone, Debug, PartialEq)]
struct AxisPlan {
    first: Vec<u32>,
    /// Bilinear only: the second source and the weights of the first and second.
    blend: Option<(Vec<u32>, Vec<f64>, Vec<f64>)>,
}

impl AxisPlan {
    /// PyTorch's `nearest_idx`: the same size copies, twice the size halves, anything else
    /// takes `min(floor(dst · scale), in − 1)` with the scale and product in `f32`.
    fn nearest(input: usize, output: usize, scale: f64) -> AxisPlan {
        let first = (0..output)
            .map(|i| {
                if output == input {
                    i
                } else if output == 2 * input {
                    i / 2
                } else {
                    ((i as f32 * scale as f32).floor() as usize).min(input - 1)
                }
            })
            .map(|i| i as u32)
            .collect();
        AxisPlan { first, blend: None }
    }

    /// PyTorch's `compute_indices_weights_linear`: the source coordinate is `scale · dst`
    /// (aligned corners, `scale = (in − 1)/(out − 1)`) or `scale · (dst + ½) − ½` clamped at 0;
    /// the first source is its floor (taken in `f32`, as PyTorch's `floorf`), at most
    /// `in − 1`, the second the next one inside the input, weighted by the fraction.
    fn bilinear(input: usize, output: usize, scale: f64, align_corners: bool) -> AxisPlan {
        let ratio = if align_corners {
            if output > 1 {
                (input - 1) as f64 / (output - 1) as f64
            } else {
                0.0
            }
        } else {
            scale
        };
        let (mut first, mut second, mut w0, mut w1) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..output {
            let src = if align_corners {
                ratio * i as f64
            } else {
                (ratio * (i as f64 + 0.5) - 0.5).max(0.0)
            };
            let i0 = ((src as f32).floor() as usize).min(input - 1);
            let lambda = (src - i0 as f64).clamp(0.0, 1.0);
            first.push(i0 as u32);
            second.push((i0 + usize::from(i0 < input - 1)) as u32);
            w0.push(1.0 - lambda);
            w1.push(lambda);
        }
        AxisPlan {
            first,
            blend: Some((second, w0, w1)),
        }
    }

    /// Resamples `axis` (2 or 3) of `x`.
    fn apply(&self, x: &Tensor, axis: usize) -> Result<Tensor> {
        let dev = x.device();
        let index = |v: &[u32]| Tensor::new(v, dev);
        let a = x.index_select(&index(&self.first)?, axis)?;
        let Some((second, w0, w1)) = &self.blend else {
            return Ok(a);
        };
        let b = x.index_select(&index(second)?, axis)?;
        let weight = |w: &[f64]| {
            let mut shape = [1usize; 4];
            shape[axis] = w.len();
            Tensor::new(w, dev)?
                .to_dtype(x.dtype())?
                .reshape(&shape[..])
        };
        a.broadcast_mul(&weight(w0)?)?
            .add(&b.broadcast_mul(&weight(w1)?)?)
    }
}

/// An upsampling layer for one input size: the plans of both axes.
#[derive(Clone, Debug, PartialEq)]
pub struct Resize {
    rows: AxisPlan,
    cols: AxisPlan,
}

impl Resize {
    /// Plans `cfg` from an `input` `(H, W)` to an `output` `(h, w)` (as shape inference gives).
    pub fn new(cfg: &Upsample, input: (usize, usize), output: (usize, usize)) -> Resize {
        let plan = |axis: usize, n: usize, out: usize| {
            let scale = cfg.scale(axis, n as u64, out as u64);
            match cfg.mode {
                UpsampleMode::Nearest => AxisPlan::nearest(n, out, scale),
                UpsampleMode::Bilinear => AxisPlan::bilinear(n, out, scale, cfg.align_corners),
            }
        };
        Resize {
            rows: plan(0, input.0, output.0),
            cols: plan(1, input.1, output.1),
        }
    }

    /// `[N, C, H, W] -> [N, C, h, w]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        if h == 0 || w == 0 {
            candle_core::bail!("upsample: empty input [{h}, {w}]");
        }
        self.cols.apply(&self.rows.apply(x, 2)?, 3)
    }
}

/// Zero padding `[top, bottom, left, right]` of `[N, C, H, W]`.
pub fn pad(x: &Tensor, [top, bottom, left, right]: [usize; 4]) -> Result<Tensor> {
    x.pad_with_zeros(2, top, bottom)?
        .pad_with_zeros(3, left, right)
}

/// The `h × w` window of `[N, C, H, W]` whose first row and column are `top`, `left`.
pub fn crop(x: &Tensor, (top, left): (usize, usize), (h, w): (usize, usize)) -> Result<Tensor> {
    x.narrow(2, top, h)?.narrow(3, left, w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::gradcheck::{check_grads, random};
    use candle_core::Device;

    fn up(factor: Option<u64>, size: Option<(u64, u64)>, bilinear: bool, align: bool) -> Upsample {
        Upsample {
            factor: factor.map(|f| (f, f)),
            size,
            mode: if bilinear {
                UpsampleMode::Bilinear
            } else {
                UpsampleMode::Nearest
            },
            align_corners: align,
        }
    }

    fn plane(t: &Tensor) -> Vec<Vec<f64>> {
        t.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
    }

    #[test]
    fn nearest_repeats_pixels() {
        let x = Tensor::new(&[[[[1.0f64, 2.0], [3.0, 4.0]]]], &Device::Cpu).unwrap();
        let y = Resize::new(&up(Some(2), None, false, false), (2, 2), (4, 4))
            .forward(&x)
            .unwrap();
        assert_eq!(
            plane(&y),
            [
                [1., 1., 2., 2.],
                [1., 1., 2., 2.],
                [3., 3., 4., 4.],
                [3., 3., 4., 4.]
            ]
        );
        // 3 -> 5: floor(dst · 0.6) = 0, 0, 1, 1, 2.
        assert_eq!(AxisPlan::nearest(3, 5, 0.6).first, [0, 0, 1, 1, 2]);
        // Downsampling 5 -> 2 picks rows 0 and 2.
        assert_eq!(AxisPlan::nearest(5, 2, 2.5).first, [0, 2]);
    }

    #[test]
    fn bilinear_weights_follow_pytorch() {
        // 2 -> 4, half-pixel centres: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25; the
        // last has no next row and blends row 1 with itself.
        let p = AxisPlan::bilinear(2, 4, 0.5, false);
        let (second, w0, w1) = p.blend.clone().unwrap();
        assert_eq!(p.first, [0, 0, 0, 1]);
        assert_eq!(second, [1, 1, 1, 1]);
        assert_eq!(w1, [0.0, 0.25, 0.75, 0.25]);
        assert_eq!(w0, [1.0, 0.75, 0.25, 0.75]);
        // Aligned corners: sources 0, 1/3, 2/3, 1.
        let p = AxisPlan::bilinear(2, 4, 0.5, true);
        let (_, _, w1) = p.blend.unwrap();
        assert!((w1[1] - 1.0 / 3.0).abs() < 1e-15 && (w1[2] - 2.0 / 3.0).abs() < 1e-15);
        assert_eq!(p.first, [0, 0, 0, 1]);
    }

    #[test]
    fn pad_and_crop_are_inverse() {
        let x = random(&[2, 3, 4, 5], 1);
        let y = pad(&x, [1, 2, 3, 0]).unwrap();
        assert_eq!(y.dims(), [2, 3, 7, 8]);
        let back = crop(&y, (1, 3), (4, 5)).unwrap();
        let diff = (back - &x).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f64>().unwrap(), 0.0);
    }

    #[test]
    fn upsample_gradients_match_finite_differences() {
        for (cfg, input, output) in [
            (up(Some(2), None, false, false), (3, 4), (6, 8)),
            (up(None, Some((7, 5)), false, false), (3, 4), (7, 5)),
            (up(Some(3), None, true, false), (3, 4), (9, 12)),
            (up(None, Some((7, 9)), true, false), (3, 4), (7, 9)),
            (up(None, Some((7, 9)), true, true), (3, 4), (7, 9)),
            (up(None, Some((2, 3)), true, false), (5, 7), (2, 3)),
        ] {
            let r = Resize::new(&cfg, input, output);
            let x = random(&[2, 2, input.0, input.1], 7);
            assert_eq!(
                r.forward(&x).unwrap().dims(),
                [2, 2, output.0, output.1],
                "{cfg:?}"
            );
            check_grads(|t| r.forward(&t[0]), &[x], 1e-6);
        }
    }

    #[test]
    fn pad_and_crop_gradients_match_finite_differences() {
        let x = random(&[2, 2, 4, 5], 3);
        check_grads(|t| pad(&t[0], [1, 0, 2, 3]), std::slice::from_ref(&x), 1e-6);
        check_grads(|t| crop(&t[0], (1, 2), (2, 3)), &[x], 1e-6);
    }
}

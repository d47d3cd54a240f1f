//! Convolution on candle's `conv2d`, with padding done by hand so that non-square padding
//! works, and rows and columns that no window reaches cropped first: candle's backward pass
//! fails when the stride leaves a different remainder along H and W (stride 3, pad 1 on 7×9).

use candle_core::{Result, Tensor, Var};

use super::params::State;
use crate::ops::conv::Conv2d;

/// A convolution layer with its parameters.
pub struct Conv {
    cfg: Conv2d,
    weight: Var,
    bias: Option<Var>,
}

impl Conv {
    /// Creates the parameters of node `name` for `in_channels` inputs.
    pub fn new(state: &mut State, name: &str, cfg: &Conv2d, in_channels: usize) -> Result<Self> {
        let (kh, kw) = (cfg.kernel.0 as usize, cfg.kernel.1 as usize);
        let per_group = in_channels / cfg.groups as usize;
        let out = cfg.out as usize;
        let weight = state.weight(&format!("{name}.weight"), &[out, per_group, kh, kw])?;
        let bias = if cfg.bias {
            Some(state.bias(&format!("{name}.bias"), out, per_group * kh * kw)?)
        } else {
            None
        };
        if cfg.stride.0 != cfg.stride.1 || cfg.dilation.0 != cfg.dilation.1 {
            candle_core::bail!(
                "`{name}`: different strides or dilations along H and W are not supported by the candle backend yet"
            );
        }
        Ok(Conv {
            cfg: cfg.clone(),
            weight,
            bias,
        })
    }

    /// `[N, C, H, W] -> [N, out, H', W']`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d(
            x,
            self.weight.as_tensor(),
            self.bias.as_ref().map(Var::as_tensor),
            &self.cfg,
        )
    }
}

/// The convolution itself, on explicit weight and bias.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, cfg: &Conv2d) -> Result<Tensor> {
    let (ph, pw) = (cfg.pad.0 as usize, cfg.pad.1 as usize);
    let (s, d) = (cfg.stride.0 as usize, cfg.dilation.0 as usize);
    let reach = |k: u64| d * (k as usize - 1) + 1;
    let (_, _, h, w) = x.dims4()?;
    let rem_h = (h + 2 * ph).saturating_sub(reach(cfg.kernel.0)) % s;
    let rem_w = (w + 2 * pw).saturating_sub(reach(cfg.kernel.1)) % s;
    // candle's own padding is fastest; it is correct when the padding is square and the
    // stride leaves the same remainder along H and W.
    if ph == pw && rem_h == rem_w {
        let y = x.conv2d(weight, ph, s, d, cfg.groups as usize)?;
        return match bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
            None => Ok(y),
        };
    }
    let mut x = x.clone();
    if ph > 0 {
        x = x.pad_with_zeros(2, ph, ph)?;
    }
    if pw > 0 {
        x = x.pad_with_zeros(3, pw, pw)?;
    }
    let (_, _, h, w) = x.dims4()?;
    let reach_h = d * (cfg.kernel.0 as usize - 1) + 1;
    let reach_w = d * (cfg.kernel.1 as usize - 1) + 1;
    let used_h = (h - reach_h) / s * s + reach_h;
    let used_w = (w - reach_w) / s * s + reach_w;
    if used_h < h {
        x = x.narrow(2, 0, used_h)?;
    }
    if used_w < w {
        x = x.narrow(3, 0, used_w)?;
    }
    let y = x.conv2d(weight, 0, s, d, cfg.groups as usize)?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::gradcheck::{check_grads, random};

    fn cfg(out: u64, k: (u64, u64), s: u64, p: (u64, u64), d: u64, groups: u64) -> Conv2d {
        Conv2d {
            out,
            kernel: k,
            stride: (s, s),
            pad: p,
            dilation: (d, d),
            groups,
            bias: true,
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for (c, cin, h, w) in [
            (cfg(3, (3, 3), 2, (1, 1), 1, 1), 2, 7, 9),
            (cfg(3, (3, 3), 3, (1, 1), 1, 1), 2, 7, 9),
            (cfg(4, (1, 1), 1, (0, 0), 1, 2), 4, 5, 5),
            (cfg(2, (3, 3), 1, (2, 2), 2, 1), 2, 6, 6),
            (cfg(2, (3, 5), 1, (1, 2), 1, 1), 2, 6, 7),
        ] {
            let x = random(&[2, cin, h, w], 1);
            let wt = random(
                &[
                    c.out as usize,
                    cin / c.groups as usize,
                    c.kernel.0 as usize,
                    c.kernel.1 as usize,
                ],
                2,
            );
            let b = random(&[c.out as usize], 3);
            let expected = c.infer(&crate::ir::Shape::new(
                [2u64, cin as u64, h as u64, w as u64]
                    .map(crate::ir::Dim::Known)
                    .to_vec(),
            ));
            let y = conv2d(&x, &wt, Some(&b), &c).unwrap();
            let dims: Vec<usize> = expected
                .unwrap()
                .0
                .iter()
                .map(|d| d.known().unwrap() as usize)
                .collect();
            assert_eq!(y.dims(), &dims[..], "shape agrees with inference for {c:?}");
            check_grads(|t| conv2d(&t[0], &t[1], Some(&t[2]), &c), &[x, wt, b], 1e-6);
        }
    }
}

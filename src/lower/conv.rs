//! Convolution on candle's `conv2d`, with padding done by hand so that non-square padding
//! works, and rows and columns that no window reaches cropped first: candle's backward pass
//! fails when the stride leaves a different remainder along H and W (stride 3, pad 1 on 7×9).
//!
//! Transposed convolution on candle's `conv_transpose2d`, which has neither groups, nor
//! padding or output padding that differ along H and W, and whose input gradient has the
//! wrong size when the output padding is not below the stride. So it runs without padding
//! (the full output, whose backward is right), once per group, and the padding is applied
//! afterwards: `pad` rows and columns cropped from each side, `output_padding` ones kept at
//! the bottom and right (zeros where the full output ends).

use candle_core::{Result, Tensor, Var};

use super::params::State;
use crate::ops::conv::{Conv2d, ConvTranspose2d};

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

/// A transposed convolution layer with its parameters.
pub struct ConvTranspose {
    cfg: ConvTranspose2d,
    weight: Var,
    bias: Option<Var>,
}

impl ConvTranspose {
    /// Creates the parameters of node `name` for `in_channels` inputs: weight
    /// `[in, out/groups, kh, kw]` (PyTorch's layout), PyTorch's initialisation.
    pub fn new(
        state: &mut State,
        name: &str,
        cfg: &ConvTranspose2d,
        in_channels: usize,
    ) -> Result<Self> {
        let (kh, kw) = (cfg.kernel.0 as usize, cfg.kernel.1 as usize);
        let per_group = cfg.out as usize / cfg.groups as usize;
        let weight = state.weight(&format!("{name}.weight"), &[in_channels, per_group, kh, kw])?;
        let bias = if cfg.bias {
            Some(state.bias(
                &format!("{name}.bias"),
                cfg.out as usize,
                per_group * kh * kw,
            )?)
        } else {
            None
        };
        if cfg.stride.0 != cfg.stride.1 || cfg.dilation.0 != cfg.dilation.1 {
            candle_core::bail!(
                "`{name}`: different strides or dilations along H and W are not supported by the candle backend yet"
            );
        }
        Ok(ConvTranspose {
            cfg: cfg.clone(),
            weight,
            bias,
        })
    }

    /// `[N, C, H, W] -> [N, out, H', W']`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv_transpose2d(
            x,
            self.weight.as_tensor(),
            self.bias.as_ref().map(Var::as_tensor),
            &self.cfg,
        )
    }
}

/// The transposed convolution itself, on explicit weight `[C, out/groups, kh, kw]` and bias.
pub fn conv_transpose2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: &ConvTranspose2d,
) -> Result<Tensor> {
    let (s, d) = (cfg.stride.0 as usize, cfg.dilation.0 as usize);
    if cfg.stride.1 as usize != s || cfg.dilation.1 as usize != d {
        candle_core::bail!("conv_transpose: stride and dilation must be equal along H and W");
    }
    let groups = cfg.groups as usize;
    let full = if groups == 1 {
        x.conv_transpose2d(weight, 0, 0, s, d)?
    } else {
        let xs = x.chunk(groups, 1)?;
        let ws = weight.chunk(groups, 0)?;
        let parts = xs
            .iter()
            .zip(&ws)
            .map(|(x, w)| x.conv_transpose2d(w, 0, 0, s, d))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1)?
    };
    let y = place(&full, 2, cfg.pad.0 as usize, cfg.output_padding.0 as usize)?;
    let y = place(&y, 3, cfg.pad.1 as usize, cfg.output_padding.1 as usize)?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
        None => Ok(y),
    }
}

/// Along `axis` of a full transposed-convolution output of length `n`: rows
/// `[pad, n − pad + output_padding)`, zeros past `n`.
fn place(full: &Tensor, axis: usize, pad: usize, output_padding: usize) -> Result<Tensor> {
    let n = full.dim(axis)?;
    let len = (n + output_padding)
        .checked_sub(2 * pad)
        .filter(|&l| l > 0)
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "conv_transpose: padding {pad} leaves nothing of an output of {n}"
            ))
        })?;
    let start = pad.min(n);
    let kept = len.min(n - start);
    let mut y = full.narrow(axis, start, kept)?;
    if kept < len {
        y = y.pad_with_zeros(axis, 0, len - kept)?;
    }
    Ok(y)
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
            // FCN's dilated ResNet: padding = dilation = 2 and 4, size kept
            (cfg(2, (3, 3), 1, (2, 2), 2, 1), 2, 7, 5),
            (cfg(2, (3, 3), 1, (4, 4), 4, 1), 2, 9, 6),
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

    #[allow(clippy::too_many_arguments)]
    fn tcfg(
        out: u64,
        k: (u64, u64),
        s: u64,
        p: (u64, u64),
        op: (u64, u64),
        groups: u64,
        d: u64,
        bias: bool,
    ) -> ConvTranspose2d {
        ConvTranspose2d {
            out,
            kernel: k,
            stride: (s, s),
            pad: p,
            output_padding: op,
            groups,
            dilation: (d, d),
            bias,
        }
    }

    /// The transposed convolution by its definition: every input pixel scatters its kernel.
    fn transposed_reference(x: &Tensor, w: &Tensor, c: &ConvTranspose2d) -> Tensor {
        let (n, cin, h, wd) = x.dims4().unwrap();
        let x: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let wt: Vec<f64> = w.flatten_all().unwrap().to_vec1().unwrap();
        let (_, per_out, kh, kw) = w.dims4().unwrap();
        let ins = |d: usize| {
            let axis = |i: usize, p: (u64, u64)| if i == 0 { p.0 } else { p.1 } as usize;
            let n = if d == 0 { h } else { wd };
            (n - 1) * axis(d, c.stride)
                + axis(d, c.dilation) * (axis(d, c.kernel) - 1)
                + 1
                + axis(d, c.output_padding)
                - 2 * axis(d, c.pad)
        };
        let (oh, ow) = (ins(0), ins(1));
        let out = c.out as usize;
        let per_in = cin / c.groups as usize;
        let mut y = vec![0.0; n * out * oh * ow];
        for b in 0..n {
            for ci in 0..cin {
                let g = ci / per_in;
                for (iy, ix) in (0..h).flat_map(|i| (0..wd).map(move |j| (i, j))) {
                    let v = x[((b * cin + ci) * h + iy) * wd + ix];
                    for co in 0..per_out {
                        for (ky, kx) in (0..kh).flat_map(|i| (0..kw).map(move |j| (i, j))) {
                            let py = (iy * c.stride.0 as usize + ky * c.dilation.0 as usize) as i64
                                - c.pad.0 as i64;
                            let px = (ix * c.stride.1 as usize + kx * c.dilation.1 as usize) as i64
                                - c.pad.1 as i64;
                            if py < 0 || px < 0 || py >= oh as i64 || px >= ow as i64 {
                                continue;
                            }
                            let o = g * per_out + co;
                            y[((b * out + o) * oh + py as usize) * ow + px as usize] +=
                                v * wt[((ci * per_out + co) * kh + ky) * kw + kx];
                        }
                    }
                }
            }
        }
        Tensor::from_vec(y, (n, out, oh, ow), &candle_core::Device::Cpu).unwrap()
    }

    #[test]
    fn transposed_matches_its_definition_and_finite_differences() {
        for (c, cin, h, w) in [
            // stride 2, output padding 1, two groups (the PyTorch fixture's case)
            (tcfg(4, (3, 3), 2, (1, 1), (1, 1), 2, 1, true), 4, 3, 4),
            (tcfg(3, (3, 3), 1, (0, 0), (0, 0), 1, 1, true), 2, 3, 4),
            (tcfg(2, (4, 4), 2, (1, 1), (0, 0), 1, 1, false), 3, 3, 2),
            // output padding 1 with stride 1 (allowed by dilation 2): candle's own padding
            // would give the input gradient the wrong size
            (tcfg(2, (3, 3), 1, (2, 2), (1, 1), 1, 2, true), 2, 4, 3),
            // non-square kernel and padding, output padding only along H, padding larger
            // than the output padding leaves no zero rows; output padding 2 > pad 1 does
            (tcfg(2, (3, 5), 3, (1, 2), (2, 0), 1, 1, true), 2, 3, 3),
            // d2l's FCN upsampling, scaled down: kernel 2s, padding s/2
            (tcfg(3, (8, 8), 4, (2, 2), (0, 0), 1, 1, true), 3, 2, 3),
        ] {
            let x = random(&[2, cin, h, w], 1);
            let wt = random(
                &[
                    cin,
                    (c.out / c.groups) as usize,
                    c.kernel.0 as usize,
                    c.kernel.1 as usize,
                ],
                2,
            );
            let b = random(&[c.out as usize], 3);
            let expected = c
                .infer(&crate::ir::Shape::new(
                    [2u64, cin as u64, h as u64, w as u64]
                        .map(crate::ir::Dim::Known)
                        .to_vec(),
                ))
                .unwrap();
            let dims: Vec<usize> = expected
                .0
                .iter()
                .map(|d| d.known().unwrap() as usize)
                .collect();
            let y = conv_transpose2d(&x, &wt, None, &c).unwrap();
            assert_eq!(y.dims(), &dims[..], "shape agrees with inference for {c:?}");
            let want = transposed_reference(&x, &wt, &c);
            let err = (y - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(err < 1e-12, "{c:?}: forward differs by {err}");
            if c.bias {
                check_grads(
                    |t| conv_transpose2d(&t[0], &t[1], Some(&t[2]), &c),
                    &[x, wt, b],
                    1e-6,
                );
            } else {
                check_grads(|t| conv_transpose2d(&t[0], &t[1], None, &c), &[x, wt], 1e-6);
            }
        }
    }
}

//! Convolution on our own CPU kernels ([`super::conv_kernel`]) as candle custom ops: candle's
//! autograd calls our backward, which computes the gradient of the input only when the input
//! tracks gradients (not for the data fed to the first layer) and the gradients of the weight
//! and the bias only when they do (a frozen parameter costs nothing). Stride and dilation may
//! differ along H and W, padding is per axis, and rows or columns that no window reaches get a
//! zero gradient.

//!
//! Transposed convolution runs on the same kernels: it is the input gradient of the
//! convolution it transposes (see [`transposed_geometry`]), so its own gradients are that
//! convolution's forward pass (for its input) and weight gradient (for its weight). Groups,
//! per-axis stride, padding and dilation, and any output padding are supported.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
    bail,
};

use super::activation::Clamp;
use super::conv_kernel::{self, Algorithm, Geometry};
use super::kernel::{Float, vectorized};
use super::params::{Param, State};
use crate::ops::conv::{Conv2d, ConvTranspose2d};
use rayon::prelude::*;

/// A convolution layer with its parameters.
pub struct Conv {
    cfg: Conv2d,
    weight: Param,
    bias: Option<Param>,
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
        Ok(Conv {
            cfg: cfg.clone(),
            weight,
            bias,
        })
    }

    /// `[N, C, H, W] -> [N, out, H', W']`, recorded for the backward pass when `grad`.
    pub fn forward(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        let bias = self.bias.as_ref().map(|b| b.read(grad));
        conv2d(x, &self.weight.read(grad), bias.as_ref(), &self.cfg)
    }
}

/// Passes over a convolution's output that a batch norm (and ReLU) takes in evaluation mode
/// when it is not folded into the convolution: one, reading and writing each element
/// (`norm.rs`'s `EvalNormOp`), as the fold reads and writes each element of the weight.
const UNFOLDED_NORM_PASSES: usize = 1;

impl Conv {
    /// Whether folding a following batch norm into this convolution at an evaluation call on
    /// an input of `x_dims` costs less than normalising the output apart: the fold passes once
    /// over the weight, the separate batch norm once over the output. So it pays at
    /// large batches and in the early, wide layers, not for batch 1 in the late layers, whose
    /// weights are large and outputs small.
    pub fn fold_pays(&self, x_dims: &[usize]) -> bool {
        Geometry::new(&self.cfg, x_dims, self.weight.dims()).is_ok_and(|g| {
            self.weight.elem_count() <= UNFOLDED_NORM_PASSES * g.n * g.o * g.oh * g.ow
        })
    }

    /// Evaluation without gradients of this convolution followed by the per-channel map
    /// `y·scale + shift` (a batch norm's, [`super::norm::BatchNorm::eval_affine`]) and, if
    /// given, a ReLU or ReLU6: one convolution with the weight `w·scale` and the bias
    /// `b·scale + shift`, computed from the current parameters at each call, the activation
    /// applied to its output in place. Candle records nothing; the op has no backward.
    pub fn forward_folded(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
        clamp: Option<Clamp>,
    ) -> Result<Tensor> {
        let weight = self.weight.read(false);
        let per_out = scale.reshape((scale.elem_count(), 1, 1, 1))?;
        let weight = weight.broadcast_mul(&per_out)?;
        let bias = match &self.bias {
            Some(b) => (b.read(false).mul(scale)? + shift)?,
            None => shift.clone(),
        };
        let Some(clamp) = clamp else {
            return conv2d(x, &weight, Some(&bias), &self.cfg);
        };
        if !x.device().is_cpu() {
            bail!("conv: only the CPU is supported");
        }
        let g = Geometry::new(&self.cfg, x.dims(), weight.dims())?;
        x.contiguous()?.apply_op3_no_bwd(
            &weight.contiguous()?,
            &bias.contiguous()?,
            &ConvClampOp(g, clamp),
        )
    }
}

/// The convolution of `x: [N, C, H, W]` (CPU, f32 or f64) with an explicit weight
/// `[out, C/groups, kh, kw]` and bias `[out]`, differentiable.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, cfg: &Conv2d) -> Result<Tensor> {
    if !x.device().is_cpu() {
        bail!("conv: only the CPU is supported");
    }
    let g = Geometry::new(cfg, x.dims(), weight.dims())?;
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(b) => {
            if b.dims() != [g.o] {
                bail!("conv: bias is {:?}, expected [{}]", b.dims(), g.o);
            }
            x.apply_op3(&weight, &b.contiguous()?, ConvOp(g))
        }
        None => x.apply_op2(&weight, ConvOp(g)),
    }
}

/// A transposed convolution layer with its parameters.
pub struct ConvTranspose {
    cfg: ConvTranspose2d,
    weight: Param,
    bias: Option<Param>,
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

    /// `[N, C, H, W] -> [N, out, H', W']`, recorded for the backward pass when `grad`.
    pub fn forward(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        let bias = self.bias.as_ref().map(|b| b.read(grad));
        conv_transpose2d(x, &self.weight.read(grad), bias.as_ref(), &self.cfg)
    }
}

/// The transposed convolution itself, on explicit weight `[C, out/groups, kh, kw]` and bias.
pub fn conv_transpose2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: &ConvTranspose2d,
) -> Result<Tensor> {
    if !x.device().is_cpu() {
        bail!("conv_transpose: only the CPU is supported");
    }
    let g = transposed_geometry(cfg, x.dims(), weight.dims())?;
    let y = x
        .contiguous()?
        .apply_op2(&weight.contiguous()?, ConvTransposeOp(g))?;
    match bias {
        Some(b) => {
            if b.dims() != [g.c] {
                bail!("conv_transpose: bias is {:?}, expected [{}]", b.dims(), g.c);
            }
            y.broadcast_add(&b.reshape((1, g.c, 1, 1))?)
        }
        None => Ok(y),
    }
}

/// The convolution that `cfg` transposes, for an input and a weight of the given dims: it
/// maps the transposed convolution's output `[n, out, H, W]` to its input `[n, C, h, w]` with
/// the same kernel, stride, padding, dilation and groups, and the weight `[C, out/groups, kh,
/// kw]` is that convolution's weight as it stands. `H = (h − 1)·stride − 2·pad +
/// dilation·(kh − 1) + output_padding + 1`; the output padding adds rows that no window of
/// the convolution reaches (zeros in the transposed output).
fn transposed_geometry(cfg: &ConvTranspose2d, x: &[usize], weight: &[usize]) -> Result<Geometry> {
    let &[n, c, h, w] = x else {
        bail!("conv_transpose: input must be [N, C, H, W], got {x:?}");
    };
    if h == 0 || w == 0 {
        bail!("conv_transpose: empty input {x:?}");
    }
    let groups = cfg.groups as usize;
    let out = cfg.out as usize;
    let (kh, kw) = (cfg.kernel.0 as usize, cfg.kernel.1 as usize);
    if groups == 0 || !c.is_multiple_of(groups) || !out.is_multiple_of(groups) {
        bail!(
            "conv_transpose: {c} input and {out} output channels cannot be split into {groups} groups"
        );
    }
    if weight != [c, out / groups, kh, kw] {
        bail!(
            "conv_transpose: weight is {weight:?}, expected {:?}",
            [c, out / groups, kh, kw]
        );
    }
    let pair = |p: (u64, u64)| (p.0 as usize, p.1 as usize);
    let (stride, pad, dilation) = (pair(cfg.stride), pair(cfg.pad), pair(cfg.dilation));
    let output_padding = pair(cfg.output_padding);
    if stride.0 == 0 || stride.1 == 0 || dilation.0 == 0 || dilation.1 == 0 || kh == 0 || kw == 0 {
        bail!("conv_transpose: kernel, stride and dilation must be positive");
    }
    let full = |len: usize, k: usize, s: usize, p: usize, d: usize, op: usize| {
        ((len - 1) * s + d * (k - 1) + op + 1)
            .checked_sub(2 * p)
            .filter(|&l| l > 0)
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "conv_transpose: padding {p} leaves nothing of an output of {len}"
                ))
            })
    };
    Ok(Geometry {
        n,
        c: out,
        h: full(h, kh, stride.0, pad.0, dilation.0, output_padding.0)?,
        w: full(w, kw, stride.1, pad.1, dilation.1, output_padding.1)?,
        o: c,
        kh,
        kw,
        stride,
        pad,
        dilation,
        groups,
        oh: h,
        ow: w,
    })
}

/// The contiguous elements of one operand of type `T`, checked against the dims it must have.
fn operand<'a, T: WithDType>(
    (storage, layout): (&'a CpuStorage, &Layout),
    dims: &[usize],
    what: &str,
) -> Result<&'a [T]> {
    if layout.dims() != dims {
        bail!("conv: the {what} is {:?}, expected {dims:?}", layout.dims());
    }
    let data = T::cpu_storage_as_slice(storage)?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("conv: the {what} is not contiguous"),
    }
}

/// Runs the generic kernel call `$f::<T>(..)` (returning `Result<Vec<T>>`) for the dtype of
/// the first operand, f32 or f64, into a [`CpuStorage`].
macro_rules! by_dtype {
    ($op:expr, $dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => f32::to_cpu_storage_owned($f::<f32>($($arg),*)?),
            DType::F64 => f64::to_cpu_storage_owned($f::<f64>($($arg),*)?),
            other => bail!("{}: only f32 and f64 are supported, got {other:?}", $op),
        }
    };
}

type Operand<'a> = (&'a CpuStorage, &'a Layout);

/// Input, weight and output dims of a geometry.
fn dims(g: &Geometry) -> ([usize; 4], [usize; 4], [usize; 4]) {
    (
        [g.n, g.c, g.h, g.w],
        [g.o, g.c / g.groups, g.kh, g.kw],
        [g.n, g.o, g.oh, g.ow],
    )
}

fn forward<T: Float>(
    g: &Geometry,
    x: Operand<'_>,
    w: Operand<'_>,
    b: Option<Operand<'_>>,
) -> Result<Vec<T>> {
    let (xd, wd, _) = dims(g);
    let b = match b {
        Some(b) => Some(operand::<T>(b, &[g.o], "bias")?),
        None => None,
    };
    Ok(conv_kernel::forward(
        g,
        Algorithm::choose(g),
        operand(x, &xd, "input")?,
        operand(w, &wd, "weight")?,
        b,
    ))
}

/// [`forward`] with a bias, then `max(0, ·)` in place.
fn forward_clamped<T: Float>(
    g: &Geometry,
    clamp: Clamp,
    x: Operand<'_>,
    w: Operand<'_>,
    b: Operand<'_>,
) -> Result<Vec<T>> {
    let mut y = forward::<T>(g, x, w, Some(b))?;
    let clamp = clamp.of_type::<T>();
    y.par_chunks_mut(1 << 14).for_each(|chunk| {
        vectorized(
            #[inline(always)]
            || {
                for v in chunk.iter_mut() {
                    *v = clamp.apply(*v);
                }
            },
        )
    });
    Ok(y)
}

fn input_grad<T: Float>(g: &Geometry, dy: Operand<'_>, w: Operand<'_>) -> Result<Vec<T>> {
    let (_, wd, yd) = dims(g);
    Ok(conv_kernel::input_grad(
        g,
        Algorithm::choose(g),
        operand(dy, &yd, "output gradient")?,
        operand(w, &wd, "weight")?,
    ))
}

fn weight_grad<T: Float>(g: &Geometry, x: Operand<'_>, dy: Operand<'_>) -> Result<Vec<T>> {
    let (xd, _, yd) = dims(g);
    Ok(conv_kernel::weight_grad(
        g,
        Algorithm::choose(g),
        operand(x, &xd, "input")?,
        operand(dy, &yd, "output gradient")?,
    ))
}

fn bias_grad<T: Float>(g: &Geometry, dy: Operand<'_>) -> Result<Vec<T>> {
    let (_, _, yd) = dims(g);
    Ok(conv_kernel::bias_grad(
        g,
        operand(dy, &yd, "output gradient")?,
    ))
}

/// The forward convolution of one geometry, on `(x, w)` or `(x, w, b)`.
struct ConvOp(Geometry);

/// The convolution with a bias followed by a ReLU or ReLU6, for evaluation only (no
/// backward).
struct ConvClampOp(Geometry, Clamp);

impl CustomOp3 for ConvClampOp {
    fn name(&self) -> &'static str {
        "dlc-conv2d-clamp"
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
        let out = by_dtype!(
            "conv",
            s1.dtype(),
            forward_clamped(&self.0, self.1, (s1, l1), (s2, l2), (s3, l3))
        );
        Ok((out, ConvOp(self.0).out_shape()))
    }
}

impl ConvOp {
    fn out_shape(&self) -> Shape {
        Shape::from(dims(&self.0).2.to_vec())
    }

    /// The gradients of `x` and `w` that are wanted.
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(w, &InputGrad(self.0))?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(grad, &WeightGrad(self.0))?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "dlc-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(
            "conv",
            s1.dtype(),
            forward(&self.0, (s1, l1), (s2, l2), None)
        );
        Ok((out, self.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.grads(x, w, &grad.contiguous()?)
    }
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "dlc-conv2d-bias"
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
        let out = by_dtype!(
            "conv",
            s1.dtype(),
            forward(&self.0, (s1, l1), (s2, l2), Some((s3, l3)))
        );
        Ok((out, self.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (dx, dw) = self.grads(x, w, &grad)?;
        let db = if b.track_op() {
            Some(grad.apply_op1_no_bwd(&BiasGrad(self.0))?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// `(dL/dy, w) -> dL/dx` of [`ConvOp`] (not itself differentiable).
struct InputGrad(Geometry);

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "dlc-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(
            "conv backward",
            s1.dtype(),
            input_grad(&self.0, (s1, l1), (s2, l2))
        );
        Ok((out, Shape::from(dims(&self.0).0.to_vec())))
    }
}

/// `(x, dL/dy) -> dL/dw` of [`ConvOp`] (not itself differentiable).
struct WeightGrad(Geometry);

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "dlc-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(
            "conv backward",
            s1.dtype(),
            weight_grad(&self.0, (s1, l1), (s2, l2))
        );
        Ok((out, Shape::from(dims(&self.0).1.to_vec())))
    }
}

/// `dL/dy -> dL/db` of [`ConvOp`] (not itself differentiable).
struct BiasGrad(Geometry);

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "dlc-conv2d-bias-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!("conv backward", s.dtype(), bias_grad(&self.0, (s, l)));
        Ok((out, Shape::from(self.0.o)))
    }
}

/// The transposed convolution of `(x, w)`: the input gradient of the convolution of its
/// geometry ([`transposed_geometry`]) applied to `x`.
struct ConvTransposeOp(Geometry);

impl CustomOp2 for ConvTransposeOp {
    fn name(&self) -> &'static str {
        "dlc-conv-transpose2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        InputGrad(self.0).cpu_fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(w, &ConvOp(self.0))?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(grad.apply_op2_no_bwd(x, &WeightGrad(self.0))?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Dim, Shape as IrShape};
    use crate::lower::gradcheck::{check_grads, max_abs_diff, random};

    /// A config: `out` channels, kernel, stride, pad, dilation (each `(H, W)`), groups.
    fn cfg(
        out: u64,
        kernel: (u64, u64),
        stride: (u64, u64),
        pad: (u64, u64),
        dilation: (u64, u64),
        groups: u64,
    ) -> Conv2d {
        Conv2d {
            out,
            kernel,
            stride,
            pad,
            dilation,
            groups,
            bias: true,
        }
    }

    /// Random `(x, w, b)` for `c` on an `[n, cin, h, w]` input.
    fn operands(c: &Conv2d, [n, cin, h, w]: [usize; 4], seed: u64) -> [Tensor; 3] {
        let (kh, kw) = (c.kernel.0 as usize, c.kernel.1 as usize);
        let out = c.out as usize;
        [
            random(&[n, cin, h, w], seed),
            random(&[out, cin / c.groups as usize, kh, kw], seed + 1),
            random(&[out], seed + 2),
        ]
    }

    /// `conv2d`, asserting its output shape is what shape inference says.
    fn conv(x: &Tensor, w: &Tensor, b: Option<&Tensor>, c: &Conv2d) -> Result<Tensor> {
        let y = conv2d(x, w, b, c)?;
        let dims: Vec<Dim> = x.dims().iter().map(|&d| Dim::Known(d as u64)).collect();
        let expected: Vec<usize> = c
            .infer(&IrShape::new(dims))
            .unwrap()
            .0
            .iter()
            .map(|d| d.known().unwrap() as usize)
            .collect();
        assert_eq!(
            y.dims(),
            &expected[..],
            "shape agrees with inference for {c:?}"
        );
        Ok(y)
    }

    /// Configs that together cover every path of the kernels: strides, padding and dilation
    /// alike and different along H and W, remainders that leave rows and columns unread,
    /// groups, depthwise (with a channel multiplier), one input channel, pointwise.
    fn configs() -> Vec<(Conv2d, [usize; 4])> {
        vec![
            (cfg(3, (3, 3), (2, 2), (1, 1), (1, 1), 1), [2, 2, 7, 9]),
            (cfg(3, (3, 3), (3, 3), (1, 1), (1, 1), 1), [2, 2, 7, 9]),
            (cfg(3, (3, 2), (2, 1), (1, 0), (1, 1), 1), [3, 2, 8, 5]),
            (cfg(2, (3, 3), (1, 1), (2, 2), (2, 2), 1), [2, 2, 6, 6]),
            // FCN's dilated ResNet: padding = dilation = 2 and 4, size kept
            (cfg(2, (3, 3), (1, 1), (2, 2), (2, 2), 1), [2, 2, 7, 5]),
            (cfg(2, (3, 3), (1, 1), (4, 4), (4, 4), 1), [2, 2, 9, 6]),
            (cfg(2, (3, 2), (1, 2), (1, 2), (1, 2), 1), [2, 3, 7, 8]),
            (cfg(2, (3, 5), (1, 1), (1, 2), (1, 1), 1), [2, 2, 6, 7]),
            (cfg(4, (1, 1), (1, 1), (0, 0), (1, 1), 2), [2, 4, 5, 5]),
            (cfg(6, (3, 3), (1, 1), (1, 1), (1, 1), 3), [2, 6, 5, 4]),
            (cfg(4, (1, 1), (2, 2), (0, 0), (1, 1), 1), [2, 3, 5, 6]),
            (cfg(3, (1, 1), (1, 1), (0, 0), (1, 1), 1), [3, 4, 3, 2]),
            (cfg(4, (3, 3), (1, 1), (1, 1), (1, 1), 4), [2, 4, 5, 6]),
            (cfg(4, (3, 3), (2, 2), (1, 1), (1, 1), 4), [2, 4, 7, 6]),
            (cfg(6, (3, 2), (2, 1), (0, 1), (2, 1), 3), [2, 3, 8, 5]),
            (cfg(3, (5, 5), (1, 1), (2, 2), (1, 1), 1), [2, 1, 6, 5]),
            (cfg(2, (2, 2), (3, 2), (0, 0), (1, 1), 1), [1, 1, 7, 5]),
            // enough channels and pixels for one GEMM per tap (`Algorithm::Shifted`)
            (cfg(2, (3, 3), (1, 1), (1, 1), (1, 1), 1), [2, 16, 18, 18]),
            // and for Winograd's F(2×2, 3×3) (`Algorithm::Winograd`)
            (cfg(16, (3, 3), (1, 1), (1, 1), (1, 1), 1), [1, 16, 10, 10]),
        ]
    }

    #[test]
    fn gradients_match_finite_differences() {
        for (i, (c, dims)) in configs().into_iter().enumerate() {
            let ops = operands(&c, dims, 10 * i as u64);
            check_grads(|t| conv(&t[0], &t[1], Some(&t[2]), &c), &ops, 1e-6);
            let no_bias = Conv2d { bias: false, ..c };
            check_grads(|t| conv(&t[0], &t[1], None, &no_bias), &ops[..2], 1e-6);
        }
    }

    /// The output and the gradients of `x`, `w`, `b` (those that are variables) for the loss
    /// `sum(y · r)`.
    fn run(
        f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
        [x, w, b]: &[Tensor; 3],
        vars: [bool; 3],
    ) -> (Tensor, [Option<Tensor>; 3]) {
        let track = |t: &Tensor, v: bool| {
            if v {
                candle_core::Var::from_tensor(t)
                    .unwrap()
                    .as_tensor()
                    .clone()
            } else {
                t.clone()
            }
        };
        let (x, w, b) = (track(x, vars[0]), track(w, vars[1]), track(b, vars[2]));
        let y = f(&x, &w, &b).unwrap();
        let r = random(y.dims(), 99).to_dtype(y.dtype()).unwrap();
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |t: &Tensor| g.get(t).cloned();
        (y, [grad(&x), grad(&w), grad(&b)])
    }

    /// Asserts two runs agree to `tol` in the output and in every gradient.
    fn assert_same(
        a: &(Tensor, [Option<Tensor>; 3]),
        b: &(Tensor, [Option<Tensor>; 3]),
        tol: f64,
        what: &str,
    ) {
        assert!(max_abs_diff(&a.0, &b.0) <= tol, "{what}: output");
        for (k, (ga, gb)) in a.1.iter().zip(&b.1).enumerate() {
            match (ga, gb) {
                (Some(ga), Some(gb)) => {
                    let d = max_abs_diff(ga, gb);
                    assert!(d <= tol, "{what}: gradient {k} differs by {d}");
                }
                (None, None) => {}
                _ => panic!("{what}: gradient {k} present in one run only"),
            }
        }
    }

    /// Candle's own `conv2d`, with padding done by hand when it is not square and rows and
    /// columns that no window reaches cropped first (candle's backward fails otherwise): the
    /// plain candle path this module replaces. Square stride and dilation only.
    fn candle_conv2d(x: &Tensor, w: &Tensor, b: &Tensor, c: &Conv2d) -> Result<Tensor> {
        assert_eq!(c.stride.0, c.stride.1);
        assert_eq!(c.dilation.0, c.dilation.1);
        let (s, d) = (c.stride.0 as usize, c.dilation.0 as usize);
        let x = x
            .pad_with_zeros(2, c.pad.0 as usize, c.pad.0 as usize)?
            .pad_with_zeros(3, c.pad.1 as usize, c.pad.1 as usize)?;
        let (_, _, h, wd) = x.dims4()?;
        let reach_h = d * (c.kernel.0 as usize - 1) + 1;
        let reach_w = d * (c.kernel.1 as usize - 1) + 1;
        let x = x.narrow(2, 0, (h - reach_h) / s * s + reach_h)?.narrow(
            3,
            0,
            (wd - reach_w) / s * s + reach_w,
        )?;
        let y = x.conv2d(w, 0, s, d, c.groups as usize)?;
        y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)
    }

    #[test]
    fn matches_the_candle_path() {
        for (i, (c, dims)) in configs().into_iter().enumerate() {
            if c.stride.0 != c.stride.1 || c.dilation.0 != c.dilation.1 {
                continue;
            }
            let ops = operands(&c, dims, 100 + i as u64);
            for dtype in [DType::F64, DType::F32] {
                let ops = ops.clone().map(|t| t.to_dtype(dtype).unwrap());
                let ours = run(|x, w, b| conv(x, w, Some(b), &c), &ops, [true; 3]);
                let theirs = run(|x, w, b| candle_conv2d(x, w, b, &c), &ops, [true; 3]);
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                assert_same(&ours, &theirs, tol, &format!("{c:?} {dtype:?}"));
            }
        }
    }

    #[test]
    fn larger_layers_match_the_candle_path() {
        // Sizes where chunks of several samples, parallel chunks and GEMMs wider than one
        // register block all happen: LeNet's second layer, a ResNet 3×3 and its stride-2 1×1
        // shortcut, a depthwise 3×3; and one sample, whose output channels are split between
        // the threads (im2col, and one GEMM per tap).
        for (c, dims) in [
            (cfg(32, (3, 3), (2, 2), (1, 1), (1, 1), 1), [1, 16, 12, 12]),
            (cfg(32, (3, 3), (1, 1), (1, 1), (1, 1), 1), [1, 16, 24, 24]),
            (cfg(16, (5, 5), (1, 1), (0, 0), (1, 1), 1), [9, 6, 14, 14]),
            (cfg(32, (3, 3), (1, 1), (1, 1), (1, 1), 1), [5, 16, 12, 12]),
            (cfg(32, (1, 1), (2, 2), (0, 0), (1, 1), 1), [5, 16, 12, 12]),
            (cfg(24, (3, 3), (2, 2), (1, 1), (1, 1), 24), [5, 24, 13, 13]),
        ] {
            let ops = operands(&c, dims, 7);
            let ours = run(|x, w, b| conv(x, w, Some(b), &c), &ops, [true; 3]);
            let theirs = run(|x, w, b| candle_conv2d(x, w, b, &c), &ops, [true; 3]);
            assert_same(&ours, &theirs, 1e-11, &format!("{c:?}"));
        }
    }

    #[test]
    fn gradients_nobody_needs_are_not_computed() {
        let c = cfg(4, (3, 3), (1, 1), (1, 1), (1, 1), 1);
        let ops = operands(&c, [2, 3, 5, 5], 3);
        let all = run(|x, w, b| conv(x, w, Some(b), &c), &ops, [true; 3]);
        for vars in [
            [false, true, true],
            [true, false, true],
            [true, true, false],
            [false, false, true],
        ] {
            let some = run(|x, w, b| conv(x, w, Some(b), &c), &ops, vars);
            for k in 0..3 {
                match &some.1[k] {
                    Some(g) => {
                        assert!(vars[k]);
                        assert_eq!(max_abs_diff(g, all.1[k].as_ref().unwrap()), 0.0);
                    }
                    None => assert!(!vars[k], "gradient {k} missing for {vars:?}"),
                }
            }
        }
    }

    #[test]
    fn thread_count_does_not_change_results() {
        for (c, dims) in [
            (cfg(8, (3, 3), (1, 1), (1, 1), (1, 1), 2), [7, 4, 6, 5]),
            (cfg(6, (3, 3), (2, 1), (1, 1), (1, 1), 3), [5, 3, 7, 7]),
            (cfg(5, (1, 1), (1, 1), (0, 0), (1, 1), 1), [3, 4, 9, 9]),
        ] {
            let ops = operands(&c, dims, 11);
            let f = |x: &Tensor, w: &Tensor, b: &Tensor| conv(x, w, Some(b), &c);
            let base = run(f, &ops, [true; 3]);
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let a = pool.install(|| run(f, &ops, [true; 3]));
                let b = pool.install(|| run(f, &ops, [true; 3]));
                assert_same(&a, &b, 0.0, &format!("{c:?}, {threads} threads, run twice"));
                assert_same(&a, &base, 1e-12, &format!("{c:?}, {threads} threads"));
            }
        }
    }

    #[test]
    fn any_input_layout() {
        let c = cfg(4, (3, 3), (2, 2), (1, 1), (1, 1), 1);
        let x = random(&[2, 3, 9, 7], 5);
        let [_, w, b] = operands(&c, [2, 3, 7, 9], 6);
        let view = x.transpose(2, 3).unwrap();
        assert!(!view.is_contiguous());
        let a = conv(&view, &w, Some(&b), &c).unwrap();
        let b2 = conv(&view.contiguous().unwrap(), &w, Some(&b), &c).unwrap();
        assert_eq!(max_abs_diff(&a, &b2), 0.0);
        check_grads(
            |t| conv(&t[0].transpose(2, 3)?, &t[1], Some(&t[2]), &c),
            &[x, w, b],
            1e-6,
        );
    }

    #[test]
    fn f32_matches_f64() {
        let c = cfg(6, (3, 3), (1, 1), (1, 1), (1, 1), 3);
        let ops = operands(&c, [3, 6, 8, 8], 12);
        let a = run(|x, w, b| conv(x, w, Some(b), &c), &ops, [true; 3]);
        let ops32 = ops.clone().map(|t| t.to_dtype(DType::F32).unwrap());
        let b = run(|x, w, b| conv(x, w, Some(b), &c), &ops32, [true; 3]);
        assert_eq!(b.0.dtype(), DType::F32);
        assert_same(&a, &b, 1e-5, "f32 vs f64");
    }

    #[test]
    fn rejects_bad_operands() {
        let c = cfg(4, (3, 3), (1, 1), (0, 0), (1, 1), 2);
        let [x, w, b] = operands(&c, [1, 4, 5, 5], 1);
        assert!(conv2d(&x, &w, Some(&b), &c).is_ok());
        assert!(conv2d(&x, &w.narrow(1, 0, 1).unwrap(), Some(&b), &c).is_err());
        assert!(conv2d(&x, &w, Some(&b.narrow(0, 0, 3).unwrap()), &c).is_err());
        assert!(conv2d(&x.narrow(1, 0, 3).unwrap(), &w, Some(&b), &c).is_err());
        assert!(conv2d(&x.narrow(2, 0, 2).unwrap(), &w, Some(&b), &c).is_err());
        assert!(conv2d(&random(&[4, 5, 5], 1), &w, Some(&b), &c).is_err());
        let ints = x.to_dtype(DType::U32).unwrap();
        assert!(conv2d(&ints, &w.to_dtype(DType::U32).unwrap(), None, &c).is_err());
        let mixed = conv2d(&x.to_dtype(DType::F32).unwrap(), &w, None, &c);
        assert!(mixed.is_err());
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
    fn transposed_matches_the_candle_path() {
        // d2l's FCN upsampling head at a smaller size (kernel 16, stride 8, padding 4), f32.
        let c = tcfg(6, (16, 16), 8, (4, 4), (0, 0), 1, 1, false);
        let x = random(&[2, 5, 6, 7], 1).to_dtype(DType::F32).unwrap();
        let wt = random(&[5, 6, 16, 16], 2).to_dtype(DType::F32).unwrap();
        let r = random(&[2, 6, 48, 56], 3).to_dtype(DType::F32).unwrap();
        let run = |f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>| {
            let (xv, wv) = (
                candle_core::Var::from_tensor(&x).unwrap(),
                candle_core::Var::from_tensor(&wt).unwrap(),
            );
            let y = f(xv.as_tensor(), wv.as_tensor()).unwrap();
            let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = grads.get(xv.as_tensor()).unwrap().clone();
            let dw = grads.get(wv.as_tensor()).unwrap().clone();
            [y, dx, dw]
        };
        let ours = run(&|x, w| conv_transpose2d(x, w, None, &c));
        let candle = run(&|x, w| x.conv_transpose2d(w, 4, 0, 8, 1));
        for (k, (a, b)) in ours.iter().zip(&candle).enumerate() {
            let err = max_abs_diff(a, b);
            assert!(err < 1e-3, "output/dx/dw {k} differs by {err}");
        }
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
            // depthwise (one channel per group: the direct kernels)
            (tcfg(3, (3, 3), 2, (1, 1), (1, 1), 3, 1, true), 3, 3, 4),
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

//! Batch normalisation (batch statistics while training, running statistics updated as
//! PyTorch does: momentum 0.1 and the unbiased batch variance), layer normalisation and local
//! response normalisation. Batch norm in training, batch norm in evaluation without gradients
//! and layer norm are fused custom ops on our own CPU kernels ([`super::norm_kernel`]); the
//! rest is differentiable candle primitives.

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType, bail,
};

use super::activation::Clamp;
use super::kernel::{Float, elements};
use super::norm_kernel::{self, Extent};

use super::params::{Param, State};
use crate::ops::norm::{BatchNorm as BatchNormCfg, LayerNorm as LayerNormCfg, Lrn};

/// A batch-norm layer over axis 1.
pub struct BatchNorm {
    cfg: BatchNormCfg,
    /// A ReLU or ReLU6 fused after the normalisation (see [`BatchNorm::then_clamp`]).
    clamp: Option<Clamp>,
    weight: Param,
    bias: Param,
    running_mean: Param,
    running_var: Param,
}

/// `[C]` reshaped to broadcast against a tensor of `rank` over axis 1.
fn per_channel(t: &Tensor, rank: usize) -> Result<Tensor> {
    let mut shape = vec![1; rank];
    shape[1] = t.elem_count();
    t.reshape(shape)
}

impl BatchNorm {
    /// Creates the parameters and buffers of node `name` for `channels`.
    pub fn new(state: &mut State, name: &str, cfg: &BatchNormCfg, channels: usize) -> Result<Self> {
        Ok(BatchNorm {
            cfg: cfg.clone(),
            clamp: None,
            weight: state.filled(&format!("{name}.weight"), &[channels], 1.0)?,
            bias: state.filled(&format!("{name}.bias"), &[channels], 0.0)?,
            running_mean: state.buffer(&format!("{name}.running_mean"), &[channels], 0.0)?,
            running_var: state.buffer(&format!("{name}.running_var"), &[channels], 1.0)?,
        })
    }

    /// The same layer followed by a ReLU or ReLU6, computed in the same passes over the data.
    pub fn then_clamp(self, clamp: Clamp) -> Self {
        BatchNorm {
            clamp: Some(clamp),
            ..self
        }
    }

    /// Normalises (then applies the fused ReLU, if any); in training also updates the running
    /// statistics. Recorded for the backward pass when `grad`.
    pub fn forward(&self, x: &Tensor, train: bool, grad: bool) -> Result<Tensor> {
        let (w, b) = (&self.weight.read(grad), &self.bias.read(grad));
        if !train && !grad && x.device().is_cpu() && x.rank() >= 2 {
            let (scale, shift, clamp) = self.eval_affine()?;
            return x.contiguous()?.apply_op1_no_bwd(&EvalNormOp {
                scale: scale.to_dtype(DType::F64)?.to_vec1()?,
                shift: shift.to_dtype(DType::F64)?.to_vec1()?,
                clamp,
            });
        }
        if !train {
            let y = self.normalize_running(x, w, b)?;
            return match self.clamp {
                Some(c) => super::activation::activate(&y, c.activation()),
                None => Ok(y),
            };
        }
        let (y, mean, var) = batch_norm_train_then(x, w, b, self.cfg.eps, self.clamp)?;
        let count = x.elem_count() / x.dim(1)?;
        let m = self.cfg.momentum;
        let unbiased = (var * (count as f64 / (count.max(2) - 1) as f64))?;
        let new_mean = ((self.running_mean.read(false) * (1.0 - m))? + (mean * m)?)?;
        let new_var = ((self.running_var.read(false) * (1.0 - m))? + (unbiased * m)?)?;
        self.running_mean.set(&new_mean)?;
        self.running_var.set(&new_var)?;
        Ok(y)
    }

    /// The per-channel map `x·scale + shift` that this layer applies in evaluation mode
    /// (`scale = γ / √(running_var + ε)`, `shift = β − running_mean·scale`), from the current
    /// parameters and statistics, detached; and the ReLU or ReLU6 that follows it. What
    /// [`super::conv::Conv::forward_folded`] folds into the convolution before this layer.
    pub fn eval_affine(&self) -> Result<(Tensor, Tensor, Option<Clamp>)> {
        let scale = (self.running_var.read(false) + self.cfg.eps)?
            .sqrt()?
            .recip()?
            .mul(&self.weight.read(false))?;
        let shift = (self.bias.read(false) - self.running_mean.read(false).mul(&scale)?)?;
        Ok((scale, shift, self.clamp))
    }

    /// Evaluation mode: normalised by the running statistics.
    fn normalize_running(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        let rank = x.rank();
        let inv_std = (per_channel(&self.running_var.read(false), rank)? + self.cfg.eps)?
            .sqrt()?
            .recip()?;
        let normed = x
            .broadcast_sub(&per_channel(&self.running_mean.read(false), rank)?)?
            .broadcast_mul(&inv_std)?;
        normed
            .broadcast_mul(&per_channel(w, rank)?)?
            .broadcast_add(&per_channel(b, rank)?)
    }
}

/// Training-mode batch norm over axis 1 with batch statistics: the output, and the batch mean
/// and biased variance per channel (detached, for the running statistics).
///
/// One fused custom op ([`super::norm_kernel`]) for CPU f32 and f64: its backward computes the
/// gradients of the input, the weight and the bias, each only when that tensor tracks
/// gradients. Other devices and dtypes use the same formula composed of candle primitives.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    batch_norm_train_then(x, weight, bias, eps, None)
}

/// [`batch_norm_train`], followed by `clamp` (ReLU or ReLU6) if given: fused into the same
/// passes, forward and backward, with PyTorch's gradient (zero where the output is clipped).
pub fn batch_norm_train_then(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    clamp: Option<Clamp>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let Some(e) = Extent::of(x.dims()) else {
        bail!("batchnorm: input must be [N, C, ...], got {:?}", x.dims());
    };
    if weight.dims() != [e.c] || bias.dims() != [e.c] {
        bail!(
            "batchnorm: weight {:?} and bias {:?} must be [{}]",
            weight.dims(),
            bias.dims(),
            e.c
        );
    }
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) {
        let (y, mean, var) = batch_norm_composed(x, weight, bias, eps)?;
        let y = match clamp {
            Some(c) => super::activation::activate(&y, c.activation())?,
            None => y,
        };
        return Ok((y, mean, var));
    }
    let stats = Arc::new(OnceLock::new());
    let op = BatchNormOp {
        eps,
        clamp,
        stats: stats.clone(),
    };
    let y = x
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
    let stats: &BatchStats = stats
        .get()
        .ok_or_else(|| candle_core::Error::Msg("batchnorm: statistics not computed".into()))?;
    let tensor = |v: &[f64]| Tensor::new(v, x.device())?.to_dtype(x.dtype());
    Ok((y, tensor(&stats.mean)?, tensor(&stats.var)?))
}

/// [`batch_norm_train`] composed of differentiable candle primitives.
fn batch_norm_composed(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    // Channels first and everything else flattened into one contiguous row per channel:
    // the reductions then run over the last axis, which candle does fastest.
    let xt = x.transpose(0, 1)?;
    let dims = xt.dims().to_vec();
    let rows = xt.flatten_from(1)?.contiguous()?;
    let mean = rows.mean_keepdim(1)?;
    let centered = rows.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(1)?;
    let inv_std = (&var + eps)?.sqrt()?.recip()?;
    let c = weight.elem_count();
    let y = centered
        .broadcast_mul(&inv_std)?
        .broadcast_mul(&weight.reshape((c, 1))?)?
        .broadcast_add(&bias.reshape((c, 1))?)?
        .reshape(dims)?
        .transpose(0, 1)?;
    Ok((y, mean.detach().flatten_all()?, var.detach().flatten_all()?))
}

/// The batch statistics of one [`BatchNormOp`] call, per channel.
#[derive(Debug)]
struct BatchStats {
    mean: Vec<f64>,
    /// Biased variance.
    var: Vec<f64>,
    /// `1 / √(var + eps)`.
    inv_std: Vec<f64>,
}

/// Runs the method `$op.$f::<T>(..)` (returning `Result<Vec<T>>`) for f32 or f64 into a
/// [`CpuStorage`].
macro_rules! by_dtype {
    ($dtype:expr, $op:ident.$f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => f32::to_cpu_storage_owned($op.$f::<f32>($($arg),*)?),
            DType::F64 => f64::to_cpu_storage_owned($op.$f::<f64>($($arg),*)?),
            other => bail!("batchnorm: only f32 and f64 are supported, got {other:?}"),
        }
    };
}

/// Evaluation-mode batch norm without gradients: `x·scale + shift` per channel (the layer's
/// [`BatchNorm::eval_affine`]), then `clamp` if given, in one pass over the data. The
/// differentiable path takes four broadcast ops (and a fifth for the activation), each a pass
/// that allocates its output; this is what a batch norm that is not folded into the
/// convolution before it costs in [`super::Network::infer`] (batch-1 inference's late layers).
struct EvalNormOp {
    scale: Vec<f64>,
    shift: Vec<f64>,
    clamp: Option<Clamp>,
}

impl EvalNormOp {
    fn forward<T: Float>(&self, e: &Extent, x: (&CpuStorage, &Layout)) -> Result<Vec<T>> {
        let x = elements::<T>(x.0, x.1)?;
        // The running mean is inside `shift` already.
        let zero = vec![0.0; e.c];
        Ok(norm_kernel::normalize(
            e,
            x,
            &zero,
            (&self.scale, &self.shift),
            self.clamp,
        ))
    }
}

impl CustomOp1 for EvalNormOp {
    fn name(&self) -> &'static str {
        "dlc-batchnorm-eval"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some(e) = Extent::of(l.dims()) else {
            bail!("batchnorm: input must be [N, C, ...]");
        };
        if self.scale.len() != e.c {
            bail!(
                "batchnorm: {} channels, the input has {}",
                self.scale.len(),
                e.c
            );
        }
        let y = by_dtype!(s.dtype(), self.forward(&e, (s, l)));
        Ok((y, l.shape().clone()))
    }
}

/// Training-mode batch norm of `(x, weight, bias)`, then `clamp` if given; leaves the batch
/// statistics in `stats`.
struct BatchNormOp {
    eps: f64,
    clamp: Option<Clamp>,
    stats: Arc<OnceLock<BatchStats>>,
}

impl BatchNormOp {
    fn forward<T: Float>(
        &self,
        e: &Extent,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: (&CpuStorage, &Layout),
    ) -> Result<Vec<T>> {
        let x = elements::<T>(x.0, x.1)?;
        let to_f64 = |v: &[T]| v.iter().map(|t| t.to_f64()).collect::<Vec<f64>>();
        let w = to_f64(elements::<T>(w.0, w.1)?);
        let b = to_f64(elements::<T>(b.0, b.1)?);
        let (mean, var) = norm_kernel::stats(e, x);
        let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        let scale: Vec<f64> = w.iter().zip(&inv_std).map(|(w, s)| w * s).collect();
        let y = norm_kernel::normalize(e, x, &mean, (&scale, &b), self.clamp);
        self.stats
            .set(BatchStats { mean, var, inv_std })
            .map_err(|_| candle_core::Error::Msg("batchnorm: op run twice".into()))?;
        Ok(y)
    }
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "dlc-batchnorm"
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
        let Some(e) = Extent::of(l1.dims()) else {
            bail!("batchnorm: input must be [N, C, ...]");
        };
        if l2.dims() != [e.c] || l3.dims() != [e.c] {
            bail!("batchnorm: weight and bias must be [{}]", e.c);
        }
        let y = by_dtype!(s1.dtype(), self.forward(&e, (s1, l1), (s2, l2), (s3, l3)));
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !(x.track_op() || w.track_op() || b.track_op()) {
            return Ok((None, None, None));
        }
        let stats = self
            .stats
            .get()
            .ok_or_else(|| candle_core::Error::Msg("batchnorm: backward before forward".into()))?;
        let grad = grad.contiguous()?;
        let sums_op = GradSums {
            clamp: self.clamp,
            mean: stats.mean.clone(),
            inv_std: stats.inv_std.clone(),
            sums: OnceLock::new(),
        };
        // [2, C]: Σ dy (the bias gradient) and Σ dy · x̂ (the weight gradient), `dy` through
        // the ReLU if there is one (`res` is its output).
        let sums = x.apply_op3_no_bwd(&grad, res, &sums_op)?;
        let db = if b.track_op() {
            Some(sums.get(0)?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(sums.get(1)?)
        } else {
            None
        };
        let dx = if x.track_op() {
            let (sum_dy, sum_dy_xhat) = sums_op
                .sums
                .get()
                .ok_or_else(|| candle_core::Error::Msg("batchnorm: sums not computed".into()))?;
            let weight: Vec<f64> = w.to_dtype(DType::F64)?.to_vec1()?;
            let e = Extent::of(x.dims()).expect("checked in the forward pass");
            let coefficients = norm_kernel::input_grad_coefficients(
                e.count(),
                &weight,
                &stats.inv_std,
                sum_dy,
                sum_dy_xhat,
            );
            Some(x.apply_op3_no_bwd(
                &grad,
                res,
                &InputGrad {
                    clamp: self.clamp,
                    mean: stats.mean.clone(),
                    coefficients,
                },
            )?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// `(x, dy, y) -> [Σ dy, Σ dy · x̂]` per channel, `[2, C]`, with `dy` through the fused ReLU
/// (whose output is `y`) if `clamp`; keeps the sums in f64 in `sums`.
struct GradSums {
    clamp: Option<Clamp>,
    mean: Vec<f64>,
    inv_std: Vec<f64>,
    sums: OnceLock<(Vec<f64>, Vec<f64>)>,
}

impl GradSums {
    fn run<T: Float>(
        &self,
        e: &Extent,
        x: (&CpuStorage, &Layout),
        dy: (&CpuStorage, &Layout),
        y: (&CpuStorage, &Layout),
    ) -> Result<Vec<T>> {
        let (x, dy) = (elements::<T>(x.0, x.1)?, elements::<T>(dy.0, dy.1)?);
        let clamped = match self.clamp {
            Some(c) => Some((elements::<T>(y.0, y.1)?, c)),
            None => None,
        };
        let (sum_dy, sum_dy_xc) = norm_kernel::grad_sums(e, x, dy, clamped, &self.mean);
        let sum_dy_xhat: Vec<f64> = sum_dy_xc
            .iter()
            .zip(&self.inv_std)
            .map(|(s, i)| s * i)
            .collect();
        let out = sum_dy
            .iter()
            .chain(&sum_dy_xhat)
            .map(|&v| T::from_f64(v))
            .collect();
        self.sums
            .set((sum_dy, sum_dy_xhat))
            .map_err(|_| candle_core::Error::Msg("batchnorm: sums run twice".into()))?;
        Ok(out)
    }
}

impl CustomOp3 for GradSums {
    fn name(&self) -> &'static str {
        "dlc-batchnorm-grad-sums"
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
        let e = backward_extent(l1, l2, l3)?;
        let out = by_dtype!(s1.dtype(), self.run(&e, (s1, l1), (s2, l2), (s3, l3)));
        Ok((out, Shape::from((2, e.c))))
    }
}

/// The extent of a backward call on `(x, dy, y)`, all of one shape.
fn backward_extent(x: &Layout, dy: &Layout, y: &Layout) -> Result<Extent> {
    let Some(e) = Extent::of(x.dims()) else {
        bail!("batchnorm backward: input must be [N, C, ...]");
    };
    if dy.dims() != x.dims() || y.dims() != x.dims() {
        bail!(
            "batchnorm backward: gradient {:?} and output {:?} for input {:?}",
            dy.dims(),
            y.dims(),
            x.dims()
        );
    }
    Ok(e)
}

/// `(x, dy, y) -> dx = a · dy + b · (x − mean) + d` per channel, `dy` through the fused ReLU
/// if `clamp` (not itself differentiable).
struct InputGrad {
    clamp: Option<Clamp>,
    mean: Vec<f64>,
    coefficients: (Vec<f64>, Vec<f64>, Vec<f64>),
}

impl InputGrad {
    fn run<T: Float>(
        &self,
        e: &Extent,
        x: (&CpuStorage, &Layout),
        dy: (&CpuStorage, &Layout),
        y: (&CpuStorage, &Layout),
    ) -> Result<Vec<T>> {
        let (a, b, d) = &self.coefficients;
        let clamped = match self.clamp {
            Some(c) => Some((elements::<T>(y.0, y.1)?, c)),
            None => None,
        };
        Ok(norm_kernel::input_grad(
            e,
            elements::<T>(x.0, x.1)?,
            elements::<T>(dy.0, dy.1)?,
            clamped,
            &self.mean,
            (a, b, d),
        ))
    }
}

impl CustomOp3 for InputGrad {
    fn name(&self) -> &'static str {
        "dlc-batchnorm-input-grad"
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
        let e = backward_extent(l1, l2, l3)?;
        let out = by_dtype!(s1.dtype(), self.run(&e, (s1, l1), (s2, l2), (s3, l3)));
        Ok((out, l1.shape().clone()))
    }
}

/// A layer-norm layer over the last axis.
pub struct LayerNorm {
    eps: f64,
    weight: Param,
    bias: Param,
}

impl LayerNorm {
    /// Creates the parameters of node `name` for a last axis of size `features`.
    pub fn new(state: &mut State, name: &str, cfg: &LayerNormCfg, features: usize) -> Result<Self> {
        Ok(LayerNorm {
            eps: cfg.eps,
            weight: state.filled(&format!("{name}.weight"), &[features], 1.0)?,
            bias: state.filled(&format!("{name}.bias"), &[features], 0.0)?,
        })
    }

    /// Normalises (the same in training and evaluation); recorded for the backward pass when
    /// `grad`.
    pub fn forward(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        layer_norm(x, &self.weight.read(grad), &self.bias.read(grad), self.eps)
    }
}

/// Layer norm over the last axis with the biased variance, as PyTorch's `nn.LayerNorm(D)`.
///
/// One fused custom op ([`super::norm_kernel::layer_norm`]) for CPU f32 and f64, whose
/// backward gives all three gradients in one pass (candle's own fused layer norm has no
/// backward); other devices and dtypes use [`layer_norm_composed`].
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dims().last().copied().unwrap_or(0);
    if weight.dims() != [d] || bias.dims() != [d] {
        bail!(
            "layernorm: weight {:?} and bias {:?} must be [{d}]",
            weight.dims(),
            bias.dims()
        );
    }
    if d == 0 || !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) {
        return layer_norm_composed(x, weight, bias, eps);
    }
    let op = LayerNormOp {
        eps,
        stats: OnceLock::new(),
    };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

/// [`layer_norm`] composed of differentiable candle primitives.
fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let last = x.rank() - 1;
    let mean = x.mean_keepdim(last)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(last)?;
    let inv_std = (var + eps)?.sqrt()?.recip()?;
    centered
        .broadcast_mul(&inv_std)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// Layer norm of `(x, weight, bias)` over the last axis; keeps each row's mean and `1/σ` for
/// the backward pass.
struct LayerNormOp {
    eps: f64,
    stats: OnceLock<Vec<(f64, f64)>>,
}

impl LayerNormOp {
    fn forward<T: Float>(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: (&CpuStorage, &Layout),
    ) -> Result<Vec<T>> {
        let x = elements::<T>(x.0, x.1)?;
        let (w, b) = (elements::<T>(w.0, w.1)?, elements::<T>(b.0, b.1)?);
        let (y, stats) = norm_kernel::layer_norm(x, w.len(), (w, b), self.eps);
        self.stats
            .set(stats)
            .map_err(|_| candle_core::Error::Msg("layernorm: op run twice".into()))?;
        Ok(y)
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "dlc-layernorm"
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
        let y = by_dtype!(s1.dtype(), self.forward((s1, l1), (s2, l2), (s3, l3)));
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !(x.track_op() || w.track_op() || b.track_op()) {
            return Ok((None, None, None));
        }
        let stats = self
            .stats
            .get()
            .ok_or_else(|| candle_core::Error::Msg("layernorm: backward before forward".into()))?;
        let op = LayerNormGrad {
            stats,
            param_grads: OnceLock::new(),
        };
        let dx = x.apply_op3_no_bwd(&grad.contiguous()?, w, &op)?;
        let (dw, db) = op
            .param_grads
            .get()
            .ok_or_else(|| candle_core::Error::Msg("layernorm: gradients not computed".into()))?;
        let tensor = |v: &[f64]| Tensor::new(v, x.device())?.to_dtype(x.dtype());
        Ok((
            x.track_op().then_some(dx),
            w.track_op().then(|| tensor(dw)).transpose()?,
            b.track_op().then(|| tensor(db)).transpose()?,
        ))
    }
}

/// `(x, dy, weight) -> dx` of [`LayerNormOp`]; leaves the weight and bias gradients (f64) in
/// `param_grads`.
struct LayerNormGrad<'a> {
    stats: &'a [(f64, f64)],
    param_grads: OnceLock<(Vec<f64>, Vec<f64>)>,
}

impl LayerNormGrad<'_> {
    fn run<T: Float>(
        &self,
        x: (&CpuStorage, &Layout),
        dy: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
    ) -> Result<Vec<T>> {
        let w = elements::<T>(w.0, w.1)?;
        let (dx, dw, db) = norm_kernel::layer_norm_backward(
            elements::<T>(x.0, x.1)?,
            elements::<T>(dy.0, dy.1)?,
            w.len(),
            w,
            self.stats,
        );
        self.param_grads
            .set((dw, db))
            .map_err(|_| candle_core::Error::Msg("layernorm: gradients run twice".into()))?;
        Ok(dx)
    }
}

impl CustomOp3 for LayerNormGrad<'_> {
    fn name(&self) -> &'static str {
        "dlc-layernorm-grad"
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
        if l2.dims() != l1.dims() {
            bail!(
                "layernorm backward: gradient {:?} for input {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let dx = by_dtype!(s1.dtype(), self.run((s1, l1), (s2, l2), (s3, l3)));
        Ok((dx, l1.shape().clone()))
    }
}

/// `b_c = a_c / (k + α · mean over the `size` channels around c of a²)^β`, as PyTorch's
/// `LocalResponseNorm` (zero padding, divisor `size`).
pub fn lrn(x: &Tensor, cfg: &Lrn) -> Result<Tensor> {
    let size = cfg.size as usize;
    let c = x.dim(1)?;
    let sq = x.sqr()?.pad_with_zeros(1, size / 2, (size - 1) / 2)?;
    let mut sum = sq.narrow(1, 0, c)?;
    for i in 1..size {
        sum = (sum + sq.narrow(1, i, c)?)?;
    }
    let denom = ((sum * (cfg.alpha / size as f64))? + cfg.k)?.powf(cfg.beta)?;
    x.div(&denom)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::gradcheck::{check_grads, max_abs_diff, random};
    use candle_core::DType;

    #[test]
    fn batch_norm_gradients_match_finite_differences() {
        for shape in [vec![4, 3], vec![2, 3, 5], vec![2, 3, 4, 5]] {
            let inputs = [random(&shape, 1), random(&[3], 2), random(&[3], 3)];
            check_grads(
                |t| Ok(batch_norm_train(&t[0], &t[1], &t[2], 1e-5)?.0),
                &inputs,
                1e-5,
            );
        }
    }

    /// The output and the gradients of `(x, w, b)` (those that are variables) of the loss
    /// `sum(y · r)` for a batch-norm implementation, with its statistics.
    fn run_bn(
        f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor, Tensor)>,
        inputs: &[Tensor; 3],
        vars: [bool; 3],
    ) -> (Vec<Tensor>, [Option<Tensor>; 3]) {
        let t: Vec<Tensor> = inputs
            .iter()
            .zip(vars)
            .map(|(t, v)| {
                if v {
                    candle_core::Var::from_tensor(t)
                        .unwrap()
                        .as_tensor()
                        .clone()
                } else {
                    t.clone()
                }
            })
            .collect();
        let (y, mean, var) = f(&t[0], &t[1], &t[2]).unwrap();
        let r = random(y.dims(), 77).to_dtype(y.dtype()).unwrap();
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |k: usize| g.get(&t[k]).cloned();
        (vec![y, mean, var], [grad(0), grad(1), grad(2)])
    }

    /// Asserts that two [`run_bn`] results (outputs, statistics and the three gradients)
    /// agree within `tol`.
    fn assert_runs_agree(
        a: &(Vec<Tensor>, [Option<Tensor>; 3]),
        b: &(Vec<Tensor>, [Option<Tensor>; 3]),
        tol: f64,
        what: &str,
    ) {
        for (x, y) in a.0.iter().zip(&b.0) {
            assert!(max_abs_diff(x, y) < tol, "{what}: output or stats");
        }
        for k in 0..3 {
            let d = max_abs_diff(a.1[k].as_ref().unwrap(), b.1[k].as_ref().unwrap());
            assert!(d < tol, "{what}: gradient {k} differs by {d}");
        }
    }

    #[test]
    fn fused_batch_norm_matches_the_composed_one() {
        for (shape, seed) in [
            (vec![4, 3], 1),
            (vec![2, 3, 5], 2),
            (vec![3, 4, 5, 6], 3),
            (vec![5, 2, 17, 3], 4),
        ] {
            let c = shape[1];
            // Off-centre data with a large mean, where a one-pass variance would lose digits.
            let x = ((random(&shape, seed) * 3.0).unwrap() + 50.0).unwrap();
            let inputs = [x, random(&[c], seed + 10), random(&[c], seed + 20)];
            for dtype in [DType::F64, DType::F32] {
                let inputs = inputs.clone().map(|t| t.to_dtype(dtype).unwrap());
                let fused = run_bn(
                    |x, w, b| batch_norm_train(x, w, b, 1e-5),
                    &inputs,
                    [true; 3],
                );
                let composed = run_bn(
                    |x, w, b| batch_norm_composed(x, w, b, 1e-5),
                    &inputs,
                    [true; 3],
                );
                let tol = if dtype == DType::F64 { 1e-10 } else { 2e-3 };
                assert_runs_agree(&fused, &composed, tol, &format!("{shape:?} {dtype:?}"));
            }
        }
    }

    #[test]
    fn fused_clamps_match_batch_norm_then_the_activation() {
        use crate::lower::activation::activate;
        // A weight of about 4 puts some outputs above 6, where ReLU6 clips.
        let weight = (random(&[3], 8) + 4.0).unwrap();
        let inputs = [random(&[4, 3, 5, 6], 7), weight, random(&[3], 9)];
        for clamp in [Clamp::RELU, Clamp::RELU6] {
            for dtype in [DType::F64, DType::F32] {
                let inputs = inputs.clone().map(|t| t.to_dtype(dtype).unwrap());
                let fused = run_bn(
                    |x, w, b| batch_norm_train_then(x, w, b, 1e-5, Some(clamp)),
                    &inputs,
                    [true; 3],
                );
                let separate = run_bn(
                    |x, w, b| {
                        let (y, m, v) = batch_norm_train(x, w, b, 1e-5)?;
                        Ok((activate(&y, clamp.activation())?, m, v))
                    },
                    &inputs,
                    [true; 3],
                );
                let y: Vec<f64> = fused.0[0]
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert!(y.contains(&0.0) && y.iter().any(|&v| v > 0.0 && v < 6.0));
                assert_eq!(
                    clamp == Clamp::RELU,
                    y.iter().any(|&v| v > 6.0),
                    "{clamp:?}"
                );
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                assert_runs_agree(&fused, &separate, tol, &format!("{clamp:?} {dtype:?}"));
            }
            check_grads(
                |t| Ok(batch_norm_train_then(&t[0], &t[1], &t[2], 1e-5, Some(clamp))?.0),
                &inputs,
                1e-5,
            );
        }
    }

    #[test]
    fn batch_norm_skips_gradients_nobody_needs() {
        let inputs = [random(&[3, 2, 4, 4], 1), random(&[2], 2), random(&[2], 3)];
        let all = run_bn(
            |x, w, b| batch_norm_train(x, w, b, 1e-5),
            &inputs,
            [true; 3],
        );
        for vars in [
            [false, true, true],
            [true, false, false],
            [false, false, true],
        ] {
            let some = run_bn(|x, w, b| batch_norm_train(x, w, b, 1e-5), &inputs, vars);
            for k in 0..3 {
                assert_eq!(some.1[k].is_some(), vars[k], "gradient {k} for {vars:?}");
                if let Some(g) = &some.1[k] {
                    assert_eq!(max_abs_diff(g, all.1[k].as_ref().unwrap()), 0.0);
                }
            }
        }
    }

    #[test]
    fn batch_norm_of_a_non_contiguous_input() {
        let x = random(&[3, 5, 2, 4], 4);
        let inputs = [random(&[2], 5), random(&[2], 6)];
        check_grads(
            |t| Ok(batch_norm_train(&t[0].transpose(1, 2)?, &t[1], &t[2], 1e-5)?.0),
            &[x, inputs[0].clone(), inputs[1].clone()],
            1e-5,
        );
    }

    /// Evaluation without gradients (one pass, `EvalNormOp`) equals the differentiable
    /// evaluation path, with and without a fused ReLU or ReLU6, on running statistics that a
    /// training step moved off their initial values.
    #[test]
    fn evaluation_without_gradients_is_the_differentiable_evaluation() {
        let dev = candle_core::Device::Cpu;
        let x = (random(&[2, 3, 5, 6], 5) * 8.0).unwrap();
        for clamp in [None, Some(Clamp::RELU), Some(Clamp::RELU6)] {
            let mut state = State::new(&dev, DType::F64, Default::default(), 0);
            let cfg = BatchNormCfg {
                eps: 1e-5,
                momentum: 0.5,
            };
            let mut bn = BatchNorm::new(&mut state, "bn", &cfg, 3).unwrap();
            bn.weight.set(&(random(&[3], 2) + 4.0).unwrap()).unwrap();
            bn.bias.set(&random(&[3], 3)).unwrap();
            bn.forward(&(random(&[4, 3, 5, 6], 4) * 3.0).unwrap(), true, false)
                .unwrap();
            if let Some(c) = clamp {
                bn = bn.then_clamp(c);
            }
            let fast = bn.forward(&x, false, false).unwrap();
            let recorded = bn.forward(&x, false, true).unwrap();
            let diff = max_abs_diff(&fast, &recorded);
            assert!(diff < 1e-12, "{clamp:?}: {diff}");
            let y: Vec<f64> = fast.flatten_all().unwrap().to_vec1().unwrap();
            if clamp.is_some() {
                assert!(y.contains(&0.0) && y.iter().any(|&v| v > 0.0), "{clamp:?}");
            }
            assert_eq!(
                clamp == Some(Clamp::RELU6),
                y.iter().all(|&v| v <= 6.0),
                "{clamp:?}"
            );
        }
    }

    #[test]
    fn running_statistics_follow_pytorch() {
        let dev = candle_core::Device::Cpu;
        let mut state = State::new(&dev, candle_core::DType::F64, Default::default(), 0);
        let bn = BatchNorm::new(
            &mut state,
            "bn",
            &BatchNormCfg {
                eps: 1e-5,
                momentum: 0.1,
            },
            1,
        )
        .unwrap();
        // One channel, values 1..=4: mean 2.5, unbiased variance 5/3.
        let x = Tensor::new(&[[1.0f64], [2.0], [3.0], [4.0]], &dev).unwrap();
        bn.forward(&x, true, true).unwrap();
        let mean = bn.running_mean.as_tensor().to_vec1::<f64>().unwrap()[0];
        let var = bn.running_var.as_tensor().to_vec1::<f64>().unwrap()[0];
        assert!((mean - 0.25).abs() < 1e-12, "{mean}");
        assert!((var - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-12, "{var}");
    }

    #[test]
    fn layer_norm_gradients_match_finite_differences() {
        for shape in [vec![4, 6], vec![2, 3, 5]] {
            let d = shape[shape.len() - 1];
            let inputs = [random(&shape, 1), random(&[d], 2), random(&[d], 3)];
            check_grads(|t| layer_norm(&t[0], &t[1], &t[2], 1e-5), &inputs, 1e-5);
        }
        // Rows split over several parallel blocks, and a non-contiguous input.
        let inputs = [random(&[3, 7, 4], 4), random(&[7], 5), random(&[7], 6)];
        check_grads(
            |t| layer_norm(&t[0].transpose(1, 2)?, &t[1], &t[2], 1e-5),
            &inputs,
            1e-5,
        );
    }

    #[test]
    fn fused_layer_norm_matches_the_composed_one() {
        // 9,000 rows of 48: several parallel blocks; off-centre data for the variance.
        let shape = [30, 300, 48];
        let x = ((random(&shape, 11) * 3.0).unwrap() + 20.0).unwrap();
        let inputs = [x, random(&[48], 12), random(&[48], 13)];
        for dtype in [DType::F64, DType::F32] {
            let inputs = inputs.clone().map(|t| t.to_dtype(dtype).unwrap());
            let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>| {
                let vars = inputs
                    .clone()
                    .map(|t| candle_core::Var::from_tensor(&t).unwrap());
                let y = f(
                    vars[0].as_tensor(),
                    vars[1].as_tensor(),
                    vars[2].as_tensor(),
                )
                .unwrap();
                let r = random(&shape, 14).to_dtype(dtype).unwrap();
                let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let g = vars.map(|v| grads.get(v.as_tensor()).unwrap().clone());
                (y, g)
            };
            let fused = run(&|x, w, b| layer_norm(x, w, b, 1e-5));
            let composed = run(&|x, w, b| layer_norm_composed(x, w, b, 1e-5));
            let tol = if dtype == DType::F64 { 1e-9 } else { 1e-3 };
            assert!(
                max_abs_diff(&fused.0, &composed.0) < tol,
                "{dtype:?}: output"
            );
            for k in 0..3 {
                let diff = max_abs_diff(&fused.1[k], &composed.1[k]);
                // Weight and bias gradients sum 9,000 rows: compare relative to their size.
                let scale = composed.1[k].abs().unwrap().max_all().unwrap();
                let scale = scale
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(
                    diff < tol * scale.max(1.0),
                    "{dtype:?}: gradient {k} differs by {diff}"
                );
            }
        }
    }

    #[test]
    fn lrn_gradients_match_finite_differences() {
        let cfg = Lrn {
            size: 5,
            alpha: 1e-2,
            beta: 0.75,
            k: 2.0,
        };
        check_grads(|t| lrn(&t[0], &cfg), &[random(&[2, 7, 3, 3], 1)], 1e-6);
        let cfg = Lrn {
            size: 4,
            alpha: 1e-1,
            beta: 0.5,
            k: 1.0,
        };
        check_grads(|t| lrn(&t[0], &cfg), &[random(&[1, 6, 2, 2], 4)], 1e-6);
    }
}

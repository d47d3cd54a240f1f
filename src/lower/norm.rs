//! Batch normalisation (batch statistics while training, running statistics updated as
//! PyTorch does: momentum 0.1 and the unbiased batch variance), layer normalisation and local
//! response normalisation, all from differentiable candle primitives.

use candle_core::{Result, Tensor, Var};

use super::params::State;
use crate::ops::norm::{BatchNorm as BatchNormCfg, LayerNorm as LayerNormCfg, Lrn};

/// A batch-norm layer over axis 1.
pub struct BatchNorm {
    cfg: BatchNormCfg,
    weight: Var,
    bias: Var,
    running_mean: Var,
    running_var: Var,
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
            weight: state.filled(&format!("{name}.weight"), &[channels], 1.0)?,
            bias: state.filled(&format!("{name}.bias"), &[channels], 0.0)?,
            running_mean: state.buffer(&format!("{name}.running_mean"), &[channels], 0.0)?,
            running_var: state.buffer(&format!("{name}.running_var"), &[channels], 1.0)?,
        })
    }

    /// Normalises; in training also updates the running statistics.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (w, b) = (self.weight.as_tensor(), self.bias.as_tensor());
        if !train {
            let rank = x.rank();
            let inv_std = (per_channel(self.running_var.as_tensor(), rank)? + self.cfg.eps)?
                .sqrt()?
                .recip()?;
            let normed = x
                .broadcast_sub(&per_channel(self.running_mean.as_tensor(), rank)?)?
                .broadcast_mul(&inv_std)?;
            return normed
                .broadcast_mul(&per_channel(w, rank)?)?
                .broadcast_add(&per_channel(b, rank)?);
        }
        let (y, mean, var) = batch_norm_train(x, w, b, self.cfg.eps)?;
        let count = x.elem_count() / x.dim(1)?;
        let m = self.cfg.momentum;
        let unbiased = (var * (count as f64 / (count.max(2) - 1) as f64))?;
        let new_mean = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?;
        let new_var = ((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?;
        self.running_mean.set(&new_mean)?;
        self.running_var.set(&new_var)?;
        Ok(y)
    }
}

/// Training-mode batch norm over axis 1 with batch statistics: the output, and the batch mean
/// and biased variance per channel (detached, for the running statistics).
pub fn batch_norm_train(
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

/// A layer-norm layer over the last axis.
pub struct LayerNorm {
    eps: f64,
    weight: Var,
    bias: Var,
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

    /// Normalises (the same in training and evaluation).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, self.weight.as_tensor(), self.bias.as_tensor(), self.eps)
    }
}

/// Layer norm over the last axis with the biased variance, as PyTorch's `nn.LayerNorm(D)`.
/// Built from primitives with a backward: candle's fused layer norm has none on contiguous
/// input.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
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
    use crate::lower::gradcheck::{check_grads, random};

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
        bn.forward(&x, true).unwrap();
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

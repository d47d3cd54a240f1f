//! Fully connected layer on the last axis.

use candle_core::{Result, Tensor};

use super::params::{Param, State};
use crate::ops::linear::Linear as LinearCfg;

/// `y = x Wᵀ + b`.
pub struct Linear {
    weight: Param,
    bias: Option<Param>,
}

impl Linear {
    /// Creates the parameters of node `name` for `fan_in` input features.
    pub fn new(state: &mut State, name: &str, cfg: &LinearCfg, fan_in: usize) -> Result<Self> {
        let out = cfg.out as usize;
        let weight = state.weight(&format!("{name}.weight"), &[out, fan_in])?;
        let bias = if cfg.bias {
            Some(state.bias(&format!("{name}.bias"), out, fan_in)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// `[N, ..., in] -> [N, ..., out]`, recorded for the backward pass when `grad`.
    pub fn forward(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        let bias = self.bias.as_ref().map(|b| b.read(grad));
        linear(x, &self.weight.read(grad), bias.as_ref())
    }
}

/// The affine map on explicit weight and bias.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = match x.rank() {
        2 => x.matmul(&weight.t()?)?,
        _ => x.broadcast_matmul(&weight.t()?)?,
    };
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::gradcheck::{check_grads, random};

    #[test]
    fn gradients_match_finite_differences() {
        let (w, b) = (random(&[3, 5], 2), random(&[3], 3));
        check_grads(
            |t| linear(&t[0], &t[1], Some(&t[2])),
            &[random(&[4, 5], 1), w.clone(), b.clone()],
            1e-6,
        );
        check_grads(
            |t| linear(&t[0], &t[1], Some(&t[2])),
            &[random(&[2, 3, 5], 1), w, b],
            1e-6,
        );
    }
}

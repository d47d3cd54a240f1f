//! Positions and extra tokens on `[N, T, D]`: the sinusoidal positional encoding (a constant
//! table), the learned positional embedding and the class token (parameters stored under the
//! node's own name).

use candle_core::{Result, Tensor};

use super::params::{Param, State};
use crate::ops::position::PosEnc as PosEncCfg;

/// d2l's `PositionalEncoding`: adds a fixed table of sines and cosines, then dropout.
pub struct PosEnc {
    /// `[max_len, D]`.
    table: Tensor,
    dropout: f64,
    /// `√D` when the input is scaled first, else 1.
    input_scale: f64,
}

/// The table `P[t, 2j] = sin(t / 10000^(2j/D))`, `P[t, 2j+1] = cos(t / 10000^(2j/D))`
/// for `t < len`, as `[len, D]` (`D` even).
pub fn sinusoids(len: usize, d: usize, state: &State) -> Result<Tensor> {
    let values: Vec<f64> = (0..len)
        .flat_map(|t| {
            (0..d).map(move |i| {
                let angle = t as f64 / 10000f64.powf((i - i % 2) as f64 / d as f64);
                if i % 2 == 0 { angle.sin() } else { angle.cos() }
            })
        })
        .collect();
    Tensor::from_vec(values, (len, d), &state.device)?.to_dtype(state.dtype)
}

impl PosEnc {
    /// The table for width `d`.
    pub fn new(state: &State, cfg: &PosEncCfg, d: usize) -> Result<Self> {
        Ok(PosEnc {
            table: sinusoids(cfg.max_len as usize, d, state)?,
            dropout: cfg.dropout,
            input_scale: if cfg.scale { (d as f64).sqrt() } else { 1.0 },
        })
    }

    /// `dropout(x·scale + P[:T])`; dropout only in training.
    pub fn forward(&self, x: &Tensor, train: bool, state: &mut State) -> Result<Tensor> {
        let y = (x * self.input_scale)?.broadcast_add(&self.table.narrow(0, 0, x.dim(1)?)?)?;
        if train && self.dropout > 0.0 {
            let mask = state.dropout_mask(&y, self.dropout)?;
            y.mul(&mask)
        } else {
            Ok(y)
        }
    }
}

/// A learned positional embedding `[1, len, D]`; the first `T` positions are added.
pub struct PosEmbedding {
    embedding: Param,
}

impl PosEmbedding {
    /// The parameter at `name` itself, drawn from N(0, 0.02²) as torchvision and d2l do.
    pub fn new(state: &mut State, name: &str, len: usize, d: usize) -> Result<Self> {
        Ok(PosEmbedding {
            embedding: state.normal(name, &[1, len, d], 0.02)?,
        })
    }

    /// `x + E[:, :T]`, recorded for the backward pass when `grad`.
    pub fn forward(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        add_positions(x, &self.embedding.read(grad))
    }
}

/// `x [N, T, D] + embedding[:, :T]` for an embedding `[1, len, D]`, `len >= T`.
pub fn add_positions(x: &Tensor, embedding: &Tensor) -> Result<Tensor> {
    x.broadcast_add(&embedding.narrow(1, 0, x.dim(1)?)?)
}

/// A learned token `[1, 1, D]` put in front of every sequence.
pub struct ClassToken {
    token: Param,
}

impl ClassToken {
    /// The parameter at `name` itself, zeros as torchvision and d2l start it.
    pub fn new(state: &mut State, name: &str, d: usize) -> Result<Self> {
        Ok(ClassToken {
            token: state.filled(name, &[1, 1, d], 0.0)?,
        })
    }

    /// `[N, T, D] -> [N, T+1, D]`, recorded for the backward pass when `grad`.
    pub fn forward(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        prepend(x, &self.token.read(grad))
    }
}

/// `token [1, 1, D]` repeated over the batch and put before position 0 of `x [N, T, D]`.
pub fn prepend(x: &Tensor, token: &Tensor) -> Result<Tensor> {
    let (n, _, d) = x.dims3()?;
    Tensor::cat(&[&token.broadcast_as((n, 1, d))?.contiguous()?, x], 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::gradcheck::{check_grads, random};
    use candle_core::{DType, Device};

    fn state() -> State {
        State::new(&Device::Cpu, DType::F64, Default::default(), 0)
    }

    #[test]
    fn sinusoids_follow_d2l() {
        let p = sinusoids(50, 8, &state())
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        assert_eq!(p[0], vec![0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
        // Position 7, pair j = 1: frequency 1 / 10000^(2/8) = 0.1.
        assert!((p[7][2] - 0.7f64.sin()).abs() < 1e-15);
        assert!((p[7][3] - 0.7f64.cos()).abs() < 1e-15);
        assert!((p[49][6] - (49.0 / 10000f64.powf(0.75)).sin()).abs() < 1e-15);
    }

    #[test]
    fn posenc_gradients_match_finite_differences() {
        let cfg = PosEncCfg {
            dropout: 0.0,
            max_len: 10,
            scale: true,
        };
        let mut st = state();
        let enc = PosEnc::new(&st, &cfg, 6).unwrap();
        let x = random(&[2, 4, 6], 1);
        let y = enc.forward(&x, false, &mut st).unwrap();
        let expected = ((&x * 6f64.sqrt()).unwrap())
            .broadcast_add(&sinusoids(4, 6, &st).unwrap())
            .unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            expected.flatten_all().unwrap().to_vec1::<f64>().unwrap()
        );
        check_grads(
            |t| enc.forward(&t[0], false, &mut state()),
            std::slice::from_ref(&x),
            1e-6,
        );
    }

    #[test]
    fn pos_embedding_gradients_match_finite_differences() {
        // An embedding longer than the sequence: the unused positions get no gradient.
        check_grads(
            |t| add_positions(&t[0], &t[1]),
            &[random(&[2, 3, 4], 1), random(&[1, 5, 4], 2)],
            1e-6,
        );
    }

    #[test]
    fn class_token_gradients_match_finite_differences() {
        check_grads(
            |t| prepend(&t[0], &t[1]),
            &[random(&[2, 3, 4], 1), random(&[1, 1, 4], 2)],
            1e-6,
        );
    }
}

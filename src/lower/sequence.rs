//! Token lookups: `embedding` (a differentiable row lookup, with PyTorch's `padding_idx`) and
//! `one_hot`. Token ids arrive as an integer tensor (`u8`, `u32` or `i64`); float ids are
//! converted.

use candle_core::{DType, Result, Tensor};

use super::params::{Param, State};
use crate::ops::sequence::Embedding as EmbeddingCfg;

/// An embedding table `[vocab, dim]`.
pub struct Embedding {
    weight: Param,
    /// `[vocab, 1]`: 1 for every row but the padding row, which gets no gradient.
    trainable_rows: Option<Tensor>,
}

impl Embedding {
    /// Creates the weight of node `name`: N(0, 1) as PyTorch, the padding row zero.
    pub fn new(state: &mut State, name: &str, cfg: &EmbeddingCfg) -> Result<Self> {
        let (vocab, dim) = (cfg.vocab as usize, cfg.dim as usize);
        let weight = state.normal(&format!("{name}.weight"), &[vocab, dim], 1.0)?;
        let trainable_rows = match cfg.padding_idx {
            Some(p) => {
                let p = p as usize;
                let zero = Tensor::zeros((1, dim), state.dtype, &state.device)?;
                let w = weight.as_tensor();
                weight.set(&w.slice_assign(&[p..p + 1, 0..dim], &zero)?)?;
                let rows: Vec<f64> = (0..vocab).map(|r| if r == p { 0.0 } else { 1.0 }).collect();
                Some(Tensor::from_vec(rows, (vocab, 1), &state.device)?.to_dtype(state.dtype)?)
            }
            None => None,
        };
        Ok(Embedding {
            weight,
            trainable_rows,
        })
    }

    /// `[N, …]` ids → `[N, …, dim]`, recorded for the backward pass when `grad`.
    pub fn forward(&self, ids: &Tensor, grad: bool) -> Result<Tensor> {
        embedding(ids, &self.weight.read(grad), self.trainable_rows.as_ref())
    }
}

/// Ids as an index tensor: integer types as they are, floats truncated to `u32`.
fn index_ids(ids: &Tensor) -> Result<Tensor> {
    match ids.dtype() {
        DType::U8 | DType::U32 | DType::I64 => Ok(ids.clone()),
        _ => ids.to_dtype(DType::U32),
    }
}

/// Looks up the rows of `weight` [vocab, dim] at `ids`; with `trainable_rows` ([vocab, 1] of
/// ones and zeros) the rows marked 0 keep their value but get no gradient.
pub fn embedding(ids: &Tensor, weight: &Tensor, trainable_rows: Option<&Tensor>) -> Result<Tensor> {
    let weight = match trainable_rows {
        Some(rows) => {
            let frozen = (1.0 - rows)?;
            (weight.broadcast_mul(rows)? + weight.detach().broadcast_mul(&frozen)?)?
        }
        None => weight.clone(),
    };
    let mut dims = ids.dims().to_vec();
    dims.push(weight.dim(1)?);
    weight
        .index_select(&index_ids(ids)?.flatten_all()?, 0)?
        .reshape(dims)
}

/// `[N, …]` ids → `[N, …, classes]` of zeros and ones in `dtype`; an id outside
/// `0..classes` gives a row of zeros.
pub fn one_hot(ids: &Tensor, classes: usize, dtype: DType) -> Result<Tensor> {
    let ids = index_ids(ids)?
        .to_dtype(DType::U32)?
        .unsqueeze(ids.rank())?;
    let classes = Tensor::arange(0u32, classes as u32, ids.device())?;
    ids.broadcast_eq(&classes)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::gradcheck::{check_grads, random};
    use candle_core::Device;

    fn ids() -> Tensor {
        Tensor::new(&[[0u32, 3, 1], [3, 2, 4]], &Device::Cpu).unwrap()
    }

    #[test]
    fn embedding_gradients_match_finite_differences() {
        check_grads(
            |t| embedding(&ids(), &t[0], None),
            &[random(&[5, 4], 1)],
            1e-6,
        );
        let rows = Tensor::new(&[[1.0f64], [1.0], [1.0], [0.0], [1.0]], &Device::Cpu).unwrap();
        // The padding row 3 keeps its value but gets no gradient.
        let weight = random(&[5, 4], 2);
        let grads = {
            let w = candle_core::Var::from_tensor(&weight).unwrap();
            let y = embedding(&ids(), w.as_tensor(), Some(&rows)).unwrap();
            y.sum_all()
                .unwrap()
                .backward()
                .unwrap()
                .remove(w.as_tensor())
                .unwrap()
        };
        let g = grads.to_vec2::<f64>().unwrap();
        assert_eq!(g[3], vec![0.0; 4]);
        assert_eq!(g[0], vec![1.0; 4]);
        assert_eq!(g[1], vec![1.0; 4]);
        let y = embedding(&ids(), &weight, Some(&rows)).unwrap();
        let plain = embedding(&ids(), &weight, None).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            plain.flatten_all().unwrap().to_vec1::<f64>().unwrap()
        );
    }

    #[test]
    fn one_hot_marks_each_id() {
        let y = one_hot(&ids(), 5, DType::F32).unwrap();
        assert_eq!(y.dims(), &[2, 3, 5]);
        let v = y.to_vec3::<f32>().unwrap();
        assert_eq!(v[0][1], vec![0.0, 0.0, 0.0, 1.0, 0.0]);
        assert_eq!(v[1][2], vec![0.0, 0.0, 0.0, 0.0, 1.0]);
        let f = one_hot(&ids().to_dtype(DType::F64).unwrap(), 5, DType::F64).unwrap();
        assert_eq!(f.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap(), v);
    }
}

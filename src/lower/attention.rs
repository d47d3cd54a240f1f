//! Multi-head attention from differentiable candle primitives (projections, batched matrix
//! products, a masked softmax), in one of the two reference parameter layouts: PyTorch's
//! `nn.MultiheadAttention` (`in_proj_weight`, `in_proj_bias`, `out_proj.*`) or d2l's
//! `MultiHeadAttention` (`W_q`, `W_k`, `W_v`, `W_o`).

use candle_core::{DType, Device, Result, Tensor};

use super::linear::linear;
use super::params::{Param, State};
use crate::ops::attention::Attention as AttentionCfg;

/// The score given to masked keys before the softmax, as d2l's `masked_softmax`: their weight
/// underflows to exactly 0, and a query whose keys are all masked spreads its weight evenly
/// (where PyTorch's `-inf` gives NaN).
const MASKED_SCORE: f64 = -1e6;

/// One affine map `x Wᵀ + b`, as tensors (views of the layer's variables).
pub struct Affine {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`, if any.
    pub bias: Option<Tensor>,
}

impl Affine {
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.weight, self.bias.as_ref())
    }
}

/// The four projections of multi-head attention.
pub struct Projections {
    /// Queries.
    pub q: Affine,
    /// Keys.
    pub k: Affine,
    /// Values.
    pub v: Affine,
    /// Output.
    pub o: Affine,
}

/// The parameters, in the layout of one reference.
enum Layout {
    /// `nn.MultiheadAttention`: `in_proj_weight [3D, D]`, `in_proj_bias [3D]`,
    /// `out_proj.weight [D, D]`, `out_proj.bias [D]`.
    Packed {
        in_weight: Param,
        in_bias: Option<Param>,
        out_weight: Param,
        out_bias: Option<Param>,
    },
    /// d2l: `W_q`, `W_k`, `W_v`, `W_o`, each a linear layer `(weight, bias)`.
    Separate([(Param, Option<Param>); 4]),
}

/// A multi-head attention layer.
pub struct Attention {
    layout: Layout,
    width: usize,
    heads: usize,
    cross: bool,
    causal: bool,
    /// The mask value that marks padding: `pad` for token ids, 0 for a 0/1 tensor.
    padding: Option<f64>,
    dropout: f64,
}

impl Attention {
    /// Creates the parameters of node `name` for queries of width `width` and keys and values
    /// of width `kv_width`; `token_mask` says whether the padding mask holds token ids.
    /// Initialisation follows the reference: PyTorch's Xavier-uniform `in_proj_weight` and
    /// zero biases, d2l's default linear layers.
    pub fn new(
        state: &mut State,
        name: &str,
        cfg: &AttentionCfg,
        width: usize,
        kv_width: usize,
        token_mask: bool,
    ) -> Result<Self> {
        let layout = if cfg.packed {
            Layout::Packed {
                in_weight: state.xavier(&format!("{name}.in_proj_weight"), &[3 * width, width])?,
                in_bias: cfg
                    .bias
                    .then(|| state.filled(&format!("{name}.in_proj_bias"), &[3 * width], 0.0))
                    .transpose()?,
                out_weight: state.weight(&format!("{name}.out_proj.weight"), &[width, width])?,
                out_bias: cfg
                    .bias
                    .then(|| state.filled(&format!("{name}.out_proj.bias"), &[width], 0.0))
                    .transpose()?,
            }
        } else {
            let mut linear = |proj: &str, fan_in: usize| -> Result<(Param, Option<Param>)> {
                let weight = state.weight(&format!("{name}.{proj}.weight"), &[width, fan_in])?;
                let bias = cfg
                    .bias
                    .then(|| state.bias(&format!("{name}.{proj}.bias"), width, fan_in))
                    .transpose()?;
                Ok((weight, bias))
            };
            Layout::Separate([
                linear("W_q", width)?,
                linear("W_k", kv_width)?,
                linear("W_v", kv_width)?,
                linear("W_o", width)?,
            ])
        };
        Ok(Attention {
            layout,
            width,
            heads: cfg.heads as usize,
            cross: cfg.cross,
            causal: cfg.causal,
            padding: cfg.masked.then_some(if token_mask {
                cfg.pad.unwrap_or(0) as f64
            } else {
                0.0
            }),
            dropout: cfg.dropout,
        })
    }

    /// The projections as tensors (the packed input projection is split in three rows),
    /// recorded for the backward pass when `grad`.
    fn projections(&self, grad: bool) -> Result<Projections> {
        let affine = |w: &Param, b: &Option<Param>| Affine {
            weight: w.read(grad),
            bias: b.as_ref().map(|b| b.read(grad)),
        };
        Ok(match &self.layout {
            Layout::Packed {
                in_weight,
                in_bias,
                out_weight,
                out_bias,
            } => {
                let d = self.width;
                let part = |i: usize| -> Result<Affine> {
                    Ok(Affine {
                        weight: in_weight.read(grad).narrow(0, i * d, d)?,
                        bias: in_bias
                            .as_ref()
                            .map(|b| b.read(grad).narrow(0, i * d, d))
                            .transpose()?,
                    })
                };
                Projections {
                    q: part(0)?,
                    k: part(1)?,
                    v: part(2)?,
                    o: affine(out_weight, out_bias),
                }
            }
            Layout::Separate([q, k, v, o]) => Projections {
                q: affine(&q.0, &q.1),
                k: affine(&k.0, &k.1),
                v: affine(&v.0, &v.1),
                o: affine(&o.0, &o.1),
            },
        })
    }

    /// `args`: the queries, then the keys and values if cross-attention, then the padding mask
    /// if any. In training, dropout on the attention weights draws from `state`. Recorded for
    /// the backward pass when `grad`.
    pub fn forward(
        &self,
        args: &[&Tensor],
        train: bool,
        grad: bool,
        state: &mut State,
    ) -> Result<Tensor> {
        let query = args[0];
        let kv = if self.cross { args[1] } else { query };
        let padding = self
            .padding
            .zip(args.get(1 + usize::from(self.cross)).copied());
        let keep = keep_mask(
            query.dim(1)?,
            kv.dim(1)?,
            self.causal,
            padding.map(|(pad, m)| (m, pad)),
            query.device(),
        )?;
        let dropout = (train && self.dropout > 0.0).then_some((state, self.dropout));
        multi_head_attention(
            query,
            kv,
            &self.projections(grad)?,
            self.heads,
            keep.as_ref(),
            dropout,
        )
    }
}

/// Which scores to keep, as `u8` broadcastable to `[N, heads, T, S]` (1: attend), or `None`
/// when nothing is masked. `causal` keeps key `s` for query `t` when `s <= t`; `padding` is a
/// `[N, S]` tensor and the value in it that marks a padded key.
pub fn keep_mask(
    t: usize,
    s: usize,
    causal: bool,
    padding: Option<(&Tensor, f64)>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let causal = causal
        .then(|| {
            let rows: Vec<u8> = (0..t)
                .flat_map(|i| (0..s).map(move |j| u8::from(j <= i)))
                .collect();
            Tensor::from_vec(rows, (1, 1, t, s), device)
        })
        .transpose()?;
    let padding = padding
        .map(|(m, pad)| {
            let n = m.dim(0)?;
            m.to_dtype(DType::F64)?.ne(pad)?.reshape((n, 1, 1, s))
        })
        .transpose()?;
    match (causal, padding) {
        (Some(c), Some(p)) => Ok(Some(c.broadcast_mul(&p)?)),
        (c, p) => Ok(c.or(p)),
    }
}

/// Multi-head scaled dot-product attention: queries `[N, T, Dq]`, keys and values
/// `[N, S, Dkv]`, projections to `D` split into `heads` heads of `D / heads`, softmax over the
/// keys of `QKᵀ / √(D / heads)` with masked scores replaced by [`MASKED_SCORE`], optional
/// dropout on the weights (training), weighted sum of the values, heads joined and projected:
/// `[N, T, D]`.
pub fn multi_head_attention(
    query: &Tensor,
    kv: &Tensor,
    p: &Projections,
    heads: usize,
    keep: Option<&Tensor>,
    dropout: Option<(&mut State, f64)>,
) -> Result<Tensor> {
    let (n, t, _) = query.dims3()?;
    let s = kv.dim(1)?;
    let d = p.q.weight.dim(0)?;
    let dh = d / heads;
    // [N, L, D] -> [N, heads, L, D / heads]
    let split = |x: Tensor, len: usize| -> Result<Tensor> {
        x.reshape((n, len, heads, dh))?
            .transpose(1, 2)?
            .contiguous()
    };
    let q = split(p.q.apply(query)?, t)?;
    let k = split(p.k.apply(kv)?, s)?;
    let v = split(p.v.apply(kv)?, s)?;
    let scores = (q.matmul(&k.t()?.contiguous()?)? / (dh as f64).sqrt())?;
    let scores = match keep {
        Some(keep) => {
            let fill = Tensor::full(MASKED_SCORE, scores.shape(), scores.device())?
                .to_dtype(scores.dtype())?;
            keep.broadcast_as(scores.shape())?
                .where_cond(&scores, &fill)?
        }
        None => scores,
    };
    let mut weights = candle_nn::ops::softmax(&scores, 3)?;
    if let Some((state, p)) = dropout {
        weights = weights.mul(&state.dropout_mask(&weights, p)?)?;
    }
    let out = weights
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, t, d))?;
    p.o.apply(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::gradcheck::{check_grads, random};

    /// Projections from consecutive tensors: weights (and biases) of q, k, v, o.
    fn projections(t: &[Tensor], bias: bool) -> Projections {
        let step = if bias { 2 } else { 1 };
        let affine = |i: usize| Affine {
            weight: t[i * step].clone(),
            bias: bias.then(|| t[i * step + 1].clone()),
        };
        Projections {
            q: affine(0),
            k: affine(1),
            v: affine(2),
            o: affine(3),
        }
    }

    /// Random weights (and biases) for q, k, v, o mapping `dq` and `dkv` to `d`.
    fn weights(d: usize, dq: usize, dkv: usize, bias: bool) -> Vec<Tensor> {
        let mut out = Vec::new();
        for (i, fan_in) in [dq, dkv, dkv, d].into_iter().enumerate() {
            out.push(random(&[d, fan_in], 10 + i as u64));
            if bias {
                out.push(random(&[d], 20 + i as u64));
            }
        }
        out
    }

    #[test]
    fn self_attention_gradients_match_finite_differences() {
        let x = random(&[2, 4, 6], 1);
        let mut inputs = vec![x];
        inputs.extend(weights(6, 6, 6, true));
        check_grads(
            |t| multi_head_attention(&t[0], &t[0], &projections(&t[1..], true), 2, None, None),
            &inputs,
            1e-6,
        );
    }

    #[test]
    fn cross_attention_without_bias_gradients_match_finite_differences() {
        let (q, kv) = (random(&[2, 3, 4], 1), random(&[2, 5, 6], 2));
        let mut inputs = vec![q, kv];
        inputs.extend(weights(4, 4, 6, false));
        check_grads(
            |t| multi_head_attention(&t[0], &t[1], &projections(&t[2..], false), 2, None, None),
            &inputs,
            1e-6,
        );
    }

    #[test]
    fn causal_attention_gradients_match_finite_differences() {
        let x = random(&[2, 4, 6], 3);
        let keep = keep_mask(4, 4, true, None, &Device::Cpu).unwrap();
        let mut inputs = vec![x];
        inputs.extend(weights(6, 6, 6, true));
        check_grads(
            |t| {
                multi_head_attention(
                    &t[0],
                    &t[0],
                    &projections(&t[1..], true),
                    3,
                    keep.as_ref(),
                    None,
                )
            },
            &inputs,
            1e-6,
        );
    }

    #[test]
    fn padding_mask_gradients_match_finite_differences() {
        // Example 0 has two padded keys (id 1), example 1 none; with causal masking too.
        let ids = Tensor::new(&[[4u32, 7, 1, 1], [5, 2, 3, 9]], &Device::Cpu).unwrap();
        let (q, kv) = (random(&[2, 3, 4], 4), random(&[2, 4, 4], 5));
        let keep = keep_mask(3, 4, false, Some((&ids, 1.0)), &Device::Cpu).unwrap();
        let mut inputs = vec![q, kv];
        inputs.extend(weights(4, 4, 4, true));
        check_grads(
            |t| {
                multi_head_attention(
                    &t[0],
                    &t[1],
                    &projections(&t[2..], true),
                    2,
                    keep.as_ref(),
                    None,
                )
            },
            &inputs,
            1e-6,
        );
        let x = random(&[2, 4, 4], 6);
        let keep = keep_mask(4, 4, true, Some((&ids, 1.0)), &Device::Cpu).unwrap();
        let mut inputs = vec![x];
        inputs.extend(weights(4, 4, 4, false));
        check_grads(
            |t| {
                multi_head_attention(
                    &t[0],
                    &t[0],
                    &projections(&t[1..], false),
                    1,
                    keep.as_ref(),
                    None,
                )
            },
            &inputs,
            1e-6,
        );
    }

    #[test]
    fn masks_combine_and_padded_keys_get_no_weight() {
        let ids = Tensor::new(&[[4u32, 0, 0]], &Device::Cpu).unwrap();
        let keep = keep_mask(3, 3, true, Some((&ids, 0.0)), &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(
            keep.squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<u8>()
                .unwrap(),
            vec![vec![1, 0, 0], vec![1, 0, 0], vec![1, 0, 0]]
        );
        // One head, identity projections: a masked key's value must not leak into the output.
        let eye = Tensor::eye(2, DType::F64, &Device::Cpu).unwrap();
        let identity = || Affine {
            weight: eye.clone(),
            bias: None,
        };
        let p = Projections {
            q: identity(),
            k: identity(),
            v: identity(),
            o: identity(),
        };
        let x = Tensor::new(
            &[[[1.0f64, 2.0], [30.0, 40.0], [500.0, 600.0]]],
            &Device::Cpu,
        )
        .unwrap();
        let y = multi_head_attention(&x, &x, &p, 1, Some(&keep), None).unwrap();
        // Every query sees only key 0, so every output row is value 0.
        assert_eq!(
            y.squeeze(0).unwrap().to_vec2::<f64>().unwrap(),
            vec![vec![1.0, 2.0]; 3]
        );
    }
}

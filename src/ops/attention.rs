//! Multi-head attention: `attention(heads, kv, causal, mask, pad, bias, dropout, packed)`.
//!
//! Queries `[N, T, D]` attend to keys and values `[N, S, Dkv]` (the queries themselves when
//! `kv` is absent) through `heads` heads of width `D / heads`, scaled dot products and a
//! softmax over the keys, then an output projection back to `D`. The parameters follow one of
//! the two reference layouts by name: PyTorch's `nn.MultiheadAttention` (`packed: true`:
//! `in_proj_weight [3D, D]`, `in_proj_bias [3D]`, `out_proj.weight`, `out_proj.bias`) or d2l's
//! `MultiHeadAttention` (`packed: false`: the linear layers `W_q`, `W_k`, `W_v`, `W_o`).

use super::{
    ArgDefault as D, ArgKind::*, Args, Arity, Cost, Op, OpDef, ShapeError, expect_rank, param,
};
use crate::ir::Shape;

/// Multi-head scaled dot-product attention with input and output projections.
#[derive(Clone, Debug, PartialEq)]
pub struct Attention {
    /// Number of heads; it divides the model width `D`.
    pub heads: u64,
    /// Whether keys and values come from a second tensor (`kv`): cross-attention.
    pub cross: bool,
    /// Whether position `t` may only attend to keys `s <= t` (decoder self-attention).
    pub causal: bool,
    /// Whether a key padding mask (`mask`) is given.
    pub masked: bool,
    /// The token id that marks padding when the mask is a token tensor.
    pub pad: i64,
    /// Whether the projections have biases.
    pub bias: bool,
    /// Dropout on the attention weights while training.
    pub dropout: f64,
    /// PyTorch's packed `in_proj_weight` (true) or d2l's separate `W_q`, `W_k`, `W_v` (false).
    pub packed: bool,
}

/// The attention family.
pub const DEFS: &[OpDef] = &[OpDef {
    name: "attention",
    summary: "multi-head attention on [N, T, D]: self-attention, or cross-attention over `kv`; causal and key padding masks",
    params: &[
        param("heads", PosInt, D::Required),
        param("kv", Tensor, D::Absent),
        param("causal", Bool, D::Bool(false)),
        param("mask", Tensor, D::Absent),
        param("pad", Int, D::Int(0)),
        param("bias", Bool, D::Bool(true)),
        param("dropout", Prob, D::Float(0.0)),
        param("packed", Bool, D::Bool(true)),
    ],
    arity: Arity::One,
    build: |a: &Args| {
        Ok(Op::Attention(Attention {
            heads: a.size("heads"),
            cross: a.has("kv"),
            causal: a.bool("causal"),
            masked: a.has("mask"),
            pad: a.int("pad"),
            bias: a.bool("bias"),
            dropout: a.float("dropout"),
            packed: a.bool("packed"),
        }))
    },
}];

/// The model width of a `[N, T, D]` tensor, refusing token ids and unknown widths.
fn width(shape: &Shape, what: &str) -> Result<u64, ShapeError> {
    if shape.is_tokens() {
        return Err(ShapeError::new(
            "dlc::wrong_dtype",
            format!("`attention` needs real numbers as {what}, but receives {shape}"),
            "turn token ids into vectors first: `embedding(vocab, dim)`",
        ));
    }
    expect_rank(shape, &[3], "attention", &format!("{what} [N, T, D]"))?;
    shape.0[2].known().ok_or_else(|| {
        ShapeError::new(
            "dlc::symbolic_dim",
            format!("`attention` needs a known width of its {what}, but receives {shape}"),
            "give the last axis a fixed size",
        )
    })
}

impl Attention {
    /// `[N, T, D]` (and `kv: [N, S, Dkv]`, `mask: [N, S]`) → `[N, T, D]`.
    pub fn infer(&self, inputs: &[&Shape]) -> Result<Shape, ShapeError> {
        let mut rest = inputs.iter();
        let query = rest.next().ok_or_else(|| {
            ShapeError::new(
                "dlc::no_input",
                "`attention` has no input tensor",
                "declare an `input` first",
            )
        })?;
        let d = width(query, "queries")?;
        if !d.is_multiple_of(self.heads) {
            return Err(ShapeError::new(
                "dlc::width_mismatch",
                format!(
                    "{} heads do not divide the model width {d} of {query}",
                    self.heads
                ),
                format!(
                    "choose a head count that divides {d} (each head attends over {d} / heads features), or change the width"
                ),
            ));
        }
        let keys = if self.cross {
            let kv = rest.next().copied().ok_or_else(|| missing("kv"))?;
            let dkv = width(kv, "keys and values (`kv`)")?;
            if kv.0[0] != query.0[0] {
                return Err(ShapeError::new(
                    "dlc::shape_mismatch",
                    format!("queries {query} and keys and values {kv} have different batch sizes"),
                    "attend over a tensor of the same batch",
                ));
            }
            if self.packed && dkv != d {
                return Err(ShapeError::new(
                    "dlc::width_mismatch",
                    format!(
                        "packed projections need keys and values as wide as the queries, but the queries are {query} and `kv` is {kv}"
                    ),
                    format!(
                        "use separate projections, `packed: false` (d2l's W_q, W_k, W_v map any width to {d}), or project `kv` to {d} first"
                    ),
                ));
            }
            if self.causal {
                return Err(ShapeError::new(
                    "dlc::causal_cross",
                    format!(
                        "a causal mask on cross-attention: the queries {query} attend over another sequence {kv}"
                    ),
                    "a causal mask hides the later positions of the queries' own sequence; drop `causal: true` here (keep it on the decoder's self-attention)",
                ));
            }
            kv
        } else {
            query
        };
        if self.masked {
            let mask = rest.next().copied().ok_or_else(|| missing("mask"))?;
            let expected = Shape(vec![keys.0[0].clone(), keys.0[1].clone()], mask.1);
            if *mask != expected {
                return Err(ShapeError::new(
                    "dlc::shape_mismatch",
                    format!(
                        "the key padding mask {mask} does not match the keys {keys}: it must be {expected}"
                    ),
                    "pass one entry per key: the key sequence's token ids (`mask: src`, padding where id = `pad`) or a [N, S] tensor of 1 (attend) and 0 (padding)",
                ));
            }
        }
        Ok(Shape::new(query.0.clone()))
    }

    /// Projections `4D² (+ 4D)` packed, `2D² + 2·Dkv·D (+ 4D)` separate; MACs per example
    /// `2·T·D² + 2·S·Dkv·D` for the projections and `2·T·S·D` for the scores and the
    /// weighted sum of the values (`None` when `T` or `S` is symbolic).
    pub fn cost(&self, inputs: &[&Shape]) -> Cost {
        let query = inputs[0];
        let keys = if self.cross { inputs[1] } else { query };
        let d = query.0[2].known().unwrap_or(0);
        let dkv = keys.0[2].known().unwrap_or(0);
        let weights = 2 * d * d + 2 * dkv * d;
        let biases = if self.bias { 4 * d } else { 0 };
        let macs = query.0[1]
            .known()
            .zip(keys.0[1].known())
            .map(|(t, s)| 2 * t * d * d + 2 * s * dkv * d + 2 * t * s * d);
        Cost::new(weights + biases, macs)
    }
}

fn missing(arg: &str) -> ShapeError {
    ShapeError::new(
        "dlc::internal",
        format!("`attention` lost its `{arg}` input"),
        "please report this with the spec",
    )
}

//! Normalisation: `bn(eps, momentum)`, `layernorm(eps)` and `lrn(size, alpha, beta, k)`.

use super::{
    ArgDefault as D, ArgKind::*, Args, Arity, Cost, Op, OpDef, ShapeError, expect_rank, param,
};
use crate::ir::{Dim, Shape};

/// Batch normalisation over axis 1 of `[N, C]`, `[N, C, L]` or `[N, C, H, W]`.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNorm {
    /// Added to the variance.
    pub eps: f64,
    /// Running-statistics momentum (PyTorch convention).
    pub momentum: f64,
}

/// Layer normalisation over the last axis of `[N, D]` or `[N, T, D]` (PyTorch's
/// `nn.LayerNorm(D)`: biased variance, weight and bias `[D]`).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNorm {
    /// Added to the variance.
    pub eps: f64,
}

/// Local response normalisation across channels (AlexNet).
#[derive(Clone, Debug, PartialEq)]
pub struct Lrn {
    /// Channels in the window.
    pub size: u64,
    /// Scale.
    pub alpha: f64,
    /// Exponent.
    pub beta: f64,
    /// Additive constant.
    pub k: f64,
}

/// The normalisation family.
pub const DEFS: &[OpDef] = &[
    OpDef {
        name: "bn",
        summary: "batch normalisation over axis 1; weight and bias [C], running mean and variance are buffers",
        params: &[
            param("eps", Float, D::Float(1e-5)),
            param("momentum", Float, D::Float(0.1)),
        ],
        arity: Arity::One,
        build: |a: &Args| {
            Ok(Op::BatchNorm(BatchNorm {
                eps: a.float("eps"),
                momentum: a.float("momentum"),
            }))
        },
    },
    OpDef {
        name: "layernorm",
        summary: "layer normalisation over the last axis (biased variance); weight and bias [D]",
        params: &[param("eps", Float, D::Float(1e-5))],
        arity: Arity::One,
        build: |a: &Args| {
            Ok(Op::LayerNorm(LayerNorm {
                eps: a.float("eps"),
            }))
        },
    },
    OpDef {
        name: "lrn",
        summary: "local response normalisation across `size` neighbouring channels; no parameters",
        params: &[
            param("size", PosInt, D::Int(5)),
            param("alpha", Float, D::Float(1e-4)),
            param("beta", Float, D::Float(0.75)),
            param("k", Float, D::Float(1.0)),
        ],
        arity: Arity::One,
        build: |a: &Args| {
            Ok(Op::Lrn(Lrn {
                size: a.size("size"),
                alpha: a.float("alpha"),
                beta: a.float("beta"),
                k: a.float("k"),
            }))
        },
    },
];

impl BatchNorm {
    /// Shape unchanged; the channel axis must be known.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        expect_rank(input, &[2, 3, 4], "bn", "[N, C], [N, C, L] or [N, C, H, W]")?;
        if input.0[1].known().is_none() {
            return Err(ShapeError::new(
                "dlc::symbolic_dim",
                format!("`bn` needs a known channel count, but its input is {input}"),
                "give axis 1 a fixed size",
            ));
        }
        Ok(input.clone())
    }

    /// `2C` parameters (scale and shift) and `2C` buffers (running mean and variance).
    pub fn cost(&self, input: &Shape) -> Cost {
        let c = input.0[1].known().unwrap_or(0);
        Cost {
            params: 2 * c,
            buffers: 2 * c,
            macs: Some(0),
        }
    }
}

impl LayerNorm {
    /// Shape unchanged; rank at least 2 and the last axis known.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        if input.rank() < 2 {
            return Err(ShapeError::new(
                "dlc::rank_mismatch",
                format!("`layernorm` expects [N, D] or [N, ..., D], but its input is {input}"),
                "`layernorm` takes tensors of rank 2 or more (batch included)",
            ));
        }
        if input.0.last().and_then(Dim::known).is_none() {
            return Err(ShapeError::new(
                "dlc::symbolic_dim",
                format!(
                    "`layernorm` needs a known size of the last axis, but its input is {input}"
                ),
                "give the last axis a fixed size",
            ));
        }
        Ok(input.clone())
    }

    /// `2D` parameters (scale and shift over the last axis), no buffers.
    pub fn cost(&self, input: &Shape) -> Cost {
        let d = input.0.last().and_then(Dim::known).unwrap_or(0);
        Cost::new(2 * d, Some(0))
    }
}

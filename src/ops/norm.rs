//! Normalisation: `bn(eps, momentum)` and `lrn(size, alpha, beta, k)`.

use super::{
    ArgDefault as D, ArgKind::*, Args, Arity, Cost, Op, OpDef, ShapeError, expect_rank, param,
};
use crate::ir::Shape;

/// Batch normalisation over axis 1 of `[N, C]`, `[N, C, L]` or `[N, C, H, W]`.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNorm {
    /// Added to the variance.
    pub eps: f64,
    /// Running-statistics momentum (PyTorch convention).
    pub momentum: f64,
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

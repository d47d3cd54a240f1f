//! Elementwise activations, softmax and dropout.

use super::{ArgDefault as D, ArgKind::*, Args, Arity, Op, OpDef, ShapeError, param};
use crate::ir::Shape;

/// An elementwise activation function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `max(x, 0)`
    Relu,
    /// `min(max(x, 0), 6)`
    Relu6,
    /// `1 / (1 + e^-x)`
    Sigmoid,
    /// `tanh(x)`
    Tanh,
    /// Gaussian error linear unit (exact, erf form).
    Gelu,
    /// `x · sigmoid(x)`
    Silu,
    /// `x · relu6(x + 3) / 6`
    Hardswish,
}

impl Activation {
    /// The name written in specs.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Relu6 => "relu6",
            Activation::Sigmoid => "sigmoid",
            Activation::Tanh => "tanh",
            Activation::Gelu => "gelu",
            Activation::Silu => "silu",
            Activation::Hardswish => "hardswish",
        }
    }
}

/// Softmax along `dim`.
#[derive(Clone, Debug, PartialEq)]
pub struct Softmax {
    /// The axis; negative counts from the end.
    pub dim: i64,
}

/// Dropout with drop probability `p` (identity at inference).
#[derive(Clone, Debug, PartialEq)]
pub struct Dropout {
    /// Probability of zeroing an element while training.
    pub p: f64,
}

macro_rules! activation {
    ($name:literal, $variant:ident, $summary:literal) => {
        OpDef {
            name: $name,
            summary: $summary,
            params: &[],
            arity: Arity::One,
            build: |_: &Args| Ok(Op::Activation(Activation::$variant)),
        }
    };
}

/// The activation family.
pub const DEFS: &[OpDef] = &[
    activation!("relu", Relu, "max(x, 0)"),
    activation!("relu6", Relu6, "min(max(x, 0), 6)"),
    activation!("sigmoid", Sigmoid, "1 / (1 + exp(-x))"),
    activation!("tanh", Tanh, "hyperbolic tangent"),
    activation!("gelu", Gelu, "Gaussian error linear unit, x·Φ(x)"),
    activation!("silu", Silu, "x · sigmoid(x) (swish)"),
    activation!("hardswish", Hardswish, "x · relu6(x + 3) / 6"),
    OpDef {
        name: "softmax",
        summary: "softmax along `dim` (default: the last axis)",
        params: &[param("dim", Int, D::Int(-1))],
        arity: Arity::One,
        build: |a: &Args| Ok(Op::Softmax(Softmax { dim: a.int("dim") })),
    },
    OpDef {
        name: "dropout",
        summary: "zeroes elements with probability `p` while training and scales the rest by 1/(1-p)",
        params: &[param("p", Prob, D::Float(0.5))],
        arity: Arity::One,
        build: |a: &Args| Ok(Op::Dropout(Dropout { p: a.float("p") })),
    },
];

/// Resolves a possibly negative axis against a rank, or explains why it is out of range.
pub(crate) fn resolve_axis(dim: i64, shape: &Shape, op: &str) -> Result<usize, ShapeError> {
    let rank = shape.rank() as i64;
    let axis = if dim < 0 { dim + rank } else { dim };
    if (0..rank).contains(&axis) {
        Ok(axis as usize)
    } else {
        Err(ShapeError::new(
            "dlc::bad_axis",
            format!("`{op}` axis {dim} is out of range for {shape}"),
            format!("use an axis from {} to {}", -rank, rank - 1),
        ))
    }
}

impl Softmax {
    /// Shape unchanged; the axis must exist.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        resolve_axis(self.dim, input, "softmax")?;
        Ok(input.clone())
    }
}

//! Positions and extra tokens for transformers on `[N, T, D]`: `posenc` (sinusoidal, no
//! parameters), `pos_embedding` (learned) and `class_token` (a learned token prepended).
//!
//! `pos_embedding` and `class_token` are each one parameter, stored under the node's own name
//! (`encoder.pos_embedding`, `class_token`), as torchvision and d2l store them.

use std::sync::Arc;

use super::{
    ArgDefault as D, ArgKind::*, Args, Arity, Cost, Op, OpDef, ShapeError, expect_rank, param,
};
use crate::ir::{Dim, Shape};

/// d2l's sinusoidal positional encoding: `X + P[:T]` with
/// `P[t, 2j] = sin(t / 10000^(2j/D))`, `P[t, 2j+1] = cos(t / 10000^(2j/D))`, then dropout.
#[derive(Clone, Debug, PartialEq)]
pub struct PosEnc {
    /// Dropout after the addition, while training.
    pub dropout: f64,
    /// Longest sequence the table covers.
    pub max_len: u64,
    /// Whether the input is first multiplied by `√D` (the Transformer's embedding scaling).
    pub scale: bool,
}

/// A learned positional embedding `[1, len, D]` added to the first `T` positions.
#[derive(Clone, Debug, PartialEq)]
pub struct PosEmbedding {
    /// Positions the parameter holds; `None`: exactly the input's `T`.
    pub len: Option<u64>,
}

/// The position family.
pub const DEFS: &[OpDef] = &[
    OpDef {
        name: "posenc",
        summary: "adds d2l's sinusoidal positional encoding to [N, T, D], then dropout; no parameters",
        params: &[
            param("dropout", Prob, D::Float(0.0)),
            param("max_len", PosInt, D::Int(1000)),
            param("scale", Bool, D::Bool(false)),
        ],
        arity: Arity::One,
        build: |a: &Args| {
            Ok(Op::PosEnc(PosEnc {
                dropout: a.float("dropout"),
                max_len: a.size("max_len"),
                scale: a.bool("scale"),
            }))
        },
    },
    OpDef {
        name: "pos_embedding",
        summary: "adds a learned positional embedding [1, len, D] (default len: the input's T) to [N, T, D]",
        params: &[param("len", PosInt, D::Absent)],
        arity: Arity::One,
        build: |a: &Args| {
            Ok(Op::PosEmbedding(PosEmbedding {
                len: a.has("len").then(|| a.size("len")),
            }))
        },
    },
    OpDef {
        name: "class_token",
        summary: "prepends a learned token [1, 1, D]: [N, T, D] -> [N, T+1, D]",
        params: &[],
        arity: Arity::One,
        build: |_: &Args| Ok(Op::ClassToken),
    },
];

/// Checks a `[N, T, D]` input with a known `D`; returns `(T, D)`.
pub(crate) fn sequence(input: &Shape, op: &str) -> Result<(Dim, u64), ShapeError> {
    expect_rank(input, &[3], op, "a sequence [N, T, D]")?;
    let d = input.0[2].known().ok_or_else(|| {
        ShapeError::new(
            "dlc::symbolic_dim",
            format!("`{op}` needs a known width D, but its input is {input}"),
            "give the last axis a fixed size",
        )
    })?;
    Ok((input.0[1].clone(), d))
}

impl PosEnc {
    /// Shape unchanged; `D` even (sines and cosines interleave), `T <= max_len` when known.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        let (t, d) = sequence(input, "posenc")?;
        if d % 2 != 0 {
            return Err(ShapeError::new(
                "dlc::width_mismatch",
                format!(
                    "`posenc` interleaves sines and cosines, so it needs an even width, but its input is {input}"
                ),
                "make the model width even",
            ));
        }
        if let Some(t) = t.known().filter(|t| *t > self.max_len) {
            return Err(ShapeError::new(
                "dlc::out_of_range",
                format!(
                    "`posenc` covers {} positions, but its input {input} has {t}",
                    self.max_len
                ),
                format!("raise `max_len` to at least {t}"),
            ));
        }
        Ok(input.clone())
    }
}

impl PosEmbedding {
    /// Shape unchanged; `T` known without `len`, `T <= len` with it.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        let (t, _) = sequence(input, "pos_embedding")?;
        match (self.len, t.known()) {
            (None, None) => Err(ShapeError::new(
                "dlc::symbolic_dim",
                format!(
                    "`pos_embedding` without `len` learns one vector per position of its input, but {input} has a symbolic length"
                ),
                "give the longest length: `pos_embedding(len: 512)`",
            )),
            (Some(len), Some(t)) if t > len => Err(ShapeError::new(
                "dlc::out_of_range",
                format!("`pos_embedding` holds {len} positions, but its input {input} has {t}"),
                format!("raise `len` to at least {t}"),
            )),
            _ => Ok(input.clone()),
        }
    }

    /// The parameter's positions: `len`, or the input's `T`.
    pub fn positions(&self, input: &Shape) -> u64 {
        self.len.or_else(|| input.0[1].known()).unwrap_or(0)
    }

    /// `len · D` parameters.
    pub fn cost(&self, input: &Shape) -> Cost {
        let d = input.0[2].known().unwrap_or(0);
        Cost::new(self.positions(input) * d, Some(0))
    }
}

/// `[N, T, D] -> [N, T+1, D]` (a symbolic `T` becomes the symbol `T+1`).
pub fn infer_class_token(input: &Shape) -> Result<Shape, ShapeError> {
    let (t, d) = sequence(input, "class_token")?;
    let longer = match t {
        Dim::Known(t) => Dim::Known(t + 1),
        Dim::Sym(s) => Dim::Sym(Arc::from(format!("{s}+1"))),
    };
    Ok(Shape::new(vec![input.0[0].clone(), longer, Dim::Known(d)]))
}

/// `D` parameters: the token.
pub fn class_token_cost(input: &Shape) -> Cost {
    Cost::new(input.0[2].known().unwrap_or(0), Some(0))
}

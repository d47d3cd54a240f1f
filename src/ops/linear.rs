//! Fully connected layer: `linear(out, bias)` on the last axis.

use super::{ArgDefault as D, ArgKind::*, Args, Arity, Cost, Op, OpDef, ShapeError, param};
use crate::ir::{Dim, Shape};

/// `y = x Wᵀ + b` over the last axis.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    /// Output features.
    pub out: u64,
    /// Whether a bias is added.
    pub bias: bool,
}

/// The linear family.
pub const DEFS: &[OpDef] = &[OpDef {
    name: "linear",
    summary: "fully connected layer on the last axis; weight [out, in]",
    params: &[
        param("out", PosInt, D::Required),
        param("bias", Bool, D::Bool(true)),
    ],
    arity: Arity::One,
    build: |a: &Args| {
        Ok(Op::Linear(Linear {
            out: a.size("out"),
            bias: a.bool("bias"),
        }))
    },
}];

impl Linear {
    /// `[N, ..., in] -> [N, ..., out]`; an image tensor is refused.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        match input.rank() {
            2 | 3 => {}
            4 => {
                return Err(ShapeError::new(
                    "dlc::linear_unflattened",
                    format!("`linear` applied to the image tensor {input}"),
                    "insert `flatten` before it (or `global_avgpool flatten` to pool the spatial axes away)",
                ));
            }
            _ => {
                return Err(ShapeError::new(
                    "dlc::rank_mismatch",
                    format!(
                        "`linear` expects [N, features] or [N, T, features], but its input is {input}"
                    ),
                    "reshape the input",
                ));
            }
        }
        let last = input.0.last().and_then(Dim::known);
        if last.is_none() {
            return Err(ShapeError::new(
                "dlc::symbolic_dim",
                format!(
                    "`linear` needs a known number of input features, but its input is {input}"
                ),
                "give the last axis a fixed size",
            ));
        }
        let mut dims = input.0.clone();
        if let Some(d) = dims.last_mut() {
            *d = Dim::Known(self.out);
        }
        Ok(Shape::new(dims))
    }

    /// `in·out (+ out)` parameters; `in·out` MACs per position.
    pub fn cost(&self, input: &Shape, _output: &Shape) -> Cost {
        let fan_in = input.0.last().and_then(Dim::known).unwrap_or(0);
        let positions = input.0[1..input.rank() - 1]
            .iter()
            .try_fold(1u64, |acc, d| d.known().map(|n| acc * n));
        let params = fan_in * self.out + if self.bias { self.out } else { 0 };
        Cost::new(params, positions.map(|p| p * fan_in * self.out))
    }
}

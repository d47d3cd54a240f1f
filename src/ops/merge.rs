//! Joining tensors: `add` and `concat`.

use super::activation::resolve_axis;
use super::{ArgDefault as D, ArgKind::*, Args, Arity, Op, OpDef, ShapeError, param};
use crate::ir::{Dim, Shape};

/// Concatenation along an axis.
#[derive(Clone, Debug, PartialEq)]
pub struct Concat {
    /// The axis (1: channels).
    pub axis: i64,
}

/// The merge family.
pub const DEFS: &[OpDef] = &[
    OpDef {
        name: "add",
        summary: "elementwise sum of the flowing tensor and the tensors given: `add(skip)`",
        params: &[],
        arity: Arity::Many,
        build: |_: &Args| Ok(Op::Add),
    },
    OpDef {
        name: "concat",
        summary: "joins the flowing tensor and the tensors given along `axis` (default 1, channels)",
        params: &[param("axis", Int, D::Int(1))],
        arity: Arity::Many,
        build: |a: &Args| {
            Ok(Op::Concat(Concat {
                axis: a.int("axis"),
            }))
        },
    },
];

/// All inputs must have the same shape.
pub fn infer_add(inputs: &[&Shape]) -> Result<Shape, ShapeError> {
    let Some(first) = inputs.first() else {
        return Err(ShapeError::new(
            "dlc::no_input",
            "`add` has no inputs",
            "give it tensors to add",
        ));
    };
    if inputs.len() < 2 {
        return Err(ShapeError::new(
            "dlc::arity",
            "`add` needs at least two tensors",
            "pass the other tensor: `add(skip)`",
        ));
    }
    if let Some(other) = inputs.iter().find(|s| **s != *first) {
        return Err(ShapeError::new(
            "dlc::shape_mismatch",
            format!("cannot add tensors of different shapes: {first} and {other}"),
            "both sides of an add must have the same shape",
        ));
    }
    Ok((*first).clone())
}

impl Concat {
    /// Equal shapes except along the axis, which sums.
    pub fn infer(&self, inputs: &[&Shape]) -> Result<Shape, ShapeError> {
        let Some(first) = inputs.first() else {
            return Err(ShapeError::new(
                "dlc::no_input",
                "`concat` has no inputs",
                "give it tensors to join",
            ));
        };
        let axis = resolve_axis(self.axis, first, "concat")?;
        let mut total = 0u64;
        for s in inputs {
            let same_rank = s.rank() == first.rank();
            let off_axis_equal = same_rank
                && s.0
                    .iter()
                    .zip(&first.0)
                    .enumerate()
                    .all(|(i, (a, b))| i == axis || a == b);
            if !off_axis_equal {
                return Err(ShapeError::new(
                    "dlc::concat_mismatch",
                    format!(
                        "cannot concatenate {first} and {s} along axis {axis}: they differ off that axis"
                    ),
                    format!(
                        "every input must match on all axes but {axis}; resize or pad the branches"
                    ),
                ));
            }
            match s.0[axis].known() {
                Some(n) => total += n,
                None => {
                    return Err(ShapeError::new(
                        "dlc::symbolic_dim",
                        format!(
                            "`concat` along axis {axis} needs known sizes, but an input is {s}"
                        ),
                        "concatenate along an axis of fixed size",
                    ));
                }
            }
        }
        let mut dims = first.0.clone();
        dims[axis] = Dim::Known(total);
        Ok(Shape(dims, first.1))
    }
}

//! Inputs and layout: `flatten`, `reshape`.

use super::{ArgDefault as D, ArgKind::*, Args, Arity, Op, OpDef, ShapeError, known_dims, param};
use crate::ir::{Dim, Shape};

/// A graph input.
#[derive(Clone, Debug, PartialEq)]
pub struct Input {
    /// The input's name.
    pub name: String,
    /// Its shape, batch first.
    pub shape: Shape,
}

/// Collapses axes `start..` into one.
#[derive(Clone, Debug, PartialEq)]
pub struct Flatten {
    /// First axis to collapse (1 keeps the batch).
    pub start: usize,
}

/// Reshapes every example; one size may be `-1` (inferred).
#[derive(Clone, Debug, PartialEq)]
pub struct Reshape {
    /// New sizes after the batch axis.
    pub dims: Vec<i64>,
}

/// The layout family.
pub const DEFS: &[OpDef] = &[
    OpDef {
        name: "flatten",
        summary: "collapses axes `start` and after into one: [N, C, H, W] -> [N, C·H·W]",
        params: &[param("start", PosInt, D::Int(1))],
        arity: Arity::One,
        build: |a: &Args| {
            Ok(Op::Flatten(Flatten {
                start: a.size("start") as usize,
            }))
        },
    },
    OpDef {
        name: "reshape",
        summary: "reshapes each example to `shape` (batch kept); one entry may be -1",
        params: &[param("shape", IntList, D::Required)],
        arity: Arity::One,
        build: |a: &Args| {
            let dims = a.list("shape");
            if dims.iter().filter(|d| **d == -1).count() > 1 {
                return Err(("shape", "at most one size may be -1".to_string()));
            }
            if dims.iter().any(|d| *d == 0 || *d < -1) {
                return Err(("shape", "sizes must be positive (or -1 once)".to_string()));
            }
            Ok(Op::Reshape(Reshape { dims }))
        },
    },
];

impl Flatten {
    /// `[N, a, b, ...] -> [N, a·b·...]` from `start`.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        if self.start >= input.rank() {
            return Err(ShapeError::new(
                "dlc::bad_axis",
                format!(
                    "`flatten` from axis {} of {input}, which has only {} axes",
                    self.start,
                    input.rank()
                ),
                "flatten from an existing axis",
            ));
        }
        let tail = known_dims(input, self.start, "flatten")?;
        let mut dims: Vec<Dim> = input.0[..self.start].to_vec();
        dims.push(Dim::Known(tail.iter().product()));
        Ok(Shape::new(dims))
    }
}

impl Reshape {
    /// Keeps the batch, checks the element count.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        let total: u64 = known_dims(input, 1, "reshape")?.iter().product();
        let known: u64 = self
            .dims
            .iter()
            .filter(|d| **d > 0)
            .map(|d| *d as u64)
            .product();
        let fill = if self.dims.contains(&-1) {
            if known == 0 || !total.is_multiple_of(known) {
                None
            } else {
                Some(total / known)
            }
        } else if known == total {
            Some(1)
        } else {
            None
        };
        let Some(fill) = fill else {
            return Err(ShapeError::new(
                "dlc::reshape_size",
                format!(
                    "cannot reshape {input} ({total} elements per example) to {:?}",
                    self.dims
                ),
                "the sizes must multiply to the same element count",
            ));
        };
        let mut dims = vec![input.0[0].clone()];
        dims.extend(
            self.dims
                .iter()
                .map(|d| Dim::Known(if *d == -1 { fill } else { *d as u64 })),
        );
        Ok(Shape::new(dims))
    }
}

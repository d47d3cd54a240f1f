//! Moving axes and picking parts of tensors: `select`, `slice`, `transpose`, `permute`,
//! `broadcast`, and the elementwise product `mul`.
//!
//! The batch axis (0) stays where it is: these ops refuse to move, drop or cut it, so every
//! tensor in a graph keeps the batch first. Layout ops keep the element type, so they also
//! work on token ids.

use super::activation::resolve_axis;
use super::{ArgDefault as D, ArgKind::*, Args, Arity, Op, OpDef, ShapeError, param};
use crate::ir::{Dim, Shape};

/// Picks one index along an axis and drops that axis.
#[derive(Clone, Debug, PartialEq)]
pub struct Select {
    /// The axis (negative counts from the end).
    pub axis: i64,
    /// The index (negative counts from the end of the axis).
    pub index: i64,
}

/// Keeps the range `start..end` of an axis.
#[derive(Clone, Debug, PartialEq)]
pub struct Slice {
    /// The axis (negative counts from the end).
    pub axis: i64,
    /// First index kept (negative counts from the end).
    pub start: i64,
    /// One past the last index kept; the end of the axis when absent.
    pub end: Option<i64>,
}

/// Swaps two axes.
#[derive(Clone, Debug, PartialEq)]
pub struct Transpose {
    /// One axis.
    pub a: i64,
    /// The other.
    pub b: i64,
}

/// Reorders all axes; the batch axis stays first.
#[derive(Clone, Debug, PartialEq)]
pub struct Permute {
    /// New order: output axis `i` is input axis `dims[i]`.
    pub dims: Vec<usize>,
}

/// Inserts an axis and repeats the tensor along it to the size that axis has in another tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Broadcast {
    /// Where the new axis goes (in the output).
    pub axis: i64,
}

/// The layout family.
pub const DEFS: &[OpDef] = &[
    OpDef {
        name: "select",
        summary: "picks `index` along `axis` and drops the axis: select(axis: 1, index: -1) on [N, L, H] gives [N, H]",
        params: &[
            param("axis", Int, D::Required),
            param("index", Int, D::Required),
        ],
        arity: Arity::One,
        build: |a: &Args| {
            Ok(Op::Select(Select {
                axis: a.int("axis"),
                index: a.int("index"),
            }))
        },
    },
    OpDef {
        name: "slice",
        summary: "keeps indices `start` to `end` (exclusive; the end of the axis if omitted) along `axis`",
        params: &[
            param("axis", Int, D::Required),
            param("start", Int, D::Int(0)),
            param("end", Int, D::Absent),
        ],
        arity: Arity::One,
        build: |a: &Args| {
            Ok(Op::Slice(Slice {
                axis: a.int("axis"),
                start: a.int("start"),
                end: a.has("end").then(|| a.int("end")),
            }))
        },
    },
    OpDef {
        name: "transpose",
        summary: "swaps two axes (not the batch): transpose(1, 2) on [N, C, L] gives [N, L, C]",
        params: &[param("a", Int, D::Required), param("b", Int, D::Required)],
        arity: Arity::One,
        build: |a: &Args| {
            Ok(Op::Transpose(Transpose {
                a: a.int("a"),
                b: a.int("b"),
            }))
        },
    },
    OpDef {
        name: "permute",
        summary: "reorders the axes: permute([0, 2, 3, 1]) on [N, C, H, W] gives [N, H, W, C]; axis 0 stays first",
        params: &[param("dims", IntList, D::Required)],
        arity: Arity::One,
        build: |a: &Args| {
            let dims = a.list("dims");
            let n = dims.len() as i64;
            let mut seen = vec![false; dims.len()];
            for &d in &dims {
                if !(0..n).contains(&d) || std::mem::replace(&mut seen[d as usize], true) {
                    return Err((
                        "dims",
                        format!("{dims:?} is not an order of the axes 0 to {}", n - 1),
                    ));
                }
            }
            if dims.first() != Some(&0) {
                return Err(("dims", "the batch axis 0 must stay first".to_string()));
            }
            Ok(Op::Permute(Permute {
                dims: dims.into_iter().map(|d| d as usize).collect(),
            }))
        },
    },
    OpDef {
        name: "broadcast",
        summary: "inserts `axis` and repeats the flowing tensor along it to that axis's size in `like`: [N, H] with like [N, T, E] gives [N, T, H]",
        params: &[param("axis", Int, D::Int(1))],
        arity: Arity::Many,
        build: |a: &Args| {
            Ok(Op::Broadcast(Broadcast {
                axis: a.int("axis"),
            }))
        },
    },
    OpDef {
        name: "mul",
        summary: "elementwise product of the flowing tensor and the tensors given, broadcasting axes of size 1: `mul(gate)`",
        params: &[],
        arity: Arity::Many,
        build: |_: &Args| Ok(Op::Mul),
    },
];

/// Resolves an axis that must not be the batch axis.
fn data_axis(axis: i64, shape: &Shape, op: &str) -> Result<usize, ShapeError> {
    let at = resolve_axis(axis, shape, op)?;
    if at == 0 {
        return Err(ShapeError::new(
            "dlc::bad_axis",
            format!("`{op}` cannot work on the batch axis 0 of {shape}"),
            format!("use an axis from 1 to {}", shape.rank() - 1),
        ));
    }
    Ok(at)
}

/// Resolves a possibly negative index into an axis of known `size`, or names the problem.
fn resolve_index(index: i64, size: u64, what: &str, op: &str) -> Result<u64, ShapeError> {
    let at = if index < 0 {
        index + size as i64
    } else {
        index
    };
    if (0..=size as i64).contains(&at) {
        Ok(at as u64)
    } else {
        Err(ShapeError::new(
            "dlc::out_of_range",
            format!("`{op}` {what} {index} is out of range for an axis of size {size}"),
            format!(
                "use an index from {} to {}",
                -(size as i64),
                size as i64 - 1
            ),
        ))
    }
}

impl Select {
    /// Drops the axis; the index must exist when the axis size is known.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        let axis = data_axis(self.axis, input, "select")?;
        if let Some(size) = input.0[axis].known() {
            let at = resolve_index(self.index, size, "index", "select")?;
            if at == size {
                return Err(ShapeError::new(
                    "dlc::out_of_range",
                    format!(
                        "`select` index {} is out of range for axis {axis} of {input}",
                        self.index
                    ),
                    format!("use an index from {} to {}", -(size as i64), size - 1),
                ));
            }
        }
        let mut dims = input.0.clone();
        dims.remove(axis);
        Ok(Shape(dims, input.1))
    }
}

impl Slice {
    /// The kept range of a known axis, resolved: `(start, end)`.
    pub fn range(&self, size: u64) -> Result<(u64, u64), ShapeError> {
        let start = resolve_index(self.start, size, "start", "slice")?;
        let end = match self.end {
            Some(e) => resolve_index(e, size, "end", "slice")?,
            None => size,
        };
        if start >= end {
            return Err(ShapeError::new(
                "dlc::empty_slice",
                format!("`slice` from {start} to {end} keeps nothing of an axis of size {size}"),
                "`end` is exclusive and must come after `start`",
            ));
        }
        Ok((start, end))
    }

    /// Cuts the axis to `end - start`.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        let axis = data_axis(self.axis, input, "slice")?;
        let size = match (&input.0[axis], self.end) {
            (Dim::Known(n), _) => {
                let (s, e) = self.range(*n)?;
                e - s
            }
            (Dim::Sym(_), Some(e)) if self.start >= 0 && e > self.start => (e - self.start) as u64,
            (Dim::Sym(s), _) => {
                return Err(ShapeError::new(
                    "dlc::symbolic_dim",
                    format!(
                        "`slice` of the symbolic axis `{s}` of {input} needs a fixed, non-negative `start` and `end`"
                    ),
                    "give both `start` and `end` as non-negative indices",
                ));
            }
        };
        let mut dims = input.0.clone();
        dims[axis] = Dim::Known(size);
        Ok(Shape(dims, input.1))
    }
}

impl Transpose {
    /// The two axes, resolved.
    pub fn axes(&self, input: &Shape) -> Result<(usize, usize), ShapeError> {
        Ok((
            data_axis(self.a, input, "transpose")?,
            data_axis(self.b, input, "transpose")?,
        ))
    }

    /// Swaps the two sizes.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        let (a, b) = self.axes(input)?;
        let mut dims = input.0.clone();
        dims.swap(a, b);
        Ok(Shape(dims, input.1))
    }
}

impl Permute {
    /// Reorders the sizes; the order must cover every axis.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        if self.dims.len() != input.rank() {
            return Err(ShapeError::new(
                "dlc::rank_mismatch",
                format!(
                    "`permute` orders {} axes, but its input {input} has {}",
                    self.dims.len(),
                    input.rank()
                ),
                "list every axis once, batch (0) first",
            ));
        }
        let dims = self.dims.iter().map(|&d| input.0[d].clone()).collect();
        Ok(Shape(dims, input.1))
    }
}

impl Broadcast {
    /// `[N, a...]` with `like` → the input with `like`'s size inserted at `axis`.
    pub fn infer(&self, inputs: &[&Shape]) -> Result<Shape, ShapeError> {
        let [input, like] = inputs else {
            return Err(ShapeError::new(
                "dlc::arity",
                format!(
                    "`broadcast` takes one tensor to copy its size from, found {}",
                    inputs.len().saturating_sub(1)
                ),
                "write `broadcast(like, axis: 1)`",
            ));
        };
        let rank = input.rank() as i64 + 1;
        let axis = if self.axis < 0 {
            self.axis + rank
        } else {
            self.axis
        };
        if !(1..rank).contains(&axis) {
            return Err(ShapeError::new(
                "dlc::bad_axis",
                format!(
                    "`broadcast` axis {} is out of range for the result of {input}",
                    self.axis
                ),
                format!("insert the axis at 1 to {}", rank - 1),
            ));
        }
        let axis = axis as usize;
        let Some(size) = like.0.get(axis) else {
            return Err(ShapeError::new(
                "dlc::bad_axis",
                format!("`broadcast` copies the size of axis {axis}, but `like` is {like}"),
                "pass a tensor that has that axis",
            ));
        };
        let mut dims = input.0.clone();
        dims.insert(axis, size.clone());
        Ok(Shape(dims, input.1))
    }
}

/// Elementwise product with broadcasting: equal ranks, each axis equal or 1 in all but one input.
pub fn infer_mul(inputs: &[&Shape]) -> Result<Shape, ShapeError> {
    let Some(first) = inputs.first() else {
        return Err(ShapeError::new(
            "dlc::no_input",
            "`mul` has no inputs",
            "give it tensors to multiply",
        ));
    };
    if inputs.len() < 2 {
        return Err(ShapeError::new(
            "dlc::arity",
            "`mul` needs at least two tensors",
            "pass the other tensor: `mul(gate)`",
        ));
    }
    let mut dims = first.0.clone();
    for s in &inputs[1..] {
        let mismatch = || {
            ShapeError::new(
                "dlc::shape_mismatch",
                format!("cannot multiply tensors of shapes {first} and {s}"),
                "the shapes must have the same rank and agree on every axis, or have size 1 there",
            )
        };
        if s.rank() != dims.len() {
            return Err(mismatch());
        }
        for (d, e) in dims.iter_mut().zip(&s.0) {
            match (d.known(), e.known()) {
                _ if *d == *e => {}
                (Some(1), _) => *d = e.clone(),
                (_, Some(1)) => {}
                _ => return Err(mismatch()),
            }
        }
    }
    Ok(Shape::new(dims))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn shape(dims: &[u64]) -> Shape {
        let mut d = vec![Shape::batch()];
        d.extend(dims.iter().map(|&n| Dim::Known(n)));
        Shape::new(d)
    }

    #[test]
    fn select_drops_the_axis_and_checks_the_index() {
        let s = Select { axis: 1, index: -1 };
        assert_eq!(s.infer(&shape(&[2, 32])).unwrap(), shape(&[32]));
        let bad = Select { axis: 1, index: 2 };
        assert_eq!(
            bad.infer(&shape(&[2, 32])).unwrap_err().code,
            "dlc::out_of_range"
        );
        let batch = Select { axis: 0, index: 0 };
        assert_eq!(batch.infer(&shape(&[2])).unwrap_err().code, "dlc::bad_axis");
    }

    #[test]
    fn slice_resolves_negative_bounds() {
        let s = Slice {
            axis: -1,
            start: 1,
            end: Some(-1),
        };
        assert_eq!(s.infer(&shape(&[3, 10])).unwrap(), shape(&[3, 8]));
        let empty = Slice {
            axis: 1,
            start: 2,
            end: Some(2),
        };
        assert_eq!(
            empty.infer(&shape(&[5])).unwrap_err().code,
            "dlc::empty_slice"
        );
    }

    #[test]
    fn permute_and_transpose_move_sizes() {
        let p = Permute {
            dims: vec![0, 2, 3, 1],
        };
        assert_eq!(p.infer(&shape(&[3, 4, 5])).unwrap(), shape(&[4, 5, 3]));
        let t = Transpose { a: 1, b: 2 };
        assert_eq!(t.infer(&shape(&[3, 4])).unwrap(), shape(&[4, 3]));
    }

    #[test]
    fn broadcast_takes_the_size_from_like() {
        let t = Dim::Sym(Arc::from("T"));
        let like = Shape::new(vec![Shape::batch(), t.clone(), Dim::Known(32)]);
        let out = Broadcast { axis: 1 }
            .infer(&[&shape(&[16]), &like])
            .unwrap();
        assert_eq!(out, Shape::new(vec![Shape::batch(), t, Dim::Known(16)]));
    }

    #[test]
    fn mul_broadcasts_size_one_axes() {
        let x = shape(&[8, 4, 4]);
        let gate = shape(&[8, 1, 1]);
        assert_eq!(infer_mul(&[&x, &gate]).unwrap(), x);
        assert_eq!(
            infer_mul(&[&x, &shape(&[4, 4, 4])]).unwrap_err().code,
            "dlc::shape_mismatch"
        );
    }
}

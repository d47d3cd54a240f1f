//! Resizing the spatial axes of `[N, C, H, W]`: `upsample(factor?, size?, mode,
//! align_corners)`, `pad(sides)` and `crop(size, offset?)`. None has parameters or MACs.

use super::{
    ArgDefault as D, ArgKind::*, Args, Arity, Op, OpDef, ShapeError, batched, expect_rank,
    known_dims, param,
};
use crate::ir::Shape;

/// How [`Upsample`] computes a new pixel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpsampleMode {
    /// The source pixel `floor(dst · in / out)` (PyTorch's `"nearest"`).
    Nearest,
    /// Linear interpolation along H, then along W, of the two nearest source pixels.
    Bilinear,
}

/// The spellings of [`UpsampleMode`] in specs.
pub const UPSAMPLE_MODES: &[&str] = &["nearest", "bilinear"];

/// Resizing to a multiple or to a fixed size (PyTorch's `F.interpolate` / `nn.Upsample`).
#[derive(Clone, Debug, PartialEq)]
pub struct Upsample {
    /// Integer scale factors along H and W, when given as `factor`.
    pub factor: Option<(u64, u64)>,
    /// Output height and width, when given as `size`.
    pub size: Option<(u64, u64)>,
    /// Nearest or bilinear.
    pub mode: UpsampleMode,
    /// Bilinear: corner pixels of input and output are aligned (PyTorch's `align_corners`).
    pub align_corners: bool,
}

/// Zero padding `(top, bottom, left, right)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Pad {
    /// Rows above, rows below, columns left, columns right.
    pub sides: [u64; 4],
}

/// A `size` window of the spatial axes, at `offset` or centred.
#[derive(Clone, Debug, PartialEq)]
pub struct Crop {
    /// Output height and width.
    pub size: (u64, u64),
    /// First row and column kept; `None` centres the window.
    pub offset: Option<(u64, u64)>,
}

/// The spatial family.
pub const DEFS: &[OpDef] = &[
    OpDef {
        name: "upsample",
        summary: "resizes [N, C, H, W] by an integer `factor` or to `size`; mode \"nearest\" or \"bilinear\"",
        params: &[
            param("factor", PosPair, D::Absent),
            param("size", PosPair, D::Absent),
            param("mode", Choice(UPSAMPLE_MODES), D::Str("nearest")),
            param("align_corners", Bool, D::Bool(false)),
        ],
        arity: Arity::One,
        build: |a: &Args| {
            let mode = match a.choice("mode") {
                "bilinear" => UpsampleMode::Bilinear,
                _ => UpsampleMode::Nearest,
            };
            let up = Upsample {
                factor: a.has("factor").then(|| a.pair("factor")),
                size: a.has("size").then(|| a.pair("size")),
                mode,
                align_corners: a.bool("align_corners"),
            };
            match (up.factor, up.size) {
                (None, None) => {
                    return Err((
                        "size",
                        "give the output `size: (h, w)` or a scale `factor`".to_string(),
                    ));
                }
                (Some(_), Some(_)) => {
                    return Err((
                        "size",
                        "give either `size` or `factor`, not both".to_string(),
                    ));
                }
                _ => {}
            }
            if up.align_corners && mode == UpsampleMode::Nearest {
                return Err((
                    "align_corners",
                    "`align_corners` applies to mode \"bilinear\" only".to_string(),
                ));
            }
            Ok(Op::Upsample(up))
        },
    },
    OpDef {
        name: "pad",
        summary: "zero padding of H and W: (top, bottom, left, right), (h, w) or one size for all",
        params: &[param("sides", NonNegSides, D::Required)],
        arity: Arity::One,
        build: |a: &Args| {
            Ok(Op::Pad(Pad {
                sides: a.sides("sides"),
            }))
        },
    },
    OpDef {
        name: "crop",
        summary: "keeps a `size` window of H and W, centred or at `offset` (top, left)",
        params: &[
            param("size", PosPair, D::Required),
            param("offset", NonNegPair, D::Absent),
        ],
        arity: Arity::One,
        build: |a: &Args| {
            Ok(Op::Crop(Crop {
                size: a.pair("size"),
                offset: a.has("offset").then(|| a.pair("offset")),
            }))
        },
    },
];

/// The known `(H, W)` of an image tensor, or an error naming the op.
fn image_hw(input: &Shape, op: &str) -> Result<(u64, u64), ShapeError> {
    expect_rank(input, &[4], op, "an image tensor [N, C, H, W]")?;
    let dims = known_dims(input, 2, op)?;
    Ok((dims[0], dims[1]))
}

/// `[N, C, H, W]` with new spatial sizes; the channel axis may be symbolic.
fn with_hw(input: &Shape, h: u64, w: u64) -> Shape {
    let mut s = batched(&input.0[0], [h, w]);
    s.0.insert(1, input.0[1].clone());
    s
}

impl Upsample {
    /// `[N, C, H, W] -> [N, C, fh·H, fw·W]` or `[N, C, h, w]`.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        let (h, w) = image_hw(input, "upsample")?;
        let (oh, ow) = match (self.size, self.factor) {
            (Some(size), _) => size,
            (None, Some((fh, fw))) => (h * fh, w * fw),
            (None, None) => (h, w),
        };
        Ok(with_hw(input, oh, ow))
    }

    /// PyTorch's source-coordinate scale along one axis, `in / out`: from the factor
    /// (`1 / factor`) when one was given, from the sizes otherwise.
    pub fn scale(&self, axis: usize, input: u64, output: u64) -> f64 {
        match self.factor {
            Some((fh, fw)) => 1.0 / if axis == 0 { fh } else { fw } as f64,
            None => input as f64 / output as f64,
        }
    }
}

impl Pad {
    /// `[N, C, H, W] -> [N, C, top + H + bottom, left + W + right]`.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        let (h, w) = image_hw(input, "pad")?;
        let [top, bottom, left, right] = self.sides;
        Ok(with_hw(input, top + h + bottom, left + w + right))
    }
}

impl Crop {
    /// The first row and column kept from an `h × w` input.
    pub fn origin(&self, h: u64, w: u64) -> (u64, u64) {
        self.offset.unwrap_or((
            h.saturating_sub(self.size.0) / 2,
            w.saturating_sub(self.size.1) / 2,
        ))
    }

    /// `[N, C, H, W] -> [N, C, h, w]`; the window must lie inside the input.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        let (h, w) = image_hw(input, "crop")?;
        let (top, left) = self.origin(h, w);
        let (ch, cw) = self.size;
        if top + ch > h || left + cw > w {
            let at = match self.offset {
                Some((t, l)) => format!(" at offset ({t}, {l})"),
                None => String::new(),
            };
            let help = if ch > h || cw > w {
                format!(
                    "crop to at most {h}×{w}, or `pad` the input first; to match another tensor, write `crop((other.h, other.w))` on the larger one"
                )
            } else {
                format!(
                    "a {ch}×{cw} window fits at offsets up to ({}, {})",
                    h - ch,
                    w - cw
                )
            };
            return Err(ShapeError::new(
                "dlc::crop_too_large",
                format!("`crop` to {ch}×{cw}{at} does not fit in its {h}×{w} input"),
                help,
            ));
        }
        Ok(with_hw(input, ch, cw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Dim;

    fn image(c: u64, h: u64, w: u64) -> Shape {
        Shape::new(vec![
            Dim::Sym("N".into()),
            Dim::Known(c),
            Dim::Known(h),
            Dim::Known(w),
        ])
    }

    #[test]
    fn crop_centres_with_the_extra_row_below() {
        let c = Crop {
            size: (4, 4),
            offset: None,
        };
        assert_eq!(c.origin(7, 8), (1, 2));
        assert_eq!(c.infer(&image(3, 7, 8)).unwrap(), image(3, 4, 4));
        let e = c.infer(&image(3, 3, 8)).unwrap_err();
        assert_eq!(e.code, "dlc::crop_too_large");
        let at = Crop {
            size: (4, 4),
            offset: Some((4, 0)),
        };
        assert!(at.infer(&image(3, 7, 8)).is_err());
        assert!(at.infer(&image(3, 8, 8)).is_ok());
    }

    #[test]
    fn upsample_by_factor_or_to_a_size() {
        let up = Upsample {
            factor: Some((2, 3)),
            size: None,
            mode: UpsampleMode::Nearest,
            align_corners: false,
        };
        assert_eq!(up.infer(&image(2, 5, 7)).unwrap(), image(2, 10, 21));
        assert_eq!(up.scale(1, 7, 21), 1.0 / 3.0);
        let to = Upsample {
            factor: None,
            size: Some((520, 520)),
            ..up
        };
        assert_eq!(to.infer(&image(21, 65, 65)).unwrap(), image(21, 520, 520));
        assert_eq!(to.scale(0, 65, 520), 0.125);
    }
}

//! Convolution: `conv(out, kernel, stride, pad, dilation, groups, bias)` and its transpose
//! `conv_transpose(out, kernel, stride, pad, output_padding, groups, dilation, bias)`.

use super::{
    ArgDefault as D, ArgKind::*, Args, Arity, Cost, Op, OpDef, ShapeError, batched, expect_rank,
    known_dims, param,
};
use crate::ir::Shape;

/// A 2-D convolution over `[N, C, H, W]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Conv2d {
    /// Output channels.
    pub out: u64,
    /// Kernel height and width.
    pub kernel: (u64, u64),
    /// Stride.
    pub stride: (u64, u64),
    /// Zero padding on each side.
    pub pad: (u64, u64),
    /// Dilation.
    pub dilation: (u64, u64),
    /// Channel groups (`groups == in == out` is depthwise).
    pub groups: u64,
    /// Whether a bias is added.
    pub bias: bool,
}

/// A 2-D transposed convolution over `[N, C, H, W]` (PyTorch's `nn.ConvTranspose2d`): the
/// gradient of a convolution with respect to its input, used to upsample.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvTranspose2d {
    /// Output channels.
    pub out: u64,
    /// Kernel height and width.
    pub kernel: (u64, u64),
    /// Stride: the upsampling factor.
    pub stride: (u64, u64),
    /// Rows and columns removed from each side of the full output.
    pub pad: (u64, u64),
    /// Rows and columns added at the bottom and right (less than the stride or the dilation).
    pub output_padding: (u64, u64),
    /// Channel groups.
    pub groups: u64,
    /// Dilation.
    pub dilation: (u64, u64),
    /// Whether a bias is added.
    pub bias: bool,
}

/// The conv family.
pub const DEFS: &[OpDef] = &[
    OpDef {
        name: "conv",
        summary: "2-D convolution over [N, C, H, W]; weight [out, C/groups, kh, kw]",
        params: &[
            param("out", PosInt, D::Required),
            param("kernel", PosPair, D::Required),
            param("stride", PosPair, D::Int(1)),
            param("pad", NonNegPair, D::Int(0)),
            param("dilation", PosPair, D::Int(1)),
            param("groups", PosInt, D::Int(1)),
            param("bias", Bool, D::Bool(true)),
        ],
        arity: Arity::One,
        build: |a: &Args| {
            let conv = Conv2d {
                out: a.size("out"),
                kernel: a.pair("kernel"),
                stride: a.pair("stride"),
                pad: a.pair("pad"),
                dilation: a.pair("dilation"),
                groups: a.size("groups"),
                bias: a.bool("bias"),
            };
            if !conv.out.is_multiple_of(conv.groups) {
                return Err((
                    "groups",
                    format!(
                        "{} output channels cannot be split into {} groups",
                        conv.out, conv.groups
                    ),
                ));
            }
            Ok(Op::Conv(conv))
        },
    },
    OpDef {
        name: "conv_transpose",
        summary: "2-D transposed convolution over [N, C, H, W]; weight [C, out/groups, kh, kw]",
        params: &[
            param("out", PosInt, D::Required),
            param("kernel", PosPair, D::Required),
            param("stride", PosPair, D::Int(1)),
            param("pad", NonNegPair, D::Int(0)),
            param("output_padding", NonNegPair, D::Int(0)),
            param("groups", PosInt, D::Int(1)),
            param("dilation", PosPair, D::Int(1)),
            param("bias", Bool, D::Bool(true)),
        ],
        arity: Arity::One,
        build: |a: &Args| {
            let conv = ConvTranspose2d {
                out: a.size("out"),
                kernel: a.pair("kernel"),
                stride: a.pair("stride"),
                pad: a.pair("pad"),
                output_padding: a.pair("output_padding"),
                groups: a.size("groups"),
                dilation: a.pair("dilation"),
                bias: a.bool("bias"),
            };
            if !conv.out.is_multiple_of(conv.groups) {
                return Err((
                    "groups",
                    format!(
                        "{} output channels cannot be split into {} groups",
                        conv.out, conv.groups
                    ),
                ));
            }
            let (op, s, d) = (conv.output_padding, conv.stride, conv.dilation);
            if op.0 >= s.0.max(d.0) || op.1 >= s.1.max(d.1) {
                return Err((
                    "output_padding",
                    format!(
                        "output padding {}×{} must be smaller than the stride {}×{} or the dilation {}×{}",
                        op.0, op.1, s.0, s.1, d.0, d.1
                    ),
                ));
            }
            Ok(Op::ConvTranspose(conv))
        },
    },
];

/// Output length of a sliding window: `floor((n + 2p - d(k-1) - 1) / s) + 1`, or ceil with
/// PyTorch's rule that the last window must start inside the input or left padding.
/// `None` when the window does not fit the padded input.
pub(crate) fn window_out(n: u64, k: u64, s: u64, p: u64, d: u64, ceil: bool) -> Option<u64> {
    let span = d * (k - 1) + 1;
    let padded = n + 2 * p;
    if padded < span {
        return None;
    }
    let room = padded - span;
    let mut out = if ceil { room.div_ceil(s) } else { room / s } + 1;
    if ceil && (out - 1) * s >= n + p {
        out -= 1;
    }
    Some(out)
}

/// The error for a window larger than its padded input.
pub(crate) fn too_large(
    op: &str,
    input: &Shape,
    k: (u64, u64),
    p: (u64, u64),
    d: (u64, u64),
) -> ShapeError {
    let (h, w) = (&input.0[2], &input.0[3]);
    let dil = if d != (1, 1) {
        format!(", dilation {}×{}", d.0, d.1)
    } else {
        String::new()
    };
    ShapeError::new(
        "dlc::kernel_too_large",
        format!(
            "`{op}` kernel {}×{}{dil} is larger than its padded input: {h}×{w} with padding {}×{} is {}×{}",
            k.0,
            k.1,
            p.0,
            p.1,
            h.known().unwrap_or(0) + 2 * p.0,
            w.known().unwrap_or(0) + 2 * p.1,
        ),
        "use a smaller kernel, more padding, or remove a downsampling layer before it",
    )
}

impl Conv2d {
    /// `[N, C, H, W] -> [N, out, H', W']`.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        expect_rank(input, &[4], "conv", "an image tensor [N, C, H, W]")?;
        let dims = known_dims(input, 1, "conv")?;
        let (c, h, w) = (dims[0], dims[1], dims[2]);
        if c % self.groups != 0 {
            return Err(ShapeError::new(
                "dlc::groups_mismatch",
                format!(
                    "`conv` with {} groups needs input channels divisible by {}, but the input has {c}",
                    self.groups, self.groups
                ),
                "make the input channels a multiple of `groups`",
            ));
        }
        let oh = window_out(
            h,
            self.kernel.0,
            self.stride.0,
            self.pad.0,
            self.dilation.0,
            false,
        );
        let ow = window_out(
            w,
            self.kernel.1,
            self.stride.1,
            self.pad.1,
            self.dilation.1,
            false,
        );
        match (oh, ow) {
            (Some(oh), Some(ow)) => Ok(batched(&input.0[0], [self.out, oh, ow])),
            _ => Err(too_large(
                "conv",
                input,
                self.kernel,
                self.pad,
                self.dilation,
            )),
        }
    }

    /// Weight `out × C/groups × kh × kw` (+ bias); MACs = weight size × output pixels.
    pub fn cost(&self, input: &Shape, output: &Shape) -> Cost {
        let c = input.0[1].known().unwrap_or(0);
        let weight = self.out * (c / self.groups) * self.kernel.0 * self.kernel.1;
        let params = weight + if self.bias { self.out } else { 0 };
        let pixels = output.0[2]
            .known()
            .zip(output.0[3].known())
            .map(|(h, w)| h * w);
        Cost::new(params, pixels.map(|p| p * weight))
    }
}

/// Output length of a transposed convolution:
/// `(n − 1)·s − 2p + d·(k − 1) + output_padding + 1`, or `None` when that is below 1.
pub(crate) fn transposed_out(n: u64, k: u64, s: u64, p: u64, d: u64, op: u64) -> Option<u64> {
    let full = (n - 1) * s + d * (k - 1) + op + 1;
    full.checked_sub(2 * p).filter(|&o| o >= 1)
}

impl ConvTranspose2d {
    /// `[N, C, H, W] -> [N, out, H', W']`, `H' = (H − 1)·stride − 2·pad + dilation·(kernel − 1)
    /// + output_padding + 1`.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        expect_rank(
            input,
            &[4],
            "conv_transpose",
            "an image tensor [N, C, H, W]",
        )?;
        let dims = known_dims(input, 1, "conv_transpose")?;
        let (c, h, w) = (dims[0], dims[1], dims[2]);
        if c % self.groups != 0 {
            return Err(ShapeError::new(
                "dlc::groups_mismatch",
                format!(
                    "`conv_transpose` with {} groups needs input channels divisible by {}, but the input has {c}",
                    self.groups, self.groups
                ),
                "make the input channels a multiple of `groups`",
            ));
        }
        let along = |n: u64, i: usize| {
            let pick = |p: (u64, u64)| if i == 0 { p.0 } else { p.1 };
            transposed_out(
                n,
                pick(self.kernel),
                pick(self.stride),
                pick(self.pad),
                pick(self.dilation),
                pick(self.output_padding),
            )
        };
        match (along(h, 0), along(w, 1)) {
            (Some(oh), Some(ow)) => Ok(batched(&input.0[0], [self.out, oh, ow])),
            _ => {
                let full =
                    |n: u64, k: u64, s: u64, d: u64, op: u64| (n - 1) * s + d * (k - 1) + op + 1;
                Err(ShapeError::new(
                    "dlc::empty_output",
                    format!(
                        "`conv_transpose` cannot produce an output from {h}×{w}: before padding it is {}×{}, and padding {}×{} removes {}×{}",
                        full(
                            h,
                            self.kernel.0,
                            self.stride.0,
                            self.dilation.0,
                            self.output_padding.0
                        ),
                        full(
                            w,
                            self.kernel.1,
                            self.stride.1,
                            self.dilation.1,
                            self.output_padding.1
                        ),
                        self.pad.0,
                        self.pad.1,
                        2 * self.pad.0,
                        2 * self.pad.1,
                    ),
                    "the output is (H − 1)·stride − 2·pad + dilation·(kernel − 1) + output_padding + 1: use less padding, a larger kernel or a larger stride",
                ))
            }
        }
    }

    /// Weight `C × out/groups × kh × kw` (+ bias); every input pixel is multiplied by its
    /// group's whole kernel, so MACs = weight size × input pixels.
    pub fn cost(&self, input: &Shape) -> Cost {
        let c = input.0[1].known().unwrap_or(0);
        let weight = c * (self.out / self.groups) * self.kernel.0 * self.kernel.1;
        let params = weight + if self.bias { self.out } else { 0 };
        let pixels = input.0[2]
            .known()
            .zip(input.0[3].known())
            .map(|(h, w)| h * w);
        Cost::new(params, pixels.map(|p| p * weight))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposed_sizes_match_pytorch() {
        // d2l's FCN: 10×15 -> 320×480 with k64 s32 p16.
        assert_eq!(transposed_out(10, 64, 32, 16, 1, 0), Some(320));
        assert_eq!(transposed_out(15, 64, 32, 16, 1, 0), Some(480));
        // k3 s2 p1 doubles only with output_padding 1.
        assert_eq!(transposed_out(7, 3, 2, 1, 1, 0), Some(13));
        assert_eq!(transposed_out(7, 3, 2, 1, 1, 1), Some(14));
        assert_eq!(transposed_out(4, 3, 1, 2, 2, 1), Some(5));
        assert_eq!(transposed_out(1, 1, 1, 0, 1, 0), Some(1));
        assert_eq!(transposed_out(1, 1, 1, 1, 1, 0), None);
        assert_eq!(transposed_out(2, 2, 1, 1, 1, 0), Some(1));
    }

    #[test]
    fn window_sizes_match_pytorch() {
        assert_eq!(window_out(224, 7, 2, 3, 1, false), Some(112));
        assert_eq!(window_out(112, 3, 2, 1, 1, false), Some(56));
        assert_eq!(window_out(55, 3, 2, 0, 1, false), Some(27));
        // ceil mode: 112 with k3 s2 p0 -> 56 (floor 55)
        assert_eq!(window_out(112, 3, 2, 0, 1, true), Some(56));
        // ceil mode never starts a window in the right padding: 5, k2 s2 p1 -> 3
        assert_eq!(window_out(5, 2, 2, 1, 1, true), Some(3));
        assert_eq!(window_out(4, 2, 2, 1, 1, true), Some(3));
        assert_eq!(window_out(3, 5, 1, 0, 1, false), None);
        assert_eq!(window_out(7, 3, 1, 2, 2, false), Some(7));
    }
}

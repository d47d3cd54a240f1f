//! Pooling: `maxpool`, `avgpool`, `adaptive_avgpool`, `global_avgpool`.

use super::conv::{too_large, window_out};
use super::{
    ArgDefault as D, ArgKind::*, Args, Arity, Op, OpDef, ShapeError, batched, expect_rank,
    known_dims, param,
};
use crate::ir::Shape;

/// Max or average.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    /// Maximum over the window.
    Max,
    /// Mean over the window.
    Avg,
}

/// Sliding-window pooling over `[N, C, H, W]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool2d {
    /// Max or average.
    pub kind: PoolKind,
    /// Window.
    pub kernel: (u64, u64),
    /// Stride (defaults to the window).
    pub stride: (u64, u64),
    /// Implicit padding on each side (−∞ for max, 0 for average).
    pub pad: (u64, u64),
    /// Ceil instead of floor for the output size.
    pub ceil: bool,
    /// Average pooling: whether padded zeros count in the divisor.
    pub count_pad: bool,
}

impl Pool2d {
    /// The name written in specs.
    pub fn name(&self) -> &'static str {
        match self.kind {
            PoolKind::Max => "maxpool",
            PoolKind::Avg => "avgpool",
        }
    }
}

/// Average pooling to a fixed output size.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptiveAvgPool {
    /// Output height and width.
    pub size: (u64, u64),
    /// Written as `global_avgpool` (size 1×1).
    pub global: bool,
}

impl AdaptiveAvgPool {
    /// The name written in specs.
    pub fn name(&self) -> &'static str {
        if self.global {
            "global_avgpool"
        } else {
            "adaptive_avgpool"
        }
    }
}

fn build_pool(kind: PoolKind, a: &Args) -> Result<Op, (&'static str, String)> {
    let p = Pool2d {
        kind,
        kernel: a.pair("kernel"),
        stride: a.pair("stride"),
        pad: a.pair("pad"),
        ceil: a.bool("ceil"),
        count_pad: a.bool("count_pad"),
    };
    if 2 * p.pad.0 > p.kernel.0 || 2 * p.pad.1 > p.kernel.1 {
        return Err((
            "pad",
            format!(
                "padding {}×{} is more than half the window {}×{}",
                p.pad.0, p.pad.1, p.kernel.0, p.kernel.1
            ),
        ));
    }
    Ok(Op::Pool(p))
}

/// The pooling family.
pub const DEFS: &[OpDef] = &[
    OpDef {
        name: "maxpool",
        summary: "max over kernel windows; stride defaults to the kernel; padding counts as −∞",
        params: &[
            param("kernel", PosPair, D::Required),
            param("stride", PosPair, D::SameAs("kernel")),
            param("pad", NonNegPair, D::Int(0)),
            param("ceil", Bool, D::Bool(false)),
        ],
        arity: Arity::One,
        build: |a: &Args| build_pool(PoolKind::Max, a),
    },
    OpDef {
        name: "avgpool",
        summary: "mean over kernel windows; stride defaults to the kernel; `count_pad` as PyTorch's count_include_pad",
        params: &[
            param("kernel", PosPair, D::Required),
            param("stride", PosPair, D::SameAs("kernel")),
            param("pad", NonNegPair, D::Int(0)),
            param("ceil", Bool, D::Bool(false)),
            param("count_pad", Bool, D::Bool(true)),
        ],
        arity: Arity::One,
        build: |a: &Args| build_pool(PoolKind::Avg, a),
    },
    OpDef {
        name: "adaptive_avgpool",
        summary: "average pooling to a fixed output size [size, size] or [h, w]",
        params: &[param("size", PosPair, D::Required)],
        arity: Arity::One,
        build: |a: &Args| {
            Ok(Op::AdaptiveAvgPool(AdaptiveAvgPool {
                size: a.pair("size"),
                global: false,
            }))
        },
    },
    OpDef {
        name: "global_avgpool",
        summary: "average over all spatial positions: [N, C, H, W] -> [N, C, 1, 1]",
        params: &[],
        arity: Arity::One,
        build: |_: &Args| {
            Ok(Op::AdaptiveAvgPool(AdaptiveAvgPool {
                size: (1, 1),
                global: true,
            }))
        },
    },
];

impl Pool2d {
    /// `[N, C, H, W] -> [N, C, H', W']`.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        let name = self.name();
        expect_rank(input, &[4], name, "an image tensor [N, C, H, W]")?;
        let dims = known_dims(input, 1, name)?;
        let oh = window_out(
            dims[1],
            self.kernel.0,
            self.stride.0,
            self.pad.0,
            1,
            self.ceil,
        );
        let ow = window_out(
            dims[2],
            self.kernel.1,
            self.stride.1,
            self.pad.1,
            1,
            self.ceil,
        );
        match (oh, ow) {
            (Some(oh), Some(ow)) => Ok(batched(&input.0[0], [dims[0], oh, ow])),
            _ => Err(too_large(name, input, self.kernel, self.pad, (1, 1))),
        }
    }
}

impl AdaptiveAvgPool {
    /// `[N, C, H, W] -> [N, C, h, w]`.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        expect_rank(
            input,
            &[4],
            "adaptive_avgpool",
            "an image tensor [N, C, H, W]",
        )?;
        let dims = known_dims(input, 1, "adaptive_avgpool")?;
        Ok(batched(&input.0[0], [dims[0], self.size.0, self.size.1]))
    }
}

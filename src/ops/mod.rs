//! The op set. One file per op family holds its attributes, the arguments it takes,
//! its shape rule and its parameter/MAC count; this module gathers them in the closed
//! [`Op`] enum and the [`REGISTRY`] that the elaborator looks names up in.
//!
//! Conventions follow torchvision: parameters are trainable tensors only (BatchNorm's
//! running statistics are buffers, counted apart); MACs count the multiply-accumulates of
//! conv and linear layers, and of attention's projections and its two matrix products
//! (scores and weighted values), for one example.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod layout;
pub mod linear;
pub mod merge;
pub mod norm;
pub mod pool;
pub mod position;
pub mod reshape;
pub mod sequence;
pub mod spatial;

use std::ops::Add;

use crate::ir::{Dim, Outlet, Shape};

/// Parameters, buffers and multiply-accumulates of one node (per example).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cost {
    /// Trainable parameters.
    pub params: u64,
    /// Non-trainable state (BatchNorm running statistics).
    pub buffers: u64,
    /// Multiply-accumulates for one example; `None` when a dimension is symbolic.
    pub macs: Option<u64>,
}

impl Default for Cost {
    /// Nothing: the identity of `+`.
    fn default() -> Self {
        Cost::free()
    }
}

impl Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost {
            params: self.params + o.params,
            buffers: self.buffers + o.buffers,
            macs: self.macs.zip(o.macs).map(|(a, b)| a + b),
        }
    }
}

impl Cost {
    /// A cost with parameters and MACs and no buffers.
    pub fn new(params: u64, macs: Option<u64>) -> Self {
        Cost {
            params,
            buffers: 0,
            macs,
        }
    }

    /// No parameters, no MACs.
    pub fn free() -> Self {
        Cost {
            params: 0,
            buffers: 0,
            macs: Some(0),
        }
    }
}

/// Why a shape rule refused its inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct ShapeError {
    /// Diagnostic code (`dlc::shape_mismatch`, ...).
    pub code: &'static str,
    /// What is wrong, with the shapes involved.
    pub message: String,
    /// How to fix it.
    pub help: String,
}

impl ShapeError {
    /// A shape error with a code, message and help.
    pub fn new(code: &'static str, message: impl Into<String>, help: impl Into<String>) -> Self {
        ShapeError {
            code,
            message: message.into(),
            help: help.into(),
        }
    }
}

/// Every op with its attributes.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A graph input.
    Input(reshape::Input),
    /// A graph output (identity).
    Output,
    /// 2-D convolution.
    Conv(conv::Conv2d),
    /// 2-D transposed convolution.
    ConvTranspose(conv::ConvTranspose2d),
    /// Fully connected layer on the last axis.
    Linear(linear::Linear),
    /// Batch normalisation over axis 1.
    BatchNorm(norm::BatchNorm),
    /// Layer normalisation over the last axis.
    LayerNorm(norm::LayerNorm),
    /// Local response normalisation across channels.
    Lrn(norm::Lrn),
    /// Elementwise activation.
    Activation(activation::Activation),
    /// Softmax along an axis.
    Softmax(activation::Softmax),
    /// Dropout.
    Dropout(activation::Dropout),
    /// Max or average pooling.
    Pool(pool::Pool2d),
    /// Adaptive average pooling to a fixed output size.
    AdaptiveAvgPool(pool::AdaptiveAvgPool),
    /// Collapse trailing axes into one.
    Flatten(reshape::Flatten),
    /// Reshape (batch kept).
    Reshape(reshape::Reshape),
    /// Elementwise sum of equal shapes.
    Add,
    /// Join along an axis.
    Concat(merge::Concat),
    /// Token ids → learned vectors.
    Embedding(sequence::Embedding),
    /// Token ids → one-hot vectors.
    OneHot(sequence::OneHot),
    /// A stack of recurrent layers (`rnn`, `gru`, `lstm`).
    Recurrent(sequence::Recurrent),
    /// Nearest or bilinear resizing of `[N, C, H, W]`.
    Upsample(spatial::Upsample),
    /// Zero padding of the spatial axes.
    Pad(spatial::Pad),
    /// A window of the spatial axes.
    Crop(spatial::Crop),
    /// One index of an axis, the axis dropped.
    Select(layout::Select),
    /// A range of an axis.
    Slice(layout::Slice),
    /// Two axes swapped.
    Transpose(layout::Transpose),
    /// Axes reordered.
    Permute(layout::Permute),
    /// A new axis, repeated to another tensor's size.
    Broadcast(layout::Broadcast),
    /// Elementwise product with broadcasting.
    Mul,
    /// Multi-head attention.
    Attention(attention::Attention),
    /// Sinusoidal positional encoding added.
    PosEnc(position::PosEnc),
    /// Learned positional embedding added.
    PosEmbedding(position::PosEmbedding),
    /// A learned token prepended to the sequence.
    ClassToken,
}

impl Op {
    /// The op's name as written in specs.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Input(_) => "input",
            Op::Output => "output",
            Op::Conv(_) => "conv",
            Op::ConvTranspose(_) => "conv_transpose",
            Op::Linear(_) => "linear",
            Op::BatchNorm(_) => "bn",
            Op::LayerNorm(_) => "layernorm",
            Op::Lrn(_) => "lrn",
            Op::Activation(a) => a.name(),
            Op::Softmax(_) => "softmax",
            Op::Dropout(_) => "dropout",
            Op::Pool(p) => p.name(),
            Op::AdaptiveAvgPool(p) => p.name(),
            Op::Flatten(_) => "flatten",
            Op::Reshape(_) => "reshape",
            Op::Add => "add",
            Op::Concat(_) => "concat",
            Op::Embedding(_) => "embedding",
            Op::OneHot(_) => "one_hot",
            Op::Recurrent(r) => r.cell.name(),
            Op::Upsample(_) => "upsample",
            Op::Pad(_) => "pad",
            Op::Crop(_) => "crop",
            Op::Select(_) => "select",
            Op::Slice(_) => "slice",
            Op::Transpose(_) => "transpose",
            Op::Permute(_) => "permute",
            Op::Broadcast(_) => "broadcast",
            Op::Mul => "mul",
            Op::Attention(_) => "attention",
            Op::PosEnc(_) => "posenc",
            Op::PosEmbedding(_) => "pos_embedding",
            Op::ClassToken => "class_token",
        }
    }

    /// Names of the outputs after the first, addressable as fields (`enc.state`);
    /// the first output is the one that flows on.
    pub fn output_names(&self) -> &'static [&'static str] {
        match self {
            Op::Recurrent(r) => r.output_names(),
            _ => &[],
        }
    }

    /// Whether the op takes token-id tensors (every other op needs real numbers).
    pub fn accepts_tokens(&self) -> bool {
        matches!(
            self,
            Op::Input(_)
                | Op::Output
                | Op::Select(_)
                | Op::Slice(_)
                | Op::Transpose(_)
                | Op::Permute(_)
                | Op::Broadcast(_)
                | Op::Embedding(_)
                | Op::OneHot(_)
                // `attention` takes token ids as its key padding mask only, and checks the rest.
                | Op::Attention(_)
        )
    }

    /// Output shapes for the given input shapes.
    pub fn infer(&self, inputs: &[&Shape]) -> Result<Vec<Shape>, ShapeError> {
        if !self.accepts_tokens()
            && let Some(ids) = inputs.iter().find(|s| s.is_tokens())
        {
            return Err(ShapeError::new(
                "dlc::wrong_dtype",
                format!(
                    "`{}` needs real numbers, but it receives token ids {ids}",
                    self.kind()
                ),
                "turn token ids into vectors first: `embedding(vocab, dim)` or `one_hot(vocab)`",
            ));
        }
        let one = |r: Result<Shape, ShapeError>| r.map(|s| vec![s]);
        match self {
            Op::Input(i) => Ok(vec![i.shape.clone()]),
            Op::Output | Op::Activation(_) | Op::Dropout(_) | Op::Lrn(_) => one(first(inputs)),
            Op::Conv(c) => one(c.infer(&first(inputs)?)),
            Op::ConvTranspose(c) => one(c.infer(&first(inputs)?)),
            Op::Linear(l) => one(l.infer(&first(inputs)?)),
            Op::BatchNorm(b) => one(b.infer(&first(inputs)?)),
            Op::LayerNorm(l) => one(l.infer(&first(inputs)?)),
            Op::Softmax(s) => one(s.infer(&first(inputs)?)),
            Op::Pool(p) => one(p.infer(&first(inputs)?)),
            Op::AdaptiveAvgPool(p) => one(p.infer(&first(inputs)?)),
            Op::Flatten(f) => one(f.infer(&first(inputs)?)),
            Op::Reshape(r) => one(r.infer(&first(inputs)?)),
            Op::Add => one(merge::infer_add(inputs)),
            Op::Concat(c) => one(c.infer(inputs)),
            Op::Embedding(e) => one(e.infer(&first(inputs)?)),
            Op::OneHot(o) => one(o.infer(&first(inputs)?)),
            Op::Recurrent(r) => {
                first(inputs)?;
                r.infer(inputs)
            }
            Op::Upsample(u) => one(u.infer(&first(inputs)?)),
            Op::Pad(p) => one(p.infer(&first(inputs)?)),
            Op::Crop(c) => one(c.infer(&first(inputs)?)),
            Op::Select(s) => one(s.infer(&first(inputs)?)),
            Op::Slice(s) => one(s.infer(&first(inputs)?)),
            Op::Transpose(t) => one(t.infer(&first(inputs)?)),
            Op::Permute(p) => one(p.infer(&first(inputs)?)),
            Op::Broadcast(b) => one(b.infer(inputs)),
            Op::Mul => one(layout::infer_mul(inputs)),
            Op::Attention(a) => one(a.infer(inputs)),
            Op::PosEnc(p) => one(p.infer(&first(inputs)?)),
            Op::PosEmbedding(p) => one(p.infer(&first(inputs)?)),
            Op::ClassToken => one(position::infer_class_token(&first(inputs)?)),
        }
    }

    /// Parameters, buffers and MACs given the inferred shapes.
    pub fn cost(&self, inputs: &[&Shape], outputs: &[Shape]) -> Cost {
        let (Some(input), Some(output)) = (inputs.first(), outputs.first()) else {
            return Cost::free();
        };
        match self {
            Op::Conv(c) => c.cost(input, output),
            Op::ConvTranspose(c) => c.cost(input),
            Op::Linear(l) => l.cost(input, output),
            Op::BatchNorm(b) => b.cost(input),
            Op::LayerNorm(l) => l.cost(input),
            Op::Embedding(e) => e.cost(),
            Op::Recurrent(r) => r.cost(inputs),
            Op::Attention(a) => a.cost(inputs),
            Op::PosEmbedding(p) => p.cost(input),
            Op::ClassToken => position::class_token_cost(input),
            _ => Cost::free(),
        }
    }
}

fn first(inputs: &[&Shape]) -> Result<Shape, ShapeError> {
    inputs.first().map(|s| (*s).clone()).ok_or_else(|| {
        ShapeError::new(
            "dlc::no_input",
            "the layer has no input tensor",
            "declare an `input` first",
        )
    })
}

/// The type an argument must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgKind {
    /// An integer ≥ 1.
    PosInt,
    /// An integer ≥ 0.
    NonNegInt,
    /// Any integer.
    Int,
    /// A number.
    Float,
    /// A probability in [0, 1).
    Prob,
    /// `true` or `false`.
    Bool,
    /// An integer ≥ 1 or a pair `(h, w)` of them.
    PosPair,
    /// An integer ≥ 0 or a pair of them.
    NonNegPair,
    /// A list of integers.
    IntList,
    /// Sizes for the four sides `(top, bottom, left, right)`: one integer ≥ 0 for all four,
    /// a pair `(h, w)` for top and bottom, left and right, or all four.
    NonNegSides,
    /// One of a fixed set of strings (`mode: "bilinear"`).
    Choice(&'static [&'static str]),
    /// A tensor, given by keyword (`state: enc.state`); it becomes one more input of the node.
    Tensor,
    /// An op passed as a value (`nonlinearity: relu`).
    OpName,
}

impl ArgKind {
    /// Describes the kind in words for diagnostics.
    pub fn describe(self) -> String {
        let words = match self {
            ArgKind::PosInt => "a positive integer",
            ArgKind::NonNegInt => "a non-negative integer",
            ArgKind::Int => "an integer",
            ArgKind::Float => "a number",
            ArgKind::Prob => "a probability in [0, 1)",
            ArgKind::Bool => "`true` or `false`",
            ArgKind::PosPair => "a positive integer or a pair `(h, w)`",
            ArgKind::NonNegPair => "a non-negative integer or a pair `(h, w)`",
            ArgKind::IntList => "a list of integers",
            ArgKind::NonNegSides => {
                "a non-negative integer, a pair `(h, w)` or four sides `(top, bottom, left, right)`"
            }
            ArgKind::Choice(choices) => return quoted_choices(choices),
            ArgKind::Tensor => "a tensor",
            ArgKind::OpName => "an op such as `relu`",
        };
        words.to_string()
    }
}

/// `"nearest" or "bilinear"`: the choices of a [`ArgKind::Choice`], quoted, for messages.
pub fn quoted_choices(choices: &[&str]) -> String {
    let quoted: Vec<String> = choices.iter().map(|c| format!("\"{c}\"")).collect();
    match quoted.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// A default value of an argument.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ArgDefault {
    /// No default: the argument is required.
    Required,
    /// An integer.
    Int(i64),
    /// A number.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A string ([`ArgKind::Choice`]).
    Str(&'static str),
    /// The value of another argument (`stride` defaults to `kernel`).
    SameAs(&'static str),
    /// Optional: absent unless given.
    Absent,
}

/// One argument an op takes.
#[derive(Clone, Copy, Debug)]
pub struct ParamSpec {
    /// Its name (also its keyword).
    pub name: &'static str,
    /// Its type.
    pub kind: ArgKind,
    /// Its default.
    pub default: ArgDefault,
}

/// Shorthand for a [`ParamSpec`].
pub const fn param(name: &'static str, kind: ArgKind, default: ArgDefault) -> ParamSpec {
    ParamSpec {
        name,
        kind,
        default,
    }
}

/// An argument value after checking against its [`ArgKind`].
#[derive(Clone, Debug, PartialEq)]
pub enum ArgValue {
    /// An integer.
    Int(i64),
    /// A number.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A pair of sizes (a single integer `k` arrives as `(k, k)`).
    Pair(u64, u64),
    /// A list of integers.
    List(Vec<i64>),
    /// Sizes for `(top, bottom, left, right)`.
    Sides([u64; 4]),
    /// One of an argument's choices.
    Choice(&'static str),
    /// A tensor argument; the elaborator appends it to the node's inputs in argument order.
    Tensor(Outlet),
    /// An op, by name.
    Op(&'static str),
}

/// An op's arguments, checked and with defaults filled in, in the order of its specs.
#[derive(Clone, Debug)]
pub struct Args(pub Vec<(&'static str, ArgValue)>);

impl Args {
    fn get(&self, name: &str) -> Option<&ArgValue> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Whether an optional argument was given.
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The tensor arguments, in argument order: the node's inputs after the flowing tensor.
    pub fn tensors(&self) -> impl Iterator<Item = Outlet> + '_ {
        self.0.iter().filter_map(|(_, v)| match v {
            ArgValue::Tensor(o) => Some(*o),
            _ => None,
        })
    }

    /// An integer argument (0 when absent: the binder guarantees presence).
    pub fn int(&self, name: &str) -> i64 {
        match self.get(name) {
            Some(ArgValue::Int(v)) => *v,
            Some(ArgValue::Pair(h, _)) => *h as i64,
            _ => 0,
        }
    }

    /// A size argument.
    pub fn size(&self, name: &str) -> u64 {
        self.int(name).max(0) as u64
    }

    /// A number argument.
    pub fn float(&self, name: &str) -> f64 {
        match self.get(name) {
            Some(ArgValue::Float(v)) => *v,
            Some(ArgValue::Int(v)) => *v as f64,
            _ => 0.0,
        }
    }

    /// A boolean argument.
    pub fn bool(&self, name: &str) -> bool {
        matches!(self.get(name), Some(ArgValue::Bool(true)))
    }

    /// A pair argument.
    pub fn pair(&self, name: &str) -> (u64, u64) {
        match self.get(name) {
            Some(ArgValue::Pair(h, w)) => (*h, *w),
            Some(ArgValue::Int(v)) => (*v as u64, *v as u64),
            _ => (0, 0),
        }
    }

    /// An op argument's name, if given.
    pub fn op_name(&self, name: &str) -> Option<&'static str> {
        match self.get(name) {
            Some(ArgValue::Op(op)) => Some(op),
            _ => None,
        }
    }

    /// A four-sides argument `(top, bottom, left, right)`.
    pub fn sides(&self, name: &str) -> [u64; 4] {
        match self.get(name) {
            Some(ArgValue::Sides(s)) => *s,
            _ => [0; 4],
        }
    }

    /// A choice argument (empty when absent).
    pub fn choice(&self, name: &str) -> &'static str {
        match self.get(name) {
            Some(ArgValue::Choice(c)) => c,
            _ => "",
        }
    }

    /// A list argument.
    pub fn list(&self, name: &str) -> Vec<i64> {
        match self.get(name) {
            Some(ArgValue::List(v)) => v.clone(),
            _ => Vec::new(),
        }
    }
}

/// How many tensors an op takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arity {
    /// The flowing tensor only.
    One,
    /// The flowing tensor and any tensors passed as leading positional arguments.
    Many,
}

/// An op as the language sees it: name, documentation, arguments and constructor.
#[derive(Clone, Copy)]
pub struct OpDef {
    /// The name written in specs.
    pub name: &'static str,
    /// One line for the language reference and `--help`.
    pub summary: &'static str,
    /// Arguments, positional order first to last.
    pub params: &'static [ParamSpec],
    /// Tensor inputs.
    pub arity: Arity,
    /// Builds the op from checked arguments; an error names the argument at fault.
    pub build: fn(&Args) -> Result<Op, (&'static str, String)>,
}

impl std::fmt::Debug for OpDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OpDef({})", self.name)
    }
}

/// Every op, by family.
pub const REGISTRY: &[&[OpDef]] = &[
    conv::DEFS,
    linear::DEFS,
    norm::DEFS,
    activation::DEFS,
    pool::DEFS,
    reshape::DEFS,
    merge::DEFS,
    sequence::DEFS,
    spatial::DEFS,
    layout::DEFS,
    attention::DEFS,
    position::DEFS,
];

/// Looks an op up by name.
pub fn lookup(name: &str) -> Option<&'static OpDef> {
    REGISTRY
        .iter()
        .flat_map(|family| family.iter())
        .find(|d| d.name == name)
}

/// Every op name.
pub fn names() -> impl Iterator<Item = &'static str> {
    REGISTRY
        .iter()
        .flat_map(|family| family.iter())
        .map(|d| d.name)
}

/// The known sizes of the dimensions `from..` of a shape, or an error naming the op.
pub(crate) fn known_dims(shape: &Shape, from: usize, op: &str) -> Result<Vec<u64>, ShapeError> {
    shape.0[from.min(shape.rank())..]
        .iter()
        .map(|d| {
            d.known().ok_or_else(|| {
                ShapeError::new(
                    "dlc::symbolic_dim",
                    format!("`{op}` needs known sizes, but its input {shape} has the symbolic size `{d}`"),
                    "give the input a fixed size",
                )
            })
        })
        .collect()
}

/// Checks a shape's rank against the ranks an op accepts.
pub(crate) fn expect_rank(
    shape: &Shape,
    ranks: &[usize],
    op: &str,
    what: &str,
) -> Result<(), ShapeError> {
    if ranks.contains(&shape.rank()) {
        Ok(())
    } else {
        Err(ShapeError::new(
            "dlc::rank_mismatch",
            format!("`{op}` expects {what}, but its input is {shape}"),
            format!(
                "`{op}` takes tensors of rank {} (batch included)",
                join_or(ranks)
            ),
        ))
    }
}

fn join_or(ranks: &[usize]) -> String {
    let s: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
    match s.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// A shape from a batch dimension and known sizes.
pub(crate) fn batched(batch: &Dim, rest: impl IntoIterator<Item = u64>) -> Shape {
    let mut dims = vec![batch.clone()];
    dims.extend(rest.into_iter().map(Dim::Known));
    Shape::new(dims)
}

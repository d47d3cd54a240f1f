//! Sequence ops: token lookups `embedding(vocab, dim, padding_idx?)` and `one_hot(classes)`,
//! and the recurrent layers `rnn`, `gru` and `lstm` (PyTorch's `nn.RNN`, `nn.GRU`,
//! `nn.LSTM` with `batch_first=True`), optionally conditioned at every step on additive
//! attention over a memory tensor (`attend:`).
//!
//! Shapes are batch first throughout, as every dlc shape: a recurrent layer maps
//! `[N, T, F]` to the sequence `[N, T, D·hidden]` (output 0, which flows on) and its final
//! state `[N, layers·D, hidden]` (output `state`; `cell` for an LSTM), where `D` is 2 for a
//! bidirectional layer. PyTorch lays the state out `[layers·D, N, hidden]`; the order along
//! axis 1 is PyTorch's (layer-major, the forward direction before the reverse one).

use super::{
    ArgDefault as D, ArgKind::*, Args, Arity, Cost, Op, OpDef, ShapeError, expect_rank, param,
};
use crate::ir::{Dim, Shape};

/// `embedding(vocab, dim, padding_idx?)`: token ids `[N, …]` → vectors `[N, …, dim]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding {
    /// Number of token ids (rows of the weight).
    pub vocab: u64,
    /// Size of each vector.
    pub dim: u64,
    /// A token id whose vector starts at zero and gets no gradient (PyTorch's `padding_idx`).
    pub padding_idx: Option<u64>,
}

/// `one_hot(classes)`: token ids `[N, …]` → `[N, …, classes]` of zeros and ones.
#[derive(Clone, Debug, PartialEq)]
pub struct OneHot {
    /// Length of each one-hot vector.
    pub classes: u64,
}

/// The recurrent cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cell {
    /// Elman RNN, `h' = act(W_ih x + b_ih + W_hh h + b_hh)`, `act` tanh or relu.
    Rnn {
        /// Whether the nonlinearity is relu (else tanh).
        relu: bool,
    },
    /// Gated recurrent unit; gates r, z, n in PyTorch's order.
    Gru,
    /// Long short-term memory; gates i, f, g, o in PyTorch's order.
    Lstm,
}

impl Cell {
    /// The op's name.
    pub fn name(self) -> &'static str {
        match self {
            Cell::Rnn { .. } => "rnn",
            Cell::Gru => "gru",
            Cell::Lstm => "lstm",
        }
    }

    /// Gates stacked in each weight: rows of `weight_ih` are `gates · hidden`.
    pub fn gates(self) -> u64 {
        match self {
            Cell::Rnn { .. } => 1,
            Cell::Gru => 3,
            Cell::Lstm => 4,
        }
    }
}

/// A stack of recurrent layers over a batch-first sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Recurrent {
    /// The cell.
    pub cell: Cell,
    /// Hidden size.
    pub hidden: u64,
    /// Stacked layers.
    pub layers: u64,
    /// Whether each layer also runs backwards in time (outputs concatenated).
    pub bidirectional: bool,
    /// Dropout on the outputs of every layer but the last, while training (and on the
    /// attention weights).
    pub dropout: f64,
    /// Whether an initial hidden state is given (the input after the sequence).
    pub state: bool,
    /// Whether an initial cell state is given (LSTM; the input after `state`).
    pub cell_state: bool,
    /// Whether the layer attends to a memory (the last input).
    pub attend: bool,
}

impl Recurrent {
    /// 2 if bidirectional, else 1.
    pub fn directions(&self) -> u64 {
        if self.bidirectional { 2 } else { 1 }
    }

    /// Names of the outputs after the sequence.
    pub fn output_names(&self) -> &'static [&'static str] {
        match self.cell {
            Cell::Lstm => &["state", "cell"],
            _ => &["state"],
        }
    }

    /// The call as written, for messages: `gru(32, layers: 2)`.
    fn call(&self) -> String {
        let mut s = format!("{}({}", self.cell.name(), self.hidden);
        if self.layers != 1 {
            s += &format!(", layers: {}", self.layers);
        }
        if self.bidirectional {
            s += ", bidirectional: true";
        }
        s + ")"
    }

    /// `[N, T, F]` (and the state, cell and memory given) → sequence, state (and cell).
    pub fn infer(&self, inputs: &[&Shape]) -> Result<Vec<Shape>, ShapeError> {
        let name = self.cell.name();
        let x = inputs[0];
        expect_rank(x, &[3], name, "a sequence [N, T, features]")?;
        if x.0[2].known().is_none() {
            return Err(ShapeError::new(
                "dlc::symbolic_dim",
                format!("`{name}` needs a known number of input features, but its input is {x}"),
                "give the last axis a fixed size",
            ));
        }
        let batch = x.0[0].clone();
        let state_shape = Shape::new(vec![
            batch.clone(),
            Dim::Known(self.layers * self.directions()),
            Dim::Known(self.hidden),
        ]);
        let mut next = 1;
        for (given, what) in [(self.state, "state"), (self.cell_state, "cell")] {
            if !given {
                continue;
            }
            let s = inputs[next];
            next += 1;
            if *s != state_shape {
                return Err(ShapeError::new(
                    "dlc::shape_mismatch",
                    format!(
                        "the initial {what} of `{}` must be {state_shape}, but `{what}` is {s}",
                        self.call()
                    ),
                    format!(
                        "a state is batch first: [N, layers·directions, hidden] = {state_shape}; \
                         pass the `{what}` of a recurrent layer with the same hidden size, layers \
                         and directions"
                    ),
                ));
            }
        }
        if self.attend {
            let m = inputs[next];
            if m.rank() != 3 || m.0[2].known().is_none() {
                return Err(ShapeError::new(
                    "dlc::rank_mismatch",
                    format!("`{name}` attends to a memory [N, S, width], but `attend` is {m}"),
                    "attend to the sequence output of an encoder, e.g. `attend: enc` where `let enc = … gru(32)`",
                ));
            }
        }
        let mut seq = x.0.clone();
        seq[2] = Dim::Known(self.directions() * self.hidden);
        let mut out = vec![Shape::new(seq), state_shape.clone()];
        if self.cell == Cell::Lstm {
            out.push(state_shape);
        }
        Ok(out)
    }

    /// Width of layer `l`'s input: the features (plus the memory width when attending) for
    /// the first layer, `D·hidden` after.
    fn layer_input(&self, l: u64, features: u64, memory: u64) -> u64 {
        if l == 0 {
            features + memory
        } else {
            self.directions() * self.hidden
        }
    }

    /// PyTorch's count: per layer and direction `gates·hidden·(in + hidden) + 2·gates·hidden`;
    /// attention adds `W_k [hidden, width]`, `W_q [hidden, hidden]` and `w_v [1, hidden]`.
    /// MACs: the matrix products of every step (and of the attention), when the sequence
    /// lengths are known.
    pub fn cost(&self, inputs: &[&Shape]) -> Cost {
        let x = inputs[0];
        let features = x.0.get(2).and_then(Dim::known).unwrap_or(0);
        let memory = if self.attend { inputs.last() } else { None };
        let width = memory
            .and_then(|m| m.0.get(2).and_then(Dim::known))
            .unwrap_or(0);
        let (g, h, d) = (self.cell.gates(), self.hidden, self.directions());
        let mut params = 0;
        let mut macs_per_step = 0;
        for l in 0..self.layers {
            let input = self.layer_input(l, features, width);
            params += d * (g * h * (input + h) + 2 * g * h);
            macs_per_step += d * g * h * (input + h);
        }
        let steps = x.0.get(1).and_then(Dim::known);
        let Some(m) = memory else {
            return Cost::new(params, steps.map(|t| t * macs_per_step));
        };
        params += h * width + h * h + h;
        let macs = steps
            .zip(m.0.get(1).and_then(Dim::known))
            .map(|(t, s)| s * width * h + t * (macs_per_step + h * h + s * h + s * width));
        Cost::new(params, macs)
    }
}

/// The sequence family.
pub const DEFS: &[OpDef] = &[
    OpDef {
        name: "embedding",
        summary: "token ids → vectors: a lookup in the weight [vocab, dim]",
        params: &[
            param("vocab", PosInt, D::Required),
            param("dim", PosInt, D::Required),
            param("padding_idx", NonNegInt, D::Absent),
        ],
        arity: Arity::One,
        build: |a: &Args| {
            let vocab = a.size("vocab");
            let padding_idx = a.has("padding_idx").then(|| a.size("padding_idx"));
            if let Some(p) = padding_idx
                && p >= vocab
            {
                return Err((
                    "padding_idx",
                    format!("the padding id {p} is not a token id below `vocab` = {vocab}"),
                ));
            }
            Ok(Op::Embedding(Embedding {
                vocab,
                dim: a.size("dim"),
                padding_idx,
            }))
        },
    },
    OpDef {
        name: "one_hot",
        summary: "token ids → one-hot vectors of length `classes`; no parameters",
        params: &[param("classes", PosInt, D::Required)],
        arity: Arity::One,
        build: |a: &Args| {
            Ok(Op::OneHot(OneHot {
                classes: a.size("classes"),
            }))
        },
    },
    OpDef {
        name: "rnn",
        summary: "Elman RNN over [N, T, F] (nn.RNN, batch first); outputs the sequence and `state`",
        params: &[
            param("hidden", PosInt, D::Required),
            param("layers", PosInt, D::Int(1)),
            param("bidirectional", Bool, D::Bool(false)),
            param("dropout", Prob, D::Float(0.0)),
            param("nonlinearity", OpName, D::Absent),
            param("state", Tensor, D::Absent),
            param("attend", Tensor, D::Absent),
        ],
        arity: Arity::One,
        build: |a: &Args| {
            let relu = match a.op_name("nonlinearity") {
                None | Some("tanh") => false,
                Some("relu") => true,
                Some(other) => {
                    return Err((
                        "nonlinearity",
                        format!("the nonlinearity must be `tanh` or `relu`, not `{other}`"),
                    ));
                }
            };
            recurrent(Cell::Rnn { relu }, a)
        },
    },
    OpDef {
        name: "gru",
        summary: "gated recurrent unit over [N, T, F] (nn.GRU, batch first); outputs the sequence and `state`",
        params: &[
            param("hidden", PosInt, D::Required),
            param("layers", PosInt, D::Int(1)),
            param("bidirectional", Bool, D::Bool(false)),
            param("dropout", Prob, D::Float(0.0)),
            param("state", Tensor, D::Absent),
            param("attend", Tensor, D::Absent),
        ],
        arity: Arity::One,
        build: |a: &Args| recurrent(Cell::Gru, a),
    },
    OpDef {
        name: "lstm",
        summary: "long short-term memory over [N, T, F] (nn.LSTM, batch first); outputs the sequence, `state` and `cell`",
        params: &[
            param("hidden", PosInt, D::Required),
            param("layers", PosInt, D::Int(1)),
            param("bidirectional", Bool, D::Bool(false)),
            param("dropout", Prob, D::Float(0.0)),
            param("state", Tensor, D::Absent),
            param("cell", Tensor, D::Absent),
            param("attend", Tensor, D::Absent),
        ],
        arity: Arity::One,
        build: |a: &Args| recurrent(Cell::Lstm, a),
    },
];

fn recurrent(cell: Cell, a: &Args) -> Result<Op, (&'static str, String)> {
    let r = Recurrent {
        cell,
        hidden: a.size("hidden"),
        layers: a.size("layers"),
        bidirectional: a.bool("bidirectional"),
        dropout: a.float("dropout"),
        state: a.has("state"),
        cell_state: a.has("cell"),
        attend: a.has("attend"),
    };
    if r.cell_state && !r.state {
        return Err((
            "cell",
            "an initial cell needs an initial hidden state too: give `state:` as well".into(),
        ));
    }
    if r.attend && r.bidirectional {
        return Err((
            "attend",
            "attention is queried with the state of the previous step, so it runs forward in \
             time only: drop `bidirectional: true`"
                .into(),
        ));
    }
    Ok(Op::Recurrent(r))
}

/// The error for a float tensor fed to an op that looks token ids up.
fn needs_tokens(op: &str, input: &Shape) -> ShapeError {
    ShapeError::new(
        "dlc::wrong_dtype",
        format!("`{op}` takes token ids, but its input {input} holds real numbers"),
        "declare the input as token ids: `input x: tokens[T]`",
    )
}

impl Embedding {
    /// `[N, …]` token ids → `[N, …, dim]`.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        if !input.is_tokens() {
            return Err(needs_tokens("embedding", input));
        }
        let mut dims = input.0.clone();
        dims.push(Dim::Known(self.dim));
        Ok(Shape::new(dims))
    }

    /// `vocab · dim` parameters; a lookup has no MACs.
    pub fn cost(&self) -> Cost {
        Cost::new(self.vocab * self.dim, Some(0))
    }
}

impl OneHot {
    /// `[N, …]` token ids → `[N, …, classes]`.
    pub fn infer(&self, input: &Shape) -> Result<Shape, ShapeError> {
        if !input.is_tokens() {
            return Err(needs_tokens("one_hot", input));
        }
        let mut dims = input.0.clone();
        dims.push(Dim::Known(self.classes));
        Ok(Shape::new(dims))
    }
}

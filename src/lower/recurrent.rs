//! Recurrent layers (`rnn`, `gru`, `lstm`). Without attention each layer and direction is one
//! [`recurrence`] custom op over the whole sequence, with its own forward and backward through
//! time (`recurrent_kernel.rs`), checked by finite differences and against the cells composed
//! from candle primitives below, and against PyTorch in `tests/torch_reference.rs`.
//! Gate order and formulas are PyTorch's, with `x̂ = x W_ihᵀ + b_ih`:
//!
//! * RNN: `h' = act(x̂ + h W_hhᵀ + b_hh)`
//! * GRU: `r = σ(x̂_r + ĥ_r)`, `z = σ(x̂_z + ĥ_z)`, `n = tanh(x̂_n + r ⊙ ĥ_n)`,
//!   `h' = (1 − z) ⊙ n + z ⊙ h`, with `ĥ = h W_hhᵀ + b_hh`
//! * LSTM: `i, f, g, o` = σ, σ, tanh, σ of `x̂ + h W_hhᵀ + b_hh`; `c' = f ⊙ c + i ⊙ g`,
//!   `h' = o ⊙ tanh(c')`
//!
//! With `attend`, the first layer's input at every step is the additive-attention context
//! over the memory (queried with the top layer's state of the previous step) concatenated
//! before the step's input, as d2l's `Seq2SeqAttentionDecoder`; the layers then run step by
//! step, each step through the whole stack, with the cells composed from candle primitives
//! (`step`): the input of a step depends on the output of the one before, so neither the
//! projection of all steps at once nor the recurrence kernel applies.

use candle_core::{Result, Tensor};

use super::linear::linear;
use super::params::{Init, Param, State};
use super::recurrent_kernel::recurrence;
use crate::ops::sequence::{Cell, Recurrent as RecurrentCfg};

/// The weights of one layer in one direction, PyTorch's shapes: `w_ih [gates·H, in]`,
/// `w_hh [gates·H, H]`, `b_ih` and `b_hh [gates·H]`.
#[derive(Clone)]
pub struct CellWeights {
    /// Input-to-hidden weight.
    pub w_ih: Tensor,
    /// Hidden-to-hidden weight.
    pub w_hh: Tensor,
    /// Input-to-hidden bias.
    pub b_ih: Tensor,
    /// Hidden-to-hidden bias.
    pub b_hh: Tensor,
}

/// Additive attention's weights (d2l's `AdditiveAttention`, all without bias):
/// `w_q [H, H]` on the query, `w_k [H, width]` on the memory, `w_v [1, H]` for the score.
#[derive(Clone)]
pub struct AttentionWeights {
    /// Query projection.
    pub w_q: Tensor,
    /// Key projection.
    pub w_k: Tensor,
    /// Score vector.
    pub w_v: Tensor,
}

/// A lowered recurrent node: its configuration and parameters.
pub struct Recurrent {
    cfg: RecurrentCfg,
    /// Per layer, then per direction (forward, reverse): `[w_ih, w_hh, b_ih, b_hh]`.
    cells: Vec<[Param; 4]>,
    /// `[w_q, w_k, w_v]` when attending.
    attention: Option<[Param; 3]>,
}

impl Recurrent {
    /// Creates the parameters of node `name` for `features` inputs (and a memory of width
    /// `memory` when attending): PyTorch's names (`weight_ih_l0`, `bias_hh_l1_reverse`, …)
    /// and initialisation (everything uniform in ±1/√hidden); with `Init::Xavier` the
    /// weights are Xavier-uniform as d2l's `init_seq2seq`, the biases keep PyTorch's. The
    /// attention's weights live at `<name>.attention.W_q.weight`, `.W_k.weight`, `.w_v.weight`.
    pub fn new(
        state: &mut State,
        name: &str,
        cfg: &RecurrentCfg,
        features: usize,
        memory: usize,
    ) -> Result<Self> {
        let h = cfg.hidden as usize;
        let g = cfg.cell.gates() as usize * h;
        let bound = 1.0 / (h as f64).sqrt();
        let weight = |state: &mut State, key: String, shape: &[usize]| match state.init {
            Init::Torch => state.uniform_param(&key, shape, bound),
            Init::Xavier => state.weight(&key, shape),
        };
        let mut cells = Vec::new();
        for l in 0..cfg.layers as usize {
            let input = if l == 0 {
                memory + features
            } else {
                cfg.directions() as usize * h
            };
            for d in 0..cfg.directions() {
                let suffix = format!("l{l}{}", if d == 1 { "_reverse" } else { "" });
                cells.push([
                    weight(state, format!("{name}.weight_ih_{suffix}"), &[g, input])?,
                    weight(state, format!("{name}.weight_hh_{suffix}"), &[g, h])?,
                    state.uniform_param(&format!("{name}.bias_ih_{suffix}"), &[g], bound)?,
                    state.uniform_param(&format!("{name}.bias_hh_{suffix}"), &[g], bound)?,
                ]);
            }
        }
        let attention = if cfg.attend {
            Some([
                state.weight(&format!("{name}.attention.W_q.weight"), &[h, h])?,
                state.weight(&format!("{name}.attention.W_k.weight"), &[h, memory])?,
                state.weight(&format!("{name}.attention.w_v.weight"), &[1, h])?,
            ])
        } else {
            None
        };
        Ok(Recurrent {
            cfg: cfg.clone(),
            cells,
            attention,
        })
    }

    /// Runs on the node's inputs (sequence, then the state, cell and memory given); returns
    /// the sequence, the final state (and cell). In training, dropout between layers (and on
    /// the attention weights) draws its masks from `state`. Recorded for the backward pass
    /// when `grad`.
    pub fn forward(
        &self,
        inputs: &[&Tensor],
        train: bool,
        grad: bool,
        state: &mut State,
    ) -> Result<Vec<Tensor>> {
        let mut rest = inputs[1..].iter().copied();
        let h0 = if self.cfg.state { rest.next() } else { None };
        let c0 = if self.cfg.cell_state {
            rest.next()
        } else {
            None
        };
        let memory = if self.cfg.attend { rest.next() } else { None };
        let cells: Vec<CellWeights> = self
            .cells
            .iter()
            .map(|[w_ih, w_hh, b_ih, b_hh]| CellWeights {
                w_ih: w_ih.read(grad),
                w_hh: w_hh.read(grad),
                b_ih: b_ih.read(grad),
                b_hh: b_hh.read(grad),
            })
            .collect();
        let attention = self.attention.as_ref().map(|[q, k, v]| AttentionWeights {
            w_q: q.read(grad),
            w_k: k.read(grad),
            w_v: v.read(grad),
        });
        let p = self.cfg.dropout;
        let mut dropout = |x: &Tensor| -> Result<Tensor> {
            if train && p > 0.0 {
                x.mul(&state.dropout_mask(x, p)?)
            } else {
                Ok(x.clone())
            }
        };
        let attend = attention.as_ref().zip(memory);
        run(&self.cfg, inputs[0], &cells, attend, h0, c0, &mut dropout)
    }
}

/// Runs the stack on `x [N, T, F]`: `cells` per layer then direction, `attend` the attention
/// weights and the memory `[N, S, width]`, `h0`/`c0` the initial state and cell
/// `[N, layers·D, H]` (zeros when absent), `dropout` applied between layers and to the
/// attention weights. Returns `[sequence [N, T, D·H], state [N, layers·D, H]]`, plus the cell
/// for an LSTM.
pub fn run(
    cfg: &RecurrentCfg,
    x: &Tensor,
    cells: &[CellWeights],
    attend: Option<(&AttentionWeights, &Tensor)>,
    h0: Option<&Tensor>,
    c0: Option<&Tensor>,
    dropout: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let (n, _, _) = x.dims3()?;
    let h = cfg.hidden as usize;
    let zeros = Tensor::zeros((n, h), x.dtype(), x.device())?;
    let initial = |s: Option<&Tensor>, k: usize| match s {
        Some(s) => s.narrow(1, k, 1)?.squeeze(1),
        None => Ok(zeros.clone()),
    };
    let lstm = cfg.cell == Cell::Lstm;
    let slots = cells.len();
    let mut hs: Vec<Tensor> = (0..slots).map(|k| initial(h0, k)).collect::<Result<_>>()?;
    let mut cs: Vec<Tensor> = if lstm {
        (0..slots).map(|k| initial(c0, k)).collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let seq = match attend {
        None => layer_by_layer(cfg, x, cells, &mut hs, &mut cs, dropout)?,
        Some((w, memory)) => step_by_step(cfg, x, cells, w, memory, &mut hs, &mut cs, dropout)?,
    };
    let mut out = vec![seq, Tensor::stack(&hs, 1)?];
    if lstm {
        out.push(Tensor::stack(&cs, 1)?);
    }
    Ok(out)
}

/// The steps of a time-major `[T, N, G]` tensor as `T` tensors `[N, G]`.
///
/// The backward of a slice is the full-size gradient with zeros around the slice, so `T`
/// slices of the whole tensor would cost `T²·N·G` in the backward pass. Slicing it first into
/// about √T blocks and then each block into its steps costs `2·√T·T·N·G` instead (a third
/// of it for 35 steps).
fn time_steps(seq: &Tensor) -> Result<Vec<Tensor>> {
    let steps = seq.dim(0)?;
    let block = (steps as f64).sqrt().ceil().max(1.0) as usize;
    let mut out = Vec::with_capacity(steps);
    for start in (0..steps).step_by(block) {
        let b = seq.narrow(0, start, block.min(steps - start))?;
        for t in 0..b.dim(0)? {
            out.push(b.get(t)?);
        }
    }
    Ok(out)
}

/// One step of a cell: `xp` the projected input with `b_ih` `[N, gates·H]`, `h` (and `c`)
/// the previous state, `w_hh_t` the transposed recurrent weight. Returns the new state
/// and (LSTM) cell.
fn step(
    cell: Cell,
    xp: &Tensor,
    h: &Tensor,
    c: Option<&Tensor>,
    w_hh_t: &Tensor,
    b_hh: &Tensor,
) -> Result<(Tensor, Option<Tensor>)> {
    let hp = h.matmul(w_hh_t)?.broadcast_add(b_hh)?;
    let size = h.dim(1)?;
    let gate = |t: &Tensor, k: usize| t.narrow(1, k * size, size);
    let sigmoid = candle_nn::ops::sigmoid;
    match cell {
        Cell::Rnn { relu } => {
            let pre = (xp + hp)?;
            Ok((if relu { pre.relu()? } else { pre.tanh()? }, None))
        }
        Cell::Gru => {
            let r = sigmoid(&(gate(xp, 0)? + gate(&hp, 0)?)?)?;
            let z = sigmoid(&(gate(xp, 1)? + gate(&hp, 1)?)?)?;
            let n = (gate(xp, 2)? + r.mul(&gate(&hp, 2)?)?)?.tanh()?;
            // (1 − z)·n + z·h = n + z·(h − n)
            Ok(((&n + z.mul(&(h - &n)?)?)?, None))
        }
        Cell::Lstm => {
            let gates = (xp + hp)?;
            let i = sigmoid(&gate(&gates, 0)?)?;
            let f = sigmoid(&gate(&gates, 1)?)?;
            let g = gate(&gates, 2)?.tanh()?;
            let o = sigmoid(&gate(&gates, 3)?)?;
            let Some(c) = c else {
                candle_core::bail!("an LSTM step needs the previous cell state")
            };
            let c = (f.mul(c)? + i.mul(&g)?)?;
            Ok((o.mul(&c.tanh()?)?, Some(c)))
        }
    }
}

/// Without attention: each layer and direction runs over the whole sequence before the next
/// layer starts, as one [`recurrence`]. `hs`/`cs` hold the initial states per layer and
/// direction and are replaced by the final ones.
fn layer_by_layer(
    cfg: &RecurrentCfg,
    x: &Tensor,
    cells: &[CellWeights],
    hs: &mut [Tensor],
    cs: &mut [Tensor],
    dropout: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (n, steps, _) = x.dims3()?;
    let d = cfg.directions() as usize;
    let lstm = cfg.cell == Cell::Lstm;
    let mut seq = x.clone();
    for l in 0..cfg.layers as usize {
        if l > 0 {
            // The mask drawn time-major, step after step, as the attention path draws it.
            seq = dropout(&seq.transpose(0, 1)?)?.transpose(0, 1)?;
        }
        let features = seq.dim(2)?;
        let flat = seq.reshape((n * steps, features))?;
        let mut outputs = Vec::with_capacity(d);
        for dir in 0..d {
            let k = l * d + dir;
            let w = &cells[k];
            let weights = Tensor::cat(
                &[
                    &w.w_ih,
                    &w.w_hh,
                    &w.b_hh.unsqueeze(1)?,
                    &w.b_ih.unsqueeze(1)?,
                ],
                1,
            )?;
            let state0 = if lstm {
                Tensor::stack(&[&hs[k], &cs[k]], 0)?
            } else {
                hs[k].unsqueeze(0)?
            };
            let states = recurrence(cfg.cell, &flat, &weights, &state0, steps, dir == 1)?;
            // [S·N, T, H]: the states, then (LSTM) the cells; a GRU's or RNN's is the sequence
            // itself, with no view in between.
            let (sequence, cells) = if lstm {
                (states.narrow(0, 0, n)?, Some(states.narrow(0, n, n)?))
            } else {
                (states, None)
            };
            let last = if dir == 0 { steps - 1 } else { 0 };
            let at_last = |s: &Tensor| s.narrow(1, last, 1)?.squeeze(1);
            hs[k] = at_last(&sequence)?;
            if let Some(cells) = cells {
                cs[k] = at_last(&cells)?;
            }
            outputs.push(sequence);
        }
        seq = if d == 1 {
            outputs.pop().unwrap_or(seq)
        } else {
            Tensor::cat(&outputs, 2)?
        };
    }
    Ok(seq)
}

/// With attention over `memory`: one step at a time through the whole stack, since the
/// first layer's input at step t depends on the top layer's state at step t − 1.
#[allow(clippy::too_many_arguments)]
fn step_by_step(
    cfg: &RecurrentCfg,
    x: &Tensor,
    cells: &[CellWeights],
    att: &AttentionWeights,
    memory: &Tensor,
    hs: &mut [Tensor],
    cs: &mut [Tensor],
    dropout: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let width = memory.dim(2)?;
    let features = x.dim(2)?;
    let top = cfg.layers as usize - 1;
    // The memory's keys once for all steps: [N, S, H].
    let keys = linear(memory, &att.w_k, None)?;
    let w_v = att.w_v.t()?;
    // The first layer's weight splits into the context's columns and the input's.
    let first = &cells[0];
    let w_context = first.w_ih.narrow(1, 0, width)?;
    let w_input = first.w_ih.narrow(1, width, features)?;
    let xs = time_steps(&x.transpose(0, 1)?.contiguous()?)?;
    let w_hh_t: Vec<Tensor> = cells.iter().map(|w| w.w_hh.t()).collect::<Result<_>>()?;
    let mut ys = Vec::with_capacity(xs.len());
    for x_t in &xs {
        let query = linear(&hs[top], &att.w_q, None)?.unsqueeze(1)?;
        let scores = keys
            .broadcast_add(&query)?
            .tanh()?
            .broadcast_matmul(&w_v)?
            .squeeze(2)?;
        let weights = dropout(&candle_nn::ops::softmax(&scores, 1)?)?;
        let context = weights.unsqueeze(1)?.matmul(memory)?.squeeze(1)?;
        let mut input_proj =
            (linear(x_t, &w_input, Some(&first.b_ih))? + linear(&context, &w_context, None)?)?;
        for l in 0..cfg.layers as usize {
            if l > 0 {
                let below = dropout(&hs[l - 1])?;
                input_proj = linear(&below, &cells[l].w_ih, Some(&cells[l].b_ih))?;
            }
            let (h, c) = step(
                cfg.cell,
                &input_proj,
                &hs[l],
                cs.get(l),
                &w_hh_t[l],
                &cells[l].b_hh,
            )?;
            hs[l] = h;
            if let Some(c) = c {
                cs[l] = c;
            }
        }
        ys.push(hs[top].clone());
    }
    Tensor::stack(&ys, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::gradcheck::{check_grads, random};
    use candle_core::{DType, Var};

    fn cfg(cell: Cell, hidden: u64, layers: u64, bidirectional: bool) -> RecurrentCfg {
        RecurrentCfg {
            cell,
            hidden,
            layers,
            bidirectional,
            dropout: 0.0,
            state: false,
            cell_state: false,
            attend: false,
        }
    }

    /// Random weights for every layer and direction, scaled so that the gates are neither
    /// saturated nor linear.
    fn weights(cfg: &RecurrentCfg, features: usize, memory: usize, seed: u64) -> Vec<Tensor> {
        let h = cfg.hidden as usize;
        let g = cfg.cell.gates() as usize * h;
        let d = cfg.directions() as usize;
        let mut out = Vec::new();
        for l in 0..cfg.layers as usize {
            let input = if l == 0 { features + memory } else { d * h };
            for _ in 0..d {
                let s = seed + out.len() as u64;
                out.push(random(&[g, input], s));
                out.push(random(&[g, h], s + 100));
                out.push((random(&[g], s + 200) * 0.5).unwrap());
                out.push((random(&[g], s + 300) * 0.5).unwrap());
            }
        }
        out
    }

    fn cells(flat: &[Tensor]) -> Vec<CellWeights> {
        flat.chunks(4)
            .map(|w| CellWeights {
                w_ih: w[0].clone(),
                w_hh: w[1].clone(),
                b_ih: w[2].clone(),
                b_hh: w[3].clone(),
            })
            .collect()
    }

    /// All outputs flattened into one vector, so that one check covers every path.
    fn joined(outs: Vec<Tensor>) -> Result<Tensor> {
        let flat: Vec<Tensor> = outs
            .iter()
            .map(|t| t.flatten_all())
            .collect::<Result<_>>()?;
        Tensor::cat(&flat, 0)
    }

    /// Checks every input, weight and initial state of one configuration, `T = 3`, `N = 2`.
    fn check(mut cfg: RecurrentCfg, with_state: bool) {
        let (features, steps) = (3, 3);
        let slots = (cfg.layers * cfg.directions()) as usize;
        let h = cfg.hidden as usize;
        cfg.state = with_state;
        cfg.cell_state = with_state && cfg.cell == Cell::Lstm;
        let mut inputs = vec![random(&[2, steps, features], 1)];
        inputs.extend(weights(&cfg, features, 0, 10));
        let n_weights = inputs.len() - 1;
        if cfg.state {
            inputs.push(random(&[2, slots, h], 2));
        }
        if cfg.cell_state {
            inputs.push(random(&[2, slots, h], 3));
        }
        check_grads(
            |t| {
                let w = cells(&t[1..=n_weights]);
                let h0 = cfg.state.then(|| &t[n_weights + 1]);
                let c0 = cfg.cell_state.then(|| &t[n_weights + 2]);
                joined(run(&cfg, &t[0], &w, None, h0, c0, &mut |x| Ok(x.clone()))?)
            },
            &inputs,
            1e-6,
        );
    }

    #[test]
    fn rnn_gradients_match_finite_differences() {
        check(cfg(Cell::Rnn { relu: false }, 4, 1, false), false);
        check(cfg(Cell::Rnn { relu: false }, 3, 2, true), true);
        // relu: the random pre-activations keep clear of the kink at 0.
        check(cfg(Cell::Rnn { relu: true }, 3, 2, false), true);
    }

    #[test]
    fn gru_gradients_match_finite_differences() {
        check(cfg(Cell::Gru, 4, 1, false), false);
        check(cfg(Cell::Gru, 3, 2, true), true);
    }

    #[test]
    fn lstm_gradients_match_finite_differences() {
        check(cfg(Cell::Lstm, 4, 1, false), false);
        check(cfg(Cell::Lstm, 3, 2, true), true);
    }

    /// The stack step by step with the composed cell [`step`] and each step's own input
    /// projection: what `run` computed before the recurrence kernel (no dropout).
    fn composed(
        cfg: &RecurrentCfg,
        x: &Tensor,
        cells: &[CellWeights],
        h0: Option<&Tensor>,
        c0: Option<&Tensor>,
    ) -> Result<Vec<Tensor>> {
        let (n, steps, _) = x.dims3()?;
        let h = cfg.hidden as usize;
        let d = cfg.directions() as usize;
        let lstm = cfg.cell == Cell::Lstm;
        let zeros = Tensor::zeros((n, h), x.dtype(), x.device())?;
        let initial = |s: Option<&Tensor>, k: usize| match s {
            Some(s) => s.narrow(1, k, 1)?.squeeze(1),
            None => Ok(zeros.clone()),
        };
        let mut hs: Vec<Tensor> = (0..cells.len())
            .map(|k| initial(h0, k))
            .collect::<Result<_>>()?;
        let mut cs: Vec<Tensor> = (0..cells.len())
            .map(|k| initial(c0, k))
            .collect::<Result<_>>()?;
        let mut seq: Vec<Tensor> = (0..steps)
            .map(|t| x.narrow(1, t, 1)?.squeeze(1))
            .collect::<Result<_>>()?;
        for l in 0..cfg.layers as usize {
            let mut outputs = Vec::new();
            for dir in 0..d {
                let k = l * d + dir;
                let w = &cells[k];
                let mut ys = vec![None; steps];
                for s in 0..steps {
                    let t = if dir == 0 { s } else { steps - 1 - s };
                    let xp = linear(&seq[t], &w.w_ih, Some(&w.b_ih))?;
                    let c = lstm.then(|| cs[k].clone());
                    let (hn, cn) = step(cfg.cell, &xp, &hs[k], c.as_ref(), &w.w_hh.t()?, &w.b_hh)?;
                    ys[t] = Some(hn.clone());
                    hs[k] = hn;
                    if let Some(cn) = cn {
                        cs[k] = cn;
                    }
                }
                outputs.push(ys.into_iter().flatten().collect::<Vec<_>>());
            }
            seq = (0..steps)
                .map(|t| Tensor::cat(&outputs.iter().map(|o| &o[t]).collect::<Vec<_>>(), 1))
                .collect::<Result<_>>()?;
        }
        let mut out = vec![Tensor::stack(&seq, 1)?, Tensor::stack(&hs, 1)?];
        if lstm {
            out.push(Tensor::stack(&cs, 1)?);
        }
        Ok(out)
    }

    /// The outputs and the gradients of every input of `f` for the loss `sum(f(inputs) · r)`.
    fn value_and_grads(
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
        inputs: &[Tensor],
    ) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|x| Var::from_tensor(x).unwrap())
            .collect();
        let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&xs).unwrap();
        let r = random(y.dims(), 9).to_dtype(y.dtype()).unwrap();
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g = xs.iter().map(|x| grads.get(x).unwrap().clone()).collect();
        (y, g)
    }

    /// The largest difference between `a` and `b` relative to `b`'s largest magnitude (or 1).
    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        let largest = |t: &Tensor| -> f64 {
            let t = t.to_dtype(DType::F64).unwrap().abs().unwrap();
            t.flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        largest(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap())
            / largest(b).max(1.0)
    }

    /// The kernel against the composed cells, values and gradients of every input, f64 and
    /// f32, two bidirectional layers with initial states; a batch of 5 (uneven blocks per
    /// thread) and 6 steps. Hidden size 24: the GRU's 72 and the LSTM's 96 gates fill one
    /// of the forward's 64-column panels of `W_hhᵀ` and part of a second.
    #[test]
    fn kernel_matches_the_composed_cells() {
        let hidden = 24;
        for cell in [
            Cell::Rnn { relu: false },
            Cell::Rnn { relu: true },
            Cell::Gru,
            Cell::Lstm,
        ] {
            let mut cfg = cfg(cell, hidden, 2, true);
            cfg.state = true;
            cfg.cell_state = cell == Cell::Lstm;
            let (features, steps, batch) = (5, 6, 5);
            let slots = 4;
            let mut inputs = vec![random(&[batch, steps, features], 1)];
            inputs.extend(weights(&cfg, features, 0, 10));
            let n_weights = inputs.len() - 1;
            inputs.push(random(&[batch, slots, hidden as usize], 2));
            if cfg.cell_state {
                inputs.push(random(&[batch, slots, hidden as usize], 3));
            }
            for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
                let inputs: Vec<Tensor> =
                    inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
                let outputs = |kernel: bool| {
                    value_and_grads(
                        |t| {
                            let w = cells(&t[1..=n_weights]);
                            let h0 = Some(&t[n_weights + 1]);
                            let c0 = cfg.cell_state.then(|| &t[n_weights + 2]);
                            joined(if kernel {
                                run(&cfg, &t[0], &w, None, h0, c0, &mut |x| Ok(x.clone()))?
                            } else {
                                composed(&cfg, &t[0], &w, h0, c0)?
                            })
                        },
                        &inputs,
                    )
                };
                let (y1, g1) = outputs(true);
                let (y2, g2) = outputs(false);
                assert!(max_rel_diff(&y1, &y2) < tol, "{cell:?} {dtype:?} forward");
                for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
                    assert!(
                        max_rel_diff(a, b) < tol,
                        "{cell:?} {dtype:?} gradient of input {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn attention_gradients_match_finite_differences() {
        for cell in [Cell::Gru, Cell::Lstm] {
            let mut cfg = cfg(cell, 3, 2, false);
            cfg.attend = true;
            cfg.state = true;
            let (features, width, steps, sources) = (2, 4, 3, 5);
            let mut inputs = vec![random(&[2, steps, features], 1)];
            inputs.extend(weights(&cfg, features, width, 10));
            let n_weights = inputs.len() - 1;
            inputs.push(random(&[2, 2, 3], 2)); // initial state
            inputs.push(random(&[2, sources, width], 3)); // memory
            inputs.push(random(&[3, 3], 4)); // W_q
            inputs.push(random(&[3, width], 5)); // W_k
            inputs.push(random(&[1, 3], 6)); // w_v
            check_grads(
                |t| {
                    let w = cells(&t[1..=n_weights]);
                    let rest = &t[n_weights + 1..];
                    let att = AttentionWeights {
                        w_q: rest[2].clone(),
                        w_k: rest[3].clone(),
                        w_v: rest[4].clone(),
                    };
                    let outs = run(
                        &cfg,
                        &t[0],
                        &w,
                        Some((&att, &rest[1])),
                        Some(&rest[0]),
                        None,
                        &mut |x| Ok(x.clone()),
                    )?;
                    joined(outs)
                },
                &inputs,
                1e-6,
            );
        }
    }
}

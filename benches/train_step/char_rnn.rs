//! d2l's character-level language model written by hand with candle-nn layers (the `candle-nn`
//! column of the LSTM and GRU rows): one-hot tokens, `candle_nn::rnn::lstm` or `gru` (one
//! layer, batch first, zero initial state), a linear layer to the vocabulary at every step.
//! Names as d2l's `RNNModel` state dict: `rnn.weight_ih_l0`, …, `linear.weight`.

use candle_core::{Module, Result, Tensor};
use candle_nn::rnn::{GRU, GRUConfig, LSTM, LSTMConfig, RNN};
use candle_nn::{Linear, VarBuilder};

/// The recurrent layer.
enum Cell {
    Lstm(LSTM),
    Gru(GRU),
}

/// One-hot → LSTM or GRU → linear, over `[N, T]` token ids.
pub struct CandleCharRnn {
    vocab: usize,
    cell: Cell,
    linear: Linear,
}

impl CandleCharRnn {
    /// An LSTM (`lstm` true) or GRU model with `hidden` units over a vocabulary of `vocab`.
    pub fn new(lstm: bool, vocab: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        let cell = if lstm {
            Cell::Lstm(candle_nn::rnn::lstm(
                vocab,
                hidden,
                LSTMConfig::default(),
                vb.pp("rnn"),
            )?)
        } else {
            Cell::Gru(candle_nn::rnn::gru(
                vocab,
                hidden,
                GRUConfig::default(),
                vb.pp("rnn"),
            )?)
        };
        Ok(CandleCharRnn {
            vocab,
            cell,
            linear: candle_nn::linear(hidden, vocab, vb.pp("linear"))?,
        })
    }

    /// Logits `[N, T, vocab]` of token ids `[N, T]` (u32).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let x = candle_nn::encoding::one_hot(ids.clone(), self.vocab, 1f32, 0f32)?;
        // The hidden state of every step, stacked along time (candle's GRU `states_to_tensor`
        // concatenates instead, so both cells are stacked here).
        let hs: Vec<Tensor> = match &self.cell {
            Cell::Lstm(l) => l.seq(&x)?.into_iter().map(|s| s.h).collect(),
            Cell::Gru(g) => g.seq(&x)?.into_iter().map(|s| s.h).collect(),
        };
        self.linear.forward(&Tensor::stack(&hs, 1)?)
    }
}

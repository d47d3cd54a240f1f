//! Lowering: the typed IR becomes a candle network that trains and infers.
//!
//! This is the only stage that imports candle. Every op family has its forward pass in its own
//! file; where candle's CPU backward is wrong or missing (pooling) the op is our own
//! `CustomOp` with a finite-difference-tested gradient. Parameters are created at the node's
//! hierarchical name (`layer1.0.conv1.weight`), so checkpoints and PyTorch state dicts share keys.

pub mod activation;
pub mod conv;
mod conv_kernel;
mod kernel;
pub mod linear;
pub mod norm;
mod norm_kernel;
pub mod params;
pub mod pool;

#[cfg(test)]
pub(crate) mod gradcheck;

use candle_core::{DType, Device, Result, Tensor};

use crate::elaborate::Model;
use crate::ir::Graph;
use crate::ops::Op;
pub use params::{Init, State};

/// What one node computes.
enum Layer {
    Input(usize),
    Identity,
    Conv(conv::Conv),
    Linear(linear::Linear),
    BatchNorm(norm::BatchNorm),
    LayerNorm(norm::LayerNorm),
    Lrn(crate::ops::norm::Lrn),
    Activation(crate::ops::activation::Activation),
    Softmax(usize),
    Dropout(f64),
    Pool(crate::ops::pool::Pool2d),
    AdaptiveAvgPool(usize, usize),
    Flatten(usize),
    Reshape(Vec<usize>),
    Add,
    Concat(usize),
}

/// A model lowered to candle: layers in topological order over a shared [`State`].
pub struct Network {
    layers: Vec<Layer>,
    /// For each node, the (node, output slot) pairs it reads, by input slot.
    inputs: Vec<Vec<(usize, usize)>>,
    /// For each node, the last node that reads it (its value is dropped after that).
    last_use: Vec<usize>,
    outputs: Vec<usize>,
    /// Parameters, buffers and the random generator.
    pub state: State,
}

fn dims(g: &Graph, node: petgraph::graph::NodeIndex, slot: usize) -> Vec<usize> {
    g.dag[node].outputs[slot]
        .0
        .iter()
        .map(|d| d.known().unwrap_or(0) as usize)
        .collect()
}

impl Network {
    /// Lowers a model: creates every parameter (initialised by `init`, seeded by `seed`).
    pub fn new(
        model: &Model,
        device: &Device,
        dtype: DType,
        init: Init,
        seed: u64,
    ) -> Result<Network> {
        let g = &model.graph;
        let mut state = State::new(device, dtype, init, seed);
        let n = g.dag.node_count();
        let mut layers = Vec::with_capacity(n);
        let mut inputs = Vec::with_capacity(n);
        let mut last_use: Vec<usize> = (0..n).collect();
        for idx in g.dag.node_indices() {
            let node = &g.dag[idx];
            let ins = g.inputs_of(idx);
            let in_dims = ins
                .first()
                .map(|o| dims(g, o.node, o.slot))
                .unwrap_or_default();
            let name = node.name.as_str();
            let axis = |dim: i64, rank: usize| {
                if dim < 0 {
                    (dim + rank as i64) as usize
                } else {
                    dim as usize
                }
            };
            let layer = match &node.op {
                Op::Input(_) => Layer::Input(g.inputs.iter().position(|i| *i == idx).unwrap_or(0)),
                Op::Output => Layer::Identity,
                Op::Conv(c) => Layer::Conv(conv::Conv::new(&mut state, name, c, in_dims[1])?),
                Op::Linear(l) => Layer::Linear(linear::Linear::new(
                    &mut state,
                    name,
                    l,
                    in_dims[in_dims.len() - 1],
                )?),
                Op::BatchNorm(b) => {
                    Layer::BatchNorm(norm::BatchNorm::new(&mut state, name, b, in_dims[1])?)
                }
                Op::LayerNorm(l) => Layer::LayerNorm(norm::LayerNorm::new(
                    &mut state,
                    name,
                    l,
                    in_dims[in_dims.len() - 1],
                )?),
                Op::Lrn(l) => Layer::Lrn(l.clone()),
                Op::Activation(a) => Layer::Activation(*a),
                Op::Softmax(s) => Layer::Softmax(axis(s.dim, in_dims.len())),
                Op::Dropout(d) => Layer::Dropout(d.p),
                Op::Pool(p) => Layer::Pool(p.clone()),
                Op::AdaptiveAvgPool(p) => {
                    Layer::AdaptiveAvgPool(p.size.0 as usize, p.size.1 as usize)
                }
                Op::Flatten(f) => Layer::Flatten(f.start),
                Op::Reshape(_) => Layer::Reshape(dims(g, idx, 0)[1..].to_vec()),
                Op::Add => Layer::Add,
                Op::Concat(c) => Layer::Concat(axis(c.axis, in_dims.len())),
            };
            for o in &ins {
                last_use[o.node.index()] = idx.index();
            }
            layers.push(layer);
            inputs.push(ins.iter().map(|o| (o.node.index(), o.slot)).collect());
        }
        let outputs = g.outputs.iter().map(|o| o.index()).collect();
        Ok(Network {
            layers,
            inputs,
            last_use,
            outputs,
            state,
        })
    }

    /// Runs the network on one tensor per model input; returns one tensor per output.
    /// In training mode dropout is active and batch norm uses (and updates) batch statistics.
    pub fn forward(&mut self, xs: &[Tensor], train: bool) -> Result<Vec<Tensor>> {
        let n = self.layers.len();
        // Each node's outputs, by slot; emptied after the node's last reader.
        let mut values: Vec<Vec<Tensor>> = vec![Vec::new(); n];
        for i in 0..n {
            let args: Vec<&Tensor> = self.inputs[i]
                .iter()
                .map(|(j, slot)| {
                    values[*j].get(*slot).ok_or_else(|| {
                        candle_core::Error::Msg(format!("value {j}.{slot} freed too early"))
                    })
                })
                .collect::<Result<_>>()?;
            let x = args.first().copied();
            let one = || x.ok_or_else(|| candle_core::Error::Msg("layer without input".into()));
            // Single-output layers; a layer with several outputs (recurrent: sequence and
            // state) returns them all, by slot.
            let y = vec![match &self.layers[i] {
                Layer::Input(k) => xs
                    .get(*k)
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg(format!("missing input {k}")))?,
                Layer::Identity => one()?.clone(),
                Layer::Conv(c) => c.forward(one()?)?,
                Layer::Linear(l) => l.forward(one()?)?,
                Layer::BatchNorm(b) => b.forward(one()?, train)?,
                Layer::LayerNorm(l) => l.forward(one()?)?,
                Layer::Lrn(cfg) => norm::lrn(one()?, cfg)?,
                Layer::Activation(a) => activation::activate(one()?, *a)?,
                Layer::Softmax(axis) => activation::softmax(one()?, *axis)?,
                Layer::Dropout(p) if train && *p > 0.0 => {
                    let x = one()?;
                    let mask = self.state.dropout_mask(x, *p)?;
                    x.mul(&mask)?
                }
                Layer::Dropout(_) => one()?.clone(),
                Layer::Pool(cfg) => pool::pool2d(one()?, cfg)?,
                Layer::AdaptiveAvgPool(h, w) => pool::adaptive_avg_pool2d(one()?, (*h, *w))?,
                Layer::Flatten(start) => one()?.flatten_from(*start)?,
                Layer::Reshape(shape) => {
                    let x = one()?;
                    let mut full = vec![x.dim(0)?];
                    full.extend(shape);
                    x.reshape(full)?
                }
                Layer::Add => {
                    let mut acc = one()?.clone();
                    for t in &args[1..] {
                        acc = (acc + *t)?;
                    }
                    acc
                }
                Layer::Concat(axis) => Tensor::cat(&args, *axis)?,
            }];
            for (j, _) in &self.inputs[i] {
                if self.last_use[*j] == i && !self.outputs.contains(j) {
                    values[*j] = Vec::new();
                }
            }
            values[i] = y;
        }
        self.outputs
            .iter()
            .map(|o| {
                values[*o]
                    .first()
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg("output not computed".into()))
            })
            .collect()
    }
}

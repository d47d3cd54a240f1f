//! Lowering: the typed IR becomes a candle network that trains and infers.
//!
//! This is the only stage that imports candle. Every op family has its forward pass in its own
//! file; where candle's CPU backward is wrong or missing (pooling) the op is our own
//! `CustomOp` with a finite-difference-tested gradient. Parameters are created at the node's
//! hierarchical name (`layer1.0.conv1.weight`), so checkpoints and PyTorch state dicts share keys.

pub mod activation;
pub mod attention;
pub mod conv;
mod conv_kernel;
pub(crate) mod kernel;
pub mod layout;
pub mod linear;
pub mod norm;
mod norm_kernel;
pub mod params;
pub mod pool;
pub mod position;
pub mod recurrent;
pub mod recurrent_kernel;
pub mod sequence;
pub mod spatial;

#[cfg(test)]
pub(crate) mod gradcheck;

use candle_core::{DType, Device, Result, Tensor};

use self::activation::{Clamp, Pointwise};
use crate::elaborate::Model;
use crate::ir::Graph;
use crate::ops::Op;
use crate::ops::activation::Activation;
pub use params::{Init, Param, State};

/// What one node computes.
enum Layer {
    Input(usize),
    Identity,
    Conv(conv::Conv),
    ConvTranspose(conv::ConvTranspose),
    Linear(linear::Linear),
    BatchNorm(norm::BatchNorm),
    LayerNorm(norm::LayerNorm),
    Lrn(crate::ops::norm::Lrn),
    Activation(crate::ops::activation::Activation),
    Softmax(usize),
    Dropout(f64),
    /// A pooling layer, with the activation it applies to its input when it was that
    /// activation's only reader (see [`fuse_activation_pool`]).
    Pool(crate::ops::pool::Pool2d, Option<Pointwise>),
    AdaptiveAvgPool(usize, usize),
    Flatten(usize),
    Reshape(Vec<usize>),
    Add,
    /// An add whose only reader was a ReLU: `relu(x₁ + x₂ + …)` (see [`fuse_add_relu`]).
    AddRelu,
    Concat(usize),
    Upsample(spatial::Resize),
    Pad([usize; 4]),
    Crop((usize, usize), (usize, usize)),
    Select(usize, i64),
    Slice(usize, i64, Option<i64>),
    Transpose(usize, usize),
    Permute(Vec<usize>),
    Broadcast(usize),
    Mul,
    Embedding(sequence::Embedding),
    OneHot(usize),
    Recurrent(recurrent::Recurrent),
    Attention(attention::Attention),
    PosEnc(position::PosEnc),
    PosEmbedding(position::PosEmbedding),
    ClassToken(position::ClassToken),
}

/// A model lowered to candle: layers in topological order over a shared [`State`].
pub struct Network {
    layers: Vec<Layer>,
    /// For each node, the (node, output slot) pairs it reads, by input slot.
    inputs: Vec<Vec<(usize, usize)>>,
    /// For each node, the last node that reads it (its value is dropped after that).
    last_use: Vec<usize>,
    outputs: Vec<usize>,
    /// For each convolution, the batch norm that is its only reader: [`Network::infer`] folds
    /// the batch norm (and a ReLU fused into it) into the convolution.
    folded_norm: Vec<Option<usize>>,
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
                Op::ConvTranspose(c) => {
                    Layer::ConvTranspose(conv::ConvTranspose::new(&mut state, name, c, in_dims[1])?)
                }
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
                Op::Pool(p) => Layer::Pool(p.clone(), None),
                Op::AdaptiveAvgPool(p) => {
                    Layer::AdaptiveAvgPool(p.size.0 as usize, p.size.1 as usize)
                }
                Op::Flatten(f) => Layer::Flatten(f.start),
                Op::Reshape(_) => Layer::Reshape(dims(g, idx, 0)[1..].to_vec()),
                Op::Add => Layer::Add,
                Op::Concat(c) => Layer::Concat(axis(c.axis, in_dims.len())),
                Op::Upsample(u) => {
                    let out = dims(g, idx, 0);
                    Layer::Upsample(spatial::Resize::new(
                        u,
                        (in_dims[2], in_dims[3]),
                        (out[2], out[3]),
                    ))
                }
                Op::Pad(p) => Layer::Pad(p.sides.map(|s| s as usize)),
                Op::Crop(c) => {
                    let (top, left) = c.origin(in_dims[2] as u64, in_dims[3] as u64);
                    Layer::Crop(
                        (top as usize, left as usize),
                        (c.size.0 as usize, c.size.1 as usize),
                    )
                }
                Op::Select(s) => Layer::Select(axis(s.axis, in_dims.len()), s.index),
                Op::Slice(s) => Layer::Slice(axis(s.axis, in_dims.len()), s.start, s.end),
                Op::Transpose(t) => {
                    Layer::Transpose(axis(t.a, in_dims.len()), axis(t.b, in_dims.len()))
                }
                Op::Permute(p) => Layer::Permute(p.dims.clone()),
                Op::Broadcast(b) => Layer::Broadcast(axis(b.axis, in_dims.len() + 1)),
                Op::Mul => Layer::Mul,
                Op::Embedding(e) => {
                    Layer::Embedding(sequence::Embedding::new(&mut state, name, e)?)
                }
                Op::OneHot(o) => Layer::OneHot(o.classes as usize),
                Op::Recurrent(r) => {
                    let memory = match ins.last() {
                        Some(m) if r.attend => dims(g, m.node, m.slot)[2],
                        _ => 0,
                    };
                    Layer::Recurrent(recurrent::Recurrent::new(
                        &mut state, name, r, in_dims[2], memory,
                    )?)
                }
                Op::Attention(a) => {
                    let width = in_dims[2];
                    let kv_width = if a.cross {
                        dims(g, ins[1].node, ins[1].slot)[2]
                    } else {
                        width
                    };
                    let token_mask =
                        a.masked && ins.last().is_some_and(|m| g.shape(*m).is_tokens());
                    Layer::Attention(attention::Attention::new(
                        &mut state, name, a, width, kv_width, token_mask,
                    )?)
                }
                Op::PosEnc(p) => Layer::PosEnc(position::PosEnc::new(&state, p, in_dims[2])?),
                Op::PosEmbedding(p) => {
                    let len = p.positions(g.shape(ins[0])) as usize;
                    Layer::PosEmbedding(position::PosEmbedding::new(
                        &mut state, name, len, in_dims[2],
                    )?)
                }
                Op::ClassToken => {
                    Layer::ClassToken(position::ClassToken::new(&mut state, name, in_dims[2])?)
                }
            };
            for o in &ins {
                last_use[o.node.index()] = idx.index();
            }
            layers.push(layer);
            inputs.push(ins.iter().map(|o| (o.node.index(), o.slot)).collect());
        }
        let outputs: Vec<usize> = g.outputs.iter().map(|o| o.index()).collect();
        fuse_batch_norm_relu(&mut layers, &inputs, &outputs);
        fuse_add_relu(&mut layers, &inputs, &outputs);
        fuse_activation_pool(&mut layers, &inputs, &outputs);
        let folded_norm = batch_norms_after_convs(&layers, &inputs, &outputs);
        Ok(Network {
            layers,
            inputs,
            last_use,
            outputs,
            folded_norm,
            state,
        })
    }

    /// Runs the network on one tensor per model input; returns one tensor per output.
    /// In training mode dropout is active and batch norm uses (and updates) batch statistics.
    /// In either mode candle records the pass for `backward` (the gradients of the parameters
    /// that are not frozen, and of any input that is a variable).
    pub fn forward(&mut self, xs: &[Tensor], train: bool) -> Result<Vec<Tensor>> {
        self.run(xs, train, true)
    }

    /// Evaluation mode without gradients, as PyTorch's `model.eval()` under `torch.no_grad()`:
    /// the parameters enter detached, so candle records nothing and each activation is freed
    /// after its last reader. Each batch norm that is a convolution's only reader is folded
    /// into it (the weight scaled per output channel, the bias shifted, a fused ReLU applied
    /// in place) where that costs less than the batch norm ([`conv::Conv::fold_pays`]), from
    /// the current parameters and statistics at every call: the fold reads the weights once,
    /// and nothing can go stale when an optimiser or a checkpoint sets a parameter in place.
    pub fn infer(&mut self, xs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.run(xs, false, false)
    }

    /// One pass in training or evaluation mode; the parameters are read for the backward pass
    /// when `grad`.
    fn run(&mut self, xs: &[Tensor], train: bool, grad: bool) -> Result<Vec<Tensor>> {
        let n = self.layers.len();
        let inference = !train && !grad;
        // The batch norms folded into their convolutions in this pass.
        let mut folded = vec![false; n];
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
            // A layer with several outputs (recurrent: sequence and state) returns them all,
            // by slot; the others return one.
            let y = match &self.layers[i] {
                Layer::Recurrent(r) => r.forward(&args, train, grad, &mut self.state)?,
                single => vec![match single {
                    Layer::Input(k) => xs
                        .get(*k)
                        .cloned()
                        .ok_or_else(|| candle_core::Error::Msg(format!("missing input {k}")))?,
                    Layer::Identity => one()?.clone(),
                    Layer::Conv(c) => match self.folded_norm[i].map(|j| (j, &self.layers[j])) {
                        Some((j, Layer::BatchNorm(b)))
                            if inference && c.fold_pays(one()?.dims()) =>
                        {
                            folded[j] = true;
                            let (scale, shift, clamp) = b.eval_affine()?;
                            c.forward_folded(one()?, &scale, &shift, clamp)?
                        }
                        _ => c.forward(one()?, grad)?,
                    },
                    Layer::BatchNorm(_) if folded[i] => one()?.clone(),
                    Layer::Linear(l) => l.forward(one()?, grad)?,
                    Layer::BatchNorm(b) => b.forward(one()?, train, grad)?,
                    Layer::LayerNorm(l) => l.forward(one()?, grad)?,
                    Layer::Lrn(cfg) => norm::lrn(one()?, cfg)?,
                    Layer::Activation(a) => activation::activate(one()?, *a)?,
                    Layer::Softmax(axis) => activation::softmax(one()?, *axis)?,
                    Layer::Dropout(p) if train && *p > 0.0 => {
                        let x = one()?;
                        let mask = self.state.dropout_mask(x, *p)?;
                        x.mul(&mask)?
                    }
                    Layer::Dropout(_) => one()?.clone(),
                    Layer::Pool(cfg, None) => pool::pool2d(one()?, cfg)?,
                    Layer::Pool(cfg, Some(f)) => pool::activate_pool2d(one()?, *f, cfg)?,
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
                    Layer::AddRelu => activation::add_relu(&args)?,
                    Layer::Concat(axis) => Tensor::cat(&args, *axis)?,
                    Layer::Select(axis, at) => layout::select(one()?, *axis, *at)?,
                    Layer::Slice(axis, start, end) => layout::slice(one()?, *axis, *start, *end)?,
                    Layer::Transpose(a, b) => layout::transpose(one()?, *a, *b)?,
                    Layer::Permute(dims) => layout::permute(one()?, dims)?,
                    Layer::Broadcast(axis) => {
                        let like = args.get(1).ok_or_else(|| {
                            candle_core::Error::Msg("broadcast without `like`".into())
                        })?;
                        layout::broadcast(one()?, like, *axis)?
                    }
                    Layer::Mul => layout::mul(&args)?,
                    Layer::ConvTranspose(c) => c.forward(one()?, grad)?,
                    Layer::Upsample(r) => r.forward(one()?)?,
                    Layer::Pad(sides) => spatial::pad(one()?, *sides)?,
                    Layer::Crop(origin, size) => spatial::crop(one()?, *origin, *size)?,
                    Layer::Attention(a) => a.forward(&args, train, grad, &mut self.state)?,
                    Layer::PosEnc(p) => p.forward(one()?, train, &mut self.state)?,
                    Layer::PosEmbedding(p) => p.forward(one()?, grad)?,
                    Layer::ClassToken(c) => c.forward(one()?, grad)?,
                    Layer::Embedding(e) => e.forward(one()?, grad)?,
                    Layer::OneHot(classes) => {
                        sequence::one_hot(one()?, *classes, self.state.dtype)?
                    }
                    Layer::Recurrent(_) => {
                        candle_core::bail!("a recurrent layer returns several outputs")
                    }
                }],
            };
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

/// For each node, the batch norm that reads it, if the node is a convolution, the batch norm
/// its only reader and the convolution not a model output: the pairs that
/// [`Network::infer`] folds.
fn batch_norms_after_convs(
    layers: &[Layer],
    inputs: &[Vec<(usize, usize)>],
    outputs: &[usize],
) -> Vec<Option<usize>> {
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); layers.len()];
    for (i, ins) in inputs.iter().enumerate() {
        for (j, _) in ins {
            readers[*j].push(i);
        }
    }
    (0..layers.len())
        .map(|i| match readers[i].as_slice() {
            &[j] if matches!(layers[i], Layer::Conv(_))
                && matches!(layers[j], Layer::BatchNorm(_))
                && inputs[j] == [(i, 0)]
                && !outputs.contains(&i) =>
            {
                Some(j)
            }
            _ => None,
        })
        .collect()
}

/// Fuses each batch norm whose only reader is a ReLU or ReLU6 into that activation: the
/// batch norm applies it in its own passes (forward and backward) and the activation node
/// passes its input on.
fn fuse_batch_norm_relu(layers: &mut [Layer], inputs: &[Vec<(usize, usize)>], outputs: &[usize]) {
    let batch_norm = |l: &Layer| matches!(l, Layer::BatchNorm(_));
    let clamp = |l: &Layer| matches!(l, Layer::Activation(a) if Clamp::of(*a).is_some());
    for (act, j) in single_reader_pairs(layers, inputs, outputs, batch_norm, clamp) {
        let (Layer::BatchNorm(bn), Layer::Activation(a)) = (
            std::mem::replace(&mut layers[j], Layer::Identity),
            std::mem::replace(&mut layers[act], Layer::Identity),
        ) else {
            unreachable!("selected above");
        };
        let clamp = Clamp::of(a).expect("selected above");
        layers[j] = Layer::BatchNorm(bn.then_clamp(clamp));
    }
}

/// Fuses each add whose only reader is a ReLU (the end of a residual block) into one
/// `relu(sum)` op: one pass forward and one backward instead of two each.
fn fuse_add_relu(layers: &mut [Layer], inputs: &[Vec<(usize, usize)>], outputs: &[usize]) {
    let add = |l: &Layer| matches!(l, Layer::Add);
    let relu = |l: &Layer| matches!(l, Layer::Activation(Activation::Relu));
    for (act, j) in single_reader_pairs(layers, inputs, outputs, add, relu) {
        layers[j] = Layer::AddRelu;
        layers[act] = Layer::Identity;
    }
}

/// Fuses each ReLU, ReLU6 or sigmoid whose only reader is a pooling layer into it
/// ([`pool::activate_pool2d`]): the pooling applies the activation to each input plane in
/// scratch and multiplies by its derivative in its backward, so the activation's output and
/// gradient (each as large as the pooling's input) are never stored; the activation node
/// passes its input on. LeNet's sigmoid before average pooling, AlexNet's and VGG's ReLU
/// before max pooling.
fn fuse_activation_pool(layers: &mut [Layer], inputs: &[Vec<(usize, usize)>], outputs: &[usize]) {
    let pointwise = |l: &Layer| match l {
        Layer::Activation(a) => Pointwise::of(*a),
        _ => None,
    };
    let pool = |l: &Layer| matches!(l, Layer::Pool(_, None));
    let pairs = single_reader_pairs(layers, inputs, outputs, |l| pointwise(l).is_some(), pool);
    for (i, act) in pairs {
        if let (Some(f), Layer::Pool(_, pre)) = (pointwise(&layers[act]), &mut layers[i]) {
            *pre = Some(f);
            layers[act] = Layer::Identity;
        }
    }
}

/// The pairs `(i, j)` of a node `i` with `reader(i)` that reads only node `j`, where
/// `producer(j)` holds, `i` is `j`'s only reader, and `j` is not a model output (a node that
/// others read is left alone).
fn single_reader_pairs(
    layers: &[Layer],
    inputs: &[Vec<(usize, usize)>],
    outputs: &[usize],
    producer: impl Fn(&Layer) -> bool,
    reader: impl Fn(&Layer) -> bool,
) -> Vec<(usize, usize)> {
    let mut readers = vec![0usize; layers.len()];
    for ins in inputs {
        for (j, _) in ins {
            readers[*j] += 1;
        }
    }
    (0..layers.len())
        .filter_map(|i| {
            let &[(j, 0)] = inputs[i].as_slice() else {
                return None;
            };
            let fusable = reader(&layers[i])
                && producer(&layers[j])
                && readers[j] == 1
                && !outputs.contains(&j);
            fusable.then_some((i, j))
        })
        .collect()
}

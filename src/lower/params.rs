//! The network's state: trainable parameters and buffers (BatchNorm running statistics),
//! each at `<node name>.<kind>` (or at the node's own name for a node that is a single
//! parameter, as `class_token` and `encoder.pos_embedding`), kept in sorted maps so that iteration, initialisation and
//! checkpoints are deterministic; and the seeded random number generator every random
//! choice (initialisation, dropout) draws from.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How conv and linear weights start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Init {
    /// PyTorch's defaults: weights and biases uniform in ±1/√fan_in (kaiming_uniform, a = √5).
    #[default]
    Torch,
    /// Xavier (Glorot) uniform weights, ±√(6 / (fan_in + fan_out)), as d2l's `init_weights`;
    /// biases keep PyTorch's default.
    Xavier,
}

impl Init {
    /// Parses `torch` / `xavier`.
    pub fn parse(s: &str) -> Option<Init> {
        match s {
            "torch" | "default" => Some(Init::Torch),
            "xavier" => Some(Init::Xavier),
            _ => None,
        }
    }
}

/// A parameter or buffer as the layers hold it: the variable that the optimiser and
/// checkpoints update in place, and whether it is frozen (shared by every clone, so that
/// [`State::freeze`] reaches the layers). It derefs to the [`Var`].
#[derive(Clone, Debug)]
pub struct Param {
    var: Var,
    frozen: Arc<AtomicBool>,
}

impl Param {
    fn new(var: Var, frozen: bool) -> Self {
        Param {
            var,
            frozen: Arc::new(AtomicBool::new(frozen)),
        }
    }

    /// The tensor a forward pass reads: the variable itself (candle records every op on it
    /// for the backward pass) when `grad` is asked for and the parameter is not frozen, else a
    /// detached view of the same storage, on which candle records nothing. Buffers are always
    /// detached.
    pub fn read(&self, grad: bool) -> Tensor {
        if grad && !self.is_frozen() {
            self.var.as_tensor().clone()
        } else {
            self.var.as_tensor().detach()
        }
    }

    /// Whether the parameter is frozen: read detached, left out of [`State::trainable`].
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Relaxed)
    }
}

impl Deref for Param {
    type Target = Var;

    fn deref(&self) -> &Var {
        &self.var
    }
}

/// Trainable parameters and buffers by name, plus the generator for random choices.
pub struct State {
    /// Parameters (`0.weight`, `layer1.0.bn1.bias`, ...), frozen ones included.
    pub params: BTreeMap<String, Param>,
    /// Non-trainable state (`...running_mean`, `...running_var`), never tracked by autograd.
    pub buffers: BTreeMap<String, Param>,
    /// Seeded generator: the same seed gives the same initial weights and dropout masks.
    pub rng: StdRng,
    /// Where tensors live.
    pub device: Device,
    /// Their element type.
    pub dtype: DType,
    /// How weights start.
    pub init: Init,
}

impl State {
    /// An empty state.
    pub fn new(device: &Device, dtype: DType, init: Init, seed: u64) -> Self {
        State {
            params: BTreeMap::new(),
            buffers: BTreeMap::new(),
            rng: StdRng::seed_from_u64(seed),
            device: device.clone(),
            dtype,
            init,
        }
    }

    /// `n` values uniform in [-bound, bound).
    fn uniform(&mut self, n: usize, bound: f64) -> Vec<f64> {
        (0..n)
            .map(|_| self.rng.random_range(-bound..bound))
            .collect()
    }

    fn tensor(&self, values: Vec<f64>, shape: &[usize]) -> Result<Tensor> {
        Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)
    }

    /// A weight of `shape` (`[out, in, kh, kw]` or `[out, in]`) initialised by the chosen scheme.
    pub fn weight(&mut self, name: &str, shape: &[usize]) -> Result<Param> {
        let receptive: usize = shape[2..].iter().product();
        let fan_in = shape[1] * receptive;
        let fan_out = shape[0] * receptive;
        let n = shape.iter().product();
        let bound = match self.init {
            Init::Torch => 1.0 / (fan_in as f64).sqrt(),
            Init::Xavier => (6.0 / (fan_in + fan_out) as f64).sqrt(),
        };
        let values = self.uniform(n, bound);
        self.param(name, values, shape)
    }

    /// A `[out, in]` weight drawn Xavier-uniform whatever the scheme, as PyTorch's
    /// `nn.MultiheadAttention` draws its packed `in_proj_weight`.
    pub fn xavier(&mut self, name: &str, shape: &[usize]) -> Result<Param> {
        let bound = (6.0 / (shape[0] + shape[1]) as f64).sqrt();
        let values = self.uniform(shape.iter().product(), bound);
        self.param(name, values, shape)
    }

    /// A bias of `out` values, PyTorch's default ±1/√fan_in.
    pub fn bias(&mut self, name: &str, out: usize, fan_in: usize) -> Result<Param> {
        let values = self.uniform(out, 1.0 / (fan_in.max(1) as f64).sqrt());
        self.param(name, values, &[out])
    }

    /// A trainable parameter of `shape` uniform in ±`bound` (PyTorch's recurrent layers use
    /// ±1/√hidden for every weight and bias).
    pub fn uniform_param(&mut self, name: &str, shape: &[usize], bound: f64) -> Result<Param> {
        let values = self.uniform(shape.iter().product(), bound);
        self.param(name, values, shape)
    }

    /// A trainable parameter of `shape` drawn from N(0, std²) (PyTorch's `nn.Embedding`), by
    /// the Box–Muller transform.
    pub fn normal(&mut self, name: &str, shape: &[usize], std: f64) -> Result<Param> {
        let n: usize = shape.iter().product();
        let mut values = Vec::with_capacity(n + 1);
        while values.len() < n {
            let u1: f64 = 1.0 - self.rng.random::<f64>();
            let u2: f64 = self.rng.random();
            let r = (-2.0 * u1.ln()).sqrt() * std;
            let angle = std::f64::consts::TAU * u2;
            values.push(r * angle.cos());
            values.push(r * angle.sin());
        }
        values.truncate(n);
        self.param(name, values, shape)
    }

    /// A trainable parameter filled with `value`.
    pub fn filled(&mut self, name: &str, shape: &[usize], value: f64) -> Result<Param> {
        let n = shape.iter().product();
        self.param(name, vec![value; n], shape)
    }

    /// A buffer filled with `value`.
    pub fn buffer(&mut self, name: &str, shape: &[usize], value: f64) -> Result<Param> {
        let n = shape.iter().product();
        let buffer = Param::new(
            Var::from_tensor(&self.tensor(vec![value; n], shape)?)?,
            true,
        );
        self.buffers.insert(name.to_string(), buffer.clone());
        Ok(buffer)
    }

    fn param(&mut self, name: &str, values: Vec<f64>, shape: &[usize]) -> Result<Param> {
        let param = Param::new(Var::from_tensor(&self.tensor(values, shape)?)?, false);
        self.params.insert(name.to_string(), param.clone());
        Ok(param)
    }

    /// Parameters and buffers together, by name: what a checkpoint holds.
    pub fn variables(&self) -> BTreeMap<String, Var> {
        self.params
            .iter()
            .chain(self.buffers.iter())
            .map(|(k, v)| (k.clone(), v.var.clone()))
            .collect()
    }

    /// The parameters that are not frozen, by name: what the optimiser updates.
    pub fn trainable(&self) -> BTreeMap<String, Var> {
        self.params
            .iter()
            .filter(|(_, p)| !p.is_frozen())
            .map(|(k, p)| (k.clone(), p.var.clone()))
            .collect()
    }

    /// Freezes every parameter whose name matches `pattern` (`*` matches any run of
    /// characters, as in `layer*` or `*.bn1.*`): forward passes read it detached, so candle
    /// records nothing for a frozen prefix of the network and computes no gradient for it,
    /// and [`State::trainable`] leaves it out. Returns how many parameters matched.
    pub fn freeze(&mut self, pattern: &str) -> usize {
        let mut count = 0;
        for (name, p) in &self.params {
            if matches_pattern(pattern, name) {
                p.frozen.store(true, Ordering::Relaxed);
                count += 1;
            }
        }
        count
    }

    /// Total elements of the trainable parameters.
    pub fn param_count(&self) -> usize {
        self.params.values().map(|v| v.elem_count()).sum()
    }

    /// Total elements of the buffers.
    pub fn buffer_count(&self) -> usize {
        self.buffers.values().map(|v| v.elem_count()).sum()
    }

    /// Elements of the parameters that are not frozen.
    pub fn trainable_count(&self) -> usize {
        self.params
            .values()
            .filter(|p| !p.is_frozen())
            .map(|v| v.elem_count())
            .sum()
    }

    /// A dropout keep-mask scaled by 1/(1-p), shaped like `like`.
    pub fn dropout_mask(&mut self, like: &Tensor, p: f64) -> Result<Tensor> {
        let n = like.elem_count();
        let scale = 1.0 / (1.0 - p);
        let values: Vec<f32> = (0..n)
            .map(|_| {
                if self.rng.random::<f64>() < p {
                    0.0
                } else {
                    scale as f32
                }
            })
            .collect();
        Tensor::from_vec(values, like.shape(), &self.device)?.to_dtype(like.dtype())
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters (none included)
/// and every other character matches itself.
fn matches_pattern(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_shell_globs() {
        assert!(matches_pattern("layer*", "layer1.0.conv1.weight"));
        assert!(!matches_pattern("layer*", "fc.weight"));
        assert!(matches_pattern("*.bn1.*", "layer1.0.bn1.bias"));
        assert!(matches_pattern("fc.weight", "fc.weight"));
        assert!(!matches_pattern("fc", "fc.weight"));
        assert!(matches_pattern("*", "conv1.weight"));
        assert!(matches_pattern("a*b*b", "abab"));
        assert!(!matches_pattern("a*ab", "ab"));
    }

    #[test]
    fn frozen_parameters_are_read_detached_and_left_out_of_training() {
        let mut state = State::new(&Device::Cpu, DType::F32, Init::Torch, 0);
        let w = state.weight("body.weight", &[2, 3]).unwrap();
        let b = state.bias("head.bias", 2, 3).unwrap();
        assert!(w.read(true).track_op() && !w.read(false).track_op());
        assert_eq!(state.freeze("body.*"), 1);
        assert!(!w.read(true).track_op() && b.read(true).track_op());
        assert_eq!(state.trainable().keys().collect::<Vec<_>>(), ["head.bias"]);
        assert_eq!(state.trainable_count(), 2);
        assert_eq!(state.variables().len(), 2);
    }
}

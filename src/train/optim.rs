//! Optimisers with PyTorch's update rules: SGD (momentum, dampening-free, weight decay,
//! Nesterov), Adam and AdamW. Their state is a map of named tensors so that checkpoints
//! can save and `--resume` can restore it.

use std::collections::BTreeMap;

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var, bail};
use rayon::prelude::*;

use crate::lower::kernel::{Float, elements, vectorized};

/// An optimiser and its hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum Optimizer {
    /// `torch.optim.SGD`.
    Sgd {
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        nesterov: bool,
    },
    /// `torch.optim.Adam` (L2 weight decay added to the gradient).
    Adam {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
    /// `torch.optim.AdamW` (decoupled weight decay).
    AdamW {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
}

impl Optimizer {
    /// The base learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            Optimizer::Sgd { lr, .. }
            | Optimizer::Adam { lr, .. }
            | Optimizer::AdamW { lr, .. } => *lr,
        }
    }

    /// The same optimiser with another base learning rate.
    pub fn with_lr(&self, new: f64) -> Optimizer {
        let mut o = self.clone();
        match &mut o {
            Optimizer::Sgd { lr, .. }
            | Optimizer::Adam { lr, .. }
            | Optimizer::AdamW { lr, .. } => *lr = new,
        }
        o
    }
}

/// An optimiser bound to the parameters it updates, with its running state.
pub struct Stepper {
    kind: Optimizer,
    params: Vec<(String, Var)>,
    /// Per-parameter state tensors, by `<param>.<slot>` (`momentum`, `exp_avg`, `exp_avg_sq`).
    pub state: BTreeMap<String, Tensor>,
    /// Steps taken so far.
    pub steps: u64,
}

impl Stepper {
    /// Binds `kind` to `params`.
    pub fn new(kind: Optimizer, params: &BTreeMap<String, Var>) -> Self {
        Stepper {
            kind,
            params: params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            state: BTreeMap::new(),
            steps: 0,
        }
    }

    /// Applies one update with learning rate `lr` (the schedule's current value).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        for (name, var) in &self.params {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // A gradient can still reference the forward graph it came from; kept in the
            // optimiser's state it would hold every step's activations alive.
            let g = &g.detach();
            let p = &var.as_tensor().detach();
            let updated = match &self.kind {
                Optimizer::Sgd {
                    momentum,
                    weight_decay,
                    nesterov,
                    ..
                } => {
                    let rule = SgdRule {
                        lr,
                        momentum: *momentum,
                        weight_decay: *weight_decay,
                        nesterov: *nesterov,
                    };
                    if sgd_in_place(var, g, &rule, &mut self.state, name)? {
                        continue;
                    }
                    let mut g = g.clone();
                    if *weight_decay != 0.0 {
                        g = (g + (p * *weight_decay)?)?;
                    }
                    if *momentum != 0.0 {
                        let key = format!("{name}.momentum");
                        let buf = match self.state.get(&key) {
                            Some(b) => ((b * *momentum)? + &g)?,
                            None => g.clone(),
                        };
                        g = if *nesterov {
                            (g + (&buf * *momentum)?)?
                        } else {
                            buf.clone()
                        };
                        self.state.insert(key, buf);
                    }
                    (p - (g * lr)?)?
                }
                Optimizer::Adam {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    ..
                }
                | Optimizer::AdamW {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    ..
                } => {
                    let decoupled = matches!(self.kind, Optimizer::AdamW { .. });
                    let mut g = g.clone();
                    let mut p = p.clone();
                    if *weight_decay != 0.0 {
                        if decoupled {
                            p = (p * (1.0 - lr * weight_decay))?;
                        } else {
                            g = (g + (&p * *weight_decay)?)?;
                        }
                    }
                    let (k1, k2) = (format!("{name}.exp_avg"), format!("{name}.exp_avg_sq"));
                    let m = match self.state.get(&k1) {
                        Some(m) => ((m * *beta1)? + (&g * (1.0 - beta1))?)?,
                        None => (&g * (1.0 - beta1))?,
                    };
                    let v = match self.state.get(&k2) {
                        Some(v) => ((v * *beta2)? + (g.sqr()? * (1.0 - beta2))?)?,
                        None => (g.sqr()? * (1.0 - beta2))?,
                    };
                    let m_hat = (&m / (1.0 - beta1.powi(t)))?;
                    let v_hat = (&v / (1.0 - beta2.powi(t)))?;
                    let update = (m_hat / (v_hat.sqrt()? + *eps)?)?;
                    self.state.insert(k1, m);
                    self.state.insert(k2, v);
                    (p - (update * lr)?)?
                }
            };
            var.set(&updated)?;
        }
        Ok(())
    }
}

/// The numbers of one SGD update (PyTorch's rule): `g' = g + wd·p`; with momentum
/// `buf = m·buf + g'` (`buf = g'` on the first step) and `d = g' + m·buf` (Nesterov) or `buf`,
/// else `d = g'`; then `p -= lr·d`.
#[derive(Clone, Copy, Debug)]
struct SgdRule {
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    nesterov: bool,
}

/// Elements per parallel task of the in-place update.
const UPDATE_CHUNK: usize = 1 << 15;

/// The SGD update of `var` in place, in one pass over the parameter (and its momentum buffer,
/// created as zeros on the first step, which gives `buf = g'` exactly): on the CPU, for f32
/// and f64 contiguous parameters. `false` (nothing done) elsewhere, for the composed update.
fn sgd_in_place(
    var: &Var,
    g: &Tensor,
    rule: &SgdRule,
    state: &mut BTreeMap<String, Tensor>,
    name: &str,
) -> Result<bool> {
    let p = var.as_tensor();
    let supported = p.device().is_cpu()
        && matches!(p.dtype(), DType::F32 | DType::F64)
        && g.dtype() == p.dtype()
        && g.dims() == p.dims()
        && p.is_contiguous();
    if !supported {
        return Ok(false);
    }
    let g = g.contiguous()?;
    if rule.momentum == 0.0 {
        p.inplace_op2(&g, &SgdStep(*rule))?;
        return Ok(true);
    }
    let key = format!("{name}.momentum");
    let buf = match state.get(&key) {
        Some(b) if b.dims() == p.dims() && b.dtype() == p.dtype() && b.is_contiguous() => b.clone(),
        // A buffer of another layout (restored from a checkpoint): a contiguous copy.
        Some(b) => b.to_dtype(p.dtype())?.contiguous()?.copy()?,
        None => p.zeros_like()?,
    };
    buf.inplace_op3(&g, p, &MomentumStep(*rule))?;
    p.inplace_op3(&g, &buf, &SgdStep(*rule))?;
    state.insert(key, buf);
    Ok(true)
}

/// The contiguous elements `l` selects of the updated tensor's data.
fn target<'a, T>(data: &'a mut [T], l: &Layout) -> Result<&'a mut [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut data[a..b]),
        None => bail!("sgd: parameter is not contiguous"),
    }
}

/// `dst[i] = f(dst[i], a[i], b[i])` in parallel chunks, vectorised.
fn update<T: Float>(dst: &mut [T], a: &[T], b: Option<&[T]>, f: impl Fn(T, T, T) -> T + Sync) {
    assert_eq!(dst.len(), a.len(), "sgd: operands differ in size");
    if let Some(b) = b {
        assert_eq!(dst.len(), b.len(), "sgd: operands differ in size");
    }
    dst.par_chunks_mut(UPDATE_CHUNK)
        .enumerate()
        .for_each(|(k, d)| {
            let start = k * UPDATE_CHUNK;
            let a = &a[start..][..d.len()];
            let b = b.map_or(a, |b| &b[start..][..d.len()]);
            vectorized(
                #[inline(always)]
                || {
                    for ((d, &u), &v) in d.iter_mut().zip(a).zip(b) {
                        *d = f(*d, u, v);
                    }
                },
            )
        });
}

/// `p -= lr · d` on the parameter, with `(g, buf)` as operands (`buf` only with momentum).
struct SgdStep(SgdRule);

impl SgdStep {
    fn run<T: Float>(&self, p: &mut [T], g: &[T], buf: Option<&[T]>) {
        let r = self.0;
        let (lr, m, wd) = (
            T::from_f64(r.lr),
            T::from_f64(r.momentum),
            T::from_f64(r.weight_decay),
        );
        match (buf, r.nesterov) {
            (None, _) => update(p, g, None, |p, g, _| p - lr * (g + wd * p)),
            (Some(buf), false) => update(p, buf, None, |p, b, _| p - lr * b),
            (Some(buf), true) => update(p, g, Some(buf), |p, g, b| p - lr * ((g + wd * p) + m * b)),
        }
    }
}

impl InplaceOp2 for SgdStep {
    fn name(&self) -> &'static str {
        "dlc-sgd"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        match s1 {
            CpuStorage::F32(p) => self.run(target(p, l1)?, elements(s2, l2)?, None),
            CpuStorage::F64(p) => self.run(target(p, l1)?, elements(s2, l2)?, None),
            other => bail!("sgd: unsupported dtype {:?}", other.dtype()),
        }
        Ok(())
    }
}

impl InplaceOp3 for SgdStep {
    fn name(&self) -> &'static str {
        "dlc-sgd-momentum"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        match s1 {
            CpuStorage::F32(p) => {
                self.run(target(p, l1)?, elements(s2, l2)?, Some(elements(s3, l3)?))
            }
            CpuStorage::F64(p) => {
                self.run(target(p, l1)?, elements(s2, l2)?, Some(elements(s3, l3)?))
            }
            other => bail!("sgd: unsupported dtype {:?}", other.dtype()),
        }
        Ok(())
    }
}

/// `buf = m · buf + (g + wd · p)` on the momentum buffer, with `(g, p)` as operands.
struct MomentumStep(SgdRule);

impl MomentumStep {
    fn run<T: Float>(&self, buf: &mut [T], g: &[T], p: &[T]) {
        let (m, wd) = (
            T::from_f64(self.0.momentum),
            T::from_f64(self.0.weight_decay),
        );
        update(buf, g, Some(p), |b, g, p| m * b + (g + wd * p));
    }
}

impl InplaceOp3 for MomentumStep {
    fn name(&self) -> &'static str {
        "dlc-sgd-buffer"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        match s1 {
            CpuStorage::F32(b) => self.run(target(b, l1)?, elements(s2, l2)?, elements(s3, l3)?),
            CpuStorage::F64(b) => self.run(target(b, l1)?, elements(s2, l2)?, elements(s3, l3)?),
            other => bail!("sgd: unsupported dtype {:?}", other.dtype()),
        }
        Ok(())
    }
}

/// Scales gradients so that their global L2 norm is at most `max_norm`; returns the norm.
pub fn clip_grad_norm(
    grads: &mut GradStore,
    params: &BTreeMap<String, Var>,
    max_norm: f64,
) -> Result<f64> {
    let mut total = 0.0;
    for v in params.values() {
        if let Some(g) = grads.get(v.as_tensor()) {
            total += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = total.sqrt();
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for v in params.values() {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};

    /// One parameter p = [1, -2], loss = sum(p²) so the gradient is 2p; values checked
    /// against PyTorch's update rules computed by hand.
    fn run(kind: Optimizer, steps: usize) -> Vec<f64> {
        let p = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &Device::Cpu).unwrap()).unwrap();
        let mut params = BTreeMap::new();
        params.insert("p".to_string(), p.clone());
        let mut opt = Stepper::new(kind.clone(), &params);
        for _ in 0..steps {
            let loss = p.as_tensor().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, kind.lr()).unwrap();
        }
        p.as_tensor().to_vec1::<f64>().unwrap()
    }

    fn close(a: &[f64], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-9, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn sgd_plain_momentum_nesterov_and_decay() {
        close(
            &run(
                Optimizer::Sgd {
                    lr: 0.1,
                    momentum: 0.0,
                    weight_decay: 0.0,
                    nesterov: false,
                },
                1,
            ),
            &[0.8, -1.6],
        );
        // momentum 0.9: step 1 buf = g0 = 2p0; step 2 buf = 0.9 g0 + g1.
        let p1 = [0.8, -1.6];
        let buf = [0.9 * 2.0 + 2.0 * p1[0], 0.9 * -4.0 + 2.0 * p1[1]];
        close(
            &run(
                Optimizer::Sgd {
                    lr: 0.1,
                    momentum: 0.9,
                    weight_decay: 0.0,
                    nesterov: false,
                },
                2,
            ),
            &[p1[0] - 0.1 * buf[0], p1[1] - 0.1 * buf[1]],
        );
        // Nesterov, one step: g + 0.9 g.
        close(
            &run(
                Optimizer::Sgd {
                    lr: 0.1,
                    momentum: 0.9,
                    weight_decay: 0.0,
                    nesterov: true,
                },
                1,
            ),
            &[1.0 - 0.1 * 3.8, -2.0 + 0.1 * 7.6],
        );
        // Weight decay 0.5: g = 2p + 0.5p.
        close(
            &run(
                Optimizer::Sgd {
                    lr: 0.1,
                    momentum: 0.0,
                    weight_decay: 0.5,
                    nesterov: false,
                },
                1,
            ),
            &[0.75, -1.5],
        );
    }

    #[test]
    fn in_place_sgd_matches_the_composed_rule() {
        // Larger than one parallel chunk; gradient r_t (loss Σ p·r_t), three steps, against
        // PyTorch's rule written out on plain vectors.
        let len = 2 * UPDATE_CHUNK + 77;
        let start = crate::lower::gradcheck::random(&[len], 40);
        let rs: Vec<Tensor> = (0..3)
            .map(|t| crate::lower::gradcheck::random(&[len], 41 + t))
            .collect();
        for (momentum, weight_decay, nesterov) in [
            (0.0, 0.0, false),
            (0.0, 0.01, false),
            (0.9, 0.0, false),
            (0.9, 0.01, false),
            (0.9, 0.01, true),
        ] {
            let kind = Optimizer::Sgd {
                lr: 0.1,
                momentum,
                weight_decay,
                nesterov,
            };
            let mut p: Vec<f64> = start.to_vec1().unwrap();
            let mut buf: Option<Vec<f64>> = None;
            for r in &rs {
                let r: Vec<f64> = r.to_vec1().unwrap();
                let g: Vec<f64> = r
                    .iter()
                    .zip(&p)
                    .map(|(g, p)| g + weight_decay * p)
                    .collect();
                let d = if momentum == 0.0 {
                    g
                } else {
                    let b: Vec<f64> = match &buf {
                        Some(b) => b.iter().zip(&g).map(|(b, g)| momentum * b + g).collect(),
                        None => g.clone(),
                    };
                    let d = if nesterov {
                        g.iter().zip(&b).map(|(g, b)| g + momentum * b).collect()
                    } else {
                        b.clone()
                    };
                    buf = Some(b);
                    d
                };
                p = p.iter().zip(&d).map(|(p, d)| p - 0.1 * d).collect();
            }
            for dtype in [DType::F64, DType::F32] {
                let var = Var::from_tensor(&start.to_dtype(dtype).unwrap()).unwrap();
                let mut params = BTreeMap::new();
                params.insert("p".to_string(), var.clone());
                let mut opt = Stepper::new(kind.clone(), &params);
                for r in &rs {
                    let loss = (var.as_tensor() * r.to_dtype(dtype).unwrap())
                        .unwrap()
                        .sum_all()
                        .unwrap();
                    opt.step(&loss.backward().unwrap(), 0.1).unwrap();
                }
                let got: Vec<f64> = var
                    .as_tensor()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                let err = got
                    .iter()
                    .zip(&p)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                assert!(err < tol, "{kind:?} {dtype:?}: {err}");
                assert_eq!(opt.state.len(), usize::from(momentum != 0.0));
            }
        }
    }

    #[test]
    fn optimiser_state_holds_no_graph() {
        // The gradient of p·x w.r.t. p is x, a tracked tensor here: the state must not keep it
        // (and so every step's activations) alive.
        let p = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &Device::Cpu).unwrap()).unwrap();
        let x = Var::from_tensor(&Tensor::new(&[3.0f64, 4.0], &Device::Cpu).unwrap()).unwrap();
        let mut params = BTreeMap::new();
        params.insert("p".to_string(), p.clone());
        for kind in [
            Optimizer::Sgd {
                lr: 0.1,
                momentum: 0.9,
                weight_decay: 0.0,
                nesterov: false,
            },
            Optimizer::Adam {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
        ] {
            let mut opt = Stepper::new(kind, &params);
            let loss = (p.as_tensor() * x.as_tensor().exp().unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            opt.step(&loss.backward().unwrap(), 0.1).unwrap();
            assert!(
                opt.state.values().all(|t| !t.track_op()),
                "state tensors are detached"
            );
        }
    }

    #[test]
    fn adam_first_step_moves_by_lr() {
        // The bias-corrected first Adam step is lr · g/|g| (up to eps).
        let out = run(
            Optimizer::Adam {
                lr: 0.01,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            1,
        );
        close(
            &out,
            &[
                1.0 - 0.01 * (2.0 / (2.0 + 1e-8)),
                -2.0 + 0.01 * (4.0 / (4.0 + 1e-8)),
            ],
        );
        // AdamW decays the weight first: p(1 - lr·wd).
        let out = run(
            Optimizer::AdamW {
                lr: 0.01,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
            },
            1,
        );
        close(
            &out,
            &[
                1.0 * (1.0 - 0.001) - 0.01 * (2.0 / (2.0 + 1e-8)),
                -2.0 * (1.0 - 0.001) + 0.01 * (4.0 / (4.0 + 1e-8)),
            ],
        );
    }
}

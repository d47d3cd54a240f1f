//! Optimisers with PyTorch's update rules: SGD (momentum, dampening-free, weight decay,
//! Nesterov), Adam and AdamW. Their state is a map of named tensors so that checkpoints
//! can save and `--resume` can restore it.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

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
    use candle_core::{Device, Tensor};

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

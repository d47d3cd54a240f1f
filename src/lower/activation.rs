//! Elementwise activations, softmax and dropout.
//!
//! ReLU, ReLU6 and sigmoid, the activations of the CNNs, are our own custom op on the CPU
//! (f32, f64): one pass forward and one pass backward from the output, where candle's
//! composed backward makes three to six passes and as many temporary tensors. Their gradients
//! follow PyTorch at the kinks: zero where ReLU's output is 0 and where ReLU6's is 0 or 6.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType, bail,
};

use super::kernel::{Float, elements, par_chunks_zeroed, vectorized};
use crate::ops::activation::Activation;

/// Applies an activation; every one has a correct backward (checked below).
pub fn activate(x: &Tensor, a: Activation) -> Result<Tensor> {
    let fused = |p: Pointwise| -> Result<Tensor> {
        if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
            x.contiguous()?.apply_op1(PointwiseOp(p))
        } else {
            p.composed(x)
        }
    };
    match a {
        Activation::Relu => fused(Pointwise::Relu),
        Activation::Relu6 => fused(Pointwise::Relu6),
        Activation::Sigmoid => fused(Pointwise::Sigmoid),
        Activation::Tanh => x.tanh(),
        // candle's `gelu_erf` backward rounds 1/√(2π) to 0.398942 (off by 3e-7); built from
        // `erf`, whose backward is exact, the gradient matches PyTorch to 1e-16.
        Activation::Gelu => (x * 0.5)?.mul(&((x / std::f64::consts::SQRT_2)?.erf()? + 1.0)?),
        Activation::Silu => x.silu(),
        Activation::Hardswish => x.mul(&((x + 3.0)?.relu()?.minimum(6.0)? / 6.0)?),
    }
}

/// The activations with a kernel of our own; a pooling layer applies one of them to its
/// input itself when it is the activation's only reader (`pool::activate_pool2d`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pointwise {
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
    /// `1 / (1 + e^−x)`.
    Sigmoid,
}

impl Pointwise {
    /// The kernel that computes `a`, if there is one.
    pub fn of(a: Activation) -> Option<Pointwise> {
        match a {
            Activation::Relu => Some(Pointwise::Relu),
            Activation::Relu6 => Some(Pointwise::Relu6),
            Activation::Sigmoid => Some(Pointwise::Sigmoid),
            _ => None,
        }
    }

    /// `f(x)`; NaN stays NaN.
    #[inline(always)]
    pub(crate) fn apply<T: Float>(self, v: T) -> T {
        match self {
            Pointwise::Relu => Clamp::RELU.of_type().apply(v),
            Pointwise::Relu6 => Clamp::RELU6.of_type().apply(v),
            Pointwise::Sigmoid => T::one() / (T::one() + (T::zero() - v).exp()),
        }
    }

    /// `f'(x)` from the output `y = f(x)`.
    #[inline(always)]
    pub(crate) fn derivative<T: Float>(self, y: T) -> T {
        match self {
            Pointwise::Relu => Clamp::RELU.of_type().grad(T::one(), y),
            Pointwise::Relu6 => Clamp::RELU6.of_type().grad(T::one(), y),
            Pointwise::Sigmoid => y * (T::one() - y),
        }
    }

    /// `f` over `x`, in parallel chunks of [`Self::apply_into`].
    fn forward<T: Float>(self, x: &[T]) -> Vec<T> {
        par_chunks_zeroed(x.len(), POINTWISE_CHUNK, |k, o| {
            let x = &x[k * POINTWISE_CHUNK..][..o.len()];
            vectorized(
                #[inline(always)]
                || self.apply_into(x, o),
            )
        })
    }

    /// `dL/dx = dL/dy · f'(x)` from the output `y`. Each arm is its own loop with the
    /// activation a constant, so that it vectorises (one loop matching on `self` per element
    /// does not).
    fn backward<T: Float>(self, y: &[T], grad: &[T]) -> Vec<T> {
        match self {
            Pointwise::Relu => map2(y, grad, |y, g| g * Pointwise::Relu.derivative(y)),
            Pointwise::Relu6 => map2(y, grad, |y, g| g * Pointwise::Relu6.derivative(y)),
            Pointwise::Sigmoid => map2(y, grad, |y, g| g * Pointwise::Sigmoid.derivative(y)),
        }
    }

    /// `out[i] = f(x[i])`. One loop per activation, with the activation a constant, so that it
    /// vectorises; inline it into a [`vectorized`] caller.
    #[inline(always)]
    pub(crate) fn apply_into<T: Float>(self, x: &[T], out: &mut [T]) {
        #[inline(always)]
        fn run<T: Float>(x: &[T], out: &mut [T], p: Pointwise) {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = p.apply(v);
            }
        }
        match self {
            Pointwise::Relu => run(x, out, Pointwise::Relu),
            Pointwise::Relu6 => run(x, out, Pointwise::Relu6),
            Pointwise::Sigmoid => run(x, out, Pointwise::Sigmoid),
        }
    }

    /// `grad[i] = grad[i] · f'(x[i])`, from the input `x` (its output recomputed): the
    /// backward of `f` in place, for a kernel that applies `f` to its own input
    /// (`pool::activate_pool2d`); the same arithmetic as [`Self::backward`]. One loop per
    /// activation; inline it into a [`vectorized`] caller.
    #[inline(always)]
    pub(crate) fn scale_by_derivative<T: Float>(self, grad: &mut [T], x: &[T]) {
        #[inline(always)]
        fn run<T: Float>(grad: &mut [T], x: &[T], p: Pointwise) {
            for (g, &x) in grad.iter_mut().zip(x) {
                *g *= p.derivative(p.apply(x));
            }
        }
        match self {
            Pointwise::Relu => run(grad, x, Pointwise::Relu),
            Pointwise::Relu6 => run(grad, x, Pointwise::Relu6),
            Pointwise::Sigmoid => run(grad, x, Pointwise::Sigmoid),
        }
    }

    /// The same function from candle's differentiable primitives (other devices and dtypes).
    fn composed(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Pointwise::Relu => x.relu(),
            Pointwise::Relu6 => x.relu()?.minimum(6.0),
            Pointwise::Sigmoid => candle_nn::ops::sigmoid(x),
        }
    }
}

/// Elements per parallel task of the pointwise kernels.
const POINTWISE_CHUNK: usize = 1 << 14;

/// `out[i] = f(a[i], b[i])`, in parallel chunks.
fn map2<T: Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    par_chunks_zeroed(a.len(), POINTWISE_CHUNK, |k, o| {
        let start = k * POINTWISE_CHUNK;
        let a = &a[start..][..o.len()];
        let b = &b[start..][..o.len()];
        vectorized(
            #[inline(always)]
            || {
                for ((o, &u), &v) in o.iter_mut().zip(a).zip(b) {
                    *o = f(u, v);
                }
            },
        )
    })
}

/// `y = f(x)`; its backward is [`PointwiseGrad`].
struct PointwiseOp(Pointwise);

impl CustomOp1 for PointwiseOp {
    fn name(&self) -> &'static str {
        "dlc-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = self.0;
        let out = match s.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(p.forward(elements(s, l)?)),
            DType::F64 => f64::to_cpu_storage_owned(p.forward(elements(s, l)?)),
            other => bail!("activation: only f32 and f64 are supported, got {other:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(
            &grad.contiguous()?,
            &PointwiseGrad(self.0),
        )?))
    }
}

/// `(y, dL/dy) -> dL/dx = dL/dy · f'(x)`, from the output `y` (not itself differentiable).
struct PointwiseGrad(Pointwise);

impl CustomOp2 for PointwiseGrad {
    fn name(&self) -> &'static str {
        "dlc-activation-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            bail!(
                "activation backward: gradient {:?} for {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        let p = self.0;
        let out = match s1.dtype() {
            DType::F32 => {
                f32::to_cpu_storage_owned(p.backward(elements(s1, l1)?, elements(s2, l2)?))
            }
            DType::F64 => {
                f64::to_cpu_storage_owned(p.backward(elements(s1, l1)?, elements(s2, l2)?))
            }
            other => bail!("activation: only f32 and f64 are supported, got {other:?}"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// ReLU or ReLU6 as `min(max(y, 0), max)` (`max = ∞` for ReLU): the activations a batch
/// norm (training) or a folded convolution (evaluation) applies in its own passes. NaN stays
/// NaN; the gradient is PyTorch's: `dy` where `0 < y < max` (`0 < y` for ReLU), else 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clamp {
    max: f64,
}

impl Clamp {
    /// ReLU.
    pub const RELU: Clamp = Clamp { max: f64::INFINITY };
    /// ReLU6.
    pub const RELU6: Clamp = Clamp { max: 6.0 };

    /// The clamp that computes `a`, if it is one.
    pub fn of(a: Activation) -> Option<Clamp> {
        match a {
            Activation::Relu => Some(Clamp::RELU),
            Activation::Relu6 => Some(Clamp::RELU6),
            _ => None,
        }
    }

    /// The activation this clamp computes.
    pub fn activation(self) -> Activation {
        if self.max.is_finite() {
            Activation::Relu6
        } else {
            Activation::Relu
        }
    }

    /// The clamp of one element type, for the kernels' inner loops.
    #[inline(always)]
    pub(crate) fn of_type<T: Float>(self) -> TypedClamp<T> {
        TypedClamp {
            max: T::from_f64(self.max),
            bounded: self.max.is_finite(),
        }
    }
}

/// [`Clamp`] with its bound in the element type.
#[derive(Clone, Copy)]
pub(crate) struct TypedClamp<T> {
    max: T,
    bounded: bool,
}

impl<T: Float> TypedClamp<T> {
    /// `min(max(t, 0), max)`; NaN stays NaN.
    #[inline(always)]
    pub fn apply(self, t: T) -> T {
        if t < T::zero() {
            T::zero()
        } else if self.bounded && t > self.max {
            self.max
        } else {
            t
        }
    }

    /// The gradient `dy` through the clamp whose output is `y`.
    #[inline(always)]
    pub fn grad(self, dy: T, y: T) -> T {
        if y > T::zero() && (!self.bounded || y < self.max) {
            dy
        } else {
            T::zero()
        }
    }
}

/// `relu(x₁ + x₂ + …)`, the end of a residual block, in one pass forward and one backward
/// (the sum of the last two operands and the ReLU are our own op on the CPU for f32 and f64
/// operands of one shape; elsewhere candle's ops).
pub fn add_relu(xs: &[&Tensor]) -> Result<Tensor> {
    let Some((last, rest)) = xs.split_last() else {
        bail!("add: no operands");
    };
    let Some((first, middle)) = rest.split_first() else {
        return activate(last, Activation::Relu);
    };
    let mut acc = (*first).clone();
    for t in middle {
        acc = (acc + *t)?;
    }
    let fused = acc.device().is_cpu()
        && matches!(acc.dtype(), DType::F32 | DType::F64)
        && acc.dtype() == last.dtype()
        && acc.dims() == last.dims();
    if fused {
        acc.contiguous()?.apply_op2(&last.contiguous()?, AddReluOp)
    } else {
        (acc + *last)?.relu()
    }
}

/// `relu(u + v)`.
#[inline(always)]
fn add_then_relu<T: Float>(u: T, v: T) -> T {
    Pointwise::Relu.apply(u + v)
}

/// `y = relu(a + b)`; the gradient of both operands is `dL/dy` where `y > 0` (from the
/// output, as [`PointwiseGrad`] computes it for ReLU).
struct AddReluOp;

impl CustomOp2 for AddReluOp {
    fn name(&self) -> &'static str {
        "dlc-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            bail!("add: operands {:?} and {:?} differ", l1.dims(), l2.dims());
        }
        let out = match s1.dtype() {
            DType::F32 => {
                f32::to_cpu_storage_owned(map2(elements(s1, l1)?, elements(s2, l2)?, add_then_relu))
            }
            DType::F64 => {
                f64::to_cpu_storage_owned(map2(elements(s1, l1)?, elements(s2, l2)?, add_then_relu))
            }
            other => bail!("add: only f32 and f64 are supported, got {other:?}"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = res.apply_op2_no_bwd(&grad.contiguous()?, &PointwiseGrad(Pointwise::Relu))?;
        Ok((Some(g.clone()), Some(g)))
    }
}

/// Softmax along `axis` (candle's `softmax_last_dim` has no backward; this form does).
pub fn softmax(x: &Tensor, axis: usize) -> Result<Tensor> {
    candle_nn::ops::softmax(x, axis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::gradcheck::{check_grads, max_abs_diff, random};

    #[test]
    fn gradients_match_finite_differences() {
        // Scale so that values straddle the kinks of relu6 / hardswish without sitting on them.
        let x = (random(&[3, 7], 1) * 8.0).unwrap();
        for a in [
            Activation::Relu,
            Activation::Relu6,
            Activation::Sigmoid,
            Activation::Tanh,
            Activation::Gelu,
            Activation::Silu,
            Activation::Hardswish,
        ] {
            check_grads(|t| activate(&t[0], a), std::slice::from_ref(&x), 1e-6);
        }
        check_grads(|t| softmax(&t[0], 1), &[random(&[2, 5, 3], 2)], 1e-6);
        check_grads(|t| softmax(&t[0], 2), &[random(&[2, 5, 3], 2)], 1e-6);
    }

    /// The output and input gradient of `f` for the loss `sum(f(x) · r)`.
    fn value_and_grad(f: impl Fn(&Tensor) -> Result<Tensor>, x: &Tensor) -> (Tensor, Tensor) {
        let v = candle_core::Var::from_tensor(x).unwrap();
        let y = f(v.as_tensor()).unwrap();
        let r = random(y.dims(), 5).to_dtype(y.dtype()).unwrap();
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        (y, g.get(v.as_tensor()).unwrap().clone())
    }

    #[test]
    fn fused_activations_match_the_composed_ones() {
        // Large enough for several parallel chunks, and a non-contiguous view.
        let x = (random(&[3, 5, 67, 71], 3) * 8.0).unwrap();
        for p in [Pointwise::Relu, Pointwise::Relu6, Pointwise::Sigmoid] {
            let a = match p {
                Pointwise::Relu => Activation::Relu,
                Pointwise::Relu6 => Activation::Relu6,
                Pointwise::Sigmoid => Activation::Sigmoid,
            };
            for dtype in [DType::F64, DType::F32] {
                let x = x.to_dtype(dtype).unwrap();
                for x in [x.clone(), x.transpose(2, 3).unwrap()] {
                    let (y1, g1) = value_and_grad(|t| activate(t, a), &x);
                    let (y2, g2) = value_and_grad(|t| p.composed(t), &x);
                    assert_eq!(y1.dtype(), dtype);
                    assert!(max_abs_diff(&y1, &y2) < 1e-6, "{p:?} {dtype:?} forward");
                    assert!(max_abs_diff(&g1, &g2) < 1e-6, "{p:?} {dtype:?} backward");
                }
            }
        }
    }

    #[test]
    fn add_relu_matches_the_composed_ops() {
        let xs: Vec<Tensor> = (0..3).map(|k| random(&[3, 5, 67, 71], 10 + k)).collect();
        for dtype in [DType::F64, DType::F32] {
            let xs: Vec<Tensor> = xs.iter().map(|x| x.to_dtype(dtype).unwrap()).collect();
            for n in 1..=3 {
                let run = |fused: bool| {
                    let vars: Vec<candle_core::Var> = xs[..n]
                        .iter()
                        .map(|x| candle_core::Var::from_tensor(x).unwrap())
                        .collect();
                    let ts: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
                    let y = if fused {
                        add_relu(&ts).unwrap()
                    } else {
                        let mut acc = ts[0].clone();
                        for t in &ts[1..] {
                            acc = (acc + *t).unwrap();
                        }
                        acc.relu().unwrap()
                    };
                    let r = random(y.dims(), 5).to_dtype(dtype).unwrap();
                    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let grads: Vec<Tensor> = ts.iter().map(|t| g.get(t).unwrap().clone()).collect();
                    (y, grads)
                };
                let (y1, g1) = run(true);
                let (y2, g2) = run(false);
                assert_eq!(y1.dtype(), dtype);
                assert_eq!(max_abs_diff(&y1, &y2), 0.0, "{n} operands {dtype:?}");
                for (a, b) in g1.iter().zip(&g2) {
                    assert_eq!(max_abs_diff(a, b), 0.0, "{n} operands {dtype:?}");
                }
            }
        }
    }

    #[test]
    fn add_relu_gradients_match_finite_differences() {
        let (a, b) = (random(&[2, 3, 4, 5], 20), random(&[2, 3, 4, 5], 21));
        check_grads(|t| add_relu(&[&t[0], &t[1]]), &[a, b], 1e-6);
    }

    #[test]
    fn kinks_and_nan_follow_pytorch() {
        let x = Tensor::new(
            &[-1.0f64, 0.0, 3.0, 6.0, 7.0, f64::NAN],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let v = candle_core::Var::from_tensor(&x).unwrap();
        let run = |a: Activation| {
            let y = activate(v.as_tensor(), a).unwrap();
            let g = y.sum_all().unwrap().backward().unwrap();
            let y: Vec<f64> = y.to_vec1().unwrap();
            let g: Vec<f64> = g.get(v.as_tensor()).unwrap().to_vec1().unwrap();
            (y, g)
        };
        let (y, g) = run(Activation::Relu);
        assert_eq!(&y[..5], [0.0, 0.0, 3.0, 6.0, 7.0]);
        assert!(y[5].is_nan());
        assert_eq!(&g[..5], [0.0, 0.0, 1.0, 1.0, 1.0]);
        let (y, g) = run(Activation::Relu6);
        assert_eq!(&y[..5], [0.0, 0.0, 3.0, 6.0, 6.0]);
        assert!(y[5].is_nan());
        assert_eq!(&g[..5], [0.0, 0.0, 1.0, 0.0, 0.0]);
    }
}

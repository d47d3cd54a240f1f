//! Finite-difference gradient checks for the lowered ops (tests only).
//!
//! [`check_grads`] compares candle's autograd against central differences of the same scalar
//! loss `sum(f(inputs) * r)`, where `r` is a fixed pseudo-random tensor: a random projection of
//! the output, so that every output element (and so every path of the backward pass) matters with
//! a different weight. Everything here is deterministic: the random numbers come from a seeded
//! LCG, not a global RNG.

use candle_core::{Device, Result, Shape, Tensor, Var};

/// Step of the central differences. With f64 and losses of order one the truncation error is
/// about `eps²` and the rounding error about `1e-16 / eps`, both far below the tolerances used.
const EPS: f64 = 1e-6;

/// A small deterministic pseudo-random generator (Knuth's MMIX LCG).
#[derive(Clone, Debug)]
pub(crate) struct Lcg(u64);

impl Lcg {
    /// A generator for one seed; different seeds give unrelated streams.
    pub(crate) fn new(seed: u64) -> Self {
        let mut g = Lcg(seed ^ 0x9e37_79b9_7f4a_7c15);
        g.next_u64();
        g
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0
    }

    /// Uniform in `[0, 1)`, from the 53 high bits.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// An f64 CPU tensor of the given dims with elements uniform in `[-1, 1)`, the same for the same
/// seed.
pub(crate) fn random(dims: &[usize], seed: u64) -> Tensor {
    let shape = Shape::from_dims(dims);
    let mut g = Lcg::new(seed);
    let data: Vec<f64> = (0..shape.elem_count())
        .map(|_| 2.0 * g.next_f64() - 1.0)
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).expect("random")
}

/// The largest absolute elementwise difference of two tensors of the same dims (any float
/// dtype, compared in f64).
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "compared tensors differ in shape");
    let d = (a.to_dtype(candle_core::DType::F64).expect("f64")
        - b.to_dtype(candle_core::DType::F64).expect("f64"))
    .expect("difference");
    d.abs()
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar())
        .expect("maximum")
}

/// An f64 CPU tensor whose elements are a random permutation of evenly spaced values in
/// `[-1, 1]`: no two are closer than `2 / len`, so max/argmax-like ops have no ties (and no near
/// ties) that would make finite differences ambiguous.
pub(crate) fn random_distinct(dims: &[usize], seed: u64) -> Tensor {
    let shape = Shape::from_dims(dims);
    let n = shape.elem_count();
    let mut data: Vec<f64> = (0..n)
        .map(|i| {
            if n > 1 {
                -1.0 + 2.0 * i as f64 / (n - 1) as f64
            } else {
                0.0
            }
        })
        .collect();
    let mut g = Lcg::new(seed);
    for i in (1..n).rev() {
        let j = (g.next_u64() % (i as u64 + 1)) as usize;
        data.swap(i, j);
    }
    Tensor::from_vec(data, shape, &Device::Cpu).expect("random_distinct")
}

/// The loss `sum(f(inputs) * r)` as a number.
fn loss(f: &impl Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor], r: &Tensor) -> Result<Tensor> {
    f(inputs)?.mul(r)?.sum_all()
}

/// Checks candle's gradients of `f` at `inputs` (f64 CPU tensors) against central finite
/// differences, element by element.
///
/// The scalar loss is `sum(f(inputs) * r)` with `r` a fixed random tensor shaped like the
/// output. An analytic derivative `a` and a numeric one `n` agree when
/// `|a - n| <= tol * max(1, |a|, |n|)` (absolute for small values, relative for large ones).
/// An input that gets no gradient from `backward` counts as having a zero gradient.
///
/// Panics on the first mismatch, naming the input, the element (flat, row-major) and both
/// values; also panics if `f` fails.
pub(crate) fn check_grads(f: impl Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor], tol: f64) {
    for (i, x) in inputs.iter().enumerate() {
        assert_eq!(x.dtype(), candle_core::DType::F64, "input {i} must be f64");
    }
    let vars: Vec<Var> = inputs
        .iter()
        .map(|x| Var::from_tensor(x).expect("var"))
        .collect();
    let var_tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&var_tensors).expect("forward");
    let r = random(out.dims(), 0x5eed);
    let grads = loss(&f, &var_tensors, &r)
        .and_then(|l| l.backward())
        .expect("backward");

    for (i, (x, var)) in inputs.iter().zip(&vars).enumerate() {
        let analytic: Vec<f64> = match grads.get(var.as_tensor()) {
            Some(g) => {
                assert_eq!(
                    g.dims(),
                    x.dims(),
                    "gradient of input {i} has the wrong shape"
                );
                g.flatten_all().and_then(|g| g.to_vec1()).expect("grad")
            }
            None => vec![0.0; x.elem_count()],
        };
        let data: Vec<f64> = x.flatten_all().and_then(|x| x.to_vec1()).expect("input");
        for (j, &a) in analytic.iter().enumerate() {
            let at = |delta: f64| -> f64 {
                let mut d = data.clone();
                d[j] += delta;
                let mut xs = inputs.to_vec();
                xs[i] = Tensor::from_vec(d, x.shape().clone(), x.device()).expect("perturb");
                loss(&f, &xs, &r)
                    .and_then(|l| l.to_scalar::<f64>())
                    .expect("perturbed forward")
            };
            let n = (at(EPS) - at(-EPS)) / (2.0 * EPS);
            let scale = 1f64.max(a.abs()).max(n.abs());
            assert!(
                (a - n).abs() <= tol * scale,
                "gradient mismatch: input {i}, element {j}: analytic {a}, numeric {n}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_tensors_are_deterministic_and_distinct() {
        let a = random(&[3, 4], 7).to_vec2::<f64>().unwrap();
        let b = random(&[3, 4], 7).to_vec2::<f64>().unwrap();
        assert_eq!(a, b);
        assert!(a.iter().flatten().all(|v| (-1.0..1.0).contains(v)));
        assert_ne!(a, random(&[3, 4], 8).to_vec2::<f64>().unwrap());

        let mut d = random_distinct(&[50], 3).to_vec1::<f64>().unwrap();
        d.sort_by(f64::total_cmp);
        assert!(d.windows(2).all(|w| w[1] - w[0] > 2.0 / 50.0));
    }

    #[test]
    fn passes_for_correct_gradients() {
        let x = random(&[2, 3], 1);
        let y = random(&[3, 2], 2);
        check_grads(|t| t[0].matmul(&t[1])?.tanh(), &[x, y], 1e-6);
    }

    #[test]
    #[should_panic(expected = "gradient mismatch")]
    fn catches_wrong_gradients() {
        // `detach` hides the second factor from autograd: d(x·x)/dx looks like x, not 2x.
        let x = random(&[5], 3);
        check_grads(|t| t[0].mul(&t[0].detach()), &[x], 1e-6);
    }
}

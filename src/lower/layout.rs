//! Layout ops on candle tensors: select, slice, transpose, permute, broadcast, mul.
//!
//! All are views or elementwise products whose gradients candle's autograd gets right (checked
//! by finite differences below); results are made contiguous so later kernels see plain rows.

use candle_core::{Result, Tensor};

/// Resolves a possibly negative index into an axis of `size`.
fn index(i: i64, size: usize) -> usize {
    if i < 0 {
        (i + size as i64).max(0) as usize
    } else {
        i as usize
    }
}

/// `x[..., index, ...]` along `axis`, the axis dropped.
pub fn select(x: &Tensor, axis: usize, at: i64) -> Result<Tensor> {
    let at = index(at, x.dim(axis)?);
    x.narrow(axis, at, 1)?.squeeze(axis)?.contiguous()
}

/// `x[..., start..end, ...]` along `axis` (`end` absent: to the end).
pub fn slice(x: &Tensor, axis: usize, start: i64, end: Option<i64>) -> Result<Tensor> {
    let size = x.dim(axis)?;
    let start = index(start, size);
    let end = end.map_or(size, |e| index(e, size));
    x.narrow(axis, start, end.saturating_sub(start))?
        .contiguous()
}

/// Swaps axes `a` and `b`.
pub fn transpose(x: &Tensor, a: usize, b: usize) -> Result<Tensor> {
    x.transpose(a, b)?.contiguous()
}

/// Reorders the axes: output axis `i` is input axis `dims[i]`.
pub fn permute(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    x.permute(dims)?.contiguous()
}

/// Inserts `axis` and repeats `x` along it to the size of that axis in `like`.
pub fn broadcast(x: &Tensor, like: &Tensor, axis: usize) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    dims.insert(axis, like.dim(axis)?);
    x.unsqueeze(axis)?.broadcast_as(dims)?.contiguous()
}

/// Elementwise product of all `xs`, broadcasting axes of size 1.
pub fn mul(xs: &[&Tensor]) -> Result<Tensor> {
    let mut acc = xs[0].clone();
    for x in &xs[1..] {
        acc = acc.broadcast_mul(x)?;
    }
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lower::gradcheck::{check_grads, random};

    #[test]
    fn layout_gradients_match_finite_differences() {
        let x = [random(&[2, 3, 4, 5], 1)];
        check_grads(|t| select(&t[0], 2, -1), &x, 1e-8);
        check_grads(|t| slice(&t[0], 3, 1, Some(-1)), &x, 1e-8);
        check_grads(|t| transpose(&t[0], 1, 3), &x, 1e-8);
        check_grads(|t| permute(&t[0], &[0, 2, 3, 1]), &x, 1e-8);
        let like = random(&[2, 7, 3], 2);
        check_grads(|t| broadcast(&t[0], &like, 1), &[random(&[2, 3], 3)], 1e-8);
        check_grads(
            |t| mul(&[&t[0], &t[1]]),
            &[random(&[2, 3, 4], 4), random(&[2, 3, 1], 5)],
            1e-8,
        );
    }

    #[test]
    fn select_and_slice_pick_the_right_elements() {
        let x = Tensor::arange(0f64, 24.0, &candle_core::Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let last = select(&x, 1, -1).unwrap();
        assert_eq!(
            last.to_vec2::<f64>().unwrap(),
            vec![vec![8.0, 9.0, 10.0, 11.0], vec![20.0, 21.0, 22.0, 23.0]]
        );
        let mid = slice(&x, 2, 1, Some(3)).unwrap();
        assert_eq!(
            mid.to_vec3::<f64>().unwrap()[1],
            vec![vec![13.0, 14.0], vec![17.0, 18.0], vec![21.0, 22.0]]
        );
    }
}

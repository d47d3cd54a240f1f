//! Batches of `f32` images for training and evaluation.
//!
//! A [`Transform`] says what the network wants: pixels scaled to [0, 1] (like torchvision's
//! `ToTensor`), then optionally a bilinear resize (PyTorch's
//! `F.interpolate(mode='bilinear', align_corners=False)`, which is what torchvision's
//! `Resize` does when upsampling), replication of the grey channel to `channels` channels,
//! and per-channel normalisation `(x - mean) / std`. [`Batches`] yields the batches in a
//! seeded shuffled or in file order, built ahead on background threads.

use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::{CODE, Dataset};
use crate::diagnostics::Diag;

/// Most worker threads [`Batches::new`] starts: each holds up to two batches (one built, one
/// waiting), which at 3×224×224 and 128 images is 77 MB apiece.
const MAX_WORKERS: usize = 4;

/// What to turn each grey `u8` image into.
#[derive(Clone, Debug, PartialEq)]
pub struct Transform {
    /// Output channels: the grey channel is replicated (1 keeps it as is).
    pub channels: usize,
    /// Output `(height, width)`; `None` keeps the dataset's size.
    pub size: Option<(usize, usize)>,
    /// Per-channel means subtracted after scaling to [0, 1]: empty for none, one value for
    /// every channel, or one per channel.
    pub mean: Vec<f32>,
    /// Per-channel standard deviations divided by (same lengths as `mean`).
    pub std: Vec<f32>,
}

impl Default for Transform {
    fn default() -> Self {
        Transform::new()
    }
}

impl Transform {
    /// Scaling to [0, 1] only: one channel, the dataset's size, no normalisation.
    pub fn new() -> Transform {
        Transform {
            channels: 1,
            size: None,
            mean: Vec::new(),
            std: Vec::new(),
        }
    }

    /// The transform producing a network input of shape `[channels, height, width]`.
    pub fn to_shape(channels: usize, height: usize, width: usize) -> Transform {
        Transform::new().channels(channels).resize(height, width)
    }

    /// Resizes (bilinear, `align_corners=False`) to `height × width`.
    pub fn resize(mut self, height: usize, width: usize) -> Transform {
        self.size = Some((height, width));
        self
    }

    /// Replicates the grey channel to `channels` channels.
    pub fn channels(mut self, channels: usize) -> Transform {
        self.channels = channels;
        self
    }

    /// Normalises each channel: `(x - mean[c]) / std[c]` (one value applies to all channels).
    pub fn normalize(mut self, mean: &[f32], std: &[f32]) -> Transform {
        self.mean = mean.to_vec();
        self.std = std.to_vec();
        self
    }

    /// The output shape `(channels, height, width)` for images of `rows × cols`.
    pub fn output_shape(&self, rows: usize, cols: usize) -> (usize, usize, usize) {
        let (h, w) = self.size.unwrap_or((rows, cols));
        (self.channels, h, w)
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), Diag> {
        let bad = |msg: String| Err(Diag::new(CODE, msg));
        if self.channels == 0 {
            return bad("a transform needs at least one output channel".into());
        }
        if let Some((h, w)) = self.size
            && (h == 0 || w == 0)
        {
            return bad(format!(
                "cannot resize images to {h}×{w}: both sides must be at least 1"
            ));
        }
        if self.mean.len() != self.std.len() {
            return bad(format!(
                "normalisation has {} means but {} standard deviations",
                self.mean.len(),
                self.std.len()
            ));
        }
        if !self.mean.is_empty() && self.mean.len() != 1 && self.mean.len() != self.channels {
            return bad(format!(
                "normalisation has {} values per statistic but the output has {} channels",
                self.mean.len(),
                self.channels
            ))
            .map_err(|d: Diag| d.help("give one value for all channels, or one per channel"));
        }
        if let Some(s) = self.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return bad(format!(
                "normalisation standard deviation {s} must be positive and finite"
            ));
        }
        if let Some(m) = self.mean.iter().find(|m| !m.is_finite()) {
            return bad(format!("normalisation mean {m} must be finite"));
        }
        Ok(())
    }
}

/// One batch: `images` in `N×C×H×W` layout (`shape`), `labels` and the examples' indices in
/// the dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `N * C * H * W` values.
    pub images: Vec<f32>,
    /// `N` labels.
    pub labels: Vec<u32>,
    /// `[N, C, H, W]`.
    pub shape: [usize; 4],
    /// Which examples of the dataset these are.
    pub indices: Vec<usize>,
}

impl Batch {
    /// The images and labels.
    pub fn into_parts(self) -> (Vec<f32>, Vec<u32>) {
        (self.images, self.labels)
    }
}

/// The order batches visit the examples in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// File order (for evaluation).
    Sequential,
    /// A permutation determined by the seed and the epoch (see [`shuffled_order`]).
    Shuffled {
        /// The run's seed.
        seed: u64,
        /// The epoch: each epoch gets a different permutation.
        epoch: u64,
    },
}

/// The permutation of `0..n` used for `seed` and `epoch`: a Fisher–Yates shuffle driven by
/// SplitMix64, so the order is the same on every platform and with every version of any
/// random-number crate.
pub fn shuffled_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = SplitMix64(seed);
    let mixed = rng.next() ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut rng = SplitMix64(mixed);
    rng.next();
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (Lemire's method with rejection: no modulo bias).
    fn below(&mut self, bound: u64) -> u64 {
        loop {
            let m = (self.next() as u128) * (bound as u128);
            let low = m as u64;
            if low >= bound.wrapping_neg() % bound {
                return (m >> 64) as u64;
            }
        }
    }
}

/// The work for one output pixel axis: source indices and the weight of the second.
#[derive(Clone, Debug)]
struct Axis {
    i0: Vec<usize>,
    i1: Vec<usize>,
    w1: Vec<f32>,
}

impl Axis {
    /// PyTorch's `align_corners=False` source coordinates: `(dst + 0.5) * in / out - 0.5`,
    /// clamped below at 0; the right neighbour is clamped to the last pixel.
    fn new(input: usize, output: usize) -> Axis {
        let scale = input as f64 / output as f64;
        let mut axis = Axis {
            i0: Vec::with_capacity(output),
            i1: Vec::with_capacity(output),
            w1: Vec::with_capacity(output),
        };
        for d in 0..output {
            let src = ((d as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(input - 1);
            let i1 = (i0 + 1).min(input - 1);
            axis.i0.push(i0);
            axis.i1.push(i1);
            axis.w1.push((src - i0 as f64) as f32);
        }
        axis
    }
}

/// Per-thread working memory for [`Plan::apply`].
struct Scratch {
    /// The source image as floats (`rows × cols`).
    grey: Vec<f32>,
    /// The source rows resized horizontally (`rows × width`).
    rows: Vec<f32>,
    /// The first output channel, kept while the others are written (`height × width`).
    plane: Vec<f32>,
}

/// A validated transform for one image size, with its resize tables.
#[derive(Clone, Debug)]
struct Plan {
    rows: usize,
    cols: usize,
    channels: usize,
    height: usize,
    width: usize,
    /// `None` when the size is unchanged.
    axes: Option<(Axis, Axis)>,
    /// Per output channel; empty for no normalisation.
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl Plan {
    fn new(t: &Transform, rows: usize, cols: usize) -> Result<Plan, Diag> {
        t.validate()?;
        let (channels, height, width) = t.output_shape(rows, cols);
        let axes = ((height, width) != (rows, cols))
            .then(|| (Axis::new(rows, height), Axis::new(cols, width)));
        let per_channel = |v: &[f32]| match v.len() {
            0 => Vec::new(),
            1 => vec![v[0]; channels],
            _ => v.to_vec(),
        };
        Ok(Plan {
            rows,
            cols,
            channels,
            height,
            width,
            axes,
            mean: per_channel(&t.mean),
            std: per_channel(&t.std),
        })
    }

    fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Scratch space for [`Plan::apply`].
    fn scratch(&self) -> Scratch {
        Scratch {
            grey: vec![0.0; self.rows * self.cols],
            rows: vec![0.0; self.rows * self.width],
            plane: vec![0.0; self.height * self.width],
        }
    }

    /// Writes one image (`rows × cols` bytes) into `out` (`C × H × W` values).
    ///
    /// The resize is separable, as in PyTorch's kernel: each source row is interpolated
    /// horizontally, then each output row vertically between two of those rows, which gives
    /// `wy0 * (wx0 * a + wx1 * b) + wy1 * (wx0 * c + wx1 * d)`.
    fn apply(&self, pixels: &[u8], out: &mut [f32], s: &mut Scratch) {
        let hw = self.height * self.width;
        let first = &mut out[..hw];
        match &self.axes {
            None => {
                for (o, &p) in first.iter_mut().zip(pixels) {
                    *o = p as f32 / 255.0;
                }
            }
            Some((ys, xs)) => {
                for (g, &p) in s.grey.iter_mut().zip(pixels) {
                    *g = p as f32 / 255.0;
                }
                for (src, dst) in s
                    .grey
                    .chunks_exact(self.cols)
                    .zip(s.rows.chunks_exact_mut(self.width))
                {
                    for (x, o) in dst.iter_mut().enumerate() {
                        let wx1 = xs.w1[x];
                        *o = (1.0 - wx1) * src[xs.i0[x]] + wx1 * src[xs.i1[x]];
                    }
                }
                let w = self.width;
                for (y, row) in first.chunks_exact_mut(w).enumerate() {
                    let r0 = &s.rows[ys.i0[y] * w..][..w];
                    let r1 = &s.rows[ys.i1[y] * w..][..w];
                    let wy1 = ys.w1[y];
                    let wy0 = 1.0 - wy1;
                    for ((o, &a), &b) in row.iter_mut().zip(r0).zip(r1) {
                        *o = wy0 * a + wy1 * b;
                    }
                }
            }
        }
        if self.channels == 1 && self.mean.is_empty() {
            return;
        }
        let plane = &mut s.plane;
        plane.copy_from_slice(&out[..hw]);
        for (c, dst) in out.chunks_exact_mut(hw).enumerate() {
            if self.mean.is_empty() {
                dst.copy_from_slice(plane);
            } else {
                let (m, sd) = (self.mean[c], self.std[c]);
                for (o, &v) in dst.iter_mut().zip(plane.iter()) {
                    *o = (v - m) / sd;
                }
            }
        }
    }

    /// Builds a batch, reusing `buffer`'s memory if it is given.
    fn batch(&self, data: &Dataset, indices: Vec<usize>, buffer: Option<Vec<f32>>) -> Batch {
        let n = indices.len();
        let per_image = self.image_len();
        let mut images = match buffer {
            Some(mut b) => {
                b.clear();
                b.resize(n * per_image, 0.0);
                b
            }
            None => vec![0.0; n * per_image],
        };
        let mut scratch = self.scratch();
        for (&i, dst) in indices.iter().zip(images.chunks_exact_mut(per_image)) {
            self.apply(data.image(i), dst, &mut scratch);
        }
        Batch {
            images,
            labels: indices.iter().map(|&i| data.label(i) as u32).collect(),
            shape: [n, self.channels, self.height, self.width],
            indices,
        }
    }
}

/// Builds one batch of the examples at `indices`, on the calling thread.
pub fn make_batch(data: &Dataset, indices: &[usize], transform: &Transform) -> Result<Batch, Diag> {
    let plan = Plan::new(transform, data.rows(), data.cols())?;
    if let Some(&bad) = indices.iter().find(|&&i| i >= data.len()) {
        return Err(Diag::new(
            CODE,
            format!(
                "example {bad} requested from a dataset of {} examples",
                data.len()
            ),
        ));
    }
    Ok(plan.batch(data, indices.to_vec(), None))
}

/// An iterator over the batches of one pass through a dataset.
///
/// Worker threads build the batches ahead while the caller works on the current one: with
/// `k` workers, worker `w` builds batches `w`, `w + k`, … and the iterator takes them in
/// turn, so the order does not depend on the number of threads. Every example appears
/// exactly once; the last batch may be smaller. Dropping the iterator early stops the
/// workers.
pub struct Batches {
    pool: Arc<Mutex<Vec<Vec<f32>>>>,
    rx: Vec<Receiver<Batch>>,
    workers: Vec<JoinHandle<()>>,
    next: usize,
    remaining: usize,
    shape: (usize, usize, usize),
}

impl Batches {
    /// Batches of `batch_size` examples of `data` in `order`, each image transformed by
    /// `transform`, built by one worker thread per core (at most four).
    pub fn new(
        data: &Dataset,
        batch_size: usize,
        order: Order,
        transform: &Transform,
    ) -> Result<Batches, Diag> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_threads(data, batch_size, order, transform, cores.min(MAX_WORKERS))
    }

    /// As [`Batches::new`], with `threads` worker threads (at least one).
    pub fn with_threads(
        data: &Dataset,
        batch_size: usize,
        order: Order,
        transform: &Transform,
        threads: usize,
    ) -> Result<Batches, Diag> {
        if batch_size == 0 {
            return Err(Diag::new(CODE, "the batch size must be at least 1"));
        }
        let plan = Arc::new(Plan::new(transform, data.rows(), data.cols())?);
        let order: Arc<[usize]> = match order {
            Order::Sequential => (0..data.len()).collect(),
            Order::Shuffled { seed, epoch } => shuffled_order(data.len(), seed, epoch).into(),
        };
        let total = data.len().div_ceil(batch_size);
        let threads = threads.clamp(1, total.max(1));
        let shape = (plan.channels, plan.height, plan.width);
        let pool = Arc::new(Mutex::new(Vec::new()));
        let mut batches = Batches {
            pool: pool.clone(),
            rx: Vec::with_capacity(threads),
            workers: Vec::with_capacity(threads),
            next: 0,
            remaining: total,
            shape,
        };
        for w in 0..threads {
            let (tx, rx) = sync_channel(1);
            let (plan, order, data, pool) =
                (plan.clone(), order.clone(), data.clone(), pool.clone());
            let worker = std::thread::Builder::new()
                .name(format!("dlc-batches-{w}"))
                .spawn(move || {
                    for chunk in order.chunks(batch_size).skip(w).step_by(threads) {
                        let buffer = pool.lock().ok().and_then(|mut p| p.pop());
                        if tx.send(plan.batch(&data, chunk.to_vec(), buffer)).is_err() {
                            return; // the iterator was dropped
                        }
                    }
                })
                .map_err(|e| Diag::new(CODE, format!("cannot start a batching thread: {e}")))?;
            batches.rx.push(rx);
            batches.workers.push(worker);
        }
        Ok(batches)
    }

    /// The shape `(C, H, W)` of each image in the batches.
    pub fn image_shape(&self) -> (usize, usize, usize) {
        self.shape
    }

    /// Hands a batch's image buffer back for the workers to fill again (optional).
    ///
    /// A fresh buffer costs a page fault per 4 KiB on first write, which for large images
    /// (3×224×224, 128 per batch: 77 MB) takes longer than the resize itself; a caller that
    /// copies the images out (e.g. to a GPU) can return the buffer here instead of dropping it.
    pub fn recycle(&self, images: Vec<f32>) {
        if let Ok(mut pool) = self.pool.lock()
            && pool.len() < self.workers.len() + 1
        {
            pool.push(images);
        }
    }
}

impl Iterator for Batches {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.remaining == 0 {
            return None;
        }
        let k = self.next % self.rx.len();
        match self.rx[k].recv() {
            Ok(batch) => {
                self.remaining -= 1;
                self.next += 1;
                Some(batch)
            }
            Err(_) => {
                // A worker stopped early: only a panic does that; pass it on.
                self.remaining = 0;
                self.rx.clear();
                for w in self.workers.drain(..) {
                    if let Err(panic) = w.join() {
                        std::panic::resume_unwind(panic);
                    }
                }
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Batches {}

impl std::fmt::Debug for Batches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batches")
            .field("remaining", &self.remaining)
            .field("threads", &self.workers.len())
            .field("image_shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        self.rx.clear(); // unblocks the workers
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
pub(super) mod testing {
    //! Access to the resize for tests.
    use super::*;

    /// Applies `t` to one image of `rows × cols`.
    pub fn transform_image(t: &Transform, pixels: &[u8], rows: usize, cols: usize) -> Vec<f32> {
        let plan = Plan::new(t, rows, cols).expect("valid transform");
        let mut out = vec![0.0; plan.image_len()];
        plan.apply(pixels, &mut out, &mut plan.scratch());
        out
    }
}

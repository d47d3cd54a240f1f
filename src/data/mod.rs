//! Training data: Fashion-MNIST from IDX files, and batches ready for a network.
//!
//! [`fashion_mnist`] loads the train and test sets — from a directory the caller names, else
//! the full set of the Debian package `dataset-fashion-mnist`
//! (`/usr/share/datasets/fashion-mnist/`), else the small stratified subset shipped in this
//! repository (`data/fashion-mnist-subset/`) — and says which in a [`Source`].
//! A [`Dataset`] holds grey `u8` images and `u8` labels; [`Batches`] turns it into
//! `N×C×H×W` `f32` batches (scaled to [0, 1], optionally resized, replicated to more
//! channels and normalised, see [`Transform`]) in a seeded shuffled or in file order,
//! built on background threads while the caller trains on the previous batch.
//!
//! This module knows nothing of tensors: it produces plain vectors. Every failure is a
//! `dlc::data` [`Diag`].

mod batch;
pub mod idx;
pub mod text;
pub mod translation;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use batch::{Batch, Batches, Order, Transform, make_batch, shuffled_order};
pub use idx::CODE;

use crate::diagnostics::{Diag, thousands};

/// Fashion-MNIST's ten classes, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Where the Debian package `dataset-fashion-mnist` installs the full set.
pub const SYSTEM_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The shipped subset, relative to the repository root.
pub const SUBSET_DIR: &str = "data/fashion-mnist-subset";

/// The standard file names (without `.gz`): train images, train labels, test images, test labels.
pub const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// A labelled set of grey images, all of the same size.
///
/// Cloning is cheap: the pixels and labels are shared.
#[derive(Clone, Debug)]
pub struct Dataset {
    images: Arc<[u8]>,
    labels: Arc<[u8]>,
    count: usize,
    rows: usize,
    cols: usize,
    classes: Vec<String>,
}

impl Dataset {
    /// A dataset of `labels.len()` images of `rows × cols` pixels (`images` holds them one
    /// after another, row-major). Fails if the sizes disagree or a label is not below
    /// `classes.len()`.
    pub fn new(
        images: Vec<u8>,
        labels: Vec<u8>,
        rows: usize,
        cols: usize,
        classes: Vec<String>,
    ) -> Result<Dataset, Diag> {
        Self::build(images, labels, rows, cols, classes, None)
    }

    /// Loads a dataset from an IDX image file and an IDX label file (raw or `.gz`).
    pub fn load(images: &Path, labels: &Path, classes: Vec<String>) -> Result<Dataset, Diag> {
        let img = idx::read_images(images)?;
        let lab = idx::read_labels(labels)?;
        if img.count != lab.len() {
            return Err(Diag::new(
                CODE,
                format!(
                    "`{}` holds {} images but `{}` holds {} labels",
                    images.display(),
                    thousands(img.count as u64),
                    labels.display(),
                    thousands(lab.len() as u64)
                ),
            )
            .help("the two files must come from the same set (both `train-…` or both `t10k-…`)"));
        }
        Self::build(
            img.pixels,
            lab,
            img.rows,
            img.cols,
            classes,
            Some((images, labels)),
        )
    }

    fn build(
        images: Vec<u8>,
        labels: Vec<u8>,
        rows: usize,
        cols: usize,
        classes: Vec<String>,
        files: Option<(&Path, &Path)>,
    ) -> Result<Dataset, Diag> {
        let count = labels.len();
        let (img_name, lab_name) = match files {
            Some((i, l)) => (format!("`{}`", i.display()), format!("`{}`", l.display())),
            None => ("the images".to_string(), "the labels".to_string()),
        };
        if rows == 0 || cols == 0 || count.checked_mul(rows * cols) != Some(images.len()) {
            return Err(Diag::new(
                CODE,
                format!(
                    "{img_name}: {} bytes of pixels, expected {} labels × {rows}×{cols} pixels = {}",
                    thousands(images.len() as u64),
                    thousands(count as u64),
                    count
                        .checked_mul(rows * cols)
                        .map_or("too many".to_string(), |n| thousands(n as u64))
                ),
            )
            .help("there must be one label per image"));
        }
        if classes.is_empty() || classes.len() > 256 {
            return Err(Diag::new(
                CODE,
                format!(
                    "a dataset needs between 1 and 256 classes, got {}",
                    classes.len()
                ),
            ));
        }
        if let Some((at, &label)) = labels
            .iter()
            .enumerate()
            .find(|&(_, &l)| l as usize >= classes.len())
        {
            return Err(Diag::new(
                CODE,
                format!(
                    "{lab_name}: label {label} of example {at} is out of range: there are {} \
                     classes (labels 0 to {})",
                    classes.len(),
                    classes.len() - 1
                ),
            )
            .help("the label file is corrupt or belongs to another dataset"));
        }
        Ok(Dataset {
            images: images.into(),
            labels: labels.into(),
            count,
            rows,
            cols,
            classes,
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Image height.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Image width.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Class names, in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// All pixels, image after image, each row-major.
    pub fn images(&self) -> &[u8] {
        &self.images
    }

    /// All labels.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// The pixels of example `i` (`rows × cols`, row-major). Panics if `i >= len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.images[i * n..(i + 1) * n]
    }

    /// The label of example `i`. Panics if `i >= len()`.
    pub fn label(&self, i: usize) -> u8 {
        self.labels[i]
    }

    /// How many examples each class has.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for &l in self.labels.iter() {
            counts[l as usize] += 1;
        }
        counts
    }

    /// The indices of the first `per_class` examples of each class, in file order (a
    /// deterministic stratified subset; classes with fewer examples give all they have).
    pub fn first_per_class(&self, per_class: usize) -> Vec<usize> {
        let mut taken = vec![0; self.classes.len()];
        let mut out = Vec::with_capacity(per_class * self.classes.len());
        for (i, &l) in self.labels.iter().enumerate() {
            if taken[l as usize] < per_class {
                taken[l as usize] += 1;
                out.push(i);
            }
        }
        out
    }

    /// A new dataset of the examples at `indices`, in that order. Panics if an index is out
    /// of range.
    pub fn select(&self, indices: &[usize]) -> Dataset {
        let n = self.rows * self.cols;
        let mut images = Vec::with_capacity(indices.len() * n);
        for &i in indices {
            images.extend_from_slice(self.image(i));
        }
        Dataset {
            images: images.into(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            count: indices.len(),
            rows: self.rows,
            cols: self.cols,
            classes: self.classes.clone(),
        }
    }

    /// Writes the dataset as two IDX files (gzip-compressed if a name ends in `.gz`).
    pub fn save(&self, images: &Path, labels: &Path) -> Result<(), Diag> {
        idx::write_images(images, &self.images, self.count, self.rows, self.cols)?;
        idx::write_labels(labels, &self.labels)
    }

    /// Batches in a seeded shuffled order (see [`Batches::new`]).
    pub fn shuffled(
        &self,
        batch_size: usize,
        seed: u64,
        epoch: u64,
        transform: &Transform,
    ) -> Result<Batches, Diag> {
        Batches::new(self, batch_size, Order::Shuffled { seed, epoch }, transform)
    }

    /// Batches in file order, e.g. for evaluating on the test set (see [`Batches::new`]).
    pub fn in_order(&self, batch_size: usize, transform: &Transform) -> Result<Batches, Diag> {
        Batches::new(self, batch_size, Order::Sequential, transform)
    }
}

/// Where [`fashion_mnist`] found its files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A directory the caller named.
    Dir(PathBuf),
    /// The full set installed by the Debian package `dataset-fashion-mnist`.
    System(PathBuf),
    /// The small stratified subset shipped in the repository (500 training and 100 test
    /// images per class).
    Subset(PathBuf),
}

impl Source {
    /// The directory the files were read from.
    pub fn path(&self) -> &Path {
        match self {
            Source::Dir(p) | Source::System(p) | Source::Subset(p) => p,
        }
    }

    /// Whether this is the shipped subset rather than a full set.
    pub fn is_subset(&self) -> bool {
        matches!(self, Source::Subset(_))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Dir(p) => write!(f, "Fashion-MNIST from {}", p.display()),
            Source::System(p) => write!(
                f,
                "full Fashion-MNIST set (package dataset-fashion-mnist) from {}",
                p.display()
            ),
            Source::Subset(p) => write!(
                f,
                "shipped Fashion-MNIST subset (500 train + 100 test images per class) from {}; \
                 install the Debian package dataset-fashion-mnist for the full set",
                p.display()
            ),
        }
    }
}

/// Loads Fashion-MNIST: `(train, test, source)`.
///
/// With `Some(dir)`, reads the four standard files from `dir` (each as `NAME.gz` or raw
/// `NAME`, see [`FILES`]). With `None`, uses the full set in [`SYSTEM_DIR`] if all four files
/// are there, else the subset shipped in [`SUBSET_DIR`] (looked up under the crate's
/// source directory, then under the current directory). A set that is found but corrupt is
/// an error, never silently replaced by another. The two sets are read in parallel.
pub fn fashion_mnist(dir: Option<&Path>) -> Result<(Dataset, Dataset, Source), Diag> {
    let source = match dir {
        Some(d) => {
            if !d.is_dir() {
                return Err(Diag::new(
                    CODE,
                    format!("data directory `{}` does not exist", d.display()),
                )
                .help(format!(
                    "it should hold {}; install the Debian package dataset-fashion-mnist for \
                     the full set in {SYSTEM_DIR}",
                    file_list()
                )));
            }
            Source::Dir(d.to_path_buf())
        }
        None => default_source()?,
    };
    let dir = source.path();
    let mut paths = Vec::with_capacity(4);
    for stem in FILES {
        paths.push(find_file(dir, stem).ok_or_else(|| {
            Diag::new(
                CODE,
                format!("`{}` has no `{stem}.gz` (or `{stem}`)", dir.display()),
            )
            .help(format!("a Fashion-MNIST directory holds {}", file_list()))
        })?);
    }
    let classes = || FASHION_MNIST_CLASSES.map(String::from).to_vec();
    let (train, test) = std::thread::scope(|s| {
        let test = s.spawn(|| Dataset::load(&paths[2], &paths[3], classes()));
        let train = Dataset::load(&paths[0], &paths[1], classes());
        let test = test.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        (train, test)
    });
    let (train, test) = (train?, test?);
    if (train.rows, train.cols) != (test.rows, test.cols) {
        return Err(Diag::new(
            CODE,
            format!(
                "training images in `{}` are {}×{} but test images in `{}` are {}×{}",
                paths[0].display(),
                train.rows,
                train.cols,
                paths[2].display(),
                test.rows,
                test.cols
            ),
        )
        .help("both sets must come from the same dataset"));
    }
    Ok((train, test, source))
}

/// The full system set if complete, else the shipped subset.
fn default_source() -> Result<Source, Diag> {
    let system = Path::new(SYSTEM_DIR);
    if FILES.iter().all(|stem| find_file(system, stem).is_some()) {
        return Ok(Source::System(system.to_path_buf()));
    }
    let candidates = [
        Path::new(env!("CARGO_MANIFEST_DIR")).join(SUBSET_DIR),
        PathBuf::from(SUBSET_DIR),
    ];
    for c in &candidates {
        if FILES.iter().all(|stem| find_file(c, stem).is_some()) {
            return Ok(Source::Subset(c.clone()));
        }
    }
    Err(Diag::new(
        CODE,
        format!(
            "no Fashion-MNIST data found: neither the full set in {SYSTEM_DIR} nor the shipped \
             subset in `{}` or `{}`",
            candidates[0].display(),
            candidates[1].display()
        ),
    )
    .help(format!(
        "install the Debian package dataset-fashion-mnist (`apt-get install \
         dataset-fashion-mnist`), or name a directory that holds {}",
        file_list()
    )))
}

/// `dir/stem.gz` if it is a file, else `dir/stem` if it is.
fn find_file(dir: &Path, stem: &str) -> Option<PathBuf> {
    [format!("{stem}.gz"), stem.to_string()]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
}

fn file_list() -> String {
    FILES
        .iter()
        .map(|f| format!("`{f}.gz`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;

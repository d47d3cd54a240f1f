use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::batch::testing::transform_image;
use super::*;

/// A fresh empty directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dlc-data-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn classes(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("c{i}")).collect()
}

/// A tiny dataset: `count` images of 3×2 with distinct pixels, labels `i % 10`.
fn tiny(count: usize) -> (Vec<u8>, Vec<u8>) {
    let pixels = (0..count * 6).map(|i| (i * 7 % 256) as u8).collect();
    let labels = (0..count).map(|i| (i % 10) as u8).collect();
    (pixels, labels)
}

/// Asserts a `dlc::data` diagnostic whose message mentions `needle`; returns the message.
fn assert_data_err<T: std::fmt::Debug>(r: Result<T, Diag>, needle: &str) -> String {
    let d = r.expect_err("expected a diagnostic");
    assert_eq!(d.code, "dlc::data", "{}", d.message);
    assert!(
        d.message.contains(needle),
        "message {:?} should mention {needle:?}",
        d.message
    );
    d.message
}

// ---- IDX ---------------------------------------------------------------------------------

#[test]
fn idx_round_trip_raw_and_gz() {
    let dir = TempDir::new();
    let (pixels, labels) = tiny(5);
    for ext in ["", ".gz"] {
        let ip = dir.path(&format!("img{ext}"));
        let lp = dir.path(&format!("lab{ext}"));
        idx::write_images(&ip, &pixels, 5, 3, 2).unwrap();
        idx::write_labels(&lp, &labels).unwrap();
        let raw = std::fs::read(&ip).unwrap();
        assert_eq!(raw.starts_with(&[0x1f, 0x8b]), ext == ".gz");
        if ext.is_empty() {
            assert_eq!(
                &raw[..16],
                &[0, 0, 8, 3, 0, 0, 0, 5, 0, 0, 0, 3, 0, 0, 0, 2]
            );
            assert_eq!(raw.len(), 16 + 30);
        }
        let img = idx::read_images(&ip).unwrap();
        assert_eq!((img.count, img.rows, img.cols), (5, 3, 2));
        assert_eq!(img.pixels, pixels);
        assert_eq!(idx::read_labels(&lp).unwrap(), labels);

        let ds = Dataset::load(&ip, &lp, classes(10)).unwrap();
        assert_eq!((ds.len(), ds.rows(), ds.cols()), (5, 3, 2));
        assert_eq!(ds.image(1), &pixels[6..12]);
        assert_eq!(ds.label(4), 4);
    }
}

#[test]
fn gzip_is_detected_by_content_not_name() {
    let dir = TempDir::new();
    let (pixels, _) = tiny(2);
    idx::write_images(&dir.path("a.gz"), &pixels, 2, 3, 2).unwrap();
    std::fs::rename(dir.path("a.gz"), dir.path("a")).unwrap();
    assert_eq!(idx::read_images(&dir.path("a")).unwrap().pixels, pixels);
}

#[test]
fn missing_file() {
    let dir = TempDir::new();
    let msg = assert_data_err(idx::read_images(&dir.path("nope.gz")), "nope.gz");
    assert!(msg.starts_with("cannot read"), "{msg}");
}

#[test]
fn truncated_raw_files() {
    let dir = TempDir::new();
    let (pixels, _) = tiny(4);
    let p = dir.path("img");
    idx::write_images(&p, &pixels, 4, 3, 2).unwrap();
    let full = std::fs::read(&p).unwrap();
    // Empty, inside the magic, inside the dimensions, inside the data.
    for (cut, needle) in [
        (0, "truncated"),
        (3, "truncated"),
        (9, "truncated"),
        (16 + 5, "truncated"),
    ] {
        std::fs::write(&p, &full[..cut]).unwrap();
        let msg = assert_data_err(idx::read_images(&p), needle);
        assert!(msg.contains(&p.display().to_string()), "{msg}");
    }
    std::fs::write(&p, &full[..full.len() - 1]).unwrap();
    let msg = assert_data_err(idx::read_images(&p), "truncated");
    assert!(
        msg.contains("24 data bytes") && msg.contains("holds 23"),
        "{msg}"
    );
}

#[test]
fn truncated_gz_file() {
    let dir = TempDir::new();
    // Incompressible-ish data so that cutting the stream loses pixels.
    let mut x = 1u32;
    let pixels: Vec<u8> = (0..200 * 28 * 28)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let p = dir.path("img.gz");
    idx::write_images(&p, &pixels, 200, 28, 28).unwrap();
    let full = std::fs::read(&p).unwrap();
    for cut in [1, 2, 10, 30, full.len() / 2, full.len() - 4, full.len() - 1] {
        std::fs::write(&p, &full[..cut]).unwrap();
        assert_data_err(idx::read_images(&p), "img.gz");
    }
}

#[test]
fn corrupt_gz_stream() {
    let dir = TempDir::new();
    let p = dir.path("img.gz");
    let mut bytes = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    bytes.extend_from_slice(b"this is not deflate data at all");
    std::fs::write(&p, &bytes).unwrap();
    assert_data_err(idx::read_images(&p), "img.gz");
}

#[test]
fn bad_magic_type_and_rank() {
    let dir = TempDir::new();
    let p = dir.path("x");
    std::fs::write(&p, b"PK\x03\x04 a zip file").unwrap();
    let msg = assert_data_err(idx::read_images(&p), "not an IDX file");
    assert!(
        msg.contains("50 4b 03 04") && msg.contains("00 00 08 03"),
        "{msg}"
    );

    // Float elements.
    std::fs::write(&p, [0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0]).unwrap();
    assert_data_err(idx::read_labels(&p), "0x0D");

    // A label file where images are expected, and vice versa.
    let (pixels, labels) = tiny(3);
    idx::write_labels(&p, &labels).unwrap();
    assert_data_err(idx::read_images(&p), "1 dimension; expected 3");
    idx::write_images(&p, &pixels, 3, 3, 2).unwrap();
    assert_data_err(idx::read_labels(&p), "3 dimensions; expected 1");

    // Zero-sized images.
    idx::write_u8(&p, &[0, 0, 5], &[]).unwrap();
    assert_data_err(idx::read_images(&p), "0×5");

    // A header claiming far more data than any file could hold.
    std::fs::write(
        &p,
        [
            0, 0, 8, 3, 255, 255, 255, 255, 255, 255, 255, 255, 0, 0, 0, 9,
        ],
    )
    .unwrap();
    assert_data_err(idx::read_images(&p), "implausibly large");
}

#[test]
fn trailing_data() {
    let dir = TempDir::new();
    let (_, labels) = tiny(4);
    for name in ["lab", "lab.gz"] {
        let p = dir.path(name);
        idx::write_labels(&p, &labels).unwrap();
        let full = idx::read_u8(&p, 1, "labels").unwrap();
        assert_eq!(full.1, labels);
        // Append a byte to the uncompressed content.
        let mut content = vec![0, 0, 8, 1, 0, 0, 0, 4];
        content.extend_from_slice(&labels);
        content.extend_from_slice(&[1, 2, 3]);
        if name.ends_with(".gz") {
            use std::io::Write;
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&content).unwrap();
            std::fs::write(&p, enc.finish().unwrap()).unwrap();
        } else {
            std::fs::write(&p, &content).unwrap();
        }
        let msg = assert_data_err(idx::read_labels(&p), "longer than its header says");
        assert!(msg.contains("holds 7"), "{msg}");
    }
}

#[test]
fn count_mismatch_and_bad_labels() {
    let dir = TempDir::new();
    let (pixels, labels) = tiny(5);
    let ip = dir.path("img");
    let lp = dir.path("lab");
    idx::write_images(&ip, &pixels, 5, 3, 2).unwrap();
    idx::write_labels(&lp, &labels[..4]).unwrap();
    let msg = assert_data_err(Dataset::load(&ip, &lp, classes(10)), "holds 5 images");
    assert!(msg.contains("holds 4 labels"), "{msg}");

    let mut bad = labels.clone();
    bad[3] = 10;
    idx::write_labels(&lp, &bad).unwrap();
    let msg = assert_data_err(
        Dataset::load(&ip, &lp, classes(10)),
        "label 10 of example 3",
    );
    assert!(msg.contains("lab"), "{msg}");

    assert_data_err(
        Dataset::new(pixels.clone(), labels.clone(), 3, 3, classes(10)),
        "expected 5 labels",
    );
    assert_data_err(
        Dataset::new(pixels, vec![0, 1, 2, 3, 9], 3, 2, classes(9)),
        "label 9",
    );
}

#[test]
fn loader_errors_name_the_directory() {
    let dir = TempDir::new();
    assert_data_err(fashion_mnist(Some(&dir.path("absent"))), "does not exist");
    let msg = assert_data_err(fashion_mnist(Some(&dir.0)), "train-images-idx3-ubyte");
    assert!(msg.contains(&dir.0.display().to_string()), "{msg}");
}

#[test]
fn loader_reads_raw_and_gz_files_from_a_directory() {
    let dir = TempDir::new();
    let (pixels, labels) = tiny(20);
    idx::write_images(&dir.path("train-images-idx3-ubyte.gz"), &pixels, 20, 3, 2).unwrap();
    idx::write_labels(&dir.path("train-labels-idx1-ubyte"), &labels).unwrap();
    idx::write_images(&dir.path("t10k-images-idx3-ubyte"), &pixels[..60], 10, 3, 2).unwrap();
    idx::write_labels(&dir.path("t10k-labels-idx1-ubyte.gz"), &labels[..10]).unwrap();
    let (train, test, source) = fashion_mnist(Some(&dir.0)).unwrap();
    assert_eq!(source, Source::Dir(dir.0.clone()));
    assert_eq!((train.len(), test.len()), (20, 10));
    assert_eq!(train.classes()[9], "Ankle boot");
    assert_eq!(test.images(), &pixels[..60]);

    // Test images of another size are refused.
    idx::write_images(&dir.path("t10k-images-idx3-ubyte"), &pixels[..60], 10, 2, 3).unwrap();
    assert_data_err(fashion_mnist(Some(&dir.0)), "are 2×3");
}

// ---- The shipped subset and the full set ----------------------------------------------------

fn subset_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(SUBSET_DIR)
}

#[test]
fn shipped_subset_is_stratified() {
    let (train, test, source) = fashion_mnist(Some(&subset_dir())).unwrap();
    assert!(matches!(source, Source::Dir(_)));
    assert_eq!((train.len(), test.len()), (5000, 1000));
    assert_eq!((train.rows(), train.cols()), (28, 28));
    assert_eq!(train.class_counts(), vec![500; 10]);
    assert_eq!(test.class_counts(), vec![100; 10]);
    assert_eq!(
        train.classes(),
        FASHION_MNIST_CLASSES.map(String::from).as_slice()
    );
}

#[test]
fn default_source_loads() {
    let (train, test, source) = fashion_mnist(None).unwrap();
    match &source {
        Source::System(p) => {
            assert_eq!(p, Path::new(SYSTEM_DIR));
            assert_eq!((train.len(), test.len()), (60_000, 10_000));
        }
        Source::Subset(_) => assert_eq!((train.len(), test.len()), (5000, 1000)),
        Source::Dir(_) => panic!("no directory was named"),
    }
    assert!(
        source
            .to_string()
            .contains(&source.path().display().to_string())
    );
}

/// With the Debian package installed: the full set is complete and the shipped subset is
/// exactly its first 500 (train) and 100 (test) examples of each class, in file order.
#[test]
fn full_set_and_subset_agree() {
    if !Path::new(SYSTEM_DIR).is_dir() {
        eprintln!("skipped: {SYSTEM_DIR} not installed");
        return;
    }
    let start = std::time::Instant::now();
    let (train, test, _) = fashion_mnist(Some(Path::new(SYSTEM_DIR))).unwrap();
    eprintln!("full set loaded in {:?}", start.elapsed());
    assert_eq!(train.class_counts(), vec![6000; 10]);
    assert_eq!(test.class_counts(), vec![1000; 10]);
    let (strain, stest, _) = fashion_mnist(Some(&subset_dir())).unwrap();
    let expect_train = train.select(&train.first_per_class(500));
    let expect_test = test.select(&test.first_per_class(100));
    assert_eq!(strain.images(), expect_train.images());
    assert_eq!(strain.labels(), expect_train.labels());
    assert_eq!(stest.images(), expect_test.images());
    assert_eq!(stest.labels(), expect_test.labels());
}

// ---- Shuffling and batching ---------------------------------------------------------------

#[test]
fn shuffle_is_a_deterministic_permutation() {
    for n in [0, 1, 2, 7, 1000] {
        let a = shuffled_order(n, 42, 3);
        assert_eq!(a, shuffled_order(n, 42, 3));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>());
    }
    let base = shuffled_order(1000, 42, 0);
    assert_ne!(base, shuffled_order(1000, 42, 1));
    assert_ne!(base, shuffled_order(1000, 43, 0));
    assert_ne!(base, (0..1000).collect::<Vec<_>>());
    // Pinned: the order must not change between versions (runs are reproducible).
    let pinned = shuffled_order(10, 1, 0);
    assert_eq!(pinned, PINNED_1_0, "shuffle order changed");
}

const PINNED_1_0: [usize; 10] = [7, 2, 5, 8, 3, 4, 1, 6, 0, 9];

#[test]
fn batches_cover_every_example_once() {
    let (pixels, labels) = tiny(23);
    let ds = Dataset::new(pixels, labels, 3, 2, classes(10)).unwrap();
    let t = Transform::new();
    let batches: Vec<Batch> = ds.shuffled(5, 7, 2, &t).unwrap().collect();
    assert_eq!(
        batches.iter().map(|b| b.shape[0]).collect::<Vec<_>>(),
        vec![5, 5, 5, 5, 3]
    );
    let seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(seen, shuffled_order(23, 7, 2));
    for b in &batches {
        assert_eq!(b.shape[1..], [1, 3, 2]);
        assert_eq!(b.images.len(), b.shape.iter().product::<usize>());
        for (k, &i) in b.indices.iter().enumerate() {
            assert_eq!(b.labels[k], ds.label(i) as u32);
            let expect: Vec<f32> = ds.image(i).iter().map(|&p| p as f32 / 255.0).collect();
            assert_eq!(&b.images[k * 6..(k + 1) * 6], expect.as_slice());
        }
    }
    // Same seed and epoch: same batches.
    let again: Vec<Batch> = ds.shuffled(5, 7, 2, &t).unwrap().collect();
    assert_eq!(again, batches);

    // In order, e.g. for the test set.
    let it = ds.in_order(10, &t).unwrap();
    assert_eq!(it.len(), 3);
    let seen: Vec<usize> = it.flat_map(|b| b.indices).collect();
    assert_eq!(seen, (0..23).collect::<Vec<_>>());
}

#[test]
fn threaded_batches_match_single_threaded() {
    let (train, _, _) = fashion_mnist(Some(&subset_dir())).unwrap();
    let t = Transform::to_shape(3, 96, 96).normalize(&[0.2860], &[0.3530]);
    let order = Order::Shuffled { seed: 1, epoch: 0 };
    let mut multi = Batches::with_threads(&train, 64, order, &t, 4).unwrap();
    assert_eq!(multi.image_shape(), (3, 96, 96));
    for k in 0..10 {
        let b = multi.next().unwrap();
        let single = make_batch(&train, &b.indices, &t).unwrap();
        assert_eq!(b, single, "batch {k}");
        assert_eq!(b.shape, [64, 3, 96, 96]);
        multi.recycle(b.images); // later batches reuse the buffers
    }
    // The batches do not depend on the number of threads.
    let one: Vec<Vec<usize>> = Batches::with_threads(&train, 64, order, &t, 1)
        .unwrap()
        .map(|b| b.indices)
        .collect();
    let three: Vec<Vec<usize>> = Batches::with_threads(&train, 64, order, &t, 3)
        .unwrap()
        .map(|b| b.indices)
        .collect();
    assert_eq!(one, three);
    assert_eq!(one.len(), 5000usize.div_ceil(64));
}

#[test]
fn dropping_batches_early_stops_the_thread() {
    let (train, _, _) = fashion_mnist(Some(&subset_dir())).unwrap();
    let mut it = train
        .in_order(16, &Transform::to_shape(1, 224, 224))
        .unwrap();
    assert!(it.next().is_some());
    drop(it); // must not hang
}

#[test]
fn invalid_settings_are_diagnostics() {
    let (pixels, labels) = tiny(3);
    let ds = Dataset::new(pixels, labels, 3, 2, classes(10)).unwrap();
    assert_data_err(ds.in_order(0, &Transform::new()), "batch size");
    assert_data_err(ds.in_order(2, &Transform::new().channels(0)), "channel");
    assert_data_err(ds.in_order(2, &Transform::new().resize(0, 4)), "0×4");
    assert_data_err(
        ds.in_order(
            2,
            &Transform::new()
                .channels(3)
                .normalize(&[0.5, 0.5], &[1.0, 1.0]),
        ),
        "3 channels",
    );
    assert_data_err(
        ds.in_order(2, &Transform::new().normalize(&[0.5], &[0.0])),
        "positive",
    );
    assert_data_err(
        ds.in_order(2, &Transform::new().normalize(&[0.5], &[])),
        "1 means but 0",
    );
    assert_data_err(make_batch(&ds, &[0, 3], &Transform::new()), "example 3");
}

// ---- The transform ------------------------------------------------------------------------

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() < 1e-6, "at {i}: got {g}, want {w}\n{got:?}");
    }
}

#[test]
fn to_tensor_scaling() {
    let out = transform_image(&Transform::new(), &[0, 51, 255, 128], 2, 2);
    assert_close(&out, &[0.0, 0.2, 1.0, 128.0 / 255.0]);
}

/// PyTorch: `F.interpolate(torch.tensor([[[[0., 1.], [2., 3.]]]]), size=(4, 4),
/// mode='bilinear', align_corners=False)`.
#[test]
fn bilinear_upsample_2x2_to_4x4() {
    // 0, 51, 102, 153 → 0, 0.2, 0.4, 0.6 = 0.2 × [[0, 1], [2, 3]].
    let out = transform_image(&Transform::new().resize(4, 4), &[0, 51, 102, 153], 2, 2);
    let torch = [
        0.00, 0.25, 0.75, 1.00, //
        0.50, 0.75, 1.25, 1.50, //
        1.50, 1.75, 2.25, 2.50, //
        2.00, 2.25, 2.75, 3.00,
    ];
    let want: Vec<f32> = torch.iter().map(|v| v * 0.2).collect();
    assert_close(&out, &want);
}

/// Non-square, non-integer factor: 2×3 → 3×2, computed by hand from
/// `src = (dst + 0.5) * in / out - 0.5`, clamped at 0.
#[test]
fn bilinear_non_integer_factor() {
    // Pixels (×1/255): [[0, 30, 60], [90, 120, 150]].
    let out = transform_image(
        &Transform::new().resize(3, 2),
        &[0, 30, 60, 90, 120, 150],
        2,
        3,
    );
    // Rows: scale 2/3: src = 0 (clamped from -1/6), 0.5, 7/6 → (0, 0), (0, 0.5), (1, 0).
    // Cols: scale 3/2: src = 0.25, 1.75 → (0, .25), (1, .75).
    let px = |r: f32, c: f32| (r * 90.0 + c * 30.0) / 255.0; // the image is linear
    let want = [
        px(0.0, 0.25),
        px(0.0, 1.75),
        px(0.5, 0.25),
        px(0.5, 1.75),
        px(1.0, 0.25),
        px(1.0, 1.75),
    ];
    assert_close(&out, &want);
}

#[test]
fn bilinear_downsample_averages_pairs() {
    let pixels: Vec<u8> = (0..16).map(|i| i * 10).collect();
    let out = transform_image(&Transform::new().resize(2, 2), &pixels, 4, 4);
    // src = 0.5 and 2.5 on both axes: the mean of each 2×2 block.
    let block = |r: usize, c: usize| {
        let p = |y: usize, x: usize| pixels[y * 4 + x] as f32;
        (p(r, c) + p(r, c + 1) + p(r + 1, c) + p(r + 1, c + 1)) / 4.0 / 255.0
    };
    assert_close(&out, &[block(0, 0), block(0, 2), block(2, 0), block(2, 2)]);
}

#[test]
fn resize_to_the_same_size_is_identity() {
    let pixels: Vec<u8> = (0..28 * 28).map(|i| (i % 251) as u8).collect();
    let plain = transform_image(&Transform::new(), &pixels, 28, 28);
    let same = transform_image(&Transform::new().resize(28, 28), &pixels, 28, 28);
    assert_eq!(plain, same);
}

#[test]
fn replication_and_normalisation() {
    let pixels = [0, 51, 102, 255];
    let x = [0.0, 0.2, 0.4, 1.0];

    let rgb = transform_image(&Transform::new().channels(3), &pixels, 2, 2);
    assert_close(&rgb, &[x, x, x].concat());

    let one = transform_image(&Transform::new().normalize(&[0.5], &[0.25]), &pixels, 2, 2);
    assert_close(&one, &x.map(|v| (v - 0.5) / 0.25));

    // One value for all three channels.
    let shared = transform_image(
        &Transform::new().channels(3).normalize(&[0.5], &[0.25]),
        &pixels,
        2,
        2,
    );
    assert_close(&shared, &[one.clone(), one.clone(), one].concat());

    // ImageNet statistics, one per channel, after a resize.
    let (mean, std) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
    let t = Transform::to_shape(3, 4, 4).normalize(&mean, &std);
    let out = transform_image(&t, &[0, 51, 102, 153], 2, 2);
    let grey = transform_image(&Transform::new().resize(4, 4), &[0, 51, 102, 153], 2, 2);
    let want: Vec<f32> = (0..3)
        .flat_map(|c| grey.iter().map(move |&v| (v - mean[c]) / std[c]))
        .collect();
    assert_close(&out, &want);
    assert_eq!(t.output_shape(28, 28), (3, 4, 4));
}

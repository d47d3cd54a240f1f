//! `dlc predict` end to end: a checkpoint trained on the shipped subset classifies PNG and
//! JPEG files (grey, RGB, resized) as the library's own inference does, and bad inputs are
//! diagnostics with exit status 1.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use dlc::data::{self, FASHION_MNIST_CLASSES};
use dlc::lower::{Init, Network};
use dlc::session::{Select, compile};
use dlc::train::{self, config};
use image::{GrayImage, ImageFormat, RgbImage};

const SPEC: &str = "specs/lenet_bn.dlc";
const MODEL: &str = "lenet_bn_relu";
const SUBSET: &str = "data/fashion-mnist-subset";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn dlc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dlc"))
        .args(args)
        .current_dir(root())
        .env("NO_COLOR", "1")
        .output()
        .expect("run dlc")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `dlc`, asserts a clean failure (exit 1) with the diagnostic `code`, and returns
/// the output for further checks.
fn fails_with(args: &[&str], code: &str) -> Output {
    let out = dlc(args);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(code),
        "{}",
        text(&out)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The library's inference on test image `index`: the logits `dlc eval` computes for it.
fn library_logits(ckpt: &Path, test: &data::Dataset, index: usize) -> Vec<f32> {
    let compiled = compile(
        &root().join(SPEC),
        Select::One(Some(MODEL)),
        &[] as &[String],
    )
    .expect("spec compiles");
    let model = &compiled.models[0];
    let (shape, _) = train::classifier_shape(model).expect("classifier");
    let recipe = config::recipe(model, &config::Overrides::default()).expect("recipe");
    let mut net = Network::new(model, &Device::Cpu, DType::F32, Init::Torch, 0).expect("network");
    train::load_weights(&mut net, ckpt).expect("weights load");
    let batch = data::make_batch(test, &[index], &train::transform(shape, &recipe)).expect("batch");
    let dims = batch.shape.to_vec();
    let x = Tensor::from_vec(batch.images, dims, &Device::Cpu).expect("tensor");
    let logits = net.forward(&[x], false).expect("forward").remove(0);
    logits.to_vec2::<f32>().expect("logits").remove(0)
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len())
        .max_by(|&a, &b| v[a].total_cmp(&v[b]).then(b.cmp(&a)))
        .expect("non-empty")
}

#[test]
fn predict_classifies_png_and_jpeg_like_the_library() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("predict-run");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let out = dir.join("run");
    let trained = dlc(&[
        "train",
        SPEC,
        "--model",
        MODEL,
        "--epochs",
        "1",
        "--batch",
        "256",
        "--data",
        SUBSET,
        "--out",
        s(&out),
        "-q",
    ]);
    assert!(trained.status.success(), "{}", text(&trained));
    let ckpt = out.join("model.safetensors");

    // Three test images: a 28×28 grey PNG; the next one as an RGB PNG at 56×56 (each pixel
    // doubled, grey in all three channels, which the bilinear resize back to 28×28 and the
    // BT.601 luma undo exactly); and a third as a grey JPEG.
    let (_, test, _) = data::fashion_mnist(Some(&root().join(SUBSET))).expect("subset");
    let (rows, cols) = (test.rows() as u32, test.cols() as u32);
    let picks = [0usize, 1, 2];
    let grey = |i: usize| GrayImage::from_raw(cols, rows, test.image(i).to_vec()).expect("image");
    let png = dir.join("grey.png");
    grey(picks[0])
        .save_with_format(&png, ImageFormat::Png)
        .expect("png");
    let rgb_path = dir.join("rgb56.png");
    let big = RgbImage::from_fn(cols * 2, rows * 2, |x, y| {
        let v = test.image(picks[1])[(y / 2 * cols + x / 2) as usize];
        image::Rgb([v, v, v])
    });
    big.save_with_format(&rgb_path, ImageFormat::Png)
        .expect("rgb png");
    let jpeg = dir.join("grey.jpg");
    grey(picks[2])
        .save_with_format(&jpeg, ImageFormat::Jpeg)
        .expect("jpeg");
    let rgb_reference = dir.join("rgb-reference.png");
    grey(picks[1])
        .save_with_format(&rgb_reference, ImageFormat::Png)
        .expect("png");

    // The table: one headline per image naming a class, then the top 3.
    let table = dlc(&[
        "predict",
        SPEC,
        "--model",
        MODEL,
        "--weights",
        s(&ckpt),
        "--top",
        "3",
        s(&png),
        s(&rgb_path),
        s(&jpeg),
    ]);
    assert!(table.status.success(), "{}", text(&table));
    let stdout = String::from_utf8_lossy(&table.stdout);
    for image in [&png, &rgb_path, &jpeg] {
        let headline = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{}: ", s(image))))
            .unwrap_or_else(|| panic!("a line for {}:\n{stdout}", image.display()));
        assert!(
            FASHION_MNIST_CLASSES.iter().any(|c| headline.contains(c)),
            "names a class: {headline}"
        );
    }
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.trim_start().starts_with("1. "))
            .count(),
        3,
        "{stdout}"
    );
    assert!(
        !stdout.contains(" 4. "),
        "--top 3 shows three classes:\n{stdout}"
    );
    assert!(stdout.contains("56×56 RGB → 1×28×28"), "{stdout}");

    // JSON: every class's probability (summing to 1) and the raw logits, per image.
    let json = dlc(&[
        "predict",
        SPEC,
        "--model",
        MODEL,
        "--weights",
        s(&ckpt),
        "--format",
        "json",
        s(&png),
        s(&rgb_path),
        s(&jpeg),
        s(&rgb_reference),
    ]);
    assert!(json.status.success(), "{}", text(&json));
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).expect("valid JSON");
    let images = doc["images"].as_array().expect("images");
    assert_eq!(images.len(), 4);
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_f64().expect("number"))
            .collect()
    };
    for img in images {
        let probs = floats(&img["probabilities"]);
        assert_eq!(probs.len(), 10, "{img}");
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{img}");
        assert_eq!(floats(&img["logits"]).len(), 10, "{img}");
        let k = img["predicted"].as_u64().expect("predicted") as usize;
        assert_eq!(img["class"], FASHION_MNIST_CLASSES[k], "{img}");
    }

    // The 28×28 PNG gives what the library's inference gives on the same test image.
    let expected = library_logits(&ckpt, &test, picks[0]);
    let got: Vec<f32> = floats(&images[0]["logits"])
        .iter()
        .map(|&x| x as f32)
        .collect();
    assert_eq!(
        images[0]["predicted"].as_u64(),
        Some(argmax(&expected) as u64)
    );
    for (g, e) in got.iter().zip(&expected) {
        assert!(
            (g - e).abs() < 1e-4,
            "logits {got:?} vs library {expected:?}"
        );
    }
    // The 56×56 RGB copy is the 28×28 grey original after conversion and resize.
    let (rgb, reference) = (floats(&images[1]["logits"]), floats(&images[3]["logits"]));
    for (a, b) in rgb.iter().zip(&reference) {
        assert!(
            (a - b).abs() < 1e-4,
            "RGB 56×56 {rgb:?} vs grey 28×28 {reference:?}"
        );
    }
    let library = library_logits(&ckpt, &test, picks[1]);
    assert_eq!(
        images[1]["predicted"].as_u64(),
        Some(argmax(&library) as u64)
    );

    // Problems are diagnostics, exit status 1, never panics.
    let missing = fails_with(
        &[
            "predict",
            SPEC,
            "--model",
            MODEL,
            "--weights",
            s(&ckpt),
            s(&dir.join("nope.png")),
        ],
        "dlc::io",
    );
    assert!(
        missing.stdout.is_empty(),
        "nothing predicted: {}",
        text(&missing)
    );

    let not_image = dir.join("notes.png");
    std::fs::write(&not_image, "not an image").expect("write");
    let undecodable = fails_with(
        &[
            "predict",
            SPEC,
            "--model",
            MODEL,
            "--weights",
            s(&ckpt),
            s(&not_image),
        ],
        "dlc::image",
    );

    let truncated = dir.join("png-truncated.png");
    let bytes = std::fs::read(&png).expect("png bytes");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let broken = fails_with(
        &[
            "predict",
            SPEC,
            "--model",
            MODEL,
            "--weights",
            s(&ckpt),
            s(&truncated),
        ],
        "dlc::image",
    );

    let corrupt = dir.join("corrupt.safetensors");
    let weights = std::fs::read(&ckpt).expect("checkpoint bytes");
    std::fs::write(&corrupt, &weights[..weights.len() / 2]).expect("write");
    let bad_ckpt = fails_with(
        &[
            "predict",
            SPEC,
            "--model",
            MODEL,
            "--weights",
            s(&corrupt),
            s(&png),
        ],
        "dlc::checkpoint",
    );

    let no_ckpt = fails_with(
        &[
            "predict",
            SPEC,
            "--model",
            MODEL,
            "--weights",
            s(&dir.join("none.safetensors")),
            s(&png),
        ],
        "dlc::checkpoint",
    );

    // A checkpoint of another model (the sigmoid LeNet of specs/lenet.dlc) does not fit.
    let wrong = fails_with(
        &[
            "predict",
            "specs/lenet.dlc",
            "--model",
            "lenet",
            "--weights",
            s(&ckpt),
            s(&png),
        ],
        "dlc::checkpoint",
    );

    // Another model whose layers happen to fit loads, with a warning naming the trained one.
    let other = dlc(&[
        "predict",
        SPEC,
        "--model",
        "d2l_bn_lenet",
        "--weights",
        s(&ckpt),
        s(&png),
    ]);
    assert!(other.status.success(), "{}", text(&other));
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("trained as `lenet_bn_relu`"),
        "{}",
        text(&other)
    );

    for out in [&missing, &undecodable, &broken, &bad_ckpt, &no_ckpt, &wrong] {
        assert!(!text(out).contains("panicked"), "{}", text(out));
    }
}

//! Lowering agrees with inference for every shipped model: the trainable variables hold
//! exactly `dlc params`' total, the buffers its buffer count, and a forward pass (at a
//! reduced input size where the spec has a `size` parameter; batch 2, symbolic lengths 5,
//! token ids for token inputs) returns the inferred shape of every output. Models whose
//! weights are too large to ship as fixtures have their reference state-dict keys and shapes
//! in `tests/reference/state_dicts/` (written by `scripts/torch_fixtures.py`); the lowered
//! network must have exactly those.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use dlc::lower::{Init, Network};
use dlc::session::{Select, compile};

/// Input sizes tried, smallest first, for models that take `size`.
const SIZES: [usize; 4] = [32, 64, 128, 224];

/// The batch of the forward pass, and the length given to symbolic sizes (sequences).
const BATCH: usize = 2;
const LENGTH: usize = 5;

/// Concrete dims of an inferred shape: batch `BATCH`, other symbols `LENGTH`.
fn example_dims(shape: &dlc::ir::Shape) -> Vec<usize> {
    let mut dims: Vec<usize> = shape
        .0
        .iter()
        .map(|d| d.known().unwrap_or(LENGTH as u64) as usize)
        .collect();
    dims[0] = BATCH;
    dims
}

/// A test input for a model input: random numbers, or token ids 0, 1, 2, 0, … (below every
/// vocabulary of the shipped specs).
fn example_input(shape: &dlc::ir::Shape) -> Tensor {
    let dims = example_dims(shape);
    if shape.is_tokens() {
        let n: usize = dims.iter().product();
        let ids: Vec<u32> = (0..n as u32).map(|i| i % 3).collect();
        Tensor::from_vec(ids, dims, &Device::Cpu).expect("ids")
    } else {
        Tensor::randn(0f32, 1f32, dims, &Device::Cpu).expect("input")
    }
}

#[test]
fn every_shipped_model_lowers_with_the_inferred_counts_and_shapes() {
    let specs = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs");
    let mut files: Vec<_> = std::fs::read_dir(&specs)
        .expect("specs/")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    let mut checked = 0;
    for file in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "dlc"))
    {
        let all = compile(file, Select::All(None), &[]).expect("shipped specs compile");
        for m in &all.models {
            let takes_size = dlc::elaborate::param_names(&all.program, &m.name)
                .iter()
                .any(|p| p == "size");
            let small = if takes_size {
                SIZES
                    .iter()
                    .find_map(|s| {
                        compile(file, Select::One(Some(&m.name)), &[format!("size={s}")]).ok()
                    })
                    .expect("compiles at some size")
            } else {
                compile(file, Select::One(Some(&m.name)), &[]).expect("compiles")
            };
            let model = &small.models[0];
            let cost = model.graph.total_cost();
            let mut net =
                Network::new(model, &Device::Cpu, DType::F32, Init::Torch, 0).expect("lowers");
            assert_eq!(
                net.state.param_count() as u64,
                cost.params,
                "{}: trainable elements",
                m.name
            );
            assert_eq!(
                net.state.buffer_count() as u64,
                cost.buffers,
                "{}: buffer elements",
                m.name
            );
            let xs: Vec<Tensor> = model
                .graph
                .inputs
                .iter()
                .map(|i| example_input(&model.graph.dag[*i].outputs[0]))
                .collect();
            let ys = net.forward(&xs, false).expect("forward");
            assert_eq!(ys.len(), model.graph.outputs.len(), "{}: outputs", m.name);
            for (y, o) in ys.iter().zip(&model.graph.outputs) {
                let expected = example_dims(&model.graph.dag[*o].outputs[0]);
                assert_eq!(y.dims(), expected.as_slice(), "{}: output shape", m.name);
                let values = y
                    .flatten_all()
                    .and_then(|t| t.to_dtype(DType::F32))
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("values");
                assert!(
                    values.iter().all(|v| v.is_finite()),
                    "{}: finite outputs",
                    m.name
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 22, "only {checked} models lowered");
}

/// `key → shape` of a lowered network's parameters and buffers.
fn lowered_keys(net: &Network) -> BTreeMap<String, Vec<usize>> {
    net.state
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.dims().to_vec()))
        .collect()
}

#[test]
fn state_dict_keys_and_shapes_equal_the_references() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests/reference/state_dicts");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/reference/state_dicts")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 4, "reference key lists in {}", dir.display());
    for file in files {
        let text = std::fs::read_to_string(&file).expect("key list");
        let mut lines = text.lines();
        let header = lines.next().expect("header line");
        let field = |name: &str| {
            header
                .trim_start_matches("# ")
                .split('\t')
                .find_map(|f| f.strip_prefix(name))
                .unwrap_or_else(|| panic!("{}: no `{name}` in the header", file.display()))
                .to_string()
        };
        let (spec, model) = (field("spec: "), field("model: "));
        let want: BTreeMap<String, Vec<usize>> = lines
            .map(|l| {
                let (k, shape) = l.split_once('\t').expect("key<TAB>shape");
                let dims = shape
                    .trim_matches(|c| c == '[' || c == ']')
                    .split(", ")
                    .filter(|d| !d.is_empty())
                    .map(|d| d.parse().expect("dim"))
                    .collect();
                (k.to_string(), dims)
            })
            .collect();
        // Names and shapes do not depend on the input size: lower at a small one where the
        // model takes a `size`.
        let path = root.join(&spec);
        let compiled = compile(&path, Select::One(Some(&model)), &["size=64".to_string()])
            .or_else(|_| compile(&path, Select::One(Some(&model)), &[]))
            .expect("compiles");
        let net = Network::new(
            &compiled.models[0],
            &Device::Cpu,
            DType::F32,
            Init::Torch,
            0,
        )
        .expect("lowers");
        let got = lowered_keys(&net);
        let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
        let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{model}: keys missing from the spec {missing:?}, keys not in the reference {extra:?}"
        );
        for (k, shape) in &want {
            assert_eq!(&got[k], shape, "{model}: shape of {k}");
        }
    }
}

#[test]
fn fcn_resnet50_has_two_full_size_outputs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let compiled = compile(
        &root.join("specs/fcn.dlc"),
        Select::One(Some("fcn_resnet50")),
        &["size=48".to_string()],
    )
    .expect("compiles");
    let model = &compiled.models[0];
    let mut net = Network::new(model, &Device::Cpu, DType::F32, Init::Torch, 0).expect("lowers");
    assert_eq!(net.state.param_count(), 35_322_218);
    // Running mean and variance of every batch norm: as many as their weights and biases.
    let bn_params: usize = net
        .state
        .params
        .iter()
        .filter(|(k, _)| {
            net.state
                .buffers
                .contains_key(&k.replace(".weight", ".running_mean"))
        })
        .map(|(_, v)| 2 * v.elem_count())
        .sum();
    assert_eq!(net.state.buffer_count(), bn_params);
    let x = Tensor::randn(0f32, 1f32, (2, 3, 48, 48), &Device::Cpu).expect("input");
    let ys = net.forward(&[x], true).expect("forward");
    let dims: Vec<&[usize]> = ys.iter().map(|y| y.dims()).collect();
    assert_eq!(dims, [[2, 21, 48, 48], [2, 21, 48, 48]]);
}

//! Lowering agrees with inference for every shipped model: the trainable variables hold
//! exactly `dlc params`' total, the buffers its buffer count, and a forward pass (at a
//! reduced input size where the spec has a `size` parameter) returns the inferred shapes of
//! every output, with batch 2, sequences of length 5 and token ids for token inputs.

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

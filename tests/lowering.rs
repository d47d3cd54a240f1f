//! Lowering agrees with inference for every shipped model: the trainable variables hold
//! exactly `dlc params`' total, the buffers its buffer count, and a forward pass (at a
//! reduced input size where the spec has a `size` parameter; symbolic lengths set to 2; token
//! ids all 1) returns the inferred shape.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use dlc::lower::{Init, Network};
use dlc::session::{Select, compile};

/// Input sizes tried, smallest first, for models that take `size`.
const SIZES: [usize; 4] = [32, 64, 128, 224];

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
            let inputs: Vec<Tensor> = model
                .graph
                .inputs
                .iter()
                .map(|i| {
                    let shape = &model.graph.dag[*i].outputs[0];
                    let dims: Vec<usize> = shape
                        .0
                        .iter()
                        .map(|d| d.known().unwrap_or(2) as usize)
                        .collect();
                    if shape.is_tokens() {
                        Tensor::ones(dims, DType::U32, &Device::Cpu)
                    } else {
                        Tensor::randn(0f32, 1f32, dims, &Device::Cpu)
                    }
                    .expect("input")
                })
                .collect();
            let y = net.forward(&inputs, false).expect("forward").remove(0);
            let expected: Vec<usize> = model.graph.dag[model.graph.outputs[0]].outputs[0]
                .0
                .iter()
                .map(|d| d.known().unwrap_or(2) as usize)
                .collect();
            assert_eq!(y.dims(), expected.as_slice(), "{}: output shape", m.name);
            let values = y
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("values");
            assert!(
                values.iter().all(|v| v.is_finite()),
                "{}: finite outputs",
                m.name
            );
            checked += 1;
        }
    }
    assert!(checked >= 22, "only {checked} models lowered");
}

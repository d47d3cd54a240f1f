//! The lowered network computes what the same net written by hand with candle computes, on
//! the same weights: d2l's LeNet, and a ResNet basic block in inference mode. (The PyTorch
//! fixtures check the same weights against PyTorch; this checks that the graph executor
//! adds nothing of its own.)

use std::collections::HashMap;
use std::path::Path;

use candle_core::{D, DType, Device, Tensor};
use dlc::lower::{Init, Network};
use dlc::session::{Select, compile};

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torch")
        .join(name);
    candle_core::safetensors::load(path, &Device::Cpu).expect("fixture")
}

fn lowered(spec: &str, model: &str, weights: &HashMap<String, Tensor>) -> Network {
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join(spec);
    let compiled = compile(&spec, Select::One(Some(model)), &[]).expect("spec compiles");
    let net = Network::new(
        &compiled.models[0],
        &Device::Cpu,
        DType::F64,
        Init::Torch,
        0,
    )
    .expect("lowers");
    for (name, var) in net.state.variables() {
        var.set(&weights[&name]).expect("same shape");
    }
    net
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(D::Minus1)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    x.matmul(&w.t().unwrap()).unwrap().broadcast_add(b).unwrap()
}

fn conv(x: &Tensor, w: &Tensor, b: Option<&Tensor>, pad: usize, stride: usize) -> Tensor {
    let y = x.conv2d(w, pad, stride, 1, 1).unwrap();
    match b {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1)).unwrap()).unwrap(),
        None => y,
    }
}

#[test]
fn lenet_matches_the_hand_written_candle_net() {
    let w = fixture("lenet.safetensors");
    let mut net = lowered("specs/lenet.dlc", "lenet", &w);
    let x = &w["input"];
    let sig = candle_nn::ops::sigmoid;
    let h = sig(&conv(x, &w["0.weight"], Some(&w["0.bias"]), 2, 1))
        .unwrap()
        .avg_pool2d(2)
        .unwrap();
    let h = sig(&conv(&h, &w["3.weight"], Some(&w["3.bias"]), 0, 1))
        .unwrap()
        .avg_pool2d(2)
        .unwrap();
    let h = h.flatten_from(1).unwrap();
    let h = sig(&linear(&h, &w["7.weight"], &w["7.bias"])).unwrap();
    let h = sig(&linear(&h, &w["9.weight"], &w["9.bias"])).unwrap();
    let by_hand = linear(&h, &w["11.weight"], &w["11.bias"]);
    let out = net
        .forward(std::slice::from_ref(x), false)
        .unwrap()
        .remove(0);
    assert!(
        max_diff(&out, &by_hand) < 1e-12,
        "{}",
        max_diff(&out, &by_hand)
    );
}

#[test]
fn basic_block_matches_the_hand_written_candle_block() {
    let w = fixture("basic_block.safetensors");
    let mut net = lowered("tests/fixtures/torch/basic_block.dlc", "basic_block", &w);
    let bn = |x: &Tensor, name: &str| {
        let p = |k: &str| {
            w[&format!("block.{name}.{k}")]
                .reshape((1, (), 1, 1))
                .unwrap()
        };
        let inv = (p("running_var") + 1e-5)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        x.broadcast_sub(&p("running_mean"))
            .unwrap()
            .broadcast_mul(&inv)
            .unwrap()
            .broadcast_mul(&p("weight"))
            .unwrap()
            .broadcast_add(&p("bias"))
            .unwrap()
    };
    let x = &w["input"];
    let main = bn(&conv(x, &w["block.conv1.weight"], None, 1, 2), "bn1")
        .relu()
        .unwrap();
    let main = bn(&conv(&main, &w["block.conv2.weight"], None, 1, 1), "bn2");
    let short = bn(
        &conv(x, &w["block.downsample.0.weight"], None, 0, 2),
        "downsample.1",
    );
    let by_hand = (main + short).unwrap().relu().unwrap();
    let out = net
        .forward(std::slice::from_ref(x), false)
        .unwrap()
        .remove(0);
    assert!(
        max_diff(&out, &by_hand) < 1e-12,
        "{}",
        max_diff(&out, &by_hand)
    );
    assert!(
        max_diff(&out, &w["output.eval"]) < 1e-9,
        "and both agree with PyTorch"
    );
}

//! Evaluation without gradients (`Network::infer`: parameters read detached, batch norms
//! folded into the convolutions before them) against the recorded evaluation forward, and
//! frozen parameters (`State::freeze`) against training that merely leaves them out of the
//! optimiser.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use dlc::lower::{Init, Network};
use dlc::session::{Select, compile};
use dlc::train::optim::{Optimizer, Stepper};

/// The shipped `model` of `spec` lowered in `dtype`, seed 0.
fn lower(spec: &str, model: &str, sets: &[&str], dtype: DType) -> Network {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let compiled = compile(&root.join(spec), Select::One(Some(model)), &sets).expect("compiles");
    Network::new(&compiled.models[0], &Device::Cpu, dtype, Init::Torch, 0).expect("lowers")
}

/// Gives every vector (batch-norm weights, biases, running statistics) random values, the
/// running variances in [0.5, 1.5), so that folding a batch norm is not the identity.
fn randomize_vectors(net: &Network) {
    for (name, var) in net.state.variables() {
        if var.rank() != 1 {
            continue;
        }
        let t = if name.ends_with("running_var") {
            Tensor::rand(0.5, 1.5, var.dims(), &Device::Cpu)
        } else {
            Tensor::randn(0.0, 0.5, var.dims(), &Device::Cpu)
        };
        let t = t.and_then(|t| t.to_dtype(var.dtype())).expect("random");
        var.set(&t).expect("same shape");
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f64>())
        .expect("difference")
}

/// `infer` and the recorded evaluation forward agree, and `infer` records nothing.
fn infer_equals_eval_forward(mut net: Network, input: &[usize]) {
    randomize_vectors(&net);
    let x = Tensor::randn(0.0, 1.0, input, &Device::Cpu).expect("input");
    let x = x.to_dtype(DType::F64).expect("f64");
    let recorded = net
        .forward(std::slice::from_ref(&x), false)
        .expect("forward");
    let inferred = net.infer(std::slice::from_ref(&x)).expect("infer");
    assert!(recorded[0].track_op(), "the evaluation forward is recorded");
    assert!(!inferred[0].track_op(), "infer records nothing");
    let diff = max_abs_diff(&recorded[0], &inferred[0]);
    assert!(diff < 1e-10, "infer differs from forward by {diff}");
}

#[test]
fn infer_equals_the_evaluation_forward_on_resnet18() {
    let net = lower(
        "specs/resnet.dlc",
        "resnet18",
        &["size=32", "classes=10"],
        DType::F64,
    );
    infer_equals_eval_forward(net, &[2, 3, 32, 32]);
}

/// MobileNetV2: convolutions followed by batch norm and ReLU6 (not folded into the
/// convolution), depthwise convolutions, linear bottlenecks.
#[test]
fn infer_equals_the_evaluation_forward_on_mobilenet_v2() {
    let net = lower(
        "specs/mobilenet.dlc",
        "mobilenet_v2",
        &["size=32", "classes=10"],
        DType::F64,
    );
    infer_equals_eval_forward(net, &[2, 3, 32, 32]);
}

/// LeNet with batch norm after convolutions and linear layers, with sigmoid and ReLU.
#[test]
fn infer_equals_the_evaluation_forward_on_lenet_with_batch_norm() {
    for model in ["d2l_bn_lenet", "lenet_bn_relu"] {
        let net = lower("specs/lenet_bn.dlc", model, &[], DType::F64);
        infer_equals_eval_forward(net, &[2, 1, 28, 28]);
    }
}

/// `Conv::forward_folded` against the convolution, the evaluation batch norm and the
/// activation one after the other: with and without the conv's bias, ReLU and ReLU6,
/// grouped and strided.
#[test]
fn a_folded_convolution_equals_convolution_then_batch_norm() {
    use dlc::lower::activation::Clamp;
    use dlc::lower::conv::Conv;
    use dlc::lower::norm::BatchNorm;
    use dlc::lower::{Param, State};
    use dlc::ops::conv::Conv2d;
    use dlc::ops::norm::BatchNorm as BatchNormCfg;
    for (groups, stride, bias, clamp) in [
        (1, 1, true, Some(Clamp::RELU)),
        (1, 2, false, None),
        (4, 1, false, Some(Clamp::RELU)),
        (1, 1, false, Some(Clamp::RELU6)),
    ] {
        let mut state = State::new(&Device::Cpu, DType::F64, Init::Torch, 1);
        let cfg = Conv2d {
            out: 8,
            kernel: (3, 3),
            stride: (stride, stride),
            pad: (1, 1),
            dilation: (1, 1),
            groups,
            bias,
        };
        let conv = Conv::new(&mut state, "conv", &cfg, 4).expect("conv");
        let bn_cfg = BatchNormCfg {
            eps: 1e-5,
            momentum: 0.1,
        };
        let bn = BatchNorm::new(&mut state, "bn", &bn_cfg, 8).expect("bn");
        let bn = match clamp {
            Some(c) => bn.then_clamp(c),
            None => bn,
        };
        let randomize = |p: &Param, low: f64| {
            let t = Tensor::rand(low, 1.5, p.dims(), &Device::Cpu).expect("random");
            p.set(&t).expect("set");
        };
        for (name, p) in state.params.iter().chain(state.buffers.iter()) {
            randomize(
                p,
                if name.ends_with("running_var") {
                    0.5
                } else {
                    -1.5
                },
            );
        }
        let x = Tensor::randn(0.0, 1.0, (3, 4, 9, 9), &Device::Cpu).expect("input");
        let want = bn
            .forward(&conv.forward(&x, false).expect("conv"), false, false)
            .expect("bn");
        let (scale, shift, fused) = bn.eval_affine().expect("affine");
        assert_eq!(fused, clamp);
        let got = conv
            .forward_folded(&x, &scale, &shift, fused)
            .expect("folded");
        let diff = max_abs_diff(&want, &got);
        assert!(diff < 1e-12, "folded differs by {diff}");
    }
}

/// Losses of `steps` SGD steps on one fixed batch, with the trainable parameters `stepper`
/// was built from.
fn losses(net: &mut Network, stepper: &mut Stepper, steps: usize) -> Vec<f64> {
    let values: Vec<f64> = (0..4 * 3 * 32 * 32)
        .map(|i| (i as f64 * 0.37).sin())
        .collect();
    let x = Tensor::from_vec(values, (4, 3, 32, 32), &Device::Cpu).expect("input");
    let y = Tensor::new(&[0u32, 3, 7, 9], &Device::Cpu).expect("labels");
    (0..steps)
        .map(|_| {
            let logits = net
                .forward(std::slice::from_ref(&x), true)
                .expect("forward");
            let loss = candle_nn::loss::cross_entropy(&logits[0], &y).expect("loss");
            let grads = loss.backward().expect("backward");
            stepper.step(&grads, 0.1).expect("step");
            loss.to_scalar::<f64>().expect("scalar")
        })
        .collect()
}

fn sgd() -> Optimizer {
    Optimizer::Sgd {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.0,
        nesterov: false,
    }
}

/// Freezing everything but `fc` trains exactly as leaving those parameters out of the
/// optimiser (the full backward pass), records nothing for the frozen backbone, and leaves
/// its weights as they were.
#[test]
fn a_frozen_backbone_trains_as_one_the_optimiser_skips() {
    let net_of = || {
        lower(
            "specs/resnet.dlc",
            "resnet18",
            &["size=32", "classes=10"],
            DType::F64,
        )
    };
    // Unfrozen, the optimiser given only `fc`.
    let mut skipped = net_of();
    let fc_only = skipped
        .state
        .trainable()
        .into_iter()
        .filter(|(k, _)| k.starts_with("fc."))
        .collect();
    let mut stepper = Stepper::new(sgd(), &fc_only);
    let want = losses(&mut skipped, &mut stepper, 3);

    let mut frozen_net = net_of();
    let backbone = frozen_net
        .state
        .params
        .keys()
        .filter(|k| !k.starts_with("fc."))
        .count();
    assert_eq!(
        frozen_net.state.freeze("conv1.*")
            + frozen_net.state.freeze("bn1.*")
            + frozen_net.state.freeze("layer*"),
        backbone
    );
    assert_eq!(
        frozen_net.state.trainable().keys().collect::<Vec<_>>(),
        ["fc.bias", "fc.weight"]
    );
    let before = frozen_net.state.params["layer1.0.conv1.weight"]
        .as_tensor()
        .copy()
        .expect("copy");
    let mut stepper = Stepper::new(sgd(), &frozen_net.state.trainable());
    let got = losses(&mut frozen_net, &mut stepper, 3);
    assert_eq!(got, want, "frozen and skipped training differ");
    let after = frozen_net.state.params["layer1.0.conv1.weight"].as_tensor();
    assert_eq!(max_abs_diff(&before, after), 0.0, "a frozen weight moved");

    // Nothing is recorded before `fc`: the pooled features do not track gradients.
    let x = Tensor::randn(0.0, 1.0, (2, 3, 32, 32), &Device::Cpu)
        .and_then(|x| x.to_dtype(DType::F64))
        .expect("input");
    let logits = frozen_net.forward(&[x], true).expect("forward").remove(0);
    let grads = logits
        .sum_all()
        .and_then(|s| s.backward())
        .expect("backward");
    for (k, p) in &frozen_net.state.params {
        assert_eq!(
            grads.get(p.as_tensor()).is_some(),
            k.starts_with("fc."),
            "gradient of {k}"
        );
    }
}

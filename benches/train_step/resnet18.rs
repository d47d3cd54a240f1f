//! torchvision's ResNet-18 written by hand with candle-nn layers, forward in evaluation mode
//! only (the `candle-nn` column of the inference rows). Its weights are plain tensors, as
//! when a candle user loads a checkpoint, so candle records no graph for a backward pass.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, ModuleT, Result, Tensor};
use candle_nn::{BatchNorm, Conv2d, Conv2dConfig, Linear, VarBuilder, VarMap};

fn conv(cin: usize, cout: usize, kernel: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: kernel / 2,
        stride,
        ..Default::default()
    };
    candle_nn::conv2d_no_bias(cin, cout, kernel, cfg, vb)
}

fn bn(c: usize, vb: VarBuilder) -> Result<BatchNorm> {
    candle_nn::batch_norm(c, 1e-5, vb)
}

/// torchvision's `BasicBlock`: two 3×3 convs with batch norm; a 1×1 conv + batch norm
/// `downsample` when the shape changes.
struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    downsample: Option<(Conv2d, BatchNorm)>,
}

impl BasicBlock {
    fn new(cin: usize, planes: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let downsample = if stride != 1 || cin != planes {
            Some((
                conv(cin, planes, 1, stride, vb.pp("downsample.0"))?,
                bn(planes, vb.pp("downsample.1"))?,
            ))
        } else {
            None
        };
        Ok(BasicBlock {
            conv1: conv(cin, planes, 3, stride, vb.pp("conv1"))?,
            bn1: bn(planes, vb.pp("bn1"))?,
            conv2: conv(planes, planes, 3, 1, vb.pp("conv2"))?,
            bn2: bn(planes, vb.pp("bn2"))?,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.bn1.forward_t(&self.conv1.forward(x)?, false)?.relu()?;
        let y = self.bn2.forward_t(&self.conv2.forward(&y)?, false)?;
        let shortcut = match &self.downsample {
            Some((c, b)) => b.forward_t(&c.forward(x)?, false)?,
            None => x.clone(),
        };
        (y + shortcut)?.relu()
    }
}

/// `torchvision.models.resnet18(num_classes=classes)` in evaluation mode.
pub struct CandleResnet18 {
    conv1: Conv2d,
    bn1: BatchNorm,
    blocks: Vec<BasicBlock>,
    fc: Linear,
    /// Trainable parameters (batch norm's running statistics not counted).
    pub params: usize,
}

impl CandleResnet18 {
    /// Creates the weights with candle-nn's initialisers, then rebuilds the net on them as
    /// plain tensors (no variables: nothing is recorded for a backward pass).
    pub fn new(classes: usize) -> Result<Self> {
        let varmap = VarMap::new();
        Self::build(
            classes,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )?;
        let weights: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        let params = weights
            .iter()
            .filter(|(k, _)| !k.ends_with(".running_mean") && !k.ends_with(".running_var"))
            .map(|(_, t)| t.elem_count())
            .sum();
        let mut net = Self::build(
            classes,
            VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
        )?;
        net.params = params;
        Ok(net)
    }

    fn build(classes: usize, vb: VarBuilder) -> Result<Self> {
        let mut blocks = Vec::new();
        let mut cin = 64;
        for (i, planes) in [64, 128, 256, 512].into_iter().enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
            let layer = vb.pp(format!("layer{}", i + 1));
            blocks.push(BasicBlock::new(cin, planes, stride, layer.pp("0"))?);
            blocks.push(BasicBlock::new(planes, planes, 1, layer.pp("1"))?);
            cin = planes;
        }
        Ok(CandleResnet18 {
            conv1: conv(3, 64, 7, 2, vb.pp("conv1"))?,
            bn1: bn(64, vb.pp("bn1"))?,
            blocks,
            fc: candle_nn::linear(512, classes, vb.pp("fc"))?,
            params: 0,
        })
    }

    /// Logits `[N, classes]` of images `[N, 3, H, W]`, batch norm on running statistics.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.bn1.forward_t(&self.conv1.forward(x)?, false)?.relu()?;
        // torchvision: MaxPool2d(3, stride 2, padding 1). Candle's pooling has no padding; its
        // input is ≥ 0 after the ReLU, so zero padding gives the same maxima.
        let mut x = x
            .pad_with_zeros(2, 1, 1)?
            .pad_with_zeros(3, 1, 1)?
            .max_pool2d_with_stride(3, 2)?;
        for b in &self.blocks {
            x = b.forward(&x)?;
        }
        let x = x.mean(3)?.mean(2)?;
        self.fc.forward(&x)
    }
}

//! torchvision's MobileNetV2 written by hand with candle-nn layers (the `candle-nn` column of
//! the MobileNetV2 row): depthwise convolutions are `candle_nn::conv2d` with `groups` equal
//! to the channels, which candle runs as one convolution per group.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{Activation, BatchNorm, Conv2d, Conv2dConfig, Linear, VarBuilder};

/// torchvision's `Conv2dNormActivation`: bias-free conv ("same" padding) at `<prefix>.0`,
/// batch norm at `<prefix>.1`, ReLU6.
struct ConvBnAct {
    conv: Conv2d,
    bn: BatchNorm,
}

impl ConvBnAct {
    fn new(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: (kernel - 1) / 2,
            stride,
            groups,
            ..Default::default()
        };
        Ok(ConvBnAct {
            conv: candle_nn::conv2d_no_bias(cin, cout, kernel, cfg, vb.pp("0"))?,
            bn: candle_nn::batch_norm(cout, 1e-5, vb.pp("1"))?,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Activation::Relu6.forward(&self.bn.forward_t(&self.conv.forward(x)?, train)?)
    }
}

/// Expand with a 1×1 conv (unless the ratio is 1), filter with a depthwise 3×3 carrying the
/// stride, project linearly with a 1×1 conv and batch norm; the input is added back when the
/// shape is kept.
struct InvertedResidual {
    expand: Option<ConvBnAct>,
    depthwise: ConvBnAct,
    project: Conv2d,
    project_bn: BatchNorm,
    skip: bool,
}

impl InvertedResidual {
    fn new(cin: usize, cout: usize, stride: usize, ratio: usize, vb: VarBuilder) -> Result<Self> {
        let hidden = cin * ratio;
        let vb = vb.pp("conv");
        // torchvision numbers the layers of `conv` in order: [expand,] depthwise, project, bn.
        let expand = match ratio {
            1 => None,
            _ => Some(ConvBnAct::new(cin, hidden, 1, 1, 1, vb.pp("0"))?),
        };
        let i = expand.iter().count();
        let depthwise = ConvBnAct::new(hidden, hidden, 3, stride, hidden, vb.pp(i))?;
        let project = candle_nn::conv2d_no_bias(hidden, cout, 1, Default::default(), vb.pp(i + 1))?;
        let project_bn = candle_nn::batch_norm(cout, 1e-5, vb.pp(i + 2))?;
        Ok(InvertedResidual {
            expand,
            depthwise,
            project,
            project_bn,
            skip: stride == 1 && cin == cout,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = match &self.expand {
            Some(e) => e.forward(x, train)?,
            None => x.clone(),
        };
        let y = self.depthwise.forward(&y, train)?;
        let y = self
            .project_bn
            .forward_t(&self.project.forward(&y)?, train)?;
        if self.skip { y + x } else { Ok(y) }
    }
}

/// `torchvision.models.mobilenet_v2(num_classes=classes)`, names as its state dict.
pub struct CandleMobilenetV2 {
    stem: ConvBnAct,
    blocks: Vec<InvertedResidual>,
    head: ConvBnAct,
    classifier: Linear,
}

/// Dropout before the classifier, torchvision's default.
const DROPOUT: f32 = 0.2;

impl CandleMobilenetV2 {
    /// The net for 3-channel images and `classes` outputs.
    pub fn new(classes: usize, vb: VarBuilder) -> Result<Self> {
        let features = vb.pp("features");
        let stem = ConvBnAct::new(3, 32, 3, 2, 1, features.pp("0"))?;
        let mut blocks = Vec::new();
        let mut cin = 32;
        // (expansion t, channels c, repeats n, first stride s), the paper's Table 2.
        for (t, c, n, s) in [
            (1, 16, 1, 1),
            (6, 24, 2, 2),
            (6, 32, 3, 2),
            (6, 64, 4, 2),
            (6, 96, 3, 1),
            (6, 160, 3, 2),
            (6, 320, 1, 1),
        ] {
            for r in 0..n {
                let stride = if r == 0 { s } else { 1 };
                let vb = features.pp(blocks.len() + 1);
                blocks.push(InvertedResidual::new(cin, c, stride, t, vb)?);
                cin = c;
            }
        }
        let head = ConvBnAct::new(cin, 1280, 1, 1, 1, features.pp(blocks.len() + 1))?;
        let classifier = candle_nn::linear(1280, classes, vb.pp("classifier.1"))?;
        Ok(CandleMobilenetV2 {
            stem,
            blocks,
            head,
            classifier,
        })
    }

    /// Logits `[N, classes]` of images `[N, 3, H, W]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = self.stem.forward(x, train)?;
        for b in &self.blocks {
            x = b.forward(&x, train)?;
        }
        let x = self.head.forward(&x, train)?;
        let x = x.mean_keepdim(3)?.mean_keepdim(2)?.flatten_from(1)?;
        let x = if train {
            candle_nn::ops::dropout(&x, DROPOUT)?
        } else {
            x
        };
        self.classifier.forward(&x)
    }
}

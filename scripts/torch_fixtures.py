#!/usr/bin/env python3
"""PyTorch reference fixtures for the candle lowering of dlc specs.

What it makes
-------------
Small safetensors files in ``tests/fixtures/torch/`` that record what PyTorch computes, so
that Rust tests can check the lowered networks (forward and backward) without PyTorch; CI
never has it. Every number is float64 unless noted, every random draw comes from a fixed
seed, and running the script twice writes byte-identical files.

* ``op_<case>.safetensors``: one op per file. ``input`` is a small random tensor (batch 2,
  a few channels, mostly 7x9 spatial so odd sizes are exercised); the op runs forward in
  the file's mode and backward of ``sum(output * grad_output)``.
* ``lenet.safetensors``: d2l's LeNet exactly as ``specs/lenet.dlc`` model ``lenet``
  (``nn.Sequential`` indices as keys: ``0``, ``3``, ``7``, ``9``, ``11``), input
  ``[4, 1, 28, 28]``.
* ``basic_block.safetensors``: torchvision's ``resnet.BasicBlock`` with a projection
  shortcut and stride 2, keys prefixed ``block.``; eval-mode and train-mode outputs,
  train-mode gradients and the running statistics after the train-mode step. Its dlc
  spec is ``tests/fixtures/torch/basic_block.dlc`` (hand-written, not made here).
* ``op_embedding``, ``op_one_hot``: lookups on int64 token ids (``input``); no input
  gradient.
* ``seq_<case>.safetensors``: ``nn.RNN``/``nn.GRU``/``nn.LSTM`` (``batch_first=True``) as the
  node ``layer``; states in dlc's batch-first layout ``[N, layers·D, H]``: ``initial.state``,
  ``initial.cell`` (when given), ``output.state``, ``output.cell``, with their
  ``grad_output.*`` and ``grad.initial.*``.
* ``seq2seq.safetensors``, ``seq2seq_attention.safetensors``: d2l's GRU encoder-decoder and
  its Bahdanau-attention variant (re-written here from d2l 0.17's code), small sizes, eval
  mode, teacher forcing on ``input.src`` and ``input.tgt``; keys are d2l's state-dict keys.
  The script also asserts PyTorch's parameter counts of the seven shipped sequence models.
* ``tests/reference/state_dicts/<model>.tsv``: the state-dict keys and shapes (no values) of
  models whose weights are too large to ship: torchvision's ``fcn_resnet50`` (with and
  without the aux head) and ``fcn_resnet101``, and d2l's FCN. ``tests/lowering.rs`` checks
  that the lowered spec has exactly these names and shapes.
* ``attn_<case>.safetensors``: attention modules (``nn.MultiheadAttention`` self, cross,
  causal, with key padding; d2l's ``MultiHeadAttention`` without bias; torchvision's ViT
  ``EncoderBlock``; ``nn.TransformerDecoderLayer``), width 8 and 2 heads, forward and
  backward. Each names a model of ``tests/fixtures/torch/attention.dlc`` (hand-written) in
  its ``spec`` and ``model`` metadata; the model's inputs are ``input.<name>`` (token ids
  as int64) and their gradients ``grad.input.<name>``.
* ``attn_vit``, ``attn_d2l_vit``, ``attn_torch_transformer``: whole models at a small width
  (torchvision's ``VisionTransformer``, d2l's ``ViT``, ``nn.Transformer``) against the
  shipped specs ``specs/vit.dlc`` and ``specs/transformer.dlc``, whose parameters are set
  to the same sizes by the ``set`` metadata (a JSON list of ``name=value``, as ``--set``).

Key conventions (every file)
----------------------------
* ``input``: the input; ``output``: the forward result; ``grad_output``: the fixed upstream
  gradient of the output; ``grad.input``: the gradient of the input.
* Parameters use dlc's node names plus ``.weight``, ``.bias``, ``.running_mean``,
  ``.running_var`` (per-op files name the node ``layer``); ``grad.<param name>`` is a
  parameter's gradient. ``num_batches_tracked`` is never stored.
* ``after.<name>.running_mean`` / ``after.<name>.running_var``: batch-norm running
  statistics after one train-mode forward (PyTorch: momentum 0.1, running variance
  updated with the unbiased batch variance).
* The safetensors metadata always holds ``description`` and ``torch`` (the version); per-op
  files add ``config`` (JSON: ``{"op": <dlc op>, <dlc argument>: <value>, ...}``, argument
  names as in ``src/ops/*.rs``) and ``mode`` (``train`` or ``eval``); the model files add
  ``spec``, ``model`` and ``mode``/``config`` as relevant.

How to run
----------
From the repository root, with PyTorch, torchvision, safetensors and numpy installed in a
virtualenv outside the repository::

    python3 -m venv /work/venv
    /work/venv/bin/pip install torch torchvision safetensors numpy
    /work/venv/bin/python scripts/torch_fixtures.py

It runs on the CPU in a few seconds and overwrites the files it makes.
"""

import json
import math
import struct
import sys
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "torch"

DTYPE = torch.float64

# The basic-block fixture's channels. The brief asked for BasicBlock(64, 128) on
# [2, 64, 8, 8]; with float64 parameters and gradients that file alone would be ~3.9 MB,
# so the fixture uses 8 -> 16 channels (same structure, same names, ~80 KB).
# tests/fixtures/torch/basic_block.dlc takes them as model parameters
# (`--set inplanes=64 --set planes=128` gives the larger block).
BLOCK_INPLANES = 8
BLOCK_PLANES = 16
BLOCK_HW = 8
BLOCK_BATCH = 2


def seed_of(name: str) -> int:
    """A fixed seed per fixture, independent of the order in which fixtures are made."""
    return zlib.crc32(name.encode())


def gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed_of(name))


def randn(g: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=DTYPE) * scale


def uniform(g: torch.Generator, lo: float, hi: float, *shape) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=DTYPE)


def meta(description: str, **extra) -> dict:
    m = {"description": description, "torch": torch.__version__}
    for k, v in extra.items():
        m[k] = v if isinstance(v, str) else json.dumps(v)
    return m


DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.int64: "I64"}


def write(name: str, tensors: dict, metadata: dict) -> None:
    """Writes a safetensors file byte-for-byte reproducibly.

    `safetensors.torch.save_file` keeps the metadata in a hash map, so its key order (and
    the file's bytes) change from run to run; here the header is built by hand with every
    key sorted, tensors laid out in name order, and the header padded with spaces to a
    multiple of 8 bytes, as the format asks. The result is checked by loading it back.
    """
    header = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        data = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        header[key] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    head += b" " * (-len(head) % 8)
    path = OUT / f"{name}.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    back = load_file(str(path))
    assert sorted(back) == sorted(tensors), name
    for key, t in tensors.items():
        assert torch.equal(back[key], t.detach().cpu()), (name, key)


def randomize_bn(bn: nn.modules.batchnorm._BatchNorm, g: torch.Generator) -> None:
    """Non-default affine parameters and running statistics."""
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(uniform(g, 0.5, 1.5, c))
        bn.bias.copy_(randn(g, c, scale=0.5))
        bn.running_mean.copy_(randn(g, c, scale=0.5))
        bn.running_var.copy_(uniform(g, 0.5, 2.0, c))


def buffers_of(module: nn.Module, prefix: str) -> dict:
    return {
        f"{prefix}{k}": v
        for k, v in module.state_dict().items()
        if k.endswith("running_mean") or k.endswith("running_var")
    }


def run_forward_backward(fn, module: nn.Module | None, x: torch.Tensor, grad_output, prefix: str):
    """Forward `fn(x)`, backward of sum(output * grad_output); returns the tensor dict."""
    x = x.clone().requires_grad_(True)
    out = fn(x)
    if grad_output is None:
        grad_output = randn(gen("grad_output"), *out.shape)
    out.backward(grad_output)
    t = {"input": x, "output": out, "grad_output": grad_output, "grad.input": x.grad}
    if module is not None:
        for k, p in module.named_parameters():
            t[f"{prefix}{k}"] = p
            t[f"grad.{prefix}{k}"] = p.grad
    return t


# ---------------------------------------------------------------------------------------
# Per-op fixtures
# ---------------------------------------------------------------------------------------


def op_fixture(name, config, description, x, fn=None, module=None, mode="train",
               before=None, grad_output=None):
    """One per-op file. `module` (if any) is the node `layer`; its params are stored."""
    g = gen(name + "/grad_output")
    if module is not None:
        module.train(mode == "train")
        fn = module
    # Buffers as they were before the forward (bn): what the op was given.
    state = buffers_of(module, "layer.") if module is not None else {}
    state = {k: v.clone() for k, v in state.items()}
    x = x.clone().requires_grad_(True)
    out = fn(x)
    if grad_output is None:
        grad_output = randn(g, *out.shape)
    out.backward(grad_output)
    t = {"input": x, "output": out, "grad_output": grad_output, "grad.input": x.grad}
    t.update(state)
    if module is not None:
        for k, p in module.named_parameters():
            t[f"layer.{k}"] = p
            t[f"grad.layer.{k}"] = p.grad
        if mode == "train" and state:
            for k, v in buffers_of(module, "after.layer.").items():
                t[k] = v
    write(name, t, meta(description, config=config, mode=mode))


def conv_case(name, cin, out, kernel, stride=(1, 1), pad=(0, 0), dilation=(1, 1), groups=1,
              bias=True, hw=(7, 9), note=""):
    g = gen(name)
    x = randn(g, 2, cin, *hw)
    conv = nn.Conv2d(cin, out, kernel, stride=stride, padding=pad, dilation=dilation,
                     groups=groups, bias=bias).to(DTYPE)
    fan_in = (cin // groups) * kernel[0] * kernel[1]
    with torch.no_grad():
        conv.weight.copy_(randn(g, *conv.weight.shape, scale=1 / math.sqrt(fan_in)))
        if bias:
            conv.bias.copy_(randn(g, out, scale=0.5))
    config = {"op": "conv", "out": out, "kernel": list(kernel), "stride": list(stride),
              "pad": list(pad), "dilation": list(dilation), "groups": groups, "bias": bias}
    desc = (f"nn.Conv2d({cin}, {out}, kernel_size={tuple(kernel)}, stride={tuple(stride)}, "
            f"padding={tuple(pad)}, dilation={tuple(dilation)}, groups={groups}, bias={bias}) "
            f"on input [2, {cin}, {hw[0]}, {hw[1]}]; backward of sum(output * grad_output)"
            + (f". {note}" if note else ""))
    op_fixture(name, config, desc, x, module=conv)


def conv_transpose_case(name, cin, out, kernel, stride=(1, 1), pad=(0, 0), output_padding=(0, 0),
                        groups=1, dilation=(1, 1), bias=True, hw=(7, 9), note=""):
    g = gen(name)
    x = randn(g, 2, cin, *hw)
    conv = nn.ConvTranspose2d(cin, out, kernel, stride=stride, padding=pad,
                              output_padding=output_padding, groups=groups, bias=bias,
                              dilation=dilation).to(DTYPE)
    fan_in = (out // groups) * kernel[0] * kernel[1]
    with torch.no_grad():
        conv.weight.copy_(randn(g, *conv.weight.shape, scale=1 / math.sqrt(fan_in)))
        if bias:
            conv.bias.copy_(randn(g, out, scale=0.5))
    config = {"op": "conv_transpose", "out": out, "kernel": list(kernel), "stride": list(stride),
              "pad": list(pad), "output_padding": list(output_padding), "groups": groups,
              "dilation": list(dilation), "bias": bias}
    desc = (f"nn.ConvTranspose2d({cin}, {out}, kernel_size={tuple(kernel)}, stride={tuple(stride)}, "
            f"padding={tuple(pad)}, output_padding={tuple(output_padding)}, groups={groups}, "
            f"bias={bias}, dilation={tuple(dilation)}) on input [2, {cin}, {hw[0]}, {hw[1]}]; "
            f"weight [{cin}, {out // groups}, {kernel[0]}, {kernel[1]}]; backward of "
            f"sum(output * grad_output)" + (f". {note}" if note else ""))
    op_fixture(name, config, desc, x, module=conv)


def upsample_case(name, mode, factor=None, size=None, align_corners=None, hw=(7, 9), note=""):
    g = gen(name)
    x = randn(g, 2, 3, *hw)
    config = {"op": "upsample", "mode": mode}
    kwargs = {"mode": mode}
    if factor is not None:
        config["factor"] = factor
        kwargs["scale_factor"] = factor
    if size is not None:
        config["size"] = list(size)
        kwargs["size"] = tuple(size)
    if align_corners is not None:
        config["align_corners"] = align_corners
        kwargs["align_corners"] = align_corners
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    desc = (f"F.interpolate(input, {args}) on input [2, 3, {hw[0]}, {hw[1]}]; backward of "
            f"sum(output * grad_output)" + (f". {note}" if note else ""))
    op_fixture(name, config, desc, x, fn=lambda t: F.interpolate(t, **kwargs))


def pool_case(name, kind, kernel, stride, pad=(0, 0), ceil=False, count_pad=True, hw=(7, 9),
              note=""):
    g = gen(name)
    x = randn(g, 2, 3, *hw)
    config = {"op": kind, "kernel": list(kernel), "stride": list(stride), "pad": list(pad),
              "ceil": ceil}
    if kind == "maxpool":
        fn = nn.MaxPool2d(kernel, stride=stride, padding=pad, ceil_mode=ceil)
        desc = (f"nn.MaxPool2d({tuple(kernel)}, stride={tuple(stride)}, padding={tuple(pad)}, "
                f"ceil_mode={ceil})")
    else:
        config["count_pad"] = count_pad
        fn = nn.AvgPool2d(kernel, stride=stride, padding=pad, ceil_mode=ceil,
                          count_include_pad=count_pad)
        desc = (f"nn.AvgPool2d({tuple(kernel)}, stride={tuple(stride)}, padding={tuple(pad)}, "
                f"ceil_mode={ceil}, count_include_pad={count_pad})")
    desc += (f" on input [2, 3, {hw[0]}, {hw[1]}]; backward of sum(output * grad_output)"
             + (f". {note}" if note else ""))
    op_fixture(name, config, desc, x, fn=fn)


def make_ops():
    # --- conv ---
    conv_case("op_conv_k3s2p1", 3, 4, (3, 3), stride=(2, 2), pad=(1, 1))
    conv_case("op_conv_k3s3p1", 3, 4, (3, 3), stride=(3, 3), pad=(1, 1),
              note="Output 3x3: along the width (9 + 2 padding, stride 3) the windows cover "
                   "padded columns 0..8, so the last input column is never read and its input "
                   "gradient is zero (the case where candle's conv2d backward breaks)")
    conv_case("op_conv_k1g2", 4, 6, (1, 1), groups=2)
    conv_case("op_conv_dil2", 3, 4, (3, 3), pad=(1, 1), dilation=(2, 2))
    conv_case("op_conv_d2p2", 3, 4, (3, 3), pad=(2, 2), dilation=(2, 2), bias=False,
              note="torchvision's dilated ResNet 3x3 (padding = dilation = 2, FCN layer3)")
    conv_case("op_conv_d4p4", 3, 4, (3, 3), pad=(4, 4), dilation=(4, 4), bias=False,
              hw=(9, 11),
              note="torchvision's dilated ResNet 3x3 (padding = dilation = 4, FCN layer4)")
    conv_case("op_conv_nobias", 3, 4, (3, 3), pad=(1, 1), bias=False)
    conv_case("op_conv_k3x5p1x2", 3, 4, (3, 5), pad=(1, 2),
              note="Non-square kernel (3, 5), padding (1, 2)")

    # --- conv_transpose ---
    conv_transpose_case("op_conv_transpose_s2op1g2", 4, 6, (3, 3), stride=(2, 2), pad=(1, 1),
                        output_padding=(1, 1), groups=2,
                        note="Stride 2 with output_padding 1 doubles 7x9 to 14x18; two groups")
    conv_transpose_case("op_conv_transpose_k4s2p1", 3, 4, (4, 4), stride=(2, 2), pad=(1, 1),
                        bias=False, note="The usual 2x upsampling layer (DCGAN, U-Net variants)")
    conv_transpose_case("op_conv_transpose_d2op1", 3, 2, (3, 3), pad=(2, 2),
                        output_padding=(1, 1), dilation=(2, 2),
                        note="Output padding 1 with stride 1, allowed because the dilation is 2: "
                             "the extra row and column hold real values")
    conv_transpose_case("op_conv_transpose_k3x5", 2, 3, (3, 5), stride=(3, 3), pad=(1, 2),
                        output_padding=(2, 0), hw=(4, 5),
                        note="Non-square kernel and padding; output padding 2 along H exceeds "
                             "the padding 1, so the last row is zero before the bias")
    conv_transpose_case("op_conv_transpose_fcn", 3, 3, (8, 8), stride=(4, 4), pad=(2, 2),
                        hw=(2, 3),
                        note="d2l's FCN upsampling (kernel 2s, stride s, padding s/2) scaled "
                             "down from s = 32 to s = 4: 2x3 -> 8x12")
    conv_transpose_case("op_conv_transpose_d2l_head", 2, 2, (64, 64), stride=(32, 32),
                        pad=(16, 16), hw=(2, 3),
                        note="d2l's FCN transpose_conv geometry exactly (kernel 64, stride 32, "
                             "padding 16: 2x3 -> 64x96, as 10x15 -> 320x480), with 2 channels "
                             "instead of 21 to keep the file small")

    # --- upsample ---
    upsample_case("op_upsample_nearest2", "nearest", factor=2)
    upsample_case("op_upsample_nearest_size", "nearest", size=(10, 20),
                  note="Non-integer ratios 7 -> 10 and 9 -> 20: source floor(dst * in/out), "
                       "computed by PyTorch in float32")
    upsample_case("op_upsample_bilinear3", "bilinear", factor=3,
                  note="align_corners=False (half-pixel centres), scale 1/3 from the factor")
    upsample_case("op_upsample_bilinear_size", "bilinear", size=(16, 20), align_corners=False,
                  note="Output size given, as torchvision's FCN does (to the input's size)")
    upsample_case("op_upsample_bilinear_align", "bilinear", size=(16, 20), align_corners=True)
    upsample_case("op_upsample_bilinear_down", "bilinear", size=(4, 5),
                  note="Downsampling 7x9 -> 4x5: each output blends two source pixels")

    # --- pad, crop ---
    g = gen("op_pad")
    op_fixture("op_pad", {"op": "pad", "sides": [1, 2, 3, 0]},
               "F.pad(input, (3, 0, 1, 2)) (left 3, right 0, top 1, bottom 2; dlc's order is "
               "top, bottom, left, right) on input [2, 3, 7, 9] -> [2, 3, 10, 12]; backward of "
               "sum(output * grad_output)",
               randn(g, 2, 3, 7, 9), fn=lambda t: F.pad(t, (3, 0, 1, 2)))
    g = gen("op_crop_offset")
    op_fixture("op_crop_offset", {"op": "crop", "size": [4, 5], "offset": [2, 1]},
               "input[:, :, 2:6, 1:6] on input [2, 3, 7, 9]; backward of "
               "sum(output * grad_output) (zero outside the window)",
               randn(g, 2, 3, 7, 9), fn=lambda t: t[:, :, 2:6, 1:6])
    g = gen("op_crop_centre")
    op_fixture("op_crop_centre", {"op": "crop", "size": [4, 4]},
               "Centred crop to 4x4 of [2, 3, 7, 9]: rows (7 - 4) // 2 = 1 .. 5, columns "
               "(9 - 4) // 2 = 2 .. 6, i.e. input[:, :, 1:5, 2:6]; backward of "
               "sum(output * grad_output)",
               randn(g, 2, 3, 7, 9), fn=lambda t: t[:, :, 1:5, 2:6])

    # --- linear ---
    g = gen("op_linear")
    x = randn(g, 2, 6)
    lin = nn.Linear(6, 4).to(DTYPE)
    with torch.no_grad():
        lin.weight.copy_(randn(g, 4, 6, scale=1 / math.sqrt(6)))
        lin.bias.copy_(randn(g, 4, scale=0.5))
    op_fixture("op_linear", {"op": "linear", "out": 4, "bias": True},
               "nn.Linear(6, 4) on input [2, 6]; backward of sum(output * grad_output)",
               x, module=lin)

    # --- bn ---
    for name, mode, shape in [
        ("op_bn_train", "train", (2, 3, 7, 9)),
        ("op_bn_eval", "eval", (2, 3, 7, 9)),
        ("op_bn1d_train", "train", (6, 5)),
    ]:
        g = gen(name)
        x = randn(g, *shape, scale=1.5) + 0.3
        c = shape[1]
        bn = (nn.BatchNorm2d(c) if len(shape) == 4 else nn.BatchNorm1d(c)).to(DTYPE)
        randomize_bn(bn, g)
        kind = "BatchNorm2d" if len(shape) == 4 else "BatchNorm1d"
        if mode == "train":
            desc = (f"nn.{kind}({c}, eps=1e-5, momentum=0.1) in train mode on input "
                    f"{list(shape)}: normalises with the batch statistics (biased variance); "
                    "layer.running_* are the statistics before the step, after.layer.running_* "
                    "after it (running_var updated with the unbiased batch variance); backward "
                    "of sum(output * grad_output) through the batch statistics")
        else:
            desc = (f"nn.{kind}({c}, eps=1e-5, momentum=0.1) in eval mode on input "
                    f"{list(shape)}: normalises with layer.running_mean/var (not updated); "
                    "backward of sum(output * grad_output)")
        op_fixture(name, {"op": "bn", "eps": 1e-5, "momentum": 0.1}, desc, x, module=bn,
                   mode=mode)

    # --- layernorm ---
    g = gen("op_layernorm")
    x = randn(g, 2, 5, 6, scale=1.5) + 0.3
    ln = nn.LayerNorm(6, eps=1e-5).to(DTYPE)
    with torch.no_grad():
        ln.weight.copy_(uniform(g, 0.5, 1.5, 6))
        ln.bias.copy_(randn(g, 6, scale=0.5))
    op_fixture("op_layernorm", {"op": "layernorm", "eps": 1e-5},
               "nn.LayerNorm(6, eps=1e-5) on input [2, 5, 6]: normalises over the last axis "
               "with the biased variance, then weight and bias [6]; backward of "
               "sum(output * grad_output)",
               x, module=ln)

    # --- pools ---
    pool_case("op_maxpool_k2s2", "maxpool", (2, 2), (2, 2),
              note="Floor mode drops the last row and column (their gradient is zero)")
    pool_case("op_maxpool_k3s2p1", "maxpool", (3, 3), (2, 2), pad=(1, 1),
              note="Padding counts as -inf")
    pool_case("op_maxpool_k3s2_ceil", "maxpool", (3, 3), (2, 2), ceil=True, hw=(8, 10),
              note="Input 8x10 so that ceil mode adds a partial last window in both axes "
                   "(output 4x5; floor would give 3x4)")
    pool_case("op_avgpool_k2s2", "avgpool", (2, 2), (2, 2))
    pool_case("op_avgpool_k3s1p1", "avgpool", (3, 3), (1, 1), pad=(1, 1), count_pad=True,
              note="count_include_pad=True: every window divides by 9")
    pool_case("op_avgpool_k3s1p1_nocount", "avgpool", (3, 3), (1, 1), pad=(1, 1),
              count_pad=False,
              note="count_include_pad=False: border windows divide by the number of real "
                   "input cells")
    pool_case("op_avgpool_k3s2_ceil", "avgpool", (3, 3), (2, 2), ceil=True, hw=(8, 10),
              note="Input 8x10 so that ceil mode adds a partial last window (output 4x5); "
                   "the partial window divides by the cells inside the input")
    pool_case("op_avgpool_k3s2p1_ceil", "avgpool", (3, 3), (2, 2), pad=(1, 1), ceil=True,
              count_pad=True, hw=(8, 10),
              note="Extra case: ceil mode with padding and count_include_pad=True (output "
                   "5x6); the last window overhangs the input and its padding, and PyTorch "
                   "divides it by the cells inside input+padding (here 2 rows, not 3)")

    # --- adaptive average pooling ---
    g = gen("op_adaptive_avgpool_6x6")
    op_fixture("op_adaptive_avgpool_6x6", {"op": "adaptive_avgpool", "size": [6, 6]},
               "nn.AdaptiveAvgPool2d((6, 6)) on input [2, 3, 13, 13]: window i spans "
               "[floor(i*13/6), ceil((i+1)*13/6)), so windows have sizes 3 and overlap; "
               "backward of sum(output * grad_output)",
               randn(g, 2, 3, 13, 13), fn=nn.AdaptiveAvgPool2d((6, 6)))
    g = gen("op_adaptive_avgpool_1x1")
    op_fixture("op_adaptive_avgpool_1x1", {"op": "adaptive_avgpool", "size": [1, 1]},
               "nn.AdaptiveAvgPool2d((1, 1)) on input [2, 3, 7, 9] (the same as dlc's "
               "global_avgpool); backward of sum(output * grad_output)",
               randn(g, 2, 3, 7, 9), fn=nn.AdaptiveAvgPool2d((1, 1)))

    # --- lrn ---
    g = gen("op_lrn")
    op_fixture("op_lrn", {"op": "lrn", "size": 5, "alpha": 1e-4, "beta": 0.75, "k": 2.0},
               "nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0) on input [2, 7, 7, 9]: "
               "b_c = a_c / (k + alpha/size * sum of a^2 over channels c-2..c+2 that exist)^beta "
               "(PyTorch divides alpha by size); backward of sum(output * grad_output)",
               randn(g, 2, 7, 7, 9, scale=3.0), fn=nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0))
    g = gen("op_lrn_strong")
    op_fixture("op_lrn_strong", {"op": "lrn", "size": 4, "alpha": 1.0, "beta": 0.75, "k": 1.0},
               "Extra case with a large alpha so the neighbour sum dominates, and an even size: "
               "nn.LocalResponseNorm(4, alpha=1.0, beta=0.75, k=1.0) on input [2, 7, 7, 9]; "
               "the window for channel c is c-2..c+1 (PyTorch pads size//2 channels before and "
               "(size-1)//2 after) and the sum is divided by size; backward of "
               "sum(output * grad_output)",
               randn(g, 2, 7, 7, 9), fn=nn.LocalResponseNorm(4, 1.0, 0.75, 1.0))

    # --- activations ---
    acts = [
        ("relu", nn.ReLU(), "nn.ReLU()"),
        ("relu6", nn.ReLU6(), "nn.ReLU6()"),
        ("sigmoid", nn.Sigmoid(), "nn.Sigmoid()"),
        ("tanh", nn.Tanh(), "nn.Tanh()"),
        ("gelu", nn.GELU(approximate="none"), "nn.GELU(approximate='none') (exact, with erf)"),
        ("silu", nn.SiLU(), "nn.SiLU()"),
        ("hardswish", nn.Hardswish(), "nn.Hardswish()"),
    ]
    for op, fn, desc in acts:
        name = f"op_{op}"
        g = gen(name)
        op_fixture(name, {"op": op},
                   f"{desc} on input [2, 3, 7, 9] drawn from N(0, 4^2) (wide enough to reach the "
                   "kinks of relu6 at 0 and 6 and of hardswish at -3 and 3); backward of sum(output * grad_output)",
                   randn(g, 2, 3, 7, 9, scale=4.0), fn=fn)

    # --- softmax, flatten ---
    g = gen("op_softmax")
    op_fixture("op_softmax", {"op": "softmax", "dim": 1},
               "torch.softmax(input, dim=1) on input [2, 5, 7, 9]; backward of "
               "sum(output * grad_output)",
               randn(g, 2, 5, 7, 9, scale=2.0), fn=lambda x: torch.softmax(x, dim=1))
    g = gen("op_flatten")
    op_fixture("op_flatten", {"op": "flatten", "start": 1},
               "nn.Flatten() (start_dim=1) on input [2, 3, 7, 9] -> [2, 189]; backward of "
               "sum(output * grad_output)",
               randn(g, 2, 3, 7, 9), fn=nn.Flatten())

    # --- cross-entropy loss ---
    name = "op_cross_entropy"
    g = gen(name)
    logits = randn(g, 4, 10, scale=2.0).requires_grad_(True)
    target = torch.randint(0, 10, (4,), generator=g, dtype=torch.int64)
    loss = F.cross_entropy(logits, target)  # reduction="mean"
    grad_output = torch.tensor(1.0, dtype=DTYPE)
    loss.backward(grad_output)
    write(name, {"input": logits, "target": target, "output": loss, "grad_output": grad_output,
                 "grad.input": logits.grad},
          meta("F.cross_entropy(input, target) with reduction='mean': input are logits "
               "[4, 10] (float64), target class indices [4] (int64); output is the scalar "
               "mean loss (shape []), grad_output the scalar 1.0, grad.input d loss / d logits",
               config={"op": "cross_entropy", "reduction": "mean"}, mode="train"))


# ---------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------


def make_lenet():
    torch.manual_seed(seed_of("lenet"))
    net = nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.Sigmoid(),
        nn.Linear(84, 10),
    ).double()
    g = gen("lenet/data")
    x = randn(g, 4, 1, 28, 28)
    grad_output = randn(g, 4, 10)
    t = run_forward_backward(net, net, x, grad_output, "")
    write("lenet", t, meta(
        "d2l's LeNet (nn.Sequential: Conv2d(1,6,5,padding=2), Sigmoid, AvgPool2d(2,2), "
        "Conv2d(6,16,5), Sigmoid, AvgPool2d(2,2), Flatten, Linear(400,120), Sigmoid, "
        "Linear(120,84), Sigmoid, Linear(84,10)) in float64 with PyTorch's default init; "
        "keys are the Sequential indices, which are dlc's node names; input [4, 1, 28, 28]; "
        "backward of sum(output * grad_output)",
        spec="specs/lenet.dlc", model="lenet", mode="train"))


def make_basic_block():
    torch.manual_seed(seed_of("basic_block"))
    cin, planes = BLOCK_INPLANES, BLOCK_PLANES
    block = BasicBlock(cin, planes, stride=2,
                       downsample=nn.Sequential(conv1x1(cin, planes, stride=2),
                                                nn.BatchNorm2d(planes))).double()
    g = gen("basic_block/bn")
    for bn in (block.bn1, block.bn2, block.downsample[1]):
        randomize_bn(bn, g)
    g = gen("basic_block/data")
    x = randn(g, BLOCK_BATCH, cin, BLOCK_HW, BLOCK_HW)
    ho = BLOCK_HW // 2
    grad_output = randn(g, BLOCK_BATCH, planes, ho, ho)

    t = {}
    for k, v in block.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        t[f"block.{k}"] = v.clone()

    # Eval mode: running statistics used, not changed.
    block.eval()
    with torch.no_grad():
        out_eval = block(x)

    # Train mode: one forward with batch statistics, then backward.
    block.train()
    xg = x.clone().requires_grad_(True)
    out_train = block(xg)
    out_train.backward(grad_output)

    t["input"] = x
    t["output.eval"] = out_eval
    t["output.train"] = out_train
    t["grad_output"] = grad_output
    t["grad.input"] = xg.grad
    for k, p in block.named_parameters():
        t[f"grad.block.{k}"] = p.grad
    for k, v in buffers_of(block, "after.block.").items():
        t[k] = v

    trainable = sum(p.numel() for p in block.parameters() if p.requires_grad)
    write("basic_block", t, meta(
        f"torchvision.models.resnet.BasicBlock({cin}, {planes}, stride=2, "
        f"downsample=nn.Sequential(conv1x1({cin}, {planes}, stride=2), "
        f"BatchNorm2d({planes}))) in float64 with random BN weights, biases and running "
        f"statistics; keys are the state-dict keys prefixed with 'block.' (dlc's node names); "
        f"input [{BLOCK_BATCH}, {cin}, {BLOCK_HW}, {BLOCK_HW}]; output.eval from model.eval() "
        f"with block.*.running_* (unchanged); output.train from one model.train() forward, "
        f"after.block.*.running_* the statistics after it (momentum 0.1, unbiased variance); "
        f"grad.* from backward of sum(output.train * grad_output)",
        spec="tests/fixtures/torch/basic_block.dlc", model="basic_block",
        config={"inplanes": cin, "planes": planes, "stride": 2},
        trainable_params=str(trainable)))
    return trainable


# ---------------------------------------------------------------------------------------
# Sequence ops: token lookups and recurrent layers
# ---------------------------------------------------------------------------------------


def token_fixture(name, config, description, ids, fn, module=None):
    """A lookup on int64 token ids: no input gradient; the module (if any) is `layer`."""
    out = fn(ids)
    grad_output = randn(gen(name + "/grad_output"), *out.shape)
    t = {"input": ids, "output": out.detach(), "grad_output": grad_output}
    if out.requires_grad:
        out.backward(grad_output)
    if module is not None:
        for k, p in module.named_parameters():
            t[f"layer.{k}"] = p
            t[f"grad.layer.{k}"] = p.grad
    write(name, t, meta(description, config=config, mode="train"))


def recurrent_case(name, kind, features, hidden, layers=1, bidirectional=False, state=False,
                   nonlinearity="tanh", steps=5, batch=2):
    """nn.RNN/GRU/LSTM with batch_first=True, seeded default init; dlc's batch-first state.

    Stored (dlc's layout, batch first): ``input`` [N, T, F]; ``initial.state`` and (LSTM)
    ``initial.cell`` [N, layers·D, H] when given; ``output``, ``output.state``,
    ``output.cell``; ``grad_output``, ``grad_output.state``, ``grad_output.cell``; the
    gradients of ``sum(output * grad_output) + sum(output.state * grad_output.state) + …``
    for the input (``grad.input``), the initial state and cell (``grad.initial.state``, …)
    and every parameter (``grad.layer.<name>``).
    """
    torch.manual_seed(seed_of(name))
    cls = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[kind]
    extra = {"nonlinearity": nonlinearity} if kind == "rnn" else {}
    module = cls(features, hidden, num_layers=layers, bidirectional=bidirectional,
                 batch_first=True, **extra).to(DTYPE)
    g = gen(name + "/data")
    slots = layers * (2 if bidirectional else 1)
    x = randn(g, batch, steps, features).requires_grad_(True)
    t = {"input": x}
    initial = {}
    if state:
        initial["state"] = randn(g, batch, slots, hidden, scale=0.5).requires_grad_(True)
        if kind == "lstm":
            initial["cell"] = randn(g, batch, slots, hidden, scale=0.5).requires_grad_(True)
    # PyTorch's state is [layers·D, N, H]; dlc's is batch first.
    torch_state = {k: v.transpose(0, 1).contiguous() for k, v in initial.items()}
    if kind == "lstm":
        h0 = (torch_state["state"], torch_state["cell"]) if state else None
        out, (hn, cn) = module(x, h0)
        finals = {"state": hn.transpose(0, 1), "cell": cn.transpose(0, 1)}
    else:
        out, hn = module(x, torch_state.get("state"))
        finals = {"state": hn.transpose(0, 1)}
    outputs = {"output": out, **{f"output.{k}": v for k, v in finals.items()}}
    loss = 0
    for key, value in outputs.items():
        grad = randn(gen(f"{name}/{key}"), *value.shape)
        t[key.replace("output", "grad_output", 1)] = grad
        t[key] = value
        loss = loss + (value * grad).sum()
    loss.backward()
    t["grad.input"] = x.grad
    for k, v in initial.items():
        t[f"initial.{k}"] = v
        t[f"grad.initial.{k}"] = v.grad
    for k, p in module.named_parameters():
        t[f"layer.{k}"] = p
        t[f"grad.layer.{k}"] = p.grad
    config = {"op": kind, "hidden": hidden, "layers": layers, "bidirectional": bidirectional}
    if kind == "rnn" and nonlinearity != "tanh":
        config["nonlinearity"] = nonlinearity
    args = ", ".join(f"{k}={v!r}" for k, v in
                     [("num_layers", layers), ("bidirectional", bidirectional), *extra.items()])
    write(name, t, meta(
        f"nn.{cls.__name__}({features}, {hidden}, {args}, batch_first=True) in float64 with "
        f"PyTorch's default init (seeded), input [{batch}, {steps}, {features}]"
        + (", with an initial state" if state else "")
        + "; states stored batch first [N, layers·D, H] (PyTorch's transposed); backward of "
          "the sum of every output times its grad_output", config=config, mode="train"))


def make_sequence():
    # --- embedding, one_hot ---
    name = "op_embedding"
    g = gen(name)
    ids = torch.randint(0, 10, (2, 6), generator=g, dtype=torch.int64)
    ids[0, 1] = ids[1, 4] = 0
    emb = nn.Embedding(10, 4, padding_idx=0).to(DTYPE)
    with torch.no_grad():
        emb.weight.copy_(randn(g, 10, 4))
    token_fixture(name, {"op": "embedding", "vocab": 10, "dim": 4, "padding_idx": 0},
                  "nn.Embedding(10, 4, padding_idx=0) on int64 ids [2, 6] (two of them 0); "
                  "the padding row is set non-zero to show that it is looked up as it is and "
                  "gets no gradient; backward of sum(output * grad_output)", ids, emb, emb)
    name = "op_one_hot"
    ids = torch.randint(0, 7, (2, 5), generator=gen(name), dtype=torch.int64)
    token_fixture(name, {"op": "one_hot", "classes": 7},
                  "F.one_hot(ids, 7) as float64 on int64 ids [2, 5]; no gradient",
                  ids, lambda i: F.one_hot(i, 7).to(DTYPE))

    # --- recurrent layers ---
    recurrent_case("seq_rnn", "rnn", 3, 4)
    recurrent_case("seq_rnn_relu_2l_bi_state", "rnn", 3, 4, layers=2, bidirectional=True,
                   state=True, nonlinearity="relu")
    recurrent_case("seq_gru", "gru", 3, 4)
    recurrent_case("seq_gru_2l_bi_state", "gru", 3, 4, layers=2, bidirectional=True, state=True)
    recurrent_case("seq_lstm", "lstm", 3, 4)
    recurrent_case("seq_lstm_2l_bi_state", "lstm", 3, 4, layers=2, bidirectional=True,
                   state=True)


# ---------------------------------------------------------------------------------------
# d2l's encoder-decoders (d2l 0.17 / zh 2.0.0 code, re-written here: no d2l dependency)
# ---------------------------------------------------------------------------------------


class Seq2SeqEncoder(nn.Module):
    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers, dropout=0):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.GRU(embed_size, num_hiddens, num_layers, dropout=dropout)

    def forward(self, X):
        output, state = self.rnn(self.embedding(X).permute(1, 0, 2))
        return output, state


class Seq2SeqDecoder(nn.Module):
    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers, dropout=0):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.GRU(embed_size + num_hiddens, num_hiddens, num_layers, dropout=dropout)
        self.dense = nn.Linear(num_hiddens, vocab_size)

    def forward(self, X, enc_outputs):
        state = enc_outputs[1]
        X = self.embedding(X).permute(1, 0, 2)
        context = state[-1].repeat(X.shape[0], 1, 1)
        output, state = self.rnn(torch.cat((X, context), 2), state)
        return self.dense(output).permute(1, 0, 2)


class AdditiveAttention(nn.Module):
    def __init__(self, key_size, query_size, num_hiddens, dropout):
        super().__init__()
        self.W_k = nn.Linear(key_size, num_hiddens, bias=False)
        self.W_q = nn.Linear(query_size, num_hiddens, bias=False)
        self.w_v = nn.Linear(num_hiddens, 1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, keys, values):
        # d2l's masked_softmax with valid_lens=None: every source position is attended.
        features = torch.tanh(self.W_q(queries).unsqueeze(2) + self.W_k(keys).unsqueeze(1))
        scores = self.w_v(features).squeeze(-1)
        return torch.bmm(self.dropout(F.softmax(scores, dim=-1)), values)


class Seq2SeqAttentionDecoder(nn.Module):
    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers, dropout=0):
        super().__init__()
        self.attention = AdditiveAttention(num_hiddens, num_hiddens, num_hiddens, dropout)
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.GRU(embed_size + num_hiddens, num_hiddens, num_layers, dropout=dropout)
        self.dense = nn.Linear(num_hiddens, vocab_size)

    def forward(self, X, enc_outputs):
        outputs, hidden_state = enc_outputs
        enc = outputs.permute(1, 0, 2)
        X = self.embedding(X).permute(1, 0, 2)
        steps = []
        for x in X:
            query = torch.unsqueeze(hidden_state[-1], dim=1)
            context = self.attention(query, enc, enc)
            x = torch.cat((context, torch.unsqueeze(x, dim=1)), dim=-1)
            out, hidden_state = self.rnn(x.permute(1, 0, 2), hidden_state)
            steps.append(out)
        return self.dense(torch.cat(steps, dim=0)).permute(1, 0, 2)


class EncoderDecoder(nn.Module):
    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, enc_X, dec_X):
        return self.decoder(dec_X, self.encoder(enc_X))


# The model fixtures' sizes (the shipped defaults are 184/201/32/32: 47,369 parameters make
# a 760 KB file; these keep the structure, 2 layers included, at a tenth of that).
SEQ2SEQ_SIZES = {"src_vocab": 12, "tgt_vocab": 14, "embed": 6, "hidden": 8}


def seq2seq_model(attention: bool, src_vocab=184, tgt_vocab=201, embed=32, hidden=32,
                  layers=2, dropout=0.1):
    decoder = Seq2SeqAttentionDecoder if attention else Seq2SeqDecoder
    return EncoderDecoder(Seq2SeqEncoder(src_vocab, embed, hidden, layers, dropout),
                          decoder(tgt_vocab, embed, hidden, layers, dropout))


def make_seq2seq(attention: bool):
    name = "seq2seq_attention" if attention else "seq2seq"
    torch.manual_seed(seed_of(name))
    net = seq2seq_model(attention, **SEQ2SEQ_SIZES).to(DTYPE).eval()
    g = gen(name + "/data")
    src = torch.randint(0, SEQ2SEQ_SIZES["src_vocab"], (3, 6), generator=g, dtype=torch.int64)
    tgt = torch.randint(0, SEQ2SEQ_SIZES["tgt_vocab"], (3, 5), generator=g, dtype=torch.int64)
    out = net(src, tgt)
    grad_output = randn(g, *out.shape)
    out.backward(grad_output)
    t = {"input.src": src, "input.tgt": tgt, "output": out, "grad_output": grad_output}
    for k, p in net.named_parameters():
        t[k] = p
        t[f"grad.{k}"] = p.grad
    sizes = ", ".join(f"{k}={v}" for k, v in SEQ2SEQ_SIZES.items())
    write(name, t, meta(
        f"d2l's EncoderDecoder(Seq2SeqEncoder, {'Seq2SeqAttentionDecoder' if attention else 'Seq2SeqDecoder'}) "
        f"with {sizes}, 2 layers, in eval mode (dropout off), float64, PyTorch's default init "
        f"(seeded); keys are d2l's state-dict keys"
        + (" (the attention's are `decoder.attention.*`, dlc's `decoder.rnn.attention.*`)"
           if attention else "")
        + "; teacher forcing: input.src [3, 6] and input.tgt [3, 5] int64 token ids, output "
          "[3, 5, tgt_vocab]; backward of sum(output * grad_output)",
        spec="specs/seq2seq.dlc", model=name, mode="eval", config=SEQ2SEQ_SIZES))


def check_counts():
    """PyTorch's own parameter counts of the shipped sequence models (tests/reference)."""
    def count(m):
        return sum(p.numel() for p in m.parameters())

    def char_model(cls, layers=1, bidirectional=False):
        rnn = cls(28, 256, num_layers=layers, bidirectional=bidirectional)
        return count(rnn) + count(nn.Linear(256 * (2 if bidirectional else 1), 28))

    counts = {
        "rnn": char_model(nn.RNN), "gru": char_model(nn.GRU), "lstm": char_model(nn.LSTM),
        "lstm_deep": char_model(nn.LSTM, 2),
        "lstm_bi": char_model(nn.LSTM, 2, True),
        "seq2seq": count(seq2seq_model(False)),
        "seq2seq_attention": count(seq2seq_model(True)),
    }
    expected = {"rnn": 80412, "gru": 226844, "lstm": 300060, "lstm_deep": 826396,
                "lstm_bi": 2177052, "seq2seq": 47369, "seq2seq_attention": 49449}
    assert counts == expected, counts
    return counts


# ---------------------------------------------------------------------------------------
# State-dict key lists of models too large for a fixture
# ---------------------------------------------------------------------------------------

KEYS = ROOT / "tests" / "reference" / "state_dicts"


def d2l_fcn(num_classes=21):
    """d2l §14.11's FCN, built as the book builds it."""
    from torchvision.models import resnet18
    net = nn.Sequential(*list(resnet18().children())[:-2])
    net.add_module("final_conv", nn.Conv2d(512, num_classes, kernel_size=1))
    net.add_module("transpose_conv", nn.ConvTranspose2d(num_classes, num_classes,
                                                        kernel_size=64, padding=16, stride=32))
    return net


def d2l_transformer(src_vocab=184, tgt_vocab=201, hidden=32, ffn=64, heads=4, layers=2):
    """d2l §10.7's Transformer (zh 2.0.0), re-written with only the modules that hold
    parameters, in the book's order and names (no forward: only its state dict is used)."""

    def mha():
        m = nn.Module()
        for k in ("W_q", "W_k", "W_v", "W_o"):
            setattr(m, k, nn.Linear(hidden, hidden, bias=False))
        return m

    def addnorm():
        m = nn.Module()
        m.ln = nn.LayerNorm(hidden)
        return m

    def position_ffn():
        m = nn.Module()
        m.dense1 = nn.Linear(hidden, ffn)
        m.dense2 = nn.Linear(ffn, hidden)
        return m

    def block(decoder):
        b = nn.Module()
        if decoder:
            b.attention1, b.addnorm1 = mha(), addnorm()
            b.attention2, b.addnorm2 = mha(), addnorm()
            b.ffn, b.addnorm3 = position_ffn(), addnorm()
        else:
            b.attention, b.addnorm1 = mha(), addnorm()
            b.ffn, b.addnorm2 = position_ffn(), addnorm()
        return b

    def coder(vocab, decoder):
        c = nn.Module()
        c.embedding = nn.Embedding(vocab, hidden)
        c.blks = nn.Sequential()
        for i in range(layers):
            c.blks.add_module(f"block{i}", block(decoder))
        if decoder:
            c.dense = nn.Linear(hidden, vocab)
        return c

    net = nn.Module()
    net.encoder = coder(src_vocab, False)
    net.decoder = coder(tgt_vocab, True)
    return net


def make_state_dict_keys():
    """`<model>.tsv`: every state-dict key (parameters and buffers, without
    `num_batches_tracked`) with its shape, in the model's order; the first line names the
    spec and the reference. Small enough to ship where the weights are not."""
    from torchvision.models.segmentation import fcn_resnet50, fcn_resnet101
    models = [
        ("fcn_resnet50", "specs/fcn.dlc", "torchvision fcn_resnet50(aux_loss=True)",
         lambda: fcn_resnet50(weights=None, weights_backbone=None, aux_loss=True)),
        ("fcn_resnet50_noaux", "specs/fcn.dlc", "torchvision fcn_resnet50(aux_loss=False)",
         lambda: fcn_resnet50(weights=None, weights_backbone=None, aux_loss=False)),
        ("fcn_resnet101", "specs/fcn.dlc", "torchvision fcn_resnet101(aux_loss=True)",
         lambda: fcn_resnet101(weights=None, weights_backbone=None, aux_loss=True)),
        ("d2l_fcn", "specs/fcn.dlc", "d2l's FCN: resnet18 children[:-2], final_conv, "
         "transpose_conv", d2l_fcn),
        ("transformer", "specs/transformer.dlc", "d2l's Transformer (hidden 32, FFN 64, "
         "4 heads, 2+2 blocks, vocabularies 184/201)", d2l_transformer),
    ]
    KEYS.mkdir(parents=True, exist_ok=True)
    for name, spec, source, build in models:
        model = build()
        lines = [f"# spec: {spec}\tmodel: {name}\treference: {source}, torch {torch.__version__}"]
        for k, v in model.state_dict().items():
            if not k.endswith("num_batches_tracked"):
                lines.append(f"{k}\t{list(v.shape)}")
        (KEYS / f"{name}.tsv").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------

ATTN_SPEC = "tests/fixtures/torch/attention.dlc"
WIDTH, HEADS = 8, 2


def randomize(module: nn.Module, g: torch.Generator) -> None:
    """Every parameter drawn anew: weights N(0, 1/fan_in), vectors (biases, LayerNorm
    weights) around their usual values, so that no zero bias or unit scale hides a mistake."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(randn(g, *p.shape, scale=1 / math.sqrt(p.shape[-1])))
            elif name.endswith("weight"):
                p.copy_(uniform(g, 0.5, 1.5, *p.shape))
            else:
                p.copy_(randn(g, *p.shape, scale=0.5))


def attn_fixture(name, model, description, module, prefix, fn, inputs, spec=ATTN_SPEC,
                 sets=None):
    """One attention file: `fn(**inputs)` forward, backward of sum(output * grad_output);
    float inputs that the output depends on get gradients (not a 0/1 mask, not token ids)."""
    g = gen(name + "/grad_output")
    inputs = {k: (v.clone().requires_grad_(True) if v.is_floating_point() else v)
              for k, v in inputs.items()}
    out = fn(**inputs)
    grad_output = randn(g, *out.shape)
    out.backward(grad_output)
    t = {"output": out, "grad_output": grad_output}
    for k, v in inputs.items():
        t[f"input.{k}"] = v
        if v.grad is not None:
            t[f"grad.input.{k}"] = v.grad
    for k, p in module.named_parameters():
        t[f"{prefix}{k}"] = p
        t[f"grad.{prefix}{k}"] = p.grad
    extra = {"set": sets} if sets else {}
    write(name, t, meta(description, spec=spec, model=model, mode="train", **extra))


class D2lMultiHeadAttention(nn.Module):
    """d2l's MultiHeadAttention (§11.5) with its DotProductAttention and masked_softmax,
    as the book writes them, with nn.Linear in place of nn.LazyLinear (same parameters)."""

    def __init__(self, num_hiddens, num_heads, query_size, kv_size, bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.W_q = nn.Linear(query_size, num_hiddens, bias=bias)
        self.W_k = nn.Linear(kv_size, num_hiddens, bias=bias)
        self.W_v = nn.Linear(kv_size, num_hiddens, bias=bias)
        self.W_o = nn.Linear(num_hiddens, num_hiddens, bias=bias)

    @staticmethod
    def masked_softmax(X, valid_lens):
        if valid_lens is None:
            return nn.functional.softmax(X, dim=-1)
        shape = X.shape
        if valid_lens.dim() == 1:
            valid_lens = torch.repeat_interleave(valid_lens, shape[1])
        else:
            valid_lens = valid_lens.reshape(-1)
        X = X.reshape(-1, shape[-1])
        maxlen = X.size(1)
        mask = torch.arange(maxlen, dtype=torch.float32)[None, :] < valid_lens[:, None]
        X[~mask] = -1e6
        return nn.functional.softmax(X.reshape(shape), dim=-1)

    def transpose_qkv(self, X):
        X = X.reshape(X.shape[0], X.shape[1], self.num_heads, -1)
        X = X.permute(0, 2, 1, 3)
        return X.reshape(-1, X.shape[2], X.shape[3])

    def transpose_output(self, X):
        X = X.reshape(-1, self.num_heads, X.shape[1], X.shape[2])
        X = X.permute(0, 2, 1, 3)
        return X.reshape(X.shape[0], X.shape[1], -1)

    def forward(self, queries, keys, values, valid_lens):
        queries = self.transpose_qkv(self.W_q(queries))
        keys = self.transpose_qkv(self.W_k(keys))
        values = self.transpose_qkv(self.W_v(values))
        if valid_lens is not None:
            valid_lens = torch.repeat_interleave(valid_lens, repeats=self.num_heads, dim=0)
        d = queries.shape[-1]
        scores = torch.bmm(queries, keys.transpose(1, 2)) / math.sqrt(d)
        weights = self.masked_softmax(scores, valid_lens)
        return self.W_o(self.transpose_output(torch.bmm(weights, values)))


class D2lViT(nn.Module):
    """d2l's ViT (§11.8: PatchEmbedding, ViTMLP, ViTBlock, ViT) as the book writes it, with
    eager layers in place of the lazy ones (same parameters and names)."""

    class PatchEmbedding(nn.Module):
        def __init__(self, channels, patch_size, num_hiddens):
            super().__init__()
            self.conv = nn.Conv2d(channels, num_hiddens, kernel_size=patch_size,
                                  stride=patch_size)

        def forward(self, X):
            return self.conv(X).flatten(2).transpose(1, 2)

    class ViTMLP(nn.Module):
        def __init__(self, num_hiddens, mlp_num_hiddens, dropout):
            super().__init__()
            self.dense1 = nn.Linear(num_hiddens, mlp_num_hiddens)
            self.gelu = nn.GELU()
            self.dropout1 = nn.Dropout(dropout)
            self.dense2 = nn.Linear(mlp_num_hiddens, num_hiddens)
            self.dropout2 = nn.Dropout(dropout)

        def forward(self, x):
            return self.dropout2(self.dense2(self.dropout1(self.gelu(self.dense1(x)))))

    class ViTBlock(nn.Module):
        def __init__(self, num_hiddens, mlp_num_hiddens, num_heads, dropout):
            super().__init__()
            self.ln1 = nn.LayerNorm(num_hiddens)
            self.attention = D2lMultiHeadAttention(num_hiddens, num_heads, num_hiddens,
                                                   num_hiddens, bias=False)
            self.ln2 = nn.LayerNorm(num_hiddens)
            self.mlp = D2lViT.ViTMLP(num_hiddens, mlp_num_hiddens, dropout)

        def forward(self, X):
            X = X + self.attention(*([self.ln1(X)] * 3), None)
            return X + self.mlp(self.ln2(X))

    def __init__(self, img_size, patch_size, num_hiddens, mlp_num_hiddens, num_heads,
                 num_blks, num_classes, channels=1):
        super().__init__()
        self.patch_embedding = D2lViT.PatchEmbedding(channels, patch_size, num_hiddens)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, num_hiddens))
        num_steps = (img_size // patch_size) ** 2 + 1
        self.pos_embedding = nn.Parameter(torch.randn(1, num_steps, num_hiddens) * 0.02)
        self.dropout = nn.Dropout(0.0)
        self.blks = nn.Sequential()
        for i in range(num_blks):
            self.blks.add_module(f"{i}", D2lViT.ViTBlock(num_hiddens, mlp_num_hiddens,
                                                         num_heads, 0.0))
        self.head = nn.Sequential(nn.LayerNorm(num_hiddens), nn.Linear(num_hiddens,
                                                                       num_classes))

    def forward(self, X):
        X = self.patch_embedding(X)
        X = torch.cat((self.cls_token.expand(X.shape[0], -1, -1), X), 1)
        X = self.dropout(X + self.pos_embedding)
        for blk in self.blks:
            X = blk(X)
        return self.head(X[:, 0])


def causal_mask(t):
    """True above the diagonal: position t may not attend to later keys."""
    return torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)


def make_attention():
    d, h = WIDTH, HEADS

    def mha(name, bias=True):
        torch.manual_seed(seed_of(name))
        m = nn.MultiheadAttention(d, h, bias=bias, batch_first=True).double()
        randomize(m, gen(name + "/params"))
        return m

    name = "attn_mha_self"
    m = mha(name)
    g = gen(name)
    attn_fixture(name, "mha_self",
                 "nn.MultiheadAttention(8, 2, batch_first=True)(x, x, x)[0] on x [2, 5, 8]; "
                 "keys prefixed `layer.`; backward of sum(output * grad_output)",
                 m, "layer.", lambda x: m(x, x, x, need_weights=False)[0],
                 {"x": randn(g, 2, 5, d)})

    name = "attn_mha_cross"
    m = mha(name)
    g = gen(name)
    attn_fixture(name, "mha_cross",
                 "nn.MultiheadAttention(8, 2, batch_first=True)(x, kv, kv)[0], queries x "
                 "[2, 4, 8] over keys and values kv [2, 6, 8]",
                 m, "layer.", lambda x, kv: m(x, kv, kv, need_weights=False)[0],
                 {"x": randn(g, 2, 4, d), "kv": randn(g, 2, 6, d)})

    name = "attn_mha_causal"
    m = mha(name, bias=False)
    g = gen(name)
    attn_fixture(name, "mha_causal",
                 "nn.MultiheadAttention(8, 2, bias=False, batch_first=True)(x, x, x, "
                 "attn_mask=triu(ones(5, 5), 1).bool())[0] on x [2, 5, 8]: causal "
                 "self-attention without projection biases",
                 m, "layer.",
                 lambda x: m(x, x, x, attn_mask=causal_mask(5), need_weights=False)[0],
                 {"x": randn(g, 2, 5, d)})

    name = "attn_mha_padding"
    m = mha(name)
    g = gen(name)
    ids = torch.tensor([[3, 7, 2, 0, 0], [5, 1, 4, 6, 9]], dtype=torch.int64)
    attn_fixture(name, "mha_padding",
                 "nn.MultiheadAttention(8, 2, batch_first=True)(x, x, x, attn_mask=causal, "
                 "key_padding_mask=(ids == 0))[0] on x [2, 5, 8]; ids [2, 5] int64 token ids "
                 "with padding id 0 (example 0 has two padded keys, example 1 none)",
                 m, "layer.",
                 lambda x, ids: m(x, x, x, attn_mask=causal_mask(5), key_padding_mask=ids == 0,
                                  need_weights=False)[0],
                 {"x": randn(g, 2, 5, d), "ids": ids})

    name = "attn_mha_cross_padding"
    m = mha(name)
    g = gen(name)
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=DTYPE)
    attn_fixture(name, "mha_cross_padding",
                 "nn.MultiheadAttention(8, 2, batch_first=True)(x, kv, kv, "
                 "key_padding_mask=(keep == 0))[0], x [2, 4, 8], kv [2, 6, 8], keep [2, 6] a "
                 "float 0/1 mask (1: attend)",
                 m, "layer.",
                 lambda x, kv, keep: m(x, kv, kv, key_padding_mask=keep == 0,
                                       need_weights=False)[0],
                 {"x": randn(g, 2, 4, d), "kv": randn(g, 2, 6, d), "keep": keep})

    name = "attn_d2l_mha"
    torch.manual_seed(seed_of(name))
    m = D2lMultiHeadAttention(d, h, query_size=d, kv_size=10, bias=False).double()
    randomize(m, gen(name + "/params"))
    g = gen(name)
    ids = torch.tensor([[4, 5, 6, 1, 1, 1], [7, 8, 9, 2, 3, 1]], dtype=torch.int64)
    attn_fixture(name, "d2l_mha",
                 "d2l's MultiHeadAttention(num_hiddens=8, num_heads=2, dropout=0, bias=False) "
                 "(W_q [8, 8], W_k and W_v [8, 10], W_o [8, 8]) on queries q [2, 4, 8], keys "
                 "and values kv [2, 6, 10], valid_lens = (ids != 1).sum(1) = [3, 5] with ids "
                 "[2, 6] int64 whose padding id is 1 (d2l's <pad>)",
                 m, "layer.",
                 lambda q, kv, ids: m(q, kv, kv, (ids != 1).sum(1)),
                 {"q": randn(g, 2, 4, d), "kv": randn(g, 2, 6, 10), "ids": ids})

    name = "attn_vit_encoder_block"
    torch.manual_seed(seed_of(name))
    m = EncoderBlock(h, d, 16, dropout=0.0, attention_dropout=0.0).double()
    randomize(m, gen(name + "/params"))
    g = gen(name)
    attn_fixture(name, "vit_encoder_block",
                 "torchvision.models.vision_transformer.EncoderBlock(num_heads=2, hidden_dim=8, "
                 "mlp_dim=16, dropout=0, attention_dropout=0) (LayerNorm eps 1e-6, GELU MLP) "
                 "on x [2, 5, 8]; keys prefixed `block.`",
                 m, "block.", lambda x: m(x), {"x": randn(g, 2, 5, d)})

    name = "attn_decoder_layer"
    torch.manual_seed(seed_of(name))
    m = nn.TransformerDecoderLayer(d, h, dim_feedforward=16, dropout=0.0,
                                   batch_first=True).double()
    randomize(m, gen(name + "/params"))
    g = gen(name)
    attn_fixture(name, "decoder_layer",
                 "nn.TransformerDecoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0, "
                 "batch_first=True)(tgt, memory, tgt_mask=causal) (post-norm, ReLU) on tgt "
                 "[2, 4, 8], memory [2, 6, 8]; keys prefixed `block.`",
                 m, "block.",
                 lambda tgt, memory: m(tgt, memory, tgt_mask=causal_mask(4)),
                 {"tgt": randn(g, 2, 4, d), "memory": randn(g, 2, 6, d)})


def make_attention_models():
    name = "attn_vit"
    torch.manual_seed(seed_of(name))
    m = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                          hidden_dim=8, mlp_dim=16, num_classes=10).double()
    randomize(m, gen(name + "/params"))
    g = gen(name)
    attn_fixture(name, "vit",
                 "torchvision.models.vision_transformer.VisionTransformer(image_size=16, "
                 "patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16, "
                 "num_classes=10) (dropout 0) on image [2, 3, 16, 16]; state-dict keys as they "
                 "are (conv_proj, class_token, encoder.pos_embedding, encoder.layers."
                 "encoder_layer_0..., encoder.ln, heads.head)",
                 m, "", lambda image: m(image), {"image": randn(g, 2, 3, 16, 16)},
                 spec="specs/vit.dlc",
                 sets=["patch=8", "layers=2", "heads=2", "hidden=8", "mlp_dim=16",
                       "classes=10", "size=16"])

    name = "attn_d2l_vit"
    torch.manual_seed(seed_of(name))
    m = D2lViT(img_size=16, patch_size=8, num_hiddens=8, mlp_num_hiddens=16, num_heads=2,
               num_blks=2, num_classes=10).double()
    randomize(m, gen(name + "/params"))
    g = gen(name)
    attn_fixture(name, "d2l_vit",
                 "d2l's ViT (img_size=16, patch_size=8, num_hiddens=8, mlp_num_hiddens=16, "
                 "num_heads=2, num_blks=2, dropout 0, use_bias=False, 10 classes) on image "
                 "[2, 1, 16, 16]; state-dict keys as they are (patch_embedding.conv, "
                 "cls_token, pos_embedding, blks.0.attention.W_q, ..., head.0, head.1)",
                 m, "", lambda image: m(image), {"image": randn(g, 2, 1, 16, 16)},
                 spec="specs/vit.dlc",
                 sets=["hidden=8", "mlp_hidden=16", "heads=2", "blocks=2", "emb_drop=0",
                       "blk_drop=0", "patch=8", "size=16"])

    name = "attn_torch_transformer"
    torch.manual_seed(seed_of(name))
    m = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=2, num_decoder_layers=2,
                       dim_feedforward=16, dropout=0.0, batch_first=True).double()
    randomize(m, gen(name + "/params"))
    g = gen(name)
    attn_fixture(name, "torch_transformer",
                 "nn.Transformer(d_model=8, nhead=2, num_encoder_layers=2, "
                 "num_decoder_layers=2, dim_feedforward=16, dropout=0, batch_first=True)"
                 "(src, tgt, tgt_mask=causal) on src [2, 6, 8], tgt [2, 4, 8]; state-dict keys "
                 "as they are (encoder.layers.0.self_attn, ..., encoder.norm, "
                 "decoder.layers.0.multihead_attn, ..., decoder.norm)",
                 m, "", lambda src, tgt: m(src, tgt, tgt_mask=causal_mask(4)),
                 {"src": randn(g, 2, 6, 8), "tgt": randn(g, 2, 4, 8)},
                 spec="specs/transformer.dlc",
                 sets=["d_model=8", "heads=2", "encoder_layers=2", "decoder_layers=2",
                       "ffn=16", "drop=0"])


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    make_ops()
    make_lenet()
    n = make_basic_block()
    make_sequence()
    make_seq2seq(False)
    make_seq2seq(True)
    counts = check_counts()
    make_state_dict_keys()
    make_attention()
    make_attention_models()
    files = sorted(OUT.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    print(f"wrote {len(files)} files to {OUT.relative_to(ROOT)} ({total:,} bytes); "
          f"torch {torch.__version__}; basic block trainable params {n:,}; sequence models "
          f"{', '.join(f'{k} {v:,}' for k, v in counts.items())}", file=sys.stderr)


if __name__ == "__main__":
    main()

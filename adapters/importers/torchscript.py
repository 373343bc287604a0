"""torchvision's int8 TorchScript MobileNetV2, dequantized into a float ``torchvision.models.mobilenet_v2``.

The file (``weights/torchscript/mobilenetv2_quantized.pt``) holds 53 quantized
convolutions with BatchNorm already folded in. Each is unpacked with
``torch.ops.quantized.conv2d_unpack`` and its float weight put into the
matching ``Conv2d``; the folded bias goes into the BatchNorm that follows,
made an exact identity-plus-bias (:func:`adapters.importers.set_identity_bn`),
so the module tree stays torchvision's. The quantizable MobileNetV2 replaced
ReLU6 by ReLU before quantization, so the float model uses ReLU too. The
classifier comes from ``torch.ops.quantized.linear_unpack``. 1000 ImageNet
classes; preprocess: torchvision's for these weights (resize 256, centre crop
224, ImageNet mean/std).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Iterator

import torch
import torchvision
from torch import nn
from torchvision.models.quantization import MobileNet_V2_QuantizedWeights

from ..hub import compose_of
from . import find_weights_file, set_identity_bn

__all__ = ["TORCHSCRIPT_MOBILENET_V2_FILE", "conv_bn_pairs", "float_mobilenet_v2", "mobilenet_v2_from_torchscript",
           "mobilenet_v2_preprocess", "TorchScriptReference"]

#: The shipped file, relative to the weights folder (:func:`adapters.registry.weights_dir`).
TORCHSCRIPT_MOBILENET_V2_FILE = "torchscript/mobilenetv2_quantized.pt"


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Every Conv2d of ``model`` with the BatchNorm2d that follows it in module order."""
    pairs, pending = [], None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if pending is not None:
                raise ValueError("a Conv2d without a following BatchNorm2d")
            pending = m
        elif isinstance(m, nn.BatchNorm2d) and pending is not None:
            pairs.append((pending, m))
            pending = None
    return pairs


def float_mobilenet_v2() -> nn.Module:
    """``torchvision.models.mobilenet_v2`` (1000 classes, random weights) with ReLU in place of ReLU6.

    The quantizable MobileNetV2 swapped ReLU6 for ReLU before calibration
    (torchvision's ``_replace_relu``), so the float twin must use ReLU too.
    """
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=1000)
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, nn.ReLU())
    return model


def _quantized_layers(ts: torch.jit.ScriptModule) -> tuple[list, list]:
    """The quantized convolutions (plain and ReLU-fused) and linear layers of a TorchScript module, in order."""
    qconvs = [m for _, m in ts.named_modules()
              if getattr(m, "original_name", "") in ("Conv2d", "ConvReLU2d") and hasattr(m, "_packed_params")]
    qlinear = [m for _, m in ts.named_modules() if getattr(m, "original_name", "") == "Linear"]
    return qconvs, qlinear


def mobilenet_v2_from_torchscript(path: str | os.PathLike | None = None) -> nn.Module:
    """Dequantize torchvision's TorchScript int8 MobileNetV2 into ``torchvision.models.mobilenet_v2`` (eval mode).

    See the module docstring for the mapping. Raises ``ValueError`` if the file
    is not that network (number, shapes, strides or groups of the convolutions).
    """
    file = find_weights_file(path, TORCHSCRIPT_MOBILENET_V2_FILE)
    model = float_mobilenet_v2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized-op deprecation warnings of torch.jit
        qconvs, qlinear = _quantized_layers(torch.jit.load(str(file), map_location="cpu"))
        pairs = conv_bn_pairs(model)
        if len(qconvs) != len(pairs) or len(qlinear) != 1:
            raise ValueError(f"{file} has {len(qconvs)} quantized convs and {len(qlinear)} linear layers; "
                             f"torchvision mobilenet_v2 needs {len(pairs)} and 1")
        with torch.no_grad():
            for k, (q, (conv, bn)) in enumerate(zip(qconvs, pairs)):
                packed = q._packed_params
                w, b = torch.ops.quantized.conv2d_unpack(packed)
                stride = tuple(torch.ops.quantized.conv2d_stride(packed))
                groups = int(torch.ops.quantized.conv2d_groups(packed))
                if w.shape != conv.weight.shape or stride != conv.stride or groups != conv.groups:
                    raise ValueError(f"{file}: quantized conv {k} is {tuple(w.shape)}, stride {stride}, groups {groups}; "
                                     f"mobilenet_v2 expects {tuple(conv.weight.shape)}, {conv.stride}, {conv.groups}")
                conv.weight.copy_(w.dequantize())
                set_identity_bn(bn, b)
            w, b = torch.ops.quantized.linear_unpack(qlinear[0]._packed_params._packed_params)
            fc = model.classifier[1]
            if w.shape != fc.weight.shape:
                raise ValueError(f"{file}: classifier is {tuple(w.shape)}, expected {tuple(fc.weight.shape)}")
            fc.weight.copy_(w.dequantize())
            fc.bias.copy_(b)
    return model.eval()


def mobilenet_v2_preprocess() -> Callable:
    """torchvision's transform for the quantized MobileNetV2 weights (resize 256, crop 224, ImageNet mean/std)."""
    return compose_of(MobileNet_V2_QuantizedWeights.IMAGENET1K_QNNPACK_V1.transforms())


class TorchScriptReference:
    """The original int8 TorchScript MobileNetV2, run with the QNNPACK engine it was quantized for.

    torchvision's quantized MobileNetV2 weights are ``IMAGENET1K_QNNPACK_V1``:
    calibrated without ``reduce_range``. On x86 torch's default engine
    (``x86``/``fbgemm``) multiplies uint8 x int8 pairs into saturating int16
    sums, which overflows on this model's first convolution (errors of 1.1 on
    outputs of at most 3.4 on a normal-noise input, against 0.0075 with
    QNNPACK). So the reference is loaded and run under QNNPACK; the engine
    setting is restored after every call.

    The trace fixed the batch size to 1, so :meth:`__call__` runs the images
    one at a time.
    """

    ENGINE = "qnnpack"

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        if self.ENGINE not in torch.backends.quantized.supported_engines:
            raise RuntimeError(f"this torch build lacks the {self.ENGINE} quantized engine the int8 MobileNetV2 needs")
        self.path = find_weights_file(path, TORCHSCRIPT_MOBILENET_V2_FILE)
        with self._engine(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.module = torch.jit.load(str(self.path), map_location="cpu").eval()

    @contextlib.contextmanager
    def _engine(self) -> Iterator[None]:
        """Run the block under :attr:`ENGINE`, restoring the previous quantized engine after it."""
        before = torch.backends.quantized.engine
        torch.backends.quantized.engine = self.ENGINE
        try:
            yield
        finally:
            torch.backends.quantized.engine = before

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``B x 1000`` for preprocessed images ``B x 3 x 224 x 224``."""
        with self._engine(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.cat([self.module(x[i : i + 1]) for i in range(x.shape[0])])

"""MobileNet v1 (Howard et al., 2017) with flat, numbered module names and a 10-class head.

A 3x3 stride-2 convolution followed by 13 depthwise-separable blocks, each a
3x3 depthwise convolution (``groups`` = channels) and a 1x1 pointwise
convolution, every convolution followed by BatchNorm and ReLU: 27
convolutions ``conv1`` ... ``conv27`` with ``bn1..27`` and ``relu1..27``, then
``avgpool`` and ``fc``. Convolutions have no bias. There is no dropout (none is
printed in the original "CNN Internals" model).

Channels and strides at ``width_mult=1`` (Table 1 of the paper; the last
depthwise convolution has stride 1, as in the printout and the reference
implementations)::

    conv1  3->32 s2
    conv2  dw 32 s1    conv3  pw 32->64
    conv4  dw 64 s2    conv5  pw 64->128
    conv6  dw 128 s1   conv7  pw 128->128
    conv8  dw 128 s2   conv9  pw 128->256
    conv10 dw 256 s1   conv11 pw 256->256
    conv12 dw 256 s2   conv13 pw 256->512
    conv14..conv23: five times dw 512 s1 + pw 512->512
    conv24 dw 512 s2   conv25 pw 512->1024
    conv26 dw 1024 s1  conv27 pw 1024->1024

``width_mult`` (the paper's alpha) scales every width as ``int(c * alpha)``,
the rule of Keras Applications' MobileNet, so ``width_mult=0.25`` has the
layer shapes of the published ``mobilenet_2_5_224`` weights (8, 16, 32, 64,
128, 256 channels).

Shapes at 224x224: conv1 32x112 -> conv5 128x56 -> conv9 256x28 -> conv13
512x14 -> conv25 1024x7 -> avgpool 1024 -> fc 10.

Parameter count
---------------
``width_mult=1``: **3,217,226** trainable parameters (convolutions 3,185,088,
BatchNorm affine 21,888, fc 10,250). ``width_mult=0.25``: **215,642**
(convolutions 207,600, BatchNorm 5,472, fc 2,570); its convolutions plus
BatchNorm affine parameters and running statistics come to 218,544, the
parameter count of Keras' no-top file for alpha 0.25.

Initialisation: Kaiming normal conv/linear weights, zero biases, BatchNorm
weight 1 and bias 0 (:func:`adapters.init.init_weights`).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from .checkpoint import built
from .init import init_weights
from .preprocess import imagenette_resize_crop
from .registry import Card, register_model

__all__ = ["MobileNetV1", "load", "NUM_PARAMETERS", "BLOCKS", "is_depthwise", "CARD"]

NUM_PARAMETERS = 3_217_226

# (depthwise stride, pointwise output channels) of the 13 separable blocks, at width 1.
BLOCKS: tuple[tuple[int, int], ...] = (
    (1, 64),
    (2, 128),
    (1, 128),
    (2, 256),
    (1, 256),
    (2, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (1, 512),
    (2, 1024),
    (1, 1024),
)


def is_depthwise(module: nn.Module) -> bool:
    """True for a depthwise convolution (one group per input channel, more than one channel)."""
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels and module.groups > 1


class MobileNetV1(nn.Module):
    """MobileNet v1 (see the module docstring).

    Parameters
    ----------
    num_classes:
        Size of the output layer ``fc``.
    width_mult:
        Width multiplier alpha in (0, 1]; widths are ``int(c * alpha)``.
    """

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0) -> None:
        super().__init__()
        if not 0 < width_mult <= 1 or int(32 * width_mult) < 1:
            raise ValueError(f"width_mult must be in (0, 1] and leave at least one channel, got {width_mult}")
        self.width_mult = float(width_mult)
        # conv1..conv27 are real module names: no aliases needed.
        self.layer_aliases: dict[str, str] = {}

        def width(c: int) -> int:
            return int(c * width_mult)

        def add(i: int, conv: nn.Conv2d) -> None:
            self.add_module(f"conv{i}", conv)
            self.add_module(f"bn{i}", nn.BatchNorm2d(conv.out_channels))
            self.add_module(f"relu{i}", nn.ReLU())

        ch = width(32)
        add(1, nn.Conv2d(3, ch, kernel_size=3, stride=2, padding=1, bias=False))
        i = 2
        for stride, out in BLOCKS:
            add(i, nn.Conv2d(ch, ch, kernel_size=3, stride=stride, padding=1, groups=ch, bias=False))
            add(i + 1, nn.Conv2d(ch, width(out), kernel_size=1, stride=1, padding=0, bias=False))
            ch = width(out)
            i += 2
        self.num_convs = i - 1
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch ``Bx3xHxW`` (224x224 in the recipe)."""
        for i in range(1, self.num_convs + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def load(
    weights: str | os.PathLike | None = None, num_classes: int = 10, width_mult: float = 1.0, **kwargs
) -> tuple[nn.Module, Callable]:
    """MobileNet v1 in eval mode and its evaluation preprocess.

    Parameters
    ----------
    weights:
        A checkpoint for :func:`adapters.checkpoint.load_state_dict`; ``None``
        keeps the random initialisation.
    num_classes:
        Output classes (10 for Imagenette).
    width_mult:
        Width multiplier alpha (1.0 for the Imagenette recipe).
    **kwargs:
        Passed to :class:`MobileNetV1` (none at present).

    Returns
    -------
    (model, preprocess)
        The model in eval mode and :func:`adapters.preprocess.imagenette_resize_crop`.
    """
    return built(MobileNetV1(num_classes=num_classes, width_mult=width_mult, **kwargs), weights, "mobilenet", imagenette_resize_crop())


CARD = register_model(Card(
    name="mobilenet",
    build=load,
    preprocess=imagenette_resize_crop,
    params=NUM_PARAMETERS,
    summary="MobileNet v1 (Howard et al. 2017), width_mult 1, 10-class Imagenette head",
    dataset="imagenette",
    figure_layers=("conv2", "conv6", "conv10", "conv14", "conv18", "conv22"),
    twins=("timm:mobilenetv1_100", "pretrained:mobilenet_v1_100_tflite", "pretrained:mobilenet_v1_025_keras"),
))

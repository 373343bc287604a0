"""ResNet-18 (He et al., 2016) with flat, numbered module names and a 10-class head.

Same network as torchvision's ``resnet18`` (basic blocks, 1x1 stride-2
projection shortcuts when the shape changes), but every module sits directly
on the model with the names of the original "CNN Internals" printout:
``conv1 bn1 relu1 pool1``, then eight basic blocks built from ``conv2`` ...
``conv17`` with their ``bnN``/``reluN``, and ``conv_proj1..3``/``bn_proj1..3``
for the three projection shortcuts, then ``avgpool`` and ``fc``.

Because the names are flat, the residual wiring lives in :meth:`ResNet18.forward`.
Block ``k`` (k = 1..8) uses convs ``a = 2k`` and ``b = 2k + 1``::

    out = relu_a(bn_a(conv_a(x)))
    out = bn_b(conv_b(out))
    shortcut = x                                  (blocks 1, 2, 4, 6, 8)
    shortcut = bn_projj(conv_projj(x))            (blocks 3, 5, 7: j = 1, 2, 3)
    x = relu_b(out + shortcut)

so ``relu_b`` (relu3, relu5, ..., relu17) is the block output, after the
addition. Block order and strides: conv6, conv10 and conv14 (and their
projections) have stride 2. State dicts map one-to-one onto torchvision's
``resnet18(num_classes=10)`` (``layer1.0.conv1`` = ``conv2``,
``layer2.0.downsample.0`` = ``conv_proj1``, ...; see :data:`TORCHVISION_NAMES`),
so torchvision's ImageNet weights load exactly:
``load(weights="torchvision:resnet18")`` (or ``"torchvision:resnet18:IMAGENET1K_V1"``,
or ``"torchvision:resnet18:PATH"`` for a local file in torchvision's format)
gives the same logits as ``torchvision.models.resnet18`` with those weights,
with a 1000-way ``fc`` and torchvision's preprocess.

Shapes at 224x224: conv1 64x112 -> pool1 64x56 -> blocks 1-2 64x56 ->
blocks 3-4 128x28 -> blocks 5-6 256x14 -> blocks 7-8 512x7 -> avgpool 512 -> fc 10.

Parameter count
---------------
**11,181,642** trainable parameters (identical to torchvision's resnet18 with
10 classes): convolutions 11,164,352 (projections 172,032 of them), BatchNorm
affine 9,600 (projections 1,792), fc 5,130.

Initialisation: Kaiming normal conv/linear weights, zero biases, BatchNorm
weight 1 and bias 0 (:func:`adapters.init.init_weights`).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from .checkpoint import built
from .hub import torchvision_into
from .init import init_weights
from .preprocess import imagenette_resize_crop
from .registry import Card, register_model

__all__ = ["ResNet18", "load", "from_torchvision_state_dict", "NUM_PARAMETERS", "BLOCKS", "TORCHVISION_NAMES",
           "CARD"]

NUM_PARAMETERS = 11_181_642

# (first conv index, in channels, out channels, stride, projection index or 0)
BLOCKS: tuple[tuple[int, int, int, int, int], ...] = (
    (2, 64, 64, 1, 0),
    (4, 64, 64, 1, 0),
    (6, 64, 128, 2, 1),
    (8, 128, 128, 1, 0),
    (10, 128, 256, 2, 2),
    (12, 256, 256, 1, 0),
    (14, 256, 512, 2, 3),
    (16, 512, 512, 1, 0),
)


def _torchvision_names() -> dict[str, str]:
    names = {"conv1": "conv1", "bn1": "bn1", "fc": "fc"}
    for k, (a, _, _, _, proj) in enumerate(BLOCKS):
        prefix = f"layer{k // 2 + 1}.{k % 2}"
        names[f"conv{a}"] = f"{prefix}.conv1"
        names[f"bn{a}"] = f"{prefix}.bn1"
        names[f"conv{a + 1}"] = f"{prefix}.conv2"
        names[f"bn{a + 1}"] = f"{prefix}.bn2"
        if proj:
            names[f"conv_proj{proj}"] = f"{prefix}.downsample.0"
            names[f"bn_proj{proj}"] = f"{prefix}.downsample.1"
    return names


#: Our module name -> torchvision ``resnet18`` module name.
TORCHVISION_NAMES: dict[str, str] = _torchvision_names()


class ResNet18(nn.Module):
    """ResNet-18 with flat module names and an explicit residual forward.

    Parameters
    ----------
    num_classes:
        Size of the output layer ``fc``.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        # conv1..conv17 are real module names; the projections are extra
        # convolutions outside the seed's numbering, reachable by their names.
        self.layer_aliases: dict[str, str] = {}
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))  # printed with tuples
        for a, cin, cout, stride, proj in BLOCKS:
            # Registration order = the printout's order: both convs of the
            # block, then its projection.
            self.add_module(f"conv{a}", nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False))
            self.add_module(f"bn{a}", nn.BatchNorm2d(cout))
            self.add_module(f"relu{a}", nn.ReLU())
            self.add_module(f"conv{a + 1}", nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False))
            self.add_module(f"bn{a + 1}", nn.BatchNorm2d(cout))
            self.add_module(f"relu{a + 1}", nn.ReLU())
            if proj:
                self.add_module(f"conv_proj{proj}", nn.Conv2d(cin, cout, 1, stride=stride, bias=False))
                self.add_module(f"bn_proj{proj}", nn.BatchNorm2d(cout))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        init_weights(self)

    def _block(self, x: torch.Tensor, a: int, proj: int) -> torch.Tensor:
        out = getattr(self, f"relu{a}")(getattr(self, f"bn{a}")(getattr(self, f"conv{a}")(x)))
        out = getattr(self, f"bn{a + 1}")(getattr(self, f"conv{a + 1}")(out))
        if proj:
            shortcut = getattr(self, f"bn_proj{proj}")(getattr(self, f"conv_proj{proj}")(x))
        else:
            shortcut = x
        return getattr(self, f"relu{a + 1}")(out + shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch ``Bx3xHxW`` (224x224 in the recipe)."""
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        for a, _, _, _, proj in BLOCKS:
            x = self._block(x, a, proj)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def from_torchvision_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision ``resnet18`` state dict to this model's names.

    Parameters
    ----------
    state:
        ``torchvision.models.resnet18(...).state_dict()``-style keys.

    Returns
    -------
    dict
        The same tensors under ``conv2.weight``, ``bn_proj1.running_mean``, ...
    """
    back = {tv: ours for ours, tv in TORCHVISION_NAMES.items()}
    out = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module not in back:
            raise ValueError(f"unexpected key {key!r}: not a torchvision resnet18 state dict")
        out[f"{back[module]}.{leaf}"] = value
    return out


def load(weights: str | os.PathLike | None = None, num_classes: int = 10, **kwargs) -> tuple[nn.Module, Callable]:
    """ResNet-18 in eval mode and its evaluation preprocess.

    Parameters
    ----------
    weights:
        A checkpoint for :func:`adapters.checkpoint.load_state_dict`; ``None``
        keeps the random initialisation; ``"torchvision:resnet18[:WEIGHTS]"``
        loads torchvision's weights (see the module docstring; ``fc`` then
        has the file's class count and the preprocess is torchvision's).
    num_classes:
        Output classes (10 for Imagenette; ignored for torchvision weights).
    **kwargs:
        Passed to :class:`ResNet18` (none at present).

    Returns
    -------
    (model, preprocess)
        The model in eval mode and :func:`adapters.preprocess.imagenette_resize_crop`.
    """
    transferred = torchvision_into(weights, ("resnet18",), "fc.weight",
                                   lambda n: ResNet18(num_classes=n, **kwargs), from_torchvision_state_dict)
    if transferred is not None:
        return transferred
    return built(ResNet18(num_classes=num_classes, **kwargs), weights, "resnet18", imagenette_resize_crop())


CARD = register_model(Card(
    name="resnet18",
    build=load,
    preprocess=imagenette_resize_crop,
    params=NUM_PARAMETERS,
    summary="ResNet-18 (He et al. 2016), 10-class Imagenette head",
    dataset="imagenette",
    figure_layers=("conv2", "conv4", "conv6", "conv8", "conv10", "conv13"),
    twins=("torchvision:resnet18",),
))

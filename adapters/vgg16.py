"""VGG-16 (Simonyan & Zisserman, 2015, configuration D) with a 10-class Imagenette head.

Thirteen 3x3 convolutions (stride 1, padding 1) in five blocks separated by
2x2 max pooling, adaptive average pooling to 7x7, and three fully-connected
layers with dropout on the first two. No batch normalisation.

Architecture (module names and order as in the original "CNN Internals"
printout)::

    conv1 (3->64)   relu1  conv2 (64->64)   relu2  pool1
    conv3 (64->128) relu3  conv4 (128->128) relu4  pool2
    conv5 (128->256) relu5 conv6 (256->256) relu6 conv7 (256->256) relu7 pool3
    conv8 (256->512) relu8 conv9 (512->512) relu9 conv10 (512->512) relu10 pool4
    conv11 (512->512) relu11 conv12 (512->512) relu12 conv13 (512->512) relu13 pool5
    avgpool (7x7)
    fc1 (25088->4096) relu14 drop1  fc2 (4096->4096) relu15 drop2  fc3 (4096->10)

Shapes at 224x224: 64x224 -> pool1 64x112 -> pool2 128x56 -> pool3 256x28 ->
pool4 512x14 -> pool5 512x7 -> avgpool 512x7x7 -> 25088 -> 4096 -> 4096 -> 10.

Parameter count
---------------
**134,301,514** trainable parameters::

    convolutions (13)                 14,714,688
    fc1   4096*25088 + 4096     =    102,764,544
    fc2   4096*4096 + 4096      =     16,781,312
    fc3   10*4096 + 10          =         40,970

Initialisation: Kaiming normal conv/linear weights, zero biases
(:func:`adapters.init.init_weights`). Evaluation preprocessing (resize 256,
centre 224 crop, dataset mean/std): :func:`adapters.preprocess.resize_crop`
with the shipped Imagenette statistics.

torchvision's VGG-16 weights
----------------------------
The architecture is exactly torchvision's ``vgg16`` (same convolutions, pools,
7x7 adaptive average pool and classifier, dropout in the same places), so
``load(weights="torchvision:vgg16")`` (or ``"torchvision:vgg16:IMAGENET1K_V1"``,
or ``"torchvision:vgg16:PATH"``) loads torchvision's weights one to one
(``features.0`` = ``conv1``, ..., ``features.28`` = ``conv13``,
``classifier.0/3/6`` = ``fc1/fc2/fc3``, a 1000-way ``fc3``) and gives
torchvision's logits. ``"torchvision:vgg16_bn"`` loads the batch-normalised
variant with each eval-mode BatchNorm folded into the convolution before it
(``w * g / sqrt(var + eps)``, bias ``(b - mean) * g / sqrt(var + eps) + beta``):
the same logits in eval mode, but training from there trains a network
without BatchNorm. See :func:`from_torchvision_state_dict`.
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

__all__ = ["VGG16", "load", "NUM_PARAMETERS", "CONV_CHANNELS", "from_torchvision_state_dict", "CARD"]

NUM_PARAMETERS = 134_301_514

# Output channels of conv1..conv13, and after which conv a 2x2 pool follows.
CONV_CHANNELS: tuple[int, ...] = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_POOL_AFTER: dict[int, int] = {2: 1, 4: 2, 7: 3, 10: 4, 13: 5}  # conv index -> pool index


class VGG16(nn.Module):
    """VGG-16 with flat, numbered module names (see the module docstring).

    Parameters
    ----------
    num_classes:
        Size of the output layer ``fc3``.
    dropout:
        Dropout probability of ``drop1`` and ``drop2``.
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        # conv1..conv13 are real module names: no aliases needed.
        self.layer_aliases: dict[str, str] = {}
        in_ch = 3
        # Registration order is the printed order, which is also forward order.
        for i, out_ch in enumerate(CONV_CHANNELS, start=1):
            self.add_module(f"conv{i}", nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=1, padding=1))
            self.add_module(f"relu{i}", nn.ReLU())
            if i in _POOL_AFTER:
                self.add_module(f"pool{_POOL_AFTER[i]}", nn.MaxPool2d(kernel_size=2, stride=2))
            in_ch = out_ch
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.fc1 = nn.Linear(512 * 7 * 7, 4096)
        self.relu14 = nn.ReLU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(4096, 4096)
        self.relu15 = nn.ReLU()
        self.drop2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(4096, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch ``Bx3xHxW`` (224x224 in the recipe)."""
        for i in range(1, len(CONV_CHANNELS) + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"conv{i}")(x))
            if i in _POOL_AFTER:
                x = getattr(self, f"pool{_POOL_AFTER[i]}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        x = self.drop1(self.relu14(self.fc1(x)))
        x = self.drop2(self.relu15(self.fc2(x)))
        return self.fc3(x)


def from_torchvision_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision ``vgg16`` or ``vgg16_bn`` state dict as a :class:`VGG16` state dict.

    The 13 convolutions are taken in ``features`` index order (``conv1`` ...
    ``conv13``); in ``vgg16_bn`` the BatchNorm right after each convolution is
    folded into it (eval-mode statistics, computed in float64). The classifier
    maps ``classifier.0/3/6`` to ``fc1/fc2/fc3``.

    Raises
    ------
    ValueError
        If the keys are not those of torchvision's VGG-16 (with or without BatchNorm).
    """
    feats: dict[int, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "features" and parts[1].isdigit():
            feats.setdefault(int(parts[1]), {})[parts[2]] = value
        elif len(parts) == 3 and parts[0] == "classifier" and parts[1] in ("0", "3", "6"):
            out[f"fc{'036'.index(parts[1]) + 1}.{parts[2]}"] = value
        else:
            raise ValueError(f"unexpected key {key!r}: not a torchvision vgg16 / vgg16_bn state dict")
    convs = [i for i in sorted(feats) if feats[i].get("weight") is not None and feats[i]["weight"].ndim == 4]
    if len(convs) != len(CONV_CHANNELS) or len(out) != 6:
        raise ValueError(f"not a torchvision vgg16 state dict: {len(convs)} convolutions and {len(out)} classifier "
                         f"tensors (VGG-16 has {len(CONV_CHANNELS)} and 6)")
    for n, i in enumerate(convs, start=1):
        w, b = feats[i]["weight"], feats[i]["bias"]
        bn = feats.get(i + 1, {})
        if "running_mean" in bn:  # vgg16_bn: conv, bn, relu
            eps = 1e-5  # torchvision's VGG BatchNorm2d uses torch's default
            scale = bn["weight"].double() / torch.sqrt(bn["running_var"].double() + eps)
            b = (b.double() - bn["running_mean"].double()) * scale + bn["bias"].double()
            w = w.double() * scale[:, None, None, None]
            w, b = w.to(feats[i]["weight"].dtype), b.to(feats[i]["bias"].dtype)
        out[f"conv{n}.weight"], out[f"conv{n}.bias"] = w, b
    return out


def load(weights: str | os.PathLike | None = None, num_classes: int = 10, **kwargs) -> tuple[nn.Module, Callable]:
    """VGG-16 in eval mode and its evaluation preprocess.

    Parameters
    ----------
    weights:
        A checkpoint for :func:`adapters.checkpoint.load_state_dict`; ``None``
        keeps the random (Kaiming) initialisation; ``"torchvision:vgg16[:WEIGHTS]"``
        or ``"torchvision:vgg16_bn[:WEIGHTS]"`` loads torchvision's weights
        (see the module docstring; the preprocess is then torchvision's).
    num_classes:
        Output classes (10 for Imagenette; ignored for torchvision weights,
        which set it from ``classifier.6``).
    **kwargs:
        Passed to :class:`VGG16` (``dropout``).

    Returns
    -------
    (model, preprocess)
        The model in eval mode and :func:`adapters.preprocess.imagenette_resize_crop`.
    """
    transferred = torchvision_into(weights, ("vgg16", "vgg16_bn"), "classifier.6.weight",
                                   lambda n: VGG16(num_classes=n, **kwargs), from_torchvision_state_dict)
    if transferred is not None:
        return transferred
    return built(VGG16(num_classes=num_classes, **kwargs), weights, "vgg16", imagenette_resize_crop())


CARD = register_model(Card(
    name="vgg16",
    build=load,
    preprocess=imagenette_resize_crop,
    params=NUM_PARAMETERS,
    summary="VGG-16 (Simonyan & Zisserman 2015, configuration D), 10-class Imagenette head",
    dataset="imagenette",
    figure_layers=("conv2", "conv4", "conv6", "conv8", "conv10", "conv13"),
    twins=("torchvision:vgg16", "torchvision:vgg16_bn"),
))

"""InceptionNet: GoogLeNet (Szegedy et al., 2014) with batch normalisation, 10 classes.

The stem and the nine Inception modules keep GoogLeNet's branch widths; as in
the original "CNN Internals" re-implementation every convolution is followed
by ``BatchNorm2d`` (a deviation from the paper, which trained without it and
needed auxiliary classifiers; those are left out). The 5x5 branch really uses
5x5 kernels (torchvision's ``googlenet`` uses 3x3 there).

Top level (names and order as in the original printout)::

    conv1 (3->64, 7x7 s2 p3)  bn1  relu1  maxpool1 (3 s2 p1)
    conv2 (64->64, 1x1)       bn2  relu2
    conv3 (64->192, 3x3 p1)   bn3  relu3  maxpool2
    inception3a (256)  inception3b (480)  maxpool3
    inception4a (512)  inception4b (512)  inception4c (512)  inception4d (528)  inception4e (832)  maxpool4
    inception5a (832)  inception5b (1024)
    avgpool (1x1)  dropout (p=0.5)  fc (1024->10)

Each Inception module (:class:`Inception`) has four branches, concatenated on
channels in this order::

    branch1: conv (1x1)                                   bn relu
    branch2: conv1 (1x1 reduce) bn1 relu1  conv2 (3x3 p1) bn2 relu2
    branch3: conv1 (1x1 reduce) bn1 relu1  conv2 (5x5 p2) bn2 relu2
    branch4: pool (3x3 s1 p1)  conv (1x1 pool projection) bn relu

Widths (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj) are those of
Table 1 of the paper (:data:`INCEPTION_CONFIG`).

Conv numbering
--------------
The original figures number the convolutions of the whole network conv1,
conv2, ... in forward order (conv1-conv3 the stem, conv4-conv9 inception3a,
conv10-conv15 inception3b, ..., 57 in all). :attr:`InceptionNet.layer_aliases`
maps each such ``"convN"`` beyond the stem to its module path, e.g.
``"conv4" -> "inception3a.branch1.conv"``, ``"conv18" -> "inception4a.branch2.conv2"``.

Shapes at 224x224: conv1 64x112 -> maxpool1 64x56 -> conv3 192x56 -> maxpool2
192x28 -> 3a 256x28 -> 3b 480x28 -> maxpool3 480x14 -> 4a..4e 512/512/512/528/832x14
-> maxpool4 832x7 -> 5a 832x7 -> 5b 1024x7 -> avgpool 1024 -> fc 10.

Parameter count
---------------
**5,998,362** trainable parameters (all convolutions have biases, as the
printed stem convolutions do; BatchNorm affine parameters included): stem
125,056, the nine Inception modules 5,863,056, fc 10,250 (by kind:
convolutions 5,973,552, BatchNorm 14,560, fc 10,250).

Initialisation: Kaiming normal conv/linear weights, zero biases, BatchNorm
weight 1 and bias 0 (:func:`adapters.init.init_weights`).

torchvision's GoogLeNet weights
-------------------------------
``load(weights="torchvision:googlenet")`` (or ``"torchvision:googlenet:IMAGENET1K_V1"``,
or ``"torchvision:googlenet:PATH"``) puts torchvision's ``googlenet`` weights into
this model (:func:`from_torchvision_state_dict`), with a 1000-way ``fc``. Every
parameter transfers, and these differences are bridged exactly (to float rounding):

* torchvision's convolutions have no bias: ours get bias 0;
* torchvision's BatchNorm has ``eps=1e-3``, ours 1e-5: the running variance is
  stored as ``var + 1e-3 - 1e-5``, which gives the same ``sqrt(var + eps)``;
* torchvision's "5x5" branch uses 3x3 kernels (a known torchvision bug, kept
  for its published weights): each 3x3 kernel becomes the centre of a 5x5
  kernel with a zero rim, which with padding 2 computes the same map as the
  3x3 kernel with padding 1;
* the published weights expect ``transform_input=True`` (inputs scaled to
  [-1, 1] inside the model): the returned preprocess normalises with mean and
  std 0.5 instead, which is the same map.

Not transferred: the auxiliary classifiers (``aux1``, ``aux2``; this model has
none); dropout differs (0.5 here, 0.2 there) but is off in eval mode.

**What differs, and stays ours**: the four stride-2 max pools. The seed prints
``MaxPool2d(kernel_size=3, stride=2, padding=1)`` for ``maxpool1..4``;
torchvision uses ``MaxPool2d(3, 2, ceil_mode=True)`` without padding for the
first three and ``MaxPool2d(2, 2, ceil_mode=True)`` for ``maxpool4``. Output
sizes agree at 224 px, but the pooling windows are shifted by one pixel (and
``maxpool4`` is 3x3 rather than 2x2), so with our pools the logits are close
but not torchvision's. ``load(..., torchvision_pools=True)`` (or
:func:`use_torchvision_pools`) swaps in torchvision's four pools on that
instance, module names unchanged, and then the logits equal torchvision's.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn
from torchvision.transforms import v2 as T

from .checkpoint import load_into
from .hub import torchvision_into
from .init import init_weights
from .preprocess import imagenette_resize_crop
from .registry import Card, register_model

__all__ = [
    "Inception",
    "InceptionNet",
    "INCEPTION_CONFIG",
    "load",
    "NUM_PARAMETERS",
    "from_torchvision_state_dict",
    "use_torchvision_pools",
    "CARD",
]

NUM_PARAMETERS = 5_998_362

# name -> (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj), GoogLeNet Table 1.
INCEPTION_CONFIG: dict[str, tuple[int, int, int, int, int, int]] = {
    "inception3a": (64, 96, 128, 16, 32, 32),
    "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64),
    "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64),
    "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128),
    "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}


def _as_ordered(modules: dict[str, nn.Module]) -> "OrderedDict[str, nn.Module]":
    # nn.Sequential keeps names only when given an OrderedDict.
    return OrderedDict(modules)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, suffix: str = "") -> dict[str, nn.Module]:
    return {
        f"conv{suffix}": nn.Conv2d(in_ch, out_ch, kernel_size=kernel, padding=kernel // 2),
        f"bn{suffix}": nn.BatchNorm2d(out_ch),
        f"relu{suffix}": nn.ReLU(),
    }


class Inception(nn.Module):
    """One Inception module: four parallel branches concatenated on channels.

    Parameters
    ----------
    in_channels:
        Channels of the input map.
    ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj:
        Branch widths, as in Table 1 of the GoogLeNet paper.
    """

    def __init__(
        self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int, pool_proj: int
    ) -> None:
        super().__init__()
        self.branch1 = nn.Sequential(_as_ordered(_conv_bn_relu(in_channels, ch1x1, 1)))
        self.branch2 = nn.Sequential(
            _as_ordered({**_conv_bn_relu(in_channels, ch3x3red, 1, "1"), **_conv_bn_relu(ch3x3red, ch3x3, 3, "2")})
        )
        self.branch3 = nn.Sequential(
            _as_ordered({**_conv_bn_relu(in_channels, ch5x5red, 1, "1"), **_conv_bn_relu(ch5x5red, ch5x5, 5, "2")})
        )
        self.branch4 = nn.Sequential(
            _as_ordered({"pool": nn.MaxPool2d(3, stride=1, padding=1), **_conv_bn_relu(in_channels, pool_proj, 1)})
        )
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenation of the four branch outputs (same spatial size as ``x``)."""
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)


class InceptionNet(nn.Module):
    """GoogLeNet with BatchNorm after every convolution (see the module docstring).

    Parameters
    ----------
    num_classes:
        Size of the output layer ``fc``.
    dropout:
        Dropout probability before ``fc``.

    Attributes
    ----------
    layer_aliases:
        ``"convN"`` (forward-order numbering of all 57 convolutions) to module
        path, for every N > 3.
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu1 = nn.ReLU()
        self.maxpool1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(64, 192, kernel_size=3, stride=1, padding=1)
        self.bn3 = nn.BatchNorm2d(192)
        self.relu3 = nn.ReLU()
        self.maxpool2 = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 192
        for name, widths in INCEPTION_CONFIG.items():
            block = Inception(in_ch, *widths)
            self.add_module(name, block)
            in_ch = block.out_channels
            # Pools sit after 3b and 4e, as in the printout.
            if name == "inception3b":
                self.maxpool3 = nn.MaxPool2d(3, stride=2, padding=1)
            elif name == "inception4e":
                self.maxpool4 = nn.MaxPool2d(3, stride=2, padding=1)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1024, num_classes)
        self.layer_aliases: dict[str, str] = self._conv_aliases()
        init_weights(self)

    def _conv_aliases(self) -> dict[str, str]:
        # Registration order equals forward order (stem, then each module's
        # branches 1..4 in the order forward() concatenates them).
        convs = [name for name, m in self.named_modules() if isinstance(m, nn.Conv2d)]
        return {f"conv{i}": name for i, name in enumerate(convs, start=1) if name != f"conv{i}"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch ``Bx3xHxW`` (224x224 in the recipe)."""
        x = self.maxpool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.maxpool2(self.relu3(self.bn3(self.conv3(x))))
        x = self.inception3b(self.inception3a(x))
        x = self.maxpool3(x)
        x = self.inception4a(x)
        x = self.inception4b(x)
        x = self.inception4c(x)
        x = self.inception4d(x)
        x = self.inception4e(x)
        x = self.maxpool4(x)
        x = self.inception5b(self.inception5a(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


# BatchNorm epsilon of torchvision's GoogLeNet (BasicConv2d) and ours (torch's default).
_TV_BN_EPS = 1e-3
_OUR_BN_EPS = 1e-5


def _torchvision_module_names() -> dict[str, str]:
    """torchvision ``googlenet`` module name -> ours, for every conv and BatchNorm."""
    names = {}
    for k in (1, 2, 3):
        names[f"conv{k}.conv"] = f"conv{k}"
        names[f"conv{k}.bn"] = f"bn{k}"
    for block in INCEPTION_CONFIG:
        names[f"{block}.branch1.conv"] = f"{block}.branch1.conv"
        names[f"{block}.branch1.bn"] = f"{block}.branch1.bn"
        for branch in ("branch2", "branch3"):
            for j in (0, 1):  # torchvision: a Sequential of two BasicConv2d
                names[f"{block}.{branch}.{j}.conv"] = f"{block}.{branch}.conv{j + 1}"
                names[f"{block}.{branch}.{j}.bn"] = f"{block}.{branch}.bn{j + 1}"
        names[f"{block}.branch4.1.conv"] = f"{block}.branch4.conv"  # branch4.0 is the pool
        names[f"{block}.branch4.1.bn"] = f"{block}.branch4.bn"
    names["fc"] = "fc"
    return names


def from_torchvision_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision ``googlenet`` state dict as a full :class:`InceptionNet` state dict.

    See "torchvision's GoogLeNet weights" in the module docstring for what is
    converted (conv biases, BatchNorm epsilon, 3x3 -> 5x5 kernels) and what is
    dropped (the auxiliary classifiers).

    Parameters
    ----------
    state:
        ``torchvision.models.googlenet(...).state_dict()``-style keys, with or
        without ``aux1.*`` / ``aux2.*``.

    Returns
    -------
    dict
        Every key of ``InceptionNet(num_classes=state["fc.weight"].shape[0])``.

    Raises
    ------
    ValueError
        If a key is not one of torchvision's GoogLeNet keys, or one is missing.
    """
    names = _torchvision_module_names()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module.startswith(("aux1.", "aux2.")):
            continue  # auxiliary classifiers: not part of this model
        if module not in names:
            raise ValueError(f"unexpected key {key!r}: not a torchvision googlenet state dict")
        ours = names[module]
        if module.endswith(".conv") and leaf == "weight":
            if ours.endswith("branch3.conv2") and value.shape[-1] == 3:
                value = torch.nn.functional.pad(value, (1, 1, 1, 1))  # 3x3 in the centre of a zero 5x5
            out[f"{ours}.weight"] = value
            out.setdefault(f"{ours}.bias", torch.zeros(value.shape[0], dtype=value.dtype))
        elif module.endswith(".bn") and leaf == "running_var":
            # Same sqrt(var + eps) under our epsilon.
            out[f"{ours}.running_var"] = value + (_TV_BN_EPS - _OUR_BN_EPS)
        else:
            out[f"{ours}.{leaf}"] = value
    missing = [f"{ours}.weight" for module, ours in names.items() if f"{ours}.weight" not in out]
    if missing:
        raise ValueError(f"not a complete torchvision googlenet state dict: no weights for {', '.join(missing[:3])}"
                         + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    return out


def use_torchvision_pools(model: InceptionNet) -> InceptionNet:
    """Swap torchvision GoogLeNet's four stride-2 max pools into ``model`` (in place; names unchanged).

    ``maxpool1..3`` become ``MaxPool2d(3, 2, ceil_mode=True)`` and ``maxpool4``
    ``MaxPool2d(2, 2, ceil_mode=True)``. With torchvision's weights this makes
    the logits equal torchvision's; the seed's own pools are the default.
    """
    for name in ("maxpool1", "maxpool2", "maxpool3"):
        setattr(model, name, nn.MaxPool2d(3, stride=2, ceil_mode=True))
    model.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
    return model


def load(weights: str | os.PathLike | None = None, num_classes: int = 10, **kwargs) -> tuple[nn.Module, Callable]:
    """InceptionNet in eval mode and its evaluation preprocess.

    Parameters
    ----------
    weights:
        A checkpoint for :func:`adapters.checkpoint.load_state_dict`; ``None``
        keeps the random initialisation; ``"torchvision:googlenet[:WEIGHTS]"``
        loads torchvision's GoogLeNet weights (see the module docstring).
    num_classes:
        Output classes (10 for Imagenette; ignored for torchvision weights,
        which set it from their ``fc``).
    **kwargs:
        Passed to :class:`InceptionNet` (``dropout``), except
        ``torchvision_pools=True``, which applies :func:`use_torchvision_pools`,
        and ``transform_input`` (torchvision weights only, default ``True`` as
        for the published file; ``False`` for a file trained without it).

    Returns
    -------
    (model, preprocess)
        ``preprocess``: resize 256, centre 224 crop, [0, 1], Imagenette mean/std
        (shipped in the package);
        for torchvision weights torchvision's resize and crop with mean and std
        0.5 (the published weights' ``transform_input``).
    """
    tv_pools = bool(kwargs.pop("torchvision_pools", False))
    transform_input = kwargs.pop("transform_input", None)
    transferred = torchvision_into(weights, ("googlenet",), "fc.weight",
                                   lambda n: InceptionNet(num_classes=n, **kwargs), from_torchvision_state_dict)
    if transferred is not None:
        model, preprocess = transferred
        if transform_input is None or transform_input:
            preprocess = _transform_input_preprocess(preprocess)
    else:
        if transform_input is not None:
            raise ValueError("transform_input applies to torchvision:googlenet weights only")
        model = InceptionNet(num_classes=num_classes, **kwargs)
        if weights is not None:
            load_into(model, weights, "inception")
        model, preprocess = model.eval(), imagenette_resize_crop()
    if tv_pools:
        use_torchvision_pools(model)
    return model, preprocess


def _transform_input_preprocess(preprocess: Callable) -> Callable:
    """torchvision's preprocess with GoogLeNet's ``transform_input`` folded in: Normalize(0.5, 0.5).

    The published weights were trained on inputs ``(x - 0.5) / 0.5``; torchvision
    feeds ImageNet-normalised tensors and undoes that inside the model
    (``x * std / 0.5 + (mean - 0.5) / 0.5``), which is the same map.
    """
    steps = list(getattr(preprocess, "transforms", []))
    if not steps or not isinstance(steps[-1], T.Normalize):
        raise ValueError("expected torchvision's preprocess to end with Normalize")
    return T.Compose(steps[:-1] + [T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])])


CARD = register_model(Card(
    name="inception",
    build=load,
    preprocess=imagenette_resize_crop,
    params=NUM_PARAMETERS,
    summary="InceptionNet: GoogLeNet (Szegedy et al. 2014) with BatchNorm, 10-class Imagenette head",
    dataset="imagenette",
    figure_layers=tuple(f"conv{n}" for n in range(2, 19, 2)),
    twins=("torchvision:googlenet",),
))

"""The family pairing (adapters.TWINS) and the convN layer correspondence on the pretrained architectures.

``convN`` must name the N-th ``nn.Conv2d`` *called* in the forward pass on the
torchvision / timm models too. The order here comes from forward hooks, which
is independent of the fx trace the engine uses. Random weights throughout
(the architectures are what matters; nothing is downloaded).
"""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

import adapters
import interp

from _convs import called_convs


@functools.lru_cache(maxsize=None)
def _model(spec: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet's FutureWarning about its default init
        model, _ = adapters.load(spec)
    return model


@pytest.mark.parametrize(
    "spec,n_convs",
    [
        ("torchvision:resnet18", 20),  # 17 + the three projection shortcuts
        ("torchvision:googlenet", 57),  # the auxiliary heads' convs are not called in eval mode
        ("torchvision:vgg16", 13),
        ("torchvision:alexnet", 5),
        ("timm:mobilenetv1_100", 27),
    ],
)
def test_convN_is_the_nth_conv_called_on_the_pretrained_architectures(spec, n_convs):
    model = _model(spec)
    order = called_convs(model, 64)
    assert len(order) == n_convs
    for i, name in enumerate(order, start=1):
        got = interp.resolve_layer(model, f"conv{i}").name
        if spec == "torchvision:googlenet" and i <= 3:
            # A real module name wins over the alias: GoogLeNet's stem blocks are named
            # conv1..conv3 (BasicConv2d: conv, bn, relu), so convN (N <= 3) is the block
            # around the N-th conv, its output after BatchNorm and ReLU.
            assert got == f"conv{i}" and name == f"conv{i}.conv"
        else:
            assert got == name, (spec, i)


def _conv(model: nn.Module, i: int) -> nn.Conv2d:
    return interp.resolve_layer(model, f"conv{i}").module


@pytest.mark.parametrize(
    "ours,twin,n",
    [("inception", "torchvision:googlenet", 57), ("vgg16", "torchvision:vgg16", 13),
     ("mobilenet", "timm:mobilenetv1_100", 27)],
)
def test_convN_picks_the_same_layer_on_both_sides(ours, twin, n):
    a, b = _model(ours), _model(twin)
    assert twin in adapters.TWINS[ours]
    for i in range(1, n + 1):
        ca, cb = _conv(a, i), _conv(b, i)
        cb = getattr(cb, "conv", cb)  # googlenet's conv1..conv3 blocks (see above)
        assert (ca.in_channels, ca.out_channels, ca.stride, ca.groups) == (cb.in_channels, cb.out_channels, cb.stride, cb.groups), i
        if ours == "inception" and ca.kernel_size == (5, 5):
            assert cb.kernel_size == (3, 3)  # torchvision's "5x5" branch
        else:
            assert ca.kernel_size == cb.kernel_size, i
    with pytest.raises(ValueError):
        _conv(b, n + 1) if ours != "inception" else _conv(a, n + 1)


def test_resnet18_convN_agree_up_to_conv7_then_torchvision_counts_the_projections():
    from adapters.resnet18 import TORCHVISION_NAMES

    ours, tv = _model("resnet18"), _model("torchvision:resnet18")
    for i in range(1, 18):
        shift = 0 if i <= 7 else 1 if i <= 11 else 2 if i <= 15 else 3
        assert interp.resolve_layer(tv, f"conv{i + shift}").name == TORCHVISION_NAMES[f"conv{i}"], i
    for j, tv_index in ((1, 8), (2, 13), (3, 18)):
        assert interp.resolve_layer(tv, f"conv{tv_index}").name == TORCHVISION_NAMES[f"conv_proj{j}"]
    assert _conv(ours, 8) is ours.conv8 and interp.resolve_layer(tv, "conv8").name == "layer2.0.downsample.0"


def test_alexnet_pairs_by_position_only():
    # Same five kernel sizes and strides; our seed AlexNet is the 2012 paper's
    # (96/256/384/384/256 channels, LRN), torchvision's the narrower 2014 variant.
    ours, tv = _model("alexnet"), _model("torchvision:alexnet")
    assert [_conv(ours, i).kernel_size[0] for i in range(1, 6)] == [_conv(tv, i).kernel_size[0] for i in range(1, 6)]
    assert [_conv(ours, i).out_channels for i in range(1, 6)] == [96, 256, 384, 384, 256]
    assert [_conv(tv, i).out_channels for i in range(1, 6)] == [64, 192, 384, 256, 256]


def test_every_family_is_paired():
    assert set(adapters.TWINS) == {"lenet5", "alexnet", "vgg16", "inception", "resnet18", "mobilenet"}
    assert adapters.TWINS["lenet5"] == ()
    for twins in adapters.TWINS.values():
        for spec in twins:
            assert spec.startswith(("torchvision:", "timm:")) or spec in adapters.names()

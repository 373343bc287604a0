"""Tests of the Imagenette models, the Imagenette dataset and its cached statistics (recipes: tests/training).

The printouts below are copied from the original "CNN Internals" README
(sections 2-6); each model must reproduce them module by module.
"""
from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import adapters
from adapters import preprocess as P
from adapters.datasets import imagenette
from adapters.alexnet import AlexNet
from adapters.inception import INCEPTION_CONFIG, Inception, InceptionNet
from adapters.mobilenet import MobileNetV1
from adapters.resnet18 import TORCHVISION_NAMES, ResNet18
from adapters.vgg16 import VGG16

from _bn import randomise_bn
from _convs import called_convs

from conftest import REPO  # noqa: E402


def _data_root() -> Path:
    root = Path(os.environ.get("CNN_INTERNALS_DATA", REPO.parent / "shared" / "data"))
    if not (root / "imagenette2-160").is_dir():
        pytest.fail(f"Imagenette not found at {root / 'imagenette2-160'} (set CNN_INTERNALS_DATA)", pytrace=False)
    return root


SEED_ALEXNET = """
  (conv1): Conv2d(3, 96, kernel_size=(11, 11), stride=(4, 4), padding=(2, 2))
  (relu1): ReLU()
  (lrn1): LocalResponseNorm(5, alpha=0.0005, beta=0.75, k=2)
  (pool1): MaxPool2d(kernel_size=3, stride=2, padding=0, dilation=1, ceil_mode=False)
  (conv2): Conv2d(96, 256, kernel_size=(5, 5), stride=(1, 1), padding=(2, 2))
  (relu2): ReLU()
  (lrn2): LocalResponseNorm(5, alpha=0.0005, beta=0.75, k=2)
  (pool2): MaxPool2d(kernel_size=3, stride=2, padding=0, dilation=1, ceil_mode=False)
  (conv3): Conv2d(256, 384, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
  (relu3): ReLU()
  (conv4): Conv2d(384, 384, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
  (relu4): ReLU()
  (conv5): Conv2d(384, 256, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
  (relu5): ReLU()
  (pool3): MaxPool2d(kernel_size=3, stride=2, padding=0, dilation=1, ceil_mode=False)
  (lin1): Linear(in_features=9216, out_features=4096, bias=True)
  (relu6): ReLU()
  (drop1): Dropout(p=0.5, inplace=False)
  (lin2): Linear(in_features=4096, out_features=4096, bias=True)
  (relu7): ReLU()
  (drop2): Dropout(p=0.5, inplace=False)
  (lin3): Linear(in_features=4096, out_features=10, bias=True)
"""

SEED_VGG16 = """
  (conv1): Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
  (relu1): ReLU()
  (conv2): Conv2d(64, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
  (relu2): ReLU()
  (pool1): MaxPool2d(kernel_size=2, stride=2)
  (conv3): Conv2d(64, 128, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
  (relu3): ReLU()
  (conv4): Conv2d(128, 128, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
  (relu4): ReLU()
  (pool2): MaxPool2d(kernel_size=2, stride=2)
  (conv5): Conv2d(128, 256, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
  (relu5): ReLU()
  (conv6): Conv2d(256, 256, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
  (relu6): ReLU()
  (conv7): Conv2d(256, 256, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
  (relu7): ReLU()
  (pool3): MaxPool2d(kernel_size=2, stride=2)
  (conv8): Conv2d(256, 512, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
  (relu8): ReLU()
  (conv9): Conv2d(512, 512, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
  (relu9): ReLU()
  (conv10): Conv2d(512, 512, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
  (relu10): ReLU()
  (pool4): MaxPool2d(kernel_size=2, stride=2)
  (conv11): Conv2d(512, 512, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
  (relu11): ReLU()
  (conv12): Conv2d(512, 512, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
  (relu12): ReLU()
  (conv13): Conv2d(512, 512, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
  (relu13): ReLU()
  (pool5): MaxPool2d(kernel_size=2, stride=2)
  (avgpool): AdaptiveAvgPool2d(output_size=(7, 7))
  (fc1): Linear(in_features=25088, out_features=4096, bias=True)
  (relu14): ReLU()
  (drop1): Dropout(p=0.5, inplace=False)
  (fc2): Linear(in_features=4096, out_features=4096, bias=True)
  (relu15): ReLU()
  (drop2): Dropout(p=0.5, inplace=False)
  (fc3): Linear(in_features=4096, out_features=10, bias=True)
"""

SEED_INCEPTION = """
  (conv1): Conv2d(3, 64, kernel_size=(7, 7), stride=(2, 2), padding=(3, 3))
  (bn1): BatchNorm2d(64)
  (relu1): ReLU()
  (maxpool1): MaxPool2d(kernel_size=3, stride=2, padding=1)
  (conv2): Conv2d(64, 64, kernel_size=(1, 1))
  (bn2): BatchNorm2d(64)
  (relu2): ReLU()
  (conv3): Conv2d(64, 192, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
  (bn3): BatchNorm2d(192)
  (relu3): ReLU()
  (maxpool2): MaxPool2d(kernel_size=3, stride=2, padding=1)
  [Inception 3a module with 256 output channels]
  [Inception 3b module with 480 output channels]
  (maxpool3): MaxPool2d(kernel_size=3, stride=2, padding=1)
  [Inception 4a module with 512 output channels]
  [Inception 4b module with 512 output channels]
  [Inception 4c module with 512 output channels]
  [Inception 4d module with 528 output channels]
  [Inception 4e module with 832 output channels]
  (maxpool4): MaxPool2d(kernel_size=3, stride=2, padding=1)
  [Inception 5a module with 832 output channels]
  [Inception 5b module with 1024 output channels]
  (avgpool): AdaptiveAvgPool2d(output_size=(1, 1))
  (dropout): Dropout(p=0.5, inplace=False)
  (fc): Linear(in_features=1024, out_features=10, bias=True)
"""

SEED_RESNET = """
  (conv1): Conv2d(3, 64, kernel_size=(7, 7), stride=(2, 2), padding=(3, 3), bias=False)
  (bn1): BatchNorm2d(64)
  (relu1): ReLU()
  (pool1): MaxPool2d(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
  (conv2): Conv2d(64, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
  (bn2): BatchNorm2d(64)
  (relu2): ReLU()
  (conv3): Conv2d(64, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
  (bn3): BatchNorm2d(64)
  (relu3): ReLU()
  (conv4): Conv2d(64, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
  (bn4): BatchNorm2d(64)
  (relu4): ReLU()
  (conv5): Conv2d(64, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
  (bn5): BatchNorm2d(64)
  (relu5): ReLU()
  (conv6): Conv2d(64, 128, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), bias=False)
  (bn6): BatchNorm2d(128)
  (relu6): ReLU()
  (conv7): Conv2d(128, 128, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
  (bn7): BatchNorm2d(128)
  (relu7): ReLU()
  (conv_proj1): Conv2d(64, 128, kernel_size=(1, 1), stride=(2, 2), bias=False)
  (bn_proj1): BatchNorm2d(128)
  (conv8): Conv2d(128, 128, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
  (bn8): BatchNorm2d(128)
  (relu8): ReLU()
  (conv9): Conv2d(128, 128, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
  (bn9): BatchNorm2d(128)
  (relu9): ReLU()
  (conv10): Conv2d(128, 256, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), bias=False)
  (bn10): BatchNorm2d(256)
  (relu10): ReLU()
  (conv11): Conv2d(256, 256, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
  (bn11): BatchNorm2d(256)
  (relu11): ReLU()
  (conv_proj2): Conv2d(128, 256, kernel_size=(1, 1), stride=(2, 2), bias=False)
  (bn_proj2): BatchNorm2d(256)
  (conv12): Conv2d(256, 256, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
  (bn12): BatchNorm2d(256)
  (relu12): ReLU()
  (conv13): Conv2d(256, 256, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
  (bn13): BatchNorm2d(256)
  (relu13): ReLU()
  (conv14): Conv2d(256, 512, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), bias=False)
  (bn14): BatchNorm2d(512)
  (relu14): ReLU()
  (conv15): Conv2d(512, 512, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
  (bn15): BatchNorm2d(512)
  (relu15): ReLU()
  (conv_proj3): Conv2d(256, 512, kernel_size=(1, 1), stride=(2, 2), bias=False)
  (bn_proj3): BatchNorm2d(512)
  (conv16): Conv2d(512, 512, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
  (bn16): BatchNorm2d(512)
  (relu16): ReLU()
  (conv17): Conv2d(512, 512, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
  (bn17): BatchNorm2d(512)
  (relu17): ReLU()
  (avgpool): AdaptiveAvgPool2d(output_size=(1, 1))
  (fc): Linear(in_features=512, out_features=10, bias=True)
"""

SEED_MOBILENET = """
  (conv1): Conv2d(3, 32, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), bias=False)
  (bn1): BatchNorm2d(32)
  (relu1): ReLU()
  (conv2): Conv2d(32, 32, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), groups=32, bias=False)
  (bn2): BatchNorm2d(32)
  (relu2): ReLU()
  (conv3): Conv2d(32, 64, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), bias=False)
  (bn3): BatchNorm2d(64)
  (relu3): ReLU()
  (conv4): Conv2d(64, 64, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), groups=64, bias=False)
  (bn4): BatchNorm2d(64)
  (relu4): ReLU()
  (conv5): Conv2d(64, 128, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), bias=False)
  (bn5): BatchNorm2d(128)
  (relu5): ReLU()
  [... 22 more depthwise separable convolution blocks ...]
  (conv26): Conv2d(1024, 1024, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), groups=1024, bias=False)
  (bn26): BatchNorm2d(1024)
  (relu26): ReLU()
  (conv27): Conv2d(1024, 1024, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), bias=False)
  (bn27): BatchNorm2d(1024)
  (relu27): ReLU()
  (avgpool): AdaptiveAvgPool2d(output_size=(1, 1))
  (fc): Linear(in_features=1024, out_features=10, bias=True)
"""

_LINE = re.compile(r"^\((\w+)\): (\w+\(.*\))$")
_NS = {
    name: getattr(nn, name)
    for name in ("Conv2d", "ReLU", "LocalResponseNorm", "MaxPool2d", "Linear", "Dropout", "BatchNorm2d", "AdaptiveAvgPool2d")
}


def _printed(text: str) -> list[tuple[str, nn.Module | str]]:
    """(name, module built from the printed constructor) per line; bracket lines kept as text."""
    out = []
    for line in text.strip().splitlines():
        line = line.strip()
        m = _LINE.match(line)
        if m:
            out.append((m.group(1), eval(m.group(2), {"__builtins__": {}}, _NS)))
        else:
            out.append(("", line))
    return out


def _assert_same(name: str, expected: nn.Module, actual: nn.Module) -> None:
    assert type(actual) is type(expected), f"{name}: {type(actual).__name__} != {type(expected).__name__}"
    assert repr(actual) == repr(expected), f"{name}: {actual!r} != {expected!r}"


@functools.lru_cache(maxsize=None)
def _shared(cls: type) -> nn.Module:
    """One seeded instance per class for the read-only tests (VGG-16 alone takes seconds to build)."""
    torch.manual_seed(0)
    return cls()


@pytest.fixture(scope="module", autouse=True)
def _free_shared_models():
    yield
    _shared.cache_clear()  # do not hold ~800 MB of VGG/AlexNet weights for the rest of the session


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _output_shapes(model: nn.Module, names: list[str], size: int = 224) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    modules = dict(model.named_modules())
    def record(name: str):
        def hook(_module, _inputs, out) -> None:  # returns None: leaves the output alone
            shapes.setdefault(name, tuple(out.shape))

        return hook

    handles = [modules[n].register_forward_hook(record(n)) for n in names]
    try:
        with torch.no_grad():
            shapes["output"] = tuple(model.eval()(torch.randn(1, 3, size, size)).shape)
    finally:
        for h in handles:
            h.remove()
    return shapes


# ----------------------------------------------------------------- architecture vs the seed


@pytest.mark.parametrize(
    "cls, text",
    [(AlexNet, SEED_ALEXNET), (VGG16, SEED_VGG16), (ResNet18, SEED_RESNET)],
    ids=["alexnet", "vgg16", "resnet18"],
)
def test_fully_printed_models_match_the_seed_module_by_module(cls, text):
    printed = _printed(text)
    children = list(_shared(cls).named_children())
    assert [n for n, _ in children] == [n for n, _ in printed]
    for (name, actual), (_, expected) in zip(children, printed):
        _assert_same(name, expected, actual)


def test_inception_matches_the_seed_and_googlenet_widths():
    model = _shared(InceptionNet)
    children = dict(model.named_children())
    names = []
    for name, expected in _printed(SEED_INCEPTION):
        if name:
            _assert_same(name, expected, children[name])
            names.append(name)
        else:  # "[Inception 3a module with 256 output channels]"
            m = re.fullmatch(r"\[Inception (\w+) module with (\d+) output channels\]", expected)
            block = children[f"inception{m.group(1)}"]
            assert isinstance(block, Inception)
            assert block.out_channels == int(m.group(2))
            names.append(f"inception{m.group(1)}")
    assert [n for n, _ in model.named_children()] == names
    # Every conv is followed by BN + ReLU inside the modules, too; 3 + 9 * 6 convs.
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 57
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 57
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 57
    b = model.inception4d
    assert [(n, m.in_channels, m.out_channels, m.kernel_size) for n, m in b.named_modules() if isinstance(m, nn.Conv2d)] == [
        ("branch1.conv", 512, 112, (1, 1)),
        ("branch2.conv1", 512, 144, (1, 1)),
        ("branch2.conv2", 144, 288, (3, 3)),
        ("branch3.conv1", 512, 32, (1, 1)),
        ("branch3.conv2", 32, 64, (5, 5)),
        ("branch4.conv", 512, 64, (1, 1)),
    ]
    assert INCEPTION_CONFIG["inception5b"] == (384, 192, 384, 48, 128, 128)


def test_inception_layer_aliases_follow_forward_order():
    model = InceptionNet()
    order = called_convs(model)
    assert len(order) == 57
    expected = {f"conv{i}": n for i, n in enumerate(order, start=1) if n != f"conv{i}"}
    assert model.layer_aliases == expected
    assert model.layer_aliases["conv4"] == "inception3a.branch1.conv"
    assert model.layer_aliases["conv10"] == "inception3b.branch1.conv"
    assert model.layer_aliases["conv18"] == "inception4a.branch2.conv2"
    assert "conv3" not in model.layer_aliases


def test_mobilenet_matches_the_seed_and_has_27_convs():
    model = MobileNetV1()
    children = dict(model.named_children())
    printed = [(n, m) for n, m in _printed(SEED_MOBILENET) if n]
    for name, expected in printed:
        _assert_same(name, expected, children[name])
    names = [n for n, _ in model.named_children()]
    assert names == [f"{k}{i}" for i in range(1, 28) for k in ("conv", "bn", "relu")] + ["avgpool", "fc"]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 27
    depthwise = [i for i, c in enumerate(convs, start=1) if c.groups > 1]
    assert depthwise == list(range(2, 27, 2))
    assert all(c.groups == c.in_channels == c.out_channels for c in convs if c.groups > 1)
    assert [c.stride[0] for c in convs if c.groups > 1] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
    assert [c.out_channels for c in convs[2::2]] == [64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    assert model.layer_aliases == {}


def test_mobilenet_width_025_has_the_keras_alpha_025_shapes():
    model = MobileNetV1(width_mult=0.25)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs[::2]] == [8, 16, 32, 32, 64, 64, 128, 128, 128, 128, 128, 128, 256, 256]
    assert _n_params(model) == 215_642
    # Keras' mobilenet_2_5_224_tf_no_top.h5 holds 218,544 values: kernels + BN gamma/beta/mean/variance.
    backbone = _n_params(model) - _n_params(model.fc)
    running = sum(b.numel() for n, b in model.named_buffers() if "running" in n)
    assert backbone + running == 218_544
    with pytest.raises(ValueError, match="width_mult"):
        MobileNetV1(width_mult=1.5)


# ----------------------------------------------------------------- parameter counts and shapes


@pytest.mark.parametrize(
    "cls, count",
    [(AlexNet, 58_322_314), (VGG16, 134_301_514), (InceptionNet, 5_998_362), (ResNet18, 11_181_642), (MobileNetV1, 3_217_226)],
    ids=["alexnet", "vgg16", "inception", "resnet18", "mobilenet"],
)
def test_parameter_count_matches_the_docstring(cls, count):
    import importlib

    module = importlib.import_module(cls.__module__)
    assert _n_params(_shared(cls)) == count == module.NUM_PARAMETERS
    assert f"{count:,}" in module.__doc__


def test_output_shapes_at_224():
    torch.manual_seed(0)
    s = _output_shapes(_shared(AlexNet), ["pool1", "pool2", "conv5", "pool3"])
    assert s == {"pool1": (1, 96, 27, 27), "pool2": (1, 256, 13, 13), "conv5": (1, 256, 13, 13),
                 "pool3": (1, 256, 6, 6), "output": (1, 10)}
    s = _output_shapes(_shared(VGG16), ["pool1", "pool3", "pool5", "avgpool"])
    assert s == {"pool1": (1, 64, 112, 112), "pool3": (1, 256, 28, 28), "pool5": (1, 512, 7, 7),
                 "avgpool": (1, 512, 7, 7), "output": (1, 10)}
    blocks = [n for n in INCEPTION_CONFIG]
    s = _output_shapes(_shared(InceptionNet), ["maxpool2"] + blocks)
    assert s["maxpool2"] == (1, 192, 28, 28)
    assert [s[b][1:] for b in blocks] == [
        (256, 28, 28), (480, 28, 28), (512, 14, 14), (512, 14, 14), (512, 14, 14), (528, 14, 14),
        (832, 14, 14), (832, 7, 7), (1024, 7, 7),
    ]
    assert s["output"] == (1, 10)
    s = _output_shapes(_shared(ResNet18), ["pool1", "relu5", "relu7", "relu11", "relu15", "relu17"])
    assert s == {"pool1": (1, 64, 56, 56), "relu5": (1, 64, 56, 56), "relu7": (1, 128, 28, 28),
                 "relu11": (1, 256, 14, 14), "relu15": (1, 512, 7, 7), "relu17": (1, 512, 7, 7), "output": (1, 10)}
    s = _output_shapes(_shared(MobileNetV1), ["relu1", "relu5", "relu13", "relu27"])
    assert s == {"relu1": (1, 32, 112, 112), "relu5": (1, 128, 56, 56), "relu13": (1, 512, 14, 14),
                 "relu27": (1, 1024, 7, 7), "output": (1, 10)}


def test_alexnet_rejects_other_input_sizes_clearly():
    with pytest.raises(ValueError, match="224x224"), torch.no_grad():
        AlexNet().eval()(torch.randn(1, 3, 128, 128))


def test_initialisation_is_kaiming_with_zero_biases():
    torch.manual_seed(0)
    model = ResNet18()
    w = model.conv2.weight  # 64 x 64 x 3 x 3: fan-in 576, Kaiming std sqrt(2 / 576) = 0.0589
    assert abs(float(w.detach().std()) - math.sqrt(2 / 576)) < 0.002
    assert torch.equal(model.bn_proj2.weight, torch.ones(256)) and torch.equal(model.bn_proj2.bias, torch.zeros(256))
    assert torch.equal(model.fc.bias, torch.zeros(10))
    alex = AlexNet()
    assert all(float(m.bias.detach().abs().max()) == 0 for m in alex.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert not any(getattr(m, "inplace", False) for m in alex.modules())


# ----------------------------------------------------------------- ResNet residual wiring


def test_resnet_identity_block_with_zeroed_last_bn_passes_the_shortcut():
    torch.manual_seed(0)
    model = ResNet18().eval()
    with torch.no_grad():
        model.bn5.weight.zero_()
        model.bn5.bias.zero_()
    s = {}
    for name in ("relu3", "relu5"):
        getattr(model, name).register_forward_hook(lambda _m, _i, out, name=name: s.update({name: out}))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    # Block 2 = relu5(bn5(conv5(...)) + x) with x = relu3's output (>= 0): relu(0 + x) = x.
    assert s["relu3"].abs().sum() > 0
    assert torch.equal(s["relu5"], s["relu3"])


def test_resnet_projection_block_with_zeroed_last_bn_is_relu_of_projection():
    torch.manual_seed(0)
    model = ResNet18().eval()
    with torch.no_grad():
        model.bn7.weight.zero_()
        model.bn7.bias.zero_()
    s = {}
    for name in ("relu7", "bn_proj1"):
        getattr(model, name).register_forward_hook(lambda _m, _i, out, name=name: s.update({name: out}))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert (s["bn_proj1"] < 0).any()  # the relu really clips something
    assert torch.equal(s["relu7"], torch.relu(s["bn_proj1"]))


def test_resnet_equals_torchvision_resnet18_with_the_same_weights():
    import torchvision

    torch.manual_seed(0)
    ours = randomise_bn(ResNet18().eval())  # non-trivial BN statistics, so a wrongly wired BN would show
    ref = torchvision.models.resnet18(num_classes=10).eval()
    state = {}
    for key, value in ours.state_dict().items():
        module, _, leaf = key.rpartition(".")
        state[f"{TORCHVISION_NAMES[module]}.{leaf}"] = value
    ref.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    assert _n_params(ref) == _n_params(ours)


# ----------------------------------------------------------------- load() and the registry


def test_registry_load_weights_round_trip(tmp_path):
    from PIL import Image
    from safetensors.torch import save_file

    assert {"alexnet", "vgg16", "inception", "resnet18", "mobilenet"} <= set(adapters.names())
    torch.manual_seed(1)
    model, preprocess = adapters.load("mobilenet")
    assert not model.training
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 200, 3), dtype=np.uint8))
    x = preprocess(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    path = tmp_path / "mobilenet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    torch.manual_seed(2)  # a different random init, overwritten by the weights
    again, _ = adapters.load("mobilenet", weights=str(path))
    with torch.no_grad():
        assert torch.equal(model(x[None]), again(x[None]))
    with pytest.raises(ValueError, match="does not fit resnet18"):
        adapters.load("resnet18", weights=str(path))


def test_alexnet_preprocess_subtracts_the_mean_image():
    from PIL import Image

    # With a flat mean image (ImageNet's mean colour), a uniform image of that colour becomes all zeros.
    stats = P.imagenet_stats()
    preprocess = P.mean_image_crop(stats)
    colour = tuple(int(round(255 * v)) for v in stats.mean.tolist())
    x = preprocess(Image.new("RGB", (160, 160), colour))
    assert x.shape == (3, 224, 224)
    assert float(x.abs().max()) < 1 / 255


# ----------------------------------------------------------------- Imagenette data


def test_imagenette_finds_all_images_and_classes():
    root = _data_root()
    train = imagenette.Imagenette(root, "train")
    val = imagenette.Imagenette(root, "val")
    assert (len(train), len(val)) == (9469, 3925)
    assert train.wnids == list(imagenette.WNIDS) and len(train.classes) == 10
    assert train.classes[0] == "tench" and train.classes[9] == "parachute"
    assert (train.targets.count(0), val.targets.count(0)) == (963, 387)
    assert (train.targets.count(3), val.targets.count(3)) == (858, 386)  # chain saw
    image, label = val[0]
    assert image.mode == "RGB" and image.size == (160, 160) and label == 0
    # torchvision layout (ROOT/imagenette2-160/) and plain layout (ROOT/val/) agree with torchvision itself.
    from torchvision.datasets import Imagenette as TV

    tv = TV(str(root), split="val", size="160px", download=False)
    plain = imagenette.Imagenette(root / "imagenette2-160", "val")
    assert [p for p, _ in plain.samples] == [p for p, _ in val.samples]
    assert sorted(Path(p).name for p, _ in tv._samples) == sorted(Path(p).name for p, _ in val.samples)
    assert imagenette.Imagenette(root, "val", size="160px").samples == val.samples


def test_imagenette_limit_is_stratified_and_deterministic():
    root = _data_root()
    a = imagenette.Imagenette(root, "train", limit=25)
    b = imagenette.Imagenette(root, "train", limit=25)
    assert a.samples == b.samples and len(a) == 25
    assert [a.targets.count(c) for c in range(10)] == [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]
    names = sorted(os.listdir(root / "imagenette2-160" / "train" / "n01440764"))
    # Evenly spaced over the 963 sorted tench files: indices 0, 321, 642.
    assert [Path(p).name for p, c in a.samples if c == 0] == [names[0], names[321], names[642]]


def test_imagenette_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Imagenette train split not found"):
        imagenette.Imagenette(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        imagenette.Imagenette(tmp_path, "test")


def _tiny_dataset(tmp_path: Path) -> tuple[Path, np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    for i, arr in enumerate(arrays):
        folder = tmp_path / "train" / ("n01440764" if i < 2 else "n02102040")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / f"img{i}.png")  # PNG: lossless, so the hand computation is exact
    return tmp_path, arrays.astype(np.float64) / 255.0


def test_compute_stats_equals_a_hand_computation(tmp_path):
    root, x = _tiny_dataset(tmp_path)
    stats = imagenette.compute_stats(imagenette.Imagenette(root, "train"), size=8)
    pixels = x.reshape(-1, 3)
    mean = pixels.mean(0)
    cov = (pixels - mean).T @ (pixels - mean) / len(pixels)
    assert np.allclose(stats.mean.numpy(), mean, atol=1e-6)
    assert np.allclose(stats.std.numpy(), pixels.std(0), atol=1e-6)
    assert np.allclose(stats.mean_image.numpy(), x.mean(0).transpose(2, 0, 1), atol=1e-6)
    vals = np.linalg.eigvalsh(cov)[::-1]
    assert np.allclose(stats.eigvals.numpy(), vals, atol=1e-6)
    v = stats.eigvecs.double().numpy()
    assert np.allclose(cov @ v, v * vals, atol=1e-6)  # columns are eigenvectors
    assert np.allclose(v.T @ v, np.eye(3), atol=1e-6)
    assert stats.n_images == 4


def test_dataset_stats_are_cached_and_reused(tmp_path, monkeypatch):
    root, _ = _tiny_dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    first = imagenette.dataset_stats(root, size=8, cache_dir=cache, progress=False)
    files = list(cache.glob("imagenette-stats-*.pt"))
    assert len(files) == 1 and first.key in files[0].name

    def boom(*_a, **_k):
        raise AssertionError("statistics recomputed although cached")

    monkeypatch.setattr(imagenette, "compute_stats", boom)
    second = imagenette.dataset_stats(root, size=8, cache_dir=cache, progress=False)
    for field in ("mean", "std", "eigvals", "eigvecs", "mean_image"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    # Changed data -> new key -> recomputed (here: the patched function is hit).
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "train" / "n02102040" / "extra.png")
    with pytest.raises(AssertionError, match="recomputed"):
        imagenette.dataset_stats(root, size=8, cache_dir=cache, progress=False)


@pytest.mark.parametrize("cls", [AlexNet, VGG16, InceptionNet, ResNet18, MobileNetV1],
                         ids=["alexnet", "vgg16", "inception", "resnet18", "mobilenet"])
def test_models_are_fx_traceable(cls):
    # The engine names functional layers (additions, concatenations) from a torch.fx trace.
    graph = torch.fx.symbolic_trace(_shared(cls)).graph
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    assert calls[0] == "conv1"
    if cls is ResNet18:
        assert sum(n.op == "call_function" and n.target.__name__ == "add" for n in graph.nodes) == 8
    if cls is InceptionNet:
        assert sum(n.op == "call_function" and n.target is torch.cat for n in graph.nodes) == 9

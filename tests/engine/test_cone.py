"""interp.cone: dependency-cone evaluation, against per-unit autograd references and the crop path."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import interp
import interp.cone
from interp.cone import plan

from _refs import RefDeconvReLU, RefGuidedReLU, reference_projection


class RefReLU(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x) if self.fn is not None else torch.relu(x)


REF = {"guided": RefGuidedReLU, "deconvnet": RefDeconvReLU, "gradient": None}


def chain_net(first: str = "conv") -> nn.Sequential:
    """A VGG-like chain: strided, dilated and grouped convs, padded and dilated max-pools, avg-pools, eval BN."""
    head = {
        "conv": [nn.Conv2d(3, 6, 3, padding=1)],
        "bn": [nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 6, 3, padding=(2, 1))],
        "pool": [nn.MaxPool2d(3, 1, padding=1), nn.Conv2d(3, 6, 3, padding=1)],
    }[first]
    layers = head + [
        nn.BatchNorm2d(6), nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2), nn.ReLU(inplace=True), nn.Dropout(),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 3, stride=(1, 2), padding=(1, 2), groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(3, 1, padding=1, dilation=2),
        nn.Conv2d(8, 5, (2, 3), padding=1), nn.ReLU(),
        nn.AvgPool2d(3, 1, padding=1), nn.Identity(),
    ]
    net = nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(3)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.normal_(generator=gen)
            m.bias.data.normal_(generator=gen)
    return net.eval()


def reference(model, images, layer, units, method):
    """One full-image forward and backward per unit, the rule patched in as plain modules."""
    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, nn.ReLU):
            twin[int(name)] = RefReLU(REF[method])
    return reference_projection(twin, images, twin[int(layer)], units, twin)


def border_units(model, images, layer):
    with torch.no_grad():
        h, w = model[: int(layer) + 1](images[:1]).shape[2:]
    rows = sorted({0, 1, h // 2, h - 1})
    cols = sorted({0, w // 3, w - 2, w - 1} - {-1})
    return [(n, (n + y + x) % 5, y, x) for n in range(len(images)) for y in rows for x in cols]


@pytest.mark.parametrize("first", ["conv", "bn", "pool"])
@pytest.mark.parametrize("method", ["guided", "deconvnet", "gradient"])
@pytest.mark.parametrize("forward", ["shared", "per-unit"])
def test_cone_equals_per_unit_autograd_in_float64(first, method, forward, monkeypatch):
    # "shared": one whole-image forward per image, backward on the cones (interp.cone's cached
    # convolutions); "per-unit": every unit's own cone forward.
    split = "per-image" if forward == "shared" else "none"
    monkeypatch.setattr(interp.cone, "_split", lambda cone, units: (
        [[i for i, u in enumerate(units) if u[0] == n] for n in sorted({u[0] for u in units})], [])
        if split == "per-image" else ([], list(range(len(units)))))
    model = chain_net(first).double()
    images = torch.randn(2, 3, 53, 47, dtype=torch.float64)
    offset = len(model) - 16  # the heads differ in length
    for layer in (str(5 + offset), str(11 + offset), str(15 + offset)):
        with torch.no_grad():
            shape = model[: int(layer) + 1](images[:1]).shape
        assert plan(model, layer, 53, 47, shape) is not None
        units = border_units(model, images, layer)
        units = [(n, c % shape[1], y, x) for n, c, y, x in units]
        ours = interp.project(model, images, layer, units, method, cone=True, batch_size=5)
        ref = reference(model, images, layer, units, method)
        assert (ref.abs().amax(dim=(1, 2, 3)) > 0).sum() >= 3  # ReLU kills some units; enough live ones
        assert (ours - ref).abs().max() <= 1e-12 * ref.abs().max()


def test_cone_equals_crop_path_in_float32_per_unit():
    model = torchvision.models.vgg11(weights=None).features.eval()
    images = torch.randn(3, 3, 69, 75)
    with torch.no_grad():
        out = model[:19](images)
    _, _, h, w = out.shape
    units = [(n, c, y, x) for n in range(3) for c in (0, 7) for y in (0, h // 2, h - 1) for x in (0, w - 1)]
    units += [(0, 3, 1, 2), (0, 4, 1, 2)]  # two units on one window share its forward
    old = interp.project(model, images, "18", units, "guided", cone=False)
    scale = old.abs().amax(dim=(1, 2, 3))
    assert (scale > 0).all()
    for batch_size in (None, 4):
        ours = interp.project(model, images, "18", units, "guided", cone=True, batch_size=batch_size)
        assert ((ours - old).abs().amax(dim=(1, 2, 3)) / scale).max() < 1e-5
    one = interp.project(model, images[2:], "18", [(0, 5, h - 1, 0)], "guided", cone=True)  # one unit: own cone
    ref = interp.project(model, images[2:], "18", [(0, 5, h - 1, 0)], "guided", cone=False)
    assert ref.abs().max() > 0 and (one - ref).abs().max() / ref.abs().max() < 1e-5


def test_auto_takes_the_cone_for_deep_vgg_units_and_not_for_resnet(monkeypatch):
    chunks = []
    real = getattr(interp.cone, "_run_chunk")
    monkeypatch.setattr(interp.cone, "_run_chunk", lambda *a: chunks.append(1))  # record, skip the work
    vgg = torchvision.models.vgg16(weights=None).eval()
    interp.project(vgg, torch.randn(1, 3, 224, 224), "features.28", [(0, 1, 3, 3), (0, 2, 13, 0)])
    assert chunks, "the cone should be chosen for deep VGG-16 units at 224 px"
    chunks.clear()
    # At 96 px the cone's 196-pixel window is larger than the image: the whole image is cheaper.
    interp.project(vgg, torch.randn(1, 3, 96, 96), "features.28", [(0, 1, 3, 3)])
    assert not chunks
    monkeypatch.setattr(interp.cone, "_run_chunk", lambda *a: (chunks.append(1), real(*a)))
    images = torch.randn(1, 3, 64, 64)
    resnet = torchvision.models.resnet18(weights=None).eval()
    assert plan(resnet, "layer2.1.conv2", 64, 64, (1, 128, 8, 8)) is None
    chunks.clear()
    units = [(0, 1, 2, 3), (0, 2, 7, 0)]
    a = interp.project(resnet, images, "layer2.1.conv2", units, cone=True)
    b = interp.project(resnet, images, "layer2.1.conv2", units, cone=False)
    assert not chunks and torch.equal(a, b)


def test_non_chain_and_unsupported_modules_fall_back():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y) + y

    # b's own path is a chain, but in a hand-written forward: only nn.Sequential's is trusted.
    assert plan(Skip(), "b", 9, 9, (1, 4, 9, 9)) is None
    assert plan(Skip(), "add", 9, 9, (1, 4, 9, 9)) is None
    assert plan(nn.Sequential(Skip().a, Skip().b), "1", 9, 9, (1, 4, 9, 9)) is not None
    hooked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)).eval()
    handle = hooked[0].register_forward_hook(lambda m, i, o: o * 2)
    assert plan(hooked, "1", 9, 9, (1, 4, 5, 5)) is None
    handle.remove()
    assert plan(hooked, "1", 9, 9, (1, 4, 5, 5)) is not None
    ceil = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(4, 4, 3))
    assert plan(ceil.eval(), "2", 12, 12, (1, 4, 3, 3)) is None
    reflect = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 3))
    assert plan(reflect.eval(), "1", 12, 12, (1, 4, 10, 10)) is None
    excl = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(3, 2, padding=1, count_include_pad=False))
    assert plan(excl.eval(), "1", 12, 12, (1, 4, 5, 5)) is None


def test_model_untouched_and_no_grad():
    model = chain_net()
    model.train()  # project runs it in eval mode and puts the flags back
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 41, 35)
    units = [(0, 1, 0, 0), (1, 2, 3, 0)]
    with torch.no_grad():
        ours = interp.project(model, images, "12", units, cone=True)
    model.train()
    ref = interp.project(model, images, "12", units, cone=False)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-7) and ours.abs().sum() > 0
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())

"""interp.project against Captum and against independent references.

The independent references implement the backward rules in this file with
their own autograd functions, patched into the model's forward the plain way
(module replacement / monkeypatching ``torch.nn.functional``), not through
the library's TorchFunctionMode.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import interp

captum_attr = pytest.importorskip("captum.attr")  # captum is a hard dependency; fail loudly below if missing


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# --- independent reference rules (tests/_refs.py) --------------------------
from _refs import RefDeconvReLU, RefGuidedReLU, reference_projection  # noqa: E402


REF = {"guided": RefGuidedReLU, "deconvnet": RefDeconvReLU}


def no_inplace(model):
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, nn.ReLU):
            mod.inplace = False
    return m


@pytest.mark.parametrize("method", ["guided", "deconvnet"])
@pytest.mark.parametrize(
    "arch,layer,size",
    [("vgg16", "features.7", 48), ("vgg16", "features.12", 48), ("resnet18", "layer2.1.conv2", 64), ("resnet18", "layer4.1.conv2", 64)],
)
def test_equals_captum(arch, layer, size, method):
    model = torchvision.models.get_model(arch, weights=None).eval()
    images = torch.randn(3, 3, size, size)
    out = interp.project(model, images, layer, [(0, 0, 0, 0)], method=method)  # to learn the output size
    h = interp.receptive_field(model, layer, (size, size)).output_size[0]
    units = [(0, 1, h // 2, h // 2), (1, 5, 0, h - 1), (2, 7, h - 1, 1), (0, 3, 1, 1), (2, 7, h // 2, 0)]
    ours = interp.project(model, images, layer, units, method=method, batch_size=3)
    cls = captum_attr.NeuronGuidedBackprop if method == "guided" else captum_attr.NeuronDeconvolution
    # Captum's module backward hooks cannot handle inplace ReLUs; inplace does not change values.
    twin = no_inplace(model)
    attr = cls(twin, dict(twin.named_modules())[layer])
    ref = torch.stack([attr.attribute(images[n : n + 1], neuron_selector=(c, y, x))[0] for n, c, y, x in units])
    assert ours.shape == (5, 3, size, size) and out.shape == (1, 3, size, size)
    assert ref.abs().sum() > 0
    assert rel_diff(ours, ref) < 1e-5


class FunctionalNet(nn.Module):
    """F.relu, Tensor.relu, in-place ReLU, a reused ReLU module, torch.relu_."""

    def __init__(self, relu=None):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.c4 = nn.Conv2d(8, 8, 3, padding=1)
        self.c5 = nn.Conv2d(8, 6, 3, padding=1)
        self.shared = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.relu = relu  # the reference passes its own rule here

    def act(self, x, how):
        if self.relu is not None:
            return self.relu(x)
        if how == "F":
            return F.relu(x)
        if how == "method":
            return x.relu()
        if how == "shared":
            return self.shared(x)
        return torch.relu_(x)

    def forward(self, x):
        x = self.act(self.c1(x), "F")
        x = self.act(self.c2(x), "shared")
        x = self.pool(x)
        x = self.act(self.c3(x), "method")
        x = self.act(self.c4(x), "shared")  # the same module again
        x = self.act(self.c5(x), "inplace")
        return x


@pytest.mark.parametrize("method", ["guided", "deconvnet"])
def test_functional_inplace_and_reused_relus(method):
    model = FunctionalNet().eval()
    ref_model = FunctionalNet(relu=REF[method].apply).eval()
    ref_model.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 16, 16)
    units = [(0, 2, 3, 4), (1, 0, 7, 7), (0, 5, 0, 0)]
    ours = interp.project(model, images, "c5", units, method=method)
    ref = reference_projection(ref_model, images, ref_model.c5, units, ref_model)
    assert rel_diff(ours, ref) < 1e-5
    # Captum only hooks nn.ReLU modules; the plain gradient differs from the rule.
    plain = interp.project(model, images, "c5", units, method="gradient")
    assert rel_diff(plain, ref) > 1e-2


@pytest.mark.parametrize("method", ["guided", "deconvnet"])
def test_googlenet_f_relu_is_rewritten(method, monkeypatch):
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False).eval()
    images = torch.randn(2, 3, 64, 64)
    layer = "inception3a.branch2.1.conv"
    units = [(0, 3, 4, 4), (1, 10, 2, 5)]
    ours = interp.project(model, images, layer, units, method=method)
    captum_cls = captum_attr.NeuronGuidedBackprop if method == "guided" else captum_attr.NeuronDeconvolution
    module = dict(model.named_modules())[layer]
    captum = torch.stack(
        [captum_cls(model, module).attribute(images[n : n + 1], neuron_selector=(c, y, x))[0] for n, c, y, x in units]
    )
    plain = interp.project(model, images, layer, units, method="gradient")
    # GoogLeNet calls F.relu: Captum's "guided" result is just the gradient ...
    assert rel_diff(captum, plain) < 1e-6
    # ... ours follows the rule: compare with torch.nn.functional.relu patched to the reference.
    ref_fn = REF[method].apply
    monkeypatch.setattr(torch.nn.functional, "relu", lambda x, inplace=False: ref_fn(x))
    ref = reference_projection(model, images, module, units, model)
    monkeypatch.undo()
    assert rel_diff(ours, ref) < 1e-5
    assert rel_diff(ours, plain) > 1e-2


class SmoothNet(nn.Module):
    def __init__(self, tanh=torch.tanh, sigmoid=torch.sigmoid):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3)
        self.pool = nn.AvgPool2d(2)
        self.c2 = nn.Conv2d(4, 5, 3)
        self.tanh, self.sigmoid = tanh, sigmoid

    def forward(self, x):
        x = 1.7159 * self.tanh(2 / 3 * self.c1(x))
        x = self.pool(x)
        return self.sigmoid(self.c2(x))


def _smooth_ref(kind, method):
    class Ref(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = torch.tanh(x) if kind == "tanh" else torch.sigmoid(x)
            ctx.save_for_backward(y)
            return y

        @staticmethod
        def backward(ctx, g):
            (y,) = ctx.saved_tensors
            rect = torch.where(g > 0, g, torch.zeros_like(g))
            if method == "deconvnet":
                return rect
            return rect * ((1 - y**2) if kind == "tanh" else y * (1 - y))

    return Ref.apply


@pytest.mark.parametrize("method", ["guided", "deconvnet"])
def test_tanh_and_sigmoid_rules(method):
    model = SmoothNet().eval()
    ref_model = SmoothNet(_smooth_ref("tanh", method), _smooth_ref("sigmoid", method)).eval()
    ref_model.load_state_dict(model.state_dict())
    images = torch.randn(3, 1, 14, 14)
    units = [(0, 1, 1, 1), (2, 4, 0, 3), (1, 0, 2, 2)]
    # the sigmoid at the very end is not behind the unit; project the sigmoid layer via the c2 unit
    ours = interp.project(model, images, "c2", units, method=method)
    ref = reference_projection(ref_model, images, ref_model.c2, units, ref_model)
    assert rel_diff(ours, ref) < 1e-5


def test_functional_node_layer_matches_feature_extractor():
    from torchvision.models.feature_extraction import create_feature_extractor

    model = torchvision.models.resnet18().eval()
    images = torch.randn(2, 3, 64, 64)
    units = [(0, 3, 5, 5), (1, 60, 0, 15)]
    ours = interp.project(model, images, "layer1.0.add", units, method="gradient")
    fx = create_feature_extractor(model, ["layer1.0.add"])
    ref = []
    for n, c, y, x in units:
        inp = images[n : n + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fx(inp)["layer1.0.add"][0, c, y, x], inp)
        ref.append(g[0])
    assert rel_diff(ours, torch.stack(ref)) < 1e-5


def test_batch_size_does_not_change_results_and_aliases_resolve():
    model = torchvision.models.vgg11().eval()
    images = torch.randn(3, 3, 32, 32)
    units = [(n, c, 3, 4) for n in range(3) for c in range(3)]
    a = interp.project(model, images, "conv3", units, batch_size=2)
    b = interp.project(model, images, "features.6", units, batch_size=9)
    assert a.abs().sum() > 0
    assert rel_diff(a, b) < 1e-5  # conv kernels may sum in another order per batch size


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        [p.grad for p in model.parameters()],
    )


def _same(snap_a, snap_b):
    sd_a, tr_a, hk_a, gr_a = snap_a
    sd_b, tr_b, hk_b, gr_b = snap_b
    return all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a) and tr_a == tr_b and hk_a == hk_b and gr_a == gr_b


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(layer="layer1.0.cnv1"), "closest: layer1.0.conv1"),
        (dict(units=[(0, 64, 0, 0)]), "channel out of range"),
        (dict(units=[(0, 0, 99, 0)]), "row out of range"),
        (dict(units=[(5, 0, 0, 0)]), "image index out of range"),
        (dict(units=[]), "units is empty"),
        (dict(units=[(0, 1, 2)]), r"\(n, c, y, x\)"),
        (dict(images=torch.zeros(3, 32, 32)), r"\(N, C, H, W\)"),
        (dict(images=torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), "floating-point"),
        (dict(images=torch.zeros(1, 1, 32, 32)), "forward"),
        (dict(method="guidded"), "did you mean 'guided'"),
    ],
)
def test_bad_inputs_raise_one_clear_error_and_leave_model_untouched(bad, match):
    model = torchvision.models.resnet18()
    model.train()
    model.layer1.eval()  # mixed modes must come back exactly
    before = _snapshot(model)
    kwargs = dict(images=torch.randn(2, 3, 32, 32), layer="layer1.0.conv1", units=[(0, 0, 0, 0)])
    kwargs.update(bad)
    with pytest.raises((ValueError, RuntimeError), match=match):
        interp.project(model, **kwargs)
    assert _same(before, _snapshot(model))


def test_success_leaves_model_and_images_untouched():
    model = torchvision.models.resnet18()
    model.train()
    images = torch.randn(2, 3, 32, 32)
    images_copy = images.clone()
    model.eval()
    with torch.no_grad():
        out_before = model(images)
    model.train()
    before = _snapshot(model)
    interp.project(model, images, "layer2.0.add", [(0, 0, 1, 1), (1, 2, 0, 0)], method="deconvnet")
    interp.project(model, images, "layer1.0.relu_1", [(0, 0, 1, 1)], method="guided")
    assert _same(before, _snapshot(model))
    assert torch.equal(images, images_copy)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), out_before)


@pytest.mark.parametrize(
    "arch,layer,size,methods",
    [("vgg11", "features.6", 64, ["guided", "deconvnet", "gradient"]), ("resnet18", "layer2.0.conv2", 96, ["guided"]),
     ("googlenet", "inception3a", 96, ["deconvnet"]), ("mobilenet_v2", "features.4.conv.0.0", 80, ["guided"])],
)
def test_receptive_field_crop_is_exact(arch, layer, size, methods):
    kwargs = {"aux_logits": False, "init_weights": False} if arch == "googlenet" else {}
    model = torchvision.models.get_model(arch, weights=None, **kwargs).eval()
    images = torch.randn(2, 3, size, size)
    h, w = interp.receptive_field(model, layer, (size, size)).output_size
    # interior, corners, edges; for googlenet channels of different branches (0: 1x1, 100: 3x3)
    units = [(0, 0, h // 2, w // 2), (1, 100 % 64 if arch != "googlenet" else 100, 0, 0),
             (0, 1, h - 1, w - 1), (1, 2, 0, w // 2), (1, 3, h // 2, w - 1)]
    for method in methods:
        full = interp.project(model, images, layer, units, method=method, crop=False)
        cropped = interp.project(model, images, layer, units, method=method, crop=True)
        assert full.abs().sum() > 0
        assert rel_diff(cropped, full) < 1e-5, method
    # Nothing outside the field: the crop path writes zeros there, the full path computes them.
    rf = interp.receptive_field(model, layer, (size, size))
    n, c, y, x = units[0]
    top, left, bottom, right = rf.box(y, x, clip=(size, size), channel=c)
    outside = full[0].clone()
    outside[:, top:bottom, left:right] = 0
    assert outside.abs().max() == 0


@pytest.mark.parametrize("method", ["guided", "deconvnet"])
def test_shared_forward_for_units_of_the_same_image_is_exact(method):
    """Many units per image take the one-forward, several-backward path; results match one row per unit."""
    from interp.project import _rounds

    model = torchvision.models.resnet18().eval()
    images = torch.randn(3, 3, 48, 48)
    units = [(n, c, c % 2, 1) for n in range(3) for c in range(6)]  # 6 units on each of 3 images
    assert _rounds(units, [(0, 0, 48, 48, 1, 1)] * 18, list(range(18))) is not None
    shared = interp.project(model, images, "layer4.1.conv2", units, method=method, crop=False)
    one_row_each = torch.stack([interp.project(model, images, "layer4.1.conv2", [u], method=method, crop=False)[0]
                                for u in units])
    assert shared.abs().sum() > 0
    assert rel_diff(shared, one_row_each) < 1e-5


def test_crop_is_chosen_by_work_saved_counting_shared_images():
    """vgg16 features.28 at 224 px: the aligned crop is 208 x 208 (86 % of the pixels). On 54 different
    images that saves 14 % of the work, so the planner crops; 54 units on 3 images share forwards that
    crops would break, so it does not."""
    from interp.project import _crop_plans

    model = torchvision.models.vgg16().features.eval()
    shape = (54, 3, 224, 224)
    spread = [(n, n % 6, 7, 6) for n in range(54)]
    plans = _crop_plans(model, "28", shape, spread, None)
    assert {(b - t, r - l0) for t, l0, b, r, _, _ in plans} == {(208, 208)}
    shared = [(n % 3, n % 6, n % 14, (3 * n) % 14) for n in range(54)]
    assert all(p[:4] == (0, 0, 224, 224) for p in _crop_plans(model, "28", shape, shared, None))
    assert all(p[:4] != (0, 0, 224, 224) for p in _crop_plans(model, "28", shape, shared, True))


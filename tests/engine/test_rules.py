"""interp.rules: every nonlinearity and spelling against independent references.

The references never use :class:`interp.rules.RuleMode`: per-op rules are
``relu(g) * relu(f'(x))`` / ``relu(g)`` with ``f'`` written out by hand (and
checked against ``torch.func.grad`` of the plain op), and the end-to-end
references rewrite the gradient of a plain forward with tensor hooks.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import interp
from interp.notices import UnknownNonlinearityWarning
from interp.rules import RuleMode, rule_for, warn_unknown_nonlinearities

DT = torch.float64  # per-op checks in double: the kernels agree to ~1e-15 there
SELU_A, SELU_L = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
PRELU_W = torch.tensor([0.25, -0.5, 1.5], dtype=DT)  # one negative weight: guided zeroes that side


def _sig(x):
    return 1 / (1 + torch.exp(-x))


def _gelu_d(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _gelu_tanh_d(x):
    k = math.sqrt(2 / math.pi)
    t = torch.tanh(k * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)


def _mish_d(x):
    t = torch.tanh(torch.log1p(torch.exp(x)))
    return t + x * (1 - t * t) * _sig(x)


def _where(cond, a, b):
    return torch.where(cond, torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT))


def _prelu_d(x, w=PRELU_W):
    return torch.where(x > 0, torch.ones_like(x), w.view(1, -1, 1, 1).expand_as(x))


# name -> (plain op, f'(x) by hand, spellings). Every spelling must give the plain op's value.
# Spellings take a tensor that is safe to modify (in-place ones modify it).
OPS = {
    "relu": (torch.relu, lambda x: (x > 0).to(DT), {
        "nn.ReLU": nn.ReLU(), "nn.ReLU(inplace)": nn.ReLU(inplace=True), "F.relu": F.relu,
        "F.relu(inplace)": lambda x: F.relu(x, inplace=True), "torch.relu": torch.relu,
        "Tensor.relu": lambda x: x.relu(), "torch.relu_": torch.relu_, "Tensor.relu_": lambda x: x.relu_()}),
    "relu6": (F.relu6, lambda x: ((x > 0) & (x < 6)).to(DT), {
        "nn.ReLU6": nn.ReLU6(), "nn.ReLU6(inplace)": nn.ReLU6(inplace=True), "F.relu6": F.relu6,
        "F.relu6(inplace)": lambda x: F.relu6(x, inplace=True)}),
    "hardtanh": (lambda x: F.hardtanh(x, -0.5, 0.7), lambda x: ((x > -0.5) & (x < 0.7)).to(DT), {
        "nn.Hardtanh": nn.Hardtanh(-0.5, 0.7), "nn.Hardtanh(inplace)": nn.Hardtanh(-0.5, 0.7, inplace=True),
        "F.hardtanh": lambda x: F.hardtanh(x, -0.5, 0.7),
        "F.hardtanh(kw, inplace)": lambda x: F.hardtanh(x, min_val=-0.5, max_val=0.7, inplace=True),
        "F.hardtanh_": lambda x: F.hardtanh_(x, -0.5, 0.7)}),
    "threshold": (lambda x: F.threshold(x, 0.1, -2.0), lambda x: (x > 0.1).to(DT), {
        "nn.Threshold": nn.Threshold(0.1, -2.0), "nn.Threshold(inplace)": nn.Threshold(0.1, -2.0, inplace=True),
        "F.threshold": lambda x: F.threshold(x, 0.1, -2.0), "torch.threshold": lambda x: torch.threshold(x, 0.1, -2.0),
        "torch.threshold_": lambda x: torch.threshold_(x, 0.1, -2.0)}),
    "tanh": (torch.tanh, lambda x: 1 - torch.tanh(x) ** 2, {
        "nn.Tanh": nn.Tanh(), "F.tanh": F.tanh, "torch.tanh": torch.tanh, "Tensor.tanh": lambda x: x.tanh(),
        "torch.tanh_": torch.tanh_, "Tensor.tanh_": lambda x: x.tanh_()}),
    "sigmoid": (torch.sigmoid, lambda x: _sig(x) * (1 - _sig(x)), {
        "nn.Sigmoid": nn.Sigmoid(), "F.sigmoid": F.sigmoid, "torch.sigmoid": torch.sigmoid,
        "Tensor.sigmoid": lambda x: x.sigmoid(), "torch.sigmoid_": torch.sigmoid_,
        "Tensor.sigmoid_": lambda x: x.sigmoid_(), "torch.special.expit": torch.special.expit}),
    "silu": (F.silu, lambda x: _sig(x) * (1 + x * (1 - _sig(x))), {
        "nn.SiLU": nn.SiLU(), "nn.SiLU(inplace)": nn.SiLU(inplace=True), "F.silu": F.silu,
        "F.silu(inplace)": lambda x: F.silu(x, inplace=True)}),
    "gelu": (F.gelu, _gelu_d, {
        "nn.GELU": nn.GELU(), "F.gelu": F.gelu, "F.gelu(approximate=none)": lambda x: F.gelu(x, approximate="none")}),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), _gelu_tanh_d, {
        "nn.GELU(tanh)": nn.GELU(approximate="tanh"), "F.gelu(tanh)": lambda x: F.gelu(x, approximate="tanh")}),
    "hardswish": (F.hardswish, lambda x: _where(x < -3, 0.0, _where(x > 3, 1.0, x / 3 + 0.5)), {
        "nn.Hardswish": nn.Hardswish(), "nn.Hardswish(inplace)": nn.Hardswish(inplace=True),
        "F.hardswish": F.hardswish, "F.hardswish(inplace)": lambda x: F.hardswish(x, inplace=True)}),
    "hardsigmoid": (F.hardsigmoid, lambda x: _where((x > -3) & (x < 3), 1 / 6, 0.0), {
        "nn.Hardsigmoid": nn.Hardsigmoid(), "nn.Hardsigmoid(inplace)": nn.Hardsigmoid(inplace=True),
        "F.hardsigmoid": F.hardsigmoid, "F.hardsigmoid(inplace)": lambda x: F.hardsigmoid(x, inplace=True)}),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.2), lambda x: _where(x > 0, 1.0, 0.2), {
        "nn.LeakyReLU": nn.LeakyReLU(0.2), "nn.LeakyReLU(inplace)": nn.LeakyReLU(0.2, inplace=True),
        "F.leaky_relu": lambda x: F.leaky_relu(x, 0.2),
        "F.leaky_relu(kw, inplace)": lambda x: F.leaky_relu(x, negative_slope=0.2, inplace=True),
        "F.leaky_relu_": lambda x: F.leaky_relu_(x, 0.2)}),
    "leaky_relu_default": (F.leaky_relu, lambda x: _where(x > 0, 1.0, 0.01), {
        "nn.LeakyReLU()": nn.LeakyReLU(), "F.leaky_relu_(default)": F.leaky_relu_}),
    "leaky_relu_negative": (lambda x: F.leaky_relu(x, -0.3), lambda x: _where(x > 0, 1.0, -0.3), {
        "F.leaky_relu(-0.3)": lambda x: F.leaky_relu(x, -0.3)}),
    "rrelu": (lambda x: F.leaky_relu(x, 0.375), lambda x: _where(x > 0, 1.0, 0.375), {  # eval: the mean slope
        "nn.RReLU(eval)": nn.RReLU(0.25, 0.5).eval(), "F.rrelu": lambda x: F.rrelu(x, 0.25, 0.5),
        "F.rrelu(inplace)": lambda x: F.rrelu(x, 0.25, 0.5, inplace=True),
        "torch.rrelu": lambda x: torch.rrelu(x, 0.25, 0.5),
        "torch.rrelu_": lambda x: torch.rrelu_(x, lower=0.25, upper=0.5)}),
    "prelu": (lambda x: F.prelu(x, PRELU_W), _prelu_d, {
        "F.prelu": lambda x: F.prelu(x, PRELU_W), "torch.prelu": lambda x: torch.prelu(x, PRELU_W),
        "Tensor.prelu": lambda x: x.prelu(PRELU_W)}),
    "prelu_scalar": (lambda x: F.prelu(x, torch.tensor([-0.7], dtype=DT)), lambda x: _where(x > 0, 1.0, -0.7), {}),
    "elu": (lambda x: F.elu(x, 0.7), lambda x: _where(x > 0, 1.0, 0.7 * torch.exp(x)), {
        "nn.ELU": nn.ELU(0.7), "nn.ELU(inplace)": nn.ELU(0.7, inplace=True), "F.elu": lambda x: F.elu(x, 0.7),
        "F.elu(kw, inplace)": lambda x: F.elu(x, alpha=0.7, inplace=True), "F.elu_": lambda x: F.elu_(x, 0.7)}),
    "selu": (torch.selu, lambda x: _where(x > 0, SELU_L, SELU_L * SELU_A * torch.exp(x)), {
        "nn.SELU": nn.SELU(), "nn.SELU(inplace)": nn.SELU(inplace=True), "F.selu": F.selu,
        "F.selu(inplace)": lambda x: F.selu(x, inplace=True), "torch.selu": torch.selu, "torch.selu_": torch.selu_}),
    "celu": (lambda x: torch.celu(x, 1.5), lambda x: _where(x > 0, 1.0, torch.exp(x / 1.5)), {
        "nn.CELU": nn.CELU(1.5), "nn.CELU(inplace)": nn.CELU(1.5, inplace=True), "F.celu": lambda x: F.celu(x, 1.5),
        "F.celu(inplace)": lambda x: F.celu(x, 1.5, True), "torch.celu": lambda x: torch.celu(x, 1.5),
        "torch.celu_": lambda x: torch.celu_(x, alpha=1.5)}),
    "mish": (F.mish, _mish_d, {
        "nn.Mish": nn.Mish(), "nn.Mish(inplace)": nn.Mish(inplace=True), "F.mish": F.mish,
        "F.mish(inplace)": lambda x: F.mish(x, inplace=True)}),
    "softplus": (lambda x: F.softplus(x, 2.0, 3.0), lambda x: _where(2 * x > 3, 1.0, _sig(2 * x)), {
        "nn.Softplus": nn.Softplus(2.0, 3.0), "F.softplus": lambda x: F.softplus(x, 2.0, 3.0),
        "F.softplus(kw)": lambda x: F.softplus(x, beta=2.0, threshold=3.0)}),
    "softplus_default": (F.softplus, lambda x: _where(x > 20, 1.0, _sig(x)), {"nn.Softplus()": nn.Softplus()}),
}
_prelu = nn.PReLU(3).to(DT)
_prelu.weight.data.copy_(PRELU_W)
OPS["prelu"][2]["nn.PReLU"] = _prelu
_prelu1 = nn.PReLU().to(DT)
_prelu1.weight.data.fill_(-0.7)
OPS["prelu_scalar"][2]["nn.PReLU()"] = _prelu1

CASES = [(op, spelling) for op, (_, _, spellings) in OPS.items() for spelling in spellings]


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, 5, generator=gen, dtype=DT) * 3  # reaches every regime (|x| > 3, x > 6, ...)
    x[0, 0, 0, :3] = torch.tensor([7.0, -4.0, 25.0], dtype=DT)
    return x, torch.randn(2, 3, 4, 5, generator=gen, dtype=DT)


def _rtol(op: str) -> float:
    # torch's hardsigmoid derivative is 1/6 rounded to float32, also for float64 tensors.
    return 1e-7 if op == "hardsigmoid" else 1e-12


def test_hand_derivatives_match_autograd():
    """The references' f' agree with torch.func.grad of the plain op, element by element."""
    x, _ = _inputs()
    for op, (plain, deriv, _) in OPS.items():
        if op.startswith("prelu"):  # the per-channel weight needs the channel: whole-tensor autograd instead
            xg = x.clone().requires_grad_()
            (ref,) = torch.autograd.grad(plain(xg).sum(), xg)
        else:
            flat = x.reshape(-1)
            ref = torch.func.vmap(torch.func.grad(lambda t: plain(t.reshape(1, 1, 1, 1)).sum()))(flat).view_as(x)
        torch.testing.assert_close(deriv(x), ref, rtol=_rtol(op), atol=1e-12, msg=op)


@pytest.mark.parametrize("method", ["guided", "deconvnet"])
@pytest.mark.parametrize("op,spelling", CASES, ids=[f"{o}-{s}" for o, s in CASES])
def test_every_spelling_follows_the_rule(op, spelling, method):
    plain, deriv, spellings = OPS[op]
    fn = spellings[spelling]
    x, g = _inputs()
    leaf = x.clone().requires_grad_(True)
    z = leaf * 1  # a non-leaf: in-place spellings may modify it
    mode = RuleMode(method)
    with mode:
        y = fn(z)
    assert mode.calls == 1, f"{spelling} was not intercepted"
    assert torch.equal(y, plain(x))
    if "inplace" in spelling or spelling.split("(")[0].endswith("_"):
        assert y is z, "an in-place spelling must return its input, modified"
    assert type(y.grad_fn).__name__ == "_RuleBackward"
    (got,) = torch.autograd.grad(y, leaf, g)
    expected = g.clamp(min=0) * (deriv(x).clamp(min=0) if method == "guided" else 1)
    torch.testing.assert_close(got, expected, rtol=_rtol(op), atol=1e-14)


def test_rule_lookup():
    assert rule_for(F.silu).name == "silu" and rule_for(torch.Tensor.relu_).name == "relu/hardtanh"
    assert rule_for(torch.erf) is None and rule_for(torch.exp) is None


def test_rule_on_an_inplace_view_equals_out_of_place():
    x, g = _inputs(1)
    results = []
    for inplace in (False, True):
        leaf = x.clone().requires_grad_(True)
        z = leaf * 2
        with RuleMode("guided"):
            if inplace:
                F.silu(z[:, :2], inplace=True)
                y = z
            else:
                y = torch.cat([F.silu(z[:, :2]), z[:, 2:]], 1)
        results.append(torch.autograd.grad(y, leaf, g)[0])
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


# --- end to end: project() on small conv nets vs tensor-hook references -----
class ActNet(nn.Module):
    """conv -> act -> maxpool -> conv -> act -> conv, act given as a module factory."""

    def __init__(self, act) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 4, 3)
        self.a1, self.a2, self.pool = act(), act(), nn.MaxPool2d(2)
        self.hook = None  # set by the reference: wraps each activation

    def act(self, module, z):
        return module(z) if self.hook is None else self.hook(module, z)

    def forward(self, x):
        x = self.pool(self.act(self.a1, self.c1(x)))
        return self.c3(self.act(self.a2, self.c2(x)))


def _hooked(method):
    """Rewrite an activation's backward with tensor hooks: on y rectify g, on z apply the rule."""

    def hook(module, z):
        y = module(z)
        store = {}

        def on_y(g):
            store["g"] = g.clamp(min=0)
            return store["g"]

        # autograd passes relu(g) * f'(z) to z; guided rectifies it (= relu(g) * relu(f')),
        # deconvnet replaces it by relu(g).
        y.register_hook(on_y)
        z.register_hook((lambda gz: gz.clamp(min=0)) if method == "guided" else (lambda gz: store["g"]))
        return y

    return hook


ACTS = {
    "relu": nn.ReLU, "silu_inplace": lambda: nn.SiLU(inplace=True), "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "hardswish": lambda: nn.Hardswish(inplace=True),
    "hardsigmoid": nn.Hardsigmoid, "leaky_relu": lambda: nn.LeakyReLU(0.1), "prelu": lambda: nn.PReLU(6),
    "elu": lambda: nn.ELU(inplace=True), "selu": nn.SELU, "celu": lambda: nn.CELU(0.8), "mish": nn.Mish,
    "softplus": lambda: nn.Softplus(1.5, 4.0), "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu6": nn.ReLU6,
    "rrelu": lambda: nn.RReLU(0.1, 0.3, inplace=True), "threshold": lambda: nn.Threshold(0.05, -1.0),
}


def _plain(factory):
    """The reference's activation: the same op, out of place (hooks need y and z to differ)."""
    module = factory()
    if hasattr(module, "inplace"):
        module.inplace = False
    return module


@pytest.mark.parametrize("act", list(ACTS))
def test_project_matches_tensor_hook_reference(act):
    torch.manual_seed(0)
    model = ActNet(ACTS[act]).eval()
    if act == "prelu":
        for m in (model.a1, model.a2):
            m.weight.data = torch.linspace(-0.6, 0.6, 6)
    ref_model = ActNet(lambda: _plain(ACTS[act])).eval()
    ref_model.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 14, 14)
    units = [(0, 1, 1, 1), (1, 3, 2, 3), (0, 0, 3, 0)]
    for method in ("guided", "deconvnet"):
        ours = interp.project(model, images, "c3", units, method=method)
        ref_model.hook = _hooked(method)
        ref = []
        for n, c, y, x in units:
            inp = images[n : n + 1].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(ref_model(inp)[0, c, y, x], inp)
            ref.append(g[0])
        ref_model.hook = None
        ref = torch.stack(ref)
        assert ref.abs().sum() > 0
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item(), msg=method)


# --- nonlinearities without a rule: one warning each, never silenced ---------
class Cube(torch.autograd.Function):
    """A custom nonlinearity the engine cannot know."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x * x * g


class HandGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


class RandomRReLU(nn.Module):
    def forward(self, x):
        return F.rrelu(x, training=True)


class CubeAct(nn.Module):
    def forward(self, x):
        return Cube.apply(x)


def _unknown(model, method="guided", layer="c3", calls=1, size=14):
    """UnknownNonlinearityWarnings of ``calls`` project() calls, under the default 'once per location' filter."""
    images = torch.randn(2, 3, size, size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(calls):
            interp.project(model, images, layer, [(0, 0, 1, 1), (1, 1, 2, 2)], method=method)
    return [str(w.message) for w in caught if issubclass(w.category, UnknownNonlinearityWarning)]


@pytest.mark.parametrize("method", ["guided", "deconvnet"])
def test_unknown_nonlinearity_warns_once_per_call_naming_it(method):
    custom = _unknown(ActNet(CubeAct).eval(), method, calls=2)
    assert len(custom) == 2  # once per call (two activations), and the second call is not swallowed
    assert f"layer 'c3': no {method} rule for Cube (custom torch.autograd.Function), used 2 times" in custom[0]
    assert "kept its plain gradient" in custom[0]
    train = _unknown(ActNet(lambda: RandomRReLU()).eval(), method)  # random slopes: no rule
    assert len(train) == 1 and "rrelu_with_noise (RreluWithNoiseBackward" in train[0]
    erf = _unknown(ActNet(HandGELU).eval(), method)
    assert len(erf) == 1 and f"no {method} rule for erf (ErfBackward0), used 2 times" in erf[0]
    assert _unknown(ActNet(HandGELU).eval(), "gradient") == []  # the plain gradient needs no rule


def test_warning_is_not_swallowed_by_the_once_per_location_filter():
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(2):
            start = x.clone()
            with RuleMode("guided"):
                out = torch.exp(F.relu(start)) + torch.erf(start)
            found = warn_unknown_nonlinearities(out, start, "guided", "here")
            assert found == {"exp (ExpBackward0)": 1, "erf (ErfBackward0)": 1}
    assert [issubclass(w.category, UnknownNonlinearityWarning) for w in caught] == [True] * 4
    assert caught[0].filename == __file__  # points at the caller, not at the engine


class SEBlock(nn.Module):
    """ResNet-ish block with BN, squeeze-and-excitation, LayerNorm, SiLU and a weight-standardised conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.se1, self.se2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.ln = nn.LayerNorm(8)
        self.ws = nn.Conv2d(8, 8, 3)
        self.c3 = nn.Conv2d(8, 5, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = x * torch.sigmoid(self.se2(F.silu(self.se1(F.adaptive_avg_pool2d(x, 1)))))
        x = self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + x
        w = self.ws.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / torch.sqrt(w.var((1, 2, 3), keepdim=True) + 1e-5)
        x = nn.functional.hardswish(F.conv2d(F.max_pool2d(x, 2, ceil_mode=True), w))
        return self.c3(F.interpolate(x, scale_factor=2.0, mode="bilinear"))


@pytest.mark.parametrize("method", ["guided", "deconvnet"])
def test_known_nets_do_not_warn(method):
    # Weight standardisation (sqrt, var on the weights) is not on the input's path: no warning.
    assert _unknown(SEBlock().eval(), method) == []
    assert _unknown(ActNet(nn.SiLU).eval(), method) == []
    # Hardswish, ReLU, BN and a hardsigmoid SE gate (features.4 holds one).
    mobilenet = torchvision.models.mobilenet_v3_small().eval()
    assert _unknown(mobilenet, method, layer="features.4", size=64) == []


# --- torch.no_grad() ---------------------------------------------------------
def _snapshot(model):
    return (
        [m.training for m in model.modules()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        [p.grad for p in model.parameters()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def _same(a, b):
    return a[:3] == b[:3] and all(torch.equal(a[3][k], b[3][k]) for k in a[3])


@pytest.mark.parametrize(
    "model,layer,size",
    [(lambda: ActNet(lambda: nn.PReLU(6)), "c3", 14), (torchvision.models.resnet18, "layer1.0.add", 32)],
    ids=["plain", "resnet18-functional"],
)
def test_project_under_no_grad(model, layer, size):
    torch.manual_seed(0)
    model = model()
    model.train()
    images = torch.randn(2, 3, size, size)
    units = [(0, 1, 1, 1), (1, 3, 2, 3)]
    before = _snapshot(model)
    for method in ("guided", "deconvnet", "gradient"):
        expected = interp.project(model, images, layer, units, method=method)
        with torch.no_grad():
            got = interp.project(model, images, layer, units, method=method)
            assert not torch.is_grad_enabled()
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with torch.no_grad(), pytest.raises(ValueError, match="channel out of range"):
        interp.project(model, images, layer, [(0, 999, 0, 0)])
    assert _same(before, _snapshot(model))


class FailsWithGrad(ActNet):
    """Runs under no_grad (project's shape probe), fails in the projection's forward."""

    def forward(self, x):
        if torch.is_grad_enabled():
            raise RuntimeError("boom")
        return super().forward(x)


def test_error_inside_the_rule_mode_leaves_nothing_behind():
    model = FailsWithGrad(nn.SiLU)
    model.train()
    before = _snapshot(model)
    with torch.no_grad(), pytest.raises(ValueError, match="boom"):
        interp.project(model, torch.randn(1, 3, 14, 14), "c3", [(0, 0, 1, 1)])
    assert _same(before, _snapshot(model))
    x = torch.randn(3, requires_grad=True)
    assert type(F.silu(x).grad_fn).__name__ == "SiluBackward0"  # the mode is gone

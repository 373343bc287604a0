"""Model sweep: the model list and INDEPENDENT references for the engine.

Nothing here imports :mod:`interp`: the references are built from plain
autograd, tensor hooks and a :class:`torch.overrides.TorchFunctionMode` of
our own, so that a bug in the engine cannot hide in its own yardstick.

References
----------
Receptive field (:func:`support_boxes`)
    The gradient support of a *positive twin* of the model: a float64 copy
    in which every convolution / linear weight is replaced on the fly by
    ``|w| + eps`` normalised to sum 1 per output (an averaging filter, so
    values stay O(1) through hundreds of layers), biases dropped, every other
    parameter made positive, BatchNorm the identity, LayerNorm / GroupNorm
    ``x + mean`` over their normalised dims (they still mix channels), every
    pointwise nonlinearity the identity (or ``x / (1 + x)`` for the saturating
    gates sigmoid / hard-sigmoid / tanh, so that squeeze-and-excitation
    products cannot overflow), max pooling the average pooling of the same
    geometry, and every pad a zero pad. On a strictly positive image every
    activation is then positive and every op strictly increasing in each
    input it depends on, so ``d unit / d pixel > 0`` exactly where the unit
    depends on the pixel: the support IS the dependence region. Its bounding
    box must equal the engine's field box.

    With ``cut_global=True`` the outputs of global reductions (global
    average / max pooling, ``mean``/``sum``/``norm``/``amax`` over both
    spatial axes) are detached: what is left is the field through the
    spatial path, the reference for ``ReceptiveField.spatial`` of a
    squeeze-and-excitation layer.

Projection (:func:`reference_projection`)
    The rule applied by hand: every pointwise nonlinearity ``y = f(x)``
    (module or functional, any spelling, found by name) is replaced by an
    autograd function with the same forward value whose backward is
    ``relu(g) * relu(f'(x))`` (guided) or ``relu(g)`` (deconvnet), with
    ``f'(x)`` taken by ``torch.autograd.grad`` of ``f`` itself at ``x``.
    Everything else uses its plain autograd backward.
"""
from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

# ---------------------------------------------------------------------------
# Model list
# ---------------------------------------------------------------------------

MAX_PARAMS = 60_000_000
DEFAULT_SIZE = 64

# torchvision classification models that are not CNNs (attention / transformer
# blocks): left out of the sweep.
TV_NOT_CNN = {
    "vit_": "vision transformer (patch embedding + self-attention), not a CNN",
    "swin_": "Swin transformer (windowed self-attention), not a CNN",
    "maxvit_": "MaxViT (block / grid self-attention), not a CNN",
}
# Smallest input each torchvision model accepts, where it is above DEFAULT_SIZE.
TV_SIZE = {"inception_v3": 80}

# timm: >= 20 families (timm model modules), chosen for coverage. The tags say
# what each model is in the sweep for; the coverage count uses the features
# detected in the forward pass (:func:`detect_features`), not these tags.
TIMM_MODELS = {
    "efficientnet_b0": ("SiLU", "SE"),
    "tf_efficientnet_b0": ("SiLU", "SE", "TF-same padding"),
    "mixnet_s": ("channel split", "SiLU", "SE"),
    "mobilenetv3_small_050": ("Hardswish", "SE"),
    "lcnet_050": ("Hardswish", "SE"),
    "convnext_atto": ("GELU", "LayerNorm2d"),
    "convnextv2_atto": ("GELU", "LayerNorm2d", "global response norm"),
    "resnet26d": ("avg-pool shortcut", "deep stem"),
    "seresnet18": ("SE",),
    "cspdarknet53": ("LeakyReLU", "channel split"),
    "cs3darknet_focus_s": ("SiLU", "channel split", "6x6 stride-2 stem (YOLOv5's focus replacement)"),
    "tresnet_m": ("space-to-depth", "LeakyReLU", "SE", "blur pool"),
    "regnety_002": ("SE",),
    "rexnet_100": ("SE", "SiLU", "ReLU6", "partial-channel residual"),
    "res2net50_26w_4s": ("channel split",),
    "ghostnet_100": ("channel split", "SE"),
    "dla34": ("tree aggregation",),
    "dpn48b": ("channel split", "dual path"),
    "ese_vovnet19b_dw": ("SE",),
    "hrnet_w18_small": ("upsampling", "multi-resolution"),
    "repvgg_a0": (),
    "gernet_s": (),
    "selecsls42b": (),
    "xception41": ("separable conv",),
    "skresnet18": ("selective kernel (softmax over branches)",),
    "nf_resnet26": ("weight-standardised conv",),
    "hgnetv2_b0": ("learnable affine", "SE"),
    "densenet121": ("dense concat",),
    "repghostnet_050": ("re-parameterised ghost", "SE"),
    "resnest14d": ("split attention (softmax over radix)", "SE"),
}
TIMM_SIZE: dict[str, int] = {}

FEATURES = ("SiLU", "GELU", "Hardswish", "LeakyReLU", "SE", "LayerNorm2d", "channel split", "channel shuffle",
            "space-to-depth")
# Features of torchvision models (by architecture).
TV_FEATURES = {
    "efficientnet": ("SiLU", "SE"),
    "mobilenet_v3": ("Hardswish", "SE"),
    "convnext": ("GELU", "LayerNorm2d"),
    "regnet_y": ("SE",),
    "shufflenet": ("channel split", "channel shuffle"),
    "googlenet": ("concat",),
    "inception": ("concat",),
    "densenet": ("dense concat",),
    "squeezenet": ("concat",),
}


def torchvision_cases() -> tuple[list[str], dict[str, str]]:
    """Every torchvision classification CNN under MAX_PARAMS; and what is left out, with why."""
    import torchvision

    keep, left_out = [], {}
    for name in torchvision.models.list_models(module=torchvision.models):
        reason = next((why for p, why in TV_NOT_CNN.items() if name.startswith(p)), None)
        if reason is None:
            weights = torchvision.models.get_model_weights(name)
            n = next(iter(weights)).meta["num_params"]  # metadata only, nothing downloaded
            if n >= MAX_PARAMS:
                reason = f"{n / 1e6:.1f} M parameters (>= {MAX_PARAMS // 1_000_000} M)"
        if reason:
            left_out[name] = reason
        else:
            keep.append(name)
    return keep, left_out


def case_ids() -> list[str]:
    tv, _ = torchvision_cases()
    return [f"tv:{n}" for n in tv] + [f"timm:{n}" for n in TIMM_MODELS]


def features_of(case: str) -> tuple[str, ...]:
    src, name = case.split(":", 1)
    if src == "timm":
        return TIMM_MODELS.get(name, ())
    return next((f for p, f in TV_FEATURES.items() if name.startswith(p)), ())


def seed_of(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def build(case: str) -> tuple[nn.Module, int]:
    """The model in eval mode (random weights, seeded by its name) and its input size."""
    src, name = case.split(":", 1)
    torch.manual_seed(seed_of(case))
    if src == "tv":
        import torchvision

        kwargs = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        size = TV_SIZE.get(name, DEFAULT_SIZE)
    else:
        import timm

        model = timm.create_model(name, pretrained=False)
        size = TIMM_SIZE.get(name, DEFAULT_SIZE)
    wake_zero_init(model)
    return model.eval(), size


@torch.no_grad()
def wake_zero_init(model: nn.Module) -> None:
    """Give zero-initialised weights random values, as training would.

    Many models zero-initialise the last BatchNorm scale or conv of each
    residual branch (timm's ``zero_init_last``), layer-scale / GRN gains and
    skip-init gains: at init whole branches then output exactly zero and
    every unit behind them has a zero gradient, which would make the
    projection checks vacuous. Biases stay as they are.
    """
    for name, p in model.named_parameters():
        if name.endswith("bias") or not bool((p == 0).all()):
            continue
        if p.dim() >= 2:
            nn.init.kaiming_normal_(p)
        else:
            p.uniform_(0.5, 1.5)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def images(case: str, n: int, size: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed_of(case) + 1)
    return torch.randn(n, 3, size, size, generator=g).to(dtype)


# ---------------------------------------------------------------------------
# Layer helpers (plain hooks)
# ---------------------------------------------------------------------------


class _Stop(Exception):
    pass


def run_hooked(model: nn.Module, x: torch.Tensor, handles: list) -> None:
    """One no-grad forward of ``model`` on ``x``, then remove the hook ``handles`` (also on error)."""
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()


def conv_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Conv2d module names in the order of their first call."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    order: list[str] = []
    handles = [m.register_forward_hook(lambda m, i, o: order.append(names[m]) if names[m] not in order else None)
               for m in names]
    run_hooked(model, x, handles)
    return order


class _GlobalCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_global_reduction(_fname(func), args, kwargs):
            self.count += 1
        return func(*args, **kwargs)


def first_conv_after_global(model: nn.Module, x: torch.Tensor) -> str | None:
    """The first Conv2d called after a global reduction (a squeeze-and-excitation gate), if any
    (the classifier's global pooling comes after every conv, so it never counts)."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    counter = _GlobalCounter()
    found: list[str] = []

    def hook(m, i, o):
        if counter.count and not found and o.dim() == 4 and tuple(o.shape[2:]) != (1, 1):
            found.append(names[m])

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def pick_convs(order: list[str], after_global: str | None = None) -> list[str]:
    """First, middle and last conv (distinct), and the first conv behind a global-context gate."""
    picks = [order[0], order[len(order) // 2], order[-1]] + ([after_global] if after_global else [])
    return list(dict.fromkeys(picks))


def outputs(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Outputs of the first call of each named module; the forward stops after the last one."""
    mods = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}

    def make(n):
        def hook(m, i, o):
            if n not in got:
                # A copy: an in-place op later in the forward (ReLU(inplace=True))
                # must not change what the layer output was.
                got[n] = o.clone() if isinstance(o, torch.Tensor) else o
                if len(got) == len(names):
                    raise _Stop

        return hook

    handles = [mods[n].register_forward_hook(make(n)) for n in names]
    try:
        model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in got]
    if missing:
        raise RuntimeError(f"layers never called: {missing}")
    return got


def pick_block(model: nn.Module, conv: str, x: torch.Tensor) -> str | None:
    """A block: the deepest container holding ``conv`` with >= 2 convs inside and a 4-D
    tensor output; failing that (blocks passing lists, as in SelecSLS), the first such
    container called after ``conv``, or any."""
    mods = dict(model.named_modules())

    def n_convs(m):
        return sum(isinstance(s, nn.Conv2d) for s in m.modules())

    parts = conv.split(".")
    ancestors = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
    candidates = [n for n in ancestors if n in mods and n_convs(mods[n]) >= 2]
    others = [n for n, m in mods.items() if n and n not in candidates and list(m.children()) and n_convs(m) >= 2]
    called: list[str] = []
    four_d: set[str] = set()

    def make(n):
        def hook(m, i, o):
            if n not in called:
                called.append(n)
                if isinstance(o, torch.Tensor) and o.dim() == 4:
                    four_d.add(n)

        return hook

    handles = [mods[n].register_forward_hook(make(n)) for n in candidates + others + [conv]]
    run_hooked(model, x, handles)
    for n in candidates:
        if n in four_d:
            return n
    after = called[called.index(conv) + 1:] if conv in called else called
    for n in after + called:
        if n in four_d and n in others:
            return n
    return None


# ---------------------------------------------------------------------------
# Function names (intercepted by name: module, functional and Tensor spellings)
# ---------------------------------------------------------------------------


def _fname(func) -> str:
    name = getattr(func, "__name__", "") or ""
    return name


# Pointwise nonlinearities: a rule applies to each.
NONLINEAR = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu",
    "selu_", "celu", "celu_", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "softplus", "prelu", "logsigmoid", "rrelu", "rrelu_", "threshold", "threshold_",
}
_GATES = {"sigmoid", "sigmoid_", "hardsigmoid", "tanh", "tanh_", "logsigmoid"}
_CONV = {"conv2d", "conv1d", "conv3d", "_convolution", "convolution"}
_CONV_T = {"conv_transpose2d", "conv_transpose1d"}
_MAXPOOL = {"max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "max_pool1d", "_max_pool1d"}
_REDUCE = {"mean", "sum", "norm", "amax", "max", "std", "var", "logsumexp", "vector_norm"}


# ---------------------------------------------------------------------------
# (a) receptive field reference: gradient support of the positive twin
# ---------------------------------------------------------------------------


def _positive_weight(w: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    w = w.detach().abs() + 1e-3
    dims = tuple(range(1, w.dim()))
    if transposed:  # (in, out/groups, kh, kw): normalise per input instead
        dims = (0,) + tuple(range(2, w.dim()))
    return w / w.sum(dim=dims, keepdim=True)


def _spatial_dims(t: torch.Tensor, dims) -> set[int] | None:
    if dims is None:
        return None
    if isinstance(dims, int):
        dims = (dims,)
    try:
        return {d % t.dim() for d in dims}
    except TypeError:
        return None


def is_global_reduction(name: str, args, kwargs) -> bool:
    """Whether ``name(*args, **kwargs)`` reduces a 4-D map over both spatial axes (global pooling)."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return False
    if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d", "adaptive_max_pool2d_with_indices"):
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        size = (size, size) if isinstance(size, int) else tuple(size)
        return tuple(s if s is not None else -1 for s in size) == (1, 1) and tuple(x.shape[2:]) != (1, 1)
    if name in _REDUCE:
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        if name == "norm":
            dims = args[2] if len(args) > 2 else kwargs.get("dim")
        if name == "vector_norm":
            dims = args[2] if len(args) > 2 else kwargs.get("dim")
        d = _spatial_dims(x, dims)
        if d is None:
            return False
        # NCHW spatial axes, or NHWC ones (channels-last blocks such as GRN).
        return ({2, 3} <= d and 1 not in d) or ({1, 2} <= d and 3 not in d)
    return False


class PositiveTwinMode(TorchFunctionMode):
    """Forward of the positive twin (see the module docstring)."""

    def __init__(self, cut_global: bool = False) -> None:
        super().__init__()
        self.cut_global = cut_global
        self.saw_global = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = _fname(func)
        if name in _CONV and args and isinstance(args[0], torch.Tensor) and len(args) > 1:
            args = list(args)
            w = args[1] if len(args) > 1 else kwargs["weight"]
            args[1] = _positive_weight(w)
            if len(args) > 2:
                args[2] = None
            kwargs.pop("bias", None)
            return func(*args, **kwargs)
        if name in _CONV_T and args:
            args = list(args)
            args[1] = _positive_weight(args[1], transposed=True)
            if len(args) > 2:
                args[2] = None
            kwargs.pop("bias", None)
            return func(*args, **kwargs)
        if name == "linear" and args:
            w = args[1] if len(args) > 1 else kwargs["weight"]
            return F.linear(args[0], _positive_weight(w))
        if name in ("batch_norm", "instance_norm") and args:
            return args[0] * 1.0 if name == "batch_norm" else args[0] + args[0].mean((2, 3), keepdim=True)
        if name == "layer_norm" and args:
            x = args[0]
            shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
            dims = tuple(range(x.dim() - len(tuple(shape)), x.dim()))
            return x + x.mean(dims, keepdim=True)
        if name == "group_norm" and args:
            x = args[0]
            g = args[1] if len(args) > 1 else kwargs["num_groups"]
            n, c = x.shape[:2]
            m = x.reshape(n, g, -1).mean(-1, keepdim=True)
            return x + m.expand(n, g, x[0].numel() // g).reshape(x.shape)
        if name in NONLINEAR and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            if name in _GATES:
                return x / (1 + x)
            return x * 1.0
        if name in _MAXPOOL and args:
            x = args[0]

            def a(i, key, default):
                return args[i] if len(args) > i else kwargs.get(key, default)

            k = a(1, "kernel_size", None)
            s = a(2, "stride", None) or k
            p = a(3, "padding", 0)
            ceil = a(5, "ceil_mode", False)
            y = F.avg_pool2d(x, k, s, p, ceil_mode=ceil, count_include_pad=True)
            if a(6, "return_indices", False) or name == "max_pool2d_with_indices":
                return y, None
            return y
        if name in ("adaptive_max_pool2d", "adaptive_max_pool2d_with_indices") and args:
            size = args[1] if len(args) > 1 else kwargs["output_size"]
            out = F.adaptive_avg_pool2d(args[0], size)
            if is_global_reduction(name, args, kwargs):
                self.saw_global = True
                if self.cut_global:
                    out = _ZeroGrad.apply(out)
            return (out, None) if name.endswith("indices") else out
        if name == "pad" and args:
            mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
            if mode == "constant":
                pad = args[1] if len(args) > 1 else kwargs["pad"]
                return F.pad(args[0], pad, "constant", 0.0)
        if name in ("softmax", "_softmax", "log_softmax"):
            # Softmax mixes its axis: keep the dependence, stay positive and increasing.
            x = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            return x + x.mean(dim, keepdim=True)
        if name in ("sub", "__sub__", "rsub", "__rsub__", "neg", "div", "__truediv__", "__rtruediv__"):
            # Keep every value positive and increasing in each input it depends on.
            a0, b0 = (args + (None, None))[:2]
            if name in ("sub", "__sub__"):
                return a0 + b0
            if name in ("rsub", "__rsub__"):
                return a0 + b0
            if name == "neg":
                return a0 * 1.0
            if name in ("div", "__truediv__") and isinstance(b0, torch.Tensor):
                return _bounded_product(a0, b0)
            if name == "__rtruediv__":
                return a0 * 1.0
        if name in ("mul", "mul_", "__mul__", "__rmul__", "__imul__", "addcmul") and len(args) >= 2:
            # A product of two activations (a gate): bounded in the second
            # factor, so that chains of gates cannot overflow.
            if name == "addcmul" and len(args) >= 3:
                a0, b0, c0 = args[:3]
                if all(isinstance(t, torch.Tensor) and t.requires_grad for t in (b0, c0)):
                    return a0 + _bounded_product(b0, c0)
            a0, b0 = args[:2]
            if all(isinstance(t, torch.Tensor) and t.requires_grad for t in (a0, b0)):
                return _bounded_product(a0, b0)
        out = func(*args, **kwargs)
        if is_global_reduction(name, args, kwargs):
            self.saw_global = True
            if self.cut_global and isinstance(out, torch.Tensor):
                out = _ZeroGrad.apply(out)
        return out


class _ZeroGrad(torch.autograd.Function):
    """Identity forward, zero backward: cuts a path for the gradient but keeps the
    value marked as input-dependent (so products with it stay bounded)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D401 - autograd API
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.zeros_like(g)


def _bounded_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * b / (1 + b)``: increasing in both (for positive inputs), at most ``a``."""
    return a * (b / (1 + b))


def positive_twin(model: nn.Module) -> nn.Module:
    """A float64 copy with every parameter positive (convs/linears are re-weighted by the mode)."""
    twin = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in twin.parameters():
            p.abs_().add_(0.1)
            p.requires_grad_(False)
        for m in twin.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
    return twin


@dataclass
class Support:
    """Bounding boxes ``(top, left, bottom, right)``, half-open, per unit."""

    full: list[tuple[int, int, int, int] | None]
    spatial: list[tuple[int, int, int, int] | None]
    saw_global: bool = False
    out_shape: tuple[int, ...] = ()


def _bbox(g: torch.Tensor) -> tuple[int, int, int, int] | None:
    m = (g.abs() > 0).any(dim=0)
    rows = m.any(dim=1).nonzero().flatten()
    cols = m.any(dim=0).nonzero().flatten()
    if len(rows) == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def support_boxes(twin: nn.Module, layer: str, units: list[tuple[int, int, int]], size: int,
                  in_channels: int = 3) -> Support:
    """Gradient-support boxes of ``units`` ``(c, y, x)`` of ``layer``, full and through the spatial path."""
    boxes = {}
    saw = False
    shape = ()
    for cut in (False, True):
        if cut and not saw:
            boxes[cut] = boxes[False]
            break
        g = torch.Generator().manual_seed(7)
        x = (torch.rand(len(units), in_channels, size, size, generator=g, dtype=torch.float64) + 0.5)
        x.requires_grad_(True)
        mode = PositiveTwinMode(cut_global=cut)
        with torch.enable_grad(), mode:
            out = outputs(twin, x.clone(), [layer])[layer]
        saw = saw or mode.saw_global
        shape = tuple(out.shape)
        rows = torch.arange(len(units))
        cs = torch.tensor([u[0] for u in units])
        ys = torch.tensor([u[1] for u in units])
        xs = torch.tensor([u[2] for u in units])
        sel = out[rows, cs, ys, xs]
        if not bool((sel > 0).all()):
            raise AssertionError(f"positive twin produced non-positive activations at {layer}: {sel.tolist()}")
        (grad,) = torch.autograd.grad(sel.sum(), x)
        if not torch.isfinite(grad).all():
            raise AssertionError(f"positive twin gradient not finite at {layer}")
        boxes[cut] = [_bbox(grad[i]) for i in range(len(units))]
    return Support(boxes[False], boxes[True], saw, shape)


# ---------------------------------------------------------------------------
# (b) projection reference: the rule by hand
# ---------------------------------------------------------------------------


class _RuleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, deriv, guided):  # noqa: D401 - autograd API
        ctx.save_for_backward(deriv)
        ctx.guided = guided
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        (deriv,) = ctx.saved_tensors
        out = g.clamp(min=0)
        if ctx.guided:
            out = out * deriv.clamp(min=0)
        return out, None, None, None


class ReferenceRuleMode(TorchFunctionMode):
    """Every pointwise nonlinearity backpropagates ``relu(g)*relu(f'(x))`` (guided) or ``relu(g)``."""

    def __init__(self, method: str) -> None:
        super().__init__()
        assert method in ("guided", "deconvnet")
        self.guided = method == "guided"
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = _fname(func)
        if (name not in NONLINEAR or not args or not isinstance(args[0], torch.Tensor)
                or not (args[0].requires_grad and torch.is_grad_enabled())):
            return func(*args, **kwargs)
        x = args[0]
        rest = args[1:]
        self.calls[name] = self.calls.get(name, 0) + 1
        # f and f' at x, on a copy (an in-place spelling must not touch x).
        with torch.enable_grad():
            xd = x.detach().clone().requires_grad_(True)
            xin = xd * 1.0  # a non-leaf, so in-place spellings are allowed
            y = func(xin, *[r.detach() if isinstance(r, torch.Tensor) else r for r in rest], **kwargs)
            (deriv,) = torch.autograd.grad(y.sum(), xd)
        return _RuleFn.apply(x, y.detach(), deriv, self.guided)


def reference_projection(model64: nn.Module, x64: torch.Tensor, layer: str, unit: tuple[int, int, int],
                         method: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """d unit / d image under the rule, by hand; also the layer output (for a forward-value check)."""
    x = x64.detach().clone().requires_grad_(True)
    mode = ReferenceRuleMode(method)
    with torch.enable_grad(), mode:
        out = outputs(model64, x * 1.0, [layer])[layer]
    c, y, xx = unit
    (grad,) = torch.autograd.grad(out[0, c, y, xx], x)
    return grad, out.detach(), mode.calls


# ---------------------------------------------------------------------------
# Bookkeeping
# ---------------------------------------------------------------------------

CHECKS = ("field", "projection", "mining", "visualize")


@dataclass
class Record:
    case: str
    params: int = 0
    features: tuple[str, ...] = ()
    seconds: float = 0.0
    results: dict[str, str] = field(default_factory=dict)  # check -> "ok" / "xfail: ..." / "FAIL: ..."
    times: dict[str, float] = field(default_factory=dict)  # check (and "build") -> seconds

    def ok(self) -> bool:
        return all(self.results.get(c) == "ok" for c in CHECKS)


def unit_for(case: str, out: torch.Tensor) -> tuple[int, int, int]:
    """Max-activation unit of a random (seeded) channel of image 0."""
    g = torch.Generator().manual_seed(seed_of(case) + 2)
    c = int(torch.randint(out.shape[1], (1,), generator=g))
    flat = int(out[0, c].reshape(-1).argmax())
    return c, flat // out.shape[3], flat % out.shape[3]


def timm_family(case: str) -> str:
    """A timm model's family: the timm module that defines it (``resnet``, ``efficientnet``, ...)."""
    import timm

    name = case.split(":", 1)[1]
    try:
        from timm.models._registry import _model_to_module

        if name in _model_to_module:
            return _model_to_module[name]
    except ImportError:  # pragma: no cover - other timm versions
        pass
    for module in timm.list_modules():
        if name in timm.list_models(module=module):
            return module
    return name


# ---------------------------------------------------------------------------
# Feature detection: what a model really does in its forward
# ---------------------------------------------------------------------------


class FeatureProbe(TorchFunctionMode):
    """Records which of :data:`FEATURES` a forward pass uses, from the ops called."""

    def __init__(self) -> None:
        super().__init__()
        self.found: set[str] = set()
        self._six_d: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _fname(func)
        out = func(*args, **kwargs)
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name == "silu":
            self.found.add("SiLU")
        elif name == "gelu":
            self.found.add("GELU")
        elif name == "hardswish":
            self.found.add("Hardswish")
        elif name in ("leaky_relu", "leaky_relu_"):
            self.found.add("LeakyReLU")
        elif name == "layer_norm" and x is not None and x.dim() == 4:
            self.found.add("LayerNorm2d")  # over channels of a (permuted) feature map
        elif x is None:
            return out
        elif name in ("split", "chunk", "tensor_split", "split_with_sizes") and x.dim() == 4:
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
            if dim in (1, -3):
                self.found.add("channel split")
        elif name == "__getitem__" and x.dim() == 4 and len(args) > 1:
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            if len(idx) > 1 and isinstance(idx[1], slice) and idx[1] != slice(None):
                self.found.add("channel split")  # x[:, a:b]
            if any(isinstance(i, slice) and i.step not in (None, 1) for i in idx[2:]):
                self.found.add("space-to-depth")  # focus stem: x[..., ::2, ::2]
        elif name == "pixel_unshuffle":
            self.found.add("space-to-depth")
        elif name in ("view", "reshape") and isinstance(out, torch.Tensor):
            if out.dim() == 6 and x.dim() == 4:
                self._six_d.add(id(out))
        elif name in ("transpose", "permute") and x.dim() == 5 and isinstance(out, torch.Tensor):
            dims = args[1:] if name == "transpose" else (args[1:] if len(args) > 2 else tuple(args[1]))
            if name == "transpose" and {d % 5 for d in dims[:2]} == {1, 2}:
                self.found.add("channel shuffle")
        elif name == "permute" and id(x) in self._six_d:
            self.found.add("space-to-depth")  # (N, C, H/b, b, W/b, b) -> (N, b, b, C, ...)
        if is_global_reduction(name, args, kwargs):
            self.found.add("_global")
        return out


def detect_features(model: nn.Module, x: torch.Tensor) -> tuple[str, ...]:
    """Features of :data:`FEATURES` the model's forward on ``x`` uses ("SE": a conv runs behind a
    global reduction, i.e. a squeeze-and-excitation style gate)."""
    probe = FeatureProbe()
    with torch.no_grad(), probe:
        model(x)
    found = probe.found - {"_global"}
    if first_conv_after_global(model, x) is not None:
        found.add("SE")
    return tuple(f for f in FEATURES if f in found)

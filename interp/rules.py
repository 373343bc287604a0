"""Backward rules for deconvnet and guided backprop, applied to every nonlinearity.

Captum and the original notebook rewrite gradients with backward hooks on
``nn.ReLU`` modules, so a ``F.relu`` call (torchvision's GoogLeNet, many
research models) silently keeps its plain gradient. We instead intercept the
*functions* with a :class:`torch.overrides.TorchFunctionMode` while the forward
runs, and replace each pointwise nonlinearity by an autograd function whose
forward is the original call (same value, same in-place semantics) and whose
backward is the method's rule. ``nn`` modules call these functions, so
module, functional, ``torch.*``, ``Tensor`` method and in-place spellings are
all caught, also a module reused several times.

One definition covers every nonlinearity. With ``g`` the incoming gradient
and ``f'(x)`` the local derivative::

    guided    = relu(g) * relu(f'(x))      (Springenberg et al. 2015)
    deconvnet = relu(g)                    (Zeiler & Fergus 2014)
    gradient  = g * f'(x)                  (plain autograd, no rule)

Guided backprop multiplies by the local derivative (the forward mask for a
ReLU) and rectifies; deconvnet only rectifies, ignoring the forward pass, as
the deconvnet passes its reconstruction through a ReLU. ``f'`` is computed by
torch's own derivative kernel for the op (``silu_backward``, ...), so it is
autograd's derivative to the bit, including its convention at kinks (e.g.
``f'(0) = 0`` for ReLU, ``w`` for PReLU; the tanh and sigmoid rules keep
their closed forms from ``y``). Deconvnet saves nothing for the
backward; guided saves the input ``x``, or the output ``y`` where the
derivative follows exactly from it (ReLU, clamps, tanh, sigmoid). An
in-place spelling that needs ``x`` saves a copy of it taken before the call.

Each row is ``relu(g) * relu(f'(x))`` written out (``s`` is the logistic
sigmoid, ``[.]`` is 1 where true and 0 elsewhere, ``x`` the input and ``y``
the output of the nonlinearity; the outer ``relu`` of ``f'`` is left out
where ``f'`` cannot be negative):

===============  ======================================================  =========  ===================================
nonlinearity     guided                                                  deconvnet  spellings (all rewritten)
===============  ======================================================  =========  ===================================
ReLU             ``relu(g) * [y > 0]``                                   relu(g)    nn.ReLU, F.relu, torch.relu,
                                                                                    Tensor.relu, torch.relu_,
                                                                                    Tensor.relu_
ReLU6, hardtanh  ``relu(g) * [lo < y < hi]`` (ReLU6: lo=0, hi=6)         relu(g)    nn.ReLU6, nn.Hardtanh, F.relu6,
                                                                                    F.hardtanh, F.hardtanh_
threshold        ``relu(g) * [x > t]``                                   relu(g)    nn.Threshold, F.threshold,
                                                                                    torch.threshold, torch.threshold_
tanh             ``relu(g) * (1 - y**2)``                                relu(g)    nn.Tanh, F.tanh, torch.tanh,
                                                                                    Tensor.tanh, torch.tanh_,
                                                                                    Tensor.tanh_
sigmoid          ``relu(g) * y * (1 - y)``                               relu(g)    nn.Sigmoid, F.sigmoid,
                                                                                    torch.sigmoid, Tensor.sigmoid,
                                                                                    torch.sigmoid_, Tensor.sigmoid_,
                                                                                    torch.special.expit
SiLU (swish)     ``relu(g) * relu(s(x) * (1 + x * (1 - s(x))))``         relu(g)    nn.SiLU, F.silu
GELU             ``relu(g) * relu(Phi(x) + x * phi(x))``                 relu(g)    nn.GELU, F.gelu
                                                                                    (approximate="none")
GELU (tanh)      ``relu(g) * relu(f'(x))`` of the tanh approximation     relu(g)    nn.GELU, F.gelu
                                                                                    (approximate="tanh")
Hardswish        ``relu(g) * relu(x / 3 + 1/2)`` on (-3, 3), 0 below,    relu(g)    nn.Hardswish, F.hardswish
                 ``relu(g)`` above
Hardsigmoid      ``relu(g) / 6`` on (-3, 3), 0 elsewhere                 relu(g)    nn.Hardsigmoid, F.hardsigmoid
LeakyReLU        ``relu(g) * (1 if x > 0 else relu(slope))``             relu(g)    nn.LeakyReLU, F.leaky_relu,
                                                                                    F.leaky_relu_
PReLU            ``relu(g) * (1 if x > 0 else relu(w[c]))``              relu(g)    nn.PReLU, F.prelu, torch.prelu,
                                                                                    Tensor.prelu
RReLU (eval)     ``relu(g) * (1 if x > 0 else (lower + upper) / 2)``     relu(g)    nn.RReLU, F.rrelu, torch.rrelu,
                                                                                    torch.rrelu_ (training=False;
                                                                                    random slopes in training keep
                                                                                    the plain gradient)
ELU              ``relu(g) * (1 if x > 0 else alpha * exp(x))``          relu(g)    nn.ELU, F.elu, F.elu_
SELU             ``relu(g) * scale * (1 if x > 0 else alpha * exp(x))``  relu(g)    nn.SELU, F.selu, torch.selu,
                                                                                    torch.selu_
CELU             ``relu(g) * (1 if x > 0 else exp(x / alpha))``          relu(g)    nn.CELU, F.celu, torch.celu,
                                                                                    torch.celu_
Mish             ``relu(g) * relu(t + x * s(x) * (1 - t**2))``,          relu(g)    nn.Mish, F.mish
                 ``t = tanh(softplus(x))``
Softplus         ``relu(g) * s(beta * x)``; ``relu(g)`` where            relu(g)    nn.Softplus, F.softplus (beta,
                 ``beta * x > threshold``                                           threshold)
===============  ======================================================  =========  ===================================

Every spelling with an ``inplace`` argument is also rewritten with
``inplace=True`` (the value is computed in place, as without the rule), and
the ``torch._C._nn`` kernels the functionals call (``silu``, ``silu_``,
``gelu_``, ``hardswish_``, ``hardsigmoid_``, ``leaky_relu``, ``elu``,
``mish_``, ``relu6_``, ...) are listed too. Where ``f'`` is never negative
(tanh, sigmoid, softplus, ELU, ...) guided equals "rectify the ordinary
gradient"; where it can be (SiLU, GELU, Mish, Hardswish, a negative
LeakyReLU slope or PReLU weight) guided zeroes those places like the ReLU
mask does.

Everything else (convolutions, linear layers, pooling, max-pool switches,
residual additions, concatenation, BatchNorm, LayerNorm, GroupNorm) uses its
ordinary autograd backward, which for max-pool and convolution is exactly the
deconvnet's unpooling with switches and transposed filtering. Normalisations
are treated as linear (in eval mode BatchNorm is; LayerNorm and GroupNorm
keep their exact plain gradient), and so are products of two tensors that
both depend on the input (a squeeze-and-excitation gate ``x * sigmoid(...)``:
autograd's product rule, with the sigmoid's own rule inside). Any other op on the path from the input to
the layer that is not linear or structural (a custom
:class:`torch.autograd.Function`, a hand-written GELU through ``torch.erf``,
``exp``, ``pow``, softmax, ...) keeps its plain gradient, and
:func:`warn_unknown_nonlinearities` says so once per op with an
:class:`~interp.notices.UnknownNonlinearityWarning`.
"""
from __future__ import annotations

import inspect
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .notices import UnknownNonlinearityWarning

METHODS = ("guided", "deconvnet", "gradient")

__all__ = ["METHODS", "RuleMode", "Rule", "rule_for", "unknown_nonlinearities", "warn_unknown_nonlinearities"]

_T = torch._C.TensorBase
_NN = torch._C._nn
_ATEN = torch.ops.aten
_Chain = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """One pointwise nonlinearity: how to get ``g * f'(x)`` for its backward.

    Attributes
    ----------
    name:
        Readable name (``"silu"``).
    chain:
        ``chain(g, s, p)`` returns ``g * f'(x)`` elementwise, from the saved
        tensor ``s`` (the input ``x``, or the output ``y`` when ``from_y``)
        and the call's parameters ``p``.
    from_y:
        The derivative follows exactly from the output: save ``y`` (free for
        in-place calls, and usually kept alive by the next layer anyway).
    monotone:
        ``f' >= 0`` everywhere, so guided needs no final rectification.
    guided:
        Optional faster guided backward ``guided(g, s, p)`` with the same
        values as ``relu(chain(relu(g), s, p))`` (the clamps use ReLU's own
        kernel; their results must not change by a bit).
    """

    name: str
    chain: _Chain
    from_y: bool = False
    monotone: bool = False
    guided: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor] | None = None


def _clamp_guided(grad: torch.Tensor, y: torch.Tensor, p: dict) -> torch.Tensor:
    # relu(g) * [lo < y < hi] in two memory passes and one new tensor:
    # threshold_backward keeps g where y > lo (the kernel ReLU's own backward
    # uses), then clamp in place. The bool-mask product took four passes and
    # two temporaries; the values are the same.
    lo, hi = p["min_val"], p["max_val"]
    g = _ATEN.threshold_backward(grad, y, lo).clamp_(min=0)
    if not math.isinf(hi):
        g.masked_fill_(y >= hi, 0)
    return g


def _clamp_chain(g: torch.Tensor, y: torch.Tensor, p: dict) -> torch.Tensor:
    # Not used by guided (see _clamp_guided); kept so every rule has a chain.
    mask = y > p["min_val"]
    if not math.isinf(p["max_val"]):
        mask &= y < p["max_val"]
    return g * mask


def _prelu_chain(g: torch.Tensor, x: torch.Tensor, p: dict) -> torch.Tensor:
    # f' = 1 where x > 0, else the (per-channel) weight: autograd's own
    # convention at 0. The weight's gradient is not needed for projections.
    w = p["weight"]
    if w.numel() > 1:
        shape = [1] * x.dim()
        shape[1 if x.dim() > 1 else 0] = -1
        w = w.reshape(shape)
    return torch.where(x > 0, g, g * w)


_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946

CLAMP = Rule("relu/hardtanh", _clamp_chain, from_y=True, guided=_clamp_guided)
TANH = Rule("tanh", lambda g, y, p: g * (1 - y * y), from_y=True, monotone=True)
SIGMOID = Rule("sigmoid", lambda g, y, p: g * (y * (1 - y)), from_y=True, monotone=True)
THRESHOLD = Rule("threshold", lambda g, x, p: _ATEN.threshold_backward(g, x, p["threshold"]), monotone=True)
SILU = Rule("silu", lambda g, x, p: _ATEN.silu_backward(g, x))
GELU = Rule("gelu", lambda g, x, p: _ATEN.gelu_backward(g, x, approximate=p["approximate"]))
HARDSWISH = Rule("hardswish", lambda g, x, p: _ATEN.hardswish_backward(g, x))
HARDSIGMOID = Rule("hardsigmoid", lambda g, x, p: _ATEN.hardsigmoid_backward(g, x), monotone=True)
LEAKY_RELU = Rule("leaky_relu", lambda g, x, p: _ATEN.leaky_relu_backward(g, x, p["negative_slope"], False))
PRELU = Rule("prelu", _prelu_chain)
# RReLU outside training is a LeakyReLU with the mean slope; in training its
# slopes are random and the call keeps its plain gradient (and is reported).
RRELU = Rule("rrelu", lambda g, x, p: _ATEN.leaky_relu_backward(g, x, (p["lower"] + p["upper"]) / 2, False))
ELU = Rule("elu", lambda g, x, p: _ATEN.elu_backward(g, p["alpha"], p["scale"], p["input_scale"], False, x))
SELU = Rule("selu", lambda g, x, p: _ATEN.elu_backward(g, _SELU_ALPHA, _SELU_SCALE, 1.0, False, x))
CELU = Rule("celu", lambda g, x, p: _ATEN.elu_backward(g, p["alpha"], 1.0, 1.0 / p["alpha"], False, x))
MISH = Rule("mish", lambda g, x, p: _ATEN.mish_backward(g, x))
SOFTPLUS = Rule("softplus", lambda g, x, p: _ATEN.softplus_backward(g, x, p["beta"], p["threshold"]), monotone=True)


@dataclass(frozen=True)
class _Spelling:
    """How one callable spells a rule: its parameters after the input, and in-place-ness."""

    rule: Rule
    names: tuple[str, ...] = ()  # positional parameters after the input, in order
    defaults: dict = field(default_factory=dict)
    inplace: bool | None = False  # None: read the call's ``inplace`` argument
    fixed: dict = field(default_factory=dict)  # parameters the spelling implies (relu6: max_val=6)

    def bind(self, args: tuple, kwargs: dict) -> tuple[dict, bool]:
        """The call's parameters (with defaults) and whether it runs in place."""
        p = dict(self.defaults)
        p.update(zip(self.names, args[1:]))
        p.update((k, v) for k, v in kwargs.items() if k != "input")
        p.update(self.fixed)
        inplace = bool(p.pop("inplace", False)) if self.inplace is None else self.inplace
        return p, inplace


def _spell(rule: Rule, names: str = "", inplace: bool | None = False, fixed: dict | None = None,
           **defaults) -> _Spelling:
    if "inplace" in names.split() and inplace is False:
        inplace = None
    return _Spelling(rule, tuple(names.split()), defaults, inplace, fixed or {})


def _table() -> dict:
    """Every callable the mode rewrites -> its spelling. Built once at import."""
    # ReLU is hardtanh(0, inf) and ReLU6 hardtanh(0, 6): one clamp rule for all three.
    relu = {"min_val": 0.0, "max_val": math.inf}
    relu6 = {"min_val": 0.0, "max_val": 6.0}
    elu = dict(alpha=1.0, scale=1.0, input_scale=1.0)
    rrelu = dict(lower=1.0 / 8, upper=1.0 / 3, training=False)
    table = {
        # ReLU and the clamps: the mask comes from y.
        F.relu: _spell(CLAMP, "inplace", fixed=relu),
        torch.relu: _spell(CLAMP, fixed=relu), _T.relu: _spell(CLAMP, fixed=relu),
        torch.relu_: _spell(CLAMP, fixed=relu, inplace=True), _T.relu_: _spell(CLAMP, fixed=relu, inplace=True),
        F.relu6: _spell(CLAMP, "inplace", fixed=relu6),
        _NN.relu6: _spell(CLAMP, fixed=relu6), _NN.relu6_: _spell(CLAMP, fixed=relu6, inplace=True),
        F.hardtanh: _spell(CLAMP, "min_val max_val inplace", min_val=-1.0, max_val=1.0),
        F.hardtanh_: _spell(CLAMP, "min_val max_val", min_val=-1.0, max_val=1.0, inplace=True),
        _NN.hardtanh: _spell(CLAMP, "min_val max_val", min_val=-1.0, max_val=1.0),
        F.threshold: _spell(THRESHOLD, "threshold value inplace"),
        torch.threshold: _spell(THRESHOLD, "threshold value"),
        torch.threshold_: _spell(THRESHOLD, "threshold value", inplace=True),
        # Smooth, derivative from y.
        torch.tanh: _spell(TANH), _T.tanh: _spell(TANH), F.tanh: _spell(TANH),
        torch.tanh_: _spell(TANH, inplace=True), _T.tanh_: _spell(TANH, inplace=True),
        torch.sigmoid: _spell(SIGMOID), _T.sigmoid: _spell(SIGMOID), F.sigmoid: _spell(SIGMOID),
        torch.special.expit: _spell(SIGMOID),
        torch.sigmoid_: _spell(SIGMOID, inplace=True), _T.sigmoid_: _spell(SIGMOID, inplace=True),
        # Derivative from x.
        F.silu: _spell(SILU, "inplace"), _NN.silu: _spell(SILU), _NN.silu_: _spell(SILU, inplace=True),
        F.gelu: _spell(GELU, approximate="none"), _NN.gelu_: _spell(GELU, approximate="none", inplace=True),
        F.hardswish: _spell(HARDSWISH, "inplace"), _NN.hardswish: _spell(HARDSWISH),
        _NN.hardswish_: _spell(HARDSWISH, inplace=True),
        F.hardsigmoid: _spell(HARDSIGMOID, "inplace"), _NN.hardsigmoid: _spell(HARDSIGMOID),
        _NN.hardsigmoid_: _spell(HARDSIGMOID, inplace=True),
        F.leaky_relu: _spell(LEAKY_RELU, "negative_slope inplace", negative_slope=0.01),
        F.leaky_relu_: _spell(LEAKY_RELU, "negative_slope", negative_slope=0.01, inplace=True),
        _NN.leaky_relu: _spell(LEAKY_RELU, "negative_slope", negative_slope=0.01),
        torch.prelu: _spell(PRELU, "weight"), _T.prelu: _spell(PRELU, "weight"), F.prelu: _spell(PRELU, "weight"),
        F.rrelu: _spell(RRELU, "lower upper training inplace", **rrelu),
        torch.rrelu: _spell(RRELU, "lower upper training", **rrelu),
        torch.rrelu_: _spell(RRELU, "lower upper training", inplace=True, **rrelu),
        F.elu: _spell(ELU, "alpha inplace", **elu),
        F.elu_: _spell(ELU, "alpha scale input_scale", inplace=True, **elu),
        _NN.elu: _spell(ELU, "alpha scale input_scale", **elu),
        F.selu: _spell(SELU, "inplace"), torch.selu: _spell(SELU), torch.selu_: _spell(SELU, inplace=True),
        F.celu: _spell(CELU, "alpha inplace", alpha=1.0), torch.celu: _spell(CELU, "alpha", alpha=1.0),
        torch.celu_: _spell(CELU, "alpha", alpha=1.0, inplace=True),
        F.mish: _spell(MISH, "inplace"), _NN.mish: _spell(MISH), _NN.mish_: _spell(MISH, inplace=True),
        F.softplus: _spell(SOFTPLUS, "beta threshold", beta=1.0, threshold=20.0),
    }
    return table


_TABLE = _table()


def rule_for(func: Callable) -> Rule | None:
    """The :class:`Rule` the mode applies to calls of ``func`` (``None``: not a known nonlinearity)."""
    spelling = _TABLE.get(func)
    return spelling.rule if spelling is not None else None


class _Rule(torch.autograd.Function):
    """Forward: the original call. Backward: the method's rule for its nonlinearity."""

    @staticmethod
    def forward(ctx, x, call, rule, method, params, inplace):  # noqa: D401 - autograd API
        saved = None
        if method == "guided" and not rule.from_y:
            # The derivative needs x; an in-place call overwrites it, so keep a copy.
            saved = x.clone() if inplace else x
        y = call()
        if inplace:
            ctx.mark_dirty(x)
            y = x
        if method == "guided":
            ctx.save_for_backward(y if rule.from_y else saved)
        ctx.rule, ctx.method, ctx.params = rule, method, params
        return y

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad), None, None, None, None, None


def _backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    """``relu(g)`` for deconvnet; ``relu(g) * relu(f'(x))`` for guided."""
    if ctx.method == "deconvnet":
        return grad.clamp(min=0)
    (s,) = ctx.saved_tensors
    rule = ctx.rule
    if rule.guided is not None:
        return rule.guided(grad, s, ctx.params)
    # relu(g) >= 0, so relu(relu(g) * f') == relu(g) * relu(f') exactly.
    g = rule.chain(grad.clamp(min=0), s, ctx.params)
    return g if rule.monotone else g.clamp_(min=0)


class RuleMode(TorchFunctionMode):
    """While active, every covered nonlinearity backpropagates with ``method``'s rule.

    Parameters
    ----------
    method:
        ``"guided"`` or ``"deconvnet"``.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([-1.0, 2.0], requires_grad=True)
    >>> with RuleMode("guided"):
    ...     y = torch.relu(x * 1)
    >>> y.backward(torch.tensor([1.0, -3.0])); x.grad
    tensor([0., 0.])
    """

    def __init__(self, method: str) -> None:
        super().__init__()
        if method not in ("guided", "deconvnet"):
            raise ValueError(f"RuleMode method must be 'guided' or 'deconvnet', got {method!r}")
        self.method = method
        self.calls = 0  # how many nonlinearities were rewritten (for diagnostics/tests)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        spelling = _TABLE.get(func)
        if spelling is None:
            return func(*args, **kwargs)
        x = args[0] if args else kwargs.get("input")
        if not (isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled()) or "out" in kwargs:
            # Nothing to differentiate (or an out= call, which autograd refuses anyway): the plain op.
            return func(*args, **kwargs)
        params, inplace = spelling.bind(args, kwargs)
        if spelling.rule is RRELU and params["training"]:
            return func(*args, **kwargs)  # random slopes: no rule (reported by the graph check)
        if spelling.rule is PRELU:
            params["weight"] = params["weight"].detach()
        self.calls += 1
        # The mode is off inside this handler, so the call runs the plain op.
        return _Rule.apply(x, lambda: func(*args, **kwargs), spelling.rule, self.method, params, inplace)


# Autograd nodes that are linear or only move/select values (plus the
# normalisations, treated as linear: see the module docstring). Names are
# the node class names without ``Backward<N>``. Anything else on the path from
# the input to the layer, other than our own rule, is reported.
_STRUCTURAL = frozenset("""
    AccumulateGrad Add Sub Rsub Mul Div Neg Sum Mean Cat Stack Split SplitWithSizes Unbind Chunk
    View UnsafeView Reshape ReshapeAlias Permute Transpose T Expand ExpandAs Slice Select Index IndexSelect
    Gather Narrow Squeeze Unsqueeze Clone ToCopy Copy CopySlices Alias AsStrided Flatten Unflatten Repeat
    Flip Roll Contiguous Addmm Mm Bmm Mv Addmv Addbmm Baddbmm Linear Matmul Dot Einsum Max Amax Min Amin
    NativeBatchNorm CudnnBatchNorm MiopenBatchNorm NativeBatchNormLegitNoTraining BatchNorm
    NativeLayerNorm NativeGroupNorm PixelShuffle PixelUnshuffle NativeDropout Dropout FeatureDropout
    Im2Col Col2Im Unfold ConstantPadNd
""".split())
# Families: every convolution kernel, pooling (max-pool switches included),
# padding and resampling.
_STRUCTURAL_RE = re.compile(r"Conv|Pool|Pad\d|Upsample|GridSampler|AffineGrid")
_NODE_SUFFIX = re.compile(r"Backwards?\d*$")


def _node_name(node) -> str | None:
    """Readable name of an autograd node without a rule, ``None`` if it is ours or structural."""
    forward_cls = getattr(type(node), "_forward_cls", None)
    if forward_cls is not None:  # a torch.autograd.Function
        if forward_cls is _Rule:
            return None
        return f"{forward_cls.__name__} (custom torch.autograd.Function)"
    cls = type(node).__name__
    stem = _NODE_SUFFIX.sub("", cls)
    if stem in _STRUCTURAL or _STRUCTURAL_RE.search(stem):
        return None
    op = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", stem).lower()
    return f"{op} ({cls})"


def _nodes_between(output: torch.Tensor, input: torch.Tensor) -> list:
    """Autograd nodes on some path from ``output`` back to ``input`` (iterative: graphs are deep)."""
    root, target = output.grad_fn, input.grad_fn
    if root is None or target is None:
        return []
    reach: dict = {target: True}
    expanded: set = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node in reach:
            continue
        kids = [k for k, _ in node.next_functions if k is not None]
        if node in expanded:
            reach[node] = any(reach.get(k, False) for k in kids)
            continue
        expanded.add(node)
        stack.append(node)
        stack.extend(k for k in kids if k not in reach)
    return [node for node, hit in reach.items() if hit and node is not target]


def unknown_nonlinearities(output: torch.Tensor, input: torch.Tensor) -> dict[str, int]:
    """Ops without a rule between ``input`` and ``output``, with how often each occurs.

    Parameters
    ----------
    output:
        A tensor computed under :class:`RuleMode` (its graph not yet freed).
    input:
        A non-leaf tensor it was computed from (``leaf.clone()``): only ops on
        a path from it count, so parameter-only computations (a weight
        standardisation, say) are ignored.

    Returns
    -------
    dict
        Readable name (``"erf (ErfBackward0)"``, ``"MyGelu (custom
        torch.autograd.Function)"``) -> number of nodes on the path.
    """
    found: dict[str, int] = {}
    for node in _nodes_between(output, input):
        name = _node_name(node)
        if name is not None:
            found[name] = found.get(name, 0) + 1
    return found


def _caller() -> tuple[str, int, str]:
    """File, line and module of the first frame outside this package (where the user called us)."""
    package = __name__.split(".")[0]
    frame = inspect.currentframe()
    last = None
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module != package and not module.startswith(package + "."):
            return frame.f_code.co_filename, frame.f_lineno, module
        last, frame = frame, frame.f_back
    assert last is not None
    return last.f_code.co_filename, last.f_lineno, last.f_globals.get("__name__", "")


def warn_unknown_nonlinearities(output: torch.Tensor, input: torch.Tensor, method: str, layer: str) -> dict[str, int]:
    """One :class:`~interp.notices.UnknownNonlinearityWarning` per op without a ``method`` rule.

    Issued with a fresh registry so that the default "show once per
    location" filter cannot hide it on a later call: every call that meets
    such an op says so (a user's own ``ignore`` filter still applies).

    Returns
    -------
    dict
        What :func:`unknown_nonlinearities` found.
    """
    found = unknown_nonlinearities(output, input)
    if not found:
        return found
    filename, lineno, module = _caller()
    for name, count in found.items():
        times = f", used {count} times" if count > 1 else ""
        message = (
            f"layer {layer!r}: no {method} rule for {name}{times}; it kept its plain gradient, so this "
            f"{method} projection is partly an ordinary gradient (interp.rules lists the nonlinearities with rules)"
        )
        warnings.warn_explicit(message, UnknownNonlinearityWarning, filename, lineno, module=module, registry=None)
    return found

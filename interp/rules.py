"""Backward rules for deconvnet and guided backprop, applied to every nonlinearity.

Captum and the original notebook rewrite gradients with backward hooks on
``nn.ReLU`` modules, so a ``F.relu`` call (torchvision's GoogLeNet, many
research models) silently keeps its plain gradient. We instead intercept the
*functions* with a :class:`torch.overrides.TorchFunctionMode` while the forward
runs, and replace each nonlinearity by an autograd function that computes the
same forward value and the method's backward. This catches ``nn.ReLU`` (also
reused and ``inplace=True``), ``F.relu``, ``torch.relu``, ``Tensor.relu``,
``relu_``, the ReLU-like clamps ``nn.ReLU6`` / ``F.relu6`` / ``F.hardtanh``,
and the smooth ``tanh`` / ``sigmoid`` (all spellings).

Rules, with ``g`` the incoming gradient and ``y`` the forward output:

============  ===========================  =============================
nonlinearity  guided (Springenberg 2015)   deconvnet (Zeiler & Fergus 2014)
============  ===========================  =============================
ReLU          ``relu(g) * [y > 0]``        ``relu(g)``
hardtanh      ``relu(g) * [lo < y < hi]``  ``relu(g)``
(ReLU6: lo=0, hi=6)
tanh          ``relu(g) * (1 - y**2)``     ``relu(g)``
sigmoid       ``relu(g) * y * (1 - y)``    ``relu(g)``
============  ===========================  =============================

Guided backprop multiplies by the local derivative (the forward mask for a
ReLU) and rectifies; deconvnet only rectifies, ignoring the forward pass, as
the deconvnet passes its reconstruction through a ReLU. For tanh and sigmoid
the local derivative is positive, so guided equals "rectify the ordinary
gradient". Everything else (convolutions, pooling, max-pool switches,
BatchNorm, residual additions) uses its ordinary autograd backward, which for
max-pool and convolution is exactly the deconvnet's unpooling with switches
and transposed filtering.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

METHODS = ("guided", "deconvnet", "gradient")

_T = torch._C.TensorBase


class _Rule(torch.autograd.Function):
    """Forward: the original nonlinearity. Backward: the method's rule."""

    @staticmethod
    def forward(ctx, x, kind, method, inplace, lo, hi):  # noqa: D401 - autograd API
        if kind == "clamp":
            if inplace:
                ctx.mark_dirty(x)
                y = torch.clamp_(x, min=lo, max=None if math.isinf(hi) else hi)
            else:
                y = torch.clamp(x, min=lo, max=None if math.isinf(hi) else hi)
        elif kind == "tanh":
            if inplace:
                ctx.mark_dirty(x)
                y = torch.tanh_(x)
            else:
                y = torch.tanh(x)
        else:  # sigmoid
            if inplace:
                ctx.mark_dirty(x)
                y = torch.sigmoid_(x)
            else:
                y = torch.sigmoid(x)
        ctx.save_for_backward(y)
        ctx.kind, ctx.method, ctx.lo, ctx.hi = kind, method, lo, hi
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        if ctx.method == "guided" and ctx.kind == "clamp":
            # relu(g) * [lo < y < hi] in two memory passes and one new tensor:
            # threshold_backward keeps g where y > lo (the kernel ReLU's own
            # backward uses), then clamp in place. The bool-mask product took
            # four passes and two temporaries; the values are the same.
            g = torch.ops.aten.threshold_backward(grad, y, ctx.lo).clamp_(min=0)
            if not math.isinf(ctx.hi):
                g.masked_fill_(y >= ctx.hi, 0)
            return g, None, None, None, None, None
        g = grad.clamp(min=0)
        if ctx.method == "guided":
            if ctx.kind == "tanh":
                g = g * (1 - y * y)
            else:
                g = g * (y * (1 - y))
        return g, None, None, None, None, None


def _arg(args: tuple, kwargs: dict, index: int, name: str, default):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


# func -> (kind, inplace-resolver, lo/hi resolver)
def _relu(args, kwargs):
    return "clamp", bool(_arg(args, kwargs, 1, "inplace", False)), 0.0, math.inf


def _relu_inplace(args, kwargs):
    return "clamp", True, 0.0, math.inf


def _relu_plain(args, kwargs):
    return "clamp", False, 0.0, math.inf


def _relu6(args, kwargs):
    return "clamp", bool(_arg(args, kwargs, 1, "inplace", False)), 0.0, 6.0


def _hardtanh(args, kwargs):
    lo = float(_arg(args, kwargs, 1, "min_val", -1.0))
    hi = float(_arg(args, kwargs, 2, "max_val", 1.0))
    return "clamp", bool(_arg(args, kwargs, 3, "inplace", False)), lo, hi


def _hardtanh_inplace(args, kwargs):
    lo = float(_arg(args, kwargs, 1, "min_val", -1.0))
    hi = float(_arg(args, kwargs, 2, "max_val", 1.0))
    return "clamp", True, lo, hi


def _smooth(kind, inplace):
    return lambda args, kwargs: (kind, inplace, 0.0, 0.0)


_TABLE = {
    F.relu: _relu,
    torch.relu: _relu_plain,
    _T.relu: _relu_plain,
    torch.relu_: _relu_inplace,
    _T.relu_: _relu_inplace,
    F.relu6: _relu6,
    F.hardtanh: _hardtanh,
    F.hardtanh_: _hardtanh_inplace,
    torch.tanh: _smooth("tanh", False),
    _T.tanh: _smooth("tanh", False),
    torch.tanh_: _smooth("tanh", True),
    _T.tanh_: _smooth("tanh", True),
    torch.sigmoid: _smooth("sigmoid", False),
    _T.sigmoid: _smooth("sigmoid", False),
    torch.sigmoid_: _smooth("sigmoid", True),
    _T.sigmoid_: _smooth("sigmoid", True),
}
if F.sigmoid is not torch.sigmoid:  # older torch keeps a Python wrapper
    _TABLE[F.sigmoid] = _smooth("sigmoid", False)


class RuleMode(TorchFunctionMode):
    """While active, every covered nonlinearity backpropagates with ``method``'s rule.

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
        spec = _TABLE.get(func)
        if spec is None or not args or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        x = args[0]
        if not (x.requires_grad and torch.is_grad_enabled()):
            return func(*args, **kwargs)
        kind, inplace, lo, hi = spec(args, kwargs)
        self.calls += 1
        return _Rule.apply(x, kind, self.method, inplace, lo, hi)

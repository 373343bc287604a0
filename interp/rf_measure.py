"""Receptive fields measured as the gradient support of a positive twin.

Where the graph analysis cannot follow an op (or the model cannot be traced),
the field is measured instead: a deep copy of the model (the user's model is
untouched) is made *positive* so that no cancellation can hide a dependence:

* float64; every weight ``|w| + eps``, normalised per output unit so
  activations stay O(1); other parameters (norm scales, layer scales) 1,
  biases 0;
* activations, gates, softmax and normalisation layers become the identity
  (a :class:`torch.overrides.TorchFunctionMode` intercepts ``F.relu``,
  ``torch.sigmoid``, ``F.layer_norm``, ... wherever they are called);
* max pooling becomes average pooling of the same geometry, so every input of
  a window gets gradient.

Its input is positive too, so every unit is a positive combination of the
pixels it depends on, and the gradient of the unit is non-zero exactly there.
A batch of identical inputs gives each batch element its own unit (corners,
centre, the next unit on the diagonal), so one backward pass per layer measures
them all. Size, stride and offset are fitted from the centre units; the read
extent from the border units.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from . import rf_axes as ra
from ._utils import model_device

__all__ = ["Target", "Measured", "positive_twin", "PositiveMode", "measure"]

_IDENTITY = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.hardtanh, F.hardtanh_, F.leaky_relu, F.leaky_relu_, F.elu,
    F.elu_, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.sigmoid, torch.sigmoid,
    torch.sigmoid_, F.tanh, torch.tanh, F.softplus, F.softmax, torch.softmax, F.log_softmax, F.layer_norm,
    F.group_norm, F.batch_norm, F.instance_norm, F.local_response_norm, F.normalize, F.dropout, F.dropout2d,
    torch.Tensor.relu, torch.Tensor.relu_, torch.Tensor.sigmoid, torch.Tensor.sigmoid_, torch.Tensor.tanh,
    torch.Tensor.softmax, torch.Tensor.tanh_, F.rrelu, F.prelu, F.logsigmoid, torch.Tensor.clamp, torch.clamp,
    torch.Tensor.clamp_, torch.clamp_min, torch.Tensor.clamp_min, F.softsign,
}


class PositiveMode(TorchFunctionMode):
    """Identity activations/norms and average instead of max pooling, wherever called."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _IDENTITY:
            return args[0] if args else next(iter(kwargs.values()))
        if func is F.max_pool2d or func is torch.max_pool2d:
            return self._avg(*args, **kwargs)
        if func is F.adaptive_max_pool2d:
            out = F.adaptive_avg_pool2d(args[0], args[1] if len(args) > 1 else kwargs["output_size"])
            return (out, torch.zeros_like(out, dtype=torch.long)) if kwargs.get("return_indices") else out
        if func in (torch.amax, torch.Tensor.amax):
            dim = args[1] if len(args) > 1 else kwargs.get("dim", ())
            return torch.mean(args[0], dim=dim, keepdim=kwargs.get("keepdim", args[2] if len(args) > 2 else False))
        return func(*args, **kwargs)

    @staticmethod
    def _avg(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
        if dilation not in (1, (1, 1), [1, 1]):
            return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
        out = F.avg_pool2d(x, kernel_size, stride if stride not in (None, [], ()) else kernel_size, padding,
                           ceil_mode, True)
        return (out, torch.zeros_like(out, dtype=torch.long)) if return_indices else out


def positive_twin(model: nn.Module) -> nn.Module:
    """Deep float64 copy with positive weights (see the module docstring)."""
    twin = copy.deepcopy(model).double().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if not p.is_floating_point():
                continue
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() >= 2:
                w = p.abs() + 0.5 * p.abs().mean() + 1e-3
                w = w * (0.5 + torch.rand(w.shape, generator=gen, dtype=w.dtype))
                p.copy_(w / w.sum(dim=tuple(range(1, w.dim())), keepdim=True))
            else:
                p.fill_(1.0)
    return twin


@dataclass(frozen=True)
class Target:
    """A layer to measure: its public name, the graph node or module path producing it,
    and the tensor dims of its rows and columns."""

    name: str
    node: str | None
    module: str | None
    dims: tuple[int, int]


@dataclass(frozen=True)
class Measured:
    """A measured field: per-axis arrays (with a fitted nominal form), global flag, remarks."""

    field: ra.NodeField
    output_size: tuple[int, int]
    notes: tuple[str, ...]


_BATCH = 4  # units per layer: the two corners, the centre and the next unit on the diagonal


def _units(h: int, w: int) -> list[tuple[int, int]]:
    """Units to measure. Rows and columns are read off the same units: the rows a unit sees
    do not depend on its column (true of every separable geometry), which halves the batch."""
    cy, cx = (h - 1) // 2, (w - 1) // 2
    return [(0, 0), (cy, cx), (min(cy + 1, h - 1), min(cx + 1, w - 1)), (h - 1, w - 1)]


class _Capture(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.outputs: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.outputs[n.name] = out
        return out


def _forward(twin: nn.Module, graph: fx.Graph | None, targets: list[Target], x: torch.Tensor) -> dict[str, Any]:
    """Outputs of every target on ``x`` (graph interpreter if given, else module hooks)."""
    if graph is not None:
        # A copy of the graph: a GraphModule owns its graph, and the shared trace must not
        # end up owned by (and keeping alive) this throw-away twin.
        runner = _Capture(fx.GraphModule(twin, copy.deepcopy(graph)), {t.node for t in targets if t.node})
        runner.run(x)
        return {t.name: runner.outputs.get(t.node) for t in targets}
    modules = dict(twin.named_modules())
    outputs: dict[str, Any] = {}
    handles = []
    for t in targets:
        def hook(m, i, o, name=t.name):
            outputs.setdefault(name, o if isinstance(o, torch.Tensor) else next(
                (v for v in o if isinstance(v, torch.Tensor)), None))
        handles.append(modules[t.module].register_forward_hook(hook))
    try:
        twin(x)
    finally:
        for h in handles:
            h.remove()
    return outputs


def measure(model: nn.Module, x_shape: tuple[int, ...], targets: list[Target],
            graph: fx.Graph | None = None) -> dict[str, Measured | str]:
    """Measure the fields of ``targets`` on an input of shape ``x_shape`` (``(1, C, H, W)``).

    Returns
    -------
    dict
        name -> :class:`Measured`, or a string saying why it could not be measured.
    """
    twin = positive_twin(model)
    gen = torch.Generator().manual_seed(0)
    base = 1.0 + torch.rand(x_shape[1:], generator=gen, dtype=torch.float64)
    x = base.expand(_BATCH, *x_shape[1:]).to(model_device(twin)).clone().requires_grad_(True)
    with PositiveMode():
        outputs = _forward(twin, graph, targets, x)
    result: dict[str, Measured | str] = {}
    h_in, w_in = x_shape[2], x_shape[3]
    for t in targets:
        out = outputs.get(t.name)
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            result[t.name] = "its output does not depend on the input"
            continue
        if out.dim() <= max(t.dims) or t.dims[0] == t.dims[1]:
            result[t.name] = "it has no spatial output"
            continue
        h, w = out.shape[t.dims[0]], out.shape[t.dims[1]]
        units = _units(h, w)
        total = out.new_zeros(())
        for b, (y, xx) in enumerate(units):
            idx: list[Any] = [slice(None)] * out.dim()
            idx[0], idx[t.dims[0]], idx[t.dims[1]] = b, y, xx
            total = total + out[tuple(idx)].sum()
        (grad,) = torch.autograd.grad(total, x, retain_graph=True, allow_unused=True)
        if grad is None:
            result[t.name] = "its output does not depend on the input"
            continue
        support = grad.abs().sum(1) > 0  # (B, H, W)
        boxes = [_bbox(support[b]) for b in range(len(units))]
        result[t.name] = _fit(units, boxes, (h, w), (h_in, w_in), t.dims)
    return result


def _bbox(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    rows = mask.any(1).nonzero()
    cols = mask.any(0).nonzero()
    if not len(rows):
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _fit(units, boxes, n_out: tuple[int, int], n_in: tuple[int, int], dims: tuple[int, int]) -> Measured:
    notes: list[str] = []
    axes = []
    for k in (0, 1):
        got = {u[k]: (b[k], b[k + 2]) for u, b in zip(units, boxes) if b is not None}
        ax, note = _fit_axis(got, n_out[k], n_in[k], dims[k])
        axes.append(ax)
        if note:
            notes.append(note)
    # Global only for a single unit that sees everything (pooled to one position): a deep
    # layer whose large fields cover a small input is still local.
    full = n_out == (1, 1) and all(b == (0, 0, n_in[0], n_in[1]) for b in boxes)
    field = ra.NodeField(None, glob=True) if full else ra.NodeField((axes[0], axes[1]))
    return Measured(field, n_out, tuple(notes))


def _fit_axis(got: dict[int, tuple[int, int]], n: int, n_in: int, dim: int) -> tuple[ra.Axis, str | None]:
    """Fit ``(size, stride, offset)`` to measured intervals of positions along one axis."""
    if not got:
        return ra.from_affine(dim, n, (0, 1, 0), 0, 0), "no unit depends on the input along an axis"
    lo_read = min(v[0] for v in got.values())
    hi_read = max(v[1] for v in got.values())
    c = (n - 1) // 2
    note = None
    if c in got and c + 1 in got and got[c][0] > 0 and got[c + 1][1] < n_in and got[c + 1][0] > got[c][0]:
        stride = got[c + 1][0] - got[c][0]
    else:
        stride = max(1, round(n_in / max(n, 1)))
        if n > 1:
            note = "the field reaches past the input: its measured size is a lower bound"
    lo_c, hi_c = got.get(c, (lo_read, hi_read))
    size = hi_c - lo_c
    offset = lo_c - c * stride
    ax = ra.from_affine(dim, n, (size, stride, offset), lo_read, hi_read)
    if any((int(ax.lo[p]), int(ax.hi[p])) != v for p, v in got.items()):
        note = "the measured field is not regular (not one size and stride for all units); boxes are approximate"
    return ax, note


"""Dependency-cone evaluation of units of a plain conv/pool chain (issue #19).

A unit ``(n, c, y, x)`` of a layer depends on one window of every earlier
map: composing ``(kernel, stride, padding, dilation)`` back from the layer, a
step's input window for the unit starts at ``y * S - P`` and is ``K`` wide,
the same ``(S, P, K)`` for every unit. When the path from the model input to
the layer is a pure chain of convolutions, max/avg pools and pointwise
modules (:func:`plan` checks it on the fx trace), each unit's window of its
image is gathered (zeros outside the image), every spatial step runs
*without* padding on the stacked windows, so the map shrinks to exactly the
next window, and the single remaining position holds the unit. This is much
less work than a forward over a crop that holds the receptive field, where
every layer runs over the whole crop.

Exactness: a window's positions that fall outside the true map of a step's
input must hold what the original padding puts there. The original pads
*after* the pointwise modules, so right before every padded spatial step the
window is multiplied by a 0/1 mask of the true map (zero padding), or gets
``-inf`` added on the padding band (max-pool). Positions farther out only
feed outputs that are themselves outside the map and are masked in turn;
they stay finite (a max-pool window always holds a finite input), so no
``0 * inf`` reaches the backward. Masks are products and sums, which
autograd differentiates exactly (zero gradient on padding). The forward runs
under the same rule mode as the plain path, so the method's rules apply.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._trace import try_trace

__all__ = ["Cone", "Step", "cost", "plan", "run"]

# Pointwise modules the cone runs as they are: elementwise (or per channel)
# with a rule in interp.rules, or the identity in eval mode.
_POINTWISE = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Threshold, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.GELU, nn.Hardswish,
    nn.Hardsigmoid, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus,
    nn.Identity, nn.Dropout, nn.Dropout2d,
)


def _pair(v) -> tuple[int, int] | None:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(a, int) for a in v):
        return (int(v[0]), int(v[1]))
    return None


@dataclass(frozen=True)
class Step:
    """One module of the chain: ``kind`` is ``conv``, ``max``, ``avg`` or ``point``."""

    module: nn.Module
    kind: str
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The step without padding (pointwise steps: the module itself)."""
        m = self.module
        if self.kind == "conv":
            return F.conv2d(x, m.weight, m.bias, self.stride, 0, self.dilation, m.groups)
        if self.kind == "max":
            return F.max_pool2d(x, self.kernel, self.stride, 0, self.dilation)
        if self.kind == "avg":
            return F.avg_pool2d(x, self.kernel, self.stride, 0, False, True, m.divisor_override)
        return m(x)


def _step(m: nn.Module) -> Step | None:
    """The chain step of module ``m``, or ``None`` if the cone cannot run it exactly."""
    t = type(m)
    if t is nn.Conv2d:
        if m.padding_mode != "zeros" or isinstance(m.padding, str) and m.padding != "valid":
            return None
        pad = (0, 0) if isinstance(m.padding, str) else _pair(m.padding)
        return Step(m, "conv", _pair(m.kernel_size), _pair(m.stride), pad, _pair(m.dilation))
    if t is nn.MaxPool2d:
        if m.ceil_mode or m.return_indices:
            return None
        geo = (_pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding), _pair(m.dilation))
        return None if None in geo else Step(m, "max", *geo)
    if t is nn.AvgPool2d:
        pad = _pair(m.padding)
        if m.ceil_mode or pad is None or (pad != (0, 0) and not m.count_include_pad):
            return None
        geo = (_pair(m.kernel_size), _pair(m.stride or m.kernel_size), pad)
        return None if None in geo else Step(m, "avg", *geo)
    if t is nn.BatchNorm2d:
        # Eval mode with running statistics: a per-channel affine map.
        return Step(m, "point") if not m.training and m.running_mean is not None else None
    if t in _POINTWISE:
        return Step(m, "point")
    return None


def _chain(model: nn.Module, layer: str) -> list[Step] | None:
    """The steps from the model input to ``layer`` when that path is a pure chain, else ``None``."""
    traced, _ = try_trace(model)
    if traced is None or layer not in traced.names:
        return None
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    node, steps, paths = traced.names[layer], [], []
    while node.op != "placeholder":
        if node.op != "call_module" or node.kwargs or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            return None
        step = _step(traced.root.get_submodule(str(node.target)))
        if step is None:
            return None
        steps.append(step)
        paths.append(str(node.target))
        node = node.args[0]
    if not steps or node is not placeholders[0] or not _sequential_prefix(model, paths[::-1]):
        return None
    return steps[::-1]


def _sequential_prefix(model: nn.Module, paths: list[str]) -> bool:
    """Whether ``paths`` are the first children, in order, of one plain ``nn.Sequential``.

    The cone runs the modules itself instead of the model's forward, so it
    trusts only a forward it knows: ``nn.Sequential``'s. A hand-written
    forward may do more than its trace shows (branch on grad mode, hooks).
    """
    parent = paths[0].rpartition(".")[0]
    container = model.get_submodule(parent) if parent else model
    if type(container) is not nn.Sequential:
        return False
    prefix = f"{parent}." if parent else ""
    if paths != [f"{prefix}{i}" for i in range(len(paths))]:
        return False
    # A forward hook could change what a module returns; the cone does not call convolutions and pools.
    modules = [container] + [model.get_submodule(p) for p in paths]
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


@dataclass
class Cone:
    """The chain's geometry for one image size.

    ``sizes[i]``: the true ``(h, w)`` of step ``i``'s input map (``sizes[-1]``
    is the layer's output); ``windows[i]``: per axis ``(S, P, K)`` of a
    unit's window at step ``i``'s input, which starts at ``y * S - P``.
    """

    steps: list[Step]
    sizes: list[tuple[int, int]]
    windows: list[tuple[tuple[int, int, int], tuple[int, int, int]]]
    channels: int

    def window_cost(self) -> float:
        """Multiply-adds of one window's forward."""
        total = 0.0
        for i, st in enumerate(self.steps):
            if st.kind != "point":
                out = self.windows[i + 1] if i + 1 < len(self.steps) else ((1, 0, 1), (1, 0, 1))
                total += _macs(st, out[0][2], out[1][2])
        return total

    def map_cost(self, height: int, width: int) -> float:
        """Multiply-adds of the chain's ordinary (padded) forward on an ``height x width`` input."""
        total = 0.0
        for st in self.steps:
            if st.kind != "point":
                height, width = _out_size(height, st, 0), _out_size(width, st, 1)
                total += _macs(st, height, width)
        return total

    def origin(self, i: int, y: int, x: int) -> tuple[int, int]:
        """Top-left of unit ``(y, x)``'s window at step ``i``'s input."""
        (sy, py, _), (sx, px, _) = self.windows[i]
        return y * sy - py, x * sx - px


def _macs(st: Step, oh: int, ow: int) -> float:
    if st.kind == "conv":
        w = st.module.weight
        return float(oh * ow * w.shape[0] * w.shape[1] * w.shape[2] * w.shape[3])
    return 0.0  # pools and pointwise steps: negligible next to the convolutions


def _out_size(size: int, st: Step, a: int) -> int:
    span = st.dilation[a] * (st.kernel[a] - 1) + 1
    return (size + 2 * st.padding[a] - span) // st.stride[a] + 1


def plan(model: nn.Module, layer: str, height: int, width: int, out_shape) -> Cone | None:
    """The cone of ``layer`` for ``height x width`` images, or ``None`` when it does not apply.

    ``out_shape``: the layer's real output shape ``(N, C, H, W)``; the
    chain's computed size must match it (else the trace is not what runs).
    """
    steps = _chain(model, layer)
    if steps is None:
        return None
    sizes = [(height, width)]
    for st in steps:
        h, w = sizes[-1]
        if st.kind != "point":
            h, w = _out_size(h, st, 0), _out_size(w, st, 1)
        if h < 1 or w < 1:
            return None
        sizes.append((h, w))
    if tuple(sizes[-1]) != tuple(out_shape[2:]):
        return None
    geo = [[1, 0, 1], [1, 0, 1]]
    windows = []
    for st in reversed(steps):
        if st.kind != "point":
            for a in (0, 1):
                s_, p_, k_ = geo[a]
                span = st.dilation[a] * (st.kernel[a] - 1) + 1
                geo[a] = [s_ * st.stride[a], p_ * st.stride[a] + st.padding[a], (k_ - 1) * st.stride[a] + span]
        windows.append((tuple(geo[0]), tuple(geo[1])))
    return Cone(steps, sizes, windows[::-1], int(out_shape[1]))


def _masks(cone: Cone, ys: list[int], xs: list[int], device, dtype) -> list[torch.Tensor | None]:
    """Per step: the padding mask of the chunk's windows at its input, ``None`` where none is needed."""
    masks: list[torch.Tensor | None] = []
    for i, st in enumerate(cone.steps):
        if st.kind == "point" or st.padding == (0, 0):
            masks.append(None)
            continue
        axes = []
        inside = True
        for a, pos in ((0, ys), (1, xs)):
            s_, p_, k_ = cone.windows[i][a]
            size = cone.sizes[i][a]
            lo, hi = min(pos) * s_ - p_, max(pos) * s_ - p_ + k_
            inside = inside and lo >= 0 and hi <= size
            r = torch.tensor(pos, dtype=torch.long)[:, None] * s_ - p_ + torch.arange(k_)
            if st.kind == "max":
                band = ((r >= -st.padding[a]) & (r < 0)) | ((r >= size) & (r < size + st.padding[a]))
                axes.append(torch.where(band, -math.inf, 0.0))
            else:
                axes.append(((r >= 0) & (r < size)).double())
        if inside:
            masks.append(None)
            continue
        rows, cols = axes
        m = rows[:, None, :, None] + cols[:, None, None, :] if st.kind == "max" else rows[:, None, :, None] * cols[:, None, None, :]
        masks.append(m.to(device=device, dtype=dtype))
    return masks


def _forward(cone: Cone, x: torch.Tensor, masks, cached=None) -> torch.Tensor:
    """The windows through the chain; ``cached[i]``: step ``i``'s (conv) output windows, taken as given."""
    for i, (st, m) in enumerate(zip(cone.steps, masks)):
        if m is not None:
            x = x + m if st.kind == "max" else x * m
        if cached is not None and st.kind == "conv":
            x = _CachedConv.apply(x, cached[i], st.module.weight, st.stride, st.dilation, st.module.groups)
        else:
            x = st.apply(x)
    return x


class _CachedConv(torch.autograd.Function):
    """A valid convolution whose output is already known: returns it, and back-propagates exactly
    the convolution's input gradient (the weights get none: project never needs them)."""

    @staticmethod
    def forward(ctx, x, out, weight, stride, dilation, groups):  # noqa: D401 - autograd API
        ctx.save_for_backward(weight)
        ctx.geometry = (tuple(x.shape), stride, dilation, groups)
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, dilation, groups = ctx.geometry
        gx = torch.nn.grad.conv2d_input(shape, weight, grad, stride, 0, dilation, groups)
        return gx, None, None, None, None, None


def _full_maps(cone: Cone, image: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every conv step's output on one whole image ``(1, C, H, W)`` (ordinary padded forward, no graph)."""
    maps: dict[int, torch.Tensor] = {}
    x = image
    with torch.no_grad():
        for i, st in enumerate(cone.steps):
            m = st.module
            if st.kind == "conv":
                x = F.conv2d(x, m.weight, m.bias, st.stride, st.padding, st.dilation, m.groups)
                maps[i] = x.clone()  # a following in-place activation must not change it
            elif st.kind == "max":
                x = F.max_pool2d(x, st.kernel, st.stride, st.padding, st.dilation)
            elif st.kind == "avg":
                x = F.avg_pool2d(x, st.kernel, st.stride, st.padding, False, True, m.divisor_override)
            else:
                x = m(x)
    return maps


def _gather(src: torch.Tensor, origins, kh: int, kw: int) -> torch.Tensor:
    """Windows ``kh x kw`` of ``src`` ``(C, H, W)`` at ``origins`` (top, left), zeros outside it."""
    _, height, width = src.shape
    out = src.new_zeros((len(origins), src.shape[0], kh, kw))
    for row, (top, left) in enumerate(origins):
        t, b, l0, r = max(top, 0), min(top + kh, height), max(left, 0), min(left + kw, width)
        if t < b and l0 < r:
            out[row, :, t - top : b - top, l0 - left : r - left] = src[:, t:b, l0:r]
    return out


def _schedule(units, rows: int):
    """Chunks of ``(inputs, rounds)``: ``inputs`` are unit indices whose windows form the rows,
    ``rounds`` lists of ``(row, unit)`` with each row at most once per round.

    Units at the same image and position share a window; sharing one forward
    among ``R`` rounds costs ``D (1 + 2R)`` passes for ``D`` windows, against
    ``3U`` with one row per unit (a backward costs about two forwards).
    """
    by_key: dict[tuple[int, int, int], list[int]] = {}
    for i, (n, _, y, x) in enumerate(units):
        by_key.setdefault((n, y, x), []).append(i)
    groups = list(by_key.values())
    n_rounds = max(len(g) for g in groups)
    if len(groups) * (1 + 2 * n_rounds) >= 3 * len(units):
        groups = [[i] for i in range(len(units))]
    for start in range(0, len(groups), rows):
        chunk = groups[start : start + rows]
        depth = max(len(g) for g in chunk)
        rounds = [[(row, g[r]) for row, g in enumerate(chunk) if r < len(g)] for r in range(depth)]
        yield [g[0] for g in chunk], rounds


def _split(cone: Cone, units) -> tuple[list[list[int]], list[int]]:
    """Units by image for the shared forward (images with enough units), and the rest.

    One whole-image forward serves all of an image's units, whose backward
    then runs on their cones only: ``M + 2kw`` against ``3kw`` for ``k``
    units with cones of ``w`` and a whole image of ``M`` multiply-adds.
    """
    by_image: dict[int, list[int]] = {}
    for i, u in enumerate(units):
        by_image.setdefault(u[0], []).append(i)
    w, full = cone.window_cost(), cone.map_cost(*cone.sizes[0])
    shared = [g for g in by_image.values() if full + 2 * len(g) * w < 3 * len(g) * w]
    alone = sorted(i for g in by_image.values() if not (full + 2 * len(g) * w < 3 * len(g) * w) for i in g)
    return shared, alone


def cost(cone: Cone, units) -> float:
    """Multiply-adds :func:`run` spends on ``units`` (forward plus a backward of two forwards)."""
    shared, alone = _split(cone, units)
    total = sum(cone.map_cost(*cone.sizes[0]) + 2 * len(g) * cone.window_cost() for g in shared)
    keys: dict[tuple[int, int, int], int] = {}
    for i in alone:
        n, _, y, x = units[i]
        keys[(n, y, x)] = keys.get((n, y, x), 0) + 1
    if keys:
        passes = min(len(keys) * (1 + 2 * max(keys.values())), 3 * len(alone))
        total += passes * cone.window_cost()
    return total


def run(cone: Cone, images: torch.Tensor, units, rules, device, result: torch.Tensor, rows: int) -> None:
    """Project ``units`` (plain-int ``(n, c, y, x)`` tuples) into ``result`` through the cone.

    ``rules``: the rule object of :func:`interp.project` (``mode()`` and
    ``audit(out, start)``); ``rows``: windows per pass.
    """
    shared, alone = _split(cone, units)
    for group in shared:
        maps = _full_maps(cone, images.detach()[units[group[0]][0]][None].to(device))
        for start in range(0, len(group), rows):
            inputs = group[start : start + rows]
            _run_chunk(cone, images, units, inputs, [list(enumerate(inputs))], rules, device, result, maps)
    if alone:
        sub = [units[i] for i in alone]
        for inputs, rounds in _schedule(sub, rows):
            inputs = [alone[i] for i in inputs]
            rounds = [[(row, alone[i]) for row, i in pairs] for pairs in rounds]
            _run_chunk(cone, images, units, inputs, rounds, rules, device, result)


def _run_chunk(cone, images, units, inputs, rounds, rules, device, result, maps=None) -> None:
    """Forward the windows of ``inputs`` (one row each), one backward per round.

    ``maps``: the whole-image conv outputs of the chunk's one image
    (:func:`_full_maps`); the forward then takes the convolutions from them.
    """
    (_, _, kh), (_, _, kw) = cone.windows[0]
    height, width = cone.sizes[0]
    src = images.detach()
    windows = src.new_zeros((len(inputs), src.shape[1], kh, kw))
    boxes = []
    for row, i in enumerate(inputs):
        n, _, y, x = units[i]
        top, left = cone.origin(0, y, x)
        t, b, l0, r = max(top, 0), min(top + kh, height), max(left, 0), min(left + kw, width)
        windows[row, :, t - top : b - top, l0 - left : r - left] = src[n, :, t:b, l0:r]
        boxes.append((top, left, t, b, l0, r))
    ys = [units[i][2] for i in inputs]
    xs = [units[i][3] for i in inputs]
    leaf = windows.to(device).requires_grad_(True)
    masks = _masks(cone, ys, xs, leaf.device, leaf.dtype)
    cached = None
    if maps is not None:
        cached = {}
        for i, out in maps.items():
            last = i + 1 == len(cone.steps)
            (_, _, oh), (_, _, ow) = ((1, 0, 1), (1, 0, 1)) if last else cone.windows[i + 1]
            origins = [(y, x) if last else cone.origin(i + 1, y, x) for y, x in zip(ys, xs)]
            cached[i] = _gather(out[0], origins, oh, ow)
    table = [[(row, units[i][1]) for row, i in pairs] for pairs in rounds]
    index = [torch.tensor(t, dtype=torch.long).t().to(device) for t in table]
    with torch.enable_grad():
        start = leaf.clone()
        with rules.mode():
            out = _forward(cone, start, masks, cached)
        if cached is None:
            # (With cached convolutions the graph holds our own function, which the audit would
            # name; the chain's modules all have rules, so there is nothing to report.)
            rules.audit(out, start)
        for r, pairs in enumerate(rounds):
            rws, cs = index[r]
            selected = out[rws, cs, 0, 0]
            (grad,) = torch.autograd.grad(selected.sum(), leaf, retain_graph=r < len(rounds) - 1)
            grad = grad.to(result.device)
            for row, i in pairs:
                top, left, t, b, l0, r_ = boxes[row]
                result[i, :, t:b, l0:r_] = grad[row, :, t - top : b - top, l0 - left : r_ - left]

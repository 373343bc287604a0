"""Project single activations back to pixel space.

For each requested unit ``(n, c, y, x)`` of a layer's output we compute the
derivative of that activation with respect to ``images[n]``, under the
backward rule of the chosen method (see :mod:`interp.rules`).

How: the images of a chunk of units are stacked, one row per unit (a unit's
own copy of its image), the model runs forward under the rule mode only up to
the layer, the selected activations are summed, and one backward pass yields
every unit's projection at once. Rows are independent because the model runs
in eval mode (BatchNorm uses running statistics), so the sum's gradient row
``u`` is exactly unit ``u``'s own gradient.
"""
from __future__ import annotations

import contextlib
import difflib
import warnings
from typing import Sequence

import torch
from torch import nn

from ._utils import HookSet, StopForward, model_device, preserved
from ._trace import trace
from .cone import cost as cone_cost, plan as cone_plan, run as cone_run
from .layers import LayerRef, resolve_layer
from .rf import receptive_field
from .rules import METHODS, RuleMode, warn_unknown_nonlinearities


def forward_to(model: nn.Module, ref: LayerRef, x: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on ``x`` only as far as ``ref`` and return that layer's output.

    A module layer is reached with a forward hook that captures the output and
    aborts the rest of the forward; a functional node with a truncated fx
    graph that shares the model's modules and parameters.
    """
    captured: list[torch.Tensor] = []

    def hook(module, inputs, output):
        captured.append(output)
        raise StopForward

    try:
        if ref.traced:
            return trace(model).truncated(ref.name)(x)
        with HookSet() as hooks:
            hooks.forward(ref.module, hook)
            try:
                model(x)
            except StopForward:
                pass
    except (RuntimeError, TypeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ValueError(
            f"model forward failed on images of shape {tuple(x.shape)}: {first}. "
            "Check the channels/size and the model's preprocessing."
        ) from exc
    if not captured:
        raise ValueError(f"layer {ref.name!r} was not called by the model's forward pass")
    out = captured[0]
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"layer {ref.name!r} returns {type(out).__name__}, not a tensor")
    return out


def _check_images(images: object) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(
            f"images must have shape (N, C, H, W), got {tuple(images.shape)}; "
            "add a batch dimension with images.unsqueeze(0)"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"images must be a floating-point tensor, got {images.dtype}; "
            "apply the model's preprocessing (e.g. convert uint8 with .float() / 255 and normalise)"
        )
    if images.shape[0] == 0:
        raise ValueError("images is empty (N = 0)")
    return images


def _check_units(units: object, n_images: int) -> torch.Tensor:
    try:
        t = torch.as_tensor(units, dtype=torch.long)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"units must be a sequence of (n, c, y, x) integer tuples: {exc}") from exc
    if t.numel() == 0:
        raise ValueError("units is empty: pass at least one (n, c, y, x) tuple")
    if t.dim() == 1 and t.numel() == 4:
        t = t[None]
    if t.dim() != 2 or t.shape[1] != 4:
        raise ValueError(f"units must be (n, c, y, x) tuples, got an array of shape {tuple(t.shape)}")
    bad = (t[:, 0] < 0) | (t[:, 0] >= n_images)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"unit {i} {tuple(t[i].tolist())}: image index out of range for {n_images} image(s)")
    return t


def _check_args(model, images, units, method, batch_size) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate :func:`project`'s arguments; returns the images and the units as a ``(U, 4)`` tensor."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), METHODS, n=1)
        raise ValueError(
            f"unknown method {method!r}; choose one of {', '.join(METHODS)}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
        )
    images = _check_images(images)
    units_t = _check_units(units, images.shape[0])
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return images, units_t


def _check_against_output(units: torch.Tensor, out: torch.Tensor, layer: str) -> None:
    if out.dim() != 4:
        raise ValueError(
            f"layer {layer!r} outputs shape {tuple(out.shape[1:])} per image; project needs a "
            "(C, H, W) feature map (a conv-like layer)"
        )
    _, c, h, w = out.shape
    for axis, size, what in ((1, c, "channel"), (2, h, "row"), (3, w, "column")):
        bad = (units[:, axis] < 0) | (units[:, axis] >= size)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"unit {i} {tuple(units[i].tolist())}: {what} out of range; layer {layer!r} "
                f"outputs {c} channels x {h} x {w}"
            )


def project(
    model: nn.Module,
    images: torch.Tensor,
    layer: str,
    units: Sequence[Sequence[int]] | torch.Tensor,
    method: str = "guided",
    batch_size: int | None = None,
    crop: bool | None = None,
    cone: bool | None = None,
) -> torch.Tensor:
    """Project activations of ``layer`` back to pixel space.

    Parameters
    ----------
    model:
        Any ``torch.nn.Module``. It is run in eval mode and left exactly as it
        was (modules' training flags, no hooks, parameters and their ``.grad``
        untouched), also when this function raises. Works the same inside
        ``torch.no_grad()`` (gradients are enabled for its own passes only).
    images:
        Float tensor ``(N, C, H, W)``, already preprocessed for the model. Not
        modified.
    layer:
        A name from :func:`interp.layers` (module path, functional node,
        ``model.layer_aliases`` key or ``convN``).
    units:
        Sequence of ``(n, c, y, x)``: image index into ``images``, channel, row
        and column of the output of ``layer``.
    method:
        ``"guided"`` (Springenberg et al. 2015), ``"deconvnet"`` (Zeiler &
        Fergus 2014) or ``"gradient"`` (plain autograd). See
        :mod:`interp.rules` for the exact rules and the nonlinearities they
        cover; any other nonlinear op between the images and the layer keeps
        its plain gradient and is named in one
        :class:`~interp.notices.UnknownNonlinearityWarning` per op and call.
    batch_size:
        Input rows per forward/backward pass (memory knob). Default: as many
        rows as hold about 16 full 224 x 224 images' worth of pixels (16 rows
        of whole 224-pixel images, hundreds of small receptive-field crops),
        at most 256. Several units of the same image (and crop) share one
        forward: the image runs once and their backward passes follow in
        rounds.
    crop:
        Run each unit on the crop of its image that holds its receptive
        field instead of the whole image (exact: same result, zero outside
        the field; much less work for early layers). ``None`` (default):
        when the traced field is local and cropping saves at least 10 % of
        the work (pixels forwarded and back-propagated, counting the images
        that several units share); ``False``: never; ``True``: whenever the field is local.
    cone:
        Run each unit on its dependency cone (:mod:`interp.cone`): the
        window of every map that the unit depends on, each layer without
        padding so the map shrinks to the next window (exact: the original
        padding is put back where a window leaves the map). Applies when the
        path from the input to ``layer`` is a plain chain of convolutions,
        max/avg pools, eval BatchNorm and pointwise modules (VGG, AlexNet
        ``features``); deep units then cost a fraction of a crop's forward.
        ``None`` (default): when it applies and its estimated multiply-adds
        are below the crop (or whole-image) path's; ``False``: never;
        ``True``: whenever it applies. ``batch_size`` counts windows.

    Returns
    -------
    torch.Tensor
        ``(len(units), C, H, W)``, on ``images``' device: row ``u`` is
        d activation(u) / d images[n_u] under the method's rule.

    Examples
    --------
    >>> import torch, torchvision, interp
    >>> model = torchvision.models.resnet18().eval()
    >>> x = torch.randn(2, 3, 64, 64)
    >>> interp.project(model, x, "layer1.0.conv1", [(0, 5, 3, 4), (1, 0, 8, 8)]).shape
    torch.Size([2, 3, 64, 64])
    """
    images, units_t = _check_args(model, images, units, method, batch_size)
    device = model_device(model, images.device)
    result = torch.zeros((len(units_t),) + tuple(images.shape[1:]), dtype=images.dtype, device=images.device)
    with preserved(model, eval_mode=True):
        ref = resolve_layer(model, layer)
        # Learn the layer's output shape on one image and validate every unit
        # before any real work.
        with torch.no_grad():
            probe = forward_to(model, ref, images.detach()[:1].to(device))
        _check_against_output(units_t, probe, ref.name)
        # Plain ints from here on: indexing a tensor per unit costs a dispatch each time.
        units_l = [tuple(u) for u in units_t.tolist()]
        plans = _crop_plans(model, ref.name, images.shape, units_l, crop)
        rules = _Rules(method, ref.name)
        chain = _choose_cone(model, ref.name, images.shape, probe.shape, units_l, plans, cone)
        if chain is not None:
            (_, _, kh), (_, _, kw) = chain.windows[0]
            rows = batch_size if batch_size is not None else _auto_rows(kh, kw, device)
            cone_run(chain, images, units_l, rules, device, result, rows)
            return result
        groups: dict[tuple[int, int], list[int]] = {}
        for i, plan in enumerate(plans):
            groups.setdefault((plan[2] - plan[0], plan[3] - plan[1]), []).append(i)
        for (h, w), members in groups.items():
            rows = batch_size if batch_size is not None else _auto_rows(h, w, device)
            for idx in _chunks(units_l, plans, members, rows):
                _project_chunk(model, ref, images, units_l, plans, idx, rules, device, result, rows)
    return result


# Default pass size in input pixels: 16 whole 224 x 224 images on a CPU. Small
# crops get many rows per pass (per-op overhead amortised over a bigger batch),
# whole large images few (past this the CPU is memory-bound, measured). A GPU
# wants the opposite: on an H100 zennit's single 54-image pass beat our four
# 16-image passes 2x on deep layers (launch overhead, idle SMs), so there the
# budget is 64 whole images: the original's 54 units in one pass, and at most
# about 6 GB of saved activations (VGG-16 up to its last conv).
_PIXELS_PER_PASS = 16 * 224 * 224
_PIXELS_PER_PASS_CUDA = 64 * 224 * 224
_MAX_ROWS = 256


def _auto_rows(height: int, width: int, device: torch.device | str = "cpu") -> int:
    """Rows per pass for inputs of ``height x width`` pixels on ``device``."""
    budget = _PIXELS_PER_PASS_CUDA if torch.device(device).type == "cuda" else _PIXELS_PER_PASS
    return max(1, min(_MAX_ROWS, budget // max(1, height * width)))


def _input_key(units, plans, i: int) -> tuple[int, int, int]:
    """Units with equal keys run on the same input (image and crop)."""
    return int(units[i][0]), plans[i][0], plans[i][1]


def _chunks(units, plans, members: list[int], batch_size: int):
    """Chunks of at most ``batch_size`` distinct inputs, each input's units kept together."""
    members = sorted(members, key=lambda i: _input_key(units, plans, i))
    chunk: list[int] = []
    inputs: set = set()
    for i in members:
        key = _input_key(units, plans, i)
        if key not in inputs and len(inputs) == batch_size:
            yield chunk
            chunk, inputs = [], set()
        chunk.append(i)
        inputs.add(key)
    if chunk:
        yield chunk


def _rounds(units, plans, idx: list[int]) -> list[list[int]] | None:
    """Split a chunk into backward rounds that share one forward, or ``None``.

    Units with the same input (same image, same crop) need the same forward.
    Forwarding each distinct input once and running one backward per round,
    with at most one unit per input in a round (rows do not mix, so one
    summed backward still gives each unit its own gradient), costs about
    ``D * (1 + 2R)`` passes for ``D`` inputs and ``R`` rounds, against
    ``3U`` for one row per unit (a backward costs about two forwards).
    """
    by_input: dict[tuple[int, int, int], list[int]] = {}
    for i in idx:
        by_input.setdefault(_input_key(units, plans, i), []).append(i)
    n_inputs, n_rounds = len(by_input), max(len(v) for v in by_input.values())
    if n_inputs * (1 + 2 * n_rounds) >= 3 * len(idx):
        return None
    return [[v[r] for v in by_input.values() if r < len(v)] for r in range(n_rounds)]


def _project_chunk(model, ref, images, units, plans, idx, rules, device, result, batch_size) -> None:
    """Forward+backward one chunk of units that share a crop shape."""
    rounds = _rounds(units, plans, idx)
    if rounds is not None:
        # One row per distinct input (round 0 holds one unit of each); later
        # rounds reuse those rows.
        row_of = {_input_key(units, plans, i): row for row, i in enumerate(rounds[0])}
        plan = [[(row_of[_input_key(units, plans, i)], i) for i in members] for members in rounds]
        _project_rows(model, ref, images, units, plans, rounds[0], plan, rules, device, result)
        return
    # One row per unit, at most batch_size rows per pass.
    for start in range(0, len(idx), batch_size):
        rows = idx[start : start + batch_size]
        plan = [list(enumerate(rows))]
        _project_rows(model, ref, images, units, plans, rows, plan, rules, device, result)


def _project_rows(model, ref, images, units, plans, inputs, rounds, rules, device, result) -> None:
    """Forward the inputs of ``inputs`` (one row each) once, then one summed backward per round.

    ``rounds`` is a list of ``[(row, unit), ...]`` with each row at most once
    per round, so the gradient of a round's summed activations in row ``r``
    is exactly its unit's own gradient.
    """
    crops = []
    for i in inputs:
        top, left, bottom, right, _, _ = plans[i]
        crops.append(images.detach()[int(units[i][0]), :, top:bottom, left:right])
    leaf = torch.stack(crops).to(device).requires_grad_(True)
    # Every round's indices (row, channel, y, x) go to the device in one copy, before any
    # GPU work is queued: a host-to-device copy waits for the queue to drain, and one per
    # round after the forward would stall the GPU between forward and backward (5 syncs
    # in a ResNet-18 layer4 call on an H100, more wall time than the launches).
    table, bounds = [], [0]  # rows (row, channel, y, x, unit); round r is table[bounds[r]:bounds[r + 1]]
    for pairs in rounds:
        table += [(row, int(units[i][1]), plans[i][4], plans[i][5], i) for row, i in pairs]
        bounds.append(len(table))
    index = torch.tensor(table, dtype=torch.long).t().to(device)
    # Everything that builds or reads the graph runs with grad enabled: a
    # caller's torch.no_grad() would otherwise turn the selection of the
    # units (and the rules' own checks) into constants.
    with torch.enable_grad():
        # clone: an in-place op at the model's very first step must not touch
        # the leaf we differentiate against.
        start = leaf.clone()
        with rules.mode():
            out = forward_to(model, ref, start)
        rules.audit(out, start)
        if not all(0 <= t[2] < out.shape[2] and 0 <= t[3] < out.shape[3] for t in table):  # pragma: no cover
            raise RuntimeError("internal error: cropped unit position falls outside the cropped output")
        for r, pairs in enumerate(rounds):
            rows, cs, ys, xs, at = index[:, bounds[r] : bounds[r + 1]]
            selected = out[rows, cs, ys, xs]
            if not selected.requires_grad:
                raise ValueError(f"layer {ref.name!r} output does not depend on the input images")
            (grad,) = torch.autograd.grad(selected.sum(), leaf, retain_graph=r < len(rounds) - 1)
            _store(result, grad, plans, pairs, rows, at, tuple(images.shape[2:]))


def _store(result, grad, plans, pairs, rows, at, size) -> None:
    """Copy one round's gradients (one row per unit) into ``result``, at each unit's crop."""
    if all(tuple(plans[i][:4]) == (0, 0) + size for _, i in pairs):
        # Whole images: one gather-and-copy instead of one small copy per unit.
        result.index_copy_(0, at.to(result.device), grad[rows].to(result.device))
        return
    grad = grad.to(result.device)
    for row, i in pairs:
        top, left, bottom, right, _, _ = plans[i]
        result[i, :, top:bottom, left:right] = grad[row]


class _Rules:
    """The method's backward rules for each forward of one :func:`project` call.

    Also checks the first forward's graph for nonlinearities without a rule
    and warns once per call (the graph is the same for every chunk: same
    model, same layer).
    """

    def __init__(self, method: str, layer: str) -> None:
        self.method, self.layer = method, layer
        self.audited = method == "gradient"  # the plain gradient needs no rules

    def mode(self) -> contextlib.AbstractContextManager:
        """A fresh :class:`RuleMode`, or nothing for ``"gradient"``."""
        return RuleMode(self.method) if self.method != "gradient" else contextlib.nullcontext()

    def audit(self, out: torch.Tensor, start: torch.Tensor) -> None:
        """Warn about ops between ``start`` and ``out`` that kept their plain gradient (first call only)."""
        # Not cached across calls: the walk takes 0.3-20 ms (VGG-16 ... MaxViT,
        # whole model), well under one forward, and every call must warn anyway.
        if not self.audited:
            self.audited = True
            warn_unknown_nonlinearities(out, start, self.method, self.layer)


# Crop only when it saves at least this fraction of the work (crops of one
# shape still pay some per-pass overhead; 10 % margin).
_CROP_MAX_WORK = 0.9


def _crop_plans(model, layer: str, shape, units, crop: bool | None) -> list[tuple[int, ...]]:
    """Per unit: the input crop ``(top, left, bottom, right)`` and its position in the crop's output.

    A unit depends only on the pixels of its receptive field, so running the
    network on a crop that holds the whole (image-clipped) field gives the
    same activation and the same gradient inside the crop, and exactly zero
    outside it. The crop's top-left corner is a multiple of the layer's total
    stride (or the image border), so every intermediate sampling grid lines up
    with the full image's; the padding the crop sees on a side is the image's
    own padding wherever the field reaches the border. Only exact, local
    fields are cropped (``ReceptiveField.exact`` and not ``is_global``).
    """
    _, _, height, width = shape
    full = [(0, 0, height, width, int(u[2]), int(u[3])) for u in units]
    if crop is False:
        return full
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rf = receptive_field(model, layer, (height, width), in_channels=shape[1])
    except Exception:  # noqa: BLE001 - no field, no crop: the plain path is always right
        return full
    if not rf.exact or rf.is_global:
        return full
    # Field boxes per unit, clipped, with the stride-aligned start.
    spans = []
    for u in units:
        _, c, y, x = u
        f = rf.for_channel(c)
        if f.is_global:
            spans.append(None)
            continue
        top, left, bottom, right = f.box(y, x)
        sh, sw = f.stride
        spans.append(((max(top, 0) // sh * sh, min(bottom, height), sh, y),
                      (max(left, 0) // sw * sw, min(right, width), sw, x)))
    local = [s_ for s_ in spans if s_ is not None]
    if not local:
        return full
    # One crop size for all units: batching needs equal shapes, and every new
    # shape costs the conv backends a fresh plan. A crop may grow past its
    # field (more real pixels never change the unit) but must keep an aligned
    # start, so units near the far border start earlier.
    length = []
    for a, size in ((0, height), (1, width)):
        need = max(sp[a][1] - sp[a][0] for sp in local)
        stride = local[0][a][2]
        # Grow the length so that size - length is aligned: a crop that would
        # run past the far border can then start at exactly size - length.
        length.append(min(size, size - (size - need) // stride * stride))
    plans = []
    for i, sp in enumerate(spans):
        if sp is None:
            plans.append(full[i])
            continue
        box = []
        for a, size in ((0, height), (1, width)):
            start, _, stride, pos = sp[a]
            start = min(start, size - length[a])
            box.append((start, start + length[a], pos - start // stride))
        (t, b, y2), (l0, r, x2) = box
        plans.append((t, l0, b, r, y2, x2))
    if crop is None and _work(units, plans) > _CROP_MAX_WORK * _work(units, full):
        return full
    return plans


def _choose_cone(model, layer: str, shape, out_shape, units, plans, cone: bool | None):
    """The :class:`~interp.cone.Cone` to run ``units`` on, or ``None`` for the crop/whole-image path."""
    if cone is False:
        return None
    chain = cone_plan(model, layer, shape[2], shape[3], out_shape)
    if chain is None or cone is True:
        return chain
    crop_cost = _work(units, plans, chain.map_cost)
    return chain if cone_cost(chain, units) < crop_cost else None


def _work(units, plans, cost=None) -> float:
    """Pixels processed by :func:`project` for ``plans``: (passes per input) x input area.

    Counted as :func:`_rounds` schedules it, over all units together: ``D``
    distinct inputs forwarded once with ``R`` rounds of backward cost about
    ``D * (1 + 2R)`` passes, one row per unit ``3U``; the smaller is taken.
    Cropping loses the sharing of units that sit on one image at different
    places, so it only pays when the smaller area outweighs that. ``cost``:
    work of one pass on an input of ``(height, width)`` (default: its area).
    """
    count: dict[tuple[int, int, int], int] = {}
    area: dict[tuple[int, int, int], int] = {}
    for i, (top, left, bottom, right, _, _) in enumerate(plans):
        key = _input_key(units, plans, i)
        count[key] = count.get(key, 0) + 1
        area[key] = cost(bottom - top, right - left) if cost is not None else (bottom - top) * (right - left)
    shared = sum(area.values()) * (1 + 2 * max(count.values()))
    alone = 3 * sum(area[k] * n for k, n in count.items())
    return min(shared, alone)

"""Fast mining: a cheap screening pass on a copy of the model, then the exact pass on the few candidates.

Mining wants, per layer and channel, the ``k`` images whose maximum is
largest. Nearly every image is a clear loser, and telling that needs no
exact arithmetic. So :func:`screened_scan` runs two stages:

1. **Screen** (every image): a *copy* of the model, traced with
   :func:`torch.fx.symbolic_trace`, each ``BatchNorm2d`` folded into the
   ``Conv2d`` before it (eval statistics), the graph cut after the deepest
   requested layer and ending in the per-image per-channel maxima of the
   requested layers, in ``bfloat16`` and ``channels_last``, frozen with
   :func:`torch.jit.freeze` (oneDNN fuses conv + bias + activation). A
   requested conv whose BN is folded outputs ``a_c * conv + b_c``; its
   maximum over positions is ``(max y - b_c) / a_c`` where ``a_c > 0`` and
   ``(min y - b_c) / a_c`` where ``a_c < 0`` (a BN with some ``a_c == 0``
   is not folded). It keeps the ``SCREEN_KEEP * k`` best images per channel.
2. **Exact** (candidates only): the images within a margin of each channel's
   ``k``-th screened value are run through the *user's model* by the plain
   path (:func:`interp.mine.scan`: fp32, hooks, the values and positions
   the plain pass records), each only as far as the deepest layer it is a
   candidate of. Then, per channel, the result is *checked*: the ``k``-th
   exact value must beat every image left out (its screened value, or the
   last kept one's) by more than three times the largest screening error
   seen on that channel's candidates (at least a quarter of the layer's
   largest); a channel that fails gets the images that could still beat
   it, and a sixth failure (or one needing images the screen did not keep)
   falls back to the plain pass over everything.

So the top-k is the plain pass's, computed on the candidates' batches
(values agree to fp32 rounding: two entries within ~1e-6 relative may swap).
The user's model is never modified: the screen runs on a deep copy.
:func:`screened_scan` returns ``None`` where the screen does not apply
(a layer that is a traced functional node, a model ``torch.fx`` cannot
trace, a non-CPU device or a non-fp32 model, data that is not an
:class:`interp.data.IndexedImages` or a tensor): the caller then runs the
plain pass.
"""
from __future__ import annotations

import copy
import itertools
import math
import warnings
from typing import Iterable

import torch
from torch import fx, nn

from .capture import LayerTaps
from .data import IndexedImages
from .layout import as_channels_last
from .topk import default_channels

__all__ = ["Replay", "applies", "Screen", "build_screen", "screened_scan", "SCREEN_DTYPE", "SCREEN_KEEP", "SCREEN_MARGIN",
           "ERROR_SAFETY", "ERROR_FLOOR", "EXACT_ROUNDS",
           "SCREEN_MIN_IMAGES"]

SCREEN_DTYPE = torch.bfloat16
#: Screened images kept per channel, as a multiple of ``k``.
SCREEN_KEEP = 16
#: First candidates: screened value within this fraction of the channel's largest |value| from the
#: k-th. Small: the check adds what the measured screening error says may still win, so a wide first
#: margin only sends clear losers to the exact pass.
SCREEN_MARGIN = 0.01
#: Check rounds before the plain pass takes over.
EXACT_ROUNDS = 6
#: The checked margin is this many times the largest screening error seen on the channel's candidates...
ERROR_SAFETY = 3.0
#: ...and at least this fraction of the largest seen on the layer's (see :func:`_unchecked`).
ERROR_FLOOR = 0.25
#: Fewer images than this: the plain pass. Building the screen (trace, fold, freeze) and the exact
#: pass on the candidates (the union of the channels' top images, often most of a small set) cost
#: more than they save there: measured with ResNet-18, 512 images took 1.30x the plain forward,
#: all 3,925 Imagenette val images 0.84x (``python -m benchmarks.report``).
SCREEN_MIN_IMAGES = 2048


def _maxima(y: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Per image, the max over positions of channels ``lo:hi`` of ``y`` (a graph node of the screen)."""
    return y[:, lo:hi].amax(dim=(2, 3))


def _minima(y: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Per image, the min over positions of channels ``lo:hi`` of ``y`` (a graph node of the screen)."""
    return y[:, lo:hi].amin(dim=(2, 3))


class Screen:
    """The screening graph of a model: ``run(x)`` gives each layer's ``(B, channels)`` approximate maxima."""

    def __init__(self, module, names: list[str], channels: dict[str, list[int]],
                 spans: dict[str, tuple[int, int]], affine: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 signed: dict[str, bool], order: list[str], narrowed: list[str]) -> None:
        self.module, self.names, self.channels = module, names, channels
        self.spans, self.affine, self.signed = spans, affine, signed
        self.order = order  # the layers in the order the forward computes them (the traced graph's)
        self.narrowed = narrowed  # layers that compute only the channels mined (see _narrow)

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Approximate per-image maxima of the (pre-fold) layer outputs: ``{name: (B, nc) float32}``."""
        outs = self.module(as_channels_last(x.to(SCREEN_DTYPE)))
        res: dict[str, torch.Tensor] = {}
        pos = 0
        for n in self.names:
            mx = outs[pos].float()
            pos += 1
            if n in self.affine:
                a, b = self.affine[n]
                if self.signed[n]:
                    mn = outs[pos].float()
                    pos += 1
                    mx = torch.where(a > 0, mx, mn)
                mx = (mx - b) / a
            lo = self.spans[n][0]
            mx = torch.nan_to_num(mx, nan=-math.inf)  # as the plain pass: NaN is the weakest value
            res[n] = mx[:, [c - lo for c in self.channels[n]]]
        return res


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Fold ``bn`` (eval statistics) into ``conv`` in place; the per-channel ``(a, b)``, or ``None`` if it cannot."""
    if bn.running_mean is None or bn.running_var is None or conv.out_channels != bn.num_features:
        return None
    a = (bn.weight.double() if bn.weight is not None else 1.0) / torch.sqrt(bn.running_var.double() + bn.eps)
    a = a * torch.ones(bn.num_features, dtype=torch.float64)
    shift = bn.bias.double() if bn.bias is not None else torch.zeros_like(a)
    b = shift - a * bn.running_mean.double()
    if bool((a == 0).any()) or not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
        return None
    with torch.no_grad():
        conv.weight.copy_((conv.weight.double() * a.view(-1, 1, 1, 1)).to(conv.weight.dtype))
        bias = conv.bias.double() * a + b if conv.bias is not None else b
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    return a.float(), b.float()


def build_screen(model: nn.Module, names: list[str], channels: dict[str, list[int] | None],
                 example: torch.Tensor) -> Screen | None:
    """The :class:`Screen` of ``model`` for ``names``, or ``None`` where it does not apply (see the module doc)."""
    dtypes = {p.dtype for p in list(model.parameters()) + list(model.buffers()) if p.is_floating_point()}
    if dtypes - {torch.float32} or example.device.type != "cpu":
        return None
    try:
        work = copy.deepcopy(model).eval()
    except Exception:  # noqa: BLE001 - a model that cannot be copied: the plain pass serves it
        return None
    for m in work.modules():  # a later in-place op must not change a tapped value
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    try:
        gm = fx.symbolic_trace(work)
    except Exception:  # noqa: BLE001 - not traceable: the plain pass serves it
        return None
    graph, modules = gm.graph, dict(gm.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    if any(n not in calls for n in names):
        return None  # a traced functional node, or a layer this graph does not call
    at = {node: i for i, node in enumerate(graph.nodes)}
    order = sorted(names, key=lambda n: at[calls[n][0]])
    affine = _fold_all(graph, modules, calls, names)
    return _finish(gm, names, channels, affine, modules, calls, example, order)


def _fold_all(graph: fx.Graph, modules: dict, calls: dict, names: list[str]) -> dict:
    """Fold every conv -> BN pair that is safe to fold; the affine of each requested conv folded."""
    affine: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for node in list(graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or len(calls[node.target]) != 1 or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        bn = modules.get(user.target) if user.op == "call_module" else None
        if (type(bn) is not nn.BatchNorm2d or len(calls[user.target]) != 1 or user.target in names
                or len(user.args) != 1 or user.args[0] is not node or user.kwargs):
            continue
        ab = _fold(conv, bn)
        if ab is None:
            continue
        user.replace_all_uses_with(node)
        graph.erase_node(user)
        if node.target in names:
            affine[node.target] = ab
    return affine


def _finish(gm: fx.GraphModule, names: list[str], channels: dict, affine: dict, modules: dict, calls: dict,
            example: torch.Tensor, order: list[str]) -> Screen | None:
    """End the graph in the maxima of the requested layers, cut the rest, freeze it in bf16."""
    graph = gm.graph
    outs, spans, chans, signed = [], {}, {}, {}
    for n in names:
        node = calls[n][0]
        chs = channels.get(n)
        if chs is None:
            mod = modules[n]
            if not isinstance(mod, nn.Conv2d):
                return None  # channel count unknown before a forward: the plain pass decides it
            chs = default_channels(mod.out_channels)
        chans[n] = list(chs)
        lo, hi = min(chs), max(chs) + 1
        spans[n] = (lo, hi)
        signed[n] = n in affine and bool((affine[n][0][lo:hi] < 0).any())
        with graph.inserting_after(node):
            mx = graph.call_function(_maxima, (node, lo, hi))
        outs.append(mx)
        if signed[n]:
            with graph.inserting_after(mx):
                outs.append(graph.call_function(_minima, (node, lo, hi)))
    affine = {n: (a[spans[n][0]:spans[n][1]], b[spans[n][0]:spans[n][1]]) for n, (a, b) in affine.items()}
    output = next(nd for nd in graph.nodes if nd.op == "output")
    output.args = (tuple(outs),)
    graph.eliminate_dead_code()
    narrowed = [n for n in names if _narrow(gm, calls[n], spans[n])]
    gm.recompile()
    gm = gm.to(memory_format=torch.channels_last).to(SCREEN_DTYPE)
    probe = as_channels_last(example[:2].to(SCREEN_DTYPE))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frozen = torch.jit.freeze(torch.jit.trace(gm, probe, check_trace=False))
            got = frozen(probe)
    except Exception:  # noqa: BLE001 - the graph does not script: the plain pass serves it
        return None
    widths = [hi - lo for n in names for lo, hi in [spans[n]] * (2 if signed[n] else 1)]
    if [int(t.shape[1]) for t in got] != widths or any(t.ndim != 2 for t in got):
        return None  # a channel past the layer's last, or not a feature map: the plain pass says so
    return Screen(frozen, names, chans, spans, affine, signed, order, narrowed)


def _narrow(gm: fx.GraphModule, calls: list[fx.Node], span: tuple[int, int]) -> bool:
    """Compute only channels ``span`` of a conv whose output only feeds its maxima (the graph's last convs).

    The deepest requested conv of a ResNet-18 computes 6 of its 512 channels
    then: a sixteenth of the screen's work saved.
    """
    node, (lo, hi) = calls[0], span
    conv = gm.get_submodule(str(node.target))
    if (len(calls) != 1 or not isinstance(conv, nn.Conv2d) or conv.groups != 1 or hi - lo >= conv.out_channels
            or hi > conv.out_channels
            or any(u.op != "call_function" or u.target not in (_maxima, _minima) for u in node.users)):
        return False
    with torch.no_grad():
        conv.weight = nn.Parameter(conv.weight[lo:hi].clone(), requires_grad=False)
        if conv.bias is not None:
            conv.bias = nn.Parameter(conv.bias[lo:hi].clone(), requires_grad=False)
    conv.out_channels = hi - lo
    for u in list(node.users):
        u.args = (node, 0, hi - lo)
    return True


class _Items(torch.utils.data.Dataset):
    """``(model input, dataset index)`` by dataset index (a subset's own positions are not its indices)."""

    def __init__(self, data: IndexedImages) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.data.item(index), index


def _images_of(data, chunks: list[list[int]], num_workers: int = 0) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """One ``(images, indices)`` batch per chunk of dataset indices, in order.

    ``num_workers`` processes decode them ahead (one loader for all the
    chunks: a worker starts once).
    """
    if isinstance(data, torch.Tensor):
        for chunk in chunks:
            yield data[torch.tensor(chunk)], torch.tensor(chunk)
    elif num_workers > 0 and len(chunks) > 1:
        yield from torch.utils.data.DataLoader(_Items(data), batch_sampler=chunks, num_workers=num_workers,
                                               collate_fn=_stack)
    else:
        for chunk in chunks:
            yield _stack([(data.item(i), i) for i in chunk])


def _stack(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in items]), torch.tensor([i for _, i in items])


def _chunked(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[s : s + batch_size] for s in range(0, len(indices), batch_size)]


def applies(data, device: torch.device) -> bool:
    """Whether the screen can serve this data and device.

    The images must be re-readable by index, on the CPU, and at least
    :data:`SCREEN_MIN_IMAGES` of them.
    """
    readable = isinstance(data, IndexedImages) or (isinstance(data, torch.Tensor) and data.ndim == 4)
    return device.type == "cpu" and readable and len(data) >= SCREEN_MIN_IMAGES


def screened_scan(model: nn.Module, todo, data, batches, device: torch.device, channels_last: bool,
                  batch_size: int, scan, scan_type, running_type, num_workers: int = 0):
    """:func:`interp.mine.scan` via a screen and an exact pass on candidates.

    Returns the :class:`interp.mine.Scan`, or, where the screen does not
    serve, the batches (a :class:`Replay`, the ones already read included)
    for the plain pass to run over.

    ``scan``, ``scan_type`` and ``running_type`` are :func:`interp.mine.scan`,
    :class:`interp.mine.Scan` and :class:`interp.mine.Running` (passed in, so
    that this module and :mod:`interp.mine` do not import each other).
    ``num_workers`` processes decode the images read again (the candidates).
    """
    it = iter(batches)
    first = None
    for batch in it:
        if batch is not None:
            first = batch
            break
    if first is None:
        return scan_type(todo, {n: running_type(n, todo.channels.get(n), todo.k) for n in todo.names})
    screen = build_screen(model, todo.names, todo.channels, first[0])
    if screen is None:
        return Replay(first, it)
    keep = SCREEN_KEEP * todo.k
    approx = {}
    for n in todo.names:
        r = approx[n] = running_type(n, screen.channels[n], keep)
        nc = len(r.channels)
        r.vals, r.idx, r.pos = torch.empty(nc, 0), torch.empty(nc, 0, dtype=torch.long), torch.empty(nc, 0, dtype=torch.long)
    seen = scan_type(todo, {})
    ids: list[int] = []
    seen.input_size, seen.in_channels = (int(first[0].shape[-2]), int(first[0].shape[-1])), int(first[0].shape[1])
    with torch.no_grad():
        for batch in _chain(first, it):
            if batch is None:
                continue
            xs, idx = batch
            ids.extend(int(i) for i in idx)
            vals = screen.run(xs)
            for n, v in vals.items():
                nc = v.shape[1]
                approx[n].push(v.t(), idx.unsqueeze(0).expand(nc, len(idx)), torch.zeros(nc, len(idx), dtype=torch.long))
            seen.n_images += len(idx)
    exact = _exact_rounds(model, todo, data, approx, seen.n_images, screen, device, channels_last, batch_size,
                          scan, num_workers)
    if exact is None:  # out of the screen's reach: the plain pass over the same images
        return Replay(None, _images_of(data, _chunked(ids, batch_size), num_workers))
    for n in todo.names:
        r = running_type(n, screen.channels[n], todo.k)
        e = exact[n]
        r.out_shape, r.chan_t = e.out_shape, e.chan_t
        r.vals, r.idx, r.pos = e.vals[:, : todo.k], e.idx[:, : todo.k], e.pos[:, : todo.k]
        seen.running[n] = r
    return seen


class Replay:
    """The batches of a pass the screen did not serve: the first one read, then the rest."""

    def __init__(self, first, rest):
        self.first, self.rest = first, rest

    def __iter__(self):
        return _chain(self.first, self.rest)


def _chain(first, rest):
    if first is not None:
        yield first
    yield from rest


def _exact_rounds(model, todo, data, approx: dict, n_images: int, screen: Screen, device, channels_last: bool,
                  batch_size: int, scan, num_workers: int = 0) -> dict | None:
    """Exact values of the candidates, widened until every channel's top-k is checked; ``None``: give up.

    Candidates are kept per layer: an image that can only make the top-k of
    early layers runs only that far (:func:`_exact_pass`).
    """
    k = todo.k
    wanted: dict[str, set[int]] = {n: set() for n in approx}
    for n, r in approx.items():
        for ci in range(len(r.channels)):
            v, i = r.vals[ci], r.idx[ci]
            kth = float(v[min(k, len(v)) - 1])
            scale = max(abs(float(v[0])), abs(kth), 1e-12)
            wanted[n].update(int(j) for j in i[v >= kth - SCREEN_MARGIN * scale].tolist())
    done: dict[str, set[int]] = {n: set() for n in approx}
    exact: dict = {}
    for _round in range(EXACT_ROUNDS):
        need = {n: wanted[n] - done[n] for n in approx}
        if any(need.values()):
            _exact_pass(model, todo, data, need, screen, device, channels_last, batch_size, scan, exact, done,
                        num_workers)
        more = _unchecked(approx, exact, done, n_images, k)
        if more is None:
            return None
        if not any(more.values()):
            return exact
        for n, ids in more.items():
            wanted[n] |= ids
    return None


def _exact_pass(model, todo, data, need: dict[str, set[int]], screen: Screen, device, channels_last: bool,
                batch_size: int, scan, exact: dict, done: dict[str, set[int]], num_workers: int = 0) -> None:
    """The plain pass (:func:`interp.mine.scan`) over the images ``need`` names, into ``exact`` and ``done``.

    Each image runs as far as the deepest layer it is needed for (in the
    order the forward computes the layers), in batches of images sorted by
    that depth: the layers of a batch are those up to its deepest image's,
    and every layer reached records every image of the batch (each layer
    keeps all of them, once), so ``done`` grows by what was really computed.
    """
    order = screen.order
    depth: dict[int, int] = {}
    for n, ids in need.items():
        d = order.index(n)
        for j in ids:
            depth[j] = max(depth.get(j, -1), d)
    ids = sorted(depth, key=lambda j: (depth[j], j))
    groups: dict[int, list[list[int]]] = {}  # batch depth -> its batches
    for chunk in _chunked(ids, batch_size):
        groups.setdefault(depth[chunk[-1]], []).append(chunk)
    images = iter(_images_of(data, [c for chunks in groups.values() for c in chunks], num_workers))
    for d, chunks in groups.items():
        names = order[: d + 1]
        chunk_ids = [j for c in chunks for j in c]
        sub = type(todo)(names, {n: list(screen.channels[n]) for n in names}, len(chunk_ids), LayerTaps(model, names))
        got = scan(model, sub, itertools.islice(images, len(chunks)), device, channels_last).running
        for n, r in got.items():
            if done[n].intersection(chunk_ids):  # run again to reach a deeper layer: keep the first values here
                keep = ~torch.isin(r.idx, torch.tensor(sorted(done[n]), dtype=r.idx.dtype))
                r.vals, r.idx, r.pos = (t[keep].view(len(r.channels), -1) for t in (r.vals, r.idx, r.pos))
            old = exact.get(n)
            if old is None:
                exact[n] = r
            else:
                old.k = old.vals.shape[1] + r.vals.shape[1]
                old.push(r.vals, r.idx, r.pos)
            done[n].update(chunk_ids)


def _unchecked(approx: dict, exact: dict, done: dict[str, set[int]], n_images: int,
               k: int) -> dict[str, set[int]] | None:
    """Per layer, images that could still beat a channel's exact k-th (all empty: checked); ``None``: out of reach.

    A channel's margin is :data:`ERROR_SAFETY` times the largest screening
    error seen on its own candidates, but at least :data:`ERROR_FLOOR` of
    the layer's largest: channels differ in scale (a BatchNorm with a small
    scale, folded and undone, magnifies the screen's rounding), so one
    layer-wide error would send the small channels' near-misses to the
    exact pass for nothing.
    """
    more: dict[str, set[int]] = {n: set() for n in approx}
    for n, ra in approx.items():
        re_ = exact[n]
        errs = []
        for ci in range(len(ra.channels)):
            ex = dict(zip(re_.idx[ci].tolist(), re_.vals[ci].tolist()))
            seen = [abs(ex[j] - v) for j, v in zip(ra.idx[ci].tolist(), ra.vals[ci].tolist())
                    if j in ex and math.isfinite(ex[j]) and math.isfinite(v)]
            errs.append(max(seen, default=0.0))
        layer_err = max(errs, default=0.0)
        for ci in range(len(ra.channels)):
            ev = re_.vals[ci]
            kth = float(ev[min(k, len(ev)) - 1])
            scale = max(abs(float(ev[0])), abs(kth), 1e-12)
            margin = ERROR_SAFETY * max(errs[ci], ERROR_FLOOR * layer_err) + 1e-4 * scale
            out_ids = [(j, v) for j, v in zip(ra.idx[ci].tolist(), ra.vals[ci].tolist()) if j not in done[n]]
            kept_all = n_images <= ra.vals.shape[1]
            bound = max([v for _, v in out_ids], default=-math.inf)
            if not kept_all:
                bound = max(bound, float(ra.vals[ci, -1]))
            if bound + margin < kth or (bound == -math.inf):
                continue
            if not kept_all and float(ra.vals[ci, -1]) + margin >= kth:
                return None  # an image the screen did not keep might beat it
            more[n].update(j for j, v in out_ids if v + margin >= kth)
    return more

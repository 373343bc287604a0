"""Top-k mining, in one process: which images make each channel fire most, in one pass.

:func:`mine_local` runs the data through the model once, with a forward hook
on each requested layer. For each image and requested channel the hook takes
the maximum over positions (and its first row-major argmax) *on the device*,
then merges those ``B`` candidates into a running top-k. Full activation
maps are never stored, so memory is O(layers x channels x k) whatever the
dataset size.

This module is the one-process core; it draws no progress bar and knows no
process group. The public :func:`interp.mine` (:func:`interp.api.mine`) adds
a progress bar and DataLoader workers, and under torchrun shares the pass
among the ranks (:func:`interp.sharded.mine_sharded`), with the same stages:
:func:`plan`, :func:`scan` (one pass over some batches), :class:`Scan`
(merged over ranks, then turned into a :class:`TopK`).
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ._utils import preserved
from .capture import LayerTaps
from .data import IndexedImages, collate_skipping
from .fast import Replay, applies, screened_scan
from .layers import block_layers, children_layers, conv_layers, layer_kind, resolve_layer
from .layer_fields import collected_notes, layer_fields
from .layout import as_channels_last, channels_last as channels_last_layout
from .topk import Entry, LayerInfo, TopK, default_channels

__all__ = ["mine_local", "plan", "scan", "check_sizes", "MinePlan", "Scan", "Running", "resolve_layers", "iter_batches",
           "first_image", "eval_mode", "on_device", "collected_notes", "layer_fields"]

Batch = tuple[torch.Tensor, torch.Tensor]


def resolve_layers(model: nn.Module, layers: str | Sequence[str],
                   example: torch.Tensor | Callable[[], torch.Tensor | None] | None = None) -> list[str]:
    """Canonical layer names for ``layers``.

    Parameters
    ----------
    model:
        The model the names belong to.
    layers:
        A list of names or a comma-separated string of them. A name is any
        layer of :func:`interp.layers` (module path, traced functional node
        such as ``"layer1.0.add"``, ``model.layer_aliases`` key, ``convN``) or
        a selector: ``"all-conv"`` (every ``nn.Conv2d`` in forward order),
        ``"all-blocks"`` (every block, see :func:`interp.layers.block_layers`)
        or ``"children:NAME"`` (the children of module ``NAME`` with a
        feature-map output, e.g. ``"children:layer2"``). Duplicates are
        dropped (first kept).
    example:
        An input image batch (or a function returning one, called only when
        needed) for the forward pass that tells blocks with a feature-map
        output from the others; default: a zero 224 x 224 image.
    """
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    if not layers:
        raise ValueError("no layer given; pass layer names (see `cnn-internals layers MODEL`), 'all-conv', "
                         "'all-blocks' or 'children:NAME'")
    probe: list = []

    def example_input():  # one read of the data at most, and only for block selectors
        if not probe:
            probe.append(example() if callable(example) else example)
        return probe[0]

    out: list[str] = []
    for name in layers:
        if name == "all-conv":
            canon_list = list(conv_layers(model))
            if not canon_list:
                raise ValueError("the model has no nn.Conv2d layer; name the layers to use with --layers")
        elif name == "all-blocks":
            canon_list = block_layers(model, example_input())
            if not canon_list:
                raise ValueError("the model has no blocks (modules made of modules, with a feature-map output); "
                                 "name the layers to use with --layers, or use all-conv")
        elif name.startswith("children:"):
            canon_list = children_layers(model, name[len("children:"):].strip(), example_input())
            if not canon_list:
                raise ValueError(f"{name}: no child has a feature-map (N x C x H x W) output")
        else:
            canon_list = [resolve_layer(model, name).name]
        for canon in canon_list:
            if canon not in out:
                out.append(canon)
    return out


def _model_device(model: nn.Module) -> torch.device:
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if len(devices) > 1:
        raise ValueError(f"the model is spread over several devices ({sorted(map(str, devices))}); put it on one")
    return devices.pop() if devices else torch.device("cpu")


def eval_mode(model: nn.Module):
    """Put every module in eval mode; restore each module's own flag on exit."""
    return preserved(model, eval_mode=True)


@contextmanager
def on_device(model: nn.Module, device: str | torch.device | None) -> Iterator[torch.device]:
    """Run on ``device``; if the model lives elsewhere move it there and back."""
    home = _model_device(model)
    target = torch.device(device) if device is not None else home
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
        if target.index is None:  # "cuda" means the current GPU
            target = torch.device("cuda", torch.cuda.current_device())
    moved = target != home
    try:
        if moved:
            model.to(target)
        yield target
    finally:
        if moved:
            model.to(home)


class Running:
    """Running top-k of one layer (tensors on the mining device)."""

    def __init__(self, name: str, channels: list[int] | None, k: int):
        self.name = name
        self.channels = channels  # None: decided from the first output seen
        self.k = k
        self.vals: torch.Tensor | None = None  # (nc, <=k) float32
        self.idx: torch.Tensor | None = None  # (nc, <=k) int64 dataset index
        self.pos: torch.Tensor | None = None  # (nc, <=k) int64 row-major position
        self.out_shape: tuple[int, int, int] | None = None
        self.chan_t: torch.Tensor | None = None

    def update(self, out: torch.Tensor, index: torch.Tensor) -> None:
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            shape = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
            raise ValueError(
                f"layer {self.name!r} outputs {shape}, not an N x C x H x W feature map, so it has no units "
                "to mine: pick a layer with a spatial output (a conv, activation or block: see "
                "`cnn-internals layers MODEL --blocks`)"
            )
        b, c, h, w = out.shape
        if self.vals is None:
            if self.channels is None:
                self.channels = default_channels(c)
            bad = [ch for ch in self.channels if not 0 <= ch < c]
            if bad:
                raise ValueError(
                    f"layer {self.name!r} has {c} channels (0-{c - 1}); channel(s) {bad} do not exist: "
                    "pass --channels within that range"
                )
            self.out_shape = (c, h, w)
            self.chan_t = torch.tensor(self.channels, device=out.device)
            nc = len(self.channels)
            self.vals = torch.empty(nc, 0, device=out.device)
            self.idx = torch.empty(nc, 0, dtype=torch.long, device=out.device)
            self.pos = torch.empty(nc, 0, dtype=torch.long, device=out.device)
        elif (c, h, w) != self.out_shape:
            raise ValueError(
                f"layer {self.name!r} output changed shape from {self.out_shape} to {(c, h, w)}; "
                "all images must have the same input size"
            )
        nc = len(self.channels)
        first = self.channels[0]
        if self.channels == list(range(first, first + nc)):
            # A view, not a gather: index_select on a channels_last map is a
            # slow strided copy (9 % of a ResNet-18 mining pass, measured).
            sel = out.detach()[:, first : first + nc]
        else:
            sel = out.detach().index_select(1, self.chan_t)
        # NaN would poison amax; treat it as the weakest possible activation.
        sel = torch.nan_to_num(sel.float(), nan=-math.inf)
        vals = sel.amax(dim=(2, 3))  # (b, nc)
        # First row-major position reaching the max (explicit: argmax's tie
        # rule is not something to rely on across devices).
        ar = torch.arange(h * w, device=sel.device).view(h, w)
        pos = torch.where(sel == vals[:, :, None, None], ar, h * w).amin(dim=(2, 3))
        index = index.to(sel.device)
        self.push(vals.t(), index.unsqueeze(0).expand(nc, b), pos.t())

    def push(self, vals: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor) -> None:
        """Merge ``(nc, m)`` candidates (value, dataset index, position) into the top-k."""
        cand_v = torch.cat([self.vals, vals.to(self.vals.device)], dim=1)
        cand_i = torch.cat([self.idx, idx.to(self.idx.device)], dim=1)
        cand_p = torch.cat([self.pos, pos.to(self.pos.device)], dim=1)
        # Order by (value desc, dataset index asc): stable sort on the index
        # first, then a stable sort on -value keeps that order among ties.
        o1 = torch.sort(cand_i, dim=1, stable=True).indices
        cand_v, cand_i, cand_p = (t.gather(1, o1) for t in (cand_v, cand_i, cand_p))
        o2 = torch.sort(-cand_v, dim=1, stable=True).indices[:, : self.k]
        self.vals, self.idx, self.pos = (t.gather(1, o2) for t in (cand_v, cand_i, cand_p))

    def state(self) -> dict | None:
        """What another rank needs to merge this top-k (CPU tensors), ``None`` if nothing was seen."""
        if self.vals is None:
            return None
        return {"channels": list(self.channels), "out_shape": self.out_shape,
                "vals": self.vals.cpu(), "idx": self.idx.cpu(), "pos": self.pos.cpu()}

    @classmethod
    def merged(cls, name: str, k: int, states: list[dict | None]) -> "Running":
        """The top-k of the union of several ranks' top-k.

        Each rank holds the exact top-k of its own images under the total
        order (value desc, dataset index asc), and indices are unique, so the
        top-k of their union is the top-k of all images: the single-process
        answer, whatever the shard boundaries.
        """
        seen = [st for st in states if st is not None]
        out = cls(name, None, k)
        if not seen:
            return out
        first = seen[0]
        out.channels, out.out_shape = list(first["channels"]), first["out_shape"]
        nc = len(out.channels)
        out.vals = torch.empty(nc, 0)
        out.idx = torch.empty(nc, 0, dtype=torch.long)
        out.pos = torch.empty(nc, 0, dtype=torch.long)
        out.chan_t = torch.tensor(out.channels)
        for st in seen:
            if st["channels"] != out.channels or st["out_shape"] != out.out_shape:
                raise RuntimeError(
                    f"layer {name!r}: ranks disagree on channels/shape ({first['channels']}, {first['out_shape']} "
                    f"vs {st['channels']}, {st['out_shape']}); every rank must run the same model and data"
                )
            out.push(st["vals"], st["idx"], st["pos"])
        return out


def iter_batches(data, batch_size: int, num_workers: int = 0,
                 positions: range | None = None) -> Iterator[Batch | None]:
    """Yield ``(images, dataset_indices)`` batches from any supported data.

    ``positions`` restricts the pass to those items (a rank's shard); the
    indices yielded stay those of the whole dataset. ``num_workers``
    ``DataLoader`` processes decode ahead (datasets only). A batch whose
    items were all skipped (unreadable) is ``None``.
    """
    if isinstance(data, torch.Tensor):
        if data.ndim != 4:
            raise ValueError(f"image tensor must be N x C x H x W, got shape {tuple(data.shape)}")
        span = positions if positions is not None else range(len(data))
        for s in range(span.start, span.stop, batch_size):
            e = min(s + batch_size, span.stop)
            yield data[s:e], torch.arange(s, e)
        return
    subset = data if positions is None else torch.utils.data.Subset(data, positions)
    if isinstance(data, IndexedImages):  # items carry their own (global) index
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False,
                                             num_workers=num_workers, collate_fn=collate_skipping)
        yield from loader
        return
    # A plain Dataset: the first element of an item is the image, and the
    # dataset index is the item's position (a label is not an index).
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=_first_of_items)
    start = positions.start if positions is not None else 0
    for xs in loader:
        yield xs, torch.arange(start, start + len(xs))
        start += len(xs)


def _first_of_items(batch: list) -> torch.Tensor:
    """Collate of a plain dataset: the images (first element of each item), stacked."""
    xs = [b[0] if isinstance(b, (tuple, list)) else b for b in batch]
    return torch.stack([x if isinstance(x, torch.Tensor) else torch.as_tensor(x) for x in xs])


def first_image(data) -> torch.Tensor | None:
    """The first image of ``data`` as a ``1 x C x H x W`` batch, ``None`` if it cannot be read.

    For the forward pass that picks blocks with a feature-map output
    (``all-blocks``) at the size the data really has.
    """
    try:
        if isinstance(data, torch.Tensor):
            return data[:1] if data.ndim == 4 and len(data) else None
        item = data[0]
        x = item[0] if isinstance(item, (tuple, list)) else item
        x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
        return x[None] if x.ndim == 3 else None
    except Exception:  # noqa: BLE001 - an unreadable first image: mining names it, not this probe
        return None


def check_sizes(k: int, batch_size: int) -> None:
    """``ValueError`` unless ``k`` (images per channel) and ``batch_size`` are at least 1."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")


@dataclass
class MinePlan:
    """What one mining pass records: canonical layer names, their channels, ``k``, and the taps."""

    names: list[str]
    channels: dict[str, list[int] | None]  # None: the first 6, decided from the layer's output
    k: int
    taps: LayerTaps


def plan(model: nn.Module, data, layers: str | Sequence[str],
         channels: Sequence[int] | Mapping[str, Sequence[int]] | None = None, k: int = 9,
         batch_size: int = 64) -> MinePlan:
    """Check the arguments of a mining pass and resolve its layers and channels (see :func:`mine_local`)."""
    check_sizes(k, batch_size)
    names = resolve_layers(model, layers, example=lambda: first_image(data))
    taps = LayerTaps(model, names)
    return MinePlan(names, _channel_plan(model, names, channels), k, taps)


@dataclass
class Scan:
    """What a pass over some images leaves: each layer's running top-k, and what the images were like."""

    todo: MinePlan
    running: dict[str, Running]
    n_images: int = 0
    input_size: tuple[int, int] | None = None
    in_channels: int | None = None

    def state(self) -> dict:
        """Everything another process needs to merge this scan (plain values and CPU tensors)."""
        return {"n_images": self.n_images, "input_size": self.input_size, "in_channels": self.in_channels,
                "states": {n: r.state() for n, r in self.running.items()}}

    @classmethod
    def merged(cls, todo: MinePlan, states: list[dict]) -> "Scan":
        """The scan of all images from the :meth:`state` of scans of disjoint parts (e.g. one per rank).

        Equal to one scan of every image: see :meth:`Running.merged`.
        """
        seen = [st for st in states if st["input_size"] is not None]
        first = seen[0] if seen else {"input_size": None, "in_channels": None}
        return cls(todo, {n: Running.merged(n, todo.k, [st["states"][n] for st in states]) for n in todo.names},
                   sum(st["n_images"] for st in states), first["input_size"], first["in_channels"])

    def require_images(self) -> "Scan":
        """This scan, or ``ValueError`` when it saw no image."""
        if self.n_images == 0:
            raise ValueError("no images to mine: the dataset is empty (or every image was skipped)")
        return self

    def fields(self, model: nn.Module) -> dict[str, dict]:
        """Each layer's receptive field and notes (:func:`layer_fields`) at the size of the images seen.

        Each engine warning is raised once per layer here too (``visualize``
        collects them as notes instead).
        """
        caught: list = []
        fields = layer_fields(model, self.todo.names, self.input_size, self.in_channels, caught)
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return fields

    def topk(self, model: nn.Module, model_id: str | None, fields: Mapping[str, dict],
             path_of: Callable[[int], str | None] | None = None) -> TopK:
        """The :class:`TopK` of this scan, with each layer's ``fields`` (may be empty) and file paths."""
        try:
            conv_order = list(conv_layers(model))
        except Exception:  # noqa: BLE001 - numbering is cosmetic; never fail mining over it
            conv_order = []
        result = TopK(model_id=model_id, k=self.todo.k, n_images=self.n_images, input_size=self.input_size)
        for n in self.todo.names:
            _add_layer(result, model, self.running[n], fields.get(n), path_of, conv_order)
        return result


def scan(model: nn.Module, todo: MinePlan, batches: Iterable[Batch | None],
         device: str | torch.device | None = None, channels_last: bool = True) -> Scan:
    """One pass of ``model`` over ``batches`` (see :func:`iter_batches`), recording ``todo``'s layers."""
    seen = Scan(todo, {n: Running(n, todo.channels.get(n), todo.k) for n in todo.names})
    current: dict[str, torch.Tensor] = {}

    def sink(name: str, output) -> None:
        seen.running[name].update(output, current["index"])

    with eval_mode(model), on_device(model, device) as dev, channels_last_layout(model, channels_last), \
            torch.no_grad(), todo.taps.attached(sink) as run:
        for batch in batches:
            if batch is None:  # every item of the batch was skipped
                continue
            xs, idx = batch
            if seen.input_size is None:
                seen.input_size, seen.in_channels = (int(xs.shape[-2]), int(xs.shape[-1])), int(xs.shape[1])
            current["index"] = idx
            run(as_channels_last(xs.to(dev), channels_last))
            seen.n_images += len(idx)
    return seen


def mine_local(
    model: nn.Module,
    data,
    layers: str | Sequence[str],
    channels: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    k: int = 9,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    *,
    model_id: str | None = None,
    receptive_fields: bool = True,
    channels_last: bool = True,
    batches: Iterable[Batch | None] | None = None,
    fast: bool = True,
    num_workers: int = 0,
) -> TopK:
    """:func:`interp.mine` in this process alone, without a progress bar: the core every caller shares.

    Parameters
    ----------
    model, data, layers, channels, k, batch_size, device, model_id, receptive_fields, channels_last:
        As for :func:`interp.mine` (:func:`interp.api.mine`).
    batches:
        The ``(images, dataset indices)`` batches of ``data`` to mine
        (default: :func:`iter_batches` of all of it, decoded in this
        process). A caller passes its own to decode in worker processes, to
        count images on a progress bar, or to mine a part of the data.
    fast:
        Screen every image with a fast copy of the model, then run the plain
        pass on the candidates only (:mod:`interp.fast`); ``False``: the
        plain pass over every image.
    num_workers:
        ``DataLoader`` processes that decode the images: all of them when
        ``batches`` is not given, and the candidates the fast path reads
        again.

    Returns
    -------
    TopK
        As :func:`interp.mine`; it never looks for a process group.
    """
    todo = plan(model, data, layers, channels, k, batch_size)
    batches = iter_batches(data, batch_size, num_workers) if batches is None else batches
    seen = None
    target = torch.device(device) if device is not None else _model_device(model)
    if fast and applies(data, target):
        got = screened_scan(model, todo, data, batches, target, channels_last, batch_size, scan, Scan, Running,
                            num_workers)
        if isinstance(got, Replay):
            batches = got
        else:
            seen = got
    if seen is None:
        seen = scan(model, todo, batches, device, channels_last)
    seen.require_images()
    fields = seen.fields(model) if receptive_fields else {}
    return seen.topk(model, model_id, fields, getattr(data, "path", None))


def _channel_plan(model: nn.Module, names: list[str],
                  channels: Sequence[int] | Mapping[str, Sequence[int]] | None) -> dict[str, list[int] | None]:
    """Channels to mine per layer (``None``: decided from the layer's output), validated."""
    if isinstance(channels, Mapping):
        chan_of: dict[str, list[int] | None] = {}
        for key, chs in channels.items():
            chan_of[resolve_layers(model, [key])[0]] = [int(c) for c in chs]
    else:
        chan_of = {n: ([int(c) for c in channels] if channels is not None else None) for n in names}
    for n in names:
        chs = chan_of.get(n)
        if chs is not None and (not chs or len(set(chs)) != len(chs)):
            raise ValueError(f"channels for layer {n!r} must be a non-empty list without repeats, got {chs}")
    return chan_of


def _add_layer(result: TopK, model: nn.Module, r: Running, field: dict | None, path_of,
               conv_order: list[str]) -> None:
    """Put one mined layer (its :class:`LayerInfo` and entries) into ``result``."""
    n = r.name
    info = LayerInfo(
        name=n, kind=layer_kind(model, n), channels=list(r.channels), out_shape=r.out_shape,
        number=conv_order.index(n) + 1 if n in conv_order else None, input_size=result.input_size,
    )
    if field is not None:
        info.notes = list(field["notes"])
        if "size" in field:
            info.rf_size = tuple(int(v) for v in field["size"])
            info.rf_stride = tuple(int(round(v)) for v in field["stride"])  # (a mean step after upsampling)
            info.rf_offset = tuple(int(v) for v in field["offset"])
            info.rf_global = bool(field["is_global"])
            info.rf_local = bool(field["local"])
            info.rf_measured = bool(field["measured"])
    spatial = field.get("spatial") if field is not None else None
    if spatial is not None:
        # Per channel: after a concat of branches (Inception) a channel sees only its branch's field.
        def box_of(y: int, x: int, c: int) -> tuple[int, int, int, int]:
            return tuple(int(v) for v in spatial.box(y, x, channel=c))
    else:
        def box_of(y: int, x: int, c: int) -> tuple[int, int, int, int] | None:
            return info.box(y, x)
    vals, idx, pos = r.vals.cpu(), r.idx.cpu(), r.pos.cpu()
    w = r.out_shape[2]
    per: dict[int, list[Entry]] = {}
    for ci, c in enumerate(r.channels):
        lst = []
        for rank in range(vals.shape[1]):
            y, x = divmod(int(pos[ci, rank]), w)
            i = int(idx[ci, rank])
            lst.append(Entry(layer=n, channel=c, rank=rank, index=i, y=y, x=x, value=float(vals[ci, rank]),
                             path=path_of(i) if callable(path_of) else None, box=box_of(y, x, c)))
        per[c] = lst
    result.layers[n] = info
    result.entries[n] = per

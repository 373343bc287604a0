"""Top-k mining: which images make each channel fire most, in one pass.

:func:`mine` runs the data through the model once, with a forward hook on
each requested layer. For each image and requested channel the hook takes the
maximum over positions (and its first row-major argmax) *on the device*, then
merges those ``B`` candidates into a running top-k. Full activation maps are
never stored, so memory is O(layers x channels x k) whatever the dataset size.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from . import parallel as dist
from ._utils import as_channels_last, preserved
from ._utils import channels_last as _channels_last
from .capture import LayerTaps
from .layers import block_layers, children_layers, conv_layers, layer_kind, resolve_layer
from .layer_fields import collected_notes, layer_fields
from .topk import Entry, LayerInfo, TopK

__all__ = ["mine", "resolve_layers", "iter_batches", "first_image", "eval_mode", "on_device",
           "collected_notes", "layer_fields"]

DEFAULT_CHANNELS = 6


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


class _Running:
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
                self.channels = list(range(min(DEFAULT_CHANNELS, c)))
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
    def merged(cls, name: str, k: int, states: list[dict | None]) -> "_Running":
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


def iter_batches(data, batch_size: int, num_workers: int,
             positions: range | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor] | None]:
    """Yield ``(images, dataset_indices)`` batches from any supported data.

    ``positions`` restricts the pass to those items (a rank's shard); the
    indices yielded stay those of the whole dataset.
    """
    from .data import IndexedImages, collate_skipping

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
    def first(batch):
        xs = [b[0] if isinstance(b, (tuple, list)) else b for b in batch]
        return torch.stack([x if isinstance(x, torch.Tensor) else torch.as_tensor(x) for x in xs])

    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=first)
    start = positions.start if positions is not None else 0
    for xs in loader:
        yield xs, torch.arange(start, start + len(xs))
        start += len(xs)


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


def mine(
    model: nn.Module,
    data,
    layers: str | Sequence[str],
    channels: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    k: int = 9,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    *,
    model_id: str | None = None,
    num_workers: int = 0,
    progress: bool = True,
    receptive_fields: bool = True,
    distributed: bool | None = None,
    channels_last: bool = True,
) -> TopK:
    """Find the top-``k`` images per channel of several layers in one pass.

    Parameters
    ----------
    model:
        Any ``torch.nn.Module``. It is left as it was: hooks are removed and
        every module's train/eval flag restored even if an error is raised;
        if ``device`` differs from where it lives it is moved there for the
        pass and moved back.
    data:
        An :class:`interp.data.IndexedImages` (items ``(tensor, index)``), a
        ``N x C x H x W`` tensor, or any dataset whose items are images or
        ``(image, label)`` tuples (then the index is the item's position).
    layers:
        Layer names (see :func:`interp.layers`: modules, traced functional
        nodes such as ``"layer1.0.add"``), a comma-separated string, or the
        selectors ``"all-conv"``, ``"all-blocks"``, ``"children:NAME"`` (see
        :func:`resolve_layers`). Every layer must output ``N x C x H x W``.
    channels:
        Channels to mine, for every layer or as ``{layer: channels}``.
        ``None`` (default) means the first 6 (``range(6)``), or all of a layer
        that has fewer.
    k:
        Images kept per channel.
    batch_size:
        Images per forward pass.
    device:
        Where to run; default: the model's device.
    model_id:
        Stored in the result (and its JSON).
    num_workers:
        ``DataLoader`` workers for decoding images.
    progress:
        Show a tqdm bar (images/s) on stderr.
    receptive_fields:
        Also compute each layer's receptive field (for boxes and panels).
    distributed:
        Split the pass over the ranks of the initialised ``torch.distributed``
        process group (every rank must call :func:`mine` with the same
        arguments). ``None`` (default): when one with more than one process
        is initialised; ``False``: mine all of ``data`` in this process alone.
    channels_last:
        Run the pass in ``torch.channels_last`` memory format (the model's
        4-D weights are stored that way for the pass and given back
        unchanged): 1.06-1.8x faster forwards on a CPU (measured: ResNet-18
        1.15x, GoogLeNet 1.6x, MobileNet v2 1.8x). Values agree with the
        model's own layout to float rounding (~1e-6 relative), so two
        near-equal activations may swap ranks. ``False``: the model's layout.

    Returns
    -------
    TopK
        Per layer and channel at most ``k`` entries, one per image at most
        (its strongest position, the first in row-major order on ties),
        ordered by value descending; equal values keep the lower dataset index
        first.

    Notes
    -----
    One forward pass per batch serves every layer (:class:`interp.capture.LayerTaps`):
    forward hooks when all layers are modules, the model's fx graph run on
    the model's own modules when one is a traced functional node. The pass is
    cut short as soon as every requested layer has produced its output. A
    module called several times per forward is recorded at its first call.

    ``LayerInfo.notes`` holds what the receptive-field analysis said about
    each layer (its :class:`interp.notices.EngineWarning` messages and the
    field's ``notes``), once per layer; each of those warnings is also
    raised once (on rank 0 under torchrun).

    Distributed (under ``torchrun``, see :mod:`interp.parallel`): each rank mines
    a contiguous block of whole batches (the batches one process would form;
    nothing padded or repeated), the per-rank top-k are gathered and merged
    under the same order, and every rank returns the same :class:`TopK`,
    equal to the single-process one (``n_images`` counts all ranks). An error
    on one rank is raised on every rank.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    names = resolve_layers(model, layers, example=lambda: first_image(data))
    taps = LayerTaps(model, names)
    chan_of = _channel_plan(model, names, channels)
    running = {n: _Running(n, chan_of.get(n), k) for n in names}
    current: dict[str, torch.Tensor] = {}

    def sink(name: str, output) -> None:
        running[name].update(output, current["index"])

    from tqdm.auto import tqdm

    spread, total, positions = _shard(model, data, batch_size, distributed)

    def mine_here() -> dict:
        """One pass over this process's images; returns what the merge needs."""
        n_images = 0
        input_size: tuple[int, int] | None = None
        in_channels: int | None = None
        with eval_mode(model), on_device(model, device) as dev, _channels_last(model, channels_last), \
                torch.no_grad(), taps.attached(sink) as run, \
                tqdm(total=len(positions) if spread else total, unit="img", dynamic_ncols=True, leave=False,
                     desc=f"mining {len(names)} layer(s)" + (f" (rank 0 of {dist.world()[1]})" if spread else ""),
                     disable=not progress or (spread and not dist.is_main())) as bar:
            for batch in iter_batches(data, batch_size, num_workers, positions):
                if batch is None:  # every item of the batch was skipped
                    continue
                xs, idx = batch
                if input_size is None:
                    input_size = (int(xs.shape[-2]), int(xs.shape[-1]))
                    in_channels = int(xs.shape[1])
                current["index"] = idx
                run(as_channels_last(xs.to(dev), channels_last))
                n_images += len(idx)
                bar.update(len(idx))
        return {"n_images": n_images, "input_size": input_size, "in_channels": in_channels}

    if spread:
        # Each rank's top-k travels as CPU tensors; every rank merges them alike.
        parts = dist.collect(lambda: {**mine_here(), "states": {n: running[n].state() for n in names}})
        with_data = [p for p in parts if p["input_size"] is not None]
        n_images = sum(p["n_images"] for p in parts)
        input_size = with_data[0]["input_size"] if with_data else None
        in_channels = with_data[0]["in_channels"] if with_data else None
        running = {n: _Running.merged(n, k, [p["states"][n] for p in parts]) for n in names}
    else:
        part = mine_here()
        n_images, input_size, in_channels = part["n_images"], part["input_size"], part["in_channels"]
    if n_images == 0:
        raise ValueError("no images to mine: the dataset is empty (or every image was skipped)")

    fields: dict = {}
    if receptive_fields:
        # Under torchrun rank 0 traces once and the others get its plain dicts
        # (notes included), so every rank returns the same TopK.
        if not spread or dist.is_main():
            caught: list = []
            fields = layer_fields(model, names, input_size, in_channels, caught)
            for w in caught:  # said once per layer here too (visualize keeps them as notes instead)
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if spread:
            fields = dist.broadcast(fields)
    try:
        conv_order = list(conv_layers(model))
    except Exception:  # noqa: BLE001 - numbering is cosmetic; never fail mining over it
        conv_order = []
    result = TopK(model_id=model_id, k=k, n_images=n_images, input_size=input_size)
    for n in names:
        _add_layer(result, model, running[n], fields.get(n), getattr(data, "path", None), conv_order)
    return result


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


def _shard(model: nn.Module, data, batch_size: int, distributed: bool | None) -> tuple[bool, int | None, range | None]:
    """``(spread over ranks?, number of items or None, this rank's positions or None)``."""
    spread = dist.active() if distributed is None else bool(distributed)
    if spread and not dist.active():
        raise ValueError("distributed=True needs an initialised torch.distributed process group with more than "
                         "one process: start the script with torchrun (see interp.parallel.init_from_env)")
    try:
        total = len(data)
    except TypeError:
        total = None
    positions = None
    if spread:
        if total is None:
            raise ValueError(f"distributed mining splits the data by position, so it needs a length; "
                             f"{type(data).__name__} has none (pass a Dataset or a tensor)")
        positions = dist.shard_blocks(total, batch_size)
        dist.check_same_module(model)  # results of different models would merge silently
    return spread, total, positions


def _add_layer(result: TopK, model: nn.Module, r: _Running, field: dict | None, path_of,
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

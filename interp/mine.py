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
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from ._state import StopForward, as_channels_last, preserved
from ._state import channels_last as _channels_last
from .topk import Entry, LayerInfo, TopK

__all__ = ["mine", "resolve_layers"]

DEFAULT_CHANNELS = 6


def resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """Canonical module names for ``layers``.

    ``layers`` is a list of names (aliases from ``model.layer_aliases``
    accepted), a comma-separated string, or ``"all-conv"`` for every
    ``nn.Conv2d`` in forward order. Duplicates are dropped (first kept).
    """
    from .layers import conv_layers, resolve_layer

    if isinstance(layers, str):
        if layers.strip() == "all-conv":
            names = list(conv_layers(model))
            if not names:
                raise ValueError("the model has no nn.Conv2d layer; name the layers to use with --layers")
            return names
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    if not layers:
        raise ValueError("no layer given; pass layer names (see `cnn-internals layers MODEL`) or 'all-conv'")
    out: list[str] = []
    for name in layers:
        if name == "all-conv":
            canon_list = list(conv_layers(model))
        else:
            canon_list = [resolve_layer(model, name).name]
        for canon in canon_list:
            if canon not in out:
                out.append(canon)
    return out


def _module_of(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(
            f"layer {name!r} is not a submodule (it is a functional operation); mining hooks modules: "
            "pick a module layer from `cnn-internals layers MODEL`"
        )
    return modules[name]


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
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"layer {self.name!r} outputs {shape}; mining needs N x C x H x W feature maps "
                "(pick a convolutional layer)"
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


def _receptive_fields(model: nn.Module, names: list[str], input_size: tuple[int, int],
                      in_channels: int) -> dict:
    """Receptive fields of ``names`` (one trace for all; per layer on failure)."""
    from .rf import receptive_field, receptive_fields

    try:
        return receptive_fields(model, input_size, names, in_channels)
    except Exception:
        out = {}
        for n in names:
            try:
                out[n] = receptive_field(model, n, input_size, in_channels)
            except Exception as exc:  # boxes are optional for mining itself
                warnings.warn(f"no receptive field for layer {n!r} ({exc}); crops and boxes unavailable",
                              stacklevel=3)
        return out


def _batches(data, batch_size: int, num_workers: int,
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
        Layer names (see :func:`interp.layers`), a comma-separated string, or
        ``"all-conv"``.
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
    The forward pass is cut short (by an exception raised in a hook and
    caught here) as soon as every requested layer has produced its output.
    A module called several times per forward is recorded at its first call.

    Distributed (under ``torchrun``, see :mod:`interp.dist`): each rank mines
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
    from .layers import conv_layers

    names = resolve_layers(model, layers)
    modules = {n: _module_of(model, n) for n in names}
    if isinstance(channels, Mapping):
        chan_of = {}
        for key, chs in channels.items():
            chan_of[resolve_layers(model, [key])[0]] = [int(c) for c in chs]
    else:
        chan_of = {n: ([int(c) for c in channels] if channels is not None else None) for n in names}
    for n in names:
        chs = chan_of.get(n)
        if chs is not None and (not chs or len(set(chs)) != len(chs)):
            raise ValueError(f"channels for layer {n!r} must be a non-empty list without repeats, got {chs}")
    running = {n: _Running(n, chan_of.get(n), k) for n in names}

    fired: set[str] = set()
    current: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module, inputs, output):
            if name in fired:
                return None  # later calls of a shared module: first call wins
            fired.add(name)
            running[name].update(output, current["index"])
            if len(fired) == len(names):
                raise StopForward
            return None

        return hook

    from tqdm.auto import tqdm

    from . import dist

    spread = dist.active() if distributed is None else bool(distributed)
    if spread and not dist.active():
        raise ValueError("distributed=True needs an initialised torch.distributed process group with more than "
                         "one process: start the script with torchrun (see interp.dist.init_from_env)")
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

    def mine_here() -> dict:
        """One pass over this process's images; returns what the merge needs."""
        n_images = 0
        input_size: tuple[int, int] | None = None
        in_channels: int | None = None
        handles = []
        with eval_mode(model), on_device(model, device) as dev, _channels_last(model, channels_last), \
                torch.no_grad():
            try:
                for n in names:
                    handles.append(modules[n].register_forward_hook(make_hook(n)))
                with tqdm(total=len(positions) if spread else total, unit="img", dynamic_ncols=True, leave=False,
                          desc=f"mining {len(names)} layer(s)" + (f" (rank 0 of {dist.world()[1]})" if spread else ""),
                          disable=not progress or (spread and not dist.is_main())) as bar:
                    for batch in _batches(data, batch_size, num_workers, positions):
                        if batch is None:  # every item of the batch was skipped
                            continue
                        xs, idx = batch
                        if input_size is None:
                            input_size = (int(xs.shape[-2]), int(xs.shape[-1]))
                            in_channels = int(xs.shape[1])
                        fired.clear()
                        current["index"] = idx
                        try:
                            model(as_channels_last(xs.to(dev), channels_last))
                        except StopForward:
                            pass
                        missing = [n for n in names if n not in fired]
                        if missing:
                            raise RuntimeError(
                                f"layer(s) {', '.join(missing)} did not run in the forward pass; "
                                "pick layers that the model's forward uses"
                            )
                        n_images += len(idx)
                        bar.update(len(idx))
            finally:
                for h in handles:
                    h.remove()
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

    try:
        conv_order = list(conv_layers(model))
    except Exception:  # numbering is cosmetic; never fail mining over it
        conv_order = []
    path_of = getattr(data, "path", None)
    rfs: dict = {}
    if receptive_fields:
        # Under torchrun rank 0 traces (and warns) once; the others get plain tuples.
        if not spread or dist.is_main():
            traced = _receptive_fields(model, names, input_size, in_channels)
            rfs = {n: (tuple(rf.size), tuple(rf.stride), tuple(rf.offset), bool(rf.is_global))
                   for n, rf in traced.items()}
        if spread:
            rfs = dist.broadcast(rfs)
    result = TopK(model_id=model_id, k=k, n_images=n_images, input_size=input_size)
    for n in names:
        r = running[n]
        info = LayerInfo(
            name=n, kind=type(modules[n]).__name__, channels=list(r.channels), out_shape=r.out_shape,
            number=conv_order.index(n) + 1 if n in conv_order else None, input_size=input_size,
        )
        rf = rfs.get(n)
        if rf is not None:
            size, stride, offset, is_global = rf
            info.rf_size = tuple(int(v) for v in size)
            info.rf_stride = tuple(int(v) for v in stride)
            info.rf_offset = tuple(int(v) for v in offset)
            info.rf_global = is_global
        vals, idx, pos = r.vals.cpu(), r.idx.cpu(), r.pos.cpu()
        w = r.out_shape[2]
        per: dict[int, list[Entry]] = {}
        for ci, c in enumerate(r.channels):
            lst = []
            for rank in range(vals.shape[1]):
                p = int(pos[ci, rank])
                y, x = divmod(p, w)
                i = int(idx[ci, rank])
                lst.append(Entry(layer=n, channel=c, rank=rank, index=i, y=y, x=x, value=float(vals[ci, rank]),
                                 path=path_of(i) if callable(path_of) else None, box=info.box(y, x)))
            per[c] = lst
        result.layers[n] = info
        result.entries[n] = per
    return result

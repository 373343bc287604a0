"""The result of top-k mining, and its JSON form.

A :class:`TopK` says, for each mined layer and channel, which dataset images
activate that channel most (at most one entry per image: its strongest
position), where (``y``, ``x`` on the layer's output grid), how strongly, and
which input box the unit sees. Saved as JSON it lets a panel or the gallery be
redrawn without mining the data again.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from ._utils import write_atomic

__all__ = ["Entry", "LayerInfo", "TopK", "DEFAULT_CHANNELS", "default_channels"]

FORMAT = "cnn-internals.topk/1"

#: Channels mined per layer when none are named: the first six, as the seed's panels show.
DEFAULT_CHANNELS = 6


def default_channels(count: int) -> list[int]:
    """The channels mined of a layer with ``count`` channels when none are named."""
    return list(range(min(DEFAULT_CHANNELS, count)))


@dataclass
class Entry:
    """One top-k hit: ``channel`` of ``layer`` fired ``value`` at (``y``, ``x``) on image ``index``.

    ``box`` is the receptive field of that unit in input pixels,
    ``(top, left, bottom, right)`` half-open and *not* clipped to the image
    (it may start at a negative row); ``None`` when it could not be computed.
    """

    layer: str
    channel: int
    rank: int
    index: int
    y: int
    x: int
    value: float
    path: str | None = None
    box: tuple[int, int, int, int] | None = None

    @property
    def unit(self) -> tuple[int, int, int, int]:
        """``(index, channel, y, x)``."""
        return (self.index, self.channel, self.y, self.x)


@dataclass
class LayerInfo:
    """What was learnt about a mined layer.

    ``number`` is the 1-based position among the model's conv layers (the
    ``N`` of the panel title ``Layer N (convN)``), ``None`` if not a conv.
    ``kind`` is the module's class (``"Conv2d"``, ``"BasicBlock"``) or, for a
    traced functional node, its op (``"add"``, ``"cat"``).
    ``rf_size`` / ``rf_stride`` / ``rf_offset`` describe the receptive field
    that boxes and crops use (see :class:`interp.ReceptiveField`); ``None``
    when unknown. ``rf_local``: the exact field is the whole input through a
    global-context path (squeeze-and-excitation) and these describe the local
    field through the spatial path (``ReceptiveField.spatial``).
    ``rf_measured``: the field was measured (gradient support), not derived.
    ``notes``: what the engine could not do exactly for this layer, one
    sentence each (shown once per layer by the CLI and the gallery).
    """

    name: str
    kind: str
    channels: list[int]
    out_shape: tuple[int, int, int]
    number: int | None = None
    input_size: tuple[int, int] | None = None
    rf_size: tuple[int, int] | None = None
    rf_stride: tuple[int, int] | None = None
    rf_offset: tuple[int, int] | None = None
    rf_global: bool = False
    rf_local: bool = False
    rf_measured: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def is_conv(self) -> bool:
        return self.kind in ("Conv2d", "Conv1d", "Conv3d", "LazyConv2d")

    def box(self, y: int, x: int) -> tuple[int, int, int, int] | None:
        """Unclipped receptive-field box of unit (y, x), or ``None``."""
        if self.rf_size is None or self.rf_stride is None or self.rf_offset is None:
            return None
        if self.rf_global:  # the unit sees the whole input (after global pooling)
            return (0, 0, int(self.input_size[0]), int(self.input_size[1]))
        top = self.rf_offset[0] + y * self.rf_stride[0]
        left = self.rf_offset[1] + x * self.rf_stride[1]
        return (top, left, top + self.rf_size[0], left + self.rf_size[1])


@dataclass
class TopK:
    """Top-k activations per (layer, channel).

    Attributes
    ----------
    model_id:
        Name of the model the data was mined with.
    k:
        How many images were asked for per channel.
    n_images:
        How many images were mined.
    input_size:
        ``(H, W)`` of the model input.
    layers:
        :class:`LayerInfo` per mined layer, in the order asked.
    entries:
        ``{layer: {channel: [Entry, ...]}}`` sorted by rank (value descending,
        ties by lower dataset index).
    weights:
        Where the model's weights came from (``{"name", "file", "sha256"}``,
        ``{"random": True, "seed": 0}``...), ``None`` when not recorded.
    """

    model_id: str | None
    k: int
    n_images: int
    input_size: tuple[int, int]
    layers: dict[str, LayerInfo] = field(default_factory=dict)
    entries: dict[str, dict[int, list[Entry]]] = field(default_factory=dict)
    weights: dict | None = None

    def __getitem__(self, key: tuple[str, int]) -> list[Entry]:
        layer, channel = key
        try:
            return self.entries[layer][int(channel)]
        except KeyError:
            raise KeyError(
                f"no top-k for layer {layer!r} channel {channel}; mined: "
                + ", ".join(f"{n} {info.channels}" for n, info in self.layers.items())
            ) from None

    def channels(self, layer: str) -> list[int]:
        """Channels mined for ``layer``."""
        return list(self.layer(layer).channels)

    def layer(self, layer: str) -> LayerInfo:
        """The :class:`LayerInfo` of ``layer`` (clear error if it was not mined)."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer!r} was not mined; mined layers: {', '.join(self.layers)}")
        return self.layers[layer]

    def iter_entries(self, layer: str) -> Iterator[Entry]:
        """Entries of ``layer`` in (channel order, rank) order."""
        for c in self.channels(layer):
            yield from self.entries[layer][c]

    def units(self, layer: str) -> list[tuple[int, int, int, int]]:
        """``(index, channel, y, x)`` for :func:`interp.project`, in :meth:`iter_entries` order."""
        return [e.unit for e in self.iter_entries(layer)]

    def image_indices(self, layer: str | None = None) -> list[int]:
        """Sorted distinct dataset indices referenced (by ``layer`` or all layers)."""
        names = [layer] if layer is not None else list(self.layers)
        return sorted({e.index for n in names for e in self.iter_entries(n)})

    # -- JSON -----------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-ready dict (see :meth:`save`)."""
        layers = []
        for name, info in self.layers.items():
            d = asdict(info)
            d["entries"] = [
                {k: v for k, v in asdict(e).items() if k != "layer"} for e in self.iter_entries(name)
            ]
            layers.append(d)
        return {
            "format": FORMAT,
            "model_id": self.model_id,
            "k": self.k,
            "n_images": self.n_images,
            "input_size": list(self.input_size),
            "weights": self.weights,
            "layers": layers,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "TopK":
        """Inverse of :meth:`to_dict`."""
        if data.get("format") != FORMAT:
            raise ValueError(f"not a cnn-internals top-k file (format {data.get('format')!r}, expected {FORMAT!r})")

        def tup(v):
            return tuple(v) if v is not None else None

        out = cls(data["model_id"], int(data["k"]), int(data["n_images"]), tuple(data["input_size"]),
                  weights=data.get("weights"))
        for d in data["layers"]:
            info = LayerInfo(
                name=d["name"], kind=d["kind"], channels=[int(c) for c in d["channels"]],
                out_shape=tup(d["out_shape"]), number=d.get("number"), input_size=tup(d.get("input_size")),
                rf_global=bool(d.get("rf_global", False)), rf_local=bool(d.get("rf_local", False)),
                rf_measured=bool(d.get("rf_measured", False)), notes=[str(v) for v in d.get("notes", [])],
                rf_size=tup(d.get("rf_size")), rf_stride=tup(d.get("rf_stride")), rf_offset=tup(d.get("rf_offset")),
            )
            out.layers[info.name] = info
            per = {c: [] for c in info.channels}
            for e in d["entries"]:
                per[int(e["channel"])].append(Entry(layer=info.name, channel=int(e["channel"]), rank=int(e["rank"]),
                                                    index=int(e["index"]), y=int(e["y"]), x=int(e["x"]),
                                                    value=float(e["value"]), path=e.get("path"), box=tup(e.get("box"))))
            for c in per:
                per[c].sort(key=lambda e: e.rank)
            out.entries[info.name] = per
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON file atomically; returns its path.

        Each entry holds channel, rank, dataset index, image path (when the
        data came from files), y, x, value and the unclipped receptive-field
        box ``[top, left, bottom, right]`` (half-open).
        """
        return write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TopK":
        """Read a file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"top-k file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); re-run `cnn-internals visualize`") from exc
        return cls.from_dict(data)

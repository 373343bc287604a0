"""Compare two models on the same images: side-by-side panels and a layer-by-layer CKA map.

:func:`compare` takes two models and the same images opened with each model's
own preprocessing (two :class:`interp.data.IndexedImages` over the same files),
and

1. runs :func:`interp.visualize` on each (mining, projection, panels and a
   gallery in ``DIR/a-<id>/`` and ``DIR/b-<id>/``);
2. puts each pair of panels side by side, A left, B right
   (``DIR/compare_<layerA>_vs_<layerB>_<method>.png``). The channels shown are
   the *same channel indices* on both sides (the first 6 by default), not
   matched channels: channel numbering is arbitrary per network, so rows are
   not expected to correspond;
3. computes the linear CKA (:mod:`interp.draw.cka`) between every layer of A and
   every layer of B over all the images (the panel layers, or a separate,
   usually longer, list of CKA layers), on each layer's activations
   average-pooled to at most ``grid x grid`` positions (full maps of early
   layers are too large to hold for hundreds of images), and draws it as a
   heatmap (``DIR/cka.png``);
4. writes the numbers to ``DIR/compare.json``.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from torch import nn

from ..api import visualize
from ..capture import LayerTaps
from ..data import IndexedImages
from ..mine import eval_mode, iter_batches, on_device, resolve_layers
from .._utils import counted, progress_bar, write_atomic
from .cka import cka_matrix, gram_linear
from .panels import encode_figure, font
from .visualize import VisualizeResult, slug

__all__ = ["compare", "CompareResult", "layer_grams", "side_by_side"]


@dataclass
class CompareResult:
    """What :func:`compare` wrote and computed."""

    out_dir: Path
    layers_a: list[str]  # panel layers
    layers_b: list[str]
    cka: torch.Tensor  # len(cka_layers_a) x len(cka_layers_b), float64
    n_images: int
    cka_layers_a: list[str] = field(default_factory=list)  # rows of ``cka``
    cka_layers_b: list[str] = field(default_factory=list)  # columns of ``cka``
    panels: dict[tuple[str, str, str], Path] = field(default_factory=dict)  # (layer A, layer B, method) -> file
    heatmap_path: Path | None = None
    json_path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # "A <layer>" / "B <layer>" -> the engine's notes on that layer (VisualizeResult.notes)
    notes: dict[str, list[str]] = field(default_factory=dict)


def layer_grams(
    model: nn.Module,
    data: IndexedImages | torch.Tensor,
    layers: Sequence[str],
    *,
    grid: int = 4,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "features",
) -> tuple[list[torch.Tensor], list[int]]:
    """Linear Gram matrices of several layers' activations over ``data``, in one pass.

    Parameters
    ----------
    model:
        Any ``torch.nn.Module`` (left as it was: hooks removed, flags restored).
    data:
        Images with the model's preprocessing, or an ``N x C x H x W`` tensor.
    layers:
        Canonical layer names (:func:`interp.mine.resolve_layers`): modules or traced nodes.
    grid:
        Spatial maps are average-pooled to at most ``grid x grid`` before
        flattening (``0``: keep the full map).

    Returns
    -------
    (grams, indices)
        One ``n x n`` float64 Gram matrix per layer, and the dataset indices of
        the ``n`` rows (unreadable images skipped by the data are absent).
    """
    feats: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    taps = LayerTaps(model, layers)

    def keep(name: str, out) -> None:
        if isinstance(out, (tuple, list)):
            out = out[0]
        t = out.detach()
        if t.ndim == 4 and grid and (t.shape[-2] > grid or t.shape[-1] > grid):
            t = F.adaptive_avg_pool2d(t, (min(grid, t.shape[-2]), min(grid, t.shape[-1])))
        feats[name].append(t.reshape(t.shape[0], -1).float().cpu())

    indices: list[int] = []
    total = len(data) if hasattr(data, "__len__") else None
    with eval_mode(model), on_device(model, device) as dev, torch.no_grad(), taps.attached(keep) as run, \
            progress_bar(total, desc, "img", progress) as bar:
        for batch in counted(iter_batches(data, batch_size), bar):
            if batch is None:
                continue
            xs, idx = batch
            run(xs.to(dev))  # stops after the deepest layer
            indices.extend(int(i) for i in idx)
    return [gram_linear(torch.cat(feats[n])) for n in layers], indices


def side_by_side(left: Path, right: Path, left_title: str, right_title: str, gap: int = 16) -> np.ndarray:
    """Two panel images next to each other on white, each under its title, as ``H x W x 3`` uint8."""
    a, b = Image.open(left).convert("RGB"), Image.open(right).convert("RGB")
    fnt = font(16)
    head = 28
    w = a.width + gap + b.width
    h = head + max(a.height, b.height)
    canvas = Image.new("RGB", (w, h), "white")
    canvas.paste(a, (0, head))
    canvas.paste(b, (a.width + gap, head))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 6), "A: " + left_title, fill="black", font=fnt)
    draw.text((a.width + gap + 4, 6), "B: " + right_title, fill="black", font=fnt)
    return np.asarray(canvas)


def _heatmap_png(cka: torch.Tensor, layers_a: list[str], layers_b: list[str], id_a: str, id_b: str, n: int) -> bytes:
    """The CKA matrix as a PNG heatmap, rows A's layers, columns B's."""
    m = cka.numpy()
    # Up to 12 x 12 cells each cell carries its number; larger maps (e.g. every conv of
    # two MobileNets) are drawn denser, without numbers, so that they stay legible.
    dense = max(len(layers_a), len(layers_b)) > 12
    cell_w, cell_h = (0.32, 0.3) if dense else (0.9, 0.7)
    # A Figure of its own (no pyplot): the same Agg pixels, and the user's pyplot backend and figures untouched.
    fig = Figure(figsize=(max(3.6, 2.4 + cell_w * len(layers_b)), 2.0 + cell_h * len(layers_a)),
                 dpi=100 if dense else 120)
    ax = fig.subplots()
    im = ax.imshow(m, vmin=0, vmax=1, cmap="magma")
    tick = 7 if dense else None
    ax.set_xticks(range(len(layers_b)), layers_b, rotation=90 if dense else 45, ha="center" if dense else "right",
                  fontsize=tick)
    ax.set_yticks(range(len(layers_a)), layers_a, fontsize=tick)
    # Model ids can be long ("pretrained-mobilenet_v1_025_keras"): in the title, not the narrow axis labels.
    ax.set_xlabel("B layers")
    ax.set_ylabel("A layers")
    ax.set_title(f"linear CKA, {n} images\nA: {id_a}\nB: {id_b}", fontsize=9)
    for i in range(m.shape[0] if not dense else 0):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if m[i, j] > 0.6 else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    # bbox "tight": the three-line title must not be cut off at the top of a wide map.
    fig.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.1)
    return buf.getvalue()


def compare(
    model_a: nn.Module,
    data_a: IndexedImages,
    model_b: nn.Module,
    data_b: IndexedImages,
    out_dir: str | Path,
    layers_a: str | Sequence[str],
    layers_b: str | Sequence[str] | None = None,
    *,
    id_a: str = "A",
    id_b: str = "B",
    methods: Sequence[str] = ("guided",),
    channels: Sequence[int] | None = None,
    k: int = 9,
    grid: int = 4,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    cka_layers_a: str | Sequence[str] | None = None,
    cka_layers_b: str | Sequence[str] | None = None,
) -> CompareResult:
    """Side-by-side panels and a linear-CKA heatmap for two models on the same images.

    Parameters
    ----------
    model_a, model_b:
        Any two ``torch.nn.Module`` CNNs (the same one twice is fine).
    data_a, data_b:
        The same images, each opened with its model's preprocessing; they must
        list the same files in the same order (checked on file paths where known).
    out_dir:
        Output folder.
    layers_a, layers_b:
        Layers of each model (names, ``convN``, comma-separated, or
        ``"all-conv"``); ``layers_b=None`` uses the same names on B. Panels pair
        the i-th layer of A with the i-th of B (when the counts differ, only
        CKA is computed for the extra layers).
    methods, channels, k, batch_size, device:
        As for :func:`interp.visualize`.
    grid:
        CKA pooling grid (see the module docstring; ``0`` = full maps).
    cka_layers_a, cka_layers_b:
        Layers for the CKA heatmap when they should differ from the panel
        layers (e.g. ``"all-conv"``: CKA is cheap, panels are not).
        ``cka_layers_a=None``: the panel layers; ``cka_layers_b=None``: the
        same names as ``cka_layers_a`` when that is given, else B's panel layers.

    Returns
    -------
    CompareResult
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    _check_same_images(data_a, data_b)
    names_a = resolve_layers(model_a, layers_a)
    names_b = resolve_layers(model_b, layers_b if layers_b is not None else layers_a)
    cka_a = names_a if cka_layers_a is None else resolve_layers(model_a, cka_layers_a)
    if cka_layers_b is not None:
        cka_b = resolve_layers(model_b, cka_layers_b)
    else:
        cka_b = names_b if cka_layers_a is None else resolve_layers(model_b, cka_layers_a)
    sides = (("a", model_a, data_a, names_a, cka_a, id_a), ("b", model_b, data_b, names_b, cka_b, id_b))
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    vis_a, vis_b = (visualize(model, data, out_dir / f"{side}-{slug(mid)}", names, channels=channels, k=k,
                              methods=methods, model_id=mid, batch_size=batch_size, device=device, progress=progress)
                    for side, model, data, names, _, mid in sides)
    timings["visualize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    (grams_a, idx_a), (grams_b, idx_b) = (
        layer_grams(model, data, names, grid=grid, batch_size=batch_size, device=device, progress=progress,
                    desc=f"CKA features {mid}") for _, model, data, _, names, mid in sides)
    cka, n_images = _cka_on_common_images(grams_a, idx_a, grams_b, idx_b)
    timings["cka"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = CompareResult(out_dir=out_dir, layers_a=names_a, layers_b=names_b, cka=cka, n_images=n_images,
                           cka_layers_a=cka_a, cka_layers_b=cka_b,
                           notes={**{f"A {n}": v for n, v in vis_a.notes.items()},
                                  **{f"B {n}": v for n, v in vis_b.notes.items()}})
    _write_side_by_side(result, vis_a, vis_b, methods, id_a, id_b)
    result.heatmap_path = write_atomic(out_dir / "cka.png", _heatmap_png(cka, cka_a, cka_b, id_a, id_b, n_images))
    result.json_path = write_atomic(out_dir / "compare.json", json.dumps(_summary(result, id_a, id_b, grid), indent=1) + "\n")
    timings["drawing"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    result.timings = timings
    return result


def _check_same_images(data_a: IndexedImages, data_b: IndexedImages) -> None:
    """``ValueError`` unless the two datasets hold the same items (checked on file paths where known)."""
    if len(data_a) != len(data_b):
        raise ValueError(f"the two models must see the same images: {len(data_a)} vs {len(data_b)} items")
    # A --limit subset keeps the full dataset's indices (SubsetImages.indices).
    ids_a = list(getattr(data_a, "indices", range(len(data_a))))
    ids_b = list(getattr(data_b, "indices", range(len(data_b))))
    if ids_a != ids_b:
        raise ValueError("the two datasets hold different items; open the same folder with the same --limit for both")
    for i in ids_a[:50]:
        pa, pb = data_a.path(i), data_b.path(i)
        if pa != pb:
            raise ValueError(f"the two datasets differ at item {i} ({pa} vs {pb}); open the same folder for both")


def _cka_on_common_images(grams_a: list[torch.Tensor], idx_a: list[int], grams_b: list[torch.Tensor],
                          idx_b: list[int]) -> tuple[torch.Tensor, int]:
    """The CKA matrix over the images both sides read, and their number."""
    if idx_a != idx_b:
        # Unreadable images skipped on one side only: keep the images both saw.
        common = sorted(set(idx_a) & set(idx_b))
        ra = torch.tensor([idx_a.index(i) for i in common])
        rb = torch.tensor([idx_b.index(i) for i in common])
        grams_a = [g[ra][:, ra] for g in grams_a]
        grams_b = [g[rb][:, rb] for g in grams_b]
        idx_a = common
    return cka_matrix(grams_a, grams_b), len(idx_a)


def _write_side_by_side(result: CompareResult, vis_a: VisualizeResult, vis_b: VisualizeResult,
                        methods: Sequence[str], id_a: str, id_b: str) -> None:
    """One side-by-side panel per paired layer and method, into ``result.out_dir`` and ``result.panels``."""
    for la, lb in zip(result.layers_a, result.layers_b):
        for method in methods:
            fig = side_by_side(vis_a.panels[(la, method)], vis_b.panels[(lb, method)],
                               f"{id_a} {la}", f"{id_b} {lb}")
            path = result.out_dir / f"compare_{slug(la)}_vs_{slug(lb)}_{method}.png"
            write_atomic(path, encode_figure(fig, "png"))
            result.panels[(la, lb, method)] = path


def _summary(result: CompareResult, id_a: str, id_b: str, grid: int) -> dict:
    """What ``compare.json`` holds."""
    out_dir = result.out_dir
    return {
        "format": "cnn-internals.compare/1",
        "a": {"model_id": id_a, "layers": result.layers_a,
              "gallery": str((out_dir / f"a-{slug(id_a)}" / "index.html").relative_to(out_dir))},
        "b": {"model_id": id_b, "layers": result.layers_b,
              "gallery": str((out_dir / f"b-{slug(id_b)}" / "index.html").relative_to(out_dir))},
        "n_images": result.n_images,
        "cka": {"kind": "linear", "pool_grid": grid, "rows": result.cka_layers_a, "cols": result.cka_layers_b,
                "values": [[round(float(v), 6) for v in row] for row in result.cka]},
        "channels": "same channel indices on both sides (not matched)",
        "panels": [{"a": la, "b": lb, "method": m, "file": p.name} for (la, lb, m), p in result.panels.items()],
        "heatmap": "cka.png",
    }

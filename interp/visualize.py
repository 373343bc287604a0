"""The whole job: mine once, project, draw panels, write the gallery.

:func:`visualize` is what ``cnn-internals visualize`` and ``cnn-internals
demo`` run. For a model and an :class:`interp.data.IndexedImages` it

1. mines the top-k images of the requested channels of every layer in one
   pass (:func:`interp.mine`), unless a saved :class:`TopK` is given;
2. per layer, projects all its top-k units back to pixels, one
   :func:`interp.project` call per method (batched inside);
3. draws one seed-style panel per layer and method
   (``<model>_<layer>_<method>.png``), and writes the tiles the gallery shows;
4. writes ``topk.json``, ``gallery.json`` and ``index.html``.

It returns the files written and the time spent mining / projecting /
drawing, so a caller can see where the time goes.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .data import IndexedImages
from .mine import eval_mode, mine, on_device, resolve_layers
from .panels import _encode, panel_tiles, render_panel, to_uint8
from .topk import TopK, write_atomic

__all__ = ["visualize", "VisualizeResult", "METHODS", "slug"]

METHODS = ("guided", "deconvnet", "gradient")


def slug(text: str) -> str:
    """A file-name-safe version of a model or layer name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


@dataclass
class VisualizeResult:
    """What :func:`visualize` wrote, and how long each stage took (seconds)."""

    out_dir: Path
    topk: TopK
    panels: dict[tuple[str, str], Path] = field(default_factory=dict)
    topk_path: Path | None = None
    index_path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _tile_bytes(tile: np.ndarray, max_px: int | None = 128) -> tuple[bytes, str]:
    """Encode a gallery tile: PNG for small fields (exact pixels), JPEG otherwise.

    Tiles larger than ``max_px`` are shrunk (the page shows them at 64 px);
    that keeps a ResNet all-conv gallery at a few MB instead of tens.
    """
    import io

    from PIL import Image

    img = Image.fromarray(to_uint8(tile))
    if max_px is not None and max(img.size) > max_px:
        s = max_px / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.LANCZOS)
    buf = io.BytesIO()
    if max(tile.shape[:2]) <= 64:
        img.save(buf, format="PNG", optimize=True)
        return buf.getvalue(), "png"
    img.save(buf, format="JPEG", quality=88)
    return buf.getvalue(), "jpg"


def visualize(
    model: nn.Module,
    data: IndexedImages,
    out_dir: str | Path,
    layers: str | Sequence[str] = "all-conv",
    *,
    channels: Sequence[int] | None = None,
    k: int = 9,
    methods: Sequence[str] = ("guided",),
    model_id: str = "model",
    batch_size: int = 64,
    project_batch_size: int | None = None,
    device: str | torch.device | None = None,
    topk: TopK | None = None,
    progress: bool = True,
    web: str | None = None,
    num_workers: int = 0,
) -> VisualizeResult:
    """Mine, project and draw panels plus an HTML gallery into ``out_dir``.

    Parameters
    ----------
    model:
        Any ``torch.nn.Module`` (left exactly as it was).
    data:
        The images, with the model's preprocessing (:func:`interp.data.open_images`,
        :class:`interp.data.ArrayImages`), or an ``N x C x H x W`` tensor of
        model inputs (then shown min-max rescaled).
    out_dir:
        Output folder (created).
    layers:
        Conv layer names, a comma-separated string or ``"all-conv"``.
    channels, k, batch_size, device, num_workers:
        As for :func:`interp.mine` (``channels=None``: the first 6).
    methods:
        Projection methods: ``"guided"``, ``"deconvnet"``, ``"gradient"``.
    model_id:
        Used in file names and titles.
    project_batch_size:
        Units per projection pass (default: the engine's).
    topk:
        A saved mining result (:meth:`TopK.load`): skips mining and redraws.
    web:
        Also write each panel as ``"webp"`` or ``"jpg"``.

    Returns
    -------
    VisualizeResult
        Files written and ``timings`` with ``mining``, ``projection``,
        ``drawing`` and ``total`` seconds.
    """
    from .data import TensorImages
    from .gallery import write_gallery
    from .project import project

    if isinstance(data, torch.Tensor):
        data = TensorImages(data)
    if not isinstance(data, IndexedImages):
        raise TypeError(
            "visualize needs an interp.data dataset (open_images(path, preprocess), ArrayImages, TensorImages) "
            f"or an N x C x H x W tensor, got {type(data).__name__}"
        )

    t_start = time.perf_counter()
    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown method(s) {bad or methods}; choose from {', '.join(METHODS)}")
    out_dir = Path(out_dir)
    timings = {"mining": 0.0, "projection": 0.0, "drawing": 0.0}

    if topk is None:
        names = resolve_layers(model, layers)
        modules = dict(model.named_modules())
        not_conv = [n for n in names if not isinstance(modules.get(n), nn.Conv2d)]
        if not_conv:
            raise ValueError(
                f"panels are drawn for conv layers; {', '.join(not_conv)} "
                f"{'is' if len(not_conv) == 1 else 'are'} not nn.Conv2d (use --layers all-conv or conv names)"
            )
        t0 = time.perf_counter()
        topk = mine(model, data, names, channels=channels, k=k, batch_size=batch_size, device=device,
                    model_id=model_id, progress=progress, num_workers=num_workers)
        timings["mining"] = time.perf_counter() - t0
    else:
        names = list(topk.layers) if layers == "all-conv" else resolve_layers(model, layers)
        for n in names:
            topk.layer(n)  # clear error for a layer the file does not hold
        if topk.model_id and model_id == "model":
            model_id = topk.model_id

    result = VisualizeResult(out_dir=out_dir, topk=topk)
    manifest: dict = {
        "format": "cnn-internals.gallery/1",
        "model_id": model_id,
        "methods": methods,
        "input_size": list(topk.input_size),
        "n_images": topk.n_images,
        "k": topk.k,
        "layers": [],
    }
    written_inputs: dict[int, str] = {}
    from tqdm.auto import tqdm

    with eval_mode(model), on_device(model, device) as dev:
        for name in tqdm(names, desc="projecting + drawing", unit="layer", disable=not progress, leave=False):
            info = topk.layer(name)
            indices = topk.image_indices(name)
            local = {idx: i for i, idx in enumerate(indices)}
            xs = torch.stack([data.item(idx) for idx in indices]).to(dev)
            units = [(local[n], c, y, x) for n, c, y, x in topk.units(name)]
            raws = {idx: data.raw(idx) for idx in indices}
            layer_entry: dict = {"name": name, "number": info.number, "panels": {}, "channels": []}
            tiles_by_method = {}
            for method in methods:
                t0 = time.perf_counter()
                proj = project(model, xs, name, units, method=method, batch_size=project_batch_size)
                timings["projection"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                tiles = panel_tiles(topk, name, proj.cpu(), raws)
                fig = render_panel(tiles, method=method)
                path = out_dir / f"{slug(model_id)}_{slug(name)}_{method}.png"
                write_atomic(path, _encode(fig, "png"))
                if web:
                    write_atomic(path.with_suffix("." + web), _encode(fig, web))
                result.panels[(name, method)] = path
                layer_entry["panels"][method] = path.name
                tiles_by_method[method] = tiles
                timings["drawing"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            first = tiles_by_method[methods[0]]
            layer_entry["title"] = first.title
            layer_entry["tile_size"] = list(first.tile_size)
            assets = Path("assets") / slug(name)
            for b, c in enumerate(first.channels):
                ch = {"channel": c, "tiles": []}
                for r, e in enumerate(first.entries[b]):
                    if e.index not in written_inputs:
                        blob, ext = _tile_bytes(raws[e.index], max_px=None)
                        rel = Path("assets") / "inputs" / f"{e.index}.{ext}"
                        write_atomic(out_dir / rel, blob)
                        written_inputs[e.index] = rel.as_posix()
                    blob, ext = _tile_bytes(first.crops[b][r])
                    crop_rel = assets / "crops" / f"c{c}_r{r}.{ext}"
                    write_atomic(out_dir / crop_rel, blob)
                    projs = {}
                    for method in methods:
                        blob, ext = _tile_bytes(tiles_by_method[method].proj[b][r])
                        rel = assets / method / f"c{c}_r{r}.{ext}"
                        write_atomic(out_dir / rel, blob)
                        projs[method] = rel.as_posix()
                    ch["tiles"].append({
                        "rank": r, "index": e.index, "y": e.y, "x": e.x, "value": e.value,
                        "label": data.describe(e.index), "box": list(first.boxes[b][r]),
                        "input": written_inputs[e.index], "crop": crop_rel.as_posix(), "proj": projs,
                    })
                layer_entry["channels"].append(ch)
            manifest["layers"].append(layer_entry)
            timings["drawing"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    result.topk_path = topk.save(out_dir / "topk.json")
    import json

    write_atomic(out_dir / "gallery.json", json.dumps(manifest, indent=1) + "\n")
    result.index_path = write_gallery(out_dir)
    timings["drawing"] += time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    result.timings = timings
    return result

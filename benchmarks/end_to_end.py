"""End-to-end benchmark: the ``visualize`` pipeline vs the original's.

Ours is :func:`interp.visualize` (what ``cnn-internals visualize resnet18``
runs): one mining pass over all conv layers, one batched ``interp.project``
per layer, panels and the HTML gallery drawn and written. Its own timings
split the wall time into mining / projection / drawing.

The original-style pipeline does the same work the way the original
notebook did: one full data pass per layer (decoding the images again each
time) to find the top-k, then one full forward and one backward per unit.
It draws nothing, so its total is a lower bound of the original's. The top-k
values of the two pipelines are compared.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import adapters
import interp
from interp.data import collate_skipping, open_images
from interp.layers import resolve_layer
from interp.project import forward_to

from .common import Row, check, max_rel_diff, median, no_inplace_copy, sync
from .mining import topk_values
from .projection import naive_per_unit

DEFAULT_DATA = Path(os.environ.get("CNN_INTERNALS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@dataclass
class Settings:
    """Sizes and repeat counts of one run."""

    limit: int | None = None  # None: all 3,925 val images
    channels: int = 6
    k: int = 9
    batch_size: int = 64
    repeats: int = 1
    seed: int = 0
    workers: int = 0  # DataLoader workers decoding images, in both pipelines


FULL = Settings()
QUICK = Settings(limit=24, channels=2, k=3)


def _loader(data, batch_size: int, workers: int = 0):
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_skipping,
                                       num_workers=workers)


def original_pipeline(model: nn.Module, data, layers: list[str], channels: int, k: int, batch_size: int,
                      device: torch.device, workers: int = 0) -> tuple[dict, torch.Tensor]:
    """Mine one layer per data pass, then one forward+backward per unit; timings and top-k values."""
    modules = dict(model.named_modules())
    # The per-unit loop hooks a layer output that a later in-place op could
    # overwrite; the copy computes the same values without in-place ops.
    hooked = no_inplace_copy(model)
    timings = {"mining": 0.0, "loading": 0.0, "projection": 0.0, "drawing": 0.0}
    values = []
    per_layer_units = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for name in layers:
            maxima: list[torch.Tensor] = []
            argmax: list[torch.Tensor] = []
            indices: list[torch.Tensor] = []

            def hook(m, i, o):
                flat = o[:, :channels].flatten(2)
                v, p = flat.max(dim=2)
                maxima.append(v)
                argmax.append(p)

            handle = modules[name].register_forward_hook(hook)
            try:
                for batch in _loader(data, batch_size, workers):
                    if batch is None:
                        continue
                    xs, idx = batch
                    indices.append(idx)
                    model(xs.to(device))
            finally:
                handle.remove()
            vals, pos, idx = torch.cat(maxima).t(), torch.cat(argmax).t(), torch.cat(indices)
            top = vals.topk(min(k, vals.shape[1]), dim=1)
            values.append(top.values.cpu())
            width = modules_out_width(model, name, data, device)
            per_layer_units[name] = [(int(idx[j]), c, int(pos[c, j]) // width, int(pos[c, j]) % width)
                                     for c in range(channels) for j in top.indices[c].tolist()]
    sync(device)
    timings["mining"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for name, units in per_layer_units.items():
        order = sorted({u[0] for u in units})
        local = {i: n for n, i in enumerate(order)}
        xs = torch.stack([data.item(i) for i in order]).to(device)
        naive_per_unit(hooked, name, xs, [(local[n], c, y, x) for n, c, y, x in units], "guided")
    sync(device)
    timings["projection"] = time.perf_counter() - t0
    timings["total"] = timings["mining"] + timings["projection"]
    return timings, torch.stack(values)


_WIDTHS: dict = {}


def modules_out_width(model: nn.Module, name: str, data, device: torch.device) -> int:
    """Output width of layer ``name`` for the data's image size (one probe per layer, cached)."""
    key = (id(model), name)
    if key not in _WIDTHS:
        with torch.no_grad():
            _WIDTHS[key] = forward_to(model, resolve_layer(model, name), data.item(0)[None].to(device)).shape[-1]
    return _WIDTHS[key]


def run(device: torch.device, quick: bool = False, settings: Settings | None = None, data_root: Path | None = None,
        log=print) -> list[Row]:
    """Run the end-to-end benchmark on Imagenette val; return its rows."""
    s = settings or (QUICK if quick else FULL)
    root = Path(data_root or DEFAULT_DATA) / "imagenette2-160"
    if not root.is_dir():
        raise FileNotFoundError(f"Imagenette not found at {root}; pass --data or set CNN_INTERNALS_DATA")
    torch.manual_seed(s.seed)
    model, preprocess = adapters.load("resnet18")
    model = model.to(device).eval()
    data = open_images(root, preprocess, split="val", limit=s.limit)
    layers = list(interp.conv_layers(model))
    chans = list(range(s.channels))
    n_units = len(layers) * s.channels * s.k
    log(f"e2e: resnet18, {len(layers)} convs x {s.channels} channels x top-{s.k}, {len(data)} val images ...")
    ours_t, orig_t, ours_vals, orig_vals = [], [], None, None
    for _ in range(s.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = interp.visualize(model, data, tmp, layers, channels=chans, k=s.k, methods=("guided",),
                                   model_id="resnet18", batch_size=s.batch_size, device=device, progress=False,
                                   num_workers=s.workers)
            sync(device)
            wall = time.perf_counter() - t0
        ours_t.append(dict(res.timings, wall=wall))
        ours_vals = topk_values(res.topk, layers)
        t0 = time.perf_counter()
        timings, orig_vals = original_pipeline(model, data, layers, s.channels, s.k, s.batch_size, device,
                                                   s.workers)
        orig_t.append(dict(timings, wall=time.perf_counter() - t0))
    case = f"resnet18 {len(layers)} convs x {s.channels} ch x top-{s.k} ({n_units} units), {len(data)} val img"
    rows = []
    ours_wall = median([t["wall"] for t in ours_t])
    for name, ts, vals in (("ours (visualize)", ours_t, None), ("original-style (no drawing)", orig_t, orig_vals)):
        wall = median([t["wall"] for t in ts])
        diff = None if vals is None else max_rel_diff(vals, ours_vals)
        status, note = check(diff)
        split = {key: median([t.get(key, 0.0) for t in ts]) for key in ("mining", "loading", "projection", "drawing")}
        rows.append(Row(bench="e2e", case=case, impl=name, median_s=wall, times_s=[round(t["wall"], 3) for t in ts],
                        ratio=None if vals is None else ours_wall / wall, max_rel_diff=diff, status=status,
                        note=note, extra={k: round(v, 3) for k, v in split.items()}))
    return rows


def markdown_split(rows: list[Row]) -> str:
    """The wall-time split of the end-to-end rows as a markdown table."""
    lines = ["| impl | mining s | loading top images s | projection s | drawing s | wall s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        e = r.extra
        lines.append(f"| {r.impl} | {e['mining']:.2f} | {e.get('loading', 0.0):.2f} | {e['projection']:.2f} | "
                     f"{e['drawing']:.2f} | {r.median_s:.2f} |")
    return "\n".join(lines) + "\n"

"""A modern CNN against ResNet-18: ``interp.visualize`` cost per layer.

Runs :func:`interp.visualize` (mining, projection, drawing) over every conv
layer (``--layers all-conv``) of torchvision's EfficientNet-B0 and ResNet-18
on the same Imagenette val images, in one process, interleaved round by
round (``--repeats``) so a busy shared machine slows both alike, and prints
seconds per layer for each model (split into mining / projection / drawing)
and the EfficientNet / ResNet-18 ratio. Target of the issue: the ratio per
layer at most 1.5.

Weights are random (``weights=None``; nothing is downloaded): the work per
layer does not depend on the weights' values except through which images win
the top-k, so the timing is representative. Each model gets its own
preprocessing (torchvision's weights transforms: 224 crops for both).

Examples
--------
``python -m benchmarks.modern --images 50``
``python -m benchmarks.modern --images 4 --k 3 --channels 2`` (a smoke run)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import adapters
import interp
from interp.data import open_images
from interp.mine import resolve_layers

DEFAULT_DATA = Path(os.environ.get("CNN_INTERNALS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
MODELS = ("efficientnet_b0", "resnet18")
TARGET = 1.5


def _layers(model, spec: str) -> list[str]:
    return resolve_layers(model, spec)


def run(images: int = 50, layers: str = "all-conv", k: int = 9, channels: int = 6, repeats: int = 1,
        batch_size: int = 64, device: str = "cpu", data_root: Path | None = None, methods=("guided",),
        log=print) -> dict:
    """Time ``visualize`` for both models; return per-model seconds per layer and the ratio."""
    root = Path(data_root or DEFAULT_DATA) / "imagenette2-160"
    if not root.is_dir():
        raise FileNotFoundError(f"Imagenette not found at {root}; pass --data or set CNN_INTERNALS_DATA")
    setups = {}
    for name in MODELS:
        torch.manual_seed(0)
        model, preprocess = adapters.load(f"torchvision:{name}")
        data = open_images(root, preprocess, split="val", limit=images)
        names = _layers(model, layers)
        setups[name] = (model.eval(), data, names)
        log(f"{name}: {len(names)} layers, {len(data)} images of {tuple(data[0][0].shape)}")
    runs: dict[str, list[dict]] = {n: [] for n in MODELS}
    for r in range(repeats):
        for name in MODELS:
            model, data, names = setups[name]
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                res = interp.visualize(model, data, out, layers=names, channels=None if channels == 6 else list(range(channels)), k=k,
                                       methods=methods, model_id=name, batch_size=batch_size, device=device,
                                       progress=False)
                wall = time.perf_counter() - t0
            t = dict(res.timings)
            t["wall"] = wall
            runs[name].append(t)
            log(f"round {r + 1}/{repeats} {name}: {wall:.1f} s "
                + " ".join(f"{key} {v:.1f}" for key, v in t.items() if key in ("mining", "projection", "drawing")))
    result = {"images": images, "layers": layers, "k": k, "channels": channels, "repeats": repeats,
              "weights": "random (timing only)", "models": {}}
    for name in MODELS:
        n_layers = len(setups[name][2])
        med = {key: statistics.median(t.get(key, 0.0) for t in runs[name])
               for key in ("wall", "mining", "projection", "drawing")}
        result["models"][name] = {"layers": n_layers, "seconds": med,
                                  "per_layer": {key: v / n_layers for key, v in med.items()}}
    eff, res18 = (result["models"][n]["per_layer"] for n in MODELS)
    result["ratio_per_layer"] = {key: (eff[key] / res18[key] if res18[key] else None) for key in eff}
    return result


def table(result: dict) -> str:
    keys = ("wall", "mining", "projection", "drawing")
    lines = ["| model | layers | s/layer (total) | mining | projection | drawing |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in result["models"].items():
        pl = m["per_layer"]
        lines.append(f"| {name} | {m['layers']} | " + " | ".join(f"{pl[k]:.3f}" for k in keys) + " |")
    ratio = result["ratio_per_layer"]
    lines.append("| ratio effnet/resnet18 | | " + " | ".join(
        f"{ratio[k]:.2f}" if ratio[k] is not None else "-" for k in keys) + " |")
    verdict = "ok" if ratio["wall"] is not None and ratio["wall"] <= TARGET else "ABOVE TARGET"
    lines.append(f"\nper-layer ratio {ratio['wall']:.2f} (target <= {TARGET}): {verdict}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=50, help="Imagenette val images (spread over classes; default 50)")
    p.add_argument("--layers", default="all-conv", help="layers to visualize (default all-conv)")
    p.add_argument("--k", type=int, default=9, help="top images per channel (default 9)")
    p.add_argument("--channels", type=int, default=6, help="channels per layer (default 6)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds; the median is reported")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default=None, help="folder holding imagenette2-160 (default ../shared/data)")
    p.add_argument("--json", default=None, help="also write the result as JSON")
    a = p.parse_args(argv)
    result = run(a.images, a.layers, a.k, a.channels, a.repeats, a.batch_size, a.device,
                 Path(a.data) if a.data else None)
    print(table(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

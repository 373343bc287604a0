"""The whole ResNet-18 report vs one plain forward over the same images, in one run (issue #19).

``python -m benchmarks.report [--images N] [--data ROOT] [--no-fast] [--rounds R]`` times, on
the Imagenette val images (all 3,925 by default; ``--images N``: N of them,
spread over the classes):

report
    What ``cnn-internals visualize resnet18`` runs: ``interp.visualize`` over
    all 20 convs x 6 channels x top-9, guided, drawing included (random
    weights), with its split: mining, loading top images, projection,
    drawing.
plain forward
    A torchvision ResNet-18 (random weights) in eval mode, ``channels_last``,
    batch 64, under ``torch.no_grad()``, JPEG decoding and preprocessing
    included (the same dataset object, read in this process as mining does).

It prints both, and their ratio (target: report <= plain forward). With
``--rounds R`` the two alternate R times (forward, report, forward, ...) and
the median of the R ratios is printed too: the host is shared, and one
timing may vary by 20% between runs, so each ratio pairs two neighbouring
timings.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import adapters
import interp
from interp.data import collate_skipping, open_images
from interp.layout import as_channels_last
from interp.layout import channels_last as cl_weights

from .common import build_torchvision
from .end_to_end import DEFAULT_DATA


def plain_forward(data, batch_size: int = 64) -> float:
    """Seconds of one eager fp32 no-grad pass of a torchvision ResNet-18 over ``data`` (decoding included)."""
    model = build_torchvision("resnet18")
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_skipping)
    t0 = time.perf_counter()
    with cl_weights(model), torch.no_grad():
        for batch in loader:
            if batch is not None:
                model(as_channels_last(batch[0]))
    return time.perf_counter() - t0


def report(data, fast: bool = True) -> dict[str, float]:
    """Seconds of the whole ``visualize`` report of ResNet-18 over ``data``, split as ``interp.visualize`` does."""
    torch.manual_seed(0)
    model, _ = adapters.load("resnet18")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = interp.visualize(model, data, tmp, "all-conv", k=9, methods=("guided",), model_id="resnet18",
                               progress=False, fast=fast)
        wall = time.perf_counter() - t0
    return dict(res.timings, wall=wall)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=None, help="images to use (default: all 3,925 val images)")
    p.add_argument("--data", default=None, help="folder holding imagenette2-160 (default: ../shared/data)")
    p.add_argument("--no-fast", action="store_true", help="mine with the plain pass (interp.mine fast=False)")
    p.add_argument("--rounds", type=int, default=1, help="alternate forward and report this many times (default 1)")
    args = p.parse_args(argv)
    _, preprocess = adapters.load("resnet18")
    root = Path(args.data or DEFAULT_DATA) / "imagenette2-160"
    data = open_images(root, preprocess, split="val", limit=args.images)
    torch.manual_seed(0)
    print(f"report vs plain forward: resnet18, 20 convs x 6 ch x top-9, {len(data)} images, "
          f"{torch.get_num_threads()} threads, fast={not args.no_fast}", flush=True)
    ratios = []
    for r in range(args.rounds):
        fwd = plain_forward(data)
        print(f"[{r + 1}] plain forward (eager fp32, channels_last, batch 64, decoding included): {fwd:.1f} s",
              flush=True)
        t = report(data, fast=not args.no_fast)
        rest = t["wall"] - t["mining"] - t["loading"] - t["projection"] - t["drawing"]
        print(f"[{r + 1}] report: {t['wall']:.1f} s = mining {t['mining']:.1f} + loading {t['loading']:.1f} + "
              f"projection {t['projection']:.1f} + drawing {t['drawing']:.1f} (+ {rest:.1f} other)")
        ratios.append(t["wall"] / fwd)
        print(f"[{r + 1}] mining / plain forward: {t['mining'] / fwd:.2f}x; report / plain forward: "
              f"{ratios[-1]:.2f}x", flush=True)
    if len(ratios) > 1:
        print(f"report / plain forward over {len(ratios)} rounds: median {statistics.median(ratios):.2f}x "
              f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)")


if __name__ == "__main__":
    main()

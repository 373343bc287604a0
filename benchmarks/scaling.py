"""Scaling benchmark: how cost grows with the number of units and of images.

* Units: ``interp.project`` on one layer for 1, 6, 54 and 540 units
  (``channels x images``: 1x1, 6x1, 6x9, 60x9).
* Images: ``interp.mine`` over all conv layers for 1,000 and 4,000 images
  (seeded random images made on the fly, so memory stays flat).

For each series it prints the marginal cost (least-squares slope, seconds per
unit or per image) and the log-log exponent between the smallest and largest
size (1.0 = linear; below 1 = fixed costs being amortised).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

import interp
from interp.layers import resolve_layer
from interp.project import forward_to

from .common import Row, build_torchvision, median, seeded, sync


@dataclass
class Settings:
    """Sizes and repeat counts of one run."""

    model: str = "resnet18"
    layer: str = "layer2.1.conv2"
    size: int = 224
    units: tuple[int, ...] = (1, 6, 54, 540)
    images: tuple[int, ...] = (1000, 4000)
    batch_size: int = 64
    repeats: int = 3
    seed: int = 0


FULL = Settings()
QUICK = Settings(size=112, units=(1, 6, 54), images=(32, 128), repeats=2)


class RandomImages(torch.utils.data.Dataset):
    """``n`` seeded random images, each made when asked (index -> same image every time)."""

    def __init__(self, n: int, size: int, seed: int) -> None:
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.randn(3, self.size, self.size, generator=seeded(self.seed * 1_000_003 + i))


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope of ``ys`` over ``xs``, and the log-log exponent from the first to the last point."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    lin = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")
    expo = math.log(ys[-1] / ys[0]) / math.log(xs[-1] / xs[0]) if ys[0] > 0 and xs[-1] != xs[0] else float("nan")
    return lin, expo


def _units_for(n: int, out_channels: int, n_images: int, h: int, w: int) -> list[tuple[int, int, int, int]]:
    """``n`` units spread over channels and images at fixed interior positions (deterministic)."""
    per_img = min(n, n_images)
    chans = max(1, n // per_img)
    if chans > out_channels:
        raise ValueError(f"{n} units need {chans} channels; the layer has {out_channels}")
    return [(i, c, (3 * c + 5 * i) % h, (7 * c + 2 * i) % w) for c in range(chans) for i in range(per_img)][:n]


def run(device: torch.device, quick: bool = False, settings: Settings | None = None, log=print) -> list[Row]:
    """Time the two series; return one row per point (the slope in each row's ``extra``)."""
    s = settings or (QUICK if quick else FULL)
    model = build_torchvision(s.model, s.seed).to(device)
    images = torch.randn(9, 3, s.size, s.size, generator=seeded(s.seed + 3)).to(device)
    with torch.no_grad():
        _, out_c, h, w = forward_to(model, resolve_layer(model, s.layer), images[:1]).shape
    rows: list[Row] = []

    log(f"scaling: project {s.model} {s.layer} over {s.units} units ...")
    unit_sets = {n: _units_for(n, out_c, len(images), h, w) for n in s.units}
    interp.project(model, images, s.layer, unit_sets[s.units[0]])  # warm-up
    rows += _series(device, s.units, s.repeats, lambda n: interp.project(model, images, s.layer, unit_sets[n]),
                    case=f"project {s.model} {s.layer} {s.size}px", label="units")

    log(f"scaling: mine {s.model} all convs over {s.images} images ...")
    layers = list(interp.conv_layers(model))
    interp.mine(model, RandomImages(s.batch_size, s.size, s.seed), layers, k=9, batch_size=s.batch_size,
                device=device, progress=False)  # warm-up
    # The big sizes are long: one repeat less.
    rows += _series(device, s.images, max(1, s.repeats - 1),
                    lambda n: interp.mine(model, RandomImages(n, s.size, s.seed), layers, k=9,
                                          batch_size=s.batch_size, device=device, progress=False),
                    case=f"mine {s.model} {len(layers)} convs {s.size}px", label="images")
    return rows


def _series(device: torch.device, sizes, repeats: int, work, case: str, label: str) -> list[Row]:
    """Time ``work(n)`` for every size, interleaved over sizes like every other benchmark; one row per size."""
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(repeats):
        for n in sizes:
            sync(device)
            t0 = time.perf_counter()
            work(n)
            sync(device)
            times[n].append(time.perf_counter() - t0)
    meds = [median(times[n]) for n in sizes]
    lin, expo = slope([float(n) for n in sizes], meds)
    return [Row(bench="scaling", case=case, impl=f"{n} {label}", median_s=m, times_s=[round(t, 4) for t in times[n]],
                extra={"n": n, "per_item_s": m / n, "slope_s_per_item": lin, "loglog_exponent": expo,
                       "series": label})
            for n, m in zip(sizes, meds)]

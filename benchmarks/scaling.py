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
    import interp
    from interp.layers import resolve_layer
    from interp.project import forward_to

    s = settings or (QUICK if quick else FULL)
    model = build_torchvision(s.model, s.seed).to(device)
    images = torch.randn(9, 3, s.size, s.size, generator=seeded(s.seed + 3)).to(device)
    with torch.no_grad():
        _, out_c, h, w = forward_to(model, resolve_layer(model, s.layer), images[:1]).shape
    rows: list[Row] = []

    log(f"scaling: project {s.model} {s.layer} over {s.units} units ...")
    unit_sets = {n: _units_for(n, out_c, len(images), h, w) for n in s.units}
    interp.project(model, images, s.layer, unit_sets[s.units[0]])  # warm-up
    times: dict[int, list[float]] = {n: [] for n in s.units}
    for _ in range(s.repeats):
        for n in s.units:  # interleaved over sizes, like every other benchmark
            sync(device)
            t0 = time.perf_counter()
            interp.project(model, images, s.layer, unit_sets[n])
            sync(device)
            times[n].append(time.perf_counter() - t0)
    meds = [median(times[n]) for n in s.units]
    lin, expo = slope([float(n) for n in s.units], meds)
    for n, m in zip(s.units, meds):
        rows.append(Row(bench="scaling", case=f"project {s.model} {s.layer} {s.size}px", impl=f"{n} units",
                        median_s=m, times_s=[round(t, 4) for t in times[n]],
                        extra={"n": n, "per_item_s": m / n, "slope_s_per_item": lin, "loglog_exponent": expo,
                               "series": "units"}))

    log(f"scaling: mine {s.model} all convs over {s.images} images ...")
    layers = list(interp.conv_layers(model))
    itimes: dict[int, list[float]] = {n: [] for n in s.images}
    interp.mine(model, RandomImages(s.batch_size, s.size, s.seed), layers, k=9, batch_size=s.batch_size,
                device=device, progress=False)  # warm-up
    for _ in range(max(1, s.repeats - 1)):  # the big sizes are long; one repeat less
        for n in s.images:
            sync(device)
            t0 = time.perf_counter()
            interp.mine(model, RandomImages(n, s.size, s.seed), layers, k=9, batch_size=s.batch_size, device=device,
                        progress=False)
            sync(device)
            itimes[n].append(time.perf_counter() - t0)
    meds = [median(itimes[n]) for n in s.images]
    lin, expo = slope([float(n) for n in s.images], meds)
    for n, m in zip(s.images, meds):
        rows.append(Row(bench="scaling", case=f"mine {s.model} {len(layers)} convs {s.size}px", impl=f"{n} images",
                        median_s=m, times_s=[round(t, 3) for t in itimes[n]],
                        extra={"n": n, "per_item_s": m / n, "slope_s_per_item": lin, "loglog_exponent": expo,
                               "series": "images"}))
    return rows


def markdown(rows: list[Row]) -> str:
    """Scaling rows as a markdown table with the per-series slope."""
    lines = ["| series | size | median s | s per item | slope (s per extra item) | log-log exponent |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        e = r.extra
        lines.append(f"| {r.case} | {r.impl} | {r.median_s:.3f} | {e['per_item_s']:.4f} | "
                     f"{e['slope_s_per_item']:.4f} | {e['loglog_exponent']:.2f} |")
    return "\n".join(lines) + "\n"

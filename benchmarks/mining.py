"""Mining benchmark: ``interp.mine`` over all conv layers vs a plain forward and per-layer passes.

Candidates, on the same seeded random-weight ResNet-18 and the same images:

ours
    ``interp.mine(model, images, "all-conv")``: one pass, a hook per layer,
    top-k kept on the device (receptive fields included, as users get it).
ours, no receptive fields
    The same with ``receptive_fields=False``: isolates the fixed fx-trace cost.
no-grad forward
    ``model(x)`` under ``torch.no_grad()`` over the same batches, in the
    model's own layout: what a user's plain inference pass costs.
no-grad forward, channels_last
    The same in ``channels_last``, the layout ``interp.mine`` runs in: the
    floor. Its ``ours/this`` ratio is mining's overhead (target <= 1.15).
per-layer passes
    The original's approach: one full data pass per layer, a hook taking each
    channel's per-image maximum, top-k at the end. Its top-k values are
    compared with ours.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import interp
from interp.layout import as_channels_last
from interp.layout import channels_last as cl_weights

from .common import Candidate, Row, build_torchvision, max_rel_diff, rows_from_times, seeded, time_interleaved


@dataclass
class Settings:
    """Sizes and repeat counts of one run."""

    model: str = "resnet18"
    images: int = 128
    size: int = 224
    batch_size: int = 64
    channels: int = 6
    k: int = 9
    repeats: int = 3
    repeats_per_layer: int = 1
    seed: int = 0


FULL = Settings()
QUICK = Settings(images=32, size=160, repeats=2)


def topk_values(topk, layers: list[str]) -> torch.Tensor:
    """``(layers, channels, k)`` tensor of a :class:`interp.TopK`'s values, best first."""
    out = []
    for name in layers:
        per = topk.entries[name]
        out.append(torch.tensor([[e.value for e in per[c]] for c in sorted(per)]))
    return torch.stack(out)


def per_layer_passes(model: nn.Module, images: torch.Tensor, layers: list[str], channels: int, k: int,
                     batch_size: int) -> torch.Tensor:
    """The original's mining: one full no-grad data pass per layer; ``(layers, channels, k)`` values."""
    modules = dict(model.named_modules())
    out = []
    with torch.no_grad():
        for name in layers:
            maxima: list[torch.Tensor] = []
            handle = modules[name].register_forward_hook(
                lambda m, i, o: maxima.append(o[:, :channels].amax(dim=(2, 3))))
            try:
                for s in range(0, len(images), batch_size):
                    model(images[s : s + batch_size])
            finally:
                handle.remove()
            vals = torch.cat(maxima).t()  # (channels, N)
            out.append(vals.topk(min(k, vals.shape[1]), dim=1).values)
    return torch.stack(out)


def no_grad_forward(model: nn.Module, images: torch.Tensor, batch_size: int, channels_last: bool = False) -> None:
    """A plain inference pass over ``images`` (optionally ``channels_last``): the cost floor of any mining."""
    with torch.no_grad(), cl_weights(model, channels_last):
        for s in range(0, len(images), batch_size):
            model(as_channels_last(images[s : s + batch_size], channels_last))


def run(device: torch.device, quick: bool = False, settings: Settings | None = None, log=print) -> list[Row]:
    """Run the mining benchmark; return its rows."""
    s = settings or (QUICK if quick else FULL)
    model = build_torchvision(s.model, s.seed).to(device)
    layers = list(interp.conv_layers(model))
    images = torch.randn(s.images, 3, s.size, s.size, generator=seeded(s.seed + 2)).to(device)
    chans = list(range(s.channels))
    log(f"mining: {s.model}, {len(layers)} conv layers, {s.images} images at {s.size}px ...")

    def ours(rf: bool = True):
        return interp.mine(model, images, layers, channels=chans, k=s.k, batch_size=s.batch_size, device=device,
                           progress=False, receptive_fields=rf)

    few = images[: s.batch_size]
    cands = [
        Candidate("ours", ours, s.repeats),
        Candidate("ours, no receptive fields", lambda: ours(False), s.repeats),
        Candidate("no-grad forward", lambda: no_grad_forward(model, images, s.batch_size), s.repeats),
        Candidate("no-grad forward, channels_last", lambda: no_grad_forward(model, images, s.batch_size, True),
                  s.repeats),
        Candidate("per-layer passes", lambda: per_layer_passes(model, images, layers, s.channels, s.k, s.batch_size),
                  s.repeats_per_layer,
                  warmup=lambda: per_layer_passes(model, few, layers[:1], s.channels, s.k, s.batch_size)),
    ]
    times, results = time_interleaved(cands, device)
    ref = topk_values(results["ours"], layers)
    diffs = {
        "ours, no receptive fields": max_rel_diff(topk_values(results["ours, no receptive fields"], layers), ref),
        "per-layer passes": max_rel_diff(results["per-layer passes"].cpu(), ref),
    }
    case = f"{s.model} all {len(layers)} convs, {s.images} img {s.size}px, batch {s.batch_size}"
    rows = rows_from_times("mining", case, times, "ours", diffs)
    for r in rows:
        r.extra["images_per_s"] = s.images / r.median_s
    return rows

"""Projection benchmark: ``interp.project`` vs Captum, zennit and a naive loop.

One case is a model, a layer and a method. Its unit set is the seed's:
6 channels x 9 distinct images = 54 units, each at its channel's strongest
position in that image (what mining would pick). Candidates, all on the same
seeded random-weight model and images:

ours
    ``interp.project`` with all 54 units in one call (its defaults).
captum per-unit
    ``NeuronGuidedBackprop`` / ``NeuronDeconvolution`` called once per unit,
    which is how Captum is used for this job.
zennit batched (guided only)
    zennit's ``GuidedBackprop`` composite on the 54-image batch, forward cut
    at the layer (a hook stops it, which only helps zennit), one backward
    with a one-hot gradient at the layer.
naive per-unit
    The original notebook's way: one full forward (a hook keeps the layer
    output) and one backward per unit. It uses the engine's rule so it is an
    independent *cost* baseline and a strict *value* reference on every
    model, including those where Captum's and zennit's ``nn.ReLU`` module
    hooks miss the nonlinearities (GoogLeNet's ``F.relu``, MobileNet's
    ``nn.ReLU6``): those two comparisons are reported as labelled notes.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

import interp
from interp.layers import resolve_layer
from interp.project import forward_to
from interp.rules import RuleMode

from . import common
from .common import (Candidate, Row, build_torchvision, no_inplace_copy, row_rel_diffs, rows_from_times, seeded,
                     time_interleaved)

# (model, layer) pairs of the full run: early and late layers of the models.
CASES: tuple[tuple[str, str], ...] = (
    ("vgg16", "features.12"),
    ("vgg16", "features.28"),
    ("resnet18", "layer2.1.conv2"),
    ("resnet18", "layer4.1.conv2"),
    ("googlenet", "inception4c"),
    ("mobilenet_v2", "features.7"),
)
# Quick: the per-unit baselines run a full forward per unit, which makes
# VGG-16 alone take minutes on two cores; ResNet-18 keeps one early-ish case.
QUICK_CASES: tuple[tuple[str, str], ...] = (("resnet18", "layer2.1.conv2"),)

# Why a baseline's values legitimately differ from ours on some models.
KNOWN_RULE_GAPS = {
    "googlenet": "known rule gap: GoogLeNet uses F.relu, which Captum/zennit nn.ReLU hooks miss (plain gradient there)",
    "mobilenet_v2": "known rule gap: nn.ReLU6 is not nn.ReLU, so Captum/zennit keep its plain gradient",
}


@dataclass
class Settings:
    """Sizes and repeat counts of one run."""

    size: int = 224
    channels: int = 6
    images: int = 9
    repeats_ours: int = 5
    repeats_baseline: int = 3
    repeats_naive: int = 2
    seed: int = 0
    dtype: str = "float32"  # "float64": every candidate in double precision (near-ties of fp32 vanish)


FULL = Settings()
QUICK = Settings(size=112, repeats_ours=3, repeats_baseline=2, repeats_naive=1)


def module_at(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (clear error if absent)."""
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"model has no module {name!r}")
    return modules[name]


def make_units(model: nn.Module, layer: str, images: torch.Tensor, channels: int) -> list[tuple[int, int, int, int]]:
    """``channels`` x ``len(images)`` units: each channel at its strongest position in each image.

    The channels are the first ones whose maximum is positive on every image:
    a dead channel (possible with random weights) projects to all zeros and
    would make every comparison trivially exact.
    """
    with torch.no_grad():
        out = forward_to(model, resolve_layer(model, layer), images)
    _, n_chan, _, w = out.shape
    alive = (out.amax(dim=(2, 3)) > 0).all(dim=0).nonzero().flatten().tolist()
    chosen = (alive + [c for c in range(n_chan) if c not in alive])[:channels]
    units = []
    for c in chosen:
        flat = out[:, c].reshape(len(images), -1).argmax(dim=1)
        for n in range(len(images)):
            y, x = divmod(int(flat[n]), w)
            units.append((n, c, y, x))
    return units


def captum_per_unit(model: nn.Module, layer: str, images: torch.Tensor, units, method: str) -> torch.Tensor:
    """Captum's neuron attribution, one ``attribute`` call per unit."""
    from captum.attr import NeuronDeconvolution, NeuronGuidedBackprop

    cls = {"guided": NeuronGuidedBackprop, "deconvnet": NeuronDeconvolution}[method]
    attr = cls(model, module_at(model, layer))
    with warnings.catch_warnings():
        # Captum warns on every call that it sets ReLU hooks and input grads.
        warnings.simplefilter("ignore", UserWarning)
        rows = [attr.attribute(images[n : n + 1], neuron_selector=(c, y, x)) for n, c, y, x in units]
    return torch.cat(rows)


class _Stop(Exception):
    """Ends a forward pass once the hooked layer has run."""


def zennit_batched(model: nn.Module, layer: str, images: torch.Tensor, units) -> torch.Tensor:
    """zennit's guided-backprop composite: one batch of all units, one backward with a one-hot gradient."""
    from zennit.composites import GuidedBackprop

    idx = torch.tensor([u[0] for u in units], device=images.device)
    x = images.index_select(0, idx).clone().requires_grad_(True)
    captured: list[torch.Tensor] = []

    def hook(module, inputs, output):
        captured.append(output)
        raise _Stop

    handle = module_at(model, layer).register_forward_hook(hook)
    try:
        with GuidedBackprop().context(model) as modified:
            try:
                modified(x)
            except _Stop:
                pass
            out = captured[0]
            one_hot = torch.zeros_like(out)
            rows = torch.arange(len(units), device=out.device)
            c, y, xx = (torch.tensor([u[k] for u in units], device=out.device) for k in (1, 2, 3))
            one_hot[rows, c, y, xx] = 1.0
            (grad,) = torch.autograd.grad(out, x, grad_outputs=one_hot)
    finally:
        handle.remove()
    return grad


def naive_per_unit(model: nn.Module, layer: str, images: torch.Tensor, units, method: str) -> torch.Tensor:
    """The original notebook's loop: a full forward and a backward per unit."""
    captured: list[torch.Tensor] = []
    handle = module_at(model, layer).register_forward_hook(lambda m, i, o: captured.append(o))
    rows = []
    try:
        for n, c, y, x in units:
            captured.clear()
            leaf = images[n : n + 1].clone().requires_grad_(True)
            with RuleMode(method) if method != "gradient" else contextlib.nullcontext():
                model(leaf.clone())
            (g,) = torch.autograd.grad(captured[0][0, c, y, x], leaf)
            rows.append(g)
    finally:
        handle.remove()
    return torch.cat(rows)


def run_case(model_name: str, layer: str, method: str, device: torch.device, s: Settings,
             zennit: bool = True, model: nn.Module | None = None) -> list[Row]:
    """Time and compare every candidate on one (model, layer, method)."""
    if model is None:
        model = build_torchvision(model_name, s.seed)
    dtype = getattr(torch, s.dtype)
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # inference only: nobody should pay for weight gradients
    images = torch.randn(s.images, 3, s.size, s.size, generator=seeded(s.seed + 1)).to(device=device, dtype=dtype)
    units = make_units(model, layer, images, s.channels)
    hooked = no_inplace_copy(model)

    cands = [Candidate("ours", lambda: interp.project(model, images, layer, units, method=method), s.repeats_ours)]
    if method in ("guided", "deconvnet"):
        cands.append(Candidate("captum per-unit", lambda: captum_per_unit(hooked, layer, images, units, method),
                               s.repeats_baseline,
                               warmup=lambda: captum_per_unit(hooked, layer, images, units[:2], method)))
    if zennit and method == "guided":
        cands.append(Candidate("zennit batched", lambda: zennit_batched(hooked, layer, images, units),
                               s.repeats_baseline, warmup=lambda: zennit_batched(hooked, layer, images, units[:2])))
    cands.append(Candidate("naive per-unit", lambda: naive_per_unit(hooked, layer, images, units, method),
                           s.repeats_naive, warmup=lambda: naive_per_unit(hooked, layer, images, units[:1], method)))
    times, results = time_interleaved(cands, device)
    ours = results["ours"]
    per_row = {name: row_rel_diffs(ours, res) for name, res in results.items() if name != "ours"}
    diffs = {name: float(r.max()) for name, r in per_row.items()}
    over = {name: (int((r > common.TOLERANCE).sum()), len(r)) for name, r in per_row.items()}
    gap = KNOWN_RULE_GAPS.get(model_name, "") if method != "gradient" else ""
    notes = {name: gap for name in diffs if gap and name in ("captum per-unit", "zennit batched")}
    case = f"{model_name} {layer} {method} ({len(units)} units, {s.size}px" + (
        f", {s.dtype})" if s.dtype != "float32" else ")")
    return rows_from_times("projection", case, times, "ours", diffs, notes, over)


def run(device: torch.device, quick: bool = False, cases=None, methods=None, settings: Settings | None = None,
        log=print) -> list[Row]:
    """Run the projection benchmark over ``cases`` x ``methods``; return all rows."""
    s = settings or (QUICK if quick else FULL)
    cases = cases or (QUICK_CASES if quick else CASES)
    methods = methods or (("guided",) if quick else ("guided", "deconvnet"))
    try:
        import zennit  # noqa: F401
        have_zennit = True
    except ImportError:
        have_zennit = False
        log("projection: zennit is not installed (pip install 'cnn-internals[bench]'); skipping its rows")
    rows: list[Row] = []
    for model_name, layer in cases:
        model = build_torchvision(model_name, s.seed)
        for method in methods:
            log(f"projection: {model_name} {layer} {method} ...")
            case_rows = run_case(model_name, layer, method, device, s, zennit=have_zennit, model=model)
            # One line per case as soon as it is measured: a run cut short still tells its numbers.
            log("  " + "; ".join(f"{r.impl} {r.median_s:.4f} s" + (f" (ours {1 / r.ratio:.1f}x faster)" if r.ratio else "")
                                 for r in case_rows))
            rows += case_rows
    return rows

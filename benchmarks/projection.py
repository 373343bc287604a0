"""Projection benchmark: ``interp.project`` vs Captum, zennit and a naive loop.

One case is a model, a layer and a method. Two unit sets (``Settings.unit_set``):

shared (default)
    The seed's: 6 channels x 9 images = 54 units, each at its channel's
    strongest position in that image (what mining would pick); every image
    carries 6 units, which can share its forward.
distinct
    54 units on 54 distinct images (6 channels x 9 images each): what top-k
    mining over a data set usually returns, where no two units share an
    image and nothing can share a forward.

With ``Settings.flops`` each case also counts the FLOPs (``FlopCounterMode``:
convolutions and matrix products) of ours and of Captum's per-unit calls; their
ratio is the arithmetic bound on ours' speed-up over Captum.

Candidates, all on the same seeded random-weight model and images:

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
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

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
    unit_set: str = "shared"  # "shared": channels x images units; "distinct": one image per unit
    flops: bool = False  # also count the FLOPs of ours and of Captum per unit
    skip: tuple[str, ...] = ()  # baselines left out: "zennit", "naive" (Captum is the comparison: never skipped)


UNIT_SETS = ("shared", "distinct")


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


def make_units_distinct(model: nn.Module, layer: str, images: torch.Tensor,
                        channels: int) -> list[tuple[int, int, int, int]]:
    """``len(images)`` units, one per image: channel ``k`` takes the ``k``-th block of images.

    ``images`` holds ``channels`` blocks of equal size; each unit sits at its
    channel's strongest position in its own image (channels chosen as in
    :func:`make_units`).
    """
    per = len(images) // channels
    shared = make_units(model, layer, images, channels)
    # make_units lists channel-major: unit (n, c) for every image n of channel block k.
    return [u for k in range(channels) for u in shared[k * len(images) + k * per: k * len(images) + (k + 1) * per]]


class _GlobalOnly(contextlib.nullcontext):
    """Stands in for ``FlopCounterMode``'s module tracker: every count goes to ``Global``.

    The tracker's own module hooks break Captum's ``autograd.grad`` ("A leaf
    node was passed to _will_engine_execute_node"); the per-module breakdown
    is not needed here.
    """

    parents = frozenset({"Global"})


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` (convolutions and matrix products, forward and backward)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    return int(counter.get_total_flops())


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
    if s.unit_set not in UNIT_SETS:
        raise ValueError(f"unknown unit set {s.unit_set!r}; choose one of {', '.join(UNIT_SETS)}")
    n_images = s.images * (s.channels if s.unit_set == "distinct" else 1)
    images = torch.randn(n_images, 3, s.size, s.size, generator=seeded(s.seed + 1)).to(device=device, dtype=dtype)
    pick = make_units_distinct if s.unit_set == "distinct" else make_units
    units = pick(model, layer, images, s.channels)
    hooked = no_inplace_copy(model)

    cands = [Candidate("ours", lambda: interp.project(model, images, layer, units, method=method), s.repeats_ours)]
    if method in ("guided", "deconvnet"):
        cands.append(Candidate("captum per-unit", lambda: captum_per_unit(hooked, layer, images, units, method),
                               s.repeats_baseline,
                               warmup=lambda: captum_per_unit(hooked, layer, images, units[:2], method)))
    if zennit and method == "guided" and "zennit" not in s.skip:
        cands.append(Candidate("zennit batched", lambda: zennit_batched(hooked, layer, images, units),
                               s.repeats_baseline, warmup=lambda: zennit_batched(hooked, layer, images, units[:2])))
    if "naive" not in s.skip:
        cands.append(Candidate("naive per-unit", lambda: naive_per_unit(hooked, layer, images, units, method),
                               s.repeats_naive, warmup=lambda: naive_per_unit(hooked, layer, images, units[:1], method)))
    times, results = time_interleaved(cands, device)
    ours = results["ours"]
    per_row = {name: row_rel_diffs(ours, res) for name, res in results.items() if name != "ours"}
    diffs = {name: float(r.max()) for name, r in per_row.items()}
    over = {name: (int((r > common.TOLERANCE).sum()), len(r)) for name, r in per_row.items()}
    gap = KNOWN_RULE_GAPS.get(model_name, "") if method != "gradient" else ""
    notes = {name: gap for name in diffs if gap and name in ("captum per-unit", "zennit batched")}
    where = f" on {n_images} images" if s.unit_set == "distinct" else ""
    case = f"{model_name} {layer} {method} ({len(units)} units{where}, {s.size}px" + (
        f", {s.dtype})" if s.dtype != "float32" else ")")
    rows = rows_from_times("projection", case, times, "ours", diffs, notes, over)
    if s.flops:
        counted = {"ours": count_flops(lambda: interp.project(model, images, layer, units, method=method))}
        if method in ("guided", "deconvnet"):
            # Every per-unit call runs the same shapes: one unit's count times the units.
            one = count_flops(lambda: captum_per_unit(hooked, layer, images, units[:1], method))
            counted["captum per-unit"] = one * len(units)
        for r in rows:
            if r.impl in counted:
                r.extra["flops"] = counted[r.impl]
                r.extra["flop_ratio"] = counted[r.impl] / counted["ours"]  # this / ours: the bound on the speed-up
    return rows


def flop_table(rows: list[Row]) -> str:
    """Markdown: FLOPs of ours and Captum per unit per case, the FLOP ratio and the measured speed-up."""
    lines = ["### Projection FLOPs (FlopCounterMode: conv + matmul, forward + backward)", "",
             "| case | ours GFLOP | captum per-unit GFLOP | FLOP ratio (bound) | measured speed-up |",
             "| --- | --- | --- | --- | --- |"]
    by_case: dict[str, dict[str, Row]] = {}
    for r in rows:
        by_case.setdefault(r.case, {})[r.impl] = r
    for case, impls in by_case.items():
        ours, cap = impls.get("ours"), impls.get("captum per-unit")
        if ours is None or cap is None or "flops" not in ours.extra or "flops" not in cap.extra:
            continue
        lines.append(f"| {case} | {ours.extra['flops'] / 1e9:.1f} | {cap.extra['flops'] / 1e9:.1f} | "
                     f"{cap.extra['flop_ratio']:.2f}× | {cap.speedup:.2f}× |")
    return "\n".join(lines) + "\n" if len(lines) > 4 else ""


def run(device: torch.device, quick: bool = False, cases=None, methods=None, settings: Settings | None = None,
        log=print, unit_sets: tuple[str, ...] | None = None) -> list[Row]:
    """Run the projection benchmark over ``cases`` x ``methods`` x ``unit_sets``; return all rows.

    ``unit_sets`` defaults to the settings' own ``unit_set``.
    """
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
            for unit_set in unit_sets or (s.unit_set,):
                log(f"projection: {model_name} {layer} {method} ({unit_set} units) ...")
                case_rows = run_case(model_name, layer, method, device, replace(s, unit_set=unit_set),
                                     zennit=have_zennit, model=model)
                # One line per case as soon as it is measured: a run cut short still tells its numbers.
                log("  " + "; ".join(_summary(r) for r in case_rows))
                rows += case_rows
    return rows


def _summary(r: Row) -> str:
    text = f"{r.impl} {r.median_s:.4f} s" + (f" (ours {1 / r.ratio:.2f}x faster)" if r.ratio else "")
    if "flops" in r.extra:
        text += f" [{r.extra['flops'] / 1e9:.1f} GFLOP" + (
            f", FLOP ratio {r.extra['flop_ratio']:.2f}x]" if r.ratio else "]")
    return text

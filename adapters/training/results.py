"""The report of ``cnn-internals reproduce``: accuracy table, panel gallery.

:func:`collect_results` reads every run's own ``log.json`` under the output
folder; :func:`results_markdown` turns the rows into the accuracy table
(last-epoch val top-1 against the targets, best epoch, minutes) and
:func:`panels_markdown` the panels into a gallery, for ``OUT/results.md``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from .recipes import RECIPES

__all__ = ["TARGETS", "slug", "collect_results", "deviations", "results_markdown", "panels_markdown"]

#: Val top-1 targets: the from-scratch recipes' own (issue #10) and the fine-tuned twins' (0.97).
TARGETS = {**{name: r.target_top1 for name, r in RECIPES.items() if r.target_top1 is not None}, "twin": 0.97}


def slug(spec: str) -> str:
    """A model spec as a folder name (``pretrained:x`` -> ``pretrained_x``)."""
    return spec.replace(":", "_").replace("/", "_")


def collect_results(out: Path, models: Iterable[str], twins: Iterable[str],
                    family: Mapping[str, str]) -> dict[str, Any]:
    """Accuracy, epochs and minutes of every run found under ``out`` (from the runs' own logs)."""
    rows = []
    for m in models:
        log = _read_json(out / "train" / m / "log.json")
        rows.append(_row(m, "from scratch" + deviations(m, log), log, m, out / "train" / m / f"{m}.json"))
    for t in twins:
        log = _read_json(out / "finetune" / slug(t) / "log.json")
        row = _row(t, "pretrained, full fine-tune", log, "twin", out / "finetune" / slug(t) / "finetune.json")
        row["family"] = family[t]
        rows.append(row)
    return {"rows": rows}


def deviations(model: str, log: dict | None) -> str:
    """``", tuned: 160 px, crop 0.35-1, batch 64"`` where a run left its recipe, else ``""``."""
    if not log or "recipe" not in log:
        return ""
    recipe, extra, faithful = log["recipe"], log.get("extra") or {}, RECIPES[model]
    parts = []
    if int(recipe.get("image_size", faithful.image_size)) != faithful.image_size:
        parts.append(f"{recipe['image_size']} px")
    if extra.get("crop_scale"):
        lo, hi = extra["crop_scale"]
        parts.append(f"crop {lo:g}-{hi:g}")
    if int(recipe.get("batch_size", faithful.batch_size)) != faithful.batch_size:
        parts.append(f"batch {recipe['batch_size']}")
    return ", tuned: " + ", ".join(parts) if parts else ""


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _row(name: str, kind: str, log: dict | None, target_key: str, final: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "kind": kind, "target_top1": TARGETS.get(target_key)}
    if not log or not log.get("epochs"):
        row["status"] = "not run"
        return row
    epochs = log["epochs"]
    planned = int(log["recipe"]["epochs"])
    last = epochs[-1]
    best = max(epochs, key=lambda e: e.get("val_top1", -1.0))
    row.update(
        status="complete" if final.is_file() and len(epochs) >= planned else f"partial ({len(epochs)}/{planned} epochs)",
        epochs=len(epochs), planned_epochs=planned, batch_size=log["recipe"]["batch_size"],
        image_size=log.get("extra", {}).get("image_size"),
        val_top1=last.get("val_top1"), val_top5=last.get("val_top5"), best_val_top1=best.get("val_top1"),
        best_epoch=epochs.index(best) + 1, train_top1=last.get("train_top1"),
        minutes=round(sum(e.get("seconds", 0.0) for e in epochs) / 60, 2), device=log.get("device"),
        amp=log.get("amp"), val_images=log.get("val_n"),
    )
    if row["target_top1"] is not None and row["val_top1"] is not None:
        row["target_met"] = row["val_top1"] >= row["target_top1"]
    return row


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def results_markdown(results: dict[str, Any]) -> str:
    """The accuracy table (last-epoch val top-1 is the reported number; best epoch in brackets)."""
    lines = ["| model | training | status | epochs | val top-1 (last) | best (epoch) | val top-5 | target | met | "
             "minutes |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["rows"]:
        if r["status"] == "not run":
            lines.append(f"| {r['model']} | {r['kind']} | not run | | | | | {_pct(r['target_top1'])} | | |")
            continue
        met = {True: "yes", False: "no"}.get(r.get("target_met"), "—")
        lines.append(
            f"| {r['model']} | {r['kind']} | {r['status']} | {r['epochs']} | {_pct(r['val_top1'])} | "
            f"{_pct(r['best_val_top1'])} ({r['best_epoch']}) | {_pct(r['val_top5'])} | {_pct(r['target_top1'])} | "
            f"{met} | {r['minutes']:.1f} |")
    return "\n".join(lines)


def panels_markdown(out: Path) -> str:
    """A markdown gallery of every panel under ``out`` (links relative to ``out``).

    Per model the original's layers in their order (``panels/MODEL/*``, the
    web copy where there is one), then each comparison: its CKA heatmap and
    side-by-side panels.
    """
    def images(folder: Path, pattern: str) -> list[Path]:
        found = {p.stem: p for p in folder.glob(pattern + ".png")}
        found.update({p.stem: p for p in folder.glob(pattern + ".webp")})  # the web copy wins
        # Network order: the conv number visualize recorded in gallery.json (panel file
        # names hold module names, e.g. inception3a.branch1.conv for conv4), else convN.
        number: dict[str, int] = {}
        try:
            for layer in json.loads((folder / "gallery.json").read_text()).get("layers", []):
                for name in dict(layer.get("panels") or {}).values():
                    number[Path(str(name)).stem] = int(layer.get("number") or 0)
        except (OSError, ValueError, TypeError):
            pass

        def order(p: Path) -> tuple:
            m = re.search(r"conv(\d+)_", p.name)
            return (number.get(p.stem, int(m.group(1)) if m else 10**6), p.name)

        return sorted(found.values(), key=order)

    lines = ["## Panels", ""]
    for folder in sorted((out / "panels").glob("*")):
        pics = images(folder, "*")
        if not pics:
            continue
        lines += [f"### {folder.name}", ""]
        lines += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in pics] + [""]
    for folder in sorted((out / "compare").glob("*")):
        pics = images(folder, "compare_*")
        cka = folder / "cka.png"
        if not pics and not cka.is_file():
            continue
        lines += [f"### {folder.name.replace('_vs_', ' vs ')}", ""]
        if cka.is_file():
            lines.append(f"![linear CKA]({cka.relative_to(out).as_posix()})")
        lines += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in pics] + [""]
    return "\n".join(lines)

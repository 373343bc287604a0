"""``cnn-internals reproduce``: the original work, end to end, in one resumable command.

1. **train** the five Imagenette models from scratch with their recipes
   (``cnn-internals train``, one process each) and fully fine-tune the
   pretrained twins whose real weights are on the machine
   (``cnn-internals finetune --full``). On a GPU the jobs share it and run
   together (``--parallel``), with bf16 autocast, channels_last and the uint8
   image cache augmented on the GPU; the cache is decoded once, here, before
   they start.
2. **panels**: the original's panels (guided backprop, the layers its README
   shows, :data:`adapters.FIGURE_LAYERS`) for every trained model
   (``cnn-internals visualize``), and for each from-scratch model with a
   fine-tuned twin the side-by-side panels plus the linear-CKA heatmap
   (``cnn-internals compare``).
3. **report**: ``OUT/results.json`` and ``OUT/results.md`` (accuracy table
   with the targets, epochs and minutes of every run).

Every step is a subprocess writing its own log under ``OUT/logs/``; a failed
job is reported and the others go on. A step already complete is skipped,
an interrupted training resumes from its ``last.pt``: run the command again
to finish what a time limit cut (``--deadline`` stops the training step
cleanly after that many seconds, so the panels of what exists still get
drawn). Runs on the CPU as well (with ``--limit``/``--epochs`` for a smoke
run).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODELS = ("vgg16", "inception", "mobilenet", "resnet18", "alexnet")  # longest first: they start first
DEFAULT_TWINS = ("pretrained:mobilenet_v1_100_tflite", "pretrained:mobilenet_v1_025_keras")
#: Val top-1 targets of the from-scratch recipes (issue #10) and of fine-tuned twins.
TARGETS = {"resnet18": 0.90, "inception": 0.90, "vgg16": 0.88, "mobilenet": 0.85, "alexnet": 0.80, "twin": 0.97}
STAGES = ("train", "panels", "report")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "reproduce",
        help="train the five Imagenette models, fine-tune the twins, draw panels and comparisons (resumable)",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
    )
    p.add_argument("--data", default=None,
                   help="data root holding imagenette2-160/ (and weights/ for the twins); default ../shared/data "
                        "or $CNN_INTERNALS_DATA")
    p.add_argument("--out", default="out/reproduce", help="output folder (default out/reproduce)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default: cpu")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"from-scratch models, or 'none' (default: {','.join(MODELS)})")
    p.add_argument("--twins", default=",".join(DEFAULT_TWINS),
                   help="pretrained twins to fine-tune fully, or 'none' (default: the two MobileNet v1 twins whose "
                        "weights are in shared/data/weights)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"subset of {','.join(STAGES)} (default: all)")
    p.add_argument("--parallel", type=int, default=None,
                   help="jobs at once (default: all of them on cuda, 1 on cpu)")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="stop the training step after this many seconds (checkpoints kept; rerun to resume)")
    p.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs (smoke runs)")
    p.add_argument("--image-size", type=int, default=None,
                   help="train the from-scratch models at this side (a labelled deviation; AlexNet stays at 224)")
    p.add_argument("--crop-scale", type=float, default=None, metavar="LO",
                   help="RandomResizedCrop area scale LO..1 instead of each recipe's crop (deviation; not AlexNet)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="override every recipe's batch size (a labelled deviation)")
    p.add_argument("--finetune-epochs", type=int, default=5, help="epochs of the twins' full fine-tuning (default 5)")
    p.add_argument("--limit", type=int, default=None, help="N train and N val images (smoke runs)")
    p.add_argument("--panel-limit", type=int, default=None, help="mine the panels on N val images (default all)")
    p.add_argument("--cache-uint8", type=int, default=160, metavar="SIZE",
                   help="side of the uint8 image cache the trainings augment on the device (default 160; 0: the "
                        "PIL pipeline)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default: all CPUs, at most 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    p.set_defaults(func=run)
    return p


@dataclass
class Job:
    """One subprocess step: the command ``cmd``; the file ``done`` exists once it completed."""

    name: str
    cmd: list[str]
    log: Path
    done: Path
    progress: Path | None = None  # a log.json whose "epochs" tell how far it is
    status: str = "pending"
    started: float = 0.0  # time.monotonic() at start
    seconds: float = 0.0  # how long it ran
    proc: Any = field(default=None, repr=False)


def _env(parallel: int = 1) -> dict[str, str]:
    """The children's environment: this package importable even when it is not installed, and
    the CPU threads shared out.

    Without a share every process starts one torch thread per core: with
    several jobs at once the threads outnumber the cores several times over,
    and small CPU-side tensor work between GPU calls (preprocessing a panel's
    images, say) can crawl while OpenMP threads wait for each other. Seen on
    an H100 machine with four ``visualize`` jobs at once on 16 cores: 14 s
    per panel where a lone process needs under 1 s (this share is the
    expected cure; it has not been re-measured there).
    """
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, parallel)))
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _epochs_done(job: Job) -> str:
    if job.progress is None or not job.progress.is_file():
        return ""
    try:
        epochs = json.loads(job.progress.read_text()).get("epochs", [])
    except (OSError, ValueError):
        return ""
    if not epochs:
        return ""
    last = epochs[-1]
    top1 = last.get("val_top1")
    return f"epoch {len(epochs)}" + (f" {100 * top1:.1f}%" if top1 is not None else "")


def run_jobs(jobs: list[Job], parallel: int, deadline: float | None, say=print, poll: float = 1.0,
             report_every: float = 30.0) -> None:
    """Run ``jobs`` (``parallel`` at once), stopping those still running at ``deadline`` (time.monotonic)."""
    pending = [j for j in jobs if j.status == "pending"]
    running: list[Job] = []
    env = _env(parallel)
    last_report = time.monotonic()
    try:
        while pending or running:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                for j in running:
                    _stop(j)
                    j.seconds = time.monotonic() - j.started
                    j.status = "stopped at deadline"
                    say(f"  {j.name}: stopped at the deadline ({_epochs_done(j) or 'no epoch done'})")
                for j in pending:
                    j.status = "not started (deadline)"
                return
            while pending and len(running) < parallel:
                j = pending.pop(0)
                j.log.parent.mkdir(parents=True, exist_ok=True)
                fh = open(j.log, "ab")
                j.proc = subprocess.Popen(j.cmd, stdout=fh,
                                          stderr=subprocess.STDOUT, env=env, start_new_session=True)
                fh.close()
                j.started = now
                j.status = "running"
                running.append(j)
                say(f"  {j.name}: started (log {j.log})")
            time.sleep(poll)
            for j in list(running):
                code = j.proc.poll()
                if code is None:
                    continue
                running.remove(j)
                j.seconds = time.monotonic() - j.started
                j.status = "done" if code == 0 and j.done.exists() else f"failed (exit {code})"
                tail = _tail(j.log)
                say(f"  {j.name}: {j.status} in {j.seconds:.0f} s" + (f" -- {tail}" if tail else ""))
            if running and time.monotonic() - last_report >= report_every:
                last_report = time.monotonic()
                say("  running: " + "; ".join(f"{j.name} {_epochs_done(j)}".strip() for j in running))
    finally:
        for j in running:  # an exception here (Ctrl-C): leave no orphan behind
            if j.proc.poll() is None:
                _stop(j)


def _stop(job: Job) -> None:
    """SIGTERM the job's process group, SIGKILL after 10 s; its last complete checkpoint stays."""
    try:
        os.killpg(job.proc.pid, signal.SIGTERM)
        job.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(job.proc.pid, signal.SIGKILL)
        job.proc.wait()
    except ProcessLookupError:
        pass


def _cli(*argv: str) -> list[str]:
    """``cnn-internals ARGV`` as a command for this Python."""
    return [sys.executable, "-m", "interp.cli", *argv]


def _tail(path: Path, n: int = 1) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[:300]


def _slug(spec: str) -> str:
    return spec.replace(":", "_").replace("/", "_")


def _check(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    import adapters

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models.lower() != "none" else []
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise ValueError(f"unknown model {', '.join(bad)}; choose from {', '.join(MODELS)}")
    twins = [t.strip() for t in args.twins.split(",") if t.strip()] if args.twins.lower() != "none" else []
    family = {t: f for f, ts in adapters.TWINS.items() for t in ts}
    bad = [t for t in twins if t not in family]
    if bad:
        raise ValueError(f"unknown twin {', '.join(bad)}; twins: {', '.join(sorted(family))}")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"unknown stage {', '.join(bad) or '(none given)'}; choose from {', '.join(STAGES)}")
    from adapters.recipes import check_crop_scale

    check_crop_scale(args.crop_scale)  # the range; AlexNet's jobs never get the flag
    for flag in ("parallel", "epochs", "limit", "panel_limit", "workers", "image_size", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.finetune_epochs < 1:
        raise ValueError("--finetune-epochs must be >= 1")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return models, twins, stages


def run(args: argparse.Namespace) -> int:
    """Run the chosen stages; 0 when every job that ran succeeded."""
    import adapters

    models, twins, stages = _check(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = args.data or os.environ.get("CNN_INTERNALS_DATA") or str(Path("../shared/data"))
    workers = args.workers or min(16, os.cpu_count() or 1)
    parallel = args.parallel or (max(1, len(models) + len(twins)) if args.device == "cuda" else 1)
    t0 = time.monotonic()
    deadline = None if args.deadline is None else t0 + args.deadline
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    family = {t: f for f, ts in adapters.TWINS.items() for t in ts}
    jobs: list[Job] = []
    if "train" in stages:
        cache = _prepare_cache(args, out, data, workers, say) if models and args.cache_uint8 else None
        jobs = _train_jobs(args, out, data, models, twins, cache, parallel)
        todo = [j for j in jobs if j.status == "pending"]
        say(f"training: {len(todo)} job(s) to run ({len(jobs) - len(todo)} already complete), {parallel} at once"
            + (f", deadline {args.deadline:.0f} s" if deadline else ""))
        run_jobs(jobs, parallel, deadline, say)
    if "panels" in stages:
        pjobs = _panel_jobs(args, out, data, models, twins, family)
        say(f"panels: {len(pjobs)} job(s)")
        run_jobs(pjobs, max(1, min(parallel, 4)), None, say)
        jobs += pjobs
    if "report" in stages:
        results = collect_results(out, models, twins, family)
        results["wall_seconds"] = round(time.monotonic() - t0, 1)
        results["jobs"] = {j.name: {"status": j.status, "seconds": round(j.seconds, 1)} for j in jobs}
        from interp._utils import write_atomic

        write_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")
        table = results_markdown(results)
        write_atomic(out / "results.md", table + "\n\n" + panels_markdown(out) + "\n")
        say(table)
        say(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    failed = [j for j in jobs if j.status.startswith("failed")]
    for j in failed:
        say(f"FAILED: {j.name}: see {j.log}: {_tail(j.log, 3)}")
    return 1 if failed else 0


def _prepare_cache(args, out: Path, data: str, workers: int, say) -> Path:
    """Decode the images once into the uint8 cache the training jobs read (skipped when it is there)."""
    from adapters import gpu_data
    from adapters.datasets.imagenette import Imagenette, dataset_stats

    t = time.monotonic()
    dataset_stats(data)  # computed (or read) once here, not by five jobs at once
    train = Imagenette(data, "train", limit=args.limit)
    val = Imagenette(data, "val", limit=args.limit)
    size = int(args.cache_uint8)
    path = out / "train" / f"imagenette-uint8-{size}-{gpu_data.cache_key(train.fingerprint(), val.fingerprint(), size)}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    gpu_data.load_or_decode(train, val, size, path, workers=workers, log=say)
    say(f"uint8 cache ready in {time.monotonic() - t:.1f} s: {path}")
    return path


def _train_jobs(args, out: Path, data: str, models, twins, cache: Path | None, parallel: int) -> list[Job]:
    fast = ["--amp", "--channels-last"] if args.device == "cuda" else []
    jobs = []
    for m in models:
        d = out / "train" / m
        argv = ["train", m, "--data", data, "--device", args.device, "--out", str(d), "--seed", str(args.seed),
                "--no-progress", *fast]
        if cache is not None:
            argv += ["--cache-uint8", str(args.cache_uint8), "--cache-file", str(cache)]
        tuned = (("--image-size", args.image_size), ("--crop-scale", args.crop_scale)) if m != "alexnet" else ()
        for flag, value in (("--epochs", args.epochs), ("--limit", args.limit), ("--batch-size", args.batch_size),
                            *tuned):
            if value is not None:
                argv += [flag, str(value)]
        jobs.append(_resumable(f"train {m}", argv, d, out / "logs" / f"train_{m}.log", d / f"{m}.json"))
    # Fine-tuning reads JPEGs through DataLoader workers: it gets the CPUs the
    # training jobs leave (each of those needs about one core with the uint8 cache).
    busy = min(parallel, len(models)) if cache is not None else 0
    ft_workers = max(1, ((os.cpu_count() or 2) - busy) // max(1, min(parallel, len(twins) or 1)) - 1)
    for t in twins:
        d = out / "finetune" / _slug(t)
        argv = ["finetune", t, "--full", "--data", data, "--device", args.device, "--out", str(d), "--seed",
                str(args.seed), "--epochs", str(args.epochs or args.finetune_epochs), "--workers", str(ft_workers),
                "--no-progress", *fast]
        if args.limit is not None:
            argv += ["--train-limit", str(args.limit), "--val-limit", str(args.limit)]
        jobs.append(_resumable(f"finetune {t}", argv, d, out / "logs" / f"finetune_{_slug(t)}.log",
                               d / "finetune.json"))
    return jobs


def _resumable(name: str, argv: list[str], d: Path, log: Path, done: Path) -> Job:
    """A training job writing into ``d``: resumed from ``d/last.pt`` if there is one, skipped once ``done`` exists."""
    if (d / "last.pt").is_file():
        argv = [*argv, "--resume"]
    job = Job(name, _cli(*argv), log, done, d / "log.json")
    if done.is_file():
        job.status = "done (earlier run)"
    return job


def trained_weights(out: Path, model: str) -> tuple[Path | None, str]:
    """The from-scratch weights to draw: the final file, else the last checkpoint of a cut run."""
    d = out / "train" / model
    if (d / f"{model}.safetensors").is_file() and (d / f"{model}.json").is_file():
        return d / f"{model}.safetensors", "complete"
    if (d / "last.pt").is_file():
        return d / "last.pt", "partial"
    return None, "missing"


def finetuned_weights(out: Path, twin: str) -> Path | None:
    d = out / "finetune" / _slug(twin)
    try:
        report = json.loads((d / "finetune.json").read_text())
    except (OSError, ValueError):
        return None
    path = d / report.get("weights_file", "")
    return path if path.is_file() else None


def _panel_jobs(args, out: Path, data: str, models, twins, family) -> list[Job]:
    import adapters

    common = ["--data", str(Path(data) / "imagenette2-160"), "--device", args.device]
    if args.panel_limit is not None:
        common += ["--limit", str(args.panel_limit)]
    loaders = ["--workers", str(min(4, os.cpu_count() or 1))]
    jobs = []
    for m in models:
        weights, state = trained_weights(out, m)
        if weights is None:
            continue
        layers = ",".join(adapters.FIGURE_LAYERS[m])
        d = out / "panels" / m
        jobs.append(Job(f"visualize {m}", _cli("visualize", m, "--weights", str(weights), "--layers", layers,
                                               "--out", str(d), "--web", "webp", *common, *loaders),
                        out / "logs" / f"visualize_{m}.log", d / "gallery.json"))
    for t in twins:
        m = family[t]
        weights, _ = trained_weights(out, m)
        tuned = finetuned_weights(out, t)
        if m not in models or weights is None or tuned is None:
            continue
        layers = ",".join(adapters.FIGURE_LAYERS[m])
        d = out / "compare" / f"{m}_vs_{_slug(t)}"
        jobs.append(Job(f"compare {m} {t}", _cli("compare", m, t, "--weights-a", str(weights), "--weights-b",
                                                 str(tuned), "--layers", layers, "--out", str(d), *common),
                        out / "logs" / f"compare_{m}_{_slug(t)}.log", d / "compare.json"))
    return jobs


def collect_results(out: Path, models, twins, family) -> dict[str, Any]:
    """Accuracy, epochs and minutes of every run found under ``out`` (from the runs' own logs)."""
    rows = []
    for m in models:
        log = _read_json(out / "train" / m / "log.json")
        rows.append(_row(m, "from scratch" + _deviations(m, log), log, m, out / "train" / m / f"{m}.json"))
    for t in twins:
        log = _read_json(out / "finetune" / _slug(t) / "log.json")
        row = _row(t, "pretrained, full fine-tune", log, "twin", out / "finetune" / _slug(t) / "finetune.json")
        row["family"] = family[t]
        rows.append(row)
    return {"rows": rows}


def _deviations(model: str, log: dict | None) -> str:
    """``", tuned: 160 px, crop 0.35-1, batch 64"`` where a run left its recipe, else ``""``."""
    from adapters.recipes import RECIPES

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
    import re

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

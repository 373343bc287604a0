"""``cnn-internals reproduce``, the orchestration: the original work, end to end, as resumable jobs.

1. **train** the five Imagenette models from scratch with their recipes
   (``cnn-internals train``, one process each) and fully fine-tune the
   pretrained twins whose real weights are on the machine
   (``cnn-internals finetune --full``). On a GPU the jobs share it and run
   together (``--parallel``), with bf16 autocast, channels_last and the uint8
   image cache augmented on the GPU; the cache is decoded once, here, before
   they start (:func:`prepare_cache`).
2. **panels**: the original's panels (guided backprop, the layers its README
   shows, :data:`adapters.FIGURE_LAYERS`) for every trained model
   (``cnn-internals visualize``), and for each from-scratch model with a
   fine-tuned twin the side-by-side panels plus the linear-CKA heatmap
   (``cnn-internals compare``).
3. **report**: ``OUT/results.json`` and ``OUT/results.md``
   (:mod:`adapters.training.results`).

Every step is a subprocess (:class:`Job`) writing its own log under
``OUT/logs/``; a failed job is reported and the others go on
(:func:`run_jobs`). A step already complete is skipped, an interrupted
training resumes from its ``last.pt``: run the command again to finish what a
time limit cut (``--deadline`` stops the training step cleanly after that many
seconds, so the panels of what exists still get drawn). Runs on the CPU as
well (with ``--limit``/``--epochs`` for a smoke run).
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
from typing import Any, Callable

import torch

import adapters
from adapters.datasets import Imagenette

from .augment import check_crop_scale
from .recipes import RECIPES
from .results import slug
from .uint8_cache import cache_key, load_or_decode

__all__ = [
    "MODELS", "DEFAULT_TWINS", "STAGES", "Job", "run_jobs", "check_arguments", "twin_families", "prepare_cache",
    "train_jobs", "panel_jobs", "trained_weights", "finetuned_weights", "slug", "tail",
]

#: The from-scratch Imagenette models, longest first (they start first): the recipes with a target.
MODELS = tuple(name for name, r in RECIPES.items() if r.dataset == "imagenette" and r.target_top1 is not None)
DEFAULT_TWINS = ("pretrained:mobilenet_v1_100_tflite", "pretrained:mobilenet_v1_025_keras")
STAGES = ("train", "panels", "report")


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


def run_jobs(jobs: list[Job], parallel: int, deadline: float | None, say: Callable[[str], None] = print,
             poll: float = 1.0, report_every: float = 30.0) -> None:
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
                last = tail(j.log)
                say(f"  {j.name}: {j.status} in {j.seconds:.0f} s" + (f" -- {last}" if last else ""))
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


def tail(path: Path, n: int = 1) -> str:
    """The last ``n`` non-empty lines of a log, joined with " | " (at most 300 characters)."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[:300]


def twin_families() -> dict[str, str]:
    """Each pretrained twin -> the from-scratch model it is the twin of (:data:`adapters.TWINS`)."""
    return {t: f for f, ts in adapters.TWINS.items() for t in ts}


def check_arguments(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """The chosen models, twins and stages; ``ValueError`` (one line) for a bad argument."""
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models.lower() != "none" else []
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise ValueError(f"unknown model {', '.join(bad)}; choose from {', '.join(MODELS)}")
    twins = [t.strip() for t in args.twins.split(",") if t.strip()] if args.twins.lower() != "none" else []
    family = twin_families()
    bad = [t for t in twins if t not in family]
    if bad:
        raise ValueError(f"unknown twin {', '.join(bad)}; twins: {', '.join(sorted(family))}")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"unknown stage {', '.join(bad) or '(none given)'}; choose from {', '.join(STAGES)}")
    check_crop_scale(args.crop_scale)  # the range; AlexNet's jobs never get the flag
    for flag in ("parallel", "epochs", "limit", "panel_limit", "workers", "image_size", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.finetune_epochs < 1:
        raise ValueError("--finetune-epochs must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return models, twins, stages


def prepare_cache(args: argparse.Namespace, out: Path, data: str, workers: int, say: Callable[[str], None]) -> Path:
    """Decode the images once into the uint8 cache the training jobs read (skipped when it is there)."""
    t = time.monotonic()
    train = Imagenette(data, "train", limit=args.limit)
    val = Imagenette(data, "val", limit=args.limit)
    size = int(args.cache_uint8)
    path = out / "train" / f"imagenette-uint8-{size}-{cache_key(train.fingerprint(), val.fingerprint(), size)}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    load_or_decode(train, val, size, path, workers=workers, log=say)
    say(f"uint8 cache ready in {time.monotonic() - t:.1f} s: {path}")
    return path


def train_jobs(args: argparse.Namespace, out: Path, data: str, models: list[str], twins: list[str],
               cache: Path | None, parallel: int) -> list[Job]:
    """The training jobs: ``train`` per from-scratch model, ``finetune --full`` per twin (resumed, or skipped)."""
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
        d = out / "finetune" / slug(t)
        argv = ["finetune", t, "--full", "--data", data, "--device", args.device, "--out", str(d), "--seed",
                str(args.seed), "--epochs", str(args.epochs or args.finetune_epochs), "--workers", str(ft_workers),
                "--no-progress", *fast]
        if args.limit is not None:
            argv += ["--train-limit", str(args.limit), "--val-limit", str(args.limit)]
        jobs.append(_resumable(f"finetune {t}", argv, d, out / "logs" / f"finetune_{slug(t)}.log",
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
    """The fully fine-tuned weights of ``twin`` that its ``finetune.json`` names, if they are there."""
    d = out / "finetune" / slug(twin)
    try:
        report = json.loads((d / "finetune.json").read_text())
    except (OSError, ValueError):
        return None
    path = d / report.get("weights_file", "")
    return path if path.is_file() else None


def panel_jobs(args: argparse.Namespace, out: Path, data: str, models: list[str], twins: list[str],
               family: dict[str, str]) -> list[Job]:
    """``visualize`` per trained model and ``compare`` per model with a fine-tuned twin."""
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
        d = out / "compare" / f"{m}_vs_{slug(t)}"
        jobs.append(Job(f"compare {m} {t}", _cli("compare", m, t, "--weights-a", str(weights), "--weights-b",
                                                 str(tuned), "--layers", layers, "--out", str(d), *common),
                        out / "logs" / f"compare_{m}_{slug(t)}.log", d / "compare.json"))
    return jobs

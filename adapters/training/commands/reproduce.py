"""``cnn-internals reproduce``: the command line of :mod:`adapters.training.reproduce`.

The stages (train, panels, report), the jobs and how they resume are
described there; this module parses the arguments, runs the chosen stages and
writes ``OUT/results.json`` and ``OUT/results.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from adapters.checkpoint import write_atomic

from ..reproduce import (DEFAULT_TWINS, MODELS, STAGES, Job, check_arguments, panel_jobs, prepare_cache, run_jobs, tail,
                         train_jobs, twin_families)
from ..results import collect_results, panels_markdown, results_markdown

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run"]

HELP = "train the five Imagenette models, fine-tune the twins, draw panels and comparisons (resumable)"
DESCRIPTION = __doc__.split("\n\n")[0].split(": ", 1)[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``reproduce``."""
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


def _say(msg: str) -> None:
    print(msg, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run the chosen stages; 0 when every job that ran succeeded."""
    say = _say
    models, twins, stages = check_arguments(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = args.data or os.environ.get("CNN_INTERNALS_DATA") or str(Path("../shared/data"))
    workers = args.workers or min(16, os.cpu_count() or 1)
    parallel = args.parallel or (max(1, len(models) + len(twins)) if args.device == "cuda" else 1)
    t0 = time.monotonic()
    deadline = None if args.deadline is None else t0 + args.deadline
    family = twin_families()
    jobs: list[Job] = []
    if "train" in stages:
        cache = prepare_cache(args, out, data, workers, say) if models and args.cache_uint8 else None
        jobs = train_jobs(args, out, data, models, twins, cache, parallel)
        todo = [j for j in jobs if j.status == "pending"]
        say(f"training: {len(todo)} job(s) to run ({len(jobs) - len(todo)} already complete), {parallel} at once"
            + (f", deadline {args.deadline:.0f} s" if deadline else ""))
        run_jobs(jobs, parallel, deadline, say)
    if "panels" in stages:
        pjobs = panel_jobs(args, out, data, models, twins, family)
        say(f"panels: {len(pjobs)} job(s)")
        run_jobs(pjobs, max(1, min(parallel, 4)), None, say)
        jobs += pjobs
    if "report" in stages:
        results = collect_results(out, models, twins, family)
        results["wall_seconds"] = round(time.monotonic() - t0, 1)
        results["jobs"] = {j.name: {"status": j.status, "seconds": round(j.seconds, 1)} for j in jobs}
        write_atomic(out / "results.json", json.dumps(results, indent=1) + "\n")
        table = results_markdown(results)
        write_atomic(out / "results.md", table + "\n\n" + panels_markdown(out) + "\n")
        say(table)
        say(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    failed = [j for j in jobs if j.status.startswith("failed")]
    for j in failed:
        say(f"FAILED: {j.name}: see {j.log}: {tail(j.log, 3)}")
    return 1 if failed else 0

"""Run the benchmark suite: ``python -m benchmarks.run --device cpu|cuda``.

Prints one markdown table per benchmark (median times, the ours/baseline
time ratio, the speed-up and the max relative difference of the results),
optionally writes everything as JSON, and exits non-zero when any result
differs from ours by more than the tolerance (1e-5 relative).

Examples
--------
``python -m benchmarks.run --device cpu --quick``
``python -m benchmarks.run --device cuda --json gpu.json``
``python -m benchmarks.run --device cpu --only projection --cases vgg16:features.12 --methods guided``
``python -m benchmarks.run --only projection --cases vgg16:features.28 --methods guided --units shared,distinct --flops``
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import common, end_to_end, mining, projection, scaling
from .common import as_json, environment, markdown, setup_device

BENCHMARKS = ("projection", "mining", "e2e", "scaling")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The suite's options (shared by ``python -m benchmarks.run`` and ``cnn-internals bench``)."""
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--json", default=None, help="also write all results and machine facts to this JSON file")
    p.add_argument("--quick", action="store_true",
                   help="fewer models/repeats and smaller sizes: a couple of minutes on a 2-core CPU")
    p.add_argument("--only", default=",".join(BENCHMARKS),
                   help=f"comma-separated subset of {', '.join(BENCHMARKS)} (default: all)")
    p.add_argument("--cases", default=None,
                   help="projection cases as model:layer,... (default: vgg16 features.12/28, resnet18 layer2/4, "
                        "googlenet inception4c, mobilenet_v2 features.7; quick: resnet18 layer2.1.conv2)")
    p.add_argument("--methods", default=None, help="projection methods, e.g. guided,deconvnet (default: both; "
                                                   "quick: guided)")
    p.add_argument("--units", default=None,
                   help="projection unit sets, comma-separated: shared (6 channels x 9 images, the default) and/or "
                        "distinct (54 units on 54 distinct images)")
    p.add_argument("--flops", action="store_true",
                   help="projection: also count the FLOPs of ours and of Captum per unit (FlopCounterMode) and "
                        "print their ratio, the arithmetic bound on the speed-up")
    p.add_argument("--skip", default=None,
                   help="projection baselines to leave out, comma-separated: zennit, naive (saves minutes on deep "
                        "layers; Captum per unit always runs)")
    p.add_argument("--repeats-ours", type=int, default=None, help="projection: repeats of ours (default 5; quick 3)")
    p.add_argument("--e2e-limit", type=int, default=None,
                   help="end to end on N val images spread over the classes (default: all; quick: 24)")
    p.add_argument("--repeats", type=int, default=None,
                   help="repeats of the slow baselines (Captum, zennit, per-layer passes); the naive per-unit "
                        "loop gets half as many (at least 1). Default: 3 (quick: 2)")
    p.add_argument("--mining-images", type=int, default=None,
                   help="images for the mining benchmark (default 128; quick: 32)")
    p.add_argument("--data", default=None, help="data root holding imagenette2-160/ (default ../shared/data)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--workers", type=int, default=0,
                   help="end to end: DataLoader workers decoding the images, for both pipelines (default 0)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="projection: compute every candidate in this precision (float64 tells a wrong rule "
                        "from an fp32 near-tie: see RESULTS.md)")
    p.add_argument("--tf32", action="store_true",
                   help="CUDA: allow TF32 convolutions/matmuls (default off: true fp32, results checked to 1e-5; "
                        "with --tf32 to 1e-2)")


def parse_list(text: str | None, allowed: Sequence[str] | None = None, what: str = "item") -> list[str] | None:
    """``"a,b"`` -> ``["a", "b"]`` (``None`` stays ``None``), checked against ``allowed``."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if allowed is not None:
        bad = [t for t in items if t not in allowed]
        if bad:
            raise ValueError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    if not items:
        raise ValueError(f"no {what} given")
    return items


def parse_cases(text: str | None) -> list[tuple[str, str]] | None:
    """``"vgg16:features.12,resnet18:layer4.1.conv2"`` -> ``[(model, layer), ...]``."""
    items = parse_list(text, what="case")
    if items is None:
        return None
    out = []
    for item in items:
        model, sep, layer = item.partition(":")
        if not sep or not model or not layer:
            raise ValueError(f"bad case {item!r}; write model:layer, e.g. vgg16:features.12")
        out.append((model, layer))
    return out


def run_suite(args: argparse.Namespace, log: Callable[[str], None] = print,
              command: str | None = None) -> tuple[int, dict, str]:
    """Run the chosen benchmarks; return ``(exit code, JSON document, markdown report)``.

    ``command`` is recorded in the JSON (default: this process's arguments).
    """
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    only = parse_list(args.only, BENCHMARKS, "benchmark")
    methods = parse_list(args.methods, ("guided", "deconvnet", "gradient"), "method")
    cases = parse_cases(args.cases)
    unit_sets = parse_list(getattr(args, "units", None), projection.UNIT_SETS, "unit set")
    skip = parse_list(getattr(args, "skip", None), ("zennit", "naive"), "baseline") or []
    repeats_ours = getattr(args, "repeats_ours", None)
    if repeats_ours is not None and repeats_ours < 1:
        raise ValueError(f"--repeats-ours must be >= 1, got {repeats_ours}")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.mining_images is not None and args.mining_images < 1:
        raise ValueError(f"--mining-images must be >= 1, got {args.mining_images}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    device = setup_device(args.device, tf32=bool(getattr(args, "tf32", False)))
    TOLERANCE = common.TOLERANCE
    env = environment(device)
    started = datetime.datetime.now(datetime.timezone.utc)
    doc: dict = {"command": command or "python -m benchmarks.run " + " ".join(sys.argv[1:]), "started_utc": started.isoformat(timespec="seconds"),
                 "quick": bool(args.quick), "tolerance": TOLERANCE, "env": env, "benchmarks": {}}
    parts = [f"## Benchmarks ({'quick' if args.quick else 'full'})", "",
             f"- device: {env['device']} ({env['device_name']}), torch {env['torch']}, "
             f"{env['threads']} threads, {env['cpu_count']} CPUs, captum {env['captum']}, zennit {env['zennit']}",
             f"- started {doc['started_utc']}; tolerance: max relative difference {TOLERANCE:.0e}", ""]
    rows_all = []
    t_start = time.perf_counter()
    for name in only:
        t0 = time.perf_counter()
        if name == "projection":
            ps = projection.QUICK if args.quick else projection.FULL
            if args.repeats is not None:
                ps = replace(ps, repeats_baseline=args.repeats, repeats_naive=max(1, args.repeats // 2))
            ps = replace(ps, dtype=getattr(args, "dtype", "float32"), flops=bool(getattr(args, "flops", False)),
                         skip=tuple(skip))
            if repeats_ours is not None:
                ps = replace(ps, repeats_ours=repeats_ours)
            rows = projection.run(device, args.quick, cases=cases, methods=methods, settings=ps, log=log,
                                  unit_sets=tuple(unit_sets) if unit_sets else None)
            table = markdown(rows, "Projection (54 units = 6 channels x 9 images; 'on 54 images': one image per unit)")
            table += ("\n" + projection.flop_table(rows)) if ps.flops else ""
        elif name == "mining":
            ms = mining.QUICK if args.quick else mining.FULL
            if args.mining_images is not None:
                ms = replace(ms, images=args.mining_images)
            if args.repeats is not None:
                ms = replace(ms, repeats_per_layer=args.repeats)
            rows = mining.run(device, args.quick, settings=ms, log=log)
            table = markdown(rows, "Mining (ours/this for 'no-grad forward, channels_last' = overhead ratio; target <= 1.15)")
        elif name == "e2e":
            s = end_to_end.QUICK if args.quick else end_to_end.FULL
            if args.e2e_limit is not None:
                s = replace(s, limit=args.e2e_limit)
            s = replace(s, workers=args.workers)
            rows = end_to_end.run(device, args.quick, settings=s, data_root=Path(args.data) if args.data else None,
                                  log=log)
            table = markdown(rows, "End to end (resnet18 visualize)") + "\n" + end_to_end.markdown_split(rows)
        else:
            rows = scaling.run(device, args.quick, log=log)
            table = "### Scaling\n\n" + scaling.markdown(rows)
        elapsed = time.perf_counter() - t0
        log(table)
        parts.append(table)
        parts.append(f"({name}: {elapsed:.0f} s)\n")
        doc["benchmarks"][name] = {"rows": as_json(rows), "seconds": round(elapsed, 1)}
        rows_all += rows
    failed = [r for r in rows_all if r.status == "FAIL"]
    doc["failures"] = [f"{r.bench}: {r.case}: {r.impl}: {r.note}" for r in failed]
    doc["seconds"] = round(time.perf_counter() - t_start, 1)
    if failed:
        parts.append("**FAILED**: " + "; ".join(doc["failures"]))
    return (1 if failed else 0), doc, "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.run``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        code, doc, report = run_suite(args, log=lambda m: print(m, flush=True),
                                      command="python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv))
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"benchmarks: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if code:
        print("benchmarks: FAILED: " + "; ".join(doc["failures"]), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

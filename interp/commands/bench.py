"""``cnn-internals bench``: run the benchmark suite (same options as ``python -m benchmarks.run``).

Times ``interp.project`` against Captum per-unit calls, zennit's batched
guided backprop and a naive per-unit loop, ``interp.mine`` against a plain
forward, the whole ``visualize`` pipeline against the original's, and how
cost scales; prints markdown tables and exits non-zero when results differ.
The suite lives in the ``benchmarks`` package of a source checkout.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path


def _suite():
    """The ``benchmarks.run`` module, with a clear error outside a source checkout."""
    try:
        return importlib.import_module("benchmarks.run")
    except ModuleNotFoundError as exc:
        if exc.name not in ("benchmarks", "benchmarks.run"):
            raise
    # The console script does not put the checkout on sys.path; the suite
    # sits next to the interp package in a source checkout.
    root = Path(__file__).resolve().parents[2]
    if (root / "benchmarks" / "run.py").is_file():
        sys.path.insert(0, str(root))
        return importlib.import_module("benchmarks.run")
    raise RuntimeError("the benchmarks package is not importable; run from the repository root "
                       "(it ships with the source, not the wheel)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``bench`` verb."""
    p = sub.add_parser("bench", help="attribution-speed benchmarks (markdown tables, optional JSON)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    try:
        _suite().add_arguments(p)
    except RuntimeError:
        # Outside a checkout: keep the verb listed; running it gives the clear error.
        pass
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the suite; 1 when a result differs from ours by more than the tolerance."""
    suite = _suite()
    code, doc, _ = suite.run_suite(args, log=lambda m: print(m, flush=True),
                                   command="cnn-internals " + " ".join(sys.argv[1:]))
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if code:
        raise RuntimeError("results differ beyond the tolerance: " + "; ".join(doc["failures"]))
    return code

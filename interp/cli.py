"""Command-line entry point: ``cnn-internals VERB ...``.

Each verb lives in its own module under :mod:`interp.commands` and exposes
``add_parser(subparsers)`` and ``run(args) -> int``. This file only wires them
together and turns expected errors into one clear line on stderr.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Verb -> module under interp.commands, in the order shown by --help.
COMMANDS = ["demo", "layers", "rf", "visualize", "gallery", "train", "finetune", "compare", "reproduce", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnn-internals",
        description="See what convolutional networks see.",
    )
    sub = parser.add_subparsers(dest="command", metavar="VERB")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"interp.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"interp.commands.{name}":
                continue  # verb not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Expected user errors: one line, no traceback. Under torchrun an
        # error every rank raised together is printed by rank 0 alone.
        from interp.dist import told_everyone

        if not (told_everyone(exc) and os.environ.get("RANK", "0") != "0"):
            print(f"cnn-internals {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # python -m interp.cli
    sys.exit(main())

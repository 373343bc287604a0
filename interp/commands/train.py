"""``cnn-internals train MODEL``: the verb; the command lives in :mod:`adapters.training.commands.train`."""
from __future__ import annotations

import argparse

from adapters.training.commands.train import DESCRIPTION, HELP, add_arguments, run

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``train`` verb."""
    p = subparsers.add_parser("train", help=HELP, description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run)
    return p

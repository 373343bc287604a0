"""``cnn-internals reproduce``: the verb; the command lives in :mod:`adapters.training.commands.reproduce`."""
from __future__ import annotations

import argparse

from adapters.training.commands.reproduce import DESCRIPTION, HELP, add_arguments, run

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``reproduce`` verb."""
    p = sub.add_parser("reproduce", help=HELP, description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run)
    return p

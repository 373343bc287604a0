"""``cnn-internals finetune MODEL``: the verb; the command lives in :mod:`adapters.training.commands.finetune`.

The MODEL argument is resolved as every verb resolves it (:mod:`interp.commands._models`).
"""
from __future__ import annotations

import argparse

from adapters.training.commands import finetune

from ._models import MODEL_HELP, add_offline_flag, load_model

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``finetune`` verb."""
    p = sub.add_parser("finetune", help=finetune.HELP, description=finetune.DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    finetune.add_arguments(p, model_help=MODEL_HELP)
    add_offline_flag(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Fine-tune ``args.model`` (see :func:`adapters.training.commands.finetune.run`)."""
    return finetune.run(args, load_model=load_model)

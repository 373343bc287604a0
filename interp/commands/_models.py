"""Resolve a MODEL argument of the CLI into ``(model, preprocess, model_id)``.

This is the one place where the engine side touches :mod:`adapters`: the
engine functions themselves only ever see a ``torch.nn.Module``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path
from typing import Callable

import torch

MODEL_HELP = (
    "a built-in name (see `cnn-internals layers --list`), torchvision:NAME, "
    "timm:NAME, or path/to/file.py:factory"
)

OFFLINE_ENV = "CNN_INTERNALS_OFFLINE"


class _OfflineAction(argparse.Action):
    """``--offline``: set ``CNN_INTERNALS_OFFLINE=1`` for this process.

    Setting the environment variable (rather than passing a flag down) makes
    the flag exactly equivalent to the variable for every model load of the
    command, including loads inside library code and worker processes, and
    lets each command take the flag with one line (:func:`add_offline_flag`).
    """

    def __init__(self, option_strings, dest, **kwargs) -> None:
        kwargs.setdefault("default", False)
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        os.environ[OFFLINE_ENV] = "1"
        setattr(namespace, self.dest, True)


def add_offline_flag(parser: argparse.ArgumentParser) -> None:
    """Give a command that loads models the ``--offline`` flag (same as ``CNN_INTERNALS_OFFLINE=1``)."""
    parser.add_argument(
        "--offline", action=_OfflineAction,
        help="never download weights: a pretrained file missing from the torch.hub / Hugging Face cache is an "
             "error naming the file and the folder to put it in (same as CNN_INTERNALS_OFFLINE=1)",
    )


def _from_file(spec: str) -> tuple[torch.nn.Module, Callable | None]:
    path, _, factory = spec.rpartition(":")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model file not found: {file}")
    mod_spec = importlib.util.spec_from_file_location(f"_user_model_{file.stem}", file)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, factory):
        raise ValueError(f"{file} has no attribute {factory!r}")
    out = getattr(module, factory)()
    if isinstance(out, tuple):
        model, preprocess = out
    else:
        model, preprocess = out, None
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model, preprocess


def load_model(spec: str, weights: str | None = None,
               data: str | os.PathLike | None = None) -> tuple[torch.nn.Module, Callable | None, str]:
    """Return ``(model, preprocess, model_id)`` for a CLI model spec.

    ``data`` is the command's ``--data``: a built-in adapter whose preprocess
    uses training-set statistics (the Imagenette models) takes them from
    there, not from the default data location.

    The model is built under a fixed seed (0) with the global RNG state
    restored afterwards, so a model without weights has the same random
    initialisation in every run and in every torchrun process: two runs of a
    command give the same files.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _load_model(spec, weights, data)


def _load_model(spec: str, weights: str | None, data) -> tuple[torch.nn.Module, Callable | None, str]:
    if ".py:" in spec and not spec.startswith(("torchvision:", "timm:")):
        model, preprocess = _from_file(spec)
        if weights:
            from adapters.checkpoint import load_state_dict

            model.load_state_dict(load_state_dict(weights))
        model.eval()
        model_id = Path(spec.rpartition(":")[0]).stem
        return model, preprocess, model_id
    import adapters

    kwargs = {}
    if data is not None and not spec.startswith(("torchvision:", "timm:")) and _takes_data_root(spec) \
            and _has_imagenette_train(data):
        kwargs["data_root"] = data
    model, preprocess = adapters.load(spec, weights=weights, **kwargs)
    model_id = spec.replace(":", "-").replace(os.sep, "-")
    return model, preprocess, model_id


def _takes_data_root(spec: str) -> bool:
    """Whether the built-in adapter ``spec``'s loader accepts ``data_root``."""
    import inspect

    import adapters

    try:
        loader = adapters._resolve(spec)
    except Exception:  # noqa: BLE001 - unknown names fail with their own message in adapters.load
        return False
    return "data_root" in inspect.signature(loader).parameters


def _has_imagenette_train(data: str | os.PathLike) -> bool:
    """Whether ``data`` holds an Imagenette train split (else the adapter's default location is used)."""
    from adapters.imagenette import find_split_dir

    try:
        find_split_dir(data, "train")
    except (FileNotFoundError, ValueError):
        return False
    return True

"""Resolve a MODEL argument of the CLI into a model, its preprocess, an id and its weights' provenance.

This is the one place where the engine side touches :mod:`adapters`: the
engine functions themselves only ever see a ``torch.nn.Module``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import adapters
from adapters.checkpoint import load_state_dict

MODEL_HELP = (
    "a built-in name (see `cnn-internals layers --list`), torchvision:NAME, "
    "timm:NAME, or path/to/file.py:factory"
)

OFFLINE_ENV = "CNN_INTERNALS_OFFLINE"

#: The seed every model is built under: random weights are the same in every run.
SEED = 0


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


def _first_line(exc: BaseException) -> str:
    """``"ExcType: first line of its message"`` (the message alone can be empty or many lines)."""
    # A SyntaxError's str() repeats file and line, which the caller already names.
    text = exc.msg if isinstance(exc, SyntaxError) and exc.msg else str(exc)
    lines = text.strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _user_line(exc: BaseException, file: Path) -> str:
    """Where in the user's ``file`` ``exc`` was raised: ``" (line N)"``, or ``""`` if not from there."""
    if isinstance(exc, SyntaxError) and exc.lineno and Path(exc.filename or "").name == file.name:
        return f" (line {exc.lineno})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == file.resolve()]
    return f" (line {frames[-1].lineno})" if frames else ""


def _from_file(spec: str) -> tuple[torch.nn.Module, Callable | None]:
    path, _, factory = spec.rpartition(":")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model file not found: {file}")
    if not factory.isidentifier():
        raise ValueError(f"bad model spec {spec!r}: write path/to/file.py:FACTORY, FACTORY a function in the file")
    mod_spec = importlib.util.spec_from_file_location(f"_user_model_{file.stem}", file)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's code: name the file, not our call stack
        raise ValueError(f"error in model file {file.name}{_user_line(exc, file)}: {_first_line(exc)}") from exc
    if not hasattr(module, factory):
        raise ValueError(f"{file} has no attribute {factory!r}")
    try:
        out = getattr(module, factory)()
    except Exception as exc:  # noqa: BLE001 - as above: one line naming the factory
        raise ValueError(f"error in factory {file.name}:{factory}{_user_line(exc, file)}: "
                         f"{_first_line(exc)}") from exc
    if isinstance(out, tuple):
        model, preprocess = out
    else:
        model, preprocess = out, None
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model, preprocess


@dataclass
class LoadedModel:
    """A CLI model spec, loaded: the model, its preprocess, a file-name id and where its weights came from.

    ``weights`` is a JSON-ready dict (recorded in ``topk.json`` and the
    gallery): ``{"name", "file", "sha256"}`` for a weights file,
    ``{"name", "weights"}`` for a library's named pretrained weights,
    ``{"name", "source": "factory"}`` for whatever a user factory built, or
    ``{"random": True, "seed": 0}``.
    """

    model: torch.nn.Module
    preprocess: Callable | None
    model_id: str
    weights: dict = field(default_factory=dict)

    @property
    def random(self) -> bool:
        return bool(self.weights.get("random"))


def load_model(spec: str, weights: str | None = None) -> tuple[torch.nn.Module, Callable | None, str]:
    """Return ``(model, preprocess, model_id)`` for a CLI model spec (see :func:`load_model_info`)."""
    loaded = load_model_info(spec, weights, provenance=False)
    return loaded.model, loaded.preprocess, loaded.model_id


def load_model_info(spec: str, weights: str | None = None, provenance: bool = True) -> LoadedModel:
    """Load a CLI model spec, with the provenance of its weights.

    ``provenance=False`` leaves ``weights`` empty: no SHA-256 of a large
    checkpoint for a command that records nothing (``layers``, ``rf``).
    Loading never reads a dataset: the built-in models' preprocessing
    statistics ship with :mod:`adapters`.

    The model is built under a fixed seed (:data:`SEED`) with the global RNG
    state restored afterwards, so a model without weights has the same random
    initialisation in every run and in every torchrun process: two runs of a
    command give the same files.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        loaded = _load_model(spec, weights)
    if provenance:
        loaded.weights = _provenance(spec, weights)
    if loaded.random:
        loaded.weights = {"random": True, "seed": SEED}
    return loaded


def announce_weights(spec: str, loaded: LoadedModel, stream=None) -> None:
    """One line on stderr when ``spec`` runs with random weights (nothing otherwise)."""
    if loaded.random:
        print(f"note: {spec} has random weights (seed {SEED}); pass --weights FILE (a .pt/.pth/.safetensors "
              "checkpoint) to see what trained weights learnt", file=stream or sys.stderr)


def _load_model(spec: str, weights: str | None) -> LoadedModel:
    if _is_file_spec(spec):
        model, preprocess = _from_file(spec)
        if weights:
            model.load_state_dict(load_state_dict(weights))
        model.eval()
        return LoadedModel(model, preprocess, Path(spec.rpartition(":")[0]).stem)
    model, preprocess = adapters.load(spec, weights=weights)
    model_id = spec.replace(":", "-").replace(os.sep, "-")
    return LoadedModel(model, preprocess, model_id)


def _provenance(spec: str, weights: str | None) -> dict:
    """Where the weights of ``spec`` loaded with ``weights`` come from (see :class:`LoadedModel`)."""
    if _is_file_spec(spec) and not weights:
        file, _, factory = spec.rpartition(":")
        return {"name": f"{Path(file).name}:{factory}", "source": "factory"}
    return adapters.weights_source(spec, weights)


def _is_file_spec(spec: str) -> bool:
    return ".py:" in spec and not spec.startswith(("torchvision:", "timm:"))

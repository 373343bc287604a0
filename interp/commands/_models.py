"""Resolve a MODEL argument of the CLI into ``(model, preprocess, model_id)``.

This is the one place where the engine side touches :mod:`adapters`: the
engine functions themselves only ever see a ``torch.nn.Module``.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

import torch

MODEL_HELP = (
    "a built-in name (see `cnn-internals layers --list`), torchvision:NAME, "
    "timm:NAME, or path/to/file.py:factory"
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


def load_model(spec: str, weights: str | None = None) -> tuple[torch.nn.Module, Callable | None, str]:
    """Return ``(model, preprocess, model_id)`` for a CLI model spec."""
    if ".py:" in spec and not spec.startswith(("torchvision:", "timm:")):
        model, preprocess = _from_file(spec)
        if weights:
            from adapters.checkpoint import load_state_dict

            model.load_state_dict(load_state_dict(weights))
        model.eval()
        model_id = Path(spec.rpartition(":")[0]).stem
        return model, preprocess, model_id
    import adapters

    model, preprocess = adapters.load(spec, weights=weights)
    model_id = spec.replace(":", "-").replace(os.sep, "-")
    return model, preprocess, model_id

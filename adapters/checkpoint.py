"""Safe checkpoint I/O: atomic writes, ``weights_only`` / safetensors reads."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``).

    A torch file holding ``{"model": state_dict, ...}`` (our training checkpoints)
    is unwrapped to the state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a torch file
        raise ValueError(f"cannot read checkpoint {path}: {exc.__class__.__name__}: {exc}") from exc
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return obj


def load_into(model: torch.nn.Module, weights: str | os.PathLike, name: str,
              state: dict[str, torch.Tensor] | None = None) -> None:
    """Load the state dict in file ``weights`` (or ``state``, already read from it) into ``model``.

    Raises
    ------
    ValueError
        One line, ``"<weights> does not fit <name>: <torch's first lines>"``,
        when keys or shapes do not match.
    """
    if state is None:
        state = load_state_dict(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[:3])
        raise ValueError(f"{weights} does not fit {name}: {detail}") from exc


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename.

    A crash mid-write never leaves a truncated checkpoint under ``path``.
    """
    from interp._io import atomic_writer

    with atomic_writer(path, "wb") as fh:
        torch.save(obj, fh)


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a whole training checkpoint (``weights_only=True``) and check its keys.

    Parameters
    ----------
    path:
        A ``.pt`` file written by :func:`atomic_save`.
    required:
        Keys the checkpoint must hold.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is truncated, corrupt, not a torch file, or lacks a required key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / corrupt / not a torch file / unsafe pickle
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ValueError(
            f"cannot read checkpoint {path} (corrupt or not a training checkpoint: {reason}); "
            "delete it to start afresh"
        ) from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a training checkpoint (holds {type(obj).__name__}, not a dict)")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ValueError(f"{path} is not a training checkpoint: missing {', '.join(missing)}")
    return obj

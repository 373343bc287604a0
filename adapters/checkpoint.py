"""Safe checkpoint I/O: atomic writes, ``weights_only`` / safetensors reads."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import IO, Any, Callable

import torch
from safetensors.torch import load_file


#: The ``weights`` value that keeps a model's random initialisation.
RANDOM = "random"


def _unreadable(path: Path, exc: Exception) -> ValueError:
    """One line on why ``path`` is not a checkpoint, never advice to weaken ``weights_only``.

    torch's own message for a file that holds Python objects recommends
    ``weights_only=False``, which would run arbitrary code from the file.
    """
    if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in str(exc):
        return ValueError(
            f"{path} holds Python objects besides tensors, which are not loaded for safety; "
            "save a state dict (torch.save(model.state_dict(), path)) or a .safetensors file instead")
    return ValueError(f"{path} is not a PyTorch checkpoint or a .safetensors file "
                      f"(corrupt, truncated or another format: {exc.__class__.__name__})")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``).

    A torch file holding ``{"model": state_dict, ...}`` (our training checkpoints)
    is unwrapped to the state dict.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        One line: the file is not a checkpoint, holds Python objects, or does not
        map names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means "not a checkpoint"
        raise _unreadable(path, exc) from exc
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path} is not a state dict: {bad[0]!r} maps to {type(obj[bad[0]]).__name__}, not a tensor")
    return obj


def load_into(model: torch.nn.Module, weights: str | os.PathLike, name: str,
              state: dict[str, torch.Tensor] | None = None) -> None:
    """Load the state dict in file ``weights`` (or ``state``, already read from it) into ``model``.

    ``weights="random"`` loads nothing: the model keeps its initialisation
    (the same word as ``cnn-internals --weights random``).

    Raises
    ------
    ValueError
        One line, ``"<weights> does not fit <name>: <torch's first lines>"``,
        when keys or shapes do not match.
    """
    if state is None and str(weights) == RANDOM:
        return
    if state is None:
        state = load_state_dict(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[:3])
        raise ValueError(f"{weights} does not fit {name}: {detail}") from exc


def built(model: torch.nn.Module, weights: str | os.PathLike | None, name: str,
          preprocess: Callable) -> tuple[torch.nn.Module, Callable]:
    """The tail every model's ``load`` shares: ``weights`` loaded into ``model`` (``None`` or
    ``"random"``: as initialised), the model in eval mode, and its ``preprocess``."""
    if weights is not None:
        load_into(model, weights, name)
    return model.eval(), preprocess


def write_atomic(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], None]) -> Path:
    """Write a file so that no reader ever sees it half-written; returns the path.

    ``data`` is bytes, text (written as UTF-8) or a function that writes to
    the open binary file. It goes to a hidden temporary file in the target
    folder, renamed over ``path`` once complete and deleted on any error
    (Ctrl-C included). The file gets the usual permissions (0666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    mask = os.umask(0)
    os.umask(mask)
    try:
        with open(tmp, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`write_atomic`: a crash never leaves a truncated checkpoint."""
    write_atomic(path, lambda fh: torch.save(obj, fh))


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
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt / not a torch file / unsafe pickle
        raise ValueError(f"cannot read checkpoint {path}: {_unreadable(path, exc)}; delete it to start afresh") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a training checkpoint (holds {type(obj).__name__}, not a dict)")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ValueError(f"{path} is not a training checkpoint: missing {', '.join(missing)}")
    return obj

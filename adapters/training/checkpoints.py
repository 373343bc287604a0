"""Checkpoints, the training log and RNG states: what makes a run resumable, exactly.

Output folder ``OUT`` of :func:`adapters.training.fit`:

``OUT/last.pt``
    Written atomically after every epoch: model, optimizer and scheduler
    state, completed epoch, RNG states, recipe, metrics history.
``OUT/best.pt``
    Same content, for the epoch with the best validation top-1 so far.
``OUT/log.json``
    The recipe, the seed, the data pipeline (``amp``, ``channels_last``,
    device-side batches), the processes (``world_size``, ``global_batch``,
    ``sync_bn``), and one record per epoch (train loss/top-1, val
    loss/top-1/top-5, learning rate, seconds, images/s, the world size that
    trained it).

Checkpoints hold the unwrapped model's state dict (no ``module.`` prefix), so
they load in one process, and resume with any world size. Each rank's RNG
state is saved too; resuming with the *same* world size restores them, with
a different one rank 0 takes the saved main state and the other ranks are
seeded from ``(seed, rank, epoch)`` (:func:`restore_rng`). A resume is read
by rank 0 and broadcast (:func:`read_resume`), so the output folder need not
be shared between machines.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adapters.checkpoint import atomic_save, load_checkpoint, write_atomic
from interp import parallel

from .recipe import Recipe

__all__ = [
    "CHECKPOINT_FORMAT", "RESUME_KEYS", "seed_everything", "rng_state", "set_rng_state", "rank_seed",
    "check_resume", "read_resume", "restore_rng", "write_json", "Checkpointer",
]

CHECKPOINT_FORMAT = "cnn-internals-train/1"

#: Keys a training checkpoint must hold to be resumed from.
RESUME_KEYS = ("format", "model", "optimizer", "scheduler", "epoch", "rng", "history", "recipe", "seed")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """All global RNG states, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed of rank ``rank``'s global RNGs where no saved state applies (rank 0 of a fresh run uses ``seed``)."""
    return ((seed * 1_000_003 + rank) * 10_007 + epoch) % 2**63


def _same_recipe(saved: Any, recipe: Recipe) -> bool:
    try:
        return Recipe.from_dict(saved, base=recipe) == recipe
    except (TypeError, ValueError):  # not a recipe this version can read
        return False


def check_resume(ckpt: dict[str, Any], path: Path, recipe: Recipe, n_train: int, seed: int) -> None:
    """Raise ``ValueError`` unless ``ckpt`` continues this run (same format, recipe, data size, seed)."""
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has format {ckpt['format']!r}, expected {CHECKPOINT_FORMAT!r}")
    if not _same_recipe(ckpt["recipe"], recipe):
        raise ValueError(f"cannot resume: {path} was trained with recipe {ckpt['recipe']}, now {recipe.to_dict()}")
    if ckpt.get("n_train") != n_train or ckpt["seed"] != seed:
        raise ValueError(
            f"cannot resume: {path} was trained on {ckpt.get('n_train')} images with seed "
            f"{ckpt['seed']}, now {n_train} images with seed {seed}"
        )


def read_resume(path: Path, recipe: Recipe, n_train: int, seed: int) -> dict[str, Any] | None:
    """The checked checkpoint at ``path`` on every rank, or ``None`` when there is none.

    Rank 0 reads it (``weights_only``) and broadcasts it, so that the other
    ranks need not see rank 0's file system, and a bad checkpoint raises the
    same error on every rank instead of leaving the others waiting.
    """
    ckpt: dict[str, Any] | None = None
    error: str | None = None
    if parallel.is_main() and path.exists():
        try:
            ckpt = load_checkpoint(path, required=RESUME_KEYS)
            check_resume(ckpt, path, recipe, n_train, seed)
        except (ValueError, FileNotFoundError) as exc:
            ckpt, error = None, str(exc)
    if parallel.active():
        ckpt, error = parallel.broadcast((ckpt, error))
    if error is not None:
        raise ValueError(error)
    return ckpt


def restore_rng(ckpt: dict[str, Any], rank: int, world: int, seed: int) -> None:
    """This rank's RNG state from ``ckpt`` (its own with the same world size; see the module docstring)."""
    saved = int(ckpt.get("world_size", 1))
    per_rank = ckpt.get("rng_ranks")
    if saved == world and per_rank is not None:
        set_rng_state(per_rank[rank])
    elif rank == 0:
        set_rng_state(ckpt["rng"])
    else:
        seed_everything(rank_seed(seed, rank, int(ckpt["epoch"])))


def write_json(obj: Any, path: Path) -> None:
    """Write JSON atomically (temporary file + rename)."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


class Checkpointer:
    """Writes ``last.pt`` / ``best.pt`` and ``log.json`` of one run (rank 0 calls it).

    Parameters
    ----------
    out:
        The output folder.
    model, optimizer, scheduler:
        What a checkpoint holds the state of (``model`` unwrapped: no ``module.`` prefix).
    recipe, seed, n_train, world:
        The run's identity, checked on resume.
    info:
        The fixed part of ``log.json`` (device, data pipeline, extra); the
        recipe, seed and epoch records are added here.
    """

    def __init__(self, out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 recipe: Recipe, seed: int, n_train: int, world: int, info: dict[str, Any]) -> None:
        self.out, self.model, self.optimizer, self.scheduler = out, model, optimizer, scheduler
        self.recipe, self.seed, self.n_train, self.world, self.info = recipe, seed, n_train, world, info

    @property
    def last(self) -> Path:
        """``OUT/last.pt``."""
        return self.out / "last.pt"

    def save(self, path: Path, epoch: int, history: list[dict[str, Any]], best: dict[str, Any] | None,
             rngs: list[dict[str, Any]]) -> None:
        """Write the checkpoint after ``epoch`` epochs to ``path`` (atomically); ``rngs`` holds every rank's RNGs."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "rng": rngs[0],
            "world_size": self.world,
            "history": history,
            "best": best,
            "recipe": self.recipe.to_dict(),
            "seed": self.seed,
            "n_train": self.n_train,
        }
        if self.world > 1:
            state["rng_ranks"] = rngs
        atomic_save(state, path)

    def write_log(self, history: list[dict[str, Any]]) -> None:
        """Write ``OUT/log.json`` with the epoch records so far."""
        head = {"recipe": self.recipe.to_dict(), "seed": self.seed, "n_train": self.n_train}
        write_json({**head, **self.info, "epochs": history}, self.out / "log.json")

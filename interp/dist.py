"""torch.distributed in one place: the same code runs alone or under ``torchrun``.

Everything here degrades to the single-process answer when no process group
is initialised, so callers never branch on "am I distributed?" themselves:
``world()`` is ``(0, 1)``, ``gather(obj)`` is ``[obj]``, ``barrier()`` does
nothing. :func:`init_from_env` starts the group from the variables
``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); the backend is NCCL when the process drives a GPU and Gloo
otherwise.
"""
from __future__ import annotations

import os
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "world", "is_main", "shard", "gather", "broadcast", "barrier", "launched", "shutdown"]

T = TypeVar("T")


def launched() -> bool:
    """True when this process was started by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True when a process group with more than one member is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_env(device: str | torch.device | None = None) -> torch.device | None:
    """Join the process group ``torchrun`` describes, if any.

    Parameters
    ----------
    device:
        The device the caller intends to use (``"cpu"``, ``"cuda"``, ``None``
        = CUDA when available). Under torchrun a CUDA device becomes
        ``cuda:LOCAL_RANK`` so that each process drives its own GPU.

    Returns
    -------
    torch.device or None
        The device this process should use, or ``device`` unchanged (``None``
        stays ``None``) when the process was not launched by torchrun.
    """
    if not launched():
        return torch.device(device) if device is not None else None
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; run without torchrun")
    want = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if want.type == "cuda":
        want = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(want)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want.type == "cuda" else "gloo")
    return want


def shutdown() -> None:
    """Leave the process group (no-op when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes files."""
    return world()[0] == 0


def shard(n: int, rank: int | None = None, size: int | None = None) -> range:
    """This rank's contiguous block of ``range(n)``.

    Blocks differ in length by at most one and cover every index exactly once:
    unlike ``DistributedSampler`` nothing is padded or repeated, so results
    merged over ranks equal the single-process result.
    """
    r, w = world()
    rank = r if rank is None else rank
    size = w if size is None else size
    return range(n * rank // size, n * (rank + 1) // size)


def gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` alone)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: T, src: int = 0) -> T:
    """``obj`` from rank ``src`` on every rank (``obj`` itself alone)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op alone)."""
    if active():
        dist.barrier()

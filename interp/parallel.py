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

import hashlib
import os
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "init_from_env", "process_group", "world", "is_main", "shard", "shard_blocks", "gather", "gather_to", "collect", "work_queue",
    "broadcast", "barrier", "launched", "active", "shutdown", "PeerError", "told_everyone", "sync_module",
    "check_same_module",
]

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


@contextmanager
def process_group(device: str | torch.device | None = None) -> Iterator[torch.device | None]:
    """:func:`init_from_env` for the body of a ``with``, then :func:`shutdown` (also on error).

    Yields the device this process should use (see :func:`init_from_env`).
    """
    dev = init_from_env(device)
    try:
        yield dev
    finally:
        shutdown()


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


def shard_blocks(n: int, block: int, rank: int | None = None, size: int | None = None) -> range:
    """This rank's contiguous run of whole ``block``-sized pieces of ``range(n)``.

    The pieces are the batches a single process would form
    (``[0, block)``, ``[block, 2 * block)``, ...); ranks get whole pieces,
    contiguous and in order, differing by at most one piece. Keeping the
    single-process batches means every item meets exactly the same batch
    companions, so batch-size-dependent kernels give bit-identical outputs.
    """
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    pieces = shard(-(-n // block), rank, size)
    return range(min(pieces.start * block, n), min(pieces.stop * block, n))


def gather_to(obj: T, dst: int = 0) -> list[T] | None:
    """Every rank's ``obj`` in rank order on rank ``dst`` only (``None`` elsewhere; ``[obj]`` alone).

    Cheaper than :func:`gather` for large payloads that one rank consumes.
    """
    if not active():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


class PeerError(RuntimeError):
    """Raised on the ranks that did not fail when another rank's work raised."""


def told_everyone(exc: BaseException) -> bool:
    """True for an error every rank raised together (:func:`collect`, :func:`check_same_module`).

    Rank 0 alone need report such an error.
    """
    return bool(getattr(exc, "_cnn_internals_collective", False))


def _module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t for _, t in sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items())]


def sync_module(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank's ``module`` the parameters and buffers of rank ``src`` (no-op alone).

    For models built without saved weights: every process draws its own
    random initialisation (PyTorch seeds each process differently), and the
    ranks must run one model for their results to combine.
    """
    if not active():
        return
    # NCCL moves only GPU tensors: CPU ones go through this rank's GPU.
    via = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    with torch.no_grad():
        for t in _module_tensors(module):
            if (via is None or t.device == via) and t.is_contiguous():
                dist.broadcast(t.data, src)
            else:
                buf = t.detach().to(via or t.device).contiguous()
                dist.broadcast(buf, src)
                t.data.copy_(buf)


def _fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter's and buffer's bytes, in name order: equal exactly when the tensors are."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for t in _module_tensors(module):
            digest.update(str((t.dtype, tuple(t.shape))).encode())
            # Bytes, not values: NaN equals NaN, and any dtype (bfloat16 too) works.
            digest.update(t.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_same_module(module: torch.nn.Module, what: str = "model") -> None:
    """Raise the same error on every rank if the ranks' ``module`` weights differ (no-op alone)."""
    if not active():
        return
    prints = gather(_fingerprint(module))
    differ = [r for r, fp in enumerate(prints) if fp != prints[0]]
    if differ:
        err = ValueError(
            f"rank(s) {', '.join(map(str, differ))} hold a {what} with other weights than rank 0 (a random "
            "initialisation differs per process); load the same weights on every rank (--weights or a pretrained "
            "model), or call interp.parallel.sync_module(model) after building it"
        )
        err._cnn_internals_collective = True
        raise err


def collect(fn: Callable[[], T], dst: int | None = None) -> list[T] | None:
    """Run ``fn`` on every rank and gather the results, failing together.

    Parameters
    ----------
    fn:
        This rank's work.
    dst:
        ``None``: every rank gets the list; a rank number: only that rank does
        (others get ``None``).

    Returns
    -------
    list or None
        ``fn()`` of every rank, in rank order (``[fn()]`` alone).

    Raises
    ------
    Exception
        If ``fn`` raised on any rank, every rank raises instead of waiting
        forever in a collective the failed rank never joins: that rank its own
        exception, the others :class:`PeerError` with the same message.
    """
    if not active():
        return [fn()]
    try:
        value, error, failure = fn(), None, None
    except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
        value, error, failure = None, exc, f"{type(exc).__name__}: {exc}"
    if dst is None:
        got = gather((failure, value if failure is None else None))
        failures, values = [g[0] for g in got], [g[1] for g in got]
    else:
        failures, values = gather(failure), None
    bad = [(r, f) for r, f in enumerate(failures) if f is not None]
    if bad:
        rank, message = bad[0]
        if error is not None:
            error._cnn_internals_collective = True
            raise error
        err = PeerError(f"rank {rank} failed: {message}")
        err._cnn_internals_collective = True
        raise err
    if dst is not None:
        values = gather_to(value, dst)
    return values


def work_queue(n: int) -> Iterator[int]:
    """Hand out ``range(n)`` to the ranks, each index to exactly one rank, first come first served.

    A collective: every rank calls it, with the same ``n``.
    Ranks take the next index as they finish one (an atomic counter in the
    process group's key-value store), so a rank that drew cheap items takes
    more of them; put the costliest items first. Alone: ``0, 1, ..., n-1``.
    Falls back to round-robin when the store cannot be reached.
    """
    if not active():
        return iter(range(n))
    # A fresh counter name from rank 0: torchrun's store outlives restarted
    # workers, whose counters would otherwise start where the last ones ended.
    key = broadcast(f"cnn-internals/queue/{uuid.uuid4().hex}" if is_main() else None)
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a private accessor: fall back to a fixed share
        store = None
    if store is None:
        rank, size = world()
        return iter(range(rank, n, size))
    return _draw(store, key, n)


def _draw(store: Any, key: str, n: int) -> Iterator[int]:
    while True:
        i = int(store.add(key, 1)) - 1
        if i >= n:
            return
        yield i

"""Private utilities of the engine: leave the user's model as found, write files atomically, show progress.

Model state
    Every engine entry point that runs a model goes through :func:`preserved`:
    it records each submodule's ``training`` flag and restores it on exit,
    whether the body returned or raised. Hooks the engine registers itself are
    removed through :class:`HookSet`, so a leftover hook is impossible even if
    a hook raises.
Files
    Every file the engine writes (panels, JSON) goes through
    :func:`atomic_writer`: the bytes go to a temporary file in the target
    folder, which is renamed over the target only once complete, and removed
    on any error. The file gets the usual permissions (0666 less the umask),
    not the 0600 of ``tempfile.mkstemp``.
Progress
    The one-process cores (:func:`interp.mine.mine_local`,
    :func:`interp.draw.visualize.visualize_local`) draw no progress bar; the
    public wrappers (:mod:`interp.api`, :mod:`interp.sharded`) add one with
    :func:`progress_bar`, :func:`counted` and :func:`progress_reporter`.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm


class StopForward(Exception):
    """Raised by a forward hook to skip the rest of a forward pass once the needed layer ran."""


class HookSet:
    """A group of hook handles removed together; use as a context manager."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def forward(self, module: nn.Module, hook: Callable) -> None:
        """Register a forward hook ``hook(module, inputs, output)``."""
        self._handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@contextlib.contextmanager
def preserved(model: nn.Module, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Run a block on ``model`` and restore every module's ``training`` flag.

    Parameters
    ----------
    model:
        The user's model.
    eval_mode:
        Put the model in eval mode for the block (BatchNorm uses its running
        statistics, dropout is off), so results do not depend on which other
        images share a batch.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        if eval_mode:
            model.eval()
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def model_device(model: nn.Module, default: torch.device | None = None) -> torch.device:
    """Device of the model's first parameter or buffer (``default`` if none)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return default if default is not None else torch.device("cpu")


# --------------------------------------------------------------------------- files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically; returns the path."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_writer(path, "wb") as fh:
        fh.write(raw)
    return Path(path)


# --------------------------------------------------------------------------- progress


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr that disappears when closed; ``enabled=False`` gives a silent one."""
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, disable=not enabled)


def counted(batches: Iterable[Any], bar: tqdm) -> Iterator[Any]:
    """``batches`` of ``(images, dataset indices)`` (or ``None``) unchanged, ``bar`` moved on by each one's images.

    The bar moves when the next batch is asked for, i.e. once the consumer
    has processed the previous one, so it counts finished images.
    """
    for batch in batches:
        yield batch
        if batch is not None:
            bar.update(len(batch[1]))


@contextlib.contextmanager
def progress_reporter(desc: str, unit: str, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """Yield ``report(done, total)``: a bar made on the first report (when the total is known), closed on exit."""
    bars: list[tqdm] = []

    def report(done: int, total: int) -> None:
        if not bars:
            bars.append(progress_bar(total, desc, unit, enabled))
        bars[0].update(max(0, done - bars[0].n))

    try:
        yield report
    finally:
        for bar in bars:
            bar.close()

"""Leave the user's model exactly as we found it.

Every engine entry point that runs a model goes through :func:`preserved`:
it records each submodule's ``training`` flag and the ids of the hooks already
registered, and restores both on exit, whether the body returned or raised.
Hooks the engine registers itself are also removed through
:class:`HookSet`, so a leftover hook is impossible even if a hook raises.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn


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

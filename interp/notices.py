"""Warnings the engine gives when it cannot handle something exactly.

Everything the engine approximates or cannot analyse says so once, through
one of these categories, so that a caller (the CLI, the gallery) can collect
them per layer with :func:`warnings.catch_warnings` and show them, and a
user can filter them by category.
"""
from __future__ import annotations

__all__ = [
    "EngineWarning",
    "UnknownNonlinearityWarning",
    "MeasuredFieldWarning",
    "GlobalContextWarning",
]


class EngineWarning(UserWarning):
    """Base class: a result the engine could not compute exactly as documented."""


class UnknownNonlinearityWarning(EngineWarning):
    """A nonlinearity without a deconvnet / guided rule kept its plain gradient."""


class MeasuredFieldWarning(EngineWarning):
    """A receptive field was measured (gradient support), not derived exactly."""


class GlobalContextWarning(EngineWarning):
    """A layer sees the whole input through a global-context path (e.g. squeeze-and-excitation);
    panels and crops use its local field through the spatial path."""

"""Per-layer receptive fields for mining, and what the engine could not do exactly there.

:func:`layer_fields` computes each mined layer's receptive field
(:func:`interp.receptive_field`) with :func:`collected_notes` around it, so
every :class:`interp.notices.EngineWarning` it raises becomes a note of that
layer (``LayerInfo.notes``) that the CLI and the gallery show once per layer.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

from torch import nn

from . import rf as rf_engine  # looked up per call: a test may stand in for it
from .notices import EngineWarning

__all__ = ["collected_notes", "layer_fields"]


@contextmanager
def collected_notes(caught_too: list | None = None) -> Iterator[list[str]]:
    """Record the :class:`EngineWarning` messages raised inside, each once, into the yielded list.

    Other warnings are passed on unchanged when the block ends;
    ``caught_too`` (a list) also receives each recorded engine warning's
    ``warnings.WarningMessage`` (to raise it again later). Used per
    layer, so that what the engine could not do exactly is said once per
    layer (``LayerInfo.notes``, the gallery, the CLI) and not as a stream of
    anonymous warnings. ``warnings.catch_warnings`` is process-wide: a
    warning another thread raises meanwhile is recorded too (and passed on
    unless it is an engine warning).
    """
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the same warning for the next layer must be seen again
        yield notes
    for w in caught:
        if not issubclass(w.category, EngineWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif str(w.message) not in notes:
            notes.append(str(w.message))
            if caught_too is not None:
                caught_too.append(w)


def layer_fields(model: nn.Module, names: list[str], input_size: tuple[int, int],
                 in_channels: int, caught: list | None = None) -> dict[str, dict]:
    """Per layer: what :class:`LayerInfo` stores about its receptive field, and its notes.

    Each layer's field is computed on its own, inside
    :func:`warnings.catch_warnings`, so that every :class:`EngineWarning` it
    raises (a measured field, a global-context path) lands in that layer's
    ``notes`` instead of a stream of anonymous warnings; other warnings pass
    on. A layer whose exact field is global through a global-context path
    (``ReceptiveField.local`` set: squeeze-and-excitation) gets its local
    field through the spatial path for boxes and crops (``rf_local``).
    ``caught`` (a list) receives the recorded engine warnings themselves.
    """
    out: dict[str, dict] = {}
    for n in names:
        failed = None
        with collected_notes(caught) as notes:
            try:
                rf = rf_engine.receptive_field(model, n, input_size, in_channels)
            except Exception as exc:  # noqa: BLE001 - boxes are optional for mining itself
                rf, failed = None, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if rf is None:
            notes.append(f"no receptive field ({failed}); crops and boxes unavailable")
        info: dict = {"notes": notes}
        if rf is not None:
            local = getattr(rf, "local", None)  # set by interp.rf for global-context layers
            spatial = local if local is not None else rf
            # The field's own notes, unless a warning already said them (its message quotes them).
            notes.extend(n for n in rf.notes if not any(n in m for m in notes))
            if local is not None and not notes:  # say it even if interp.rf did not
                notes.append("exact receptive field: the whole input (a global-context path such as "
                             "squeeze-and-excitation); crops and boxes show the local field through the "
                             f"spatial path, {spatial.size[0]}x{spatial.size[1]} px")
            if getattr(rf, "measured", False) and not notes:
                notes.append("receptive field measured from gradient support, not derived from the layers")
            # ``spatial`` itself goes along: its box() knows exact per-unit
            # intervals where one size and stride do not describe the field (upsampling).
            info.update(spatial=spatial, size=tuple(spatial.size), stride=tuple(spatial.stride),
                        offset=tuple(spatial.offset),
                        is_global=bool(spatial.is_global), local=local is not None,
                        measured=bool(getattr(rf, "measured", False)))
        info["notes"] = list(dict.fromkeys(str(v) for v in notes))
        out[n] = info
    return out

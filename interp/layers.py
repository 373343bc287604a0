"""Layer addressing: which names a user may pass as ``layer``.

A layer name is

* a module path from ``model.named_modules()`` (``"features.12"``,
  ``"layer2.1.conv2"``), meaning the output of that module's first call;
* where the model is fx-traceable, the name of a functional node
  (``"layer1.0.add"``, ``"inception3a.cat"``), or ``<module path>_N`` for the
  N-th later call of a module that is called several times;
* a key of ``model.layer_aliases`` (a dict an adapter may define);
* ``"convN"``: the N-th ``nn.Conv2d`` in forward order (1-based), when the
  model has no module of that name. This gives every CNN the numbering the
  original "CNN Internals" figures use.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from torch import nn

from ._trace import try_trace


@dataclass(frozen=True)
class LayerRef:
    """A resolved layer: its canonical name and how to reach its output."""

    name: str
    module: nn.Module | None  # set when the name is a module path (first call)
    traced: bool  # True when only a traced graph node can produce it


def layers(model: nn.Module) -> list[str]:
    """All layer names of ``model`` that the engine accepts.

    Parameters
    ----------
    model:
        Any ``torch.nn.Module``; it is traced with torch.fx (not run).

    Returns
    -------
    list of str
        Every module path of ``model.named_modules()`` (the root excluded), then,
        where the model is fx-traceable, the functional nodes (``"layer1.0.add"``)
        and the later calls of reused modules (``"layer1.0.relu_1"``), in
        forward order.

    Examples
    --------
    >>> import torchvision, interp
    >>> names = interp.layers(torchvision.models.resnet18())
    >>> "layer1.0.conv1" in names and "layer1.0.add" in names
    True
    """
    _check_model(model)
    names = [name for name, _ in model.named_modules() if name]
    traced, _ = try_trace(model)
    if traced is not None:
        seen = set(names)
        extra = [n for n in traced.names if n not in seen]
        names.extend(extra)
    return names


def conv_layers(model: nn.Module) -> list[str]:
    """Names of the ``nn.Conv2d`` modules of ``model`` in forward order.

    Forward order comes from tracing; a model fx cannot trace falls back to
    registration order. This is what ``--layers all-conv`` and the ``convN``
    aliases use.

    Examples
    --------
    >>> import torchvision, interp
    >>> interp.conv_layers(torchvision.models.vgg11())[:2]
    ['features.0', 'features.3']
    """
    _check_model(model)
    convs = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and name}
    traced, _ = try_trace(model)
    order: list[str] = []
    if traced is not None:
        for name in traced.module_order:
            if name in convs and name not in order:
                order.append(name)
    # Convs never called in forward (or an untraceable model) keep registration order.
    order.extend(name for name, m in model.named_modules() if name in convs and name not in order)
    return order


def resolve_layer(model: nn.Module, layer: str) -> LayerRef:
    """Resolve a user-given layer name; unknown names raise ``ValueError``.

    The error lists the closest valid names, so a typo is one glance away.
    """
    _check_model(model)
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"layer must be a non-empty string, got {layer!r}")
    modules = dict(model.named_modules())
    if layer in modules and layer:
        return LayerRef(layer, modules[layer], traced=False)
    aliases = getattr(model, "layer_aliases", None) or {}
    if layer in aliases:
        return resolve_layer(model, aliases[layer])
    match = re.fullmatch(r"conv(\d+)", layer)
    if match:
        convs = conv_layers(model)
        n = int(match.group(1))
        if 1 <= n <= len(convs):
            return LayerRef(convs[n - 1], modules[convs[n - 1]], traced=False)
        raise ValueError(f"layer {layer!r}: the model has {len(convs)} Conv2d layers (conv1 ... conv{len(convs)})")
    traced, reason = try_trace(model)
    if traced is not None and layer in traced.names:
        return LayerRef(layer, None, traced=True)
    valid = layers(model) + list(aliases)
    close = difflib.get_close_matches(layer, valid, n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    extra = "" if traced is not None else f" (functional layers unavailable: model not fx-traceable: {reason})"
    raise ValueError(
        f"unknown layer {layer!r}{hint}. See interp.layers(model) or `cnn-internals layers MODEL`"
        f" for all {len(valid)} names{extra}."
    )


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")

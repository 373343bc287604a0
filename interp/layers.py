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

Selectors for many layers at once (:func:`interp.mine.resolve_layers`):
``all-conv`` (:func:`conv_layers`), ``all-blocks`` (:func:`block_layers`) and
``children:NAME`` (:func:`children_layers`).
"""
from __future__ import annotations

import difflib
import operator
import re
from dataclasses import dataclass

import torch
from torch import nn

from ._utils import HookSet, StopForward, model_device, preserved
from ._trace import try_trace

__all__ = ["LayerRef", "layers", "conv_layers", "block_layers", "children_layers", "layer_kind", "resolve_layer"]


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


def layer_kind(model: nn.Module, name: str) -> str:
    """What a layer is: the module's class (``"Conv2d"``, ``"BasicBlock"``) or a traced node's op (``"add"``).

    Examples
    --------
    >>> import torchvision
    >>> from interp.layers import layer_kind
    >>> m = torchvision.models.resnet18()
    >>> layer_kind(m, "layer1.0"), layer_kind(m, "layer1.0.add")
    ('BasicBlock', 'add')
    """
    ref = resolve_layer(model, name)
    if ref.module is not None:
        return type(ref.module).__name__
    traced, _ = try_trace(model)
    node = traced.names[ref.name]
    if node.op == "call_module":  # a later call of a reused module ("layer1.0.relu_1")
        return type(traced.root.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return str(node.target)
    # ``out += identity`` traces as operator.iadd; say "add" as the node name does.
    target = {operator.iadd: operator.add, operator.imul: operator.mul}.get(node.target, node.target)
    return re.sub(r"^_+|_+$", "", getattr(target, "__name__", str(target))) or "op"


# -- block selection ------------------------------------------------------------

def _is_leaf(m: nn.Module) -> bool:
    return next(m.children(), None) is None


def _is_list(m: nn.Module) -> bool:
    return isinstance(m, (nn.Sequential, nn.ModuleList))


def _is_stage(m: nn.Module) -> bool:
    """A Sequential/ModuleList holding more than one non-leaf module."""
    return _is_list(m) and sum(not _is_leaf(c) for c in m.children()) > 1


def _holds_deep_stage(m: nn.Module) -> bool:
    """``m`` has a stage child whose blocks hold non-leaf modules themselves.

    True for timm's ``ConvNeXtStage`` (``blocks`` of ConvNeXt blocks with an
    ``mlp`` inside), false for an MBConv's ``block`` (conv-norm-activation
    triples and a squeeze-excitation, each made of leaves only): the first is
    a stage wrapped with its downsampling, the second one block's layers.
    """
    for c in m.children():
        if _is_stage(c) and sum(not _is_leaf(b) and not all(_is_leaf(g) for g in b.children())
                                for b in c.children()) > 1:
            return True
    return False


def _stage_blocks(prefix: str, stage: nn.Module) -> list[str]:
    out: list[str] = []
    for name, child in stage.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if _is_leaf(child):
            continue
        if _is_list(child) and any(not _is_leaf(g) for g in child.children()):
            out += _stage_blocks(path, child)  # a nested stage (timm ``blocks.0``, efficientnet ``features.1``)
        elif _holds_deep_stage(child):
            out += _scope_blocks(path, child)
        else:
            out.append(path)
    return out


def _scope_blocks(prefix: str, scope: nn.Module) -> list[str]:
    children = list(scope.named_children())
    stages = [(n, c) for n, c in children if _is_stage(c)]
    if stages:  # stems, heads and other loose modules next to the stages are not blocks
        return [b for n, c in stages for b in _stage_blocks(f"{prefix}.{n}" if prefix else n, c)]
    inner = [(n, c) for n, c in children if not _is_leaf(c)]
    if len(inner) == 1:  # a wrapper around the real network
        n, c = inner[0]
        return _scope_blocks(f"{prefix}.{n}" if prefix else n, c)
    return _stage_blocks(prefix, scope)  # no stage: the scope's own modules are its blocks (GoogLeNet)


def block_layers(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """The model's blocks in forward order: what ``--layers all-blocks`` picks.

    Definition. A *stage* is an ``nn.Sequential`` or ``nn.ModuleList`` that
    holds more than one non-leaf module (a module with submodules). Starting
    at the root, the *blocks* are

    1. if some direct children of the root are stages: the non-leaf children
       of those stages (stems, heads and other modules beside the stages are
       not blocks); where such a child is itself a Sequential/ModuleList
       holding a non-leaf module it is a nested stage and its own non-leaf
       children are the blocks instead (timm ``blocks.0.0``, efficientnet
       ``features.1.0``); where it holds a stage of blocks that have non-leaf
       parts of their own (timm ``ConvNeXtStage``) the rule starts again
       inside it (``stages.0.blocks.0``);
    2. else, if the root has exactly one non-leaf child (a wrapper around
       the real network): the blocks of that child;
    3. else: the root's non-leaf children themselves (GoogLeNet:
       ``conv1`` ... ``inception5b``), as in rule 1.

    The walk never enters a block, so Sequentials inside a block (a
    Bottleneck's ``downsample``, an Inception module's branches, an MBConv's
    layers) are never stages. Only blocks whose output is a feature map
    (``N x C x H x W``) are kept, in the order the forward pass calls them
    (one forward on ``example``, default a zero 224 x 224 image; blocks it
    never runs, like GoogLeNet's auxiliary heads in eval mode, are dropped).

    Examples
    --------
    >>> import torchvision
    >>> from interp.layers import block_layers
    >>> block_layers(torchvision.models.resnet18())[:3]
    ['layer1.0', 'layer1.1', 'layer2.0']
    """
    _check_model(model)
    return _four_d(model, _scope_blocks("", model), example)


def children_layers(model: nn.Module, name: str, example: torch.Tensor | None = None) -> list[str]:
    """Direct children of module ``name`` with a feature-map output, in forward order (``children:NAME``)."""
    ref = resolve_layer(model, name)
    if ref.module is None:
        raise ValueError(f"children:{name}: {name!r} is a functional node, not a module with children")
    kids = [f"{ref.name}.{n}" for n, _ in ref.module.named_children()]
    if not kids:
        raise ValueError(f"children:{name}: module {ref.name!r} ({type(ref.module).__name__}) has no children")
    return _four_d(model, kids, example)


def _four_d(model: nn.Module, names: list[str], example: torch.Tensor | None) -> list[str]:
    """``names`` whose (first-call) output is 4-D, in call order, from one forward pass.

    If the forward fails part way (an input size the head does not accept)
    the modules it did not reach are kept in registration order: mining
    still checks every output.
    """
    if not names:
        return []
    modules = {n: model.get_submodule(n) for n in names}
    seen: dict[str, bool] = {}

    def hook_for(name: str):
        def hook(module, inputs, output):
            if name not in seen:
                seen[name] = isinstance(output, torch.Tensor) and output.ndim == 4
                if len(seen) == len(names):
                    raise StopForward
        return hook

    finished = True
    with preserved(model, eval_mode=True), torch.no_grad(), HookSet() as hooks:
        for n, m in modules.items():
            hooks.forward(m, hook_for(n))
        x = example if example is not None else _zero_image(model)
        try:
            model(x[:1].to(model_device(model)))
        except StopForward:
            pass
        except Exception:  # noqa: BLE001 - a probe; mining reports real errors itself
            finished = False
    out = [n for n, ok in seen.items() if ok]
    if not finished:
        out += [n for n in names if n not in seen]
    return out


def _zero_image(model: nn.Module) -> torch.Tensor:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return torch.zeros(1, first.in_channels if first is not None else 3, 224, 224)

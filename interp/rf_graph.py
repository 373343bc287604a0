"""Propagating per-axis fields through a traced graph.

:class:`ShapeRecorder` runs the traced graph once on a dummy input and keeps,
for every node, its output shape (tensors) or its concrete value (ints and
tuples computed from ``x.size()``: TF-style "same" padding, interpolation
sizes, split sections). :class:`GraphFields` then derives every node's
:class:`interp.rf_axes.NodeField`, following the tensor dims that carry the
rows and the columns through any shape op (view/reshape/flatten, permute,
chunk/split, cat/stack, indexing, pixel (un)shuffle), so channels-last blocks,
channel shuffles and space-to-depth stems keep local fields. Resampling ops
(interpolate, Upsample, ConvTranspose2d) are probed per axis; global
reductions mark the value ``glob`` and keep the local field of the spatial
path. Ops the rules do not know make the node ``unknown`` (its field is then
measured by :mod:`interp.rf_measure`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import rf_axes as ra
from .rf_axes import TensorInfo
from .rf_modules import module_field
from .rf_ops import OpRules, Unsupported, op_name


def record(value: Any) -> Any:
    """What :class:`ShapeRecorder` keeps of a value: shapes of tensors, small values as they are."""
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(value.shape))
    if isinstance(value, torch.Size):
        return tuple(int(v) for v in value)
    if isinstance(value, (tuple, list)):
        return type(value)(record(v) for v in value) if not hasattr(value, "_fields") else [record(v) for v in value]
    if isinstance(value, (int, float, bool, str, slice, type(None), type(Ellipsis), torch.dtype, torch.device)):
        return value
    return None


class ShapeRecorder(fx.Interpreter):
    """Run a graph and record each node's shape or value (tensors are not kept).

    Unlike ``torch.fx.passes.shape_prop.ShapeProp`` it prints nothing when a
    node fails; the caller decides what the failure means.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n] = record(out)
        return out


def first_conv_channels(gm: fx.GraphModule) -> int | None:
    """Input channels of the first convolution the graph calls (module or functional)."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.Conv2d):
                return int(mod.in_channels)
        if node.op == "call_function" and node.target in (F.conv2d, torch.conv2d):
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(weight, fx.Node) and weight.op == "get_attr":
                w = _attr(gm, str(weight.target))
                if isinstance(w, torch.Tensor) and w.dim() == 4:
                    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
                    return int(w.shape[1]) * int(groups if isinstance(groups, int) else 1)
    return None


def _attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


class GraphFields:
    """Fields of all nodes of a graph whose shapes/values were recorded."""

    def __init__(self, gm: fx.GraphModule, values: dict[fx.Node, Any], names: dict[fx.Node, str]) -> None:
        self.gm = gm
        self.values = values
        self.names = names
        self.fields: dict[fx.Node, Any] = {}
        self.rules = OpRules(self)

    def where(self, node: fx.Node) -> str:
        """Public name of a node for notes."""
        return self.names.get(node, node.name)

    def shape(self, node: Any) -> tuple[int, ...] | None:
        """Recorded shape of a tensor node (``None`` for anything else)."""
        rec = self.values.get(node) if isinstance(node, fx.Node) else None
        return rec.shape if isinstance(rec, TensorInfo) else None

    def concrete(self, value: Any) -> Any:
        """``value`` (args, kwargs) with nodes replaced by their recorded shape/value."""
        return fx.node.map_arg(value, lambda n: self.values.get(n))

    def run(self) -> None:
        """Derive the field of every node, in graph order."""
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                shape = self.shape(node)
                if not self.fields and shape is not None and len(shape) == 4:
                    self.fields[node] = ra.NodeField((ra.identity_axis(2, shape[2]), ra.identity_axis(3, shape[3])))
                continue
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            inputs = [a for a in node.all_input_nodes if a in self.fields]
            rec = self.values.get(node)
            if not inputs or not _has_tensor(rec):
                continue
            out = self._field(node, inputs, rec)
            if out is not None:  # None: the output does not depend on the input (zeros_like)
                self.fields[node] = out

    def _field(self, node: fx.Node, inputs: list[fx.Node], rec: Any) -> Any:
        unknown = [self.fields[a] for a in inputs if _is_unknown(self.fields[a])]
        if unknown:
            return self._unknown(node, rec, _first_unknown(unknown[0]).unknown, inputs)
        known = [self.fields[a] for a in inputs]
        if all(isinstance(f, ra.NodeField) and f.axes is None for f in known):
            # No input has a local field (all come through global reductions or are constant):
            # whatever the op, neither has its output (ECA's Conv1d over channels, SE MLPs).
            glob = any(f.glob for f in known)
            one = ra.NodeField(None, glob, notes=_merged_notes(known))
            return [one] * len(rec) if isinstance(rec, (list, tuple)) else one
        try:
            if node.op == "call_module":
                out = module_field(self.rules, node, self.gm.get_submodule(node.target))
            else:
                out = self.rules.apply(node)
        except Unsupported as exc:
            return self._unknown(node, rec, f"{self.where(node)}: {exc}", inputs)
        except Exception as exc:  # noqa: BLE001
            # A rule met an argument form it does not expect: measure rather than guess.
            return self._unknown(node, rec, f"{self.where(node)}: {op_name(node)} not analysed ({exc})", inputs)
        notes = _merged_notes([self.fields[a] for a in inputs])
        for f in out if isinstance(out, list) else [out]:
            if isinstance(f, ra.NodeField):
                f.notes = dedupe_notes(notes + f.notes)
        return out

    def _unknown(self, node: fx.Node, rec: Any, reason: str | None, inputs: list[fx.Node]) -> Any:
        def one(info: Any) -> ra.NodeField:
            shape = info.shape if isinstance(info, TensorInfo) else None
            hint = None
            src = self.fields[inputs[0]]
            src_f = src if isinstance(src, ra.NodeField) else None
            src_dims = (src_f.dims() or src_f.hint) if src_f is not None else None
            in_shape = self.shape(inputs[0])
            if shape is not None and src_dims and in_shape is not None and len(in_shape) == len(shape):
                if all(in_shape[d] == shape[d] for d in src_dims):
                    hint = src_dims
            if hint is None and shape is not None and len(shape) == 4:
                hint = (2, 3)
            return ra.NodeField(None, unknown=reason or "not analysed", hint=hint)

        if isinstance(rec, (list, tuple)):
            return [one(r) for r in rec]
        return one(rec)


def _has_tensor(rec: Any) -> bool:
    if isinstance(rec, TensorInfo):
        return True
    return isinstance(rec, (list, tuple)) and any(_has_tensor(r) for r in rec)


def _is_unknown(f: Any) -> bool:
    if isinstance(f, list):
        return any(_is_unknown(g) for g in f)
    return isinstance(f, ra.NodeField) and f.unknown is not None


def _first_unknown(f: Any) -> ra.NodeField:
    if isinstance(f, list):
        return next(_first_unknown(g) for g in f if _is_unknown(g))
    return f


def _merged_notes(fields: list[Any]) -> list[str]:
    """Notes of all inputs, each once; of the global-context notes only the first
    (a layer after ten SE blocks says once that it sees global context)."""
    notes: list[str] = []
    for f in fields:
        for g in f if isinstance(f, list) else [f]:
            if isinstance(g, ra.NodeField):
                notes.extend(g.notes)
    return dedupe_notes(notes)


def dedupe_notes(notes: list[str]) -> list[str]:
    """``notes`` in order without repeats, keeping only the first global-context note."""
    out: list[str] = []
    seen_global = False
    for n in dict.fromkeys(notes):
        if n.startswith("global context"):
            if seen_global:
                continue
            seen_global = True
        out.append(n)
    return out


__all__ = ["TensorInfo", "ShapeRecorder", "GraphFields", "first_conv_channels", "record"]

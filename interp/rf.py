"""Receptive fields by symbolic tracing.

The model is traced with torch.fx and its shapes propagated on a dummy input;
then every node's receptive field ``(size, stride, offset)`` per spatial axis
is derived from its inputs' fields, op by op:

* convolution / max / average pooling (kernel, stride, padding, dilation,
  ``ceil_mode``, groups): ``size += (k_eff - 1) * stride``,
  ``offset -= pad * stride``, ``stride *= s`` with ``k_eff = d (k - 1) + 1``
  (``ceil_mode`` only adds units at the border; their fields hang over the
  padded image and :meth:`ReceptiveField.box` clips them);
* ``F.pad``: shifts the offset;
* ops whose output keeps the input's spatial shape (activations, BatchNorm,
  LRN, dropout, ``add``/``mul``, ``cat`` of branches): the *union* of the
  inputs' fields (a residual ``add`` sees what either branch sees);
* adaptive pooling whose output divides the input: an ordinary pooling;
  otherwise, and for global pooling, flatten and linear layers: the whole
  input (``is_global``; said in ``notes``).

Models fx cannot trace fall back to forward hooks on leaf modules composed in
call order; that ignores branching, and ``notes`` says so.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._state import HookSet, StopForward, model_device, preserved
from ._trace import Traced, try_trace
from .layers import resolve_layer


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of one layer's units on the input image.

    Unit ``(y, x)`` sees input rows ``offset[0] + y*stride[0]`` to
    ``offset[0] + y*stride[0] + size[0] - 1`` and the same for columns with
    index 1. ``offset`` may be negative (the field starts in the padding).

    Attributes
    ----------
    layer, size, stride, offset, input_size:
        As named; ``(rows, cols)`` pairs.
    output_size:
        Spatial size of the layer's output for ``input_size``.
    is_global:
        The units see the whole input (after global pooling, flatten, linear);
        :meth:`box` then returns the whole image.
    exact:
        False when part of the model could not be analysed and a rule was
        approximated; ``notes`` says which.
    notes:
        Human-readable remarks on approximations.
    """

    layer: str
    size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int]
    input_size: tuple[int, int]
    output_size: tuple[int, int] | None = None
    is_global: bool = False
    exact: bool = True
    notes: tuple[str, ...] = ()
    channel_fields: tuple[tuple[int, int, "ReceptiveField"], ...] = ()

    def for_channel(self, channel: int) -> "ReceptiveField":
        """The field of one channel.

        After a ``cat`` of branches (an Inception block) each channel comes
        from one branch and sees only that branch's field; ``size``/``offset``
        of the layer itself are the union over channels.
        """
        for start, end, rf in self.channel_fields:
            if start <= channel < end:
                return rf
        return self

    def box(
        self, y: int, x: int, clip: tuple[int, int] | None = None, channel: int | None = None
    ) -> tuple[int, int, int, int]:
        """Input box ``(top, left, bottom, right)`` seen by unit ``(y, x)``, half-open.

        Parameters
        ----------
        clip:
            ``(H, W)``: clip the box to the image ``[0, H) x [0, W)``.
        channel:
            Give the channel for the exact per-branch box after a ``cat``
            (default: the union over all channels).

        Examples
        --------
        >>> from interp.rf import ReceptiveField
        >>> rf = ReceptiveField("c", (3, 3), (2, 2), (-1, -1), (8, 8))
        >>> rf.box(0, 0), rf.box(0, 0, clip=(8, 8))
        ((-1, -1, 2, 2), (0, 0, 2, 2))
        """
        if channel is not None and self.channel_fields:
            return self.for_channel(channel).box(y, x, clip)
        if self.is_global:
            top, left = 0, 0
            bottom, right = self.input_size
        else:
            top = self.offset[0] + y * self.stride[0]
            left = self.offset[1] + x * self.stride[1]
            bottom, right = top + self.size[0], left + self.size[1]
        if clip is not None:
            h, w = clip
            top, left = max(top, 0), max(left, 0)
            bottom, right = min(bottom, h), min(right, w)
        return int(top), int(left), int(bottom), int(right)

    def to_dict(self) -> dict:
        """JSON-friendly dict."""
        return {
            "layer": self.layer,
            "size": list(self.size),
            "stride": list(self.stride),
            "offset": list(self.offset),
            "input_size": list(self.input_size),
            "output_size": list(self.output_size) if self.output_size else None,
            "is_global": self.is_global,
            "exact": self.exact,
            "notes": list(self.notes),
            "channel_fields": [
                {"channels": [a, b], "size": list(r.size), "offset": list(r.offset), "is_global": r.is_global}
                for a, b, r in self.channel_fields
            ],
        }


@dataclass
class _F:
    """Field along both axes; ``glob`` marks the whole input."""

    size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    offset: tuple[int, int] = (0, 0)
    glob: bool = False
    # Per-channel fields after a channel concat: ((start, end, _F), ...).
    # Kept through channel-wise ops (pooling, activations, BatchNorm), dropped
    # by anything that mixes channels.
    segments: tuple | None = None

    def window(self, k, s, p, d=(1, 1), channelwise: bool = False) -> "_F":
        segments = None
        if channelwise and self.segments:
            segments = tuple((a, b, f.window(k, s, p, d)) for a, b, f in self.segments)
        if self.glob:
            return _F(self.size, self.stride, self.offset, True, segments)
        size = tuple(self.size[i] + (d[i] * (k[i] - 1)) * self.stride[i] for i in range(2))
        offset = tuple(self.offset[i] - p[i] * self.stride[i] for i in range(2))
        stride = tuple(self.stride[i] * s[i] for i in range(2))
        return _F(size, stride, offset, False, segments)

    def shift(self, top: int, left: int) -> "_F":
        segments = tuple((a, b, f.shift(top, left)) for a, b, f in self.segments) if self.segments else None
        if self.glob:
            return _F(self.size, self.stride, self.offset, True, segments)
        offset = (self.offset[0] - top * self.stride[0], self.offset[1] - left * self.stride[1])
        return _F(self.size, self.stride, offset, False, segments)


def _union(fields: list[_F]) -> _F:
    if any(f.glob for f in fields):
        return _F(glob=True, stride=fields[0].stride)
    start = tuple(min(f.offset[i] for f in fields) for i in range(2))
    end = tuple(max(f.offset[i] + f.size[i] for f in fields) for i in range(2))
    stride = tuple(max(f.stride[i] for f in fields) for i in range(2))
    return _F(tuple(end[i] - start[i] for i in range(2)), stride, start)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1])) if len(v) else (0, 0)
    return (int(v), int(v))


def _conv_padding(padding, k, d) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        # torch pads (total // 2) before and the rest after.
        return tuple((d[i] * (k[i] - 1)) // 2 for i in range(2))
    return _pair(padding)


def _spatial(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape[2:]) if shape is not None else None


def _is_map(node: fx.Node) -> bool:
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return shape is not None and len(shape) == 4


def _local_module_field(mod: nn.Module, f: _F) -> _F | None:
    """Field after a conv, pooling or padding module; ``None`` for any other module."""
    if isinstance(mod, nn.Conv2d):
        k, s, d = _pair(mod.kernel_size), _pair(mod.stride), _pair(mod.dilation)
        return f.window(k, s, _conv_padding(mod.padding, k, d), d)
    if isinstance(mod, nn.MaxPool2d):
        k = _pair(mod.kernel_size)
        s = _pair(mod.stride if mod.stride is not None else mod.kernel_size)
        return f.window(k, s, _pair(mod.padding), _pair(mod.dilation), channelwise=True)
    if isinstance(mod, (nn.AvgPool2d, nn.LPPool2d)):
        k = _pair(mod.kernel_size)
        s = _pair(mod.stride if mod.stride is not None else mod.kernel_size)
        return f.window(k, s, _pair(getattr(mod, "padding", 0)), channelwise=True)
    if isinstance(mod, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)):
        pad = mod.padding if isinstance(mod.padding, (tuple, list)) else (mod.padding,) * 4
        return f.shift(pad[2], pad[0])
    return None


class _Propagator:
    """Receptive fields of all nodes of a traced, shape-propagated graph."""

    def __init__(self, traced: Traced, gm: fx.GraphModule) -> None:
        self.traced = traced
        self.gm = gm
        self.fields: dict[fx.Node, _F] = {}
        self.notes: dict[fx.Node, list[str]] = {}

    def run(self, upto: fx.Node | None) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" and not self.fields:
                self.fields[node] = _F()
                continue
            if node.op in ("call_module", "call_function", "call_method"):
                inputs = [a for a in node.all_input_nodes if a in self.fields]
                if not inputs:
                    continue
                notes: list[str] = []
                for a in inputs:
                    notes.extend(self.notes.get(a, []))
                f = self._rule(node, inputs, notes)
                if f is not None:
                    self.fields[node] = f
                    self.notes[node] = list(dict.fromkeys(notes))
            if upto is not None and node.name == upto.name:
                break

    # -- op rules -------------------------------------------------------
    def _rule(self, node: fx.Node, inputs: list[fx.Node], notes: list[str]) -> _F | None:
        first = self.fields[inputs[0]]
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            out = self._module_rule(mod, node, first, notes, str(node.target))
        else:
            out = self._function_rule(node, first, notes)
        if out is not None:
            return out
        return self._generic(node, inputs, notes)

    def _module_rule(self, mod: nn.Module, node, f: _F, notes, where: str) -> _F | None:
        local = _local_module_field(mod, f)
        if local is not None:
            return local
        if isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            return self._adaptive(node, f, notes, where)
        if isinstance(mod, (nn.ConvTranspose2d, nn.Upsample, nn.PixelShuffle)):
            notes.append(f"{where} ({type(mod).__name__}): upsampling not analysed; field taken as the whole input")
            return _F(glob=True, stride=f.stride)
        return None

    def _adaptive(self, node, f: _F, notes, where) -> _F:
        src = _spatial(node.all_input_nodes[0])
        dst = _spatial(node)
        if src and dst and len(src) == 2 and len(dst) == 2 and all(src[i] % dst[i] == 0 for i in range(2)):
            k = tuple(src[i] // dst[i] for i in range(2))
            if dst == (1, 1):
                notes.append(f"{where}: global pooling, units see the whole input")
                return _F(glob=True, stride=f.stride)
            return f.window(k, k, (0, 0), channelwise=True)
        notes.append(f"{where}: adaptive pooling {src} -> {dst} with uneven windows, field taken as the whole input")
        return _F(glob=True, stride=f.stride)

    def _function_rule(self, node: fx.Node, f: _F, notes) -> _F | None:
        t = node.target
        args, kw = node.args, node.kwargs

        def arg(i, name, default):
            return args[i] if len(args) > i else kw.get(name, default)

        if t is F.conv2d or t is torch.conv2d:
            w = _spatial(arg(1, "weight", None)) if isinstance(arg(1, "weight", None), fx.Node) else None
            if w is None:
                return None
            k, s, d = _pair(w), _pair(arg(3, "stride", 1)), _pair(arg(5, "dilation", 1))
            return f.window(k, s, _conv_padding(arg(4, "padding", 0), k, d), d)
        if t in (F.max_pool2d, torch.max_pool2d, F.avg_pool2d, getattr(torch._C._nn, "avg_pool2d", None)):
            k = _pair(arg(1, "kernel_size", 1))
            stride = arg(2, "stride", None)
            s = _pair(stride if stride not in (None, [], ()) else k)
            d = _pair(arg(4, "dilation", 1)) if t in (F.max_pool2d, torch.max_pool2d) else (1, 1)
            return f.window(k, s, _pair(arg(3, "padding", 0)), d, channelwise=True)
        if t in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            return self._adaptive(node, f, notes, self.traced.node_name(node) or node.name)
        if t is F.pad:
            pad = arg(1, "pad", ())
            if len(pad) >= 4:
                return f.shift(int(pad[2]), int(pad[0]))
            if len(pad) >= 2:
                return f.shift(0, int(pad[0]))
        return None

    @staticmethod
    def _cat_dim(node: fx.Node) -> int:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return dim + 4 if isinstance(dim, int) and dim < 0 else dim

    def _segments(self, node: fx.Node, parts: list[fx.Node]) -> tuple | None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
        out, start = [], 0
        for t in tensors:
            if not isinstance(t, fx.Node) or t not in self.fields:
                return None
            shape = getattr(t.meta.get("tensor_meta"), "shape", None)
            if shape is None:
                return None
            f = self.fields[t]
            if f.segments:  # nested concat: keep the finer split
                out.extend((start + a, start + b, g) for a, b, g in f.segments)
            else:
                out.append((start, start + shape[1], f))
            start += shape[1]
        return tuple(out)

    def _generic(self, node: fx.Node, inputs: list[fx.Node], notes) -> _F | None:
        maps = [a for a in inputs if _is_map(a)]
        out_spatial = _spatial(node)
        if out_spatial is None:
            return None  # not a tensor (size(), getattr, ...)
        where = self.traced.node_name(node) or node.name
        # A constant feature-map-shaped tensor (a learned positional bias,
        # a coordinate grid) makes the output depend on absolute position:
        # not a local, translation-equivariant field.
        fixed = [
            a for a in node.all_input_nodes
            if a not in self.fields and _is_map(a) and _spatial(a) not in (None, (1, 1))
        ]
        if fixed:
            notes.append(f"{where}: combines the input with a fixed position-dependent tensor; field taken as the whole input")
            return _F(glob=True, stride=self.fields[inputs[0]].stride)
        if len(out_spatial) == 2 and maps:
            same = [a for a in maps if _spatial(a) == out_spatial]
            gates = [a for a in maps if _spatial(a) == (1, 1) and out_spatial != (1, 1)]
            if same and len(same) + len(gates) == len(maps):
                if len(same) == 1 and not gates:
                    return self.fields[same[0]]  # pointwise: BN, activations, dropout, LRN
                union = _union([self.fields[a] for a in same + gates])
                if node.target is torch.cat and not gates and self._cat_dim(node) == 1:
                    union.segments = self._segments(node, same)
                return union
            notes.append(f"{where}: op {node.target} changes the spatial size in a way not analysed; field taken as the whole input")
            return _F(glob=True, stride=self.fields[inputs[0]].stride)
        # Output is no longer a feature map (flatten, linear, mean over H, W):
        # every output value mixes all positions.
        if maps:
            notes.append(f"{where}: {getattr(node.target, '__name__', node.target)} mixes all positions, units see the whole input")
        return _F(glob=True, stride=self.fields[inputs[0]].stride)


def _in_channels(model: nn.Module, order: list[str]) -> int:
    modules = dict(model.named_modules())
    for name in order:
        m = modules.get(name)
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def _dummy(model: nn.Module, input_size, in_channels: int | None, order: list[str], meta: bool = False) -> torch.Tensor:
    h, w = _pair(input_size)
    c = in_channels if in_channels is not None else _in_channels(model, order)
    # The model's own floating dtype: a float64 model refuses a float32 probe.
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    return torch.zeros(1, c, h, w, device="meta" if meta else model_device(model), dtype=dtype)


def _to_public(layer: str, f: _F, notes: list[str], input_size, output_size, exact: bool) -> ReceptiveField:
    h, w = _pair(input_size)
    channels = ()
    if f.segments:
        channels = tuple(
            (a, b, _to_public(f"{layer}[{a}:{b}]", g, [], input_size, output_size, exact)) for a, b, g in f.segments
        )
    if f.glob:
        return ReceptiveField(layer, (h, w), tuple(f.stride), (0, 0), (h, w), output_size, True, exact, tuple(notes), channels)
    return ReceptiveField(
        layer, tuple(f.size), tuple(f.stride), tuple(f.offset), (h, w), output_size, False, exact, tuple(notes), channels
    )


def receptive_fields(
    model: nn.Module,
    input_size: int | tuple[int, int] = (224, 224),
    layers: list[str] | None = None,
    in_channels: int | None = None,
) -> dict[str, ReceptiveField]:
    """Receptive fields of many layers at once (one trace, one shape pass).

    Parameters
    ----------
    layers:
        Names to report; default: every module whose output is a feature map,
        plus traced functional nodes producing feature maps.

    Returns
    -------
    dict
        layer name -> :class:`ReceptiveField`, in forward order.
    """
    traced, reason = try_trace(model)
    if traced is None:
        names = layers or [n for n, m in model.named_modules() if n and not list(m.children())]
        out = {}
        for name in names:
            try:
                out[name] = receptive_field(model, name, input_size, in_channels)
            except ValueError:
                if layers:
                    raise
        return out
    refs = [resolve_layer(model, n) for n in layers] if layers else None
    x_shape = tuple(_dummy(model, input_size, in_channels, traced.module_order, meta=True).shape)
    cache = traced.__dict__.setdefault("_rf_cache", {})
    if x_shape not in cache:
        cache[x_shape] = _propagate(model, traced, input_size, in_channels)
    gm, prop = cache[x_shape]
    by_node = {n.name: n for n in gm.graph.nodes}
    result: dict[str, ReceptiveField] = {}
    wanted = [r.name for r in refs] if refs else list(traced.names)
    for name in wanted:
        node = by_node.get(traced.names[name].name) if name in traced.names else None
        if node is None or node not in prop.fields or not _is_map(node):
            if refs:
                raise ValueError(f"layer {name!r} has no spatial output, so no receptive field")
            continue
        notes = prop.notes.get(node, [])
        result[name] = _to_public(name, prop.fields[node], notes, input_size, _spatial(node), exact=True)
    return result


def _propagate(model: nn.Module, traced: Traced, input_size, in_channels) -> tuple[fx.GraphModule, "_Propagator"]:
    with preserved(model, eval_mode=True), torch.no_grad():
        gm = fx.GraphModule(model, traced.graph)
        x = _dummy(model, input_size, in_channels, traced.module_order)
        try:
            from torch.fx.passes.shape_prop import ShapeProp

            ShapeProp(gm).propagate(x)
        except Exception as exc:
            raise ValueError(
                f"model forward failed on a dummy input of shape {tuple(x.shape)}: {exc}. "
                "Pass the input size the model expects (input_size=, --input-size)."
            ) from exc
        prop = _Propagator(traced, gm)
        prop.run(None)
    return gm, prop


def receptive_field(
    model: nn.Module,
    layer: str,
    input_size: int | tuple[int, int] = (224, 224),
    in_channels: int | None = None,
) -> ReceptiveField:
    """Receptive field of ``layer``'s units on an input of ``input_size``.

    Parameters
    ----------
    model:
        Any ``torch.nn.Module`` (left unchanged; traced, then run once on a
        zero image to learn shapes).
    layer:
        A name from :func:`interp.layers`.
    input_size:
        ``(H, W)`` of the input images (or one int for square inputs).
    in_channels:
        Input channels of the dummy image; default: the first conv's.

    Returns
    -------
    ReceptiveField

    Examples
    --------
    >>> import torchvision, interp
    >>> rf = interp.receptive_field(torchvision.models.vgg16(), "features.2", (224, 224))
    >>> rf.size, rf.stride, rf.offset
    ((5, 5), (1, 1), (-2, -2))
    >>> rf.box(0, 0, clip=(224, 224))
    (0, 0, 3, 3)
    """
    ref = resolve_layer(model, layer)
    traced, reason = try_trace(model)
    if traced is not None and ref.name in traced.names:
        return receptive_fields(model, input_size, [ref.name], in_channels)[ref.name]
    if ref.module is None:
        raise ValueError(f"layer {layer!r} cannot be analysed")
    return _by_hooks(model, ref.name, ref.module, input_size, in_channels, reason or "layer not in traced graph")


def _by_hooks(model, name, target, input_size, in_channels, reason) -> ReceptiveField:
    """Fallback for models fx cannot trace: compose leaf modules in call order."""
    calls: list[tuple[str, nn.Module, tuple, tuple]] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, inputs, output):
        ins = inputs[0].shape if inputs and isinstance(inputs[0], torch.Tensor) else None
        outs = output.shape if isinstance(output, torch.Tensor) else None
        calls.append((names[module], module, ins, outs))
        if module is target:
            raise StopForward

    leaves = [m for m in model.modules() if not list(m.children())]
    with preserved(model, eval_mode=True), torch.no_grad(), HookSet() as hooks:
        for m in set(leaves) | {target}:
            hooks.forward(m, hook)
        x = _dummy(model, input_size, in_channels, [])
        try:
            model(x)
        except StopForward:
            pass
    f = _F()
    notes = [f"model not fx-traceable ({reason}); field composed from modules in call order, ignoring branches"]
    out_size = None
    for mname, mod, ins, outs in calls:
        local = _local_module_field(mod, f)
        if local is not None:
            f = local
        elif ins is not None and outs is not None and (len(outs) != 4 or tuple(ins[2:]) != tuple(outs[2:])):
            if len(outs) == 4 and isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and all(
                ins[2 + i] % outs[2 + i] == 0 for i in range(2)
            ) and tuple(outs[2:]) != (1, 1):
                k = tuple(ins[2 + i] // outs[2 + i] for i in range(2))
                f = f.window(k, k, (0, 0))
            else:
                notes.append(f"{mname} ({type(mod).__name__}) treated as covering the whole input")
                f = _F(glob=True, stride=f.stride)
        if mod is target:
            out_size = tuple(outs[2:]) if outs is not None and len(outs) == 4 else None
            break
    warnings.warn(notes[0], stacklevel=3)
    return _to_public(name, f, notes, input_size, out_size, exact=False)

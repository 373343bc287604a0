"""Field rules per op: windows, resampling, normalisation, reductions, pointwise ops.

:class:`OpRules` is the dispatcher used by :class:`interp.rf_graph.GraphFields`:
one method per family of ops, keyed by the op's canonical name (``relu_``,
``F.relu`` and ``Tensor.relu`` are all ``relu``) or by module type.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from . import rf_axes as ra
from . import rf_shape as rs
from .rf_shape import Unsupported

__all__ = ["OpRules", "Unsupported", "op_name", "conv_padding", "pair", "arg"]

# Ops whose output at a position depends only on the inputs at that position
# (after broadcasting). Casts and copies are here too.
POINTWISE = set("""
add sub rsub mul truediv div floordiv mod pow neg abs relu relu6 gelu silu sigmoid tanh hardswish hardsigmoid
hardtanh leaky_relu elu selu celu mish softplus softsign tanhshrink exp expm1 log log1p sqrt rsqrt clamp clip
clamp_min clamp_max where dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout batch_norm
maximum minimum sign reciprocal erf square contiguous clone detach float double half bfloat16 to type type_as
requires_grad_ addcmul addcdiv lerp masked_fill prelu rrelu glu_ local_response_norm channel_shuffle
native_channel_shuffle sin cos iadd imul isub itruediv logsigmoid hardshrink softshrink threshold
gt lt ge le eq ne logical_and logical_or logical_not bitwise_and expand expand_as broadcast_to
stochastic_depth drop_path drop_block_fast_2d
""".split())
REDUCTIONS = set("mean sum amax amin max min std var norm logsumexp prod nansum nanmean median all any".split())
SHAPE = set("view reshape flatten unflatten squeeze unsqueeze view_as reshape_as".split())
PERMUTE = set("permute transpose swapaxes swapdims movedim moveaxis t".split())
CONSTANT = set("""
zeros_like ones_like full_like empty_like rand_like randn_like new_zeros new_ones new_full new_empty
""".split())


def op_name(node: fx.Node) -> str:
    """Canonical op name: ``F.relu``, ``torch.relu_``, ``x.relu()``, ``operator.add`` -> ``relu``/``add``."""
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    name = name.strip("_")
    if name.endswith("_") or (node.op == "call_method" and name.startswith("i") and name[1:] in POINTWISE):
        name = name.rstrip("_")
    return {"concat": "cat", "concatenate": "cat", "upsample": "interpolate", "upsample_nearest": "interpolate",
            "upsample_bilinear": "interpolate", "matmul": "matmul", "bmm": "matmul"}.get(name, name)


def arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1])) if len(v) else (0, 0)
    return (int(v), int(v))


def _norm_dim(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


class OpRules:
    """Field rules; ``g`` is the :class:`interp.rf_graph.GraphFields` being filled."""

    def __init__(self, g: Any) -> None:
        self.g = g

    # -- helpers ---------------------------------------------------------
    def first_input(self, node: fx.Node) -> tuple[ra.NodeField, tuple[int, ...]]:
        """Field and shape of the node's first tensor argument that has a field."""
        for a in node.all_input_nodes:
            f = self.g.fields.get(a)
            if isinstance(f, ra.NodeField):
                return f, self.g.shape(a)
        raise Unsupported("no analysable tensor input")

    def global_context(self, f: ra.NodeField, node: fx.Node, what: str, keep_local: bool) -> ra.NodeField:
        """Value that sees global context (``what``); keeps the spatial path's field if ``keep_local``."""
        note = f"global context from {self.g.where(node)} ({what})"
        if keep_local:
            return ra.NodeField(f.axes, True, None, f.cdim, None, list(f.notes) + [note])
        return ra.NodeField(None, True, None, f.cdim, None, list(f.notes) + [note])

    def apply(self, node: fx.Node) -> Any:
        """Field (or list of fields for tuple outputs) of a call_function / call_method ``node``."""
        name = op_name(node)
        args, kwargs = self.g.concrete(node.args), self.g.concrete(node.kwargs)
        if node.target is operator.getitem:
            return self._getitem(node, args)
        if node.target in (operator.add, operator.iadd) and isinstance(self.g.values.get(node), (list, tuple)):
            # Tuple concatenation (``parts[:2] + parts[3:]``): the fields follow their tensors.
            return [g for a in node.args for g in (self.g.fields.get(a) or [None] * len(self.g.values[a]))]
        for family, handler in self._families():
            if name in family:
                return handler(node, name, args, kwargs)
        raise Unsupported(f"op {name} not analysed")

    def _families(self) -> list[tuple[set, Callable]]:
        return [
            (CONSTANT, lambda *a: None), (POINTWISE, self._pointwise_op), (SHAPE, self._reshape_op),
            (PERMUTE, self._permute_op), (REDUCTIONS, self._reduction),
            ({"chunk", "split", "split_with_sizes", "tensor_split", "unbind"}, self._split),
            ({"cat", "stack"}, self._cat), ({"pad"}, self._pad_op), ({"interpolate"}, self._interpolate),
            ({"conv2d", "max_pool2d", "avg_pool2d", "lp_pool2d", "max_pool2d_with_indices"}, self._window_op),
            ({"conv_transpose2d"}, self._conv_transpose_op),
            ({"adaptive_avg_pool2d", "adaptive_max_pool2d"}, self._adaptive_op),
            ({"pixel_shuffle", "pixel_unshuffle"}, self._pixel_op),
            ({"softmax", "log_softmax", "normalize", "layer_norm", "group_norm", "instance_norm", "linear"},
             self._dim_op),
            ({"matmul", "scaled_dot_product_attention"}, self._matmul),
            ({"flip", "roll"}, self._reorder),
        ]

    def _reorder(self, node: fx.Node, name: str, args, kwargs) -> ra.NodeField:
        """``flip``/``roll``: positions are permuted along the named dims (fields follow them)."""
        f, shape = self.first_input(node)
        nd = len(shape)
        dims = arg(args, kwargs, 1 if name == "flip" else 2, "dims", None)
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if name == "flip" and len(args) > 2:  # x.flip(2, 3)
            dims = list(args[1:])
        shifts = arg(args, kwargs, 1, "shifts", 0) if name == "roll" else None
        shifts = [shifts] * len(dims) if isinstance(shifts, int) else list(shifts or [])
        if name == "roll" and not dims:
            raise Unsupported("roll of the flattened tensor")
        order = {}
        for i, d in enumerate(_norm_dim(int(d), nd) for d in dims):
            idx = np.arange(shape[d])
            order[d] = idx[::-1] if name == "flip" else np.roll(idx, int(shifts[i]))

        def one(ax: ra.Axis) -> ra.Axis:
            if ax.dim not in order:
                return ax
            src = order[ax.dim]
            return ra.Axis(ax.dim, ax.lo[src], ax.hi[src], None)

        if f.merged and f.axes[0].dim in order:
            raise Unsupported(f"{name} of flattened positions")
        out = f.map_axes(one)
        if f.segments and f.cdim in order:
            out.segments = None
        return out

    # -- pointwise -------------------------------------------------------
    def _pointwise_op(self, node: fx.Node, name: str, args, kwargs) -> Any:
        if name in ("expand_as", "type_as", "expand", "to") and isinstance(node.args[0], fx.Node):
            return self.pointwise(node, [node.args[0]])  # the other tensor only lends its shape/dtype
        return self.pointwise(node)

    def pointwise(self, node: fx.Node, inputs: list[fx.Node] | None = None) -> ra.NodeField:
        """Union of the inputs' fields after broadcasting to the output shape."""
        out_shape = self.g.shape(node)
        nd = len(out_shape)
        items = [(self.g.fields[a], self.g.shape(a)) for a in (inputs or node.all_input_nodes)
                 if isinstance(self.g.fields.get(a), ra.NodeField)]
        glob = any(f.glob for f, _ in items)
        local = []
        for f, shp in items:
            if f.axes is None:
                continue
            sh = nd - len(shp)
            axes = (f.axes[0].at(f.axes[0].dim + sh), f.axes[1].at(f.axes[1].dim + sh))
            if any(shp[ax.dim - sh] != out_shape[ax.dim] for ax in axes):
                raise Unsupported("broadcast along a spatial dim")
            local.append((f, axes, sh))
        if not local:
            return ra.NodeField(None, glob)
        if len({(ax[0].dim, ax[1].dim) for _, ax, _ in local}) > 1:
            raise Unsupported("inputs carry the spatial axes on different dims")
        axes = (ra.union([ax[0] for _, ax, _ in local]), ra.union([ax[1] for _, ax, _ in local]))
        out = ra.NodeField(axes, glob)
        f0, _, sh = local[0]
        if len(local) == 1 and not glob and f0.segments and len(items) == 1:
            out.segments = rs.remap(f0, {d: d + sh for d in range(nd)}).segments
            out.cdim = f0.cdim + sh
        return out

    # -- shape ops -------------------------------------------------------
    def _reshape_op(self, node: fx.Node, name: str, args, kwargs) -> ra.NodeField:
        f, shape = self.first_input(node)
        return rs.reshape(f, shape, self.g.shape(node))

    def _permute_op(self, node: fx.Node, name: str, args, kwargs) -> ra.NodeField:
        f, shape = self.first_input(node)
        rest, kw = args[1:], kwargs
        if name == "permute" and len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            rest = tuple(rest[0])
        method = {"t": "t", "swapdims": "swapaxes", "moveaxis": "movedim"}.get(name, name)
        mapping = rs.permutation(lambda t: getattr(t, method)(*rest, **kw), len(shape))
        return rs.remap(f, mapping)

    def _getitem(self, node: fx.Node, args) -> Any:
        src = node.args[0]
        f = self.g.fields.get(src)
        if isinstance(f, list):
            return f[args[1]]
        if not isinstance(f, ra.NodeField):
            raise Unsupported("indexing")
        return rs.index(f, args[1], self.g.shape(src), ra.TensorInfo)

    def _split(self, node: fx.Node, name: str, args, kwargs) -> list[ra.NodeField]:
        f, shape = self.first_input(node)
        rec = self.g.values[node]
        dim = _norm_dim(int(arg(args, kwargs, 1 if name == "unbind" else 2, "dim", 0)), len(shape))
        if name == "unbind":
            return rs.pieces(f, dim, [1] * shape[dim], len(shape), keep_dim=False)
        return rs.pieces(f, dim, [r.shape[dim] for r in rec], len(shape))

    def _cat(self, node: fx.Node, name: str, args, kwargs) -> ra.NodeField:
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        out_shape = self.g.shape(node)
        dim = _norm_dim(int(arg(args, kwargs, 1, "dim", 0)), len(out_shape))
        if name == "stack":
            # A new dim at ``dim``: every input's dims from ``dim`` on move by one.
            shifted = []
            for f, _ in self.parts(tensors):
                if isinstance(f, ra.NodeField):
                    shifted.append(rs.remap(f, {d: d + (d >= dim) for d in range(len(out_shape))}))
            axes = [f.axes for f in shifted if f.axes is not None]
            glob = any(f.glob for f in shifted)
            if not axes:
                return ra.NodeField(None, glob)
            return ra.NodeField((ra.union([a[0] for a in axes]), ra.union([a[1] for a in axes])), glob)
        return self._concat(node, tensors, dim, out_shape)

    def parts(self, tensors: Any) -> list[tuple[Any, tuple[int, ...] | None]]:
        """``(field, shape)`` of each tensor of a ``cat``/``stack`` argument (a list of
        nodes, or one node holding a tuple of tensors)."""
        if isinstance(tensors, fx.Node):
            recs = self.g.values.get(tensors) or []
            fields = self.g.fields.get(tensors) or [None] * len(recs)
            return [(f, getattr(r, "shape", None)) for f, r in zip(fields, recs)]
        return [(self.g.fields.get(t), self.g.shape(t)) if isinstance(t, fx.Node) else (None, None) for t in tensors]

    def _concat(self, node: fx.Node, tensors, dim: int, out_shape) -> ra.NodeField:
        parts = self.parts(tensors)
        with_axes = [f for f, _ in parts if isinstance(f, ra.NodeField) and f.axes is not None]
        glob = any(isinstance(f, ra.NodeField) and f.glob for f, _ in parts)
        if not with_axes:
            return ra.NodeField(None, glob)
        dims = with_axes[0].dims()
        if any(f.dims() != dims for f in with_axes):
            raise Unsupported("cat of inputs with spatial axes on different dims")
        if dim in dims:
            return self._concat_spatial(parts, dims.index(dim), glob)
        out = ra.NodeField((ra.union([f.axes[0] for f in with_axes]), ra.union([f.axes[1] for f in with_axes])), glob)
        segs, start = [], 0
        for f, shp in parts:
            if not isinstance(f, ra.NodeField) or f.axes is None or shp is None:
                segs = None
                break
            if f.segments and f.cdim == dim:  # nested concat: keep the finer split
                segs.extend((start + a, start + b, g) for a, b, g in f.segments)
            else:
                segs.append((start, start + shp[dim], ra.NodeField(f.axes, f.glob, notes=list(f.notes))))
            start += shp[dim]
        if segs and not glob:
            out.segments, out.cdim = tuple(segs), dim
        return out

    def _concat_spatial(self, parts, k: int, glob: bool) -> ra.NodeField:
        axes_k, other = [], []
        ref = next(f for f, _ in parts if isinstance(f, ra.NodeField) and f.axes is not None)
        for f, shp in parts:
            if isinstance(f, ra.NodeField) and f.axes is not None:
                axes_k.append(f.axes[k])
                other.append(f.axes[1 - k])
            else:  # a constant piece: positions that see nothing
                n = shp[ref.axes[k].dim]
                empty = np.full(n, ra.EMPTY_LO, np.int64)
                axes_k.append(ra.Axis(ref.axes[k].dim, empty, np.full(n, ra.EMPTY_HI, np.int64), None))
        cat = ra.concat(axes_k)
        oth = ra.union(other)
        return ra.NodeField((cat, oth) if k == 0 else (oth, cat), glob)

    def _pixel_op(self, node: fx.Node, name: str, args, kwargs) -> ra.NodeField:
        f, shape = self.first_input(node)
        r = int(arg(args, kwargs, 1, "upscale_factor" if name == "pixel_shuffle" else "downscale_factor"))
        return self.pixel(f, shape, name, r)

    def pixel(self, f: ra.NodeField, shape, name: str, r: int) -> ra.NodeField:
        nd = len(shape)
        if f.axes is None:
            return ra.NodeField(None, f.glob)
        if f.dims() != (nd - 2, nd - 1):
            raise Unsupported(f"{name} on a tensor whose last dims are not rows, columns")
        op = (lambda ax: ra.spread(ax, r)) if name == "pixel_shuffle" else (lambda ax: ra.group(ax, r))
        return ra.NodeField((op(f.axes[0]), op(f.axes[1])), f.glob)

    # -- windows, padding, resampling ---------------------------------------
    def window(self, node: fx.Node, f: ra.NodeField, k, s, p, d=(1, 1), channelwise: bool = False) -> ra.NodeField:
        """Field after a 2-D sliding window over dims ``(-2, -1)``."""
        out_shape = self.g.shape(node)
        if f.axes is None:
            return ra.NodeField(None, f.glob)
        nd = len(out_shape)
        if f.dims() != (nd - 2, nd - 1):
            raise Unsupported("a 2-D window over dims that are not rows, columns")
        out = f.map_axes(lambda ax: ra.window(ax, out_shape[ax.dim], k[ax.dim - nd + 2], s[ax.dim - nd + 2],
                                              p[ax.dim - nd + 2], d[ax.dim - nd + 2]))
        if not channelwise:
            out.segments = None
        return out

    def _window_op(self, node: fx.Node, name: str, args, kwargs) -> Any:
        f, _ = self.first_input(node)
        if name == "conv2d":
            w = arg(args, kwargs, 1, "weight")
            k = tuple(w.shape[2:])
            d = pair(arg(args, kwargs, 5, "dilation", 1))
            s = pair(arg(args, kwargs, 3, "stride", 1))
            return self.window(node, f, k, s, conv_padding(arg(args, kwargs, 4, "padding", 0), k, d), d)
        k = pair(arg(args, kwargs, 1, "kernel_size"))
        stride = arg(args, kwargs, 2, "stride", None)
        s = pair(stride if stride not in (None, [], ()) else k)
        d = pair(arg(args, kwargs, 4, "dilation", 1)) if "max" in name else (1, 1)
        out = self.window(node, f, k, s, pair(arg(args, kwargs, 3, "padding", 0)), d, channelwise=True)
        if isinstance(self.g.values.get(node), (list, tuple)):
            return [out, out]
        return out

    def _pad_op(self, node: fx.Node, name: str, args, kwargs) -> ra.NodeField:
        f, shape = self.first_input(node)
        return self.pad(f, shape, list(arg(args, kwargs, 1, "pad")), arg(args, kwargs, 2, "mode", "constant"))

    def pad(self, f: ra.NodeField, shape, pads: list[int], mode: str) -> ra.NodeField:
        """``F.pad``: pairs ``(before, after)`` from the last dim backwards."""
        nd = len(shape)
        amounts = {nd - 1 - i // 2: (int(pads[i]), int(pads[i + 1])) for i in range(0, len(pads), 2)}
        out = f.map_axes(lambda ax: ra.pad(ax, *amounts[ax.dim], mode) if ax.dim in amounts else ax)
        if f.segments and f.cdim in amounts:
            out.segments = None
        return out

    def probe(self, node: fx.Node, f: ra.NodeField, fn: Callable[[torch.Tensor], torch.Tensor]) -> ra.NodeField:
        """Field after a separable resampling of dims (2, 3), by probing ``fn`` axis by axis."""
        out_shape = self.g.shape(node)
        if f.axes is None:
            return ra.NodeField(None, f.glob)
        if len(out_shape) != 4 or f.dims() != (2, 3):
            raise Unsupported("resampling of a tensor whose dims 2, 3 are not rows, columns")
        n_in = (f.axes[0].n, f.axes[1].n)
        axes = []
        for k in (0, 1):
            dep = ra.dependence(fn, n_in, k)
            if dep.shape[1] != out_shape[2 + k]:
                raise Unsupported("resampling probe disagrees with the recorded shape")
            axes.append(ra.resample(f.axes[k], dep))
        return ra.NodeField((axes[0], axes[1]), f.glob, f.segments and tuple(
            (a, b, self.probe(node, g, fn)) for a, b, g in f.segments), f.cdim)

    def _interpolate(self, node: fx.Node, name: str, args, kwargs) -> ra.NodeField:
        f, _ = self.first_input(node)
        rest = tuple(args[1:])
        return self.probe(node, f, lambda t: F.interpolate(t, *rest, **kwargs))

    def _conv_transpose_op(self, node: fx.Node, name: str, args, kwargs) -> ra.NodeField:
        f, shape = self.first_input(node)
        w = arg(args, kwargs, 1, "weight")
        s = pair(arg(args, kwargs, 3, "stride", 1))
        p = pair(arg(args, kwargs, 4, "padding", 0))
        d = pair(arg(args, kwargs, 7, "dilation", 1))
        return self.conv_transpose(node, f, shape, tuple(w.shape[2:]), s, p, d)

    def conv_transpose(self, node: fx.Node, f: ra.NodeField, shape, k, s, p, d) -> ra.NodeField:
        """Transposed convolution: probed with a ones kernel and the output padding the
        recorded output size implies (it may come from ``output_size=`` in the forward)."""
        out = self.g.shape(node)
        base = [(shape[-2 + i] - 1) * s[i] - 2 * p[i] + d[i] * (k[i] - 1) + 1 for i in range(2)]
        op = tuple(out[-2 + i] - base[i] for i in range(2))
        kernel = torch.ones(1, 1, *k, dtype=torch.float64)
        out_f = self.probe(node, f, lambda t: F.conv_transpose2d(t, kernel, None, s, p, op, 1, d))
        out_f.segments = None
        return out_f

    def _adaptive_op(self, node: fx.Node, name: str, args, kwargs) -> ra.NodeField:
        f, _ = self.first_input(node)
        return self.adaptive(node, f)

    def adaptive(self, node: fx.Node, f: ra.NodeField) -> ra.NodeField:
        """Adaptive pooling: window ``i`` is ``[floor(i n / o), ceil((i+1) n / o))``; global when
        an axis is pooled to one position."""
        out_shape = self.g.shape(node)
        if f.axes is None:
            return ra.NodeField(None, f.glob)
        n_out = (out_shape[-2], out_shape[-1])
        if f.dims() != (len(out_shape) - 2, len(out_shape) - 1):
            raise Unsupported("adaptive pooling over dims that are not rows, columns")
        if any(f.axes[k].n > 1 and n_out[k] == 1 for k in (0, 1)):
            return self.global_context(f, node, "global pooling", keep_local=False)

        def one(ax: ra.Axis) -> ra.Axis:
            n, o = ax.n, n_out[ax.dim - len(out_shape) + 2]
            if n % o == 0:
                return ra.window(ax, o, n // o, n // o, 0)
            i = np.arange(o)
            start, end = (i * n) // o, -((-(i + 1) * n) // o)
            taps = start[:, None] + np.arange(int((end - start).max()))[None, :]
            return ra.gather(ax, taps, taps < end[:, None], None)

        return f.map_axes(one)

    # -- normalisation, softmax, linear: ops along given dims ---------------
    def _dim_op(self, node: fx.Node, name: str, args, kwargs) -> ra.NodeField:
        f, shape = self.first_input(node)
        nd = len(shape)
        if name in ("group_norm", "instance_norm"):
            return self.global_context(f, node, f"{name} statistics over positions", keep_local=True)
        if name == "linear":
            dims = {nd - 1}
        elif name == "layer_norm":
            dims = {nd - 1 - i for i in range(len(arg(args, kwargs, 1, "normalized_shape")))}
        else:
            dims = {_norm_dim(int(arg(args, kwargs, 2 if name == "normalize" else 1, "dim", 1)), nd)}
        return self.along(node, f, dims, name)

    def along(self, node: fx.Node, f: ra.NodeField, dims: set[int], name: str) -> ra.NodeField:
        """An op mixing values along ``dims``: local if no spatial dim is among them."""
        spatial = f.axes is not None and any(ax.dim in dims for ax in f.axes)
        if not spatial:
            out = ra.NodeField(f.axes, f.glob, f.segments if f.cdim not in dims else None, f.cdim)
            return out
        if name == "linear":  # the positions along that dim become features
            return self.global_context(f, node, "a linear layer across positions", keep_local=False)
        return self.global_context(f, node, f"{name} across positions", keep_local=True)

    def _reduction(self, node: fx.Node, name: str, args, kwargs) -> Any:
        f, shape = self.first_input(node)
        nd = len(shape)
        other = arg(args, kwargs, 1, "dim", None)
        if isinstance(other, ra.TensorInfo) or isinstance(kwargs.get("other"), ra.TensorInfo):  # torch.max(a, b)
            return self.pointwise(node)
        dims = other if other is not None else list(range(nd))
        dims = {_norm_dim(int(d), nd) for d in (dims if isinstance(dims, (tuple, list)) else [dims])}
        keep = bool(arg(args, kwargs, 2, "keepdim", False))
        if f.axes is not None and any(ax.dim in dims for ax in f.axes):
            out = self.global_context(f, node, f"{name} over positions", keep_local=False)
        else:
            mapping = {d: d if keep else d - sum(1 for r in dims if r < d) for d in range(nd) if keep or d not in dims}
            out = rs.remap(ra.NodeField(f.axes, f.glob, None, f.cdim), mapping)
        return [out, out] if isinstance(self.g.values.get(node), (list, tuple)) else out

    def _matmul(self, node: fx.Node, name: str, args, kwargs) -> ra.NodeField:
        """``A @ B`` contracts A's last and B's second-to-last dim: a spatial axis there
        means attention over positions (global context); A's rows / B's columns stay local."""
        out_shape = self.g.shape(node)
        nd = len(out_shape)
        ops = [a for a in node.args[:3] if isinstance(a, fx.Node)]
        local, glob, mixes = [], False, False
        for i, a in enumerate(ops):
            f = self.g.fields.get(a)
            if not isinstance(f, ra.NodeField):
                continue
            glob = glob or f.glob
            if f.axes is None:
                continue
            shp = self.g.shape(a)
            # A's last dim, B's (and for attention K's and V's) second-to-last dim are summed over.
            contracted = len(shp) - 1 if i == 0 else len(shp) - 2
            if any(ax.dim == contracted for ax in f.axes):
                mixes = True
                continue
            local.append(rs.remap(ra.NodeField(f.axes, f.glob), {d: d + nd - len(shp) for d in range(len(shp))}))
        if len(local) > 1:  # positions of both operands in one output: keep A's (the query side)
            mixes, local = True, local[:1]
        out = ra.NodeField(local[0].axes if local else None, glob or mixes)
        if mixes:
            out.notes = self.global_context(out, node, "attention / matrix product over positions", False).notes
        return out


def conv_padding(padding: Any, k, d) -> tuple[int, int]:
    """Leading padding of a convolution (``"same"``: torch pads ``total // 2`` first)."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        return tuple((d[i] * (k[i] - 1)) // 2 for i in range(2))
    return pair(padding)

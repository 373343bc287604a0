"""Receptive fields: traced and derived exactly where possible, measured otherwise.

The model is traced with torch.fx and run once on a dummy input (recording
every node's shape and every value computed from ``x.size()``); then each
node's field is derived per spatial axis as explicit input intervals for
every output position (:mod:`interp.rf_axes`), following the dims that carry
the rows and the columns through any shape op (:mod:`interp.rf_graph`,
:mod:`interp.rf_shape`, :mod:`interp.rf_ops`, :mod:`interp.rf_modules`):

* convolution / pooling (kernel, stride, padding incl. TF-style "same"
  computed in the forward, dilation, ``ceil_mode``): the classic
  ``size += (k_eff - 1) * stride``, ``offset -= pad * stride``,
  ``stride *= s``, plus exact per-unit intervals clipped to what is read;
* permute / view / reshape / flatten / chunk / split / cat / stack / indexing,
  flip / roll, pixel (un)shuffle and space-to-depth stems: the axes move with
  their dims (channels-last blocks, channel shuffles, tokens stay local);
* upsampling (``interpolate`` in every mode, ``Upsample``,
  ``ConvTranspose2d``): probed per axis, exact;
* global context (global pooling, squeeze-and-excitation gates, GroupNorm
  statistics, softmax over positions): the exact field is the whole input
  (``is_global``) and :attr:`ReceptiveField.local` gives the field through the
  spatial path (every globally reduced input taken as constant).

The per-unit intervals also end where the network stops reading: unpadded
strided layers leave the last rows of some inputs unread, and
``box(..., clip=(H, W))`` never includes them. A model plain fx cannot trace
is traced a second time with convolutions and pools kept whole (timm
``Conv2dSame`` computes its padding in the forward).

Where an op cannot be followed, or the model cannot be traced, the field is
*measured* as the gradient support of a positive twin of the model
(:mod:`interp.rf_measure`): ``measured=True, exact=False``, with a note and an
:class:`interp.notices.MeasuredFieldWarning`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from . import rf_axes as ra
from ._utils import model_device, preserved
from ._trace import Traced, try_trace
from .layers import resolve_layer
from .notices import GlobalContextWarning, MeasuredFieldWarning
from .rf_graph import GraphFields, ShapeRecorder, first_conv_channels
from .rf_measure import Measured, Target, measure

__all__ = ["ReceptiveField", "receptive_field", "receptive_fields"]

Span = tuple[int, int]
IRREGULAR = ("upsampling makes the field differ from unit to unit: size/stride/offset summarise it "
             "(largest size, mean stride); box() gives each unit's exact box")


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of one layer's units on the input image.

    Unit ``(y, x)`` sees input rows ``offset[0] + y*stride[0]`` to
    ``offset[0] + y*stride[0] + size[0] - 1`` and the same for columns with
    index 1. ``offset`` may be negative (the field starts in the padding).

    Attributes
    ----------
    layer, size, stride, offset, input_size:
        As named; ``(rows, cols)`` pairs. After upsampling the field is not
        one size and stride for all units: ``size`` is the largest, ``stride``
        the mean step (may be fractional) and :meth:`box` uses the exact
        per-unit intervals.
    output_size:
        Spatial size of the layer's output for ``input_size``.
    is_global:
        The units see the whole input (after global pooling, flatten, linear,
        or through a global-context path such as squeeze-and-excitation);
        :meth:`box` then returns the whole image.
    exact:
        False when the field was measured, or when ``size``/``stride``/``offset``
        only summarise a field that differs from unit to unit (after
        upsampling; :meth:`box` is still exact there); ``notes`` says why.
    notes:
        Human-readable remarks on approximations and global context.
    channel_fields:
        ``((start, end, ReceptiveField), ...)`` per channel range after a
        channel concatenation (Inception blocks); see :meth:`for_channel`.
    measured:
        The field is the measured gradient support of a positive twin of the
        model, not derived op by op.
    local:
        For a layer that sees global context: its field through the spatial
        path (every input derived through a global reduction taken as
        constant), ``is_global=False``; else ``None``.
    spans:
        Exact input interval ``(start, end)`` per output row and per output
        column (clipped to the image and to what the network reads); ``None``
        entries for units that read nothing. Used by :meth:`box` with ``clip``.
    regular:
        Per axis: one size and stride for all units (``box`` without ``clip``
        then gives the nominal box, which may hang over the padding); else
        ``box`` uses ``spans``.
    dims:
        The dims of the layer's output tensor that hold the rows and the
        columns: ``(2, 3)`` for NCHW maps, ``(1, 2)`` after a permute to NHWC
        (ConvNeXt MLPs), one dim twice for flattened positions (tokens,
        row-major); ``None`` when the output has no positions.
    """

    layer: str
    size: tuple[int, int]
    stride: tuple[Any, Any]
    offset: tuple[int, int]
    input_size: tuple[int, int]
    output_size: tuple[int, int] | None = None
    is_global: bool = False
    exact: bool = True
    notes: tuple[str, ...] = ()
    channel_fields: tuple[tuple[int, int, "ReceptiveField"], ...] = ()
    measured: bool = False
    local: "ReceptiveField | None" = None
    spans: tuple[tuple[Span | None, ...], tuple[Span | None, ...]] | None = field(
        default=None, repr=False, compare=False)
    regular: tuple[bool, bool] = field(default=(True, True), repr=False, compare=False)
    dims: tuple[int, int] | None = field(default=(2, 3), repr=False, compare=False)

    @property
    def spatial(self) -> "ReceptiveField":
        """The field panels and crops use: :attr:`local` where the layer sees global context, else itself."""
        return self.local if self.local is not None else self

    @property
    def read_extent(self) -> tuple[Span, Span] | None:
        """Input rows ``[start, end)`` and columns the layer's units read at all."""
        if self.spans is None:
            return None
        out = []
        for axis in self.spans:
            spans = [s for s in axis if s is not None]
            if not spans:
                return None
            out.append((min(s[0] for s in spans), max(s[1] for s in spans)))
        return out[0], out[1]

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
            ``(H, W)``: clip the box to the image ``[0, H) x [0, W)``; for the
            analysed input size also to the rows and columns the unit really
            reads (a network with unpadded strided layers never reads the
            last rows of some inputs).
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
            return 0, 0, int(self.input_size[0]), int(self.input_size[1])
        box = [0, 0, 0, 0]
        for k, pos in ((0, y), (1, x)):
            span = self._span(k, pos)
            if self.regular[k] or span is None:
                start = self.offset[k] + pos * self.stride[k]
                box[k], box[k + 2] = int(start), int(start + self.size[k])
            else:
                box[k], box[k + 2] = span
            if clip is not None:
                box[k], box[k + 2] = max(box[k], 0), min(box[k + 2], clip[k])
                if span is not None and tuple(clip) == tuple(self.input_size):
                    box[k], box[k + 2] = max(box[k], span[0]), min(box[k + 2], span[1])
        return box[0], box[1], box[2], box[3]

    def _span(self, axis: int, pos: int) -> Span | None:
        if self.spans is None or not 0 <= pos < len(self.spans[axis]):
            return None
        return self.spans[axis][pos]

    def to_dict(self) -> dict:
        """JSON-friendly dict."""
        spatial = self.spatial
        return {
            "layer": self.layer,
            "size": list(self.size),
            "stride": list(self.stride),
            "offset": list(self.offset),
            "input_size": list(self.input_size),
            "output_size": list(self.output_size) if self.output_size else None,
            "is_global": self.is_global,
            "exact": self.exact,
            "measured": self.measured,
            "notes": list(self.notes),
            "channel_fields": [
                {"channels": [a, b], "size": list(r.size), "offset": list(r.offset), "is_global": r.is_global}
                for a, b, r in self.channel_fields
            ],
            "local": self.local.to_dict() if self.local is not None else None,
            "spatial": {"size": list(spatial.size), "stride": list(spatial.stride), "offset": list(spatial.offset),
                        "is_global": spatial.is_global},
            "read_extent": [list(e) for e in self.read_extent] if self.read_extent else None,
            "dims": list(self.dims) if self.dims else None,
        }


# -- conversion ------------------------------------------------------------------
def _summary(ax: ra.Axis, n_in: int) -> tuple[int, Any, int]:
    """``(size, stride, offset)`` of an axis: its nominal form, or a summary of irregular
    intervals (after upsampling): the largest interval, the mean step ``n_in / n_out`` (may be
    fractional) and the offset that puts the centre unit's interval at its place."""
    if ax.aff is not None:
        return ax.aff
    valid = ax.lo < ax.hi
    if not valid.any():
        return 0, 1, 0
    step = n_in / ax.n
    stride = int(step) if float(step).is_integer() else round(float(step), 4)
    c = (ax.n - 1) // 2
    lo_c = int(ax.lo[c]) if valid[c] else int(ax.lo[valid][0])
    return int((ax.hi[valid] - ax.lo[valid]).max()), stride, int(round(lo_c - c * step))


def _spans(ax: ra.Axis) -> tuple[Span | None, ...]:
    return tuple((int(a), int(b)) if a < b else None for a, b in zip(ax.lo, ax.hi))


def _local_public(layer: str, axes: tuple[ra.Axis, ra.Axis], nf: ra.NodeField, input_size, output_size, exact: bool,
                  measured: bool, notes: tuple[str, ...]) -> ReceptiveField:
    rows, cols = _summary(axes[0], input_size[0]), _summary(axes[1], input_size[1])
    regular = (axes[0].aff is not None, axes[1].aff is not None)
    if not all(regular):
        # The spans (and box()) stay exact; the (size, stride, offset) summary does not, and a
        # crop aligned to this stride would not line up with the coarser grids upsampled here.
        exact = False
        notes = notes + (IRREGULAR,)
    channels = ()
    if nf.segments:
        channels = tuple((a, b, _to_public(f"{layer}[{a}:{b}]", g, input_size, output_size, exact, measured, ()))
                         for a, b, g in nf.segments)
    return ReceptiveField(layer, (rows[0], cols[0]), (rows[1], cols[1]), (rows[2], cols[2]), tuple(input_size),
                          output_size, False, exact, notes, channels, measured, None,
                          (_spans(axes[0]), _spans(axes[1])), regular, (axes[0].dim, axes[1].dim))


def _to_public(layer: str, nf: ra.NodeField, input_size, output_size, exact: bool, measured: bool,
               notes: tuple[str, ...]) -> ReceptiveField:
    """Public field of one graph value."""
    h, w = input_size
    if not nf.glob:
        return _local_public(layer, nf.axes, nf, input_size, output_size, exact, measured, notes)
    local = None
    stride: tuple[Any, Any] = (h, w)
    context = tuple(n for n in notes if n.startswith("global context"))
    others = tuple(n for n in notes if not n.startswith("global context"))
    if nf.axes is not None:
        local = _local_public(layer, nf.axes, ra.NodeField(nf.axes), input_size, output_size, exact, measured, others)
        stride = local.stride
        tail = ("; the exact field is the whole input, `local` (and `spatial`) is the field through the spatial "
                "path, taking what the global reduction computes as constant")
    else:
        tail = "; units see the whole input"
    notes = tuple(n + tail for n in context) + others
    whole = ((0, h),), ((0, w),)
    dims = local.dims if local is not None else ((2, 3) if output_size else None)
    return ReceptiveField(layer, (h, w), stride, (0, 0), (h, w), output_size, True, exact, notes, (), measured,
                          local, whole, (True, True), dims)


def _output_size(nf: ra.NodeField, shape: tuple[int, ...] | None) -> tuple[int, int] | None:
    if nf.axes is not None:
        return nf.axes[0].n, nf.axes[1].n
    if shape is not None and len(shape) == 4:
        return shape[2], shape[3]
    return None


# -- analysis --------------------------------------------------------------------
@dataclass
class _Analysis:
    """One model analysed at one input size (cached on the trace)."""

    traced: Traced | None
    x_shape: tuple[int, ...] | None
    fields: GraphFields | None
    failure: str | None  # why the graph could not be analysed at all
    leaf_trace: bool = False  # traced with whole conv/pool modules (plain fx failed)
    measured: dict[str, Measured | str] = field(default_factory=dict)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[-1])
    return int(v), int(v)


def _channel_candidates(model: nn.Module, gm: fx.GraphModule | None, in_channels: int | None) -> list[int]:
    """Input channels to try: the given ones, else the first conv the graph calls, the first
    conv in module order, 3."""
    if in_channels is not None:
        return [int(in_channels)]
    out = [first_conv_channels(gm)] if gm is not None else []
    out.append(next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None))
    out.append(3)
    return list(dict.fromkeys(c for c in out if c))


def _first_line(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _dummy(model: nn.Module, c: int, h: int, w: int) -> torch.Tensor:
    # The model's own floating dtype: a float64 model refuses a float32 probe.
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    return torch.zeros(1, c, h, w, device=model_device(model), dtype=dtype)


# Convolutions and pools stay whole in a second trace when the plain one fails: a
# subclass that computes its padding in the forward (timm Conv2dSame,
# MaxPool2dSame) is what most often stops fx, and their rules infer that padding.
_LEAVES = (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d, nn.AvgPool2d)


def _analyse(model: nn.Module, size: tuple[int, int], in_channels: int | None) -> _Analysis:
    traced, reason = try_trace(model)
    if traced is None:
        traced, _ = try_trace(model, _LEAVES)
        if traced is None:
            return _Analysis(None, None, None, f"model not fx-traceable ({reason})")
        leaf_trace = True
    else:
        leaf_trace = False
    cache = traced.__dict__.setdefault("_rf_cache", {})
    key = (size, in_channels)
    if key in cache:
        return cache[key]
    gm = fx.GraphModule(model, traced.graph)
    names = {node: name for name, node in traced.names.items()}
    errors = []
    for c in _channel_candidates(model, gm, in_channels):
        x = _dummy(model, c, *size)
        recorder = ShapeRecorder(gm)
        try:
            with preserved(model, eval_mode=True), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                recorder.run(x)
        except Exception as exc:  # noqa: BLE001 - any failure: try the next guess, then measure
            errors.append(f"dummy input of shape {tuple(x.shape)}: {_first_line(exc)}")
            continue
        graph_fields = GraphFields(gm, recorder.values, names)
        graph_fields.run()
        cache[key] = _Analysis(traced, tuple(x.shape), graph_fields, None, leaf_trace=leaf_trace)
        return cache[key]
    cache[key] = _Analysis(traced, None, None, "the traced graph failed on a " + errors[0], leaf_trace=leaf_trace)
    return cache[key]


def _measure(model: nn.Module, an: _Analysis, size, in_channels, targets: list[Target], graph) -> None:
    """Measure ``targets`` (cached in ``an``); the first channel count whose forward runs wins."""
    todo = [t for t in targets if t.name not in an.measured]
    if not todo:
        return
    shapes = [an.x_shape] if an.x_shape is not None else [
        (1, c, *size) for c in _channel_candidates(model, None, in_channels)]
    error = None
    for shape in shapes:
        try:
            with preserved(model, eval_mode=True), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = measure(model, shape, todo, graph)
        except Exception as exc:  # noqa: BLE001 - the model refuses this input: try the next
            error = _first_line(exc)
            continue
        an.x_shape = an.x_shape or shape
        an.measured.update(got)
        return
    raise ValueError(f"model forward failed on a dummy input of shape {shapes[0]}: {error}. "
                     "Pass the input size the model expects (input_size=, --input-size).")


def _measured_public(name: str, m: Measured | str, why: str, size, explicit: bool) -> ReceptiveField | None:
    if isinstance(m, str):
        if explicit:
            raise ValueError(f"layer {name!r} has no receptive field: {m}")
        return None
    note = f"{why}; field measured as the gradient support of a positive copy of the model"
    return _to_public(name, m.field, size, m.output_size, False, True, (note,) + m.notes)


def _emit(result: dict[str, ReceptiveField]) -> None:
    """One warning per layer and call: measured fields, and layers that see global context."""
    for name, rf in result.items():
        if rf.measured:
            warnings.warn(f"{name}: {rf.notes[0]}", MeasuredFieldWarning, stacklevel=3)
        elif rf.is_global and rf.local is not None:
            note = next((n for n in rf.notes if n.startswith("global context")), "global context")
            warnings.warn(f"{name}: {note}; panels and crops use the local field", GlobalContextWarning, stacklevel=3)


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
        Names to report; default: every module and traced functional node
        whose output is a feature map (also channels-last or flattened
        positions).

    Returns
    -------
    dict
        layer name -> :class:`ReceptiveField`, in forward order.
    """
    size = _pair(input_size)
    refs = [resolve_layer(model, n) for n in layers] if layers else None
    an = _analyse(model, size, in_channels)
    if an.fields is None:
        leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
        names = [r.name for r in refs] if refs else leaves
        missing = [r.name for r in refs or [] if r.module is None]
        if missing:
            raise ValueError(f"layer {missing[0]!r} cannot be analysed: {an.failure}")
        _measure(model, an, size, in_channels, [Target(n, None, n, (2, 3)) for n in names], None)
        result = {n: _measured_public(n, an.measured[n], an.failure, size, bool(refs)) for n in names}
        result = {n: r for n, r in result.items() if r is not None}
        _emit(result)
        return result
    result = _from_graph(model, an, size, in_channels, refs)
    _emit(result)
    return result


def _from_graph(model, an: _Analysis, size, in_channels, refs) -> dict[str, ReceptiveField]:
    # A second-chance trace names its functional nodes unlike interp.layers(): report modules only.
    modules = dict(model.named_modules())
    names = [r.name for r in refs] if refs else [n for n in an.traced.names if n in modules or not an.leaf_trace]
    result: dict[str, ReceptiveField | None] = {}
    graph_targets, hook_targets, why = [], [], {}
    for name in names:
        node = an.traced.names.get(name)
        f = an.fields.fields.get(node) if node is not None else None
        if isinstance(f, list) and refs:
            f = next((g for g in f if isinstance(g, ra.NodeField)), None)
        if node is None and refs and refs[names.index(name)].module is not None:
            hook_targets.append(Target(name, None, name, (2, 3)))
            why[name] = "layer not in the traced graph"
            result[name] = None
            continue
        shape = an.fields.shape(node) if node is not None else None
        if isinstance(f, ra.NodeField) and f.unknown is not None and f.hint is not None:
            graph_targets.append(Target(name, node.name, None, f.hint))
            why[name] = f.unknown
            result[name] = None
        elif isinstance(f, ra.NodeField) and f.unknown is None and (
                f.axes is not None or (f.glob and shape is not None and len(shape) == 4)):
            result[name] = _to_public(name, f, size, _output_size(f, shape), True, False, tuple(f.notes))
        elif refs:
            raise ValueError(f"layer {name!r} has no spatial output, so no receptive field")
    if graph_targets:
        _measure(model, an, size, in_channels, graph_targets, an.traced.graph)
    if hook_targets:
        _measure(model, an, size, in_channels, hook_targets, None)
    for name in why:
        result[name] = _measured_public(name, an.measured[name], why[name], size, bool(refs))
    return {n: r for n, r in result.items() if r is not None}


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
        Input channels of the dummy image; default: the first convolution's
        that the model calls.

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
    return receptive_fields(model, input_size, [ref.name], in_channels)[ref.name]

"""Per-axis receptive fields as explicit interval arrays.

A field along one spatial axis is stored, for every output position ``i``
along that axis, as the half-open interval ``[lo[i], hi[i])`` of input
indices the position actually depends on (clipped to the image and to what
the network reads). This handles every geometry exactly, borders included:
strided and padded windows, padding computed in the forward, slicing,
nearest/bilinear/bicubic upsampling, transposed convolutions and
space-to-depth. Beside the arrays an :class:`Axis` keeps the classic nominal
affine form ``(size, stride, offset)`` while the layers stay regular
(convolutions, pooling, padding, slicing); the public
:class:`interp.rf.ReceptiveField` reports it so that the published values
(which hang over the padding) stay unchanged.

An empty interval (a unit that reads only padding) is ``lo = EMPTY_LO,
hi = EMPTY_HI``, so that unions (``min`` of ``lo``, ``max`` of ``hi``) ignore it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np
import torch

EMPTY_LO = np.iinfo(np.int64).max // 4
EMPTY_HI = -EMPTY_LO

Affine = Optional[tuple[int, int, int]]  # (size, stride, offset) or None when irregular


@dataclass(frozen=True)
class TensorInfo:
    """Shape of a tensor value in the recorded run."""

    shape: tuple[int, ...]


@dataclass(frozen=True)
class Axis:
    """Field of one spatial axis: the tensor dim carrying it, exact intervals, nominal affine form."""

    dim: int
    lo: np.ndarray
    hi: np.ndarray
    aff: Affine

    @property
    def n(self) -> int:
        """Number of positions along the axis."""
        return len(self.lo)

    def at(self, dim: int) -> "Axis":
        """The same field carried by tensor dim ``dim``."""
        return replace(self, dim=dim)


def identity_axis(dim: int, n: int) -> Axis:
    """The input image's own axis: position ``i`` sees pixel ``i``."""
    idx = np.arange(n, dtype=np.int64)
    return Axis(dim, idx, idx + 1, (1, 1, 0))


def gather(ax: Axis, taps: np.ndarray, valid: np.ndarray, aff: Affine) -> Axis:
    """Field of positions that each read the input positions ``taps[i, :]`` where ``valid``.

    The new interval of position ``i`` is the union of the intervals of its
    valid taps (a bounding box: dilation holes are not kept).
    """
    safe = np.clip(taps, 0, max(ax.n - 1, 0))
    lo = np.where(valid, ax.lo[safe], EMPTY_LO).min(axis=1) if taps.shape[1] else np.full(len(taps), EMPTY_LO)
    hi = np.where(valid, ax.hi[safe], EMPTY_HI).max(axis=1) if taps.shape[1] else np.full(len(taps), EMPTY_HI)
    return Axis(ax.dim, lo.astype(np.int64), hi.astype(np.int64), aff)


def window(ax: Axis, n_out: int, k: int, s: int, p: int, d: int = 1) -> Axis:
    """Sliding window (convolution, pooling): output ``j`` reads ``j*s - p + t*d``, ``t < k``.

    Taps in the padding (outside ``[0, n_in)``) read nothing; ``ceil_mode``
    windows that hang over the end are clipped the same way.
    """
    start = np.arange(n_out, dtype=np.int64)[:, None] * s - p
    taps = start + np.arange(k, dtype=np.int64)[None, :] * d
    valid = (taps >= 0) & (taps < ax.n)
    aff = None
    if ax.aff is not None:
        size, stride, offset = ax.aff
        aff = (size + d * (k - 1) * stride, stride * s, offset - p * stride)
    return gather(ax, taps, valid, aff)


def pad(ax: Axis, before: int, after: int, mode: str = "constant") -> Axis:
    """``F.pad`` along the axis (negative sizes crop). Reflect/replicate/circular padding
    read interior pixels, and the padded positions get those pixels' fields."""
    n_out = ax.n + before + after
    src = np.arange(n_out, dtype=np.int64) - before
    if mode == "reflect":
        period = max(2 * (ax.n - 1), 1)
        src = np.abs(src) % period
        src = np.where(src >= ax.n, period - src, src)
    elif mode == "replicate":
        src = np.clip(src, 0, ax.n - 1)
    elif mode == "circular":
        src = src % ax.n
    valid = (src >= 0) & (src < ax.n)
    aff = None
    if ax.aff is not None:
        size, stride, offset = ax.aff
        aff = (size, stride, offset - before * stride)
    return gather(ax, src[:, None], valid[:, None], aff)


def take(ax: Axis, start: int, stop: int, step: int = 1) -> Axis:
    """Slice ``[start:stop:step]`` along the axis: the offset moves, the stride multiplies."""
    idx = np.arange(ax.n, dtype=np.int64)[slice(start, stop, step)]
    aff = None
    if ax.aff is not None and len(idx):
        size, stride, offset = ax.aff
        aff = (size, stride * step, offset + int(idx[0]) * stride)
    return Axis(ax.dim, ax.lo[idx], ax.hi[idx], aff)


def group(ax: Axis, k: int) -> Axis:
    """Position ``i`` covers input positions ``[i*k, (i+1)*k)`` (space-to-depth, pixel_unshuffle)."""
    n_out = ax.n // k
    return window(ax, n_out, k, k, 0)


def spread(ax: Axis, k: int) -> Axis:
    """Position ``j`` reads position ``j // k`` (depth-to-space, pixel_shuffle)."""
    src = np.arange(ax.n * k, dtype=np.int64) // k
    aff = ax.aff if k == 1 else None
    return gather(ax, src[:, None], np.ones((len(src), 1), bool), aff)


def concat(axes: list[Axis]) -> Axis:
    """Concatenation along the axis itself (the positions follow one another)."""
    return Axis(axes[0].dim, np.concatenate([a.lo for a in axes]), np.concatenate([a.hi for a in axes]), None)


def union(axes: list[Axis]) -> Axis:
    """Position-wise union of fields of equal length (``add``, ``mul``, ``cat`` of channels).

    The nominal form is the classic rule (smallest offset, largest end,
    largest stride); the arrays are exact.
    """
    if len(axes) == 1:
        return axes[0]
    lo = np.minimum.reduce([a.lo for a in axes])
    hi = np.maximum.reduce([a.hi for a in axes])
    affs = [a.aff for a in axes]
    aff = None
    if all(a is not None for a in affs):
        start = min(a[2] for a in affs)
        end = max(a[2] + a[0] for a in affs)
        aff = (end - start, max(a[1] for a in affs), start)
    return Axis(axes[0].dim, lo, hi, aff)


_PROBE_CHUNK = 32


def dependence(fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, int], axis: int) -> np.ndarray:
    """Which input positions along ``axis`` each output position depends on, by probing ``fn``.

    ``fn`` maps a ``(B, 1, H, W)`` tensor to ``(B, 1, H', W')`` and treats the
    two axes separably (interpolation, transposed convolution with a ones
    kernel). Batch element ``b`` is one-hot on row (or column) ``b``; an output
    position depends on it where its value is non-zero. A single non-zero
    input value cannot cancel, so the result is exact.

    Returns
    -------
    numpy.ndarray
        Boolean ``(n_in, n_out)``.
    """
    h, w = shape
    n = shape[axis]
    rows = []
    # In chunks of one-hot inputs: a large upsampled map times n probes would not fit.
    for start in range(0, n, _PROBE_CHUNK):
        idx = torch.arange(start, min(start + _PROBE_CHUNK, n))
        x = torch.zeros(len(idx), 1, h, w, dtype=torch.float64)
        if axis == 0:
            x[torch.arange(len(idx)), 0, idx, :] = 1.0
        else:
            x[torch.arange(len(idx)), 0, :, idx] = 1.0
        with torch.no_grad():
            y = fn(x).abs()[:, 0]
        rows.append(y.amax(dim=2 if axis == 0 else 1) > 0)
    return torch.cat(rows).numpy()


def resample(ax: Axis, dep: np.ndarray) -> Axis:
    """Field after a resampling whose dependence matrix ``dep[i_in, j_out]`` is given."""
    dep_t = dep.T
    lo = np.where(dep_t, ax.lo[None, :], EMPTY_LO).min(axis=1)
    hi = np.where(dep_t, ax.hi[None, :], EMPTY_HI).max(axis=1)
    return Axis(ax.dim, lo.astype(np.int64), hi.astype(np.int64), None)


def from_affine(dim: int, n_out: int, aff: tuple[int, int, int], lo_read: int, hi_read: int) -> Axis:
    """Arrays of a regular field ``aff`` clipped to the read extent ``[lo_read, hi_read)``."""
    size, stride, offset = aff
    start = offset + np.arange(n_out, dtype=np.int64) * stride
    return Axis(dim, np.clip(start, lo_read, hi_read), np.clip(start + size, lo_read, hi_read), aff)


@dataclass
class NodeField:
    """Field of one graph value.

    Attributes
    ----------
    axes:
        ``(rows, cols)`` :class:`Axis` of the local, spatial path, or ``None``
        when the value has no local dependence on the input (it is constant,
        or derived only through a global reduction). Both axes on one dim
        means the positions were flattened row-major (``x.flatten(2)``).
    glob:
        The value depends on the input through a global reduction
        (global pooling, SE gate, GroupNorm statistics, softmax over
        positions): its exact field is the whole input.
    segments:
        Per-channel fields after a concatenation along dim ``cdim``:
        ``((start, end, NodeField), ...)``; kept by ops that do not mix channels.
    unknown:
        Why the analysis stopped (an op it cannot follow); the field must be
        measured.
    notes:
        Human-readable remarks (global context, irregular geometry).
    """

    axes: tuple[Axis, Axis] | None
    glob: bool = False
    segments: tuple | None = None
    cdim: int = 1
    unknown: str | None = None
    notes: list[str] = field(default_factory=list)
    hint: tuple[int, int] | None = None  # likely spatial dims of an unknown value (for measuring)

    @property
    def merged(self) -> bool:
        """Rows and columns flattened into one dim."""
        return self.axes is not None and self.axes[0].dim == self.axes[1].dim

    def dims(self) -> tuple[int, int] | None:
        """Tensor dims of ``(rows, cols)``, or ``None`` without a local field."""
        return None if self.axes is None else (self.axes[0].dim, self.axes[1].dim)

    def with_axes(self, axes: tuple[Axis, Axis] | None, keep_segments: bool = False, **kw) -> "NodeField":
        """A copy with new axes (segments dropped unless ``keep_segments``)."""
        return NodeField(axes, kw.get("glob", self.glob), self.segments if keep_segments else None,
                         kw.get("cdim", self.cdim), None, list(self.notes))

    def map_axes(self, fn: Callable[[Axis], Axis]) -> "NodeField":
        """Apply a per-axis rule to both axes and to every channel segment (channel-wise ops)."""
        axes = None if self.axes is None else (fn(self.axes[0]), fn(self.axes[1]))
        segs = None
        if self.segments:
            segs = tuple((a, b, f.map_axes(fn)) for a, b, f in self.segments)
        return NodeField(axes, self.glob, segs, self.cdim, None, list(self.notes))

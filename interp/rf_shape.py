"""Shape ops on fields: which tensor dims carry the rows and the columns afterwards.

Pure functions of a :class:`interp.rf_axes.NodeField` and the recorded
shapes. A shape op that scrambles the positions beyond what a local field can
describe (``flatten`` of channels with rows, ``unbind`` of a row) *loses* the
axes: the value no longer has a local field and every later use mixes
positions, so it counts as global context (``glob``), as a classifier's
flatten always did.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from . import rf_axes as ra


class Unsupported(Exception):
    """An op (or an argument form) the rules cannot follow; the field will be measured."""


def lost(f: ra.NodeField, why: str) -> ra.NodeField:
    """The value no longer has a local field (positions mixed into other dims)."""
    out = ra.NodeField(None, glob=True, notes=list(f.notes))
    if f.axes is not None:
        out.notes.append(f"global context from a shape op ({why})")
    return out


def remap(f: ra.NodeField, mapping: dict[int, int]) -> ra.NodeField:
    """Move the dims of ``f`` (axes and channel segments) by ``mapping`` old -> new."""
    axes = None
    if f.axes is not None:
        if any(a.dim not in mapping for a in f.axes):
            raise Unsupported("a spatial dim disappears")
        axes = (f.axes[0].at(mapping[f.axes[0].dim]), f.axes[1].at(mapping[f.axes[1].dim]))
    segs = None
    if f.segments and f.cdim in mapping:
        segs = tuple((a, b, remap(g, mapping)) for a, b, g in f.segments)
    return ra.NodeField(axes, f.glob, segs, mapping.get(f.cdim, f.cdim), None, list(f.notes))


def permutation(op: Callable[[torch.Tensor], torch.Tensor], ndim: int) -> dict[int, int]:
    """Old dim -> new dim of a dim-reordering op, found by running it on a meta tensor
    whose dims have distinct sizes (permute, transpose, movedim, swapaxes, ``.mT``)."""
    sizes = [2 + i for i in range(ndim)]
    out = op(torch.empty(sizes, device="meta"))
    return {sizes.index(s): j for j, s in enumerate(out.shape)}


def match_blocks(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Group the dims of a reshape ``a -> b`` into blocks of equal size products.

    Size-1 dims form their own blocks (possibly with no partner).
    """
    i = j = 0
    blocks: list[tuple[list[int], list[int]]] = []
    while i < len(a) or j < len(b):
        if i < len(a) and j < len(b) and a[i] == 1 and b[j] == 1:
            blocks.append(([i], [j]))
            i, j = i + 1, j + 1
        elif i < len(a) and a[i] == 1:
            blocks.append(([i], []))
            i += 1
        elif j < len(b) and b[j] == 1:
            blocks.append(([], [j]))
            j += 1
        else:
            if i >= len(a) or j >= len(b):
                raise Unsupported(f"reshape {a} -> {b}")
            ins, outs, pa, pb = [i], [j], a[i], b[j]
            i, j = i + 1, j + 1
            while pa != pb:
                if pa < pb:
                    ins.append(i)
                    pa *= a[i]
                    i += 1
                else:
                    outs.append(j)
                    pb *= b[j]
                    j += 1
            blocks.append((ins, outs))
    return blocks


def reshape(f: ra.NodeField, a: tuple[int, ...], b: tuple[int, ...]) -> ra.NodeField:
    """``view``/``reshape``/``flatten``/``unflatten``/``squeeze``/``unsqueeze`` from ``a`` to ``b``.

    Per block of dims: a spatial dim kept as is moves to its new index; split
    into ``(n/k, k)`` (space-to-depth) its outer part carries the axis and
    covers ``k`` positions; merged as the outer factor with inner non-spatial
    dims (depth-to-space) each position is repeated; rows and columns merged
    into one dim are flattened positions (tokens) and can be unflattened back.
    Channel-only blocks keep the axes (channel shuffle, grouping).
    """
    if f.axes is None:
        return ra.NodeField(None, f.glob, notes=list(f.notes))
    new: list[ra.Axis | None] = [None, None]
    cdim = None
    for ins, outs in match_blocks(a, b):
        sp = [k for k in (0, 1) if f.axes[k].dim in ins]
        if f.cdim in ins and len(ins) == 1 and len(outs) == 1 and not sp:
            cdim = outs[0]
        if not sp:
            continue
        nt_in = [i for i in ins if a[i] != 1 or any(f.axes[k].dim == i for k in (0, 1))]
        nt_out = [o for o in outs if b[o] != 1] or outs[:1]
        if not nt_out:
            return lost(f, "a spatial dim of size 1 was dropped")
        if len(sp) == 2:
            res = _two_axes(f, a, b, nt_in, nt_out)
            if res is None:
                return lost(f, "positions were flattened together with channels")
            new = list(res)
            continue
        ax = f.axes[sp[0]]
        if nt_in == [ax.dim]:
            k = ax.n // b[nt_out[0]] if b[nt_out[0]] else 0
            if k < 1 or ax.n % b[nt_out[0]]:
                return lost(f, "a spatial dim was reshaped irregularly")
            new[sp[0]] = (ra.group(ax, k) if k > 1 else ax).at(nt_out[0])
        elif nt_in[0] == ax.dim and len(nt_out) == 1:
            k = math.prod(a[i] for i in nt_in[1:])
            new[sp[0]] = ra.spread(ax, k).at(nt_out[0])
        else:
            return lost(f, "positions were flattened together with channels")
    if new[0] is None or new[1] is None:
        raise Unsupported(f"reshape {a} -> {b}")
    segs = f.segments if cdim is not None and f.segments else None
    if segs:
        segs = tuple((s, e, reshape(g, a, b)) for s, e, g in segs)
    return ra.NodeField((new[0], new[1]), f.glob, segs, cdim if cdim is not None else 1, None, list(f.notes))


def _two_axes(f: ra.NodeField, a, b, nt_in: list[int], nt_out: list[int]) -> tuple[ra.Axis, ra.Axis] | None:
    """Rows and columns in one block: flatten to tokens, or unflatten tokens back."""
    rows, cols = f.axes
    if f.merged:
        if nt_in == [rows.dim] and len(nt_out) == 2 and (b[nt_out[0]], b[nt_out[1]]) == (rows.n, cols.n):
            return rows.at(nt_out[0]), cols.at(nt_out[1])
        if nt_in == [rows.dim] and len(nt_out) == 1:
            return rows.at(nt_out[0]), cols.at(nt_out[0])
        return None
    if nt_in == [rows.dim, cols.dim] and len(nt_out) == 1:
        return rows.at(nt_out[0]), cols.at(nt_out[0])
    return None


def index(f: ra.NodeField, idx: Any, shape: tuple[int, ...], tensor_type: type) -> ra.NodeField:
    """``x[idx]`` with ints, slices, ``None`` and ``...``; slicing a spatial dim moves the offset,
    slicing the channel dim keeps the per-channel segments inside the slice."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, (tensor_type, list)) for i in idx):
        if f.axes is not None:
            raise Unsupported("advanced indexing")
    consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
    full: list[Any] = []
    for i in idx:
        if i is Ellipsis:
            full.extend([slice(None)] * (len(shape) - consumed))
        else:
            full.append(i)
    full.extend([slice(None)] * (len(shape) - sum(1 for i in full if i is not None)))
    mapping, slices, src, dst = {}, {}, 0, 0
    for i in full:
        if i is None:
            dst += 1
            continue
        if isinstance(i, slice):
            mapping[src] = dst
            slices[src] = i
            dst += 1
        elif f.axes is not None and any(ax.dim == src for ax in f.axes):
            return lost(f, "a single row or column was taken")
        src += 1
    out = remap(f, mapping)
    return _apply_slices(f, out, slices, shape)


def _apply_slices(f: ra.NodeField, out: ra.NodeField, slices: dict[int, slice], shape) -> ra.NodeField:
    if f.axes is not None:
        axes = list(out.axes)
        for k in (0, 1):
            sl = slices[f.axes[k].dim]
            if sl != slice(None):
                if f.merged:
                    raise Unsupported("slicing flattened positions")
                axes[k] = ra.take(axes[k], *sl.indices(shape[f.axes[k].dim]))
        out.axes = (axes[0], axes[1])
    if out.segments and f.cdim in slices and slices[f.cdim] != slice(None):
        start, stop, step = slices[f.cdim].indices(shape[f.cdim])
        out.segments = cut_segments(out.segments, start, stop) if step == 1 else None
    return out


def cut_segments(segments: tuple, start: int, stop: int) -> tuple | None:
    """The channel segments that overlap ``[start, stop)``, re-based to 0."""
    out = tuple((max(a, start) - start, min(b, stop) - start, g) for a, b, g in segments if a < stop and b > start)
    return out if len(out) > 1 else None


def pieces(f: ra.NodeField, dim: int, sizes: list[int], ndim: int, keep_dim: bool = True) -> list[ra.NodeField]:
    """``chunk``/``split``/``tensor_split``/``unbind`` along ``dim`` (of ``ndim``) into parts of ``sizes``."""
    out, start = [], 0
    spatial = [k for k in (0, 1) if f.axes is not None and f.axes[k].dim == dim]
    for n in sizes:
        if not keep_dim:
            if spatial:
                out.append(lost(f, "a single row or column was taken"))
            else:
                out.append(remap(f, {d: (d if d < dim else d - 1) for d in range(ndim) if d != dim}))
            start += n
            continue
        g = ra.NodeField(f.axes, f.glob, None, f.cdim, None, list(f.notes))
        if spatial:
            if f.merged:
                raise Unsupported("splitting flattened positions")
            axes = list(f.axes)
            axes[spatial[0]] = ra.take(axes[spatial[0]], start, start + n)
            g.axes = (axes[0], axes[1])
        elif f.segments and dim == f.cdim:
            g.segments = cut_segments(f.segments, start, start + n)
        out.append(g)
        start += n
    return out

"""Seed-style panels: what the top-k units of one layer see.

A panel shows, for each channel (the first 6 by default), a 3 x 3 grid of the
top-9 projections on the left half of the figure and the matching crops of
the input images on the right half, titled ``Layer N (convN)`` for a conv
layer and ``NAME (KIND)`` for any other layer with a feature-map output
(``layer1.0 (BasicBlock)``, ``layer1.0.add (add)``).

Cropping rule (the seed's): a tile is the unit's receptive-field box, for the
projection *and* for the input, so both halves show the same pixels. Boxes
that leave the image are clipped and the missing part is filled with neutral
grey, keeping the unit's field centred where it was; a field larger than the
image is shown as the part of the image it covers, so tiles are
``min(rf, image)`` pixels a side. Each projection tile is scaled on its own
(over its in-image pixels) by :func:`normalise_tile`: symmetric around zero
(grey), clipped at the 99.5th percentile of ``|value|``. The seed min-max
normalised each tile, which lets a few extreme pixels flatten the rest to grey.

:func:`panel_tiles` returns the tile arrays (for tests and the gallery);
:func:`panel` draws and writes the figure.
"""
from __future__ import annotations

import importlib.util
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .._utils import write_atomic
from ..topk import Entry, TopK

__all__ = ["PanelTiles", "panel_tiles", "render_panel", "panel", "crop_tile", "normalise_tile", "METHOD_NAMES",
           "encode_figure", "font", "layer_title", "CLIP_PERCENTILE"]

PAD = 0.5  # neutral grey for the parts of a box outside the image
METHOD_NAMES = {"guided": "guided backprop", "deconvnet": "deconvnet", "gradient": "gradient"}


@dataclass
class PanelTiles:
    """The content of one panel.

    Attributes
    ----------
    layer, title:
        Layer name and the figure title (``Layer N (name)`` plus a note when
        fewer than ``k`` images were available).
    channels:
        Channels shown, one block each.
    entries:
        ``entries[b][r]``: the :class:`Entry` of block ``b``, rank ``r``.
    proj, crops:
        ``[b][r]`` float32 ``h x w x C`` arrays in [0, 1], ``tile_size`` (the
        layer's field, at most the image), or the smaller field of a channel's
        branch after a concat (an Inception block).
    boxes:
        ``[b][r]`` receptive-field box clipped to the image,
        ``(top, left, bottom, right)`` half-open: the input pixels in the tile.
    note:
        A line drawn under the title when the crops are not the exact field
        (a global-context layer cropped to its local field), else ``None``.
    """

    layer: str
    title: str
    k: int
    channels: list[int]
    tile_size: tuple[int, int]
    entries: list[list[Entry]] = field(default_factory=list)
    proj: list[list[np.ndarray]] = field(default_factory=list)
    crops: list[list[np.ndarray]] = field(default_factory=list)
    boxes: list[list[tuple[int, int, int, int]]] = field(default_factory=list)
    note: str | None = None


def _hwc(a: np.ndarray | torch.Tensor) -> np.ndarray:
    """C x H x W tensor / H x W (x C) array -> float32 H x W x C."""
    if isinstance(a, torch.Tensor):
        t = a.detach().cpu().float()
        if t.ndim == 3:
            t = t.permute(1, 2, 0)
        a = t.numpy()
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    return a


def crop_tile(image: np.ndarray, box: tuple[int, int, int, int], tile: tuple[int, int],
              pad: float = PAD) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Cut ``box`` out of ``image`` (``H x W x C``) into a ``tile``-sized canvas.

    Returns
    -------
    (canvas, mask, clipped_box)
        ``canvas`` is ``tile + (C,)`` filled with ``pad`` where the box leaves
        the image; ``mask`` is true on the pixels that came from the image.
    """
    h, w = image.shape[:2]
    top, left, bottom, right = box
    ct, cl, cb, cr = max(top, 0), max(left, 0), min(bottom, h), min(right, w)
    th, tw = tile
    canvas = np.full((th, tw, image.shape[2]), pad, dtype=np.float32)
    mask = np.zeros((th, tw), dtype=bool)
    rh, rw = max(cb - ct, 0), max(cr - cl, 0)
    rh, rw = min(rh, th), min(rw, tw)
    # Keep the clipped part where it sits inside the (unclipped) field.
    oy = min(max(ct - top, 0), th - rh)
    ox = min(max(cl - left, 0), tw - rw)
    canvas[oy : oy + rh, ox : ox + rw] = image[ct : ct + rh, cl : cl + rw]
    mask[oy : oy + rh, ox : ox + rw] = True
    return canvas, mask, (ct, cl, ct + rh, cl + rw)


#: Display scale: a projection tile is shown as ``0.5 + 0.5 * v / s``, clipped to [0, 1], with ``s``
#: this percentile of ``|v|`` over the tile's in-image pixels. Zero is neutral grey, positive
#: evidence is brighter and negative darker, and a handful of extreme pixels (a projection is
#: often dominated by a few) no longer squeezes everything else into flat grey as min-max does.
CLIP_PERCENTILE = 99.5


def normalise_tile(tile: np.ndarray, mask: np.ndarray | None = None, pad: float = PAD,
                   percentile: float = CLIP_PERCENTILE) -> np.ndarray:
    """Scale a projection tile for display, symmetric around zero and robust to outliers.

    ``out = clip(0.5 + 0.5 * tile / s, 0, 1)`` with ``s`` the ``percentile``-th
    percentile of ``|tile|`` over ``mask`` (all pixels if ``None``). All
    channels share one scale (colours keep their balance); zero maps to
    neutral grey, so an all-zero tile (a dead unit, a saturated path) is
    plain grey. Pixels outside ``mask`` get ``pad``. The panels and the
    gallery show exactly these values.

    Parameters
    ----------
    tile:
        ``H x W x C`` projection values.
    mask:
        ``H x W`` bool, the pixels inside the image.
    pad:
        Value for pixels outside ``mask``.
    percentile:
        Clipping percentile of ``|value|`` (100: scale by the maximum).

    Examples
    --------
    >>> import numpy as np
    >>> t = np.array([[[-1.0], [0.0], [1.0], [100.0]]])
    >>> normalise_tile(t, percentile=50).round(2).ravel().tolist()
    [0.0, 0.5, 1.0, 1.0]
    """
    valid = tile[mask] if mask is not None else tile.reshape(-1, tile.shape[-1])
    out = np.full_like(tile, pad, dtype=np.float32)
    if valid.size == 0:
        return out
    scale = float(np.percentile(np.abs(valid), percentile))
    if not scale > 0:  # all (or nearly all) zero: fall back to the largest value, else grey
        scale = float(np.abs(valid).max())
    scaled = 0.5 + 0.5 * tile / scale if scale > 0 else np.full_like(tile, 0.5, dtype=np.float32)
    scaled = np.clip(scaled, 0.0, 1.0).astype(np.float32)
    if mask is None:
        return scaled
    out[mask] = scaled[mask]
    return out


def layer_title(topk: TopK, layer: str) -> str:
    """``Layer N (convN)`` as the original titles its figures; ``NAME (KIND)`` for other layers.

    A layer whose own name is ``convN`` keeps that N (ResNet-18's names skip
    the projection shortcuts, so its ``conv8`` is the 9th conv called);
    another conv gets the ``convN`` alias that reaches it, N-th conv in
    forward order: ``Layer 4 (conv4: inception3a.branch1.conv)``. A block,
    activation or traced node is named with its kind:
    ``layer1.0 (BasicBlock)``, ``layer1.0.add (add)``.
    """
    info = topk.layer(layer)
    own = re.fullmatch(r"conv(\d+)", layer)
    if own and info.is_conv:
        base = f"Layer {int(own.group(1))} ({layer})"
    elif info.number is not None:
        base = f"Layer {info.number} (conv{info.number}: {layer})"
    else:
        base = f"{layer} ({info.kind})"
    if topk.n_images < topk.k:
        base += f" - only {topk.n_images} image{'s' if topk.n_images != 1 else ''}, fewer than top-{topk.k}"
    return base


def panel_tiles(
    topk: TopK,
    layer: str,
    projections: torch.Tensor | np.ndarray | Mapping[tuple[int, int], np.ndarray],
    images: Callable[[int], np.ndarray] | Mapping[int, np.ndarray],
    channels: Sequence[int] | None = None,
) -> PanelTiles:
    """Compute the tiles of a panel without drawing it.

    Parameters
    ----------
    topk:
        Mining result holding ``layer``.
    layer:
        A mined conv layer (canonical name as in ``topk.layers``).
    projections:
        Either a tensor ``(len(topk.units(layer)), C, H, W)`` in
        :meth:`TopK.units` order (what :func:`interp.project` returns for
        those units), or ``{(channel, rank): C x H x W}``.
    images:
        ``index -> H x W x C`` float image in [0, 1] (the un-normalised model
        input, e.g. ``dataset.raw``) or a mapping with those values.
    channels:
        Channels to show (default: up to the first 6 mined).

    Raises
    ------
    ValueError
        For a layer without receptive field.

    Notes
    -----
    Any layer with a feature-map output works (conv, activation, block,
    traced node). Boxes and crops use the field in ``topk`` (for a
    global-context layer its local field through the spatial path,
    ``LayerInfo.rf_local``; the panel then says so under its title).
    """
    info = topk.layer(layer)
    if info.rf_size is None:
        raise ValueError(f"layer {layer!r} has no known receptive field, so its crops cannot be cut")
    shown = list(channels) if channels is not None else topk.channels(layer)[:6]
    if isinstance(projections, Mapping):
        proj_of = {key: _hwc(v) for key, v in projections.items()}
    else:
        order = [(e.channel, e.rank) for e in topk.iter_entries(layer)]
        if len(projections) != len(order):
            raise ValueError(
                f"got {len(projections)} projections for layer {layer!r}, expected {len(order)} "
                "(one per unit of topk.units(layer), in that order)"
            )
        proj_of = {key: _hwc(projections[i]) for i, key in enumerate(order)}
    get_image = images.__getitem__ if isinstance(images, Mapping) else images
    ih, iw = topk.input_size
    tile = (min(info.rf_size[0], ih), min(info.rf_size[1], iw))
    if info.rf_global:
        tile = (ih, iw)
    note = ("crops: the local field through the spatial path (the exact field is the whole input, "
            "through a global-context path)") if info.rf_local else None
    out = PanelTiles(layer=layer, title=layer_title(topk, layer), k=topk.k, channels=shown, tile_size=tile,
                     note=note)
    cache: dict[int, np.ndarray] = {}
    for c in shown:
        ents = topk[layer, c]
        row_e, row_p, row_c, row_b = [], [], [], []
        for e in ents:
            box = e.box if e.box is not None else info.box(e.y, e.x)
            if e.index not in cache:
                cache[e.index] = _hwc(get_image(e.index))
            img = cache[e.index]
            # A unit's own box sets its tile: the layer's field, or (after a
            # concat of branches) the smaller field of its channel's branch.
            own = tile if info.rf_global else (min(box[2] - box[0], ih), min(box[3] - box[1], iw))
            crop, mask, clipped = crop_tile(img, box, own)
            p_raw, _, _ = crop_tile(proj_of[(c, e.rank)], box, own)
            row_e.append(e)
            row_c.append(np.clip(crop, 0.0, 1.0))
            row_p.append(normalise_tile(p_raw, mask))
            row_b.append(clipped)
        out.entries.append(row_e)
        out.proj.append(row_p)
        out.crops.append(row_c)
        out.boxes.append(row_b)
    return out


# -- drawing ------------------------------------------------------------------

def font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans at ``size`` px (matplotlib's copy), or Pillow's built-in font."""
    try:
        # matplotlib.get_data_path() is the package's mpl-data folder; found
        # without importing matplotlib, which would cost every `import interp`.
        package = Path(importlib.util.find_spec("matplotlib").origin).parent
        path = package / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        return ImageFont.truetype(str(path), size)
    except Exception:  # any Pillow has a built-in font; looks plainer, still legible
        return ImageFont.load_default()


def to_uint8(tile: np.ndarray) -> np.ndarray:
    """float ``h x w x C`` in [0, 1] -> uint8 ``h x w x 3``."""
    a = np.clip(tile, 0.0, 1.0)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] > 3:
        a = a[:, :, :3]
    return np.round(a * 255).astype(np.uint8)


def _fit(tile: np.ndarray, px: int) -> Image.Image:
    """Scale a tile to fit ``px x px``: nearest when enlarging (small fields
    stay crisp pixels), Lanczos when shrinking; centred on grey."""
    img = Image.fromarray(to_uint8(tile))
    h, w = tile.shape[:2]
    s = px / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    # reducing_gap: shrink by whole factors first (box filter), then Lanczos; several times faster, same look.
    img = img.resize(size, Image.NEAREST if s >= 1 else Image.LANCZOS, reducing_gap=None if s >= 1 else 3.0)
    if size == (px, px):
        return img
    canvas = Image.new("RGB", (px, px), (128, 128, 128))
    canvas.paste(img, ((px - size[0]) // 2, (px - size[1]) // 2))
    return canvas


def _wrap(text: str, fnt: ImageFont.ImageFont, width: int) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels wide (a longer word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and fnt.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def render_panel(tiles: PanelTiles, method: str | None = None, tile_px: int = 64) -> np.ndarray:
    """Draw :class:`PanelTiles` as a ``uint8`` RGB figure.

    Left half: per channel a grid of projections (3 x 3 for k = 9); right
    half: the input crops in the same places. Blocks go two per row.
    """
    k = max(tiles.k, 1)
    gcols = math.ceil(math.sqrt(k))
    grows = math.ceil(k / gcols)
    gap, block_gap, label_h, margin = 2, 14, 18, 16
    n = len(tiles.channels)
    bcols = min(2, max(n, 1))
    brows = math.ceil(n / bcols) if n else 1
    block_w = gcols * tile_px + (gcols - 1) * gap
    block_h = label_h + grows * tile_px + (grows - 1) * gap
    half_w = bcols * block_w + (bcols - 1) * block_gap
    mid_gap = 36
    width = 2 * margin + 2 * half_w + mid_gap
    f_title, f_head, f_label = font(20), font(14), font(12)
    note_lines = _wrap(tiles.note, f_label, width - 2 * margin) if tiles.note else []
    title_h, head_h = 40 + 16 * len(note_lines), 22
    height = title_h + head_h + brows * block_h + (brows - 1) * block_gap + margin
    fig = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    draw.text((width // 2, 10), tiles.title, fill=(0, 0, 0), font=f_title, anchor="mt")
    for i, line in enumerate(note_lines):
        draw.text((width // 2, 36 + 16 * i), line, fill=(150, 60, 0), font=f_label, anchor="mt")
    left_head = "projections" + (f" ({METHOD_NAMES.get(method, method)})" if method else "")
    draw.text((margin + half_w // 2, title_h), left_head, fill=(60, 60, 60), font=f_head, anchor="mt")
    draw.text((margin + half_w + mid_gap + half_w // 2, title_h), "input crops (receptive fields)",
              fill=(60, 60, 60), font=f_head, anchor="mt")
    for b, c in enumerate(tiles.channels):
        br, bc = divmod(b, bcols)
        y0 = title_h + head_h + br * (block_h + block_gap)
        for side, grid in ((0, tiles.proj[b]), (1, tiles.crops[b])):
            x0 = margin + side * (half_w + mid_gap) + bc * (block_w + block_gap)
            draw.text((x0, y0 + 2), f"channel {c}", fill=(0, 0, 0), font=f_label)
            for r, t in enumerate(grid):
                gr, gc = divmod(r, gcols)
                fig.paste(_fit(t, tile_px), (x0 + gc * (tile_px + gap), y0 + label_h + gr * (tile_px + gap)))
    return np.asarray(fig)


def encode_figure(fig: np.ndarray, fmt: str) -> bytes:
    """A ``uint8`` figure as ``"png"`` (256-colour palette), ``"webp"`` or ``"jpg"`` bytes."""
    img = Image.fromarray(fig)
    buf = io.BytesIO()
    if fmt == "png":
        # A 256-colour palette keeps a panel at a few hundred KB (the seed's
        # full-colour PNGs were 2-4 MB). Fast octree: 4 ms a panel against
        # 140 for median cut, mean error 2.5 against 1.7 levels of 255; its
        # bins put pure white and black a level or two off, so those are
        # snapped back (the page's white must match the figure's).
        pal = img.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        pal.putpalette([0 if v <= 2 else 255 if v >= 253 else v for v in pal.getpalette()])
        pal.save(buf, format="PNG")
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=85, method=4)
    elif fmt in ("jpg", "jpeg"):
        img.save(buf, format="JPEG", quality=88, optimize=True)
    else:
        raise ValueError(f"unknown image format {fmt!r}; use png, webp or jpg")
    return buf.getvalue()


def panel(
    topk: TopK,
    layer: str,
    projections: torch.Tensor | np.ndarray | Mapping[tuple[int, int], np.ndarray],
    images: Callable[[int], np.ndarray] | Mapping[int, np.ndarray],
    out: str | os.PathLike | None = None,
    *,
    method: str | None = None,
    channels: Sequence[int] | None = None,
    tile_px: int = 64,
    web: str | None = None,
) -> np.ndarray:
    """Draw (and optionally write) the seed's figure for one layer.

    Parameters
    ----------
    topk, layer, projections, images, channels:
        As for :func:`panel_tiles`.
    out:
        Where to write the PNG (atomically); ``None`` writes nothing.
    method:
        Projection method, named in the left heading.
    tile_px:
        Display size of a tile in pixels.
    web:
        Also write a smaller ``"webp"`` or ``"jpg"`` next to ``out``.

    Returns
    -------
    numpy.ndarray
        The figure, ``uint8`` ``H x W x 3``.

    Examples
    --------
    >>> tk = interp.mine(model, data, ["conv1"])                  # doctest: +SKIP
    >>> p = interp.project(model, x, "conv1", tk.units("conv1"))  # doctest: +SKIP
    >>> interp.panel(tk, "conv1", p, data.raw, "conv1.png")       # doctest: +SKIP
    """
    tiles = panel_tiles(topk, layer, projections, images, channels)
    fig = render_panel(tiles, method=method, tile_px=tile_px)
    if out is not None:
        out = Path(out)
        write_atomic(out, encode_figure(fig, "png"))
        if web:
            write_atomic(out.with_suffix("." + web), encode_figure(fig, web))
    return fig

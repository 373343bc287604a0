"""Augment whole batches of a ``uint8`` image cache on the training device.

:class:`DeviceImagenette` holds the cache of :mod:`adapters.training.uint8_cache`
on the training device and yields ready batches: per batch ONE
``affine_grid`` + ``grid_sample`` performs the recipe's random (resized) crop,
the resize to the crop size and the horizontal flip; then colour jitter / PCA
lighting, and the normalisation (dataset mean/std, or AlexNet's mean image).
What it does comes from the recipe's :class:`~adapters.training.augment.AugSpec`,
the same entry the CPU transforms are built from. The random parameters come
from a CPU ``torch.Generator`` seeded with ``(seed, epoch)`` only, so a batch
is the same on any device and after a resume.

What the fast path approximates (documented, measured on the same data):

* Crop positions and sizes are continuous (sub-pixel) rather than integers,
  and every resize is bilinear without antialiasing (shrinking aliases a
  little; at 160 px cache and 224 px crops the crops are upscaled anyway).
  InceptionNet's / ResNet-18's random choice among four interpolations is
  replaced by bilinear; the random 256..480 shorter side is kept (as the
  crop's size relative to the image).
* Images are first squashed to ``C x C``: the longer side keeps ``C`` pixels
  instead of ``C * aspect``, i.e. a little horizontal (or vertical) detail is
  lost; the geometry is exact.
* Colour jitter applies brightness, contrast, saturation and hue in one random
  order per *batch* (torchvision draws the order per image); hue is a rotation
  of the chroma plane in YIQ space, not torchvision's HSV hue shift.
* AlexNet: PCA lighting (per-image RGB offset along the eigenvectors) and the
  mean-image subtraction are done exactly on the tensors; the mean image is
  sampled with the same crop grid as the image.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from adapters.preprocess import DatasetStats
from interp import parallel

from .augment import AugSpec
from .data import rank_blocks
from .uint8_cache import UInt8Split

__all__ = ["crop_theta", "affine_crop", "color_jitter", "DeviceImagenette"]


def crop_theta(cx: torch.Tensor, cy: torch.Tensor, cw: torch.Tensor, ch: torch.Tensor,
               width: torch.Tensor, height: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """``B x 2 x 3`` affine matrices for ``affine_grid(align_corners=False)`` sampling crops.

    The crop of image ``b`` is the axis-aligned box of centre ``(cx, cy)`` and
    size ``cw x ch`` in continuous pixel coordinates of an image of
    ``width x height`` (pixel ``j`` covers ``[j, j+1)``). ``flip`` (bool)
    mirrors the crop horizontally. Because the coordinates are normalised,
    the same matrix samples the image at any stored resolution, e.g. the
    squashed square of the cache.
    """
    sx = cw / width
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    theta = torch.zeros(cx.shape[0], 2, 3, dtype=torch.float32)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = 2 * cx / width - 1
    theta[:, 1, 1] = ch / height
    theta[:, 1, 2] = 2 * cy / height - 1
    return theta


def affine_crop(images: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Sample ``size x size`` crops of float ``images`` (``B x C x H x W``) with ONE ``grid_sample``.

    Bilinear, ``align_corners=False``, border padding: for a whole-image
    ``theta`` this equals ``F.interpolate(images, size, mode="bilinear")``
    (and, mirrored, its ``torch.flip``).
    """
    grid = F.affine_grid(theta.to(images.device, images.dtype), [images.shape[0], images.shape[1], size, size],
                         align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --------------------------------------------------------------------------- colour


def _gray(x: torch.Tensor) -> torch.Tensor:
    # ITU-R 601 luma, the weights torchvision's rgb_to_grayscale uses.
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """Brightness, contrast, saturation, hue on float RGB batches in ``[0, 1]``, clamped after each step.

    Parameters
    ----------
    x:
        ``B x 3 x H x W``.
    factors:
        ``B x 4``: brightness, contrast and saturation multipliers (1 = no
        change) and the hue shift in turns (0 = none; 0.5 = half a turn).
    order:
        Permutation of ``0..3``: the order the four operations are applied in.
    """
    f = factors.to(x.device, x.dtype)
    for op in order:
        if op == 0:
            x = x * f[:, 0, None, None, None]
        elif op == 1:
            mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
            c = f[:, 1, None, None, None]
            x = c * x + (1 - c) * mean
        elif op == 2:
            s = f[:, 2, None, None, None]
            x = s * x + (1 - s) * _gray(x)
        else:
            # Rotate the chroma (I, Q) plane by the hue angle: a linear stand-in for the HSV hue shift.
            angle = 2 * math.pi * f[:, 3]
            cos, sin = torch.cos(angle), torch.sin(angle)
            rot = torch.zeros(x.shape[0], 3, 3, device=x.device, dtype=x.dtype)
            rot[:, 0, 0] = 1
            rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
            yiq = _YIQ.to(x.device, x.dtype)
            m = torch.linalg.inv(yiq) @ rot @ yiq  # B x 3 x 3
            x = torch.einsum("bij,bjhw->bihw", m, x)
        x = x.clamp(0, 1)
    return x


# --------------------------------------------------------------------------- batches


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


class DeviceImagenette:
    """A uint8 split cache on the training device, yielding augmented, normalised batches.

    Parameters
    ----------
    train, val:
        The decoded splits.
    spec:
        The recipe's training augmentation at crop size ``image_size``
        (:func:`adapters.training.recipes.augmentation`).
    stats:
        Dataset statistics (mean/std, eigen-decomposition, mean image).
    image_size:
        Crop side the model gets.
    device:
        Where the cache lives and the batches are made.
    """

    def __init__(self, train: UInt8Split, val: UInt8Split, spec: AugSpec, stats: DatasetStats,
                 image_size: int, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.spec = spec
        self.image_size = int(image_size)
        self.train = UInt8Split(train.images.to(self.device), train.labels.to(self.device), train.sizes.clone())
        self.val = UInt8Split(val.images.to(self.device), val.labels.to(self.device), val.sizes.clone())
        self.mean = stats.mean.to(self.device, torch.float32)[None, :, None, None]
        self.std = stats.std.to(self.device, torch.float32)[None, :, None, None]
        self.eigvals = stats.eigvals.to(torch.float64)
        self.eigvecs = stats.eigvecs.to(torch.float64)
        base = spec.short_range[0]
        self.mean_image = stats.mean_image_at(base).to(self.device, torch.float32)[None] if spec.mean_image else None

    @property
    def n_train(self) -> int:
        """Number of training images."""
        return len(self.train)

    def describe(self) -> dict[str, Any]:
        """Plain record of the pipeline, for the training log."""
        return {"cache_size": int(self.train.images.shape[-1]), "image_size": self.image_size,
                "aug": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.spec.__dict__.items()}}

    # -- parameters (CPU, float64, from the generator only: device-independent) --

    def _train_boxes(self, sizes: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Crop boxes ``(cx, cy, cw, ch)`` in original pixels, plus AlexNet's mean-image offsets."""
        b = sizes.shape[0]
        h, w = sizes[:, 0].double(), sizes[:, 1].double()
        short = torch.minimum(h, w)
        s = self.spec
        out = self.image_size
        mean_off = None
        if s.crop == "resize_random":
            lo, hi = s.short_range
            length = torch.randint(lo, hi + 1, (b,), generator=g).double()
            side = out * short / length  # the crop, in original pixels
            cw = ch = side
            x0 = _uniform(g, b, 0, 1) * (w - side)
            y0 = _uniform(g, b, 0, 1) * (h - side)
        elif s.crop == "rrc":
            cw, ch, x0, y0 = self._rrc(h, w, g)
        elif s.crop == "alexnet":
            base = s.short_range[0]
            # Integer offsets in the base square, so the mean image's pixels line up with the crop.
            ox = torch.randint(0, base - out + 1, (b,), generator=g).double()
            oy = torch.randint(0, base - out + 1, (b,), generator=g).double()
            px = short / base  # original pixels per base pixel
            cw = ch = out * px
            x0 = (w - short) / 2 + ox * px
            y0 = (h - short) / 2 + oy * px
            mean_off = (ox, oy)
        else:
            raise ValueError(f"unknown crop kind {s.crop!r}")
        return x0 + cw / 2, y0 + ch / 2, cw, ch, mean_off

    def _rrc(self, h: torch.Tensor, w: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        """RandomResizedCrop boxes, vectorised: 10 tries per image, then torchvision's fallback."""
        b = h.shape[0]
        tries = 10
        area = (h * w)[:, None]
        target = area * _uniform(g, b * tries, *self.spec.scale).view(b, tries)
        lr = (math.log(self.spec.ratio[0]), math.log(self.spec.ratio[1]))
        ratio = torch.exp(_uniform(g, b * tries, *lr).view(b, tries))
        cw_t = torch.sqrt(target * ratio)
        ch_t = torch.sqrt(target / ratio)
        fits = (cw_t <= w[:, None]) & (ch_t <= h[:, None])
        first = fits.double().argmax(1)
        ok = fits.any(1)
        cw = cw_t.gather(1, first[:, None])[:, 0]
        ch = ch_t.gather(1, first[:, None])[:, 0]
        # Fallback (no try fitted): the whole image, its aspect clamped to the ratio range, centred.
        in_ratio = w / h
        fw = torch.where(in_ratio < self.spec.ratio[0], w, torch.where(in_ratio > self.spec.ratio[1], h * self.spec.ratio[1], w))
        fh = torch.where(in_ratio < self.spec.ratio[0], w / self.spec.ratio[0], h)
        cw = torch.where(ok, cw, fw)
        ch = torch.where(ok, ch, fh)
        ux, uy = _uniform(g, b, 0, 1), _uniform(g, b, 0, 1)
        x0 = torch.where(ok, ux * (w - cw), (w - cw) / 2)
        y0 = torch.where(ok, uy * (h - ch), (h - ch) / 2)
        return cw, ch, x0, y0

    def _val_boxes(self, sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Resize the shorter side to short_range[0], central crop: a centred square of
        # side short * S / base in original pixels (AlexNet's two centre crops compose to the same).
        h, w = sizes[:, 0].double(), sizes[:, 1].double()
        side = torch.minimum(h, w) * self.image_size / self.spec.short_range[0]
        return w / 2, h / 2, side, side

    # -- batches --

    def _finish(self, x: torch.Tensor, mean_theta: torch.Tensor | None, lighting: torch.Tensor | None,
                jitter: tuple[torch.Tensor, list[int]] | None) -> torch.Tensor:
        x = x / 255.0
        if jitter is not None:
            x = color_jitter(x, *jitter)
        if lighting is not None:
            x = x + lighting.to(x.device, x.dtype)[:, :, None, None]
        if self.mean_image is not None:
            mean = affine_crop(self.mean_image.expand(x.shape[0], -1, -1, -1), mean_theta, self.image_size)
            return x - mean
        return (x - self.mean) / self.std

    def train_batches(self, seed: int, epoch: int, batch_size: int, rank: int = 0,
                      world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Epoch ``epoch``'s shuffled, augmented batches ``(x float Bx3xSxS, y)``; a function of ``(seed, epoch)``.

        With ``world > 1`` (DDP) only rank ``rank``'s block of each global
        batch of ``batch_size`` (:func:`adapters.training.data.rank_blocks`):
        every rank draws the random parameters of the whole global batch from
        the same generator and crops only its own images, so the union over
        the ranks is exactly the single-process batch, augmentation included.
        Every rank holds the whole cache: any image can fall to any rank.
        """
        g = torch.Generator()
        # Its own stream, apart from the DataLoader path's shuffling generator.
        g.manual_seed(seed * 100_003 + epoch + 0x5EED_0000)
        n = self.n_train
        order = torch.randperm(n, generator=g)
        s = self.spec
        # Only a last, too small global batch is ever left out, so the draws of
        # the batches that are kept happen in the single-process order.
        for b0, b1, r0, r1 in rank_blocks(n, batch_size, rank, world):
            idx = order[b0:b1]
            b = len(idx)
            part = slice(r0 - b0, r1 - b0)
            sizes = self.train.sizes[idx]
            cx, cy, cw, ch, mean_off = self._train_boxes(sizes, g)
            flip = torch.rand(b, generator=g) < 0.5
            h, w = sizes[:, 0].double(), sizes[:, 1].double()
            theta = crop_theta(cx, cy, cw, ch, w, h, flip)
            mean_theta = None
            if mean_off is not None:
                base = torch.full((b,), float(s.short_range[0]), dtype=torch.float64)
                ox, oy = mean_off
                side = torch.full((b,), float(self.image_size), dtype=torch.float64)
                mean_theta = crop_theta(ox + side / 2, oy + side / 2, side, side, base, base, flip)
            jitter = None
            if s.jitter is not None:
                bj, cj, sj, hj = s.jitter
                lo = torch.tensor([max(0.0, 1 - bj), max(0.0, 1 - cj), max(0.0, 1 - sj), -hj], dtype=torch.float64)
                hi = torch.tensor([1 + bj, 1 + cj, 1 + sj, hj], dtype=torch.float64)
                factors = lo + (hi - lo) * torch.rand(b, 4, generator=g, dtype=torch.float64)
                jitter = (factors.float(), torch.randperm(4, generator=g).tolist())
            lighting = None
            if s.lighting > 0:
                alpha = torch.randn(b, 3, generator=g, dtype=torch.float64) * s.lighting
                lighting = ((alpha * self.eigvals) @ self.eigvecs.T).float()
            if world > 1:
                idx, theta = idx[part], theta[part]
                mean_theta = mean_theta[part] if mean_theta is not None else None
                lighting = lighting[part] if lighting is not None else None
                jitter = (jitter[0][part], jitter[1]) if jitter is not None else None
            idx_d = idx.to(self.device)
            x = affine_crop(self.train.images[idx_d].float(), theta, self.image_size)
            yield self._finish(x, mean_theta, lighting, jitter), self.train.labels[idx_d]

    def val_batches(self, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The validation split in order, centre-cropped and normalised (rank ``rank``'s block of it when ``world > 1``)."""
        block = parallel.shard(len(self.val), rank, world)
        n = block.stop
        base = float(self.spec.short_range[0])
        for start in range(block.start, n, batch_size):
            sl = slice(start, min(n, start + batch_size))
            sizes = self.val.sizes[sl]
            b = sizes.shape[0]
            h, w = sizes[:, 0].double(), sizes[:, 1].double()
            theta = crop_theta(*self._val_boxes(sizes), w, h)
            mean_theta = None
            if self.mean_image is not None:
                full = torch.full((b,), base, dtype=torch.float64)
                side = torch.full((b,), float(self.image_size), dtype=torch.float64)
                mean_theta = crop_theta(full / 2, full / 2, side, side, full, full)
            x = affine_crop(self.val.images[sl].float(), theta, self.image_size)
            yield self._finish(x, mean_theta, None, None), self.val.labels[sl]

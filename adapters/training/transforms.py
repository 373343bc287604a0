"""Training-time image transforms the recipes need and ``torchvision.transforms.v2`` lacks.

* :class:`Lighting`: AlexNet's PCA colour ("lighting") noise.
* :class:`RandomCropWithMeanSub`: subtract the training-set mean image, then
  take a random square crop (its central counterpart, for evaluation, is
  :class:`adapters.preprocess.CenterCropWithMeanSub`).
* :class:`RandomResizeRandInterp`: resize the shorter side to a random length
  with a randomly chosen interpolation (GoogLeNet's scale augmentation).

All work on image tensors ``CxHxW`` (or batches ``BxCxHxW``) and draw their
randomness from torch's global generator, so they compose with
``torchvision.transforms.v2.Compose`` and are reproducible under
``torch.manual_seed`` (and per-worker seeding in a ``DataLoader``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import tv_tensors

from adapters.preprocess import MeanImageCrop

__all__ = ["Lighting", "RandomCropWithMeanSub", "RandomResizeRandInterp", "INTERPOLATIONS"]

#: Interpolations :class:`RandomResizeRandInterp` draws from, with equal
#: probability: the four the GoogLeNet paper lists (bilinear, area, nearest
#: neighbour, cubic), as ``torch.nn.functional.interpolate`` modes.
INTERPOLATIONS: tuple[str, ...] = ("bilinear", "area", "nearest", "bicubic")


class Lighting(nn.Module):
    """PCA lighting noise of Krizhevsky et al. (2012), section 4.1.

    To every pixel of an RGB image it adds the same vector
    ``eigvecs @ (alpha * eigvals)``, with ``alpha ~ N(0, alphastd^2)`` drawn
    once per image (3 values). This shifts the colour along the principal
    axes of the training set's RGB distribution by an amount proportional to
    each axis' variance.

    Parameters
    ----------
    alphastd:
        Standard deviation of ``alpha`` (0.1 in the paper).
    eigvals:
        The 3 eigenvalues of the RGB covariance of the training pixels (in the
        same value range as the images, e.g. [0, 1]).
    eigvecs:
        ``3x3`` matrix whose *columns* are the matching unit eigenvectors.
    """

    def __init__(self, alphastd: float, eigvals: Sequence[float] | torch.Tensor, eigvecs: Sequence | torch.Tensor) -> None:
        super().__init__()
        eigvals = torch.as_tensor(eigvals, dtype=torch.float32)
        eigvecs = torch.as_tensor(eigvecs, dtype=torch.float32)
        if eigvals.shape != (3,) or eigvecs.shape != (3, 3):
            raise ValueError(
                f"Lighting needs 3 eigenvalues and a 3x3 eigenvector matrix, got {tuple(eigvals.shape)} "
                f"and {tuple(eigvecs.shape)}"
            )
        if alphastd < 0:
            raise ValueError(f"alphastd must be >= 0, got {alphastd}")
        self.alphastd = float(alphastd)
        self.register_buffer("eigvals", eigvals)
        self.register_buffer("eigvecs", eigvecs)

    def shift(self, alpha: torch.Tensor) -> torch.Tensor:
        """The RGB offset ``eigvecs @ (alpha * eigvals)`` for given ``alpha`` (``3`` or ``Bx3``)."""
        return (alpha * self.eigvals) @ self.eigvecs.T

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Add the lighting offset to a float image ``3xHxW`` or batch ``Bx3xHxW``."""
        if not img.is_floating_point():
            raise TypeError(f"Lighting works on float images (after ToDtype), got {img.dtype}")
        if img.dim() not in (3, 4) or img.shape[-3] != 3:
            raise ValueError(f"Lighting needs an RGB image 3xHxW or Bx3xHxW, got shape {tuple(img.shape)}")
        if self.alphastd == 0:
            return img
        batch = img.shape[:-3]
        alpha = torch.randn(*batch, 3) * self.alphastd
        offset = self.shift(alpha).to(img.dtype)
        return img + offset[..., :, None, None]

    def extra_repr(self) -> str:
        return f"alphastd={self.alphastd}"


class RandomCropWithMeanSub(MeanImageCrop):
    """Subtract the mean image and take a random ``size x size`` crop (AlexNet training).

    Takes the parameters of :class:`~adapters.preprocess.MeanImageCrop`.
    """

    random = True  # uniform over every position that fits, from torch's global generator


class RandomResizeRandInterp(nn.Module):
    """Resize the shorter side to a random length with a random interpolation.

    The shorter side becomes ``s``, uniform over the integers
    ``min_size..max_size``; the longer side keeps the aspect ratio
    (``round(long * s / short)``). The interpolation is drawn uniformly from
    ``interpolations``. Bilinear and bicubic use antialiasing when they
    shrink; uint8 images are resized in float and rounded back, clamped to
    0..255 (bicubic overshoots).

    Parameters
    ----------
    min_size, max_size:
        Range of the shorter side, inclusive (256 and 480 in the recipes).
    interpolations:
        ``torch.nn.functional.interpolate`` modes to choose from.
    """

    def __init__(self, min_size: int, max_size: int, interpolations: Sequence[str] = INTERPOLATIONS) -> None:
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {min_size} and {max_size}")
        bad = [m for m in interpolations if m not in ("nearest", "nearest-exact", "bilinear", "bicubic", "area")]
        if bad or not interpolations:
            raise ValueError(f"unknown interpolation(s) {bad}; use nearest, nearest-exact, bilinear, bicubic, area")
        self.min_size = int(min_size)
        self.max_size = int(max_size)
        self.interpolations = tuple(interpolations)

    def output_size(self, height: int, width: int, short: int) -> tuple[int, int]:
        """``(H, W)`` after resizing the shorter side of ``height x width`` to ``short``."""
        if height <= width:
            return short, max(1, int(round(width * short / height)))
        return max(1, int(round(height * short / width))), short

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Resize ``CxHxW`` (or ``BxCxHxW``) uint8 or float image(s)."""
        if img.dim() not in (3, 4):
            raise ValueError(f"RandomResizeRandInterp needs CxHxW or BxCxHxW, got shape {tuple(img.shape)}")
        short = int(torch.randint(self.min_size, self.max_size + 1, (1,)))
        mode = self.interpolations[int(torch.randint(len(self.interpolations), (1,)))]
        size = self.output_size(img.shape[-2], img.shape[-1], short)
        x = img.as_subclass(torch.Tensor)  # plain tensor: tv_tensors would re-wrap each op
        batched = x.dim() == 4
        x = x if batched else x.unsqueeze(0)
        out_dtype = x.dtype
        x = x.float() if not x.is_floating_point() else x
        kwargs = {}
        if mode in ("bilinear", "bicubic"):
            kwargs = {"align_corners": False, "antialias": True}
        x = F.interpolate(x, size=size, mode=mode, **kwargs)
        if not out_dtype.is_floating_point:
            x = x.round_().clamp_(0, 255).to(out_dtype)
        x = x if batched else x.squeeze(0)
        return _rewrap(img, x)

    def extra_repr(self) -> str:
        return f"min_size={self.min_size}, max_size={self.max_size}, interpolations={self.interpolations}"


def _rewrap(like: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    # Keep the tv_tensors.Image type so later v2 transforms treat it as an image.
    if isinstance(like, tv_tensors.Image):
        return tv_tensors.Image(out)
    return out

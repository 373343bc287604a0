"""One description of each training augmentation, and the CPU transforms built from it.

An :class:`AugSpec` says what a recipe's training augmentation does (the
crop, its scale range, flips, colour jitter, PCA lighting, mean-image
subtraction). The recipe table (:data:`adapters.training.recipes.AUGMENTATIONS`)
holds one per model, written at the 224 px crop of the original recipes;
:meth:`AugSpec.at` scales its lengths to another crop size. From that one
spec are built

* the per-image torchvision pipeline of the DataLoader path,
  :func:`train_transform` (and the matching evaluation transform,
  :func:`val_transform`), and
* the batched GPU pipeline of ``--cache-uint8``,
  :class:`adapters.training.gpu_batches.DeviceImagenette`, which lists what
  it approximates.

The crops (``S`` = the crop size):

``"alexnet"``
    Resize the shorter side to ``short_range[0]``, centre square, [0, 1],
    PCA lighting (``lighting``), mean-image subtraction with a random ``S``
    crop, horizontal flip.
``"resize_random"``
    Shorter side to ``short_range[0]`` (a fixed resize) or to a random length
    in ``short_range`` with a random interpolation
    (:class:`~adapters.training.transforms.RandomResizeRandInterp`), random
    ``S`` crop, flip, colour jitter if any, dataset mean/std.
``"rrc"``
    RandomResizedCrop(``S``, ``scale``, ``ratio``), flip, colour jitter if
    any, dataset mean/std.

Evaluation: resize the shorter side to ``short_range[0]`` and take the centre
``S`` crop, then mean-image subtraction (AlexNet) or mean/std
(:func:`adapters.preprocess.mean_image_crop`, :func:`adapters.preprocess.resize_crop`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torchvision.transforms import v2 as T

from adapters.preprocess import DatasetStats, mean_image_crop, resize_crop, scaled

from .transforms import Lighting, RandomCropWithMeanSub, RandomResizeRandInterp

__all__ = ["AugSpec", "JITTER", "check_crop_scale", "train_transform", "val_transform"]

#: Colour jitter of the VGG-16, InceptionNet and MobileNet recipes (brightness, contrast, saturation, hue).
#: The original text gives no strengths; these are our choice.
JITTER: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)

@dataclass(frozen=True)
class AugSpec:
    """A training augmentation, as data (see the module docstring).

    Attributes
    ----------
    crop:
        ``"resize_random"``, ``"rrc"`` or ``"alexnet"``; evaluation always takes the centre.
    short_range:
        Shorter side the image is resized to before the crop, in px at the
        crop size (e.g. 256..256 or 256..480 for 224 crops).
    scale, ratio:
        RandomResizedCrop's area fraction and aspect ratio ranges.
    jitter:
        Colour jitter strengths (brightness, contrast, saturation, hue) or ``None``.
    lighting:
        PCA lighting alpha standard deviation (0 = none).
    mean_image:
        Subtract the dataset mean image (AlexNet) instead of mean/std normalisation.
    """

    crop: str
    short_range: tuple[int, int]
    scale: tuple[float, float] = (1.0, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] | None = None
    lighting: float = 0.0
    mean_image: bool = False

    def __post_init__(self) -> None:
        if self.crop not in ("resize_random", "rrc", "alexnet"):
            raise ValueError(f"unknown crop kind {self.crop!r} (resize_random, rrc, alexnet)")
        if not 0 < self.short_range[0] <= self.short_range[1]:
            raise ValueError(f"short_range must be 0 < lo <= hi, got {self.short_range}")

    def at(self, image_size: int) -> "AugSpec":
        """This spec (written at the 224 px reference) with its lengths scaled to crops of ``image_size``.

        Each length scales as :func:`adapters.preprocess.scaled` does, e.g. 256 -> 183 at 160.
        """
        lo, hi = self.short_range
        return dataclasses.replace(self, short_range=(scaled(image_size, lo), scaled(image_size, hi)))

    def with_crop_scale(self, crop_scale: float | None) -> "AugSpec":
        """The crop replaced by RandomResizedCrop with area scale ``crop_scale``..1 (colour ops kept).

        What ``cnn-internals train --crop-scale`` trains with: a labelled
        deviation from the recipe, for the "tuned" runs. ``None`` returns the
        spec unchanged; AlexNet's crop (tied to the mean image) cannot be replaced.
        """
        if crop_scale is None:
            return self
        check_crop_scale(crop_scale, "alexnet" if self.crop == "alexnet" else None)
        base = self.short_range[0]
        return dataclasses.replace(self, crop="rrc", short_range=(base, base), scale=(float(crop_scale), 1.0))


def check_crop_scale(crop_scale: float | None, model: str | None = None) -> None:
    """One clear error for a ``--crop-scale`` that cannot apply (out of (0, 1], or for AlexNet)."""
    if crop_scale is None:
        return
    if model == "alexnet":
        raise ValueError("--crop-scale does not apply to alexnet (its crops are tied to the mean image)")
    if not 0 < crop_scale <= 1:
        raise ValueError(f"--crop-scale must be in (0, 1], got {crop_scale}")


def _normalize(stats: DatasetStats) -> Callable:
    return T.Normalize(stats.mean.tolist(), stats.std.tolist())


def _jitter(strengths: tuple[float, float, float, float]) -> Callable:
    b, c, s, h = strengths
    return T.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)


def _alexnet_train(spec: AugSpec, stats: DatasetStats, image_size: int) -> Callable:
    base = spec.short_range[0]
    steps: list[Callable] = [T.Resize(base, antialias=True), T.CenterCrop(base), T.ToImage(), T.RGB(),
                             T.ToDtype(torch.float32, scale=True)]
    if spec.jitter is not None:  # in the GPU pipeline's order: colour jitter, lighting, mean image
        steps.append(_jitter(spec.jitter))
    if spec.lighting > 0:
        steps.append(Lighting(spec.lighting, stats.eigvals, stats.eigvecs))
    return T.Compose(steps + [RandomCropWithMeanSub(stats.mean_image_at(base), image_size),
                              T.RandomHorizontalFlip()])


def train_transform(spec: AugSpec, stats: DatasetStats, image_size: int) -> Callable:
    """The per-image training transform (PIL image or uint8 tensor -> float ``3xSxS``) of ``spec``.

    Parameters
    ----------
    spec:
        The augmentation, at crop size ``image_size`` (:meth:`AugSpec.at`).
    stats:
        Dataset statistics (mean/std, eigen-decomposition, mean image).
    image_size:
        Crop side ``S``.
    """
    if spec.crop == "alexnet":
        return _alexnet_train(spec, stats, image_size)
    if spec.crop == "rrc":
        geometry: list[Callable] = [T.RandomResizedCrop(image_size, scale=spec.scale, ratio=spec.ratio,
                                                        antialias=True)]
    else:
        lo, hi = spec.short_range
        resize = T.Resize(lo, antialias=True) if lo == hi else RandomResizeRandInterp(lo, hi)
        geometry = [resize, T.RandomCrop(image_size)]
    steps: list[Callable] = [T.ToImage(), T.RGB(), *geometry, T.RandomHorizontalFlip()]
    if spec.jitter is not None:
        steps.append(_jitter(spec.jitter))
    return T.Compose(steps + [T.ToDtype(torch.float32, scale=True), _normalize(stats)])


def val_transform(spec: AugSpec, stats: DatasetStats, image_size: int) -> Callable:
    """The evaluation transform that goes with ``spec``: centre crop, mean image or mean/std."""
    if spec.mean_image:
        return mean_image_crop(stats, image_size)
    return resize_crop(stats, image_size)

"""Evaluation preprocessing of the Imagenette models, and the dataset statistics it uses.

Loading a model never reads a dataset: the Imagenette training statistics the
models were trained with ship in the package
(``adapters/weights/imagenette_stats.safetensors``, :func:`imagenette_stats`).
They are the statistics :func:`adapters.datasets.imagenette.dataset_stats`
measures over the full ``imagenette2-160`` training split (9,469 images, cache
key ``f5757281301f2d99``); ``tests/adapters/test_registry.py`` recomputes them
from the data folder and checks they are equal.

The two evaluation transforms (``S`` = image size, 224 for the models; the
other lengths scale with it, e.g. 256 = round(S * 256 / 224)):

* :func:`resize_crop`: resize the shorter side to 256, centre S crop, [0, 1],
  dataset mean/std (VGG-16, InceptionNet, ResNet-18, MobileNet).
* :func:`mean_image_crop`: resize 256, centre 256 crop, [0, 1], subtract the
  training-set mean image, centre S crop (AlexNet).

:class:`MeanImageCrop` is the shared base of the mean-image crops; the
training side subclasses it for AlexNet's random crop.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torchvision.transforms import v2 as T

__all__ = [
    "DatasetStats",
    "STATS_FORMAT",
    "IMAGENETTE_STATS_FILE",
    "imagenette_stats",
    "imagenet_stats",
    "scaled",
    "to_float",
    "resize_crop",
    "mean_image_crop",
    "imagenette_resize_crop",
    "imagenette_mean_image_crop",
    "MeanImageCrop",
    "CenterCropWithMeanSub",
]

#: Format tag of a statistics record (:meth:`DatasetStats.to_dict`, the shipped file's metadata).
STATS_FORMAT = "cnn-internals-imagenette-stats/1"

#: The shipped Imagenette training statistics (about 0.3 MB: the 3x160x160 mean image dominates).
IMAGENETTE_STATS_FILE: Path = Path(__file__).resolve().parent / "weights" / "imagenette_stats.safetensors"

_TENSORS = ("mean", "std", "eigvals", "eigvecs", "mean_image")


@dataclass(frozen=True)
class DatasetStats:
    """Statistics of a training split (RGB values in [0, 1]).

    Attributes
    ----------
    mean, std:
        Per-channel mean and standard deviation, shape ``3``.
    eigvals:
        Eigenvalues of the 3x3 RGB covariance, descending, shape ``3``.
    eigvecs:
        ``3x3``; column ``i`` is the unit eigenvector of ``eigvals[i]``, its
        largest-magnitude entry made positive (a deterministic sign).
    mean_image:
        Per-pixel mean, ``3 x size x size``.
    size:
        Side at which the images were measured.
    n_images:
        Number of images averaged.
    key:
        Fingerprint of the data, resolution and limit (the cache key).
    """

    mean: torch.Tensor
    std: torch.Tensor
    eigvals: torch.Tensor
    eigvecs: torch.Tensor
    mean_image: torch.Tensor
    size: int
    n_images: int
    key: str

    def to_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (``torch.load(weights_only=True)``-safe)."""
        return {"format": STATS_FORMAT, **{k: getattr(self, k) for k in _TENSORS},
                "size": self.size, "n_images": self.n_images, "key": self.key}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatasetStats":
        """Inverse of :meth:`to_dict`."""
        if d.get("format") != STATS_FORMAT:
            raise ValueError(f"not an Imagenette statistics record (format {d.get('format')!r})")
        return cls(**{k: d[k] for k in _TENSORS}, size=int(d["size"]), n_images=int(d["n_images"]), key=str(d["key"]))

    @classmethod
    def from_safetensors(cls, path: str | Path) -> "DatasetStats":
        """Read a record written as safetensors (the five tensors; size, n_images, key in the metadata)."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            d: dict[str, Any] = {k: f.get_tensor(k) for k in _TENSORS}
        return cls.from_dict({**meta, **d})

    def mean_image_at(self, size: int) -> torch.Tensor:
        """The mean image resized to ``size x size`` (bilinear, as the images are)."""
        if size == self.size:
            return self.mean_image.clone()
        return F.interpolate(
            self.mean_image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=size < self.size
        )[0]


@functools.lru_cache(maxsize=1)
def imagenette_stats() -> DatasetStats:
    """The Imagenette training statistics shipped in the package (read once, then cached).

    Treat the result as read-only: it is shared by every caller.
    """
    return DatasetStats.from_safetensors(IMAGENETTE_STATS_FILE)


def imagenet_stats(size: int = 160) -> DatasetStats:
    """ImageNet statistics, for a preprocess without Imagenette's.

    Mean/std are the usual ImageNet values; the PCA values are the ones
    published with fb.resnet.torch's lighting augmentation; the mean image is
    flat (the mean colour everywhere), which is what the ImageNet mean image
    is close to.
    """
    mean = torch.tensor([0.485, 0.456, 0.406])
    return DatasetStats(
        mean=mean,
        std=torch.tensor([0.229, 0.224, 0.225]),
        eigvals=torch.tensor([0.2175, 0.0188, 0.0045]),
        eigvecs=torch.tensor(
            [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
        ),
        mean_image=mean[:, None, None].expand(3, size, size).clone(),
        size=size,
        n_images=0,
        key="imagenet-fallback",
    )


def scaled(image_size: int, length: int) -> int:
    """``length`` (given for 224 px) scaled to ``image_size``: 256 -> round(S * 256 / 224)."""
    return int(round(image_size * length / 224))


def to_float() -> list[Callable]:
    """PIL or uint8 tensor -> float RGB tensor in [0, 1] (greyscale images get three channels)."""
    return [T.ToImage(), T.RGB(), T.ToDtype(torch.float32, scale=True)]


def resize_crop(stats: DatasetStats, image_size: int = 224) -> Callable:
    """Resize 256, centre crop, [0, 1], dataset mean/std (VGG-16, InceptionNet, ResNet-18, MobileNet)."""
    return T.Compose([T.Resize(scaled(image_size, 256), antialias=True), T.CenterCrop(image_size), *to_float(),
                      T.Normalize(stats.mean.tolist(), stats.std.tolist())])


def mean_image_crop(stats: DatasetStats, image_size: int = 224) -> Callable:
    """AlexNet's evaluation transform: resize, centre crop, mean-image subtraction, centre crop."""
    base = scaled(image_size, 256)
    return T.Compose([T.Resize(base, antialias=True), T.CenterCrop(base), *to_float(),
                      CenterCropWithMeanSub(stats.mean_image_at(base), image_size)])


def imagenette_resize_crop(image_size: int = 224) -> Callable:
    """:func:`resize_crop` with the shipped Imagenette statistics (the cards' preprocess factory)."""
    return resize_crop(imagenette_stats(), image_size)


def imagenette_mean_image_crop(image_size: int = 224) -> Callable:
    """:func:`mean_image_crop` with the shipped Imagenette statistics (AlexNet's card)."""
    return mean_image_crop(imagenette_stats(), image_size)


class MeanImageCrop(nn.Module):
    """Subtract a mean image, then crop a ``size x size`` square.

    The base of the mean-image crops: :class:`CenterCropWithMeanSub` here, and
    AlexNet's random training crop on the training side, which sets
    :attr:`random` to ``True``.

    Parameters
    ----------
    mean_image:
        ``CxHxW`` per-pixel mean of the training images, at the size the
        images have when they reach this transform.
    size:
        Side of the square crop (224 in the recipe).
    """

    #: Crop at a random position (drawn from torch's global generator) instead of the centre.
    random: bool = False

    def __init__(self, mean_image: torch.Tensor, size: int) -> None:
        super().__init__()
        mean_image = torch.as_tensor(mean_image, dtype=torch.float32)
        if mean_image.dim() != 3:
            raise ValueError(f"mean_image must be CxHxW, got shape {tuple(mean_image.shape)}")
        if not 0 < size <= min(mean_image.shape[-2:]):
            raise ValueError(f"crop size {size} does not fit the {tuple(mean_image.shape[-2:])} mean image")
        self.size = int(size)
        self.register_buffer("mean_image", mean_image)

    def offsets(self, height: int, width: int) -> tuple[int, int]:
        """Top-left corner of the crop in an image of the mean image's size."""
        if self.random:
            top = int(torch.randint(0, height - self.size + 1, (1,)))
            left = int(torch.randint(0, width - self.size + 1, (1,)))
            return top, left
        # Same rounding as torchvision's center_crop.
        return int(round((height - self.size) / 2.0)), int(round((width - self.size) / 2.0))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """``(img - mean_image)`` cropped; ``img`` is a float ``CxHxW`` of the mean image's shape."""
        if not img.is_floating_point():
            raise TypeError(f"{type(self).__name__} works on float images (after ToDtype), got {img.dtype}")
        if tuple(img.shape[-3:]) != tuple(self.mean_image.shape):
            raise ValueError(
                f"{type(self).__name__}: image shape {tuple(img.shape[-3:])} differs from the mean image "
                f"{tuple(self.mean_image.shape)}; resize the image to the mean image's size first"
            )
        top, left = self.offsets(*img.shape[-2:])
        window = (..., slice(top, top + self.size), slice(left, left + self.size))
        # Crop first, subtract the same window: equal to subtract-then-crop, cheaper.
        return img[window] - self.mean_image[window].to(img.dtype)

    def extra_repr(self) -> str:
        return f"size={self.size}, mean_image={tuple(self.mean_image.shape)}"


class CenterCropWithMeanSub(MeanImageCrop):
    """Subtract the mean image and take the central ``size x size`` crop (AlexNet evaluation).

    Takes the parameters of :class:`~adapters.preprocess.MeanImageCrop`.
    """

    random = False

"""Imagenette: the 10-class ImageNet subset, read from disk, and its cached statistics.

Layouts
-------
:class:`Imagenette` reads either

* a plain folder ``ROOT/train/<wnid>/*.JPEG`` and ``ROOT/val/<wnid>/*.JPEG``, or
* the layout of ``torchvision.datasets.Imagenette(root, split, size,
  download=False)``: ``ROOT/imagenette2-160/`` (size ``"160px"``),
  ``ROOT/imagenette2-320/`` (``"320px"``) or ``ROOT/imagenette2/`` (``"full"``),
  each holding ``train/`` and ``val/`` as above.

The default ``ROOT`` is ``$CNN_INTERNALS_DATA`` or ``../shared/data`` (from
the current directory), whose ``imagenette2-160/`` holds 9,469 training and
3,925 validation images. Nothing is ever downloaded.

Classes are the wnid folders in sorted order (torchvision's ``ImageFolder``
order), with the human names of :data:`CLASS_NAMES`.

Statistics
----------
:func:`dataset_stats` computes, once, over the whole training split: the
per-channel mean and standard deviation, the per-pixel mean image, and the
eigen-decomposition of the 3x3 RGB covariance (for AlexNet's PCA lighting).
Pixels are RGB in [0, 1] at :data:`STATS_SIZE` x :data:`STATS_SIZE` (the
stored size of the 160 px copy; other images are resized to it, bilinear with
antialiasing). Because bilinear resizing is linear, the mean image of images
resized to another size is the mean image resized to that size, which is how
the AlexNet recipe gets its 256x256 mean image.

The result is cached in ``CACHE/imagenette-stats-<key>.pt`` (about 0.3 MB,
read with ``weights_only=True``), where ``CACHE`` is ``$CNN_INTERNALS_CACHE``,
else ``$XDG_CACHE_HOME/cnn-internals``, else ``~/.cache/cnn-internals``, and
``<key>`` is a hash of the training files' names and sizes, the resolution and
the ``limit``: a changed data folder gets new statistics, an unchanged one is
never read twice.

The models never call this: the statistics of the full ``imagenette2-160``
training split ship in the package (:func:`adapters.preprocess.imagenette_stats`),
so loading a model reads no dataset. :class:`DatasetStats` is defined in
:mod:`adapters.preprocess` and re-exported here.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..checkpoint import atomic_save
from ..preprocess import DatasetStats, imagenet_stats

__all__ = [
    "Imagenette",
    "DatasetStats",
    "CLASS_NAMES",
    "WNIDS",
    "STATS_SIZE",
    "default_root",
    "default_cache_dir",
    "find_split_dir",
    "compute_stats",
    "dataset_stats",
    "fallback_stats",
]

#: Imagenette wnid -> human class name (ImageNet's first synonym).
CLASS_NAMES: dict[str, str] = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}
WNIDS: tuple[str, ...] = tuple(sorted(CLASS_NAMES))

#: Side (pixels) at which :func:`compute_stats` measures the images.
STATS_SIZE = 160

# torchvision.datasets.Imagenette's ``size`` -> folder name under ROOT.
_SIZE_FOLDERS: dict[str, str] = {"160px": "imagenette2-160", "320px": "imagenette2-320", "full": "imagenette2"}
_EXTENSIONS = (".jpeg", ".jpg", ".png")


def default_root() -> Path:
    """``$CNN_INTERNALS_DATA`` or ``../shared/data``, resolved against the current directory."""
    return Path(os.environ.get("CNN_INTERNALS_DATA") or "../shared/data").resolve()


def default_cache_dir() -> Path:
    """Where :func:`dataset_stats` caches: ``$CNN_INTERNALS_CACHE``, ``$XDG_CACHE_HOME/cnn-internals`` or ``~/.cache/cnn-internals``."""
    if os.environ.get("CNN_INTERNALS_CACHE"):
        return Path(os.environ["CNN_INTERNALS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cnn-internals"


def find_split_dir(root: str | os.PathLike | None, split: str, size: str | None = None) -> Path:
    """The folder holding ``<wnid>/`` class folders for ``split``.

    Parameters
    ----------
    root:
        A plain ``ROOT`` (holding ``train/``, ``val/``) or a torchvision-style
        root (holding ``imagenette2-160/`` etc.); ``None`` for :func:`default_root`.
    split:
        ``"train"`` or ``"val"``.
    size:
        torchvision's ``"160px"``, ``"320px"`` or ``"full"`` to pick that
        folder; ``None`` tries the plain layout, then 160 px, 320 px, full.

    Raises
    ------
    ValueError
        For an unknown ``split`` or ``size``.
    FileNotFoundError
        If no candidate folder exists.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if size is not None and size not in _SIZE_FOLDERS:
        raise ValueError(f"size must be one of {', '.join(_SIZE_FOLDERS)} or None, got {size!r}")
    root = Path(root) if root is not None else default_root()
    sizes = [size] if size is not None else list(_SIZE_FOLDERS)
    candidates = ([] if size is not None else [root / split]) + [root / _SIZE_FOLDERS[s] / split for s in sizes]
    for cand in candidates:
        if cand.is_dir():
            return cand
    raise FileNotFoundError(
        f"Imagenette {split} split not found under {root}: looked for "
        f"{', '.join(str(c) for c in candidates)}; pass --data ROOT or set CNN_INTERNALS_DATA"
    )


def _stratified(per_class: list[list[Path]], limit: int) -> list[list[Path]]:
    # Spread ``limit`` as evenly as possible over the classes (the first
    # ``limit % n`` classes get one more), and within a class take evenly
    # spaced files of the sorted list: deterministic, no RNG, and not biased
    # towards the alphabetically first file names.
    n = len(per_class)
    out = []
    for c, files in enumerate(per_class):
        quota = min(len(files), limit // n + (1 if c < limit % n else 0))
        if quota == 0:
            out.append([])
            continue
        step = len(files) / quota
        out.append([files[int(math.floor(i * step))] for i in range(quota)])
    return out


def load_rgb(path: str) -> Any:
    """Open an image file as RGB (242 of the Imagenette images are greyscale)."""
    with open(path, "rb") as fh:
        img = Image.open(fh)
        return img.convert("RGB")  # 242 of the images are greyscale


class Imagenette(Dataset):
    """Imagenette images and labels from a local folder (never downloaded).

    Parameters
    ----------
    root:
        Plain or torchvision-style root (see :func:`find_split_dir`); ``None``
        for :func:`default_root`.
    split:
        ``"train"`` or ``"val"``.
    size:
        torchvision's ``"160px"``/``"320px"``/``"full"``, or ``None`` to detect.
    transform:
        Applied to each RGB PIL image.
    target_transform:
        Applied to each integer label.
    limit:
        Keep only this many images, spread evenly over the classes (smoke runs);
        deterministic. ``None`` keeps all.

    Attributes
    ----------
    wnids:
        Class folders, sorted; the label of ``wnids[i]`` is ``i``.
    classes:
        Human class names in label order.
    class_to_idx:
        Human name -> label.
    samples:
        ``(path, label)`` pairs.
    targets:
        Labels, in sample order.

    Raises
    ------
    FileNotFoundError
        If the split folder is missing or holds no images.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        size: str | None = None,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        limit: int | None = None,
    ) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.split = split
        self.image_root = find_split_dir(root, split, size)
        self.wnids = sorted(d.name for d in self.image_root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.wnids:
            raise FileNotFoundError(f"no class folders in {self.image_root}")
        per_class = [
            sorted(p for p in (self.image_root / w).iterdir() if p.suffix.lower() in _EXTENSIONS)
            for w in self.wnids
        ]
        if limit is not None:
            per_class = _stratified(per_class, limit)
        self.samples: list[tuple[str, int]] = [(str(p), c) for c, files in enumerate(per_class) for p in files]
        if not self.samples:
            raise FileNotFoundError(f"no images (*.JPEG) under {self.image_root}")
        self.targets = [c for _, c in self.samples]
        self.classes = [CLASS_NAMES.get(w, w) for w in self.wnids]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.transform = transform
        self.target_transform = target_transform
        self.limit = limit

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        path, label = self.samples[index]
        image = load_rgb(path)
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label

    def fingerprint(self) -> str:
        """Hash of the sample list (relative paths, labels, file sizes): identifies the data for caching."""
        h = hashlib.sha256()
        for path, label in self.samples:
            rel = os.path.relpath(path, self.image_root)
            h.update(f"{rel}\t{label}\t{os.path.getsize(path)}\n".encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"Imagenette(split={self.split!r}, images={len(self)}, classes={len(self.classes)}, root={str(self.image_root)!r})"


def compute_stats(dataset: Imagenette, size: int = STATS_SIZE, progress: bool = False) -> DatasetStats:
    """Measure :class:`DatasetStats` over every image of ``dataset`` (its ``transform`` is ignored).

    Sums are accumulated in float64, so the result does not depend on the
    order of the images beyond rounding.

    Parameters
    ----------
    dataset:
        Usually the training split.
    size:
        Images are measured at ``size x size`` (resized when they differ).
    progress:
        Show a tqdm bar.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot compute statistics of an empty dataset")
    # NumPy on HxWx3 arrays: about 15x faster here than the same sums in torch
    # on permuted CxHxW views, which matters for a 9,469-image pass.
    image_sum = np.zeros((size, size, 3), dtype=np.float64)
    outer = np.zeros((3, 3), dtype=np.float64)
    pixels = 0
    items = range(n)
    if progress:
        items = tqdm(items, desc="Imagenette statistics", unit="img")
    for i in items:
        img = load_rgb(dataset.samples[i][0])
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)  # PIL's bilinear shrinks with antialiasing
        x = np.asarray(img, dtype=np.float64) / 255.0
        image_sum += x
        flat = x.reshape(-1, 3)
        outer += flat.T @ flat
        pixels += flat.shape[0]
    image_sum = torch.from_numpy(image_sum).permute(2, 0, 1).contiguous()
    outer = torch.from_numpy(outer)
    mean_image = image_sum / n
    mean = mean_image.mean(dim=(1, 2))  # every image has size*size pixels
    cov = outer / pixels - torch.outer(mean, mean)
    std = cov.diagonal().clamp_min(0).sqrt()
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
    signs = torch.sign(eigvecs.gather(0, eigvecs.abs().argmax(0, keepdim=True)))
    eigvecs = eigvecs * signs
    return DatasetStats(
        mean=mean.float(), std=std.float(), eigvals=eigvals.float(), eigvecs=eigvecs.float(),
        mean_image=mean_image.float(), size=size, n_images=n, key="",
    )


def dataset_stats(
    root: str | os.PathLike | None = None,
    size: int = STATS_SIZE,
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    recompute: bool = False,
    progress: bool = True,
) -> DatasetStats:
    """Training-split statistics, computed on first use and cached (see the module docstring).

    Parameters
    ----------
    root:
        Imagenette root (see :class:`Imagenette`).
    size:
        Measuring resolution.
    limit:
        Measure only a stratified subset of this many training images (tests).
    cache_dir:
        Cache folder; default :func:`default_cache_dir`.
    recompute:
        Ignore (and overwrite) a cached file.
    progress:
        Show a progress bar while computing.

    Returns
    -------
    DatasetStats
    """
    train = Imagenette(root, "train", limit=limit)
    key = hashlib.sha256(f"{train.fingerprint()}|size={size}|limit={limit}".encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"imagenette-stats-{key}.pt"
    if path.is_file() and not recompute:
        try:
            return DatasetStats.from_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception:
            pass  # unreadable or old format: recompute and overwrite below
    stats = compute_stats(train, size=size, progress=progress)
    stats = DatasetStats(**{**stats.__dict__, "key": key})
    atomic_save(stats.to_dict(), path)
    return stats


def fallback_stats(size: int = STATS_SIZE) -> DatasetStats:
    """ImageNet statistics, where Imagenette is absent: :func:`adapters.preprocess.imagenet_stats`."""
    return imagenet_stats(size)

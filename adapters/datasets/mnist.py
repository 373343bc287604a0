"""Datasets: MNIST from a local folder, and the small MNIST sample shipped in the package.

Nothing here downloads: MNIST must already be on disk as the four uncompressed
idx files under ``ROOT/MNIST/raw/``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import MNIST

__all__ = ["DEFAULT_DATA_ROOT", "MNIST_SAMPLE", "NATURAL_IMAGES", "mnist", "mnist_sample", "MnistSample"]

# "../shared/data" next to the working copy (the layout of the shared dev
# machine), unless CNN_INTERNALS_DATA points elsewhere. Resolved once against
# the current directory at import time, so a later chdir does not move it.
DEFAULT_DATA_ROOT: Path = Path(os.environ.get("CNN_INTERNALS_DATA") or "../shared/data").resolve()

# The first 1,000 MNIST test images and labels (see adapters/data/README.md).
MNIST_SAMPLE: Path = Path(__file__).resolve().parents[1] / "data" / "mnist_test_1000.npz"
#: 86 natural images shipped in the package (6 scikit-image samples + 80 Imagenette val photos;
#: sources and licences in its README.md), for the demo's ImageNet network.
NATURAL_IMAGES: Path = Path(__file__).resolve().parents[1] / "data" / "natural"

_MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def mnist(
    root: str | os.PathLike | None = None,
    train: bool = True,
    transform: Callable | None = None,
) -> MNIST:
    """The torchvision MNIST dataset read from ``root`` (never downloaded).

    Parameters
    ----------
    root:
        Folder holding ``MNIST/raw/``; default :data:`DEFAULT_DATA_ROOT`.
    train:
        The 60,000 training images if True, the 10,000 test images if False.
    transform:
        Applied to each PIL image (mode ``"L"``), as in torchvision.

    Returns
    -------
    torchvision.datasets.MNIST

    Raises
    ------
    FileNotFoundError
        If the idx files are not under ``root/MNIST/raw/``.
    """
    root = Path(root) if root is not None else DEFAULT_DATA_ROOT
    raw = root / "MNIST" / "raw"
    missing = [name for name in _MNIST_FILES[train] if not (raw / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"MNIST {'train' if train else 'test'} files not found: expected {', '.join(str(raw / m) for m in missing)} "
            "(uncompressed idx files); pass --data ROOT or set CNN_INTERNALS_DATA"
        )
    return MNIST(str(root), train=train, transform=transform, download=False)


class MnistSample(Dataset):
    """The MNIST test images shipped with the package, as a torchvision-like dataset.

    Items are ``(image, label)`` with ``image`` a PIL image of mode ``"L"``
    (after ``transform``, if given) and ``label`` an ``int``. ``data``
    (``Nx28x28`` uint8) and ``targets`` (``N`` int64) mirror torchvision's
    ``MNIST``.

    Parameters
    ----------
    path:
        An ``.npz`` file with ``images`` (``Nx28x28`` uint8) and ``labels``.
    transform:
        Applied to each PIL image.
    """

    def __init__(self, path: str | os.PathLike = MNIST_SAMPLE, transform: Callable | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"MNIST sample not found: {path} (reinstall the package)")
        with np.load(path) as npz:
            self.data = torch.from_numpy(npz["images"].astype(np.uint8))
            self.targets = torch.from_numpy(npz["labels"].astype(np.int64))
        if self.data.dim() != 3 or len(self.data) != len(self.targets):
            raise ValueError(f"{path} does not hold Nx28x28 images with N labels")
        self.transform = transform
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.data[index].numpy())  # 2-D uint8 -> mode "L"
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


def mnist_sample(transform: Callable | None = None) -> MnistSample:
    """The first 1,000 MNIST test images, shipped in the package (works offline, no data folder needed)."""
    return MnistSample(MNIST_SAMPLE, transform=transform)

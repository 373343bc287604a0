"""The command line's ``--data``: the engine's image readers, plus the dataset layouts the CLI knows.

The engine reads folders of image files (:func:`interp.data.open_images`);
a torchvision MNIST root (``MNIST/raw`` with the idx files) is recognised
here, at the composition root, and read through :mod:`adapters.datasets`
into an :class:`interp.data.ArrayImages`: the engine knows no dataset layout.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from adapters.datasets import mnist

from interp.data import ArrayImages, IndexedImages, NoImagesFound, limited
from interp.data import open_images as open_image_files

#: What ``--data`` accepts, for the help of every command that reads images.
DATA_HELP = "image folder (ImageFolder layout or flat), Imagenette root (train/ val/) or MNIST root"


def is_mnist_root(path: Path) -> bool:
    """Whether ``path`` is a torchvision MNIST root (holds ``MNIST/raw``) or that ``MNIST`` folder itself."""
    return (path / "MNIST" / "raw").is_dir() or (path.name == "MNIST" and (path / "raw").is_dir())


def open_images(
    path: str | os.PathLike,
    preprocess: Callable | None = None,
    *,
    split: str | None = None,
    mode: str | None = "RGB",
    skip_corrupt: bool = False,
    limit: int | None = None,
) -> IndexedImages:
    """The images of ``--data PATH``: an MNIST root, else :func:`interp.data.open_images` (same arguments).

    An MNIST root reads the test split (``split="train"``: the training
    split); items are described ``MNIST-test[i]``. A folder holding MNIST
    next to other datasets is refused for a colour model (``mode`` not
    ``"L"``): it most likely meant the other one.
    """
    root = Path(path)
    if root.is_dir() and is_mnist_root(root):
        return limited(_mnist_images(root, preprocess, split, mode), limit)
    try:
        return open_image_files(root, preprocess, split=split, mode=mode, skip_corrupt=skip_corrupt, limit=limit)
    except NoImagesFound as exc:
        nested = [d for d in sorted(root.iterdir()) if d.is_dir() and is_mnist_root(d)] if root.is_dir() else []
        raise FileNotFoundError(
            f"{exc}; point --data at an image folder, an Imagenette root or an MNIST root"
            + (f" (it holds an MNIST root: {nested[0]})" if nested else "")
        ) from None


def _mnist_images(root: Path, preprocess: Callable | None, split: str | None, mode: str | None) -> ArrayImages:
    """The MNIST test (or training) digits under ``root`` as in-memory ``uint8`` images."""
    if root.name != "MNIST" and mode != "L":
        others = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "MNIST")
        if others:
            # e.g. ../shared/data: MNIST next to imagenette2-160; a colour
            # model most likely meant the other one, so do not guess.
            raise ValueError(
                f"{root} holds several datasets (MNIST, {', '.join(others)}); point --data at one of them, "
                f"e.g. {root / others[0]} or {root / 'MNIST'}"
            )
    if split not in (None, "train", "test", "val"):
        raise ValueError(f"unknown split {split!r} for MNIST; use train or test")
    train = split == "train"
    digits = mnist(root.parent if root.name == "MNIST" else root, train=train)
    return ArrayImages(digits.data.numpy(), preprocess, mode=mode, name=f"MNIST-{'train' if train else 'test'}")

"""Dataset readers: MNIST and Imagenette from a local folder, and the samples shipped in the package.

Nothing here downloads. Model files never import this package: loading a
model never reads a dataset.
"""
from __future__ import annotations

from .imagenette import Imagenette, find_split_dir, load_rgb
from .mnist import DEFAULT_DATA_ROOT, MNIST_SAMPLE, NATURAL_IMAGES, MnistSample, mnist, mnist_sample

__all__ = ["DEFAULT_DATA_ROOT", "MNIST_SAMPLE", "NATURAL_IMAGES", "Imagenette", "MnistSample",
           "find_split_dir", "load_rgb", "mnist", "mnist_sample"]

"""Decode Imagenette once into a ``uint8`` tensor cache, kept in a file for later runs.

The per-image PIL pipeline spends most of a GPU epoch decoding JPEGs. Here:

1. :func:`decode_uint8` decodes every image of a split once (in parallel, with
   DataLoader worker processes) into a ``uint8`` tensor ``N x 3 x C x C``
   (``C`` = the cache size, e.g. 160) plus the labels and each image's
   original height and width. Each image is *squashed* to ``C x C`` (PIL
   bilinear, as :func:`adapters.datasets.imagenette.compute_stats` measures), so no
   content is cut off; because a squash is a separable linear rescaling,
   normalised coordinates in ``[-1, 1]`` are the same in the original image
   and in its stored square, and crops are computed in the original image's
   pixel geometry (:mod:`adapters.training.gpu_batches`), so the crops the
   model sees are not distorted.
2. :func:`load_or_decode` keeps that cache in a file (atomic write, read with
   ``weights_only=True``) keyed by the data's fingerprint and ``C``, so later
   runs and the other models reuse it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from adapters.checkpoint import atomic_save
from adapters.datasets import load_rgb

__all__ = ["CACHE_FORMAT", "UInt8Split", "decode_uint8", "cache_key", "load_or_decode"]

CACHE_FORMAT = "cnn-internals-uint8-cache/1"


@dataclass
class UInt8Split:
    """One split decoded into tensors.

    Attributes
    ----------
    images:
        ``uint8`` ``N x 3 x C x C``, each image squashed to ``C x C``.
    labels:
        ``int64`` ``N``.
    sizes:
        ``int64`` ``N x 2``: each image's original ``(height, width)``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    sizes: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())


class _Decode(Dataset):
    """Item ``i``: (``uint8 3xCxC``, label, ``(h, w)``) of ``samples[i]``."""

    def __init__(self, samples: Sequence[tuple[str, int]], size: int) -> None:
        self.samples = list(samples)
        self.size = int(size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        path, label = self.samples[i]
        img = load_rgb(path)
        w, h = img.size
        if img.size != (self.size, self.size):
            # PIL bilinear shrinks with antialiasing, as compute_stats does.
            img = img.resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        return x, label, torch.tensor([h, w], dtype=torch.int64)


def decode_uint8(samples: Sequence[tuple[str, int]], size: int, workers: int = 0,
                 progress: bool = False, desc: str = "decode") -> UInt8Split:
    """Decode ``(path, label)`` samples into a :class:`UInt8Split` at ``size x size``.

    Parameters
    ----------
    samples:
        ``(path, label)`` pairs, e.g. :attr:`adapters.datasets.imagenette.Imagenette.samples`.
    size:
        Side ``C`` of the stored squares.
    workers:
        Decoding processes (DataLoader workers; 0 = this process).
    progress:
        Show a tqdm bar.
    desc:
        Label of the bar.
    """
    if size < 1:
        raise ValueError(f"cache size must be >= 1, got {size}")
    if not samples:
        raise ValueError("nothing to decode: the split is empty")
    n = len(samples)
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    sizes = torch.empty(n, 2, dtype=torch.int64)
    loader = DataLoader(_Decode(samples, size), batch_size=64, shuffle=False, num_workers=workers)
    bar = tqdm(total=n, desc=desc, unit="img") if progress else None
    i = 0
    for x, y, hw in loader:
        images[i:i + len(y)] = x
        labels[i:i + len(y)] = y
        sizes[i:i + len(y)] = hw
        i += len(y)
        if bar is not None:
            bar.update(len(y))
    if bar is not None:
        bar.close()
    return UInt8Split(images, labels, sizes)


def cache_key(train_fingerprint: str, val_fingerprint: str, size: int) -> str:
    """16 hex digits identifying the data (both splits' fingerprints) and the cache size."""
    return hashlib.sha256(f"{CACHE_FORMAT}|{train_fingerprint}|{val_fingerprint}|{size}".encode()).hexdigest()[:16]


def load_or_decode(train_set: Any, val_set: Any, size: int, path: str | os.PathLike | None = None,
                   workers: int = 0, progress: bool = False,
                   log: Callable[[str], None] = print) -> tuple[UInt8Split, UInt8Split]:
    """The two splits as :class:`UInt8Split`, from ``path`` if it holds them, else decoded (and saved).

    Parameters
    ----------
    train_set, val_set:
        :class:`adapters.datasets.imagenette.Imagenette` datasets (their ``samples`` and
        ``fingerprint()`` are used; their transforms are not).
    size:
        Cache side ``C``.
    path:
        Cache file; ``None`` keeps the cache in memory only. A file whose key
        does not match the data is decoded again and overwritten.
    workers:
        Decoding processes.
    progress:
        Show progress bars while decoding.
    log:
        Where the one-line "cache read / written" messages go.
    """
    key = cache_key(train_set.fingerprint(), val_set.fingerprint(), size)
    if path is not None and Path(path).is_file():
        try:
            d = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # truncated / foreign file: decode afresh
            log(f"ignoring unreadable uint8 cache {path} ({exc.__class__.__name__}); decoding again")
            d = {}
        if d.get("format") == CACHE_FORMAT and d.get("key") == key:
            log(f"uint8 cache: read {path}")
            return (UInt8Split(d["train_images"], d["train_labels"], d["train_sizes"]),
                    UInt8Split(d["val_images"], d["val_labels"], d["val_sizes"]))
    train = decode_uint8(train_set.samples, size, workers, progress, desc=f"decode train @{size}")
    val = decode_uint8(val_set.samples, size, workers, progress, desc=f"decode val @{size}")
    if path is not None:
        atomic_save(
            {"format": CACHE_FORMAT, "key": key, "size": int(size),
             "train_images": train.images, "train_labels": train.labels, "train_sizes": train.sizes,
             "val_images": val.images, "val_labels": val.labels, "val_sizes": val.sizes},
            path,
        )
        log(f"uint8 cache: wrote {path} ({(train.images.numel() + val.images.numel()) / 2**20:.0f} MiB)")
    return train, val

"""Default decoding workers (interp.data.auto_workers): one for a large image folder, none otherwise."""
from __future__ import annotations

import numpy as np
import torch

from interp import data as D


def _files(tmp_path, n: int) -> D.FileImages:
    # The files need not exist: choosing the default reads no image.
    return D.FileImages([tmp_path / f"{i}.png" for i in range(n)])


def test_a_large_folder_gets_one_worker(tmp_path, monkeypatch):
    monkeypatch.setattr(D.os, "cpu_count", lambda: 2)
    big = _files(tmp_path, D.AUTO_WORKERS_MIN_IMAGES)
    assert D.auto_workers(big, None) == 1
    assert D.auto_workers(D.SubsetImages(big, range(D.AUTO_WORKERS_MIN_IMAGES)), None) == 1
    assert D.auto_workers(big, 0) == 0 and D.auto_workers(big, 3) == 3  # what the caller asks wins


def test_small_in_memory_or_one_core_get_none(tmp_path, monkeypatch):
    monkeypatch.setattr(D.os, "cpu_count", lambda: 2)
    assert D.auto_workers(_files(tmp_path, D.AUTO_WORKERS_MIN_IMAGES - 1), None) == 0
    assert D.auto_workers(D.TensorImages(torch.zeros(600, 3, 4, 4)), None) == 0
    assert D.auto_workers(D.ArrayImages(np.zeros((600, 4, 4, 3), dtype=np.uint8)), None) == 0
    assert D.auto_workers(torch.zeros(600, 3, 4, 4), None) == 0
    monkeypatch.setattr(D.os, "cpu_count", lambda: 1)
    assert D.auto_workers(_files(tmp_path, 10_000), None) == 0

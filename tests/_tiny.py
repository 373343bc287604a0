"""Small shared pieces for the engine's CLI tests: a model file and an image folder (no data needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

FACTORY = '''
import torch
from torch import nn
from torchvision.transforms import v2 as T


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1))
    pre = T.Compose([T.ToImage(), T.Resize(16, antialias=True), T.CenterCrop(16), T.ToDtype(torch.float32, scale=True)])
    return model, pre


def bare():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))


def broken():
    raise ValueError("bad width\\nsecond line")
'''


def model_file(tmp_path: Path, factory: str = "build") -> str:
    """``tmp_path/tiny_net.py:factory`` (see :data:`FACTORY`)."""
    path = tmp_path / "tiny_net.py"
    path.write_text(FACTORY)
    return f"{path}:{factory}"


def image_folder(dst: Path, n: int = 6, size: int = 20) -> Path:
    """``n`` random RGB PNGs in two class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = dst / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return dst

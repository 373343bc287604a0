"""Weight importers: real pretrained files of other frameworks, read into float PyTorch models.

One module per format, each independent of the model registry:

* :mod:`adapters.importers.keras`: Keras ``.h5`` (MobileNet v1, read with h5py);
* :mod:`adapters.importers.tflite`: uint8 TFLite flatbuffers (MobileNet v1, read with ``tflite``);
* :mod:`adapters.importers.torchscript`: int8 TorchScript (torchvision's quantized MobileNetV2).

:mod:`adapters.pretrained` turns them into the ``pretrained:`` models.
This package holds what the three share: where the files are, and how a
folded BatchNorm bias is kept in a BatchNorm module.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from ..registry import weights_dir

__all__ = ["SHIPPED_WEIGHTS", "weights_dir", "find_weights_file", "set_identity_bn"]

#: The weights folder inside the package (the TFLite pair lives there, byte-for-byte the data folder's).
SHIPPED_WEIGHTS: Path = Path(__file__).resolve().parents[1] / "weights"


def find_weights_file(path: str | os.PathLike | None, default_rel: str) -> Path:
    """``path``, or ``default_rel`` under :func:`adapters.registry.weights_dir`; it must exist.

    Raises
    ------
    FileNotFoundError
        One line naming the file, the folder it belongs in and the ways to point at it.
    """
    file = Path(path) if path is not None else weights_dir() / default_rel
    if not file.is_file():
        raise FileNotFoundError(
            f"pretrained weights file not found: {file}; put {Path(default_rel).name} in {file.parent}/ "
            "(see shared/data/MANIFEST.md), set CNN_INTERNALS_WEIGHTS to its weights/ folder, or pass weights=PATH"
        )
    return file


@torch.no_grad()
def set_identity_bn(bn: nn.BatchNorm2d, bias: torch.Tensor | None) -> None:
    """Make ``bn`` an exact identity plus ``bias`` in eval mode (BatchNorm already folded into the conv).

    Mean 0, variance 1 and gamma ``sqrt(1 + eps)`` give ``(x - 0) / sqrt(1 + eps) * sqrt(1 + eps) = x``,
    so the module tree keeps its BatchNorm (and its names) while computing what the folded file computes.
    """
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    bn.weight.fill_(math.sqrt(1.0 + bn.eps))
    bn.bias.copy_(bias if bias is not None else torch.zeros_like(bn.bias))

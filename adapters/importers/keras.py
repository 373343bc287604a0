"""Keras Applications' MobileNet v1 ``.h5`` (no top) into a float PyTorch :class:`KerasMobileNetV1`.

The file (``weights/keras/mobilenet_2_5_224_tf_no_top.h5``, alpha 0.25, 224 px)
is read with h5py into our :class:`adapters.mobilenet.MobileNetV1` at
``width_mult=alpha``: real BatchNorm (gamma, beta, moving mean and variance,
Keras epsilon 1e-3), kernels HWIO -> OIHW, depthwise ``[3, 3, C, 1]`` ->
``[C, 1, 3, 3]``. Two things differ from our from-scratch adapter and are
reproduced by :class:`KerasMobileNetV1`, a subclass that keeps every module
name (``conv1..conv27``, ``bn1..27``, ``relu1..27``): Keras uses ReLU6, and TF
"SAME" padding, which on a stride-2 3x3 convolution over an even-sized map
pads 0 pixels top/left and 1 bottom/right (torch's ``padding=1`` would pad 1
on every side and shift the sampling grid by one pixel). The file has no
classifier, so ``fc`` is a freshly initialised ``num_classes``-way layer.
Preprocess: resize to 224x224, ``x / 127.5 - 1`` (Keras' ``preprocess_input``).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2 as T

from ..mobilenet import MobileNetV1
from . import find_weights_file

__all__ = ["KERAS_MOBILENET_FILE", "KERAS_BN_EPS", "KerasMobileNetV1", "keras_mobilenet_v1", "keras_preprocess",
           "layer_arrays"]

#: The shipped file, relative to the weights folder (:func:`adapters.registry.weights_dir`).
KERAS_MOBILENET_FILE = "keras/mobilenet_2_5_224_tf_no_top.h5"
#: keras.layers.BatchNormalization's default epsilon (torch's is 1e-5).
KERAS_BN_EPS = 1e-3


class KerasMobileNetV1(MobileNetV1):
    """:class:`MobileNetV1` computing exactly what Keras' MobileNet computes.

    Same parameters and module names; the differences are parameter-free:
    ``relu1..27`` are ``nn.ReLU6``, every stride-2 convolution has
    ``padding=0`` and is preceded by ``pad<i>``, an ``nn.ZeroPad2d((0, 1, 0, 1))``
    (TF "SAME" on an even-sized input), and BatchNorm epsilon is 1e-3.

    "SAME" padding depends on the input size: the fixed right/bottom pixel is
    exact when every stride-2 input is even, i.e. for sides divisible by 32
    (224 as used by the preprocess); a warning is not given for other sizes
    because the network still runs, just with the grid shifted by one pixel.

    Parameters
    ----------
    num_classes:
        Size of the (untrained) output layer ``fc``.
    width_mult:
        Keras' alpha (0.25 for the shipped file).
    """

    def __init__(self, num_classes: int = 10, width_mult: float = 0.25) -> None:
        super().__init__(num_classes=num_classes, width_mult=width_mult)
        self.tf_padded: tuple[int, ...] = tuple(
            i for i in range(1, self.num_convs + 1) if getattr(self, f"conv{i}").stride != (1, 1)
        )
        for i in range(1, self.num_convs + 1):
            setattr(self, f"relu{i}", nn.ReLU6())
            getattr(self, f"bn{i}").eps = KERAS_BN_EPS
        for i in self.tf_padded:
            getattr(self, f"conv{i}").padding = (0, 0)
            self.add_module(f"pad{i}", nn.ZeroPad2d((0, 1, 0, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``fc`` for a batch ``Bx3xHxW`` (224x224 from the preprocess)."""
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last ReLU6 map (Keras' ``conv_pw_13_relu``), ``B x 256 x 7 x 7`` at 224 px, alpha 0.25."""
        for i in range(1, self.num_convs + 1):
            if i in self.tf_padded:
                x = getattr(self, f"pad{i}")(x)
            x = getattr(self, f"relu{i}")(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return x


def layer_arrays(h5: Any, layer: str) -> dict[str, np.ndarray]:
    """``{"kernel": array, ...}`` of one Keras layer group (weight names without scope and ``:0``).

    ``h5`` is an open ``h5py`` file or group (typed ``Any``: h5py is imported only when a file is read).
    """
    if layer not in h5:
        raise ValueError(f"Keras file has no layer {layer!r}; is it MobileNet v1 (conv1, conv_dw_1 ... conv_pw_13)?")
    group = h5[layer]
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
    out = {}
    for n in names:
        out[n.split("/")[-1].split(":")[0]] = np.asarray(group[n][()], dtype=np.float32)
    return out


def _state_from_h5(root: Any) -> dict[str, torch.Tensor]:
    """Our state dict (convs and BatchNorm) from the layer groups of a Keras MobileNet v1 file."""
    # (torch conv index, Keras conv layer, kernel key, HWIO -> torch permutation)
    plan = [(1, "conv1", "kernel", (3, 2, 0, 1))]
    for j in range(1, 14):
        plan.append((2 * j, f"conv_dw_{j}", "depthwise_kernel", (2, 3, 0, 1)))  # [3,3,C,1] -> [C,1,3,3]
        plan.append((2 * j + 1, f"conv_pw_{j}", "kernel", (3, 2, 0, 1)))
    state: dict[str, torch.Tensor] = {}
    for i, layer, key, perm in plan:
        arrays = layer_arrays(root, layer)
        if key not in arrays:
            raise ValueError(f"Keras layer {layer} has no {key} (has {', '.join(arrays)})")
        state[f"conv{i}.weight"] = torch.from_numpy(arrays[key]).permute(*perm).contiguous()
        bn = layer_arrays(root, f"{layer}_bn")
        state[f"bn{i}.weight"] = torch.from_numpy(bn["gamma"])
        state[f"bn{i}.bias"] = torch.from_numpy(bn["beta"])
        state[f"bn{i}.running_mean"] = torch.from_numpy(bn["moving_mean"])
        state[f"bn{i}.running_var"] = torch.from_numpy(bn["moving_variance"])
    return state


def keras_mobilenet_v1(path: str | os.PathLike | None = None, num_classes: int = 10) -> KerasMobileNetV1:
    """Import Keras' MobileNet v1 no-top ``.h5`` into a :class:`KerasMobileNetV1` (eval mode).

    Parameters
    ----------
    path:
        The ``.h5`` file; default ``<weights_dir>/keras/mobilenet_2_5_224_tf_no_top.h5``.
        alpha is read from the file (``conv1`` has ``32 * alpha`` filters).
    num_classes:
        Size of the new, untrained ``fc``.

    Raises
    ------
    FileNotFoundError
        If the file is missing (the message says where to put it).
    ValueError
        If a layer is missing or a shape does not fit.
    """
    import h5py

    file = find_weights_file(path, KERAS_MOBILENET_FILE)
    with h5py.File(file, "r") as h5:
        root = h5["model_weights"] if "model_weights" in h5 else h5  # a full-model file nests the weights
        alpha = layer_arrays(root, "conv1")["kernel"].shape[3] / 32
        model = KerasMobileNetV1(num_classes=num_classes, width_mult=alpha)
        state = _state_from_h5(root)
    own = model.state_dict()
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(f"{file}: {key} has shape {tuple(value.shape)}, the alpha={alpha} model needs {tuple(own[key].shape)}")
    # fc and the BatchNorm step counters are not in the file: keep the model's own.
    missing, unexpected = model.load_state_dict(state, strict=False)
    left = [k for k in missing if not (k.startswith("fc.") or k.endswith("num_batches_tracked"))]
    if unexpected or left:
        raise ValueError(f"{file}: the import left {', '.join(left + list(unexpected))} unset; is this MobileNet v1?")
    return model.eval()


def keras_preprocess(size: int = 224) -> Callable:
    """Resize to ``size`` x ``size`` (bilinear), then ``x / 127.5 - 1`` like Keras' ``preprocess_input``."""
    return T.Compose([
        T.ToImage(),
        # Resize the short side, then centre-crop: equal to a plain resize for square images.
        T.Resize(size, antialias=True),
        T.CenterCrop(size),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),  # (x/255 - 0.5)/0.5 = x/127.5 - 1
    ])

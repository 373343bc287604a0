"""Model adapters: faithful CNN reimplementations and pretrained twins.

Every adapter is reached through one function, :func:`load`, which returns
``(model, preprocess)``: the model in eval mode, and the transform that turns a
PIL image (or a ``uint8`` tensor) into the model's input tensor.

This package knows nothing about hooks or interpretation; the engine in
:mod:`interp` knows nothing about these models.

Examples
--------
>>> import adapters
>>> "lenet5" in adapters.names()
True
"""
from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path
from typing import Callable

import torch

__all__ = ["load", "loader", "names", "register", "weights_source", "file_sha256", "TWINS", "FIGURE_LAYERS"]

# name -> "module:function". Imported lazily so that ``import adapters`` stays
# cheap and an adapter with heavy optional dependencies costs nothing unless used.
_BUILTIN: dict[str, str] = {
    "lenet5": "adapters.lenet5:load",
    "alexnet": "adapters.alexnet:load",
    "vgg16": "adapters.vgg16:load",
    "inception": "adapters.inception:load",
    "resnet18": "adapters.resnet18:load",
    "mobilenet": "adapters.mobilenet:load",
    # Float twins of the real pretrained files in shared/data/weights (adapters.pretrained).
    "pretrained:mobilenet_v1_025_keras": "adapters.pretrained:load_mobilenet_v1_025_keras",
    "pretrained:mobilenet_v2_int8": "adapters.pretrained:load_mobilenet_v2_int8",
    "pretrained:mobilenet_v1_100_tflite": "adapters.pretrained:load_mobilenet_v1_100_tflite",
}
_REGISTRY: dict[str, Callable] = {}

#: Each from-scratch family -> its ImageNet-pretrained counterparts, for ``cnn-internals compare``.
#: ``convN`` (the N-th ``nn.Conv2d`` in forward order) picks the same layer on both
#: sides for inception/googlenet (57 convs), vgg16 (13), alexnet (5, different widths)
#: and mobilenet/mobilenetv1_100 (27; the Keras twin has our module names). ResNet-18
#: is the exception: our conv1..conv17 are the seed's names and skip the three
#: projection shortcuts (conv_proj1..3), while torchvision's convN counts them, so the
#: two agree up to conv7 and then differ (ours conv8 = torchvision's conv9; see
#: :data:`adapters.resnet18.TORCHVISION_NAMES` for exact pairs). Only the
#: ``pretrained:`` names have real weights on a machine without downloads.
TWINS: dict[str, tuple[str, ...]] = {
    "lenet5": (),
    "alexnet": ("torchvision:alexnet",),
    "vgg16": ("torchvision:vgg16", "torchvision:vgg16_bn"),
    "inception": ("torchvision:googlenet",),
    "resnet18": ("torchvision:resnet18",),
    "mobilenet": ("timm:mobilenetv1_100", "pretrained:mobilenet_v1_100_tflite", "pretrained:mobilenet_v1_025_keras"),
}

#: The layers the original work shows a panel for, per from-scratch model (its
#: README's "Internal Visualisations" sections): ``cnn-internals reproduce``
#: draws these, for the from-scratch model and its pretrained twin alike.
FIGURE_LAYERS: dict[str, tuple[str, ...]] = {
    "lenet5": ("conv1", "conv2", "conv3"),
    "alexnet": ("conv2", "conv3", "conv4", "conv5"),
    "vgg16": ("conv2", "conv4", "conv6", "conv8", "conv10", "conv13"),
    "inception": tuple(f"conv{n}" for n in range(2, 19, 2)),
    "resnet18": ("conv2", "conv4", "conv6", "conv8", "conv10", "conv13"),
    "mobilenet": ("conv2", "conv6", "conv10", "conv14", "conv18", "conv22"),
}

# Prefixes handled by :mod:`adapters.hub` ("torchvision:resnet18", "timm:resnet18").
_HUB_PREFIXES = ("torchvision:", "timm:")


def register(name: str, target: str | Callable) -> None:
    """Register an adapter under ``name``.

    Parameters
    ----------
    name:
        Public model name, e.g. ``"lenet5"``.
    target:
        A callable ``(weights=None, **kwargs) -> (model, preprocess)`` or a
        ``"module:function"`` string resolved on first use.
    """
    if isinstance(target, str):
        _BUILTIN[name] = target
    else:
        _REGISTRY[name] = target


def names() -> list[str]:
    """Names of all built-in adapters, sorted."""
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def loader(name: str) -> Callable:
    """The function :func:`load` calls for the built-in or registered adapter ``name``.

    Lets a caller inspect its signature (does it take ``data_root``?)
    without loading anything. Raises ``ValueError`` for an unknown name
    (``torchvision:`` / ``timm:`` names included: :mod:`adapters.hub` loads those).
    """
    return _resolve(name)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (read in 1 MiB chunks: weights files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _default_weights_file(name: str) -> Path | None:
    """The trained file ``load(name)`` reads without ``weights``; ``None`` when it initialises randomly."""
    if name == "lenet5":
        from .lenet5 import DEFAULT_WEIGHTS

        return DEFAULT_WEIGHTS
    if not name.startswith("pretrained:"):
        return None
    from . import pretrained as p

    rel = {"pretrained:mobilenet_v1_025_keras": p.KERAS_MOBILENET_FILE,
           "pretrained:mobilenet_v2_int8": p.TORCHSCRIPT_MOBILENET_V2_FILE,
           "pretrained:mobilenet_v1_100_tflite": p.TFLITE_MOBILENET_V1_FILES[0]}.get(name)
    if rel is None:
        return None
    # The TFLite pair ships inside the package too; the others live in the data folder.
    for candidate in (p.SHIPPED_WEIGHTS / Path(rel).name, p.weights_dir() / rel):
        if candidate.is_file():
            return candidate
    return p.weights_dir() / rel


def weights_source(name: str, weights: str | os.PathLike | None = None) -> dict:
    """Where the weights of ``load(name, weights)`` come from, as a JSON-ready dict.

    Returns
    -------
    dict
        ``{"name": name, "file": path, "sha256": hex}`` for a weights file
        (the one given, or the trained file the adapter ships);
        ``{"name": name, "weights": value}`` for a library's published
        weights named by ``value`` (``"DEFAULT"``, ``"IMAGENET1K_V1"``...);
        ``{"random": True}`` when the model is randomly initialised
        (``weights=None`` for an adapter without shipped weights, a
        ``torchvision:`` / ``timm:`` name, or ``weights="random"``).
    """
    if weights is not None and str(weights) == "random":
        return {"random": True}
    if weights is not None:
        path = Path(weights)
        if path.is_file():
            return {"name": name, "file": str(path.resolve()), "sha256": file_sha256(path)}
        return {"name": name, "weights": str(weights)}
    if name in _REGISTRY or name.startswith(_HUB_PREFIXES):
        # A registered adapter's default is its own business; hub models start random.
        return {"name": name} if name in _REGISTRY else {"random": True}
    file = _default_weights_file(name)
    if file is None:
        return {"random": True}
    out: dict = {"name": name, "file": str(file)}
    if file.is_file():
        out["sha256"] = file_sha256(file)
    return out


def _resolve(name: str) -> Callable:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILTIN:
        module, func = _BUILTIN[name].split(":")
        return getattr(importlib.import_module(module), func)
    import difflib

    close = difflib.get_close_matches(name, names(), n=3, cutoff=0.4)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown model {name!r}.{hint} Known: {', '.join(names())}; "
        "or use 'torchvision:NAME', 'timm:NAME' or 'path/to/file.py:factory'."
    )


def load(name: str, weights: str | None = None, **kwargs) -> tuple[torch.nn.Module, Callable]:
    """Load a model by name.

    Parameters
    ----------
    name:
        A built-in adapter (see :func:`names`), ``"torchvision:NAME"`` or
        ``"timm:NAME"``.
    weights:
        Path to a checkpoint (``.pt``/``.pth`` loaded with ``weights_only=True``,
        or ``.safetensors``). ``None`` means the adapter's default: the shipped
        weights where the package has them, random initialisation otherwise.

    Returns
    -------
    (model, preprocess)
        The model in eval mode and its input transform.
    """
    if name.startswith(_HUB_PREFIXES):
        from . import hub

        return hub.load(name, weights=weights, **kwargs)
    return _resolve(name)(weights=weights, **kwargs)

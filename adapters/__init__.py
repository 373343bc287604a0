"""Model adapters: faithful CNN reimplementations and pretrained twins.

Every adapter is reached through one function, :func:`load`, which returns
``(model, preprocess)``: the model in eval mode, and the transform that turns a
PIL image (or a ``uint8`` tensor) into the model's input tensor. Loading a
built-in model never reads a dataset.

Each model registers a :class:`~adapters.registry.Card` from its own file
(:func:`card`, :func:`cards`); importing this package imports the built-in
model files, so their cards exist as soon as ``adapters`` does.

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
import os
from pathlib import Path
from typing import Callable

import torch

# The built-in model files: importing them registers their cards, in this order (that of the
# TWINS and FIGURE_LAYERS views: the original work's order of chapters).
from . import lenet5, alexnet, vgg16, inception, resnet18, mobilenet, pretrained  # noqa: F401, I001  # isort: skip
from . import hub
from .registry import Card, CardField, card, cards, loader, names, register, register_model, unknown_model

__all__ = ["load", "loader", "names", "register", "weights_source", "file_sha256", "TWINS", "FIGURE_LAYERS",
           "card", "cards", "Card", "register_model"]

#: Each from-scratch family -> its ImageNet-pretrained counterparts, for ``cnn-internals compare``
#: (read-only, from the cards' ``twins``). ``convN`` (the N-th ``nn.Conv2d`` in forward order) picks
#: the same layer on both sides for inception/googlenet (57 convs), vgg16 (13), alexnet (5, different
#: widths) and mobilenet/mobilenetv1_100 (27; the Keras twin has our module names). ResNet-18 is the
#: exception: our conv1..conv17 are the seed's names and skip the three projection shortcuts
#: (conv_proj1..3), while torchvision's convN counts them, so the two agree up to conv7 and then
#: differ (ours conv8 = torchvision's conv9; see :data:`adapters.resnet18.TORCHVISION_NAMES`).
#: Only the ``pretrained:`` names have real weights on a machine without downloads.
TWINS: CardField = CardField("twins")

#: The layers the original work shows a panel for, per from-scratch model (its README's "Internal
#: Visualisations" sections; read-only, from the cards' ``figure_layers``): ``cnn-internals reproduce``
#: draws these, for the from-scratch model and its pretrained twin alike.
FIGURE_LAYERS: CardField = CardField("figure_layers")

# Prefixes handled by :mod:`adapters.hub` ("torchvision:resnet18", "timm:resnet18").
_HUB_PREFIXES = ("torchvision:", "timm:")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (read in 1 MiB chunks: weights files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    if name.startswith(_HUB_PREFIXES):
        return {"random": True}  # hub models start random
    if name not in {c.name for c in cards()}:
        # A bare registered loader's default is its own business.
        return {"name": name}
    file = card(name).default_weights()
    if file is None:
        return {"random": True}
    out: dict = {"name": name, "file": str(file)}
    if file.is_file():
        out["sha256"] = file_sha256(file)
    return out


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
    **kwargs:
        Options of the model (e.g. ``num_classes``, ``width_mult``).

    Returns
    -------
    (model, preprocess)
        The model in eval mode and its input transform.

    Raises
    ------
    ValueError
        For an unknown name (with the closest known names).
    """
    if name.startswith(_HUB_PREFIXES):
        return hub.load(name, weights=weights, **kwargs)
    if name not in names():
        raise unknown_model(name)
    return loader(name)(weights=weights, **kwargs)

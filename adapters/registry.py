"""The model registry: one :class:`Card` per model, registered from the model's own file.

A card says everything the toolkit needs to know about a model without
building it: how to build it, its preprocess, the layers the original work
draws, its pretrained twins, its parameter count, its default weights and the
data it was trained on. Each model module calls :func:`register_model` at
import (``adapters/__init__.py`` imports the built-in ones), so adding a model
means editing one model file (plus, for training, its recipe); no table
elsewhere lists the models.

This module imports no model file: model files import it.

Examples
--------
>>> import adapters
>>> adapters.card("vgg16").params
134301514
>>> adapters.card("lenet5").figure_layers
('conv1', 'conv2', 'conv3')
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = [
    "Card",
    "register_model",
    "register",
    "card",
    "cards",
    "names",
    "loader",
    "registered_by",
    "weights_dir",
    "unknown_model",
    "CardField",
]


@dataclass(frozen=True)
class Card:
    """What the toolkit knows about one model.

    Attributes
    ----------
    name:
        Public name, e.g. ``"vgg16"`` or ``"pretrained:mobilenet_v2_int8"``.
    build:
        The load function ``(weights=None, **kwargs) -> (model, preprocess)``:
        the model in eval mode and its evaluation transform.
    preprocess:
        Factory of the evaluation transform of the default configuration:
        called with no argument it returns what ``build()`` returns as
        ``preprocess``, without building the model. Factories of models that
        take other input sizes accept ``image_size``.
    params:
        Trainable parameters of the default configuration (``build()``).
    summary:
        One line: what the model is.
    dataset:
        What the default configuration is trained on or for: ``"mnist"``,
        ``"imagenette"`` or ``"imagenet"``.
    figure_layers:
        The layers the original work shows a panel for (``cnn-internals
        reproduce``); empty for a model that is not one of its figures.
    twins:
        Pretrained counterparts of a from-scratch model (``cnn-internals compare``).
    weights_file:
        The weights ``build()`` reads, ``None`` when it initialises randomly.
        A relative path is relative to :func:`weights_dir` (files too large
        for the package), resolved when asked (:meth:`default_weights`).
    """

    name: str
    build: Callable
    preprocess: Callable[..., Callable]
    params: int
    summary: str
    dataset: str
    figure_layers: tuple[str, ...] = ()
    twins: tuple[str, ...] = ()
    weights_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.name or not callable(self.build) or not callable(self.preprocess):
            raise ValueError(f"card {self.name!r}: needs a name, a build function and a preprocess factory")
        # Tuples, so that a card stays immutable and hashable whatever the caller passed.
        object.__setattr__(self, "figure_layers", tuple(self.figure_layers))
        object.__setattr__(self, "twins", tuple(self.twins))
        if self.weights_file is not None:
            object.__setattr__(self, "weights_file", Path(self.weights_file))

    def default_weights(self) -> Path | None:
        """The file ``build()`` reads: :attr:`weights_file`, a relative one under :func:`weights_dir` now."""
        if self.weights_file is None or self.weights_file.is_absolute():
            return self.weights_file
        return weights_dir() / self.weights_file


_CARDS: dict[str, Card] = {}
_ORIGINS: dict[str, str] = {}  # name -> module that registered the card
_LOADERS: dict[str, Callable | str] = {}  # name -> loader (or "module:function") registered without a card


def _caller_module(depth: int) -> str:
    """``__name__`` of the module ``depth`` frames up (1 = the caller of this function's caller)."""
    frame = inspect.currentframe()
    try:
        for _ in range(depth + 1):
            frame = frame.f_back if frame is not None else None
        return str(frame.f_globals.get("__name__", "?")) if frame is not None else "?"
    finally:
        del frame  # a frame references every local: drop it at once rather than leave a cycle


def register_model(model_card: Card) -> Card:
    """Register ``model_card`` under its name and return it; call it at import, from the model's file.

    Registering the same name again from the same module (a reload) replaces
    the card; from another module it is an error, so two files cannot
    silently fight over one name.

    Raises
    ------
    ValueError
        If another module already registered ``model_card.name``.
    """
    origin = _caller_module(1)
    if model_card.name in _CARDS and _ORIGINS[model_card.name] != origin:
        raise ValueError(f"model {model_card.name!r} is already registered by {_ORIGINS[model_card.name]}")
    _CARDS[model_card.name] = model_card
    _ORIGINS[model_card.name] = origin
    return model_card


def register(name: str, target: str | Callable) -> None:
    """Register a bare loader under ``name``, without a card (for user code).

    Parameters
    ----------
    name:
        Public model name.
    target:
        A callable ``(weights=None, **kwargs) -> (model, preprocess)`` or a
        ``"module:function"`` string resolved on first use.
    """
    _LOADERS[name] = target


def card(name: str) -> Card:
    """The card of model ``name``; ``ValueError`` with suggestions for an unknown name."""
    if name not in _CARDS:
        raise unknown_model(name)
    return _CARDS[name]


def cards() -> list[Card]:
    """Every registered card, sorted by name."""
    return [_CARDS[n] for n in sorted(_CARDS)]


def names() -> list[str]:
    """Every model name :func:`loader` knows (cards and bare loaders), sorted."""
    return sorted(set(_CARDS) | set(_LOADERS))


def registered_by(name: str) -> str:
    """The module that registered the card ``name`` (e.g. ``"adapters.vgg16"``)."""
    card(name)
    return _ORIGINS[name]


def loader(name: str) -> Callable:
    """The load function of ``name``: a bare loader registered with :func:`register`, else the card's ``build``."""
    if name in _LOADERS:
        target = _LOADERS[name]
        if isinstance(target, str):
            module, _, func = target.partition(":")
            return getattr(importlib.import_module(module), func)
        return target
    return card(name).build


def unknown_model(name: str) -> ValueError:
    """The error for an unknown model name: the closest known names and the other ways to name a model."""
    close = difflib.get_close_matches(name, names(), n=3, cutoff=0.4)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ValueError(
        f"unknown model {name!r}.{hint} Known: {', '.join(names())}; "
        "or use 'torchvision:NAME', 'timm:NAME' or 'path/to/file.py:factory'."
    )


def weights_dir() -> Path:
    """Folder of the pretrained files too large for the package: ``$CNN_INTERNALS_WEIGHTS`` or ``<data root>/weights``.

    The data root is ``$CNN_INTERNALS_DATA``, else ``shared/data`` beside the
    working copy, else ``../shared/data`` from the current directory.
    """
    if os.environ.get("CNN_INTERNALS_WEIGHTS"):
        return Path(os.environ["CNN_INTERNALS_WEIGHTS"])
    if os.environ.get("CNN_INTERNALS_DATA"):
        return Path(os.environ["CNN_INTERNALS_DATA"]) / "weights"
    beside_repo = Path(__file__).resolve().parents[2] / "shared" / "data" / "weights"
    if beside_repo.is_dir():
        return beside_repo
    return Path("../shared/data/weights").resolve()


class CardField(Mapping):
    """A live, read-only view ``name -> card.<field>`` over the cards that have figure layers.

    The models the original work draws (those with :attr:`Card.figure_layers`)
    are the families of ``reproduce`` and ``compare``; ``adapters.TWINS`` and
    ``adapters.FIGURE_LAYERS`` are two such views, in registration order.
    Live: a card registered later shows up without any table to edit.
    """

    def __init__(self, field: str) -> None:
        self._field = field

    def _selected(self) -> dict[str, tuple[str, ...]]:
        # Registration order, not name order: the order the built-in models are imported in.
        return {c.name: getattr(c, self._field) for c in _CARDS.values() if c.figure_layers}

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return self._selected()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._selected())

    def __len__(self) -> int:
        return len(self._selected())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._selected()!r})"

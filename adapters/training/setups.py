"""Per-dataset training setups: what :func:`adapters.training.fit` needs to train each built-in model.

* LeNet-5 on MNIST (:func:`lenet5_setup`): the 60,000 training images and,
  as the per-epoch validation set, the 10,000 test images.
* The five Imagenette models (:func:`imagenette_setup`): the recipe's
  augmentation on the train split, its evaluation transform on the val split,
  both built from the recipe's one augmentation entry.

:func:`setup_for` gives the setup of a model name; :func:`training_setup`
calls it.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from typing import Any, Callable

from torch.utils.data import TensorDataset

import adapters
from adapters.checkpoint import RANDOM
from adapters.datasets import Imagenette, mnist
from adapters.lenet5 import LeNet5, to_input
from adapters.preprocess import DatasetStats, imagenette_stats

from .augment import check_crop_scale, train_transform, val_transform
from .losses import SCORES
from .recipes import RECIPES, augmentation, get_recipe
from .spec import TrainSpec

__all__ = ["lenet5_setup", "imagenette_setup", "SETUPS", "setup_for", "accepts", "training_setup"]


def lenet5_setup(data_root: str | os.PathLike | None = None, limit: int | None = None,
                 **model_kwargs: Any) -> TrainSpec:
    """Everything :func:`adapters.training.fit` needs to train LeNet-5 on MNIST.

    The 60,000 training images are the training set and the 10,000 test
    images the per-epoch validation set (MNIST has no separate validation
    split; the *last* epoch, not the best, is what we ship, so nothing is
    selected on the test set). Images are preprocessed once into tensors,
    which is several times faster per epoch than per-item PIL transforms.

    Parameters
    ----------
    data_root:
        Folder holding ``MNIST/raw/`` (default: the data location of :func:`adapters.datasets.mnist`).
    limit:
        Use only the first ``limit`` training and test images.
    **model_kwargs:
        ``c3_table`` / ``trainable_pool`` of :class:`adapters.lenet5.LeNet5`.

    Returns
    -------
    TrainSpec
    """

    def tensors(train: bool) -> TensorDataset:
        ds = mnist(data_root, train=train)
        images, labels = ds.data, ds.targets
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        return TensorDataset(to_input(images), labels.long())

    val_set = tensors(False)
    recipe = get_recipe("lenet5")
    return TrainSpec(
        model=LeNet5(**model_kwargs),
        train_set=tensors(True),
        val_set=val_set,
        recipe=recipe,
        loss_fn=recipe.make_loss(),
        scores_fn=SCORES[recipe.loss],
        val_name=f"MNIST test ({len(val_set):,})" if limit is None else f"MNIST test (first {len(val_set):,})",
        extra={"model_kwargs": dict(model_kwargs), "preprocess": "pad 2, x/255*1.275-0.1"},
    )


def imagenette_setup(
    name: str,
    data_root: str | os.PathLike | None = None,
    limit: int | None = None,
    image_size: int | None = None,
    stats: DatasetStats | None = None,
    crop_scale: float | None = None,
) -> TrainSpec:
    """A :class:`TrainSpec` for model ``name`` on Imagenette, with its recipe.

    Parameters
    ----------
    name:
        ``"alexnet"``, ``"vgg16"``, ``"inception"``, ``"resnet18"`` or ``"mobilenet"``.
    data_root:
        Imagenette root (see :class:`adapters.datasets.Imagenette`).
    limit:
        Use only this many training and this many validation images (stratified).
    image_size:
        Train and evaluate at this side (default 224); the resize lengths scale
        with it. AlexNet only takes 224 (its ``lin1`` is fixed at 256x6x6).
    stats:
        Dataset statistics; default the shipped statistics of the full
        Imagenette training split (:func:`adapters.preprocess.imagenette_stats`).
    crop_scale:
        Replace the recipe's training crop by RandomResizedCrop with area
        scale ``crop_scale``..1 (colour jitter kept). A deviation from the
        recipe, recorded in the run's ``extra``. Not for AlexNet (its crops
        are tied to the mean image).
    """
    recipe = get_recipe(name)
    size = int(image_size or recipe.image_size)
    if name == "alexnet" and size != 224:
        raise ValueError("alexnet trains at 224 px only (lin1 expects 256x6x6 features); drop --image-size")
    if size != recipe.image_size:
        recipe = dataclasses.replace(recipe, image_size=size)
    check_crop_scale(crop_scale, name)
    if stats is None:
        stats = imagenette_stats()
    aug = augmentation(recipe, size, crop_scale)
    train_set = Imagenette(data_root, "train", transform=train_transform(aug, stats, size), limit=limit)
    val_set = Imagenette(data_root, "val", transform=val_transform(aug, stats, size), limit=limit)
    # Default weights: the recipe's random initialisation (from the global RNG, seeded by the caller), since
    # the package ships no Imagenette weights; the five loaders do not take weights="random" (yet).
    model, _ = adapters.load(name, weights=RANDOM)  # never a shipped file: training starts from scratch
    model.train()
    return TrainSpec(
        model=model,
        train_set=train_set,
        val_set=val_set,
        recipe=recipe,
        loss_fn=recipe.make_loss(),
        scores_fn=SCORES[recipe.loss],
        val_name="imagenette-val" if limit is None else f"imagenette-val[{len(val_set)}]",
        extra={"image_size": size, "stats_key": stats.key, "stats_images": stats.n_images,
               **({"crop_scale": [crop_scale, 1.0]} if crop_scale is not None else {})},
    )


#: Trainable model -> its setup, called with ``data_root``, ``limit`` and the options it accepts
#: (see :func:`accepts`).
#: A recipe's ``dataset`` picks its setup, so a new model needs no entry here.
SETUPS: dict[str, Callable[..., TrainSpec]] = {
    name: lenet5_setup if recipe.dataset == "mnist" else functools.partial(imagenette_setup, name)
    for name, recipe in RECIPES.items()
}


def setup_for(name: str) -> Callable[..., TrainSpec]:
    """The setup of model ``name``; ``ValueError`` listing the trainable models otherwise."""
    if name not in SETUPS:
        raise ValueError(f"model {name!r} is not trainable here; trainable: {', '.join(sorted(SETUPS))}")
    return SETUPS[name]


def accepts(name: str, option: str) -> bool:
    """Whether the setup of ``name`` takes keyword ``option`` (``image_size``, ``crop_scale``, ``stats``)."""
    return option in inspect.signature(setup_for(name)).parameters


def training_setup(name: str, data_root: str | os.PathLike | None = None, limit: int | None = None,
                   **options: Any) -> TrainSpec:
    """The :class:`TrainSpec` of model ``name`` (:data:`SETUPS`); ``options`` go to its setup.

    Raises
    ------
    ValueError
        For a model that is not trainable, or an Imagenette option (``image_size``,
        ``crop_scale``, ``stats``) its setup does not take.
    """
    setup = setup_for(name)
    for key in ("image_size", "crop_scale", "stats"):
        if key in options and not accepts(name, key):
            raise ValueError(f"{key} does not apply to {name}")
    return setup(data_root=data_root, limit=limit, **options)

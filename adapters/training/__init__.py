"""Training: the recipes of the built-in models and a generic, resumable trainer.

Training is its own part: it imports the model side (:func:`adapters.load`,
:mod:`adapters.preprocess`, :mod:`adapters.datasets`) and the multi-process
helpers of :mod:`interp.parallel`; nothing on the model side imports it.

Modules
-------
:mod:`~adapters.training.recipe`
    The :class:`Recipe` type (optimizer, schedule, loss, augmentation, sizes).
:mod:`~adapters.training.recipes`
    :data:`RECIPES` and :data:`AUGMENTATIONS`, one entry per model.
:mod:`~adapters.training.augment`, :mod:`~adapters.training.transforms`
    :class:`AugSpec`, the one description of a training augmentation, and
    the CPU transforms built from it.
:mod:`~adapters.training.uint8_cache`, :mod:`~adapters.training.gpu_batches`
    The GPU fast path: Imagenette decoded once into a uint8 cache, augmented
    per batch on the device from the same :class:`AugSpec`.
:mod:`~adapters.training.data`, :mod:`~adapters.training.loop`,
:mod:`~adapters.training.checkpoints`, :mod:`~adapters.training.fit`
    The trainer: epoch orders and loaders, one epoch and evaluation,
    checkpoints / resume / log, and :func:`fit` composing them.
:mod:`~adapters.training.losses`
    Cross-entropy and LeNet-5's MAP criterion, and how outputs rank classes.
:mod:`~adapters.training.setups`
    Per-dataset setups: LeNet-5 on MNIST, the five models on Imagenette.
:mod:`~adapters.training.finetune`
    Fine-tuning pretrained models on Imagenette (head-only and full).
:mod:`~adapters.training.reproduce`, :mod:`~adapters.training.results`
    ``cnn-internals reproduce``: the five runs and the twins, panels, report.
:mod:`~adapters.training.commands`
    The commands ``cnn-internals train | finetune | reproduce``.

Examples
--------
>>> from adapters.training import fit, training_setup
>>> spec = training_setup("lenet5", limit=1000)      # doctest: +SKIP
>>> fit(spec, "out/lenet5", stop_after=1)            # doctest: +SKIP
"""
from __future__ import annotations

from .augment import JITTER, AugSpec, check_crop_scale, train_transform, val_transform
from .checkpoints import CHECKPOINT_FORMAT, rng_state, seed_everything, set_rng_state
from .data import rank_blocks
from .fit import check_device, fit
from .gpu_batches import DeviceImagenette, affine_crop, color_jitter, crop_theta
from .loop import convert_sync_bn, evaluate, restore_bn, train_epoch
from .losses import LOSS_J, lecun_loss, penalties_to_scores
from .recipe import EpochScheduler, Recipe, mobilenet_param_groups
from .recipes import AUGMENTATIONS, RECIPES, augmentation, get_recipe
from .setups import SETUPS, imagenette_setup, lenet5_setup, setup_for, training_setup
from .spec import TrainSpec
from .transforms import INTERPOLATIONS, Lighting, RandomCropWithMeanSub, RandomResizeRandInterp
from .uint8_cache import CACHE_FORMAT, UInt8Split, cache_key, decode_uint8, load_or_decode

__all__ = [
    # the recipes
    "Recipe", "EpochScheduler", "RECIPES", "AUGMENTATIONS", "get_recipe", "augmentation", "mobilenet_param_groups",
    "LOSS_J", "lecun_loss", "penalties_to_scores",
    # augmentation
    "AugSpec", "JITTER", "check_crop_scale", "train_transform", "val_transform",
    "Lighting", "RandomCropWithMeanSub", "RandomResizeRandInterp", "INTERPOLATIONS",
    # the GPU fast path
    "CACHE_FORMAT", "UInt8Split", "decode_uint8", "cache_key", "load_or_decode",
    "DeviceImagenette", "crop_theta", "affine_crop", "color_jitter",
    # the trainer
    "TrainSpec", "fit", "evaluate", "train_epoch", "rank_blocks", "check_device", "convert_sync_bn", "restore_bn",
    "seed_everything", "rng_state", "set_rng_state", "CHECKPOINT_FORMAT",
    # setups
    "SETUPS", "setup_for", "training_setup", "lenet5_setup", "imagenette_setup",
]

"""What the trainer trains: :class:`TrainSpec`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from .losses import identity
from .recipe import Recipe

__all__ = ["TrainSpec"]


@dataclass
class TrainSpec:
    """What :func:`adapters.training.fit` trains: model, data, recipe, loss, and how outputs rank classes.

    Parameters
    ----------
    model:
        The network, freshly initialised.
    train_set, val_set:
        Datasets of ``(input_tensor, label)`` pairs.
    recipe:
        Hyper-parameters and optimizer/scheduler factories.
    loss_fn:
        ``loss_fn(outputs, labels) -> scalar``, the mean over the batch.
    scores_fn:
        Maps outputs to scores where larger = more likely; top-1 is their
        argmax, top-5 their 5 largest. Identity for logits; negation for
        LeNet-5's RBF penalties.
    val_name:
        Human-readable name of ``val_set``, recorded in logs.
    extra:
        Anything else worth recording in ``log.json`` (model options, preprocessing).
    frozen_bn:
        Keep every BatchNorm layer in eval mode while training: it normalises
        with its running statistics and does not update them (its affine
        weights still learn). For fine-tuning pretrained networks, whose
        statistics are part of what was learned (and, in a twin with
        BatchNorm folded into the convolutions, placeholders that batch
        statistics would replace).
    """

    model: nn.Module
    train_set: Dataset
    val_set: Dataset | None
    recipe: Recipe
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scores_fn: Callable[[torch.Tensor], torch.Tensor] = identity
    val_name: str = "val"
    extra: dict[str, Any] = field(default_factory=dict)
    frozen_bn: bool = False

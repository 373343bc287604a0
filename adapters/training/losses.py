"""Training losses, and how each loss's model outputs rank the classes.

A recipe names its loss (:attr:`adapters.training.Recipe.loss`); :data:`LOSSES`
gives the loss function and :data:`SCORES` the map from outputs to scores
where larger = more likely (top-1 is their argmax, top-5 their five largest).

* ``"cross_entropy"``: logits, ``nn.CrossEntropyLoss``; scores are the logits.
* ``"lecun"``: LeNet-5's RBF penalties (smaller = more likely) with the MAP
  criterion of LeCun et al. (1998), :func:`lecun_loss`; scores are the
  negated penalties (:func:`penalties_to_scores`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["LOSS_J", "lecun_loss", "penalties_to_scores", "identity", "LOSSES", "SCORES", "make_loss"]

#: J of the MAP criterion (paper, eq. 9).
LOSS_J: float = 5.0


def lecun_loss(penalties: torch.Tensor, target: torch.Tensor, j: float = LOSS_J) -> torch.Tensor:
    """LeCun's MAP criterion (paper, eq. 9), averaged over the batch.

    ``E = mean_p [ y_{D_p} + log(exp(-j) + sum_i exp(-y_i)) ]``

    The first term pulls the correct class's penalty down; the second pushes
    the other penalties up (the ``exp(-j)`` term stops it from pushing
    penalties that are already larger than ``j``). Computed with ``logsumexp``
    so that large penalties cannot underflow to ``log(0)``.

    Parameters
    ----------
    penalties:
        ``BxC`` RBF outputs.
    target:
        ``B`` class indices.
    j:
        The constant J (5 in the paper).

    Returns
    -------
    torch.Tensor
        The scalar mean loss.
    """
    correct = penalties.gather(1, target.view(-1, 1)).squeeze(1)
    rubbish = torch.full_like(penalties[:, :1], -float(j))
    competition = torch.logsumexp(torch.cat([rubbish, -penalties], dim=1), dim=1)
    return (correct + competition).mean()


def penalties_to_scores(penalties: torch.Tensor) -> torch.Tensor:
    """Turn penalties into scores where larger = more likely (for top-k ranking)."""
    return -penalties


def identity(x: torch.Tensor) -> torch.Tensor:
    """Scores of logits: the logits themselves."""
    return x


#: Loss name -> factory of the loss function ``loss(outputs, labels) -> scalar``.
LOSSES: dict[str, Callable[[], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "cross_entropy": nn.CrossEntropyLoss,
    "lecun": lambda: lecun_loss,
}

#: Loss name -> the map from the model's outputs to "larger = more likely" scores.
SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "cross_entropy": identity,
    "lecun": penalties_to_scores,
}


def make_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss function called ``name`` (a key of :data:`LOSSES`).

    Raises
    ------
    ValueError
        For an unknown name.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} ({', '.join(LOSSES)})")
    return LOSSES[name]()

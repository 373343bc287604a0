"""The :class:`Recipe` type: one training run's hyper-parameters as plain data, plus their factories.

A recipe holds values only (names and keyword arguments), so it prints,
compares, goes into ``log.json`` and into checkpoints (``weights_only``-safe)
as a plain dict (:meth:`Recipe.to_dict`). Its factories are generic:

* :meth:`Recipe.make_optimizer` takes the model (or its parameters):
  ``"sgd"``, ``"adam"``, ``"adamw"`` or ``"rmsprop"`` with
  :attr:`Recipe.optimizer_kwargs`; ``param_groups="mobilenet"`` puts the
  depthwise kernels in a group without weight decay
  (:func:`mobilenet_param_groups`).
* :meth:`Recipe.make_scheduler` takes the optimizer and the number of batches
  per epoch. The trainer calls ``step()`` after every batch:

  - ``"constant"`` and ``"cosine"`` (to 0 at the end of the run) are
    per-batch ``LambdaLR`` schedules (:meth:`Recipe.lr_factor`), with an
    optional linear warm-up of ``warmup_epochs``;
  - ``"step"`` (``StepLR``: ``step_size`` epochs, ``gamma``) and
    ``"reduce_on_plateau"`` (``ReduceLROnPlateau`` on the validation top-1,
    ``scheduler_metric="val_top1"``) are epoch-level torch schedulers,
    wrapped in an :class:`EpochScheduler`.
* :meth:`Recipe.make_loss` gives the loss named by :attr:`Recipe.loss`
  (:data:`adapters.training.losses.LOSSES`).

The recipes of the six models are in :mod:`adapters.training.recipes`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .losses import LOSSES, SCORES, make_loss

__all__ = ["Recipe", "EpochScheduler", "mobilenet_param_groups", "OPTIMIZERS", "SCHEDULERS", "BATCH_SCHEDULES"]

#: Optimizer name -> torch class.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}
#: Epoch-level schedules: name -> torch scheduler class (stepped per epoch through :class:`EpochScheduler`).
SCHEDULERS: dict[str, Any] = {
    "reduce_on_plateau": torch.optim.lr_scheduler.ReduceLROnPlateau,
    "step": torch.optim.lr_scheduler.StepLR,
}
#: Per-batch schedules computed by :meth:`Recipe.lr_factor`.
BATCH_SCHEDULES = ("constant", "cosine")


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels and module.groups > 1


def mobilenet_param_groups(model_or_params: nn.Module | Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Two parameter groups: depthwise convolution weights (no weight decay) and the rest.

    Parameters
    ----------
    model_or_params:
        The model (depthwise = ``Conv2d`` with ``groups == in_channels > 1``),
        or just its parameters (depthwise = a 4-D weight ``Cx1xKxK`` with C > 1,
        the only shape a depthwise kernel can have in MobileNet).
    weight_decay:
        Weight decay of the non-depthwise group.

    Returns
    -------
    list of dict
        The depthwise group (weight decay 0), then the others.
    """
    if isinstance(model_or_params, nn.Module):
        dw_ids = {id(m.weight) for m in model_or_params.modules() if _is_depthwise(m)}
        params = [p for p in model_or_params.parameters() if p.requires_grad]
    else:
        params = [p for p in model_or_params if p.requires_grad]
        dw_ids = {id(p) for p in params if p.dim() == 4 and p.shape[1] == 1 and p.shape[0] > 1}
    depthwise = [p for p in params if id(p) in dw_ids]
    others = [p for p in params if id(p) not in dw_ids]
    return [{"params": depthwise, "weight_decay": 0.0}, {"params": others, "weight_decay": weight_decay}]


class EpochScheduler:
    """An epoch-level LR scheduler driven by a per-batch training loop.

    :func:`adapters.training.fit` calls ``step()`` after every batch. Here
    that only counts batches and, for a schedule without a metric
    (``StepLR``), steps the wrapped scheduler once per ``steps_per_epoch``
    batches, i.e. once per epoch. A metric-driven schedule
    (``ReduceLROnPlateau``) steps in :meth:`epoch_end`, which the trainer
    calls with the epoch's record (``{"val_top1": ...}``).

    Parameters
    ----------
    inner:
        The torch scheduler.
    steps_per_epoch:
        Batches per epoch.
    metric:
        Record key fed to ``inner.step(value)`` at the end of each epoch, or ``None``.
    """

    def __init__(self, inner: Any, steps_per_epoch: int, metric: str | None) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.inner = inner
        self.steps_per_epoch = int(steps_per_epoch)
        self.metric = metric
        self.batches = 0

    def step(self) -> None:
        """Count one batch; step a metric-free schedule at each epoch boundary."""
        self.batches += 1
        if self.metric is None and self.batches % self.steps_per_epoch == 0:
            self.inner.step()

    def epoch_end(self, record: Mapping[str, Any]) -> None:
        """Step a metric-driven schedule with ``record[metric]`` (no-op otherwise)."""
        if self.metric is None:
            return
        if self.metric not in record:
            raise ValueError(
                f"the LR schedule needs {self.metric!r} but the epoch record has only {', '.join(record)}; "
                "train with a validation set"
            )
        self.inner.step(float(record[self.metric]))

    def get_last_lr(self) -> list[float]:
        """Current learning rate of each parameter group."""
        return [g["lr"] for g in self.inner.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Batch count and the wrapped scheduler's state (for exact resumption)."""
        return {"batches": self.batches, "steps_per_epoch": self.steps_per_epoch, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.batches = int(state["batches"])
        self.inner.load_state_dict(state["inner"])


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one training run (plain data) and the factories that use them.

    Parameters
    ----------
    name:
        Recipe name recorded in logs and checkpoints.
    epochs:
        Number of passes over the training set; the LR schedule spans them.
    batch_size:
        Training batch size (the global batch under torchrun; evaluation uses twice as much).
    optimizer:
        ``"sgd"``, ``"adam"``, ``"adamw"`` or ``"rmsprop"``.
    lr:
        Learning rate (a field of its own so that ``--lr`` can replace it).
    optimizer_kwargs:
        Other optimizer arguments (``momentum``, ``weight_decay``, ``eps``,
        ``betas``, ...). ``weight_decay`` is 0 unless given, for every
        optimizer (AdamW's own default would be 0.01).
    scheduler:
        ``"constant"`` or ``"cosine"`` (per batch), ``"step"`` or
        ``"reduce_on_plateau"`` (per epoch); see the module docstring.
    scheduler_kwargs:
        Arguments of an epoch-level scheduler (``step_size``/``gamma``,
        ``factor``/``patience``).
    scheduler_metric:
        ``"val_top1"`` for ``"reduce_on_plateau"`` (the record key it is
        driven by), else ``None``.
    warmup_epochs:
        Linear warm-up from 0, in (possibly fractional) epochs, before a per-batch schedule.
    param_groups:
        ``"mobilenet"`` for :func:`mobilenet_param_groups`, ``None`` for one group.
    loss:
        ``"cross_entropy"`` or ``"lecun"`` (:mod:`adapters.training.losses`).
    augment:
        Name of the training augmentation (a key of
        :data:`adapters.training.recipes.AUGMENTATIONS`), ``None`` for none.
    image_size:
        Input side the model is trained at (``None``: fixed by the model).
    grad_clip:
        Clip the global gradient norm to this value if set.
    model:
        The model name the recipe trains (``adapters.load(model)``), if any.
    dataset:
        What the model trains on: ``"mnist"`` or ``"imagenette"`` (picks the
        training setup, :data:`adapters.training.setups.SETUPS`).
    target_top1:
        The validation top-1 the recipe should reach on its last epoch (issue
        #10's targets; ``cnn-internals reproduce`` reports against it), if any.
    """

    name: str
    epochs: int
    batch_size: int
    optimizer: str = "adamw"
    lr: float = 1e-3
    optimizer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    scheduler: str = "constant"
    scheduler_kwargs: Mapping[str, Any] = field(default_factory=dict)
    scheduler_metric: str | None = None
    warmup_epochs: float = 0.0
    param_groups: str | None = None
    loss: str = "cross_entropy"
    augment: str | None = None
    image_size: int | None = None
    grad_clip: float | None = None
    model: str | None = None
    dataset: str = "imagenette"
    target_top1: float | None = None

    def __post_init__(self) -> None:
        where = f"recipe {self.name!r}"
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"{where}: epochs and batch_size must be >= 1")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"{where}: unknown optimizer {self.optimizer!r} ({', '.join(OPTIMIZERS)})")
        known = (*BATCH_SCHEDULES, *SCHEDULERS)
        if self.scheduler not in known:
            raise ValueError(f"{where}: unknown scheduler {self.scheduler!r} ({', '.join(known)})")
        if (self.scheduler == "reduce_on_plateau") != (self.scheduler_metric is not None):
            raise ValueError(f"{where}: scheduler_metric goes with (and only with) reduce_on_plateau")
        if self.warmup_epochs and self.scheduler not in BATCH_SCHEDULES:
            raise ValueError(f"{where}: warm-up goes with the per-batch schedules ({', '.join(BATCH_SCHEDULES)})")
        if self.loss not in LOSSES:
            raise ValueError(f"{where}: unknown loss {self.loss!r} ({', '.join(LOSSES)})")
        if self.param_groups not in (None, "mobilenet"):
            raise ValueError(f"{where}: unknown param_groups {self.param_groups!r} (None, 'mobilenet')")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON- and ``weights_only``-safe); equal recipes give equal dicts."""
        out = dataclasses.asdict(self)
        out["optimizer_kwargs"] = dict(self.optimizer_kwargs)
        out["scheduler_kwargs"] = dict(self.scheduler_kwargs)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base: "Recipe | None" = None) -> "Recipe":
        """The recipe :meth:`to_dict` wrote, or one written by the two recipe types this one replaces.

        Those (before ``adapters.training`` became a package) are read as the
        recipe that builds the same optimizer and schedule, the fields they
        did not record taken from ``base``, so a run they checkpointed still
        resumes.

        Raises
        ------
        ValueError
            If ``d`` is none of these.
        """
        if "betas" in d and "step_epochs" in d:  # the trainer's former own recipe
            fields = _from_trainer_recipe(d)
        elif "train_transform" in d:  # the former Imagenette recipe
            fields = {k: v for k, v in d.items() if k not in ("train_transform", "val_transform")}
            fields.update(scheduler=fields.get("scheduler") or "constant",
                          augment=str(d["train_transform"]).removesuffix("_train"))
        else:
            unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"not a recipe: unknown key(s) {', '.join(sorted(unknown))}")
            fields = dict(d)
        return dataclasses.replace(base, **fields) if base is not None else cls(**fields)

    def make_optimizer(self, model: nn.Module | Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimizer over ``model``'s trainable parameters (a module or an iterable of parameters)."""
        kwargs = {"weight_decay": 0.0, **self.optimizer_kwargs}
        if self.param_groups == "mobilenet":
            params: Any = mobilenet_param_groups(model, kwargs.pop("weight_decay"))
        else:
            source = model.parameters() if isinstance(model, nn.Module) else model
            params = [p for p in source if p.requires_grad]
        return OPTIMIZERS[self.optimizer](params, lr=self.lr, **kwargs)

    def lr_factor(self, step: int, steps_per_epoch: int) -> float:
        """Multiplier of ``lr`` before optimizer step ``step`` (0-based, over the whole run) of a per-batch schedule."""
        total = self.epochs * steps_per_epoch
        warmup = int(round(self.warmup_epochs * steps_per_epoch))
        if step < warmup:
            return (step + 1) / warmup
        if self.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def make_scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int = 1) -> Any:
        """The LR scheduler, stepped after every batch.

        ``steps_per_epoch`` is the number of batches per epoch (1: the caller
        steps once per epoch). Per-batch schedules are a ``LambdaLR`` of
        :meth:`lr_factor`; epoch-level ones an :class:`EpochScheduler`.
        """
        if self.scheduler in BATCH_SCHEDULES:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_factor(step, steps_per_epoch))
        kwargs = dict(self.scheduler_kwargs)
        if self.scheduler == "reduce_on_plateau":
            kwargs.setdefault("mode", "max")  # top-1 accuracy: larger is better
        inner = SCHEDULERS[self.scheduler](optimizer, **kwargs)
        return EpochScheduler(inner, steps_per_epoch, self.scheduler_metric)

    def make_loss(self) -> Any:
        """The training loss ``loss(outputs, labels) -> scalar``."""
        return make_loss(self.loss)

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """The model's outputs as scores where larger = more likely (how top-1 / top-5 are counted)."""
        return SCORES[self.loss](outputs)


def _from_trainer_recipe(d: Mapping[str, Any]) -> dict[str, Any]:
    """Fields of :class:`Recipe` building the optimizer and schedule a former trainer recipe ``d`` built."""
    if d["scheduler"] not in BATCH_SCHEDULES:
        raise ValueError(f"the former per-batch {d['scheduler']!r} schedule has no equivalent")
    kwargs: dict[str, Any] = {"weight_decay": d["weight_decay"]}
    if d["optimizer"] == "sgd":
        kwargs.update(momentum=d["momentum"], nesterov=d["nesterov"])
    elif tuple(d["betas"]) != (0.9, 0.999):
        kwargs["betas"] = tuple(d["betas"])
    return {"name": d["name"], "epochs": d["epochs"], "batch_size": d["batch_size"], "optimizer": d["optimizer"],
            "lr": d["lr"], "optimizer_kwargs": kwargs, "scheduler": d["scheduler"],
            "warmup_epochs": d["warmup_epochs"], "grad_clip": d["grad_clip"]}

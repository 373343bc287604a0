"""Training recipes of the five Imagenette models, as data, plus their shared plumbing.

A :class:`Recipe` holds plain values (optimizer name and keyword arguments,
scheduler name and keyword arguments, epochs, batch size, loss) and names the
functions that build its train/val transforms. Its factories are generic:

* :meth:`Recipe.make_optimizer` takes the model (or its parameters),
* :meth:`Recipe.make_scheduler` takes the optimizer (and the number of batches
  per epoch) and returns an :class:`EpochScheduler`,
* :attr:`Recipe.scheduler_metric` is ``"val_top1"`` for schedulers driven by
  validation accuracy (``ReduceLROnPlateau``), else ``None``,
* :meth:`Recipe.make_transforms` takes :class:`~adapters.datasets.imagenette.DatasetStats`
  and the image size.

It is shaped to plug into :func:`adapters.training.fit` (``name``, ``epochs``,
``batch_size``, ``lr``, ``grad_clip``, ``to_dict``, per-batch ``step()``).

The recipes (:data:`RECIPES`), from the original "CNN Internals" text; where
it is silent the choice is stated:

========== ======================================= ================================ ====== =====
model      optimizer                               scheduler                        epochs batch
========== ======================================= ================================ ====== =====
alexnet    SGD lr 0.01, m 0.9, wd 5e-4 (paper)     ReduceLROnPlateau(0.1, 3) top-1  30     128
vgg16      SGD lr 0.01, m 0.9, wd 5e-4             ReduceLROnPlateau(0.1, 3) top-1  20     256
inception  SGD lr 0.01, m 0.9, wd 2e-4             StepLR(8, 0.96)                  30     256
resnet18   AdamW lr 1e-3, wd 1e-4                  ReduceLROnPlateau(0.1, 2) top-1  30     256
mobilenet  RMSprop lr 0.045, m 0.9, eps 1.0;       StepLR(2, 0.94)                  30     256
           wd 0 depthwise, 4e-5 other parameters
========== ======================================= ================================ ====== =====

All use cross-entropy loss. AlexNet's optimizer is not in the original text:
it is the paper's (Krizhevsky et al. 2012, section 5: SGD, batch 128,
momentum 0.9, weight decay 5e-4, lr 0.01 divided by 10 when the validation
error stops improving); its 30 epochs (the paper ran 90 on full ImageNet) and
patience 3 are our choices for Imagenette.

Transforms (``S`` = image size, 224 in the recipes; the other lengths scale
with it, e.g. 256 = round(S * 256 / 224)):

* AlexNet: resize 256, centre 256 crop, [0, 1], PCA lighting (alpha 0.1,
  dataset eigen-decomposition), mean-image subtraction with a random S crop,
  horizontal flip / val: the same without lighting, central S crop.
* VGG-16: resize 256, random S crop, flip, colour jitter, dataset mean/std /
  val: resize 256, centre S crop, mean/std.
* InceptionNet: shorter side to a random 256..480 with a random interpolation
  (bilinear, area, nearest, bicubic), random S crop, flip, colour jitter,
  mean/std / val as VGG-16.
* ResNet-18: as InceptionNet without colour jitter (its original text lists
  only the scale augmentation and flip).
* MobileNet: RandomResizedCrop(S, scale 0.5-1), flip, colour jitter, mean/std
  / val as VGG-16.

Colour jitter strengths are not given in the original text; we use
brightness 0.4, contrast 0.4, saturation 0.4, hue 0.1 (:data:`JITTER`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .datasets.imagenette import DatasetStats

__all__ = [
    "Recipe",
    "EpochScheduler",
    "RECIPES",
    "JITTER",
    "get_recipe",
    "init_weights",
    "eval_preprocess",
    "finish_load",
    "training_setup",
    "mobilenet_param_groups",
    "rrc_train",
    "check_crop_scale",
    "JITTER_TRANSFORMS",
]

#: Colour jitter used by the VGG-16, InceptionNet and MobileNet recipes.
JITTER: dict[str, float] = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}


# --------------------------------------------------------------------------- init


def init_weights(model: nn.Module) -> None:
    """The initialisation of the original recipes.

    Kaiming normal weights for every ``Conv2d`` and ``Linear`` (fan-in mode,
    ReLU gain: the variance-preserving choice for ReLU networks, and correct
    for depthwise convolutions too, whose fan-out PyTorch miscounts), zero
    biases; ``BatchNorm2d`` weight 1, bias 0.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- transforms


def _scaled(image_size: int, length: int) -> int:
    return int(round(image_size * length / 224))


def _to_float() -> list[Callable]:
    from torchvision.transforms import v2 as T

    return [T.ToImage(), T.RGB(), T.ToDtype(torch.float32, scale=True)]


def _normalize(stats: DatasetStats) -> Callable:
    from torchvision.transforms import v2 as T

    return T.Normalize(stats.mean.tolist(), stats.std.tolist())


def alexnet_train(stats: DatasetStats, image_size: int = 224) -> Callable:
    """AlexNet training transform (see the module docstring)."""
    from torchvision.transforms import v2 as T

    from .transforms import Lighting, RandomCropWithMeanSub

    base = _scaled(image_size, 256)
    return T.Compose(
        [
            T.Resize(base, antialias=True),
            T.CenterCrop(base),
            *_to_float(),
            Lighting(0.1, stats.eigvals, stats.eigvecs),
            RandomCropWithMeanSub(stats.mean_image_at(base), image_size),
            T.RandomHorizontalFlip(),
        ]
    )


def alexnet_val(stats: DatasetStats, image_size: int = 224) -> Callable:
    """AlexNet evaluation transform: resize, centre crop, mean-image subtraction, centre crop."""
    from torchvision.transforms import v2 as T

    from .transforms import CenterCropWithMeanSub

    base = _scaled(image_size, 256)
    return T.Compose(
        [T.Resize(base, antialias=True), T.CenterCrop(base), *_to_float(),
         CenterCropWithMeanSub(stats.mean_image_at(base), image_size)]
    )


def resize_crop_val(stats: DatasetStats, image_size: int = 224) -> Callable:
    """Resize 256, centre crop, [0, 1], dataset mean/std (VGG-16, InceptionNet, ResNet-18, MobileNet)."""
    from torchvision.transforms import v2 as T

    return T.Compose(
        [T.Resize(_scaled(image_size, 256), antialias=True), T.CenterCrop(image_size), *_to_float(), _normalize(stats)]
    )


def vgg16_train(stats: DatasetStats, image_size: int = 224) -> Callable:
    """VGG-16 training transform: resize 256, random crop, flip, colour jitter, mean/std."""
    from torchvision.transforms import v2 as T

    return T.Compose(
        [
            T.ToImage(),
            T.RGB(),
            T.Resize(_scaled(image_size, 256), antialias=True),
            T.RandomCrop(image_size),
            T.RandomHorizontalFlip(),
            T.ColorJitter(**JITTER),
            T.ToDtype(torch.float32, scale=True),
            _normalize(stats),
        ]
    )


def _scale_aug_train(stats: DatasetStats, image_size: int, jitter: bool) -> Callable:
    from torchvision.transforms import v2 as T

    from .transforms import RandomResizeRandInterp

    steps: list[Callable] = [
        T.ToImage(),
        T.RGB(),
        RandomResizeRandInterp(_scaled(image_size, 256), _scaled(image_size, 480)),
        T.RandomCrop(image_size),
        T.RandomHorizontalFlip(),
    ]
    if jitter:
        steps.append(T.ColorJitter(**JITTER))
    return T.Compose(steps + [T.ToDtype(torch.float32, scale=True), _normalize(stats)])


def inception_train(stats: DatasetStats, image_size: int = 224) -> Callable:
    """InceptionNet training transform: random 256-480 resize, random interpolation, crop, flip, jitter."""
    return _scale_aug_train(stats, image_size, jitter=True)


def resnet18_train(stats: DatasetStats, image_size: int = 224) -> Callable:
    """ResNet-18 training transform: random 256-480 resize, random interpolation, crop, flip."""
    return _scale_aug_train(stats, image_size, jitter=False)


def mobilenet_train(stats: DatasetStats, image_size: int = 224) -> Callable:
    """MobileNet training transform: RandomResizedCrop (scale 0.5-1), flip, colour jitter, mean/std."""
    from torchvision.transforms import v2 as T

    return T.Compose(
        [
            T.ToImage(),
            T.RGB(),
            T.RandomResizedCrop(image_size, scale=(0.5, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.ColorJitter(**JITTER),
            T.ToDtype(torch.float32, scale=True),
            _normalize(stats),
        ]
    )


#: Training transforms whose recipe includes colour jitter (kept by :func:`rrc_train`).
JITTER_TRANSFORMS = frozenset({"vgg16_train", "inception_train", "mobilenet_train"})


def check_crop_scale(crop_scale: float | None, model: str | None = None) -> None:
    """One clear error for a ``--crop-scale`` that cannot apply (out of (0, 1], or for AlexNet)."""
    if crop_scale is None:
        return
    if model == "alexnet":
        raise ValueError("--crop-scale does not apply to alexnet (its crops are tied to the mean image)")
    if not 0 < crop_scale <= 1:
        raise ValueError(f"--crop-scale must be in (0, 1], got {crop_scale}")


def rrc_train(stats: DatasetStats, image_size: int, scale: tuple[float, float], jitter: bool) -> Callable:
    """RandomResizedCrop(``scale``), flip, optional colour jitter, mean/std: a recipe with its crop replaced.

    What ``cnn-internals train --crop-scale`` trains with (a labelled
    deviation from the recipe, for the "tuned" runs): the crop covers a
    random ``scale`` fraction of the image area instead of the recipe's
    resize-and-crop; the recipe's colour jitter (``jitter``) stays.
    """
    from torchvision.transforms import v2 as T

    steps: list[Callable] = [T.ToImage(), T.RGB(), T.RandomResizedCrop(image_size, scale=scale, antialias=True),
                             T.RandomHorizontalFlip()]
    if jitter:
        steps.append(T.ColorJitter(**JITTER))
    return T.Compose(steps + [T.ToDtype(torch.float32, scale=True), _normalize(stats)])


# --------------------------------------------------------------------------- optimizers


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
    """
    if isinstance(model_or_params, nn.Module):
        from .mobilenet import is_depthwise

        dw_ids = {id(m.weight) for m in model_or_params.modules() if is_depthwise(m)}
        params = [p for p in model_or_params.parameters() if p.requires_grad]
    else:
        params = [p for p in model_or_params if p.requires_grad]
        dw_ids = {id(p) for p in params if p.dim() == 4 and p.shape[1] == 1 and p.shape[0] > 1}
    depthwise = [p for p in params if id(p) in dw_ids]
    others = [p for p in params if id(p) not in dw_ids]
    return [{"params": depthwise, "weight_decay": 0.0}, {"params": others, "weight_decay": weight_decay}]


_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
}
_SCHEDULERS: dict[str, Any] = {
    "reduce_on_plateau": torch.optim.lr_scheduler.ReduceLROnPlateau,
    "step": torch.optim.lr_scheduler.StepLR,
}
_TRANSFORMS: dict[str, Callable[[DatasetStats, int], Callable]] = {
    f.__name__: f
    for f in (alexnet_train, alexnet_val, vgg16_train, resize_crop_val, inception_train, resnet18_train, mobilenet_train)
}


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


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Recipe:
    """One model's training recipe (plain data plus factories).

    Parameters
    ----------
    name:
        Recipe name (logs, checkpoints).
    model:
        Adapter name the recipe trains (``adapters.load(model)``).
    epochs, batch_size:
        Length of the run and training batch size.
    optimizer:
        ``"sgd"``, ``"adamw"`` or ``"rmsprop"``.
    lr:
        Learning rate (a field of its own so that ``--lr`` can replace it).
    optimizer_kwargs:
        Other optimizer arguments (momentum, weight_decay, eps, ...).
    scheduler:
        ``"reduce_on_plateau"``, ``"step"`` (both per epoch) or ``None``.
    scheduler_kwargs:
        Scheduler arguments (``factor``/``patience``, ``step_size``/``gamma``).
    scheduler_metric:
        ``"val_top1"`` where the scheduler needs the validation top-1 after
        every epoch, else ``None``.
    loss:
        ``"cross_entropy"``.
    train_transform, val_transform:
        Names of the functions of this module that build the transforms from
        ``(stats, image_size)``.
    param_groups:
        ``"mobilenet"`` for :func:`mobilenet_param_groups`, ``None`` for one group.
    image_size:
        Input side the model is trained at.
    grad_clip:
        Global gradient-norm clip, ``None`` for none (none of the recipes clips).
    """

    name: str
    model: str
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    optimizer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    scheduler: str | None = None
    scheduler_kwargs: Mapping[str, Any] = field(default_factory=dict)
    scheduler_metric: str | None = None
    loss: str = "cross_entropy"
    train_transform: str = "resize_crop_val"
    val_transform: str = "resize_crop_val"
    param_groups: str | None = None
    image_size: int = 224
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"recipe {self.name!r}: epochs and batch_size must be >= 1")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"recipe {self.name!r}: unknown optimizer {self.optimizer!r} ({', '.join(_OPTIMIZERS)})")
        if self.scheduler is not None and self.scheduler not in _SCHEDULERS:
            raise ValueError(f"recipe {self.name!r}: unknown scheduler {self.scheduler!r} ({', '.join(_SCHEDULERS)})")
        if (self.scheduler == "reduce_on_plateau") != (self.scheduler_metric is not None):
            raise ValueError(f"recipe {self.name!r}: scheduler_metric goes with (and only with) reduce_on_plateau")
        for t in (self.train_transform, self.val_transform):
            if t not in _TRANSFORMS:
                raise ValueError(f"recipe {self.name!r}: unknown transform builder {t!r}")
        if self.loss != "cross_entropy":
            raise ValueError(f"recipe {self.name!r}: unknown loss {self.loss!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON- and ``weights_only``-safe); equal recipes give equal dicts."""
        out = dataclasses.asdict(self)
        out["optimizer_kwargs"] = dict(self.optimizer_kwargs)
        out["scheduler_kwargs"] = dict(self.scheduler_kwargs)
        return out

    def make_optimizer(self, model: nn.Module | Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimizer over ``model``'s trainable parameters (a module or an iterable of parameters)."""
        kwargs = dict(self.optimizer_kwargs)
        if self.param_groups == "mobilenet":
            params: Any = mobilenet_param_groups(model, kwargs.pop("weight_decay", 0.0))
        else:
            source = model.parameters() if isinstance(model, nn.Module) else model
            params = [p for p in source if p.requires_grad]
        return _OPTIMIZERS[self.optimizer](params, lr=self.lr, **kwargs)

    def make_scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int = 1) -> EpochScheduler:
        """The LR scheduler wrapped for a per-batch loop (see :class:`EpochScheduler`).

        ``steps_per_epoch`` is the number of batches per epoch; 1 means the
        caller steps once per epoch. A recipe without a schedule gets a
        constant one.
        """
        if self.scheduler is None:
            # A constant schedule, so that a per-batch loop can still call step().
            inner = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=1.0)
            return EpochScheduler(inner, steps_per_epoch, None)
        kwargs = dict(self.scheduler_kwargs)
        if self.scheduler == "reduce_on_plateau":
            # Top-1 accuracy: larger is better.
            kwargs.setdefault("mode", "max")
        inner = _SCHEDULERS[self.scheduler](optimizer, **kwargs)
        return EpochScheduler(inner, steps_per_epoch, self.scheduler_metric)

    def make_loss(self) -> nn.Module:
        """The training loss (cross-entropy on logits)."""
        return nn.CrossEntropyLoss()

    def make_transforms(self, stats: DatasetStats, image_size: int | None = None) -> tuple[Callable, Callable]:
        """``(train_transform, val_transform)`` for PIL images, at ``image_size`` (default the recipe's)."""
        size = int(image_size or self.image_size)
        return _TRANSFORMS[self.train_transform](stats, size), _TRANSFORMS[self.val_transform](stats, size)


_SGD_PLATEAU = dict(
    optimizer="sgd",
    lr=0.01,
    scheduler="reduce_on_plateau",
    scheduler_metric="val_top1",
)

#: The five recipes, by adapter name.
RECIPES: dict[str, Recipe] = {
    "alexnet": Recipe(
        name="alexnet-imagenette", model="alexnet", epochs=30, batch_size=128,
        optimizer_kwargs={"momentum": 0.9, "weight_decay": 5e-4},
        scheduler_kwargs={"factor": 0.1, "patience": 3},
        train_transform="alexnet_train", val_transform="alexnet_val", **_SGD_PLATEAU,
    ),
    "vgg16": Recipe(
        name="vgg16-imagenette", model="vgg16", epochs=20, batch_size=256,
        optimizer_kwargs={"momentum": 0.9, "weight_decay": 5e-4},
        scheduler_kwargs={"factor": 0.1, "patience": 3},
        train_transform="vgg16_train", val_transform="resize_crop_val", **_SGD_PLATEAU,
    ),
    "inception": Recipe(
        name="inception-imagenette", model="inception", epochs=30, batch_size=256,
        optimizer="sgd", lr=0.01, optimizer_kwargs={"momentum": 0.9, "weight_decay": 2e-4},
        scheduler="step", scheduler_kwargs={"step_size": 8, "gamma": 0.96},
        train_transform="inception_train", val_transform="resize_crop_val",
    ),
    "resnet18": Recipe(
        name="resnet18-imagenette", model="resnet18", epochs=30, batch_size=256,
        optimizer="adamw", lr=1e-3, optimizer_kwargs={"weight_decay": 1e-4},
        scheduler="reduce_on_plateau", scheduler_kwargs={"factor": 0.1, "patience": 2},
        scheduler_metric="val_top1",
        train_transform="resnet18_train", val_transform="resize_crop_val",
    ),
    "mobilenet": Recipe(
        name="mobilenet-imagenette", model="mobilenet", epochs=30, batch_size=256,
        optimizer="rmsprop", lr=0.045, optimizer_kwargs={"momentum": 0.9, "eps": 1.0, "weight_decay": 4e-5},
        scheduler="step", scheduler_kwargs={"step_size": 2, "gamma": 0.94},
        param_groups="mobilenet",
        train_transform="mobilenet_train", val_transform="resize_crop_val",
    ),
}


def get_recipe(name: str) -> Recipe:
    """The recipe of adapter ``name``; ``ValueError`` listing the known ones otherwise."""
    if name not in RECIPES:
        raise ValueError(f"no Imagenette recipe for {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


# --------------------------------------------------------------------------- adapters


def _stats_or_fallback(data_root: str | os.PathLike | None) -> DatasetStats:
    from . import imagenette

    try:
        return imagenette.dataset_stats(data_root)
    except FileNotFoundError as exc:
        import warnings

        warnings.warn(
            f"Imagenette not found ({exc}); the preprocess uses ImageNet mean/std instead of the "
            "training-set statistics",
            stacklevel=3,
        )
        return imagenette.fallback_stats()


def eval_preprocess(
    name: str, stats: DatasetStats | None = None, image_size: int = 224, data_root: str | os.PathLike | None = None
) -> Callable:
    """The evaluation transform of model ``name`` (PIL image or uint8 tensor -> float ``3xSxS``).

    ``stats`` defaults to the cached Imagenette training statistics
    (:func:`adapters.datasets.imagenette.dataset_stats`, computed on first use), or to
    ImageNet's (:func:`adapters.datasets.imagenette.fallback_stats`, with a warning)
    when Imagenette is not on disk.
    """
    recipe = get_recipe(name)
    if stats is None:
        stats = _stats_or_fallback(data_root)
    return _TRANSFORMS[recipe.val_transform](stats, image_size)


def finish_load(
    model: nn.Module,
    name: str,
    weights: str | os.PathLike | None,
    data_root: str | os.PathLike | None = None,
    stats: DatasetStats | None = None,
) -> tuple[nn.Module, Callable]:
    """Shared tail of the five ``load`` functions: weights, eval mode, preprocess.

    Raises
    ------
    ValueError
        If the checkpoint's keys or shapes do not fit the model.
    """
    if weights is not None:
        from .checkpoint import load_into

        load_into(model, weights, name)
    model.eval()
    return model, eval_preprocess(name, stats=stats, image_size=224, data_root=data_root)


def training_setup(
    name: str,
    data_root: str | os.PathLike | None = None,
    limit: int | None = None,
    fast: bool = False,
    image_size: int | None = None,
    stats: DatasetStats | None = None,
    crop_scale: float | None = None,
):
    """A :class:`adapters.training.TrainSpec` for model ``name`` on Imagenette.

    Parameters
    ----------
    name:
        ``"alexnet"``, ``"vgg16"``, ``"inception"``, ``"resnet18"`` or ``"mobilenet"``.
    data_root:
        Imagenette root (see :class:`adapters.datasets.imagenette.Imagenette`).
    limit:
        Use only this many training and this many validation images (stratified).
    fast:
        Accepted for the ``train`` command's interface; the Imagenette recipes
        have no shorter variant, so it changes nothing.
    image_size:
        Train and evaluate at this side (default 224); the resize lengths scale
        with it. AlexNet only takes 224 (its ``lin1`` is fixed at 256x6x6).
    stats:
        Dataset statistics; default :func:`adapters.datasets.imagenette.dataset_stats`
        over the full training split (computed once, then cached).
    crop_scale:
        Replace the recipe's training crop by RandomResizedCrop with area
        scale ``crop_scale``..1 (:func:`rrc_train`; colour jitter kept). A
        deviation from the recipe, recorded in the run's ``extra``. Not for
        AlexNet (its crops are tied to the mean image).
    """
    from .datasets.imagenette import Imagenette, dataset_stats
    from .training import TrainSpec

    recipe = get_recipe(name)
    size = int(image_size or recipe.image_size)
    if name == "alexnet" and size != 224:
        raise ValueError("alexnet trains at 224 px only (lin1 expects 256x6x6 features); drop --image-size")
    if size != recipe.image_size:
        recipe = dataclasses.replace(recipe, image_size=size)
    check_crop_scale(crop_scale, name)
    if stats is None:
        stats = dataset_stats(data_root)
    train_tf, val_tf = recipe.make_transforms(stats, size)
    if crop_scale is not None:
        train_tf = rrc_train(stats, size, (crop_scale, 1.0), recipe.train_transform in JITTER_TRANSFORMS)
    train_set = Imagenette(data_root, "train", transform=train_tf, limit=limit)
    val_set = Imagenette(data_root, "val", transform=val_tf, limit=limit)
    import adapters

    model, _ = adapters.load(name, stats=stats)  # stats given: no second look for the data
    model.train()
    return TrainSpec(
        model=model,
        train_set=train_set,
        val_set=val_set,
        recipe=recipe,
        loss_fn=recipe.make_loss(),
        val_name="imagenette-val" if limit is None else f"imagenette-val[{len(val_set)}]",
        extra={"image_size": size, "stats_key": stats.key, "stats_images": stats.n_images,
               **({"crop_scale": [crop_scale, 1.0]} if crop_scale is not None else {})},
    )

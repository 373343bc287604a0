"""The training recipes of the six built-in models, and their augmentations: one table each, by model name.

Adding a trainable model = its model file (the model side) + one entry in
:data:`RECIPES` + (for an image model) one in :data:`AUGMENTATIONS` + its
dataset setup in :mod:`adapters.training.setups`.

The recipes, from the original "CNN Internals" text; where it is silent the
choice is stated:

========== ======================================= ================================ ====== =====
model      optimizer                               scheduler                        epochs batch
========== ======================================= ================================ ====== =====
lenet5     AdamW lr 1e-3, wd 1e-4                  cosine to 0, per batch           30     64
alexnet    SGD lr 0.01, m 0.9, wd 5e-4 (paper)     ReduceLROnPlateau(0.1, 3) top-1  30     128
vgg16      SGD lr 0.01, m 0.9, wd 5e-4             ReduceLROnPlateau(0.1, 3) top-1  20     256
inception  SGD lr 0.01, m 0.9, wd 2e-4             StepLR(8, 0.96)                  30     256
resnet18   AdamW lr 1e-3, wd 1e-4                  ReduceLROnPlateau(0.1, 2) top-1  30     256
mobilenet  RMSprop lr 0.045, m 0.9, eps 1.0;       StepLR(2, 0.94)                  30     256
           wd 0 depthwise, 4e-5 other parameters
========== ======================================= ================================ ====== =====

LeNet-5 trains with LeCun's MAP criterion (:func:`adapters.training.losses.lecun_loss`)
and no augmentation: the original implementation's recipe plus one addition
of ours, the cosine decay, which settles the weights at the end of training
(a 10-epoch version reached only 98.86% on the MNIST test set, so there is no
shorter variant). The five Imagenette models use cross-entropy at 224 px.
AlexNet's optimizer is not in the original text: it is the paper's
(Krizhevsky et al. 2012, section 5: SGD, batch 128, momentum 0.9, weight
decay 5e-4, lr 0.01 divided by 10 when the validation error stops
improving); its 30 epochs (the paper ran 90 on full ImageNet) and patience 3
are our choices for Imagenette.

Augmentations (:class:`~adapters.training.augment.AugSpec`, lengths at 224 px):

* AlexNet: resize 256, centre 256 crop, [0, 1], PCA lighting (alpha 0.1,
  dataset eigen-decomposition), mean-image subtraction with a random 224
  crop, horizontal flip.
* VGG-16: resize 256, random 224 crop, flip, colour jitter, dataset mean/std.
* InceptionNet: shorter side to a random 256..480 with a random interpolation
  (bilinear, area, nearest, bicubic), random 224 crop, flip, colour jitter, mean/std.
* ResNet-18: as InceptionNet without colour jitter (its original text lists
  only the scale augmentation and flip).
* MobileNet: RandomResizedCrop(224, scale 0.5-1), flip, colour jitter, mean/std.

Colour jitter strengths are not given in the original text; we use
brightness 0.4, contrast 0.4, saturation 0.4, hue 0.1 (:data:`~adapters.training.augment.JITTER`).
"""
from __future__ import annotations

from .augment import JITTER, AugSpec
from .recipe import Recipe

__all__ = ["RECIPES", "AUGMENTATIONS", "get_recipe", "augmentation"]

_SGD_PLATEAU = dict(optimizer="sgd", lr=0.01, scheduler="reduce_on_plateau", scheduler_metric="val_top1")
_IMAGENETTE = dict(image_size=224, loss="cross_entropy", dataset="imagenette")

#: The recipes, by model name. The Imagenette ones are in order of training time, longest first:
#: ``cnn-internals reproduce`` starts them in this order.
RECIPES: dict[str, Recipe] = {
    "lenet5": Recipe(
        name="lenet5", model="lenet5", epochs=30, batch_size=64,
        optimizer="adamw", lr=1e-3, optimizer_kwargs={"weight_decay": 1e-4}, scheduler="cosine", loss="lecun",
        dataset="mnist",
    ),
    "vgg16": Recipe(
        name="vgg16-imagenette", model="vgg16", target_top1=0.88, epochs=20, batch_size=256,
        optimizer_kwargs={"momentum": 0.9, "weight_decay": 5e-4},
        scheduler_kwargs={"factor": 0.1, "patience": 3}, augment="vgg16", **_SGD_PLATEAU, **_IMAGENETTE,
    ),
    "inception": Recipe(
        name="inception-imagenette", model="inception", target_top1=0.90, epochs=30, batch_size=256,
        optimizer="sgd", lr=0.01, optimizer_kwargs={"momentum": 0.9, "weight_decay": 2e-4},
        scheduler="step", scheduler_kwargs={"step_size": 8, "gamma": 0.96}, augment="inception", **_IMAGENETTE,
    ),
    "mobilenet": Recipe(
        name="mobilenet-imagenette", model="mobilenet", target_top1=0.85, epochs=30, batch_size=256,
        optimizer="rmsprop", lr=0.045, optimizer_kwargs={"momentum": 0.9, "eps": 1.0, "weight_decay": 4e-5},
        scheduler="step", scheduler_kwargs={"step_size": 2, "gamma": 0.94},
        param_groups="mobilenet", augment="mobilenet", **_IMAGENETTE,
    ),
    "resnet18": Recipe(
        name="resnet18-imagenette", model="resnet18", target_top1=0.90, epochs=30, batch_size=256,
        optimizer="adamw", lr=1e-3, optimizer_kwargs={"weight_decay": 1e-4},
        scheduler="reduce_on_plateau", scheduler_kwargs={"factor": 0.1, "patience": 2},
        scheduler_metric="val_top1", augment="resnet18", **_IMAGENETTE,
    ),
    "alexnet": Recipe(
        name="alexnet-imagenette", model="alexnet", target_top1=0.80, epochs=30, batch_size=128,
        optimizer_kwargs={"momentum": 0.9, "weight_decay": 5e-4},
        scheduler_kwargs={"factor": 0.1, "patience": 3}, augment="alexnet", **_SGD_PLATEAU, **_IMAGENETTE,
    ),
}

#: The training augmentations, by name (:attr:`Recipe.augment`), lengths at the 224 px reference crop.
#: Both the CPU transforms and the GPU batches are built from these entries.
AUGMENTATIONS: dict[str, AugSpec] = {
    "alexnet": AugSpec("alexnet", (256, 256), lighting=0.1, mean_image=True),
    "vgg16": AugSpec("resize_random", (256, 256), jitter=JITTER),
    "inception": AugSpec("resize_random", (256, 480), jitter=JITTER),
    "resnet18": AugSpec("resize_random", (256, 480)),
    "mobilenet": AugSpec("rrc", (256, 256), scale=(0.5, 1.0), jitter=JITTER),
}


def get_recipe(name: str) -> Recipe:
    """The recipe of model ``name``; ``ValueError`` listing the known ones otherwise."""
    if name not in RECIPES:
        raise ValueError(f"no recipe for {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def augmentation(recipe: Recipe, image_size: int | None = None, crop_scale: float | None = None) -> AugSpec:
    """The :class:`AugSpec` ``recipe`` trains with, at crop size ``image_size`` (default the recipe's).

    ``crop_scale`` replaces the crop by RandomResizedCrop with area scale
    ``crop_scale``..1 (:meth:`AugSpec.with_crop_scale`).

    Raises
    ------
    ValueError
        If the recipe has no augmentation, or names an unknown one.
    """
    if recipe.augment not in AUGMENTATIONS:
        raise ValueError(f"recipe {recipe.name!r} has no image augmentation ({recipe.augment!r}); "
                         f"known: {', '.join(AUGMENTATIONS)}")
    size = int(image_size or recipe.image_size or 224)
    return AUGMENTATIONS[recipe.augment].at(size).with_crop_scale(crop_scale)

"""The recipe table: the seed's hyper-parameters, optimizers and schedules, and one augmentation entry per model
from which both the CPU transforms and the GPU batches are built.

(The hyper-parameter tests moved from tests/adapters/test_imagenette_models.py when training became its own part.)
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2 as T

from adapters.mobilenet import MobileNetV1
from adapters.preprocess import imagenet_stats, mean_image_crop, resize_crop
from adapters.resnet18 import ResNet18
from adapters.training import (AUGMENTATIONS, JITTER, RECIPES, DeviceImagenette, Lighting, RandomCropWithMeanSub,
                               RandomResizeRandInterp, Recipe, UInt8Split, augmentation, train_transform,
                               training_setup, val_transform)
from adapters.training import recipes as recipes_module
from adapters.training import setups

from conftest import REPO  # noqa: E402

IMAGENETTE = ("alexnet", "vgg16", "inception", "resnet18", "mobilenet")


def _data_root() -> Path:
    root = Path(os.environ.get("CNN_INTERNALS_DATA", REPO.parent / "shared" / "data"))
    if not (root / "imagenette2-160").is_dir():
        pytest.fail(f"Imagenette not found at {root / 'imagenette2-160'} (set CNN_INTERNALS_DATA)", pytrace=False)
    return root / "imagenette2-160"


# ----------------------------------------------------------------- hyper-parameters


def test_recipes_hold_the_seed_hyperparameters():
    r = RECIPES
    assert (r["vgg16"].optimizer, r["vgg16"].lr, dict(r["vgg16"].optimizer_kwargs)) == (
        "sgd", 0.01, {"momentum": 0.9, "weight_decay": 5e-4})
    assert (r["vgg16"].epochs, r["vgg16"].batch_size, r["vgg16"].scheduler_metric) == (20, 256, "val_top1")
    assert dict(r["inception"].scheduler_kwargs) == {"step_size": 8, "gamma": 0.96}
    assert dict(r["inception"].optimizer_kwargs)["weight_decay"] == 2e-4
    assert (r["resnet18"].optimizer, r["resnet18"].lr, dict(r["resnet18"].scheduler_kwargs)) == (
        "adamw", 1e-3, {"factor": 0.1, "patience": 2})
    assert dict(r["mobilenet"].optimizer_kwargs) == {"momentum": 0.9, "eps": 1.0, "weight_decay": 4e-5}
    assert all(rec.epochs == 30 for k, rec in r.items() if k != "vgg16")
    assert all(r[k].make_loss().__class__ is nn.CrossEntropyLoss for k in IMAGENETTE)
    assert (r["alexnet"].batch_size, dict(r["alexnet"].scheduler_kwargs)) == (128, {"factor": 0.1, "patience": 3})
    assert set(RECIPES) == {"lenet5", *IMAGENETTE} and all(RECIPES[k].image_size == 224 for k in IMAGENETTE)


def test_optimizers_and_mobilenet_param_groups():
    model = MobileNetV1(width_mult=0.25)
    for source in (model, model.parameters()):  # the module, or just its parameters (as fit passes them)
        opt = RECIPES["mobilenet"].make_optimizer(source)
        assert isinstance(opt, torch.optim.RMSprop)
        dw, rest = opt.param_groups
        assert (dw["weight_decay"], rest["weight_decay"]) == (0.0, 4e-5)
        assert (dw["lr"], dw["momentum"], dw["eps"]) == (0.045, 0.9, 1.0)
        assert len(dw["params"]) == 13 and all(p.shape[1] == 1 for p in dw["params"])
        assert len(dw["params"]) + len(rest["params"]) == len(list(model.parameters()))
    opt = RECIPES["resnet18"].make_optimizer(ResNet18())
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 1e-4


def test_step_schedule_steps_per_epoch_through_a_per_batch_loop():
    p = nn.Parameter(torch.zeros(1))
    rec = RECIPES["mobilenet"]
    opt = rec.make_optimizer([p])
    sched = rec.make_scheduler(opt, steps_per_epoch=3)
    lrs = []
    for _epoch in range(5):
        for _batch in range(3):
            opt.step()
            sched.step()
        sched.epoch_end({"val_top1": 0.5})  # ignored: StepLR has no metric
        lrs.append(opt.param_groups[0]["lr"])
    # StepLR(step_size=2, gamma=0.94): 0.045 for epochs 0-1, x0.94 from epoch 2, x0.94^2 from epoch 4.
    assert lrs == pytest.approx([0.045, 0.045 * 0.94, 0.045 * 0.94, 0.045 * 0.94**2, 0.045 * 0.94**2])
    state = sched.state_dict()
    fresh = rec.make_scheduler(rec.make_optimizer([p]), steps_per_epoch=3)
    fresh.load_state_dict(state)
    assert fresh.batches == 15


def test_plateau_schedule_reduces_on_stalled_val_top1():
    p = nn.Parameter(torch.zeros(1))
    rec = RECIPES["resnet18"]  # ReduceLROnPlateau(factor 0.1, patience 2), mode max
    opt = rec.make_optimizer([p])
    sched = rec.make_scheduler(opt, steps_per_epoch=4)
    lrs = []
    for top1 in [0.30, 0.40, 0.40, 0.39, 0.40, 0.41]:
        for _ in range(4):
            sched.step()  # per-batch calls never change the LR here
        sched.epoch_end({"val_top1": top1})
        lrs.append(opt.param_groups[0]["lr"])
    # Best 0.40 at epoch 2; epochs 3, 4, 5 do not beat it -> reduced after the third bad epoch.
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 1e-3, 1e-4, 1e-4])
    with pytest.raises(ValueError, match="val_top1"):
        sched.epoch_end({"train_top1": 0.5})


def test_warmup_and_bad_recipes():
    r = Recipe("w", epochs=2, batch_size=4, scheduler="cosine", warmup_epochs=0.5)
    assert [r.lr_factor(s, 10) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    for bad, match in ((dict(optimizer="lbfgs"), "unknown optimizer"), (dict(scheduler="linear"), "unknown scheduler"),
                       (dict(scheduler="step", warmup_epochs=1.0), "warm-up"), (dict(loss="mse"), "unknown loss"),
                       (dict(scheduler="reduce_on_plateau"), "scheduler_metric")):
        with pytest.raises(ValueError, match=match):
            Recipe("bad", epochs=1, batch_size=1, **bad)
    # weight decay is 0 unless given, for AdamW too (torch's own default would be 0.01)
    opt = Recipe("d", epochs=1, batch_size=1).make_optimizer([nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.0


def test_a_former_imagenette_checkpoint_recipe_still_resumes():
    old = {"name": "mobilenet-imagenette", "model": "mobilenet", "epochs": 30, "batch_size": 256,
           "optimizer": "rmsprop", "lr": 0.045, "optimizer_kwargs": {"momentum": 0.9, "eps": 1.0, "weight_decay": 4e-5},
           "scheduler": "step", "scheduler_kwargs": {"step_size": 2, "gamma": 0.94}, "scheduler_metric": None,
           "loss": "cross_entropy", "train_transform": "mobilenet_train", "val_transform": "resize_crop_val",
           "param_groups": "mobilenet", "image_size": 224, "grad_clip": None}
    # Resuming reads it against the current recipe, which supplies what the old layout did not record.
    assert Recipe.from_dict(old, base=RECIPES["mobilenet"]) == RECIPES["mobilenet"]
    assert Recipe.from_dict(old) == dataclasses.replace(RECIPES["mobilenet"], target_top1=None)
    d = RECIPES["mobilenet"].to_dict()
    assert d["optimizer"] == "rmsprop" and d["param_groups"] == "mobilenet" and d["augment"] == "mobilenet"


# ----------------------------------------------------------------- transforms: one spec, two pipelines


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 213, 3), dtype=np.uint8))


def test_recipe_transforms_give_model_inputs():
    stats = imagenet_stats()
    img = _image()
    grey = img.convert("L")
    for name in IMAGENETTE:
        size = 224 if name == "alexnet" else 64
        aug = augmentation(RECIPES[name], size)
        for tf in (train_transform(aug, stats, size), val_transform(aug, stats, size)):
            for im in (img, grey):
                x = tf(im)
                assert tuple(x.shape) == (3, size, size) and x.dtype == torch.float32, name


def _former_train_transforms(stats, s: int) -> dict:
    """The five training transforms as the recipes module wrote them out before the one-spec table."""
    def sc(length: int) -> int:
        return int(round(s * length / 224))

    jitter = T.ColorJitter(**dict(zip(("brightness", "contrast", "saturation", "hue"), JITTER)))
    norm = T.Normalize(stats.mean.tolist(), stats.std.tolist())
    head, tail = [T.ToImage(), T.RGB()], [T.ToDtype(torch.float32, scale=True), norm]
    return {
        "alexnet": T.Compose([T.Resize(sc(256), antialias=True), T.CenterCrop(sc(256)), T.ToImage(), T.RGB(),
                              T.ToDtype(torch.float32, scale=True), Lighting(0.1, stats.eigvals, stats.eigvecs),
                              RandomCropWithMeanSub(stats.mean_image_at(sc(256)), s), T.RandomHorizontalFlip()]),
        "vgg16": T.Compose(head + [T.Resize(sc(256), antialias=True), T.RandomCrop(s), T.RandomHorizontalFlip(),
                                   jitter] + tail),
        "inception": T.Compose(head + [RandomResizeRandInterp(sc(256), sc(480)), T.RandomCrop(s),
                                       T.RandomHorizontalFlip(), jitter] + tail),
        "resnet18": T.Compose(head + [RandomResizeRandInterp(sc(256), sc(480)), T.RandomCrop(s),
                                      T.RandomHorizontalFlip()] + tail),
        "mobilenet": T.Compose(head + [T.RandomResizedCrop(s, scale=(0.5, 1.0), antialias=True),
                                       T.RandomHorizontalFlip(), jitter] + tail),
        "rrc 0.35": T.Compose(head + [T.RandomResizedCrop(s, scale=(0.35, 1.0), antialias=True),
                                      T.RandomHorizontalFlip(), jitter] + tail),
    }


@pytest.mark.parametrize("size", [224, 96])
def test_cpu_transforms_are_bit_identical_to_the_former_ones(size):
    stats = imagenet_stats()
    img = _image()
    former = _former_train_transforms(stats, size)
    names = [n for n in IMAGENETTE if size == 224 or n != "alexnet"]
    for name in names + ["rrc 0.35"]:
        recipe = RECIPES["vgg16" if name == "rrc 0.35" else name]
        aug = augmentation(recipe, size, 0.35 if name == "rrc 0.35" else None)
        for seed in range(3):
            torch.manual_seed(seed)
            ours = train_transform(aug, stats, size)(img)
            torch.manual_seed(seed)
            assert torch.equal(ours, former[name](img)), (name, seed)
        val = val_transform(aug, stats, size)
        ref = mean_image_crop(stats, size) if name == "alexnet" else resize_crop(stats, size)
        assert torch.equal(val(img), ref(img)), name


def _uint8(n: int) -> UInt8Split:
    g = torch.Generator().manual_seed(n)
    images = torch.randint(0, 256, (n, 3, 24, 24), generator=g, dtype=torch.uint8)
    return UInt8Split(images, torch.arange(n) % 10, torch.tensor([[160, 213]] * n))


@pytest.mark.parametrize("name", IMAGENETTE)
def test_cpu_transform_and_gpu_batches_come_from_the_same_entry(name, monkeypatch):
    size = 224 if name == "alexnet" else 64
    recipe = RECIPES[name]
    entry = AUGMENTATIONS[recipe.augment]
    assert recipe.augment == name and augmentation(recipe, size) == entry.at(size)
    # What the GPU path holds is the entry at the crop size ...
    gpu = DeviceImagenette(_uint8(4), _uint8(2), augmentation(recipe, size), imagenet_stats(), size)
    assert gpu.spec == entry.at(size) and gpu.describe()["aug"]["crop"] == entry.crop
    # ... and the CPU transform of the Imagenette setup is built from the same entry: change the entry,
    # both change with it.
    seen: list = []
    monkeypatch.setattr(setups, "train_transform", lambda spec, stats, s: seen.append(spec) or train_transform(
        spec, stats, s))
    changed = dataclasses.replace(entry, jitter=None if entry.jitter else JITTER)
    monkeypatch.setitem(recipes_module.AUGMENTATIONS, name, changed)
    training_setup(name, data_root=_data_root(), limit=10, image_size=size, stats=imagenet_stats())
    assert seen == [changed.at(size)] == [augmentation(recipe, size)]
    cpu_ops = [type(t).__name__ for t in train_transform(changed.at(size), imagenet_stats(), size).transforms]
    assert ("ColorJitter" in cpu_ops) == (changed.jitter is not None)
    assert ("Lighting" in cpu_ops) == (changed.lighting > 0)
    assert ("RandomResizedCrop" in cpu_ops) == (changed.crop == "rrc")
    assert ("RandomResizeRandInterp" in cpu_ops) == (changed.short_range[0] < changed.short_range[1])


def test_training_setup_builds_a_trainspec_for_the_trainer():
    root = _data_root()
    stats = imagenet_stats()
    spec = training_setup("resnet18", data_root=root, limit=20, image_size=64, stats=stats)
    assert len(spec.train_set) == 20 and len(spec.val_set) == 20
    x, y = spec.train_set[0]
    assert x.shape == (3, 64, 64) and y == 0
    assert spec.model.training and isinstance(spec.model, ResNet18)
    assert spec.recipe.image_size == 64 and spec.recipe.scheduler_metric == "val_top1"
    with pytest.raises(ValueError, match="224"):
        training_setup("alexnet", data_root=root, limit=10, image_size=64, stats=stats)

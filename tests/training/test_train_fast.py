"""The GPU fast path of training, on the CPU: uint8 cache, batched affine crops, amp, channels_last, resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from adapters.datasets import Imagenette
from adapters.preprocess import imagenet_stats as fallback_stats
from adapters.training import (AUGMENTATIONS, RECIPES, DeviceImagenette, Recipe, TrainSpec, UInt8Split, affine_crop,
                               augmentation, color_jitter, crop_theta, decode_uint8, fit, train_transform)
from interp.cli import main


def test_uint8_cache_has_the_pil_pixels(data_root):
    from PIL import Image

    ds = Imagenette(data_root / "imagenette2-160", "val", limit=3)
    for size in (160, 40):
        split = decode_uint8(ds.samples, size)
        assert split.images.shape == (3, 3, size, size) and split.images.dtype == torch.uint8
        assert split.labels.tolist() == ds.targets
        for i, (path, _) in enumerate(ds.samples):
            img = Image.open(path).convert("RGB")
            assert split.sizes[i].tolist() == [img.height, img.width]
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            assert np.array_equal(split.images[i].permute(1, 2, 0).numpy(), np.asarray(img))


def _whole(b: int, h: float, w: float, flip: bool = False) -> torch.Tensor:
    one = torch.ones(b, dtype=torch.float64)
    return crop_theta(one * w / 2, one * h / 2, one * w, one * h, one * w, one * h,
                        torch.full((b,), flip))


def test_whole_image_crop_is_a_bilinear_resize_and_flip_is_torch_flip():
    x = torch.rand(2, 3, 16, 16)
    plain = affine_crop(x, _whole(2, 16, 16), 24)
    ref = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
    assert torch.allclose(plain, ref, atol=1e-5)
    flipped = affine_crop(x, _whole(2, 16, 16, flip=True), 24)
    assert torch.allclose(flipped, torch.flip(ref, dims=[-1]), atol=1e-5)


def test_box_crop_equals_torchvision_resized_crop_and_slicing():
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(1, 3, 40, 40)
    one = torch.ones(1, dtype=torch.float64)
    # top 5, left 7, 30x30 box shrunk to 20x20 (no antialias: a plain bilinear resize).
    theta = crop_theta(one * (7 + 15), one * (5 + 15), one * 30, one * 30, one * 40, one * 40)
    ref = TF.resized_crop(x, 5, 7, 30, 30, [20, 20], antialias=False)
    assert torch.allclose(affine_crop(x, theta, 20), ref, atol=1e-5)
    # A 16x16 box at scale 1 lands on pixel centres: it is a slice.
    theta = crop_theta(one * (9 + 8), one * (3 + 8), one * 16, one * 16, one * 40, one * 40)
    assert torch.allclose(affine_crop(x, theta, 16), x[..., 3:19, 9:25], atol=1e-5)


def test_color_jitter_neutral_factors_and_brightness():
    x = torch.rand(2, 3, 8, 8)
    neutral = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 2)
    assert torch.allclose(color_jitter(x, neutral, [3, 2, 1, 0]), x, atol=1e-5)
    half = torch.tensor([[0.5, 1.0, 1.0, 0.0]] * 2)
    assert torch.allclose(color_jitter(x, half, [0, 1, 2, 3]), x * 0.5, atol=1e-6)


def _synthetic(n: int, size: int, seed: int) -> UInt8Split:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    sizes = torch.tensor([[160, 213] if i % 2 else [213, 160] for i in range(n)])
    return UInt8Split(images, torch.arange(n) % 10, sizes)


def test_val_batch_of_a_flat_image_is_its_normalised_colour():
    stats = fallback_stats()
    val = _synthetic(2, 24, 0)
    val.images[:] = torch.tensor([200, 100, 50], dtype=torch.uint8)[None, :, None, None]
    data = DeviceImagenette(_synthetic(4, 24, 1), val, augmentation(RECIPES["resnet18"], 16), stats, 16)
    (x, y), = list(data.val_batches(8))
    expected = (torch.tensor([200, 100, 50]) / 255.0 - stats.mean) / stats.std
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 1]
    assert torch.allclose(x, expected[None, :, None, None].expand_as(x), atol=1e-5)


@pytest.mark.parametrize("recipe", ["alexnet", "vgg16", "inception", "mobilenet"])
def test_train_batches_are_a_function_of_seed_and_epoch(recipe):
    stats = fallback_stats()
    size = 32 if recipe != "alexnet" else 40
    spec = augmentation(RECIPES[recipe], size)
    data = DeviceImagenette(_synthetic(6, 24, 2), _synthetic(2, 24, 3), spec, stats, size)
    a = list(data.train_batches(seed=3, epoch=1, batch_size=4))
    b = list(data.train_batches(seed=3, epoch=1, batch_size=4))
    c = list(data.train_batches(seed=3, epoch=2, batch_size=4))
    assert [x.shape[0] for x, _ in a] == [4, 2] and a[0][0].shape[1:] == (3, size, size)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    assert sorted(torch.cat([y for _, y in a]).tolist()) == sorted(data.train.labels.tolist())


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1).flatten(1))


class _Stop(Exception):
    """Raised from the log after epoch 1: an interrupted run, for the resume tests."""


def _stopping_log(stop_after_first: bool):
    def log(msg: str) -> None:
        if stop_after_first and msg.startswith("epoch 1/2"):
            raise _Stop

    return log


def _fast_run(out, stop_after_first: bool = False, resume: bool = False):
    torch.manual_seed(0)
    model = _Tiny()
    data = DeviceImagenette(_synthetic(12, 24, 4), _synthetic(6, 24, 5), augmentation(RECIPES["mobilenet"], 16),
                            fallback_stats(), 16)
    spec = TrainSpec(
        model=model, train_set=TensorDataset(torch.zeros(12)), val_set=TensorDataset(torch.zeros(6)),
        recipe=Recipe(name="fast", epochs=2, batch_size=4, lr=1e-2), loss_fn=nn.CrossEntropyLoss(),
    )

    try:
        result = fit(spec, out, seed=5, progress=False, log=_stopping_log(stop_after_first), resume=resume,
                     amp=True, channels_last=True, batches=data)
    except _Stop:
        return None, model
    return result, model


def test_fit_on_device_batches_with_amp_resumes_exactly(tmp_path):
    full, model_a = _fast_run(tmp_path / "a")
    assert [r["epoch"] for r in full["history"]] == [1, 2] and "val_top5" in full["history"][1]
    assert full["history"][1]["images_per_s"] > 0
    log = json.loads((tmp_path / "a" / "log.json").read_text())
    assert log["amp"] == "bf16" and log["channels_last"] and log["device_batches"]["aug"]["crop"] == "rrc"
    _fast_run(tmp_path / "b", stop_after_first=True)
    resumed, model_c = _fast_run(tmp_path / "b", resume=True)
    assert resumed["epochs_run"] == 1
    assert resumed["history"][1]["train_loss"] == full["history"][1]["train_loss"]
    a, c = model_a.state_dict(), model_c.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_cli_fast_path_smoke_and_resume(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    cache = tmp_path / "cache.pt"
    args = ["train", "resnet18", "--data", str(data_root), "--cache-uint8", "32", "--image-size", "32",
            "--limit", "10", "--amp", "--channels-last", "--epochs", "1", "--batch-size", "10",
            "--out", str(out), "--cache-file", str(cache), "--no-progress"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "uint8 cache: wrote" in first and "epoch 1/1" in first and "img/s" in first
    assert (out / "last.pt").is_file() and (out / "log.json").is_file() and cache.is_file()
    log = json.loads((out / "log.json").read_text())
    assert log["device_batches"]["cache_size"] == 32 and log["epochs"][0]["images_per_s"] > 0
    record = json.loads((out / "resnet18.json").read_text())
    assert "--cache-uint8 32" in record["command"] and "--amp" in record["command"]
    assert main(args + ["--resume"]) == 0
    again = capsys.readouterr().out
    assert "uint8 cache: read" in again and "1/1 epochs done" in again


def test_cache_option_errors(capsys):
    assert main(["train", "lenet5", "--cache-uint8", "32"]) == 2
    assert "--cache-uint8 applies to the Imagenette models, not lenet5" in capsys.readouterr().err
    assert main(["train", "resnet18", "--cache-file", "x.pt"]) == 2
    assert "--cache-file goes with --cache-uint8" in capsys.readouterr().err


class _Noisy(torch.utils.data.Dataset):
    """Items with random noise from the global torch RNG, as the torchvision transforms draw theirs."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(n)
        self.x = torch.randn(n, 3, 4, 4, generator=g)
        self.y = torch.arange(n) % 10

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i] + 0.1 * torch.randn(3, 4, 4), self.y[i]


def _worker_run(out, stop_after_first: bool = False, resume: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 10))
    spec = TrainSpec(model=model, train_set=_Noisy(12), val_set=_Noisy(4),
                     recipe=Recipe(name="w", epochs=2, batch_size=4), loss_fn=nn.CrossEntropyLoss())

    try:
        fit(spec, out, seed=1, workers=1, progress=False, log=_stopping_log(stop_after_first), resume=resume)
    except _Stop:
        pass
    return model


def test_persistent_workers_resume_exactly(tmp_path):
    # The worker persists across epochs; items are seeded from (seed, epoch, index), so a resumed run
    # (fresh worker) sees the same noisy items as the uninterrupted one.
    a = _worker_run(tmp_path / "a").state_dict()
    _worker_run(tmp_path / "b", stop_after_first=True)
    c = _worker_run(tmp_path / "b", resume=True).state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_crop_scale_replaces_the_recipe_crop_and_keeps_its_colour_ops():
    def rrc_train(stats, image_size, scale, jitter):
        base = AUGMENTATIONS["mobilenet" if jitter else "resnet18"].at(image_size)
        return train_transform(base.with_crop_scale(scale[0]), stats, image_size)

    spec = augmentation(RECIPES["resnet18"], 160, crop_scale=0.35)
    assert spec.crop == "rrc" and spec.scale == (0.35, 1.0) and spec.jitter is None
    assert augmentation(RECIPES["vgg16"], 160, crop_scale=0.5).jitter is not None  # VGG's jitter stays
    with pytest.raises(ValueError, match="does not apply to alexnet"):
        augmentation(RECIPES["alexnet"], 224, crop_scale=0.35)
    names = [type(t).__name__ for t in rrc_train(fallback_stats(), 64, (0.35, 1.0), jitter=True).transforms]
    assert "RandomResizedCrop" in names and "ColorJitter" in names and "RandomCrop" not in names
    # Batches come out at the tuned size, area fractions inside the range.
    data = DeviceImagenette(_synthetic(6, 24, 2), _synthetic(2, 24, 3), spec, fallback_stats(), 16)
    x, _ = next(iter(data.train_batches(seed=0, epoch=1, batch_size=6)))
    assert x.shape == (6, 3, 16, 16)

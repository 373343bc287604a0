"""Training smoke tests for the five Imagenette recipes (CPU, tiny subset).

Each recipe's own optimizer must lower the loss on a fixed batch, a saved
checkpoint must reload to identical outputs, and `cnn-internals train` must
run end to end and resume.
"""
from __future__ import annotations

import pytest
import torch

import adapters
from adapters.checkpoint import atomic_save
from adapters.training import training_setup
from interp.cli import main

# AlexNet's lin1 is fixed at 256x6x6, so it trains at 224 only; the others at 32 px.
SIZES = {"alexnet": 224, "vgg16": 32, "inception": 32, "resnet18": 32, "mobilenet": 32}


@pytest.mark.parametrize("name", list(SIZES))
def test_recipe_optimizer_lowers_the_loss_and_checkpoint_reloads(name, data_root, tmp_path):
    torch.manual_seed(0)
    spec = training_setup(name, data_root=data_root / "imagenette2-160", limit=10, image_size=SIZES[name])
    x = torch.stack([spec.val_set[i][0] for i in range(4)])
    y = torch.tensor([spec.val_set[i][1] for i in range(4)])
    model, loss_fn = spec.model, spec.loss_fn
    opt = spec.recipe.make_optimizer(model)
    # The recipe's optimizer (type, momentum, weight decay, parameter groups) at a tenth of its
    # learning rate: full-rate steps on one 4-image batch of a fresh network can overshoot
    # (VGG-16 has no BatchNorm), which says nothing about whether the model trains.
    for group in opt.param_groups:
        group["lr"] *= 0.1
    model.eval()  # fixed BN statistics and no dropout: the loss below is a deterministic function
    with torch.no_grad():
        before = loss_fn(model(x), y).item()
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        after = loss_fn(model(x), y).item()
    assert after < before, (name, before, after)

    path = tmp_path / f"{name}.pt"
    atomic_save(model.state_dict(), path)
    loaded, _ = adapters.load(name, weights=str(path))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
        adapters.load("resnet18", weights=str(bad))


def test_train_cli_runs_and_resumes(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "mobilenet", "--data", str(data_root), "--limit", "10", "--image-size", "32", "--out", str(out),
            "--no-progress", "--batch-size", "5", "--epochs", "2"]
    assert main(args) == 0
    assert (out / "last.pt").is_file() and (out / "log.json").is_file() and (out / "mobilenet.safetensors").is_file()
    first = capsys.readouterr().out
    assert "epoch 1/2" in first and "epoch 2/2" in first
    # Resuming a finished run trains nothing more (exact resume mid-run is tested on the trainer in test_lenet5).
    assert main(args + ["--resume"]) == 0
    again = capsys.readouterr().out
    assert "2/2 epochs done" in again and "epoch 1/2" not in again

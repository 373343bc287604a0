"""LeNet-5's training: the MAP criterion, the recipe, the MNIST setup, the generic trainer and ``train lenet5``.

(Moved from tests/adapters/test_lenet5.py when training became its own part.)
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from adapters import lenet5 as L
from adapters.training import (LOSS_J, RECIPES, Recipe, TrainSpec, evaluate, fit, lecun_loss, lenet5_setup,
                               penalties_to_scores, training_setup)

from _lenet import mnist_test, one_thread  # noqa: F401 (one_thread: an autouse fixture)
from conftest import REPO  # noqa: E402
DATA = Path(os.environ.get("CNN_INTERNALS_DATA") or REPO.parent / "shared" / "data")


# --- architecture -----------------------------------------------------------


def test_lecun_loss_equals_hand_computation():
    y = torch.tensor([[1.0, 2.0, 3.0], [0.5, 4.0, 0.1]], dtype=torch.float64)
    target = torch.tensor([0, 2])
    e = math.exp
    first = 1.0 + math.log(e(-5) + e(-1.0) + e(-2.0) + e(-3.0))
    second = 0.1 + math.log(e(-5) + e(-0.5) + e(-4.0) + e(-0.1))
    hand = (first + second) / 2
    assert hand == pytest.approx(0.474586, abs=1e-6)
    assert float(lecun_loss(y, target)) == pytest.approx(hand, abs=1e-12)
    # Another J: E = y_correct + log(exp(-J) + sum exp(-y)).
    hand_j1 = (1.0 + math.log(e(-1) + e(-1.0) + e(-2.0) + e(-3.0))
               + 0.1 + math.log(e(-1) + e(-0.5) + e(-4.0) + e(-0.1))) / 2
    assert float(lecun_loss(y, target, j=1.0)) == pytest.approx(hand_j1, abs=1e-12)


def test_lecun_loss_is_stable_for_large_penalties():
    y = torch.tensor([[900.0, 1000.0, 1100.0]])
    # exp(-900) underflows; the exp(-J) term dominates: E = 900 + log(e^-5 + ...) = 895.
    loss = lecun_loss(y, torch.tensor([0]))
    assert torch.isfinite(loss)
    assert float(loss) == pytest.approx(895.0, abs=1e-3)


def _small_spec(n: int = 256, epochs: int = 2) -> TrainSpec:
    ds = mnist_test()
    torch.manual_seed(0)
    x = L.to_input(ds.data[:n])
    y = ds.targets[:n].long()
    return TrainSpec(
        model=L.LeNet5(),
        train_set=TensorDataset(x, y),
        val_set=TensorDataset(L.to_input(ds.data[n:n + 128]), ds.targets[n:n + 128].long()),
        recipe=Recipe(name="test", epochs=epochs, batch_size=32, lr=3e-3, optimizer_kwargs={"weight_decay": 1e-4},
                      scheduler="cosine"),
        loss_fn=lecun_loss,
        scores_fn=penalties_to_scores,
    )


class _Stop(Exception):
    pass


def test_trainer_learns_checkpoints_and_resumes_exactly(tmp_path):
    spec = _small_spec()
    result = fit(spec, tmp_path / "a", seed=7, progress=False, log=lambda s: None)
    h = result["history"]
    assert [r["epoch"] for r in h] == [1, 2]
    assert h[1]["train_loss"] < h[0]["train_loss"]
    assert 0.0 <= h[1]["val_top1"] <= 1.0 and "val_top5" in h[1]
    for name in ("last.pt", "best.pt", "log.json"):
        assert (tmp_path / "a" / name).is_file()
    log = json.loads((tmp_path / "a" / "log.json").read_text())
    assert len(log["epochs"]) == 2 and log["seed"] == 7 and log["recipe"]["name"] == "test"

    # The checkpoint reloads into a fresh model with identical outputs.
    reloaded, _ = L.load(weights=tmp_path / "a" / "last.pt")
    x = spec.val_set.tensors[0][:16]
    spec.model.eval()
    assert torch.equal(reloaded(x), spec.model(x))

    # Interrupt after epoch 1, then resume: same weights as the uninterrupted run.
    spec_b = _small_spec()

    def stop_after_first(msg: str) -> None:
        if msg.startswith("epoch 1/2"):
            raise _Stop

    with pytest.raises(_Stop):
        fit(spec_b, tmp_path / "b", seed=7, progress=False, log=stop_after_first)
    ckpt = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    messages: list[str] = []
    spec_c = _small_spec()
    resumed = fit(spec_c, tmp_path / "b", seed=7, resume=True, progress=False, log=messages.append)
    assert messages[0].startswith("resuming from") and "1/2 epochs done" in messages[0]
    assert resumed["epochs_run"] == 1
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]
    assert resumed["history"][1]["train_loss"] == h[1]["train_loss"]
    a = spec.model.state_dict()
    c = spec_c.model.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_resume_from_corrupt_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*last\.pt"):
        fit(_small_spec(n=64, epochs=1), out, resume=True, progress=False, log=lambda s: None)


def test_resume_from_truncated_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    fit(_small_spec(n=64, epochs=1), out, progress=False, log=lambda s: None)
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        fit(_small_spec(n=64, epochs=1), out, resume=True, progress=False, log=lambda s: None)


def test_resume_with_other_recipe_is_refused(tmp_path):
    out = tmp_path / "run"
    fit(_small_spec(n=64, epochs=1), out, progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="cannot resume"):
        fit(_small_spec(n=64, epochs=2), out, resume=True, progress=False, log=lambda s: None)


def test_evaluate_counts_top1_with_penalties():
    model = torch.nn.Identity()
    penalties = torch.tensor([[0.1, 5.0, 3.0, 4.0, 6.0, 7.0, 8.0], [2.0, 1.0, 0.5, 4.0, 6.0, 7.0, 8.0]])
    ds = TensorDataset(penalties, torch.tensor([0, 1]))
    res = evaluate(model, ds, lecun_loss, penalties_to_scores)
    assert res["top1"] == 0.5 and res["top5"] == 1.0 and res["n"] == 2


def test_cosine_recipe_schedule():
    r = Recipe(name="r", epochs=4, batch_size=8, lr=1.0, scheduler="cosine")
    assert r.lr_factor(0, 10) == 1.0
    assert r.lr_factor(20, 10) == pytest.approx(0.5)
    assert r.lr_factor(39, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 39 / 40)))
    recipe = RECIPES["lenet5"]
    assert recipe.to_dict()["lr"] == 1e-3 and recipe.epochs == 30 and recipe.batch_size == 64


# --- CLI -----------------------------------------------------------------------


def test_cli_unknown_model_lists_trainable(capsys):
    from interp.cli import main

    assert main(["train", "resnet19", "--data", str(DATA)]) == 2
    err = capsys.readouterr().err
    assert "not trainable" in err and "lenet5" in err and len(err.strip().splitlines()) == 1


def test_cli_train_tiny_run(tmp_path, capsys):
    from interp.cli import main

    mnist_test()
    rc = main(["train", "lenet5", "--data", str(DATA), "--epochs", "1", "--limit", "128",
               "--out", str(tmp_path), "--no-progress", "--seed", "1"])
    assert rc == 0
    record = json.loads((tmp_path / "lenet5.json").read_text())
    assert record["epochs"] == 1 and record["train_images"] == 128 and record["seed"] == 1
    assert record["eval_images"] == 128
    assert record["eval_correct"] == round(record["eval_top1"] * 128)
    assert record["command"].startswith("cnn-internals train lenet5 --data ")
    assert "--epochs 1 --limit 128" in record["command"]
    model, _ = L.load(weights=tmp_path / "lenet5.safetensors")
    assert isinstance(model, L.LeNet5)
    assert "epoch 1/1" in capsys.readouterr().out


def test_lenet5_recipe_and_setup_keep_their_numbers():
    r = RECIPES["lenet5"]
    assert (r.optimizer, r.lr, dict(r.optimizer_kwargs), r.scheduler) == ("adamw", 1e-3, {"weight_decay": 1e-4}, "cosine")
    assert (r.epochs, r.batch_size, r.loss, r.augment, r.warmup_epochs, r.grad_clip) == (30, 64, "lecun", None, 0.0, None)
    assert LOSS_J == 5.0 and r.make_loss() is lecun_loss
    opt = r.make_optimizer(L.LeNet5())
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 1e-4
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    mnist_test()
    spec = training_setup("lenet5", data_root=DATA, limit=50)
    assert len(spec.train_set) == 50 and len(spec.val_set) == 50 and spec.val_name == "MNIST test (first 50)"
    assert spec.loss_fn is lecun_loss and spec.scores_fn is penalties_to_scores and spec.recipe == r
    x, y = spec.train_set[0]
    assert x.shape == (1, 32, 32) and isinstance(spec.model, L.LeNet5)
    assert lenet5_setup(DATA, limit=10, c3_table=True).model.c3_table
    with pytest.raises(ValueError, match="image_size does not apply to lenet5"):
        training_setup("lenet5", data_root=DATA, limit=10, image_size=64)


def test_a_former_lenet5_checkpoint_recipe_still_resumes():
    """The recipe dict the trainer wrote before training became a package reads as today's recipe."""
    old = {"name": "lenet5", "epochs": 30, "batch_size": 64, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4,
           "momentum": 0.9, "nesterov": False, "betas": [0.9, 0.999], "scheduler": "cosine", "warmup_epochs": 0.0,
           "step_epochs": 30, "gamma": 0.1, "grad_clip": None}
    assert Recipe.from_dict(old, base=RECIPES["lenet5"]) == RECIPES["lenet5"]
    assert Recipe.from_dict(RECIPES["lenet5"].to_dict()) == RECIPES["lenet5"]
    with pytest.raises(ValueError, match="unknown key"):
        Recipe.from_dict({**RECIPES["lenet5"].to_dict(), "colour": "red"})

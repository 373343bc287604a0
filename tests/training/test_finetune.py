"""Head-only fine-tuning pieces and the finetune verb on the real Keras MobileNet twin (few images)."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision

import adapters
from adapters.training import finetune as ft

from conftest import DATA_ROOT


def test_last_linear_and_replace_head():
    model = torchvision.models.mobilenet_v2(weights=None)
    name, lin = ft.last_linear(model)
    assert name == "classifier.1" and lin.out_features == 1000
    new = torch.nn.Linear(1280, 10)
    ft.replace_head(model, new)
    assert model.classifier[1] is new
    with pytest.raises(ValueError, match="final nn.Linear"):
        ft.last_linear(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))


def test_zero_shot_uses_only_the_ten_classes():
    logits = torch.zeros(3, 1000)
    logits[0, 217] = 5.0  # springer -> label 1
    logits[1, 999] = 50.0  # not an Imagenette class: ignored
    logits[1, 701] = 1.0  # parachute -> label 9
    logits[2, 0] = -1.0
    logits[2, 566] = 2.0  # French horn -> label 5
    assert ft.zero_shot(logits).tolist() == [1, 9, 5]
    # TF-slim 1001-way logits: index 0 is "background", ImageNet class c is index c + 1.
    shifted = torch.cat([torch.full((3, 1), 100.0), logits], dim=1)
    assert ft.zero_shot(shifted).tolist() == [1, 9, 5]
    with pytest.raises(ValueError, match="1000 or 1001 classes"):
        ft.zero_shot(torch.zeros(2, 10))


def test_train_head_separates_separable_features():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=gen) * 4
    labels = torch.arange(10).repeat(20)
    feats = centres[labels] + torch.randn(200, 32, generator=gen)
    head = ft.train_head(feats, labels, steps=200)
    assert ft.accuracy(head(feats).argmax(1), labels) == 1.0
    again = ft.train_head(feats, labels, steps=200)
    assert torch.equal(head.weight, again.weight)  # deterministic


def test_finetune_verb_on_the_keras_twin(tmp_path, capsys):
    from interp.cli import main

    if not (DATA_ROOT / "weights" / "keras" / "mobilenet_2_5_224_tf_no_top.h5").is_file():
        pytest.fail("shared/data/weights/keras/mobilenet_2_5_224_tf_no_top.h5 not found (see MANIFEST.md)", pytrace=False)
    out = tmp_path / "out"
    args = ["finetune", "pretrained:mobilenet_v1_025_keras", "--data", str(DATA_ROOT), "--train-limit", "10",
            "--val-limit", "10", "--cache", str(tmp_path / "cache"), "--out", str(out), "--steps", "100"]
    assert main(args) == 0
    report = json.loads((out / "finetune.json").read_text())
    assert report["train_images"] == 10 and report["val_images"] == 10 and report["feature_dim"] == 256
    assert "zero_shot_val_top1" not in report  # the Keras file has no ImageNet classifier
    assert report["head_only_train_top1"] == 1.0  # 10 points in 256-d: separable
    assert set(report) >= {"steps", "lr", "seconds"} and all(isinstance(k, str) for k in report["seconds"])
    assert not [k for k, v in report.items() if isinstance(v, str) and "train /" in v]  # numbers, not console text
    cached = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(cached) == 2
    # The features are the global-pooled last map, computed independently here.
    model, preprocess = adapters.load("pretrained:mobilenet_v1_025_keras")
    val = ft.imagenette(DATA_ROOT, "val", preprocess, 10)
    x = torch.stack([val[i][0] for i in range(10)])
    with torch.no_grad():
        ref = model.avgpool(model.features(x)).flatten(1)
    key = ft.feature_cache_key("pretrained-mobilenet_v1_025_keras", None, val)
    f, _, y = ft.backbone_features(model, val, cache=tmp_path / "cache", key=key, progress=False)
    torch.testing.assert_close(f, ref, rtol=1e-4, atol=1e-5)
    assert y.tolist() == list(range(10))
    # The written model reproduces the reported val accuracy.
    tuned, _ = adapters.load("pretrained:mobilenet_v1_025_keras", weights=str(out / "pretrained-mobilenet_v1_025_keras.safetensors"))
    with torch.no_grad():
        acc = ft.accuracy(tuned(x).argmax(1), y)
    assert acc == pytest.approx(report["head_only_val_top1"], abs=1e-9)
    assert "head-only val top-1" in capsys.readouterr().out


def test_full_finetune_has_train_s_checkpoints_log_and_resume(tmp_path, capsys):
    from interp.cli import main

    if not (DATA_ROOT / "weights" / "keras" / "mobilenet_2_5_224_tf_no_top.h5").is_file():
        pytest.fail("shared/data/weights/keras/mobilenet_2_5_224_tf_no_top.h5 not found (see MANIFEST.md)", pytrace=False)
    out = tmp_path / "full"
    args = ["finetune", "pretrained:mobilenet_v1_025_keras", "--full", "--data", str(DATA_ROOT), "--train-limit", "10",
            "--val-limit", "10", "--epochs", "2", "--batch-size", "5", "--lr", "1e-3", "--out", str(out), "--no-progress",
            "--threads", "1"]  # tiny batches: one thread beats two on a shared CPU
    threads = torch.get_num_threads()
    try:
        _full_run(main, args, out, capsys)
    finally:
        torch.set_num_threads(threads)


def _full_run(main, args, out, capsys):
    assert main(args + ["--stop-after", "1"]) == 0
    first = capsys.readouterr().out
    assert "epoch 1/2" in first and "stopped after epoch 1/2" in first
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "log.json", "probe.json"]  # no export yet
    assert main(args + ["--resume"]) == 0
    again = capsys.readouterr().out
    assert "resuming from" in again and "1/2 epochs done" in again and "epoch 2/2" in again
    log = json.loads((out / "log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1, 2] and log["extra"]["mode"] == "full"
    assert log["recipe"]["lr"] == 1e-3 and log["recipe"]["scheduler"] == "cosine" and log["global_batch"] == 5
    # The defaults: a linear probe's head to start from, BatchNorm statistics kept.
    assert log["extra"]["head_init"] == "linear probe" and log["frozen_bn"] is True
    report = json.loads((out / "finetune.json").read_text())
    assert report["mode"] == "full" and report["epochs"] == 2 and report["train_images"] == 10
    assert report["head_init"] == "linear probe" and 0.0 <= report["head_only_val_top1"] <= 1.0
    assert report["full_val_top1"] == log["epochs"][-1]["val_top1"]
    assert not list(out.glob(".*.tmp"))
    # The written model (new 10-way head, every weight trained) reproduces the reported val top-1.
    tuned, preprocess = adapters.load("pretrained:mobilenet_v1_025_keras", weights=str(out / report["weights_file"]))
    base, _ = adapters.load("pretrained:mobilenet_v1_025_keras")
    assert not torch.equal(next(tuned.parameters()), next(base.parameters()))  # the first conv trained too
    bns = [(a, b) for a, b in zip(tuned.modules(), base.modules()) if isinstance(a, torch.nn.BatchNorm2d)]
    assert bns and all(torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
                       for a, b in bns)  # frozen statistics
    val = ft.imagenette(DATA_ROOT, "val", preprocess, 10)
    x = torch.stack([val[i][0] for i in range(10)])
    with torch.no_grad():
        acc = ft.accuracy(tuned(x).argmax(1), torch.tensor(val.targets))
    assert acc == pytest.approx(report["full_val_top1"], abs=1e-6)  # float32 mean vs counted fraction
    # Flags of --full alone are refused in the head-only mode, with the fix in the message.
    assert main(["finetune", "pretrained:mobilenet_v1_025_keras", "--resume", "--amp"]) == 2
    assert "--resume, --amp: only with --full fine-tuning; add --full or drop them" in capsys.readouterr().err


def _bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 7))


@pytest.mark.parametrize("frozen", [True, False])
def test_full_setup_frozen_bn_and_given_head(tmp_path, frozen):
    from adapters.training import fit

    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(12, 3, 8, 8, generator=g) + 3.0, torch.arange(12) % 3)
    model = _bn_net()
    bn_mean = model[1].running_mean.clone()
    conv_w = model[0].weight.detach().clone()
    head = torch.nn.Linear(4, 3)
    spec = ft.full_setup(model, data, data, epochs=1, batch_size=4, lr=1e-2, head=head, frozen_bn=frozen)
    assert model[5] is head and spec.frozen_bn is frozen
    fit(spec, tmp_path / str(frozen), progress=False, log=lambda _m: None)
    assert not torch.equal(model[0].weight, conv_w)  # every weight trains either way
    # Inputs have mean ~3: batch statistics would move the running mean away from 0.
    assert torch.equal(model[1].running_mean, bn_mean) is frozen
    with pytest.raises(ValueError, match="takes 5 features; the model gives 4"):
        ft.full_setup(_bn_net(), data, data, head=torch.nn.Linear(5, 3))

"""Tests of the LeNet-5 adapter, the MNIST data helpers and the generic trainer."""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from adapters import lenet5 as L
from adapters.datasets import mnist, mnist_sample
from adapters.training import Recipe, TrainSpec, evaluate, fit

from conftest import REPO  # noqa: E402
DATA = Path(os.environ.get("CNN_INTERNALS_DATA") or REPO.parent / "shared" / "data")

EXPECTED_REPR = """LeNet5(
  (conv1): Conv2d(1, 6, kernel_size=(5, 5), stride=(1, 1))
  (tanh1): Tanh(a=1.7159, s=0.6667)
  (pool1): AvgPool2d(kernel_size=2, stride=2)
  (tanh2): Tanh(a=1.7159, s=0.6667)
  (conv2): Conv2d(6, 16, kernel_size=(5, 5), stride=(1, 1))
  (tanh3): Tanh(a=1.7159, s=0.6667)
  (pool2): AvgPool2d(kernel_size=2, stride=2)
  (tanh4): Tanh(a=1.7159, s=0.6667)
  (conv3): Conv2d(16, 120, kernel_size=(5, 5), stride=(1, 1))
  (tanh5): Tanh(a=1.7159, s=0.6667)
  (linear): Linear(in_features=120, out_features=84, bias=True)
  (tanh6): Tanh(a=1.7159, s=0.6667)
  (rbf): RBFOutputLayer()
)"""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run this module on one torch thread.

    The models are tiny, and on a small shared CPU several OpenMP threads per
    process stall each other (a 3x slowdown measured here); results do not
    depend on it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=1)
def _load_mnist_test():
    return mnist(DATA, train=False)


def _mnist_test():
    """The full MNIST test set (read once); fails (never skips) when the data folder is missing."""
    try:
        return _load_mnist_test()
    except FileNotFoundError as exc:
        pytest.fail(f"MNIST test files are needed for this test: {exc}")


# --- architecture -----------------------------------------------------------


def test_module_names_order_and_printout():
    torch.manual_seed(0)
    model = L.LeNet5()
    assert [n for n, _ in model.named_children()] == [
        "conv1", "tanh1", "pool1", "tanh2", "conv2", "tanh3",
        "pool2", "tanh4", "conv3", "tanh5", "linear", "tanh6", "rbf",
    ]
    assert repr(model) == EXPECTED_REPR


def test_output_shapes_of_every_layer():
    torch.manual_seed(0)
    model = L.LeNet5().eval()
    shapes = {}
    for name, module in model.named_children():
        module.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape)))
    out = model(torch.randn(3, 1, 32, 32))
    assert out.shape == (3, 10)
    assert shapes == {
        "conv1": (3, 6, 28, 28), "tanh1": (3, 6, 28, 28), "pool1": (3, 6, 14, 14), "tanh2": (3, 6, 14, 14),
        "conv2": (3, 16, 10, 10), "tanh3": (3, 16, 10, 10), "pool2": (3, 16, 5, 5), "tanh4": (3, 16, 5, 5),
        "conv3": (3, 120, 1, 1), "tanh5": (3, 120, 1, 1), "linear": (3, 84), "tanh6": (3, 84), "rbf": (3, 10),
    }
    # The engine sizes its dummy input from this attribute.
    assert model.input_size == (32, 32)
    with pytest.raises(ValueError, match=r"Bx1x32x32 .* 4x4 map instead of 5x5"):
        model(torch.zeros(1, 1, 28, 28))


@pytest.mark.parametrize("options", [{}, {"c3_table": True, "trainable_pool": True}])
def test_fx_traceable(options):
    import torch.fx

    torch.manual_seed(0)
    model = L.LeNet5(**options).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(traced(x), model(x))
    # The scaled tanh is traced down to torch.tanh calls (what the engine intercepts).
    assert sum(1 for n in traced.graph.nodes if n.target is torch.tanh) == 6


def test_scaled_tanh_values_and_uses_torch_tanh(monkeypatch):
    act = L.ScaledTanh()
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    expected = [1.7159 * math.tanh(2.0 / 3.0 * v) for v in x.tolist()]
    assert act(x).tolist() == pytest.approx(expected, abs=1e-6)
    # f(1) ~= 1: the point of a = 1.7159, s = 2/3.
    assert float(act(torch.tensor(1.0))) == pytest.approx(1.0, abs=1e-4)
    calls = []
    real = torch.tanh
    monkeypatch.setattr(torch, "tanh", lambda t: calls.append(1) or real(t))
    act(x)
    assert calls == [1]


def test_parameter_count():
    # 156 + 2,416 + 48,120 + 10,164 (module docstring); the RBF prototypes are a buffer.
    assert L.count_parameters(L.LeNet5()) == 60_856
    assert sum(p.numel() for p in L.LeNet5().parameters()) == 60_856
    # Paper options: C3 table (1,516 effective) + trainable subsampling (12 + 32) = the paper's 60,000.
    assert L.count_parameters(L.LeNet5(c3_table=True)) == 59_956
    assert L.count_parameters(L.LeNet5(c3_table=True, trainable_pool=True)) == 60_000
    assert "prototypes" not in dict(L.LeNet5().named_parameters())
    assert "rbf.prototypes" in L.LeNet5().state_dict()


def test_fan_in_uniform_init_bounds():
    torch.manual_seed(1)
    model = L.LeNet5()
    for module, fan_in in ((model.conv1, 25), (model.conv2, 150), (model.conv3, 400), (model.linear, 120)):
        bound = 2.4 / fan_in
        for p in (module.weight, module.bias):
            assert float(p.detach().abs().max()) <= bound
            # Uniform over the whole range, not a narrower one.
            assert float(p.detach().abs().max()) > 0.8 * bound
    c3 = L.LeNet5(c3_table=True).conv2
    # Per-map fan-in: maps 0-5 have 3 inputs (75), map 15 has 6 (150).
    assert float(c3.weight[0].detach().abs().max()) <= 2.4 / 75
    assert float(c3.weight[0].detach().abs().max()) > 2.4 / 150
    assert float(c3.weight[15].detach().abs().max()) <= 2.4 / 150


# --- loss, RBF, prototypes ----------------------------------------------------


def test_lecun_loss_equals_hand_computation():
    y = torch.tensor([[1.0, 2.0, 3.0], [0.5, 4.0, 0.1]], dtype=torch.float64)
    target = torch.tensor([0, 2])
    e = math.exp
    first = 1.0 + math.log(e(-5) + e(-1.0) + e(-2.0) + e(-3.0))
    second = 0.1 + math.log(e(-5) + e(-0.5) + e(-4.0) + e(-0.1))
    hand = (first + second) / 2
    assert hand == pytest.approx(0.474586, abs=1e-6)
    assert float(L.lecun_loss(y, target)) == pytest.approx(hand, abs=1e-12)
    # Another J: E = y_correct + log(exp(-J) + sum exp(-y)).
    hand_j1 = (1.0 + math.log(e(-1) + e(-1.0) + e(-2.0) + e(-3.0))
               + 0.1 + math.log(e(-1) + e(-0.5) + e(-4.0) + e(-0.1))) / 2
    assert float(L.lecun_loss(y, target, j=1.0)) == pytest.approx(hand_j1, abs=1e-12)


def test_lecun_loss_is_stable_for_large_penalties():
    y = torch.tensor([[900.0, 1000.0, 1100.0]])
    # exp(-900) underflows; the exp(-J) term dominates: E = 900 + log(e^-5 + ...) = 895.
    loss = L.lecun_loss(y, torch.tensor([0]))
    assert torch.isfinite(loss)
    assert float(loss) == pytest.approx(895.0, abs=1e-3)


def test_rbf_output_equals_direct_sum():
    torch.manual_seed(2)
    rbf = L.RBFOutputLayer()
    x = torch.randn(4, 84, dtype=torch.float64)
    w = rbf.prototypes.double()
    out = rbf.double()(x)
    direct = torch.empty(4, 10, dtype=torch.float64)
    for b in range(4):
        for i in range(10):
            direct[b, i] = sum((float(x[b, j]) - float(w[i, j])) ** 2 for j in range(84))
    assert torch.allclose(out, direct, rtol=0, atol=1e-9)
    # A code equal to prototype 3 has penalty 0 for class 3 and 4 * Hamming distance elsewhere.
    p = L.RBFOutputLayer()(w[3:4].float())
    assert float(p[0, 3]) == 0.0
    assert int(p.argmin()) == 3
    assert float(p[0, 8]) == 4 * int((w[3] != w[8]).sum())


def test_prototypes_are_fixed_digit_bitmaps():
    proto = L.RBFOutputLayer().prototypes
    assert proto.shape == (10, 84)
    assert set(proto.unique().tolist()) == {-1.0, 1.0}
    assert not proto.requires_grad
    assert L.MIN_PROTOTYPE_HAMMING == 15
    # Digit 1's bitmap has its vertical stroke in columns 3-4 (rows 1-10).
    one = proto[1].view(12, 7)
    assert bool((one[1:11, 3:5] == 1).all())
    # Fixed: an optimiser step leaves them unchanged.
    torch.manual_seed(3)
    model = L.LeNet5()
    before = model.rbf.prototypes.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    L.lecun_loss(model(torch.randn(4, 1, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert torch.equal(model.rbf.prototypes, before)


def test_predict_is_argmin():
    torch.manual_seed(4)
    model = L.LeNet5().eval()
    x = torch.randn(5, 1, 32, 32)
    assert torch.equal(L.predict(model, x), model(x).argmin(1))
    assert torch.equal(L.LeNet5.scores_to_pred(torch.tensor([[3.0, 1.0, 2.0]])), torch.tensor([1]))


# --- C3 connection table ------------------------------------------------------


def test_c3_table_mask_matches_paper_table_one():
    mask = L.C3Conv2d().mask[:, :, 0, 0]  # (C3 map, S2 map)
    assert int(mask.sum()) == 60
    assert mask.sum(1).tolist() == [3] * 6 + [4] * 9 + [6]
    # Row 0 of Table I (S2 map 0) has an X in these C3 columns.
    assert torch.nonzero(mask[:, 0]).flatten().tolist() == [0, 4, 5, 6, 9, 10, 11, 12, 14, 15]
    # Row 5: columns 3 4 5 8 9 10 11 13 14 15.
    assert torch.nonzero(mask[:, 5]).flatten().tolist() == [3, 4, 5, 8, 9, 10, 11, 13, 14, 15]
    assert "connections=60/96" in repr(L.LeNet5(c3_table=True).conv2)


def test_c3_masked_weights_get_zero_gradient_and_stay_zero():
    torch.manual_seed(5)
    model = L.LeNet5(c3_table=True)
    off = model.conv2.mask.expand_as(model.conv2.weight) == 0
    assert int(off.sum()) == 36 * 25
    assert bool((model.conv2.weight[off] == 0).all())
    start = model.conv2.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    x = torch.randn(8, 1, 32, 32)
    t = torch.arange(8) % 10
    for _ in range(3):
        opt.zero_grad()
        L.lecun_loss(model(x), t).backward()
        assert bool((model.conv2.weight.grad[off] == 0).all())
        assert float(model.conv2.weight.grad[~off].abs().sum()) > 0
        opt.step()
    assert bool((model.conv2.weight[off] == 0).all())
    assert not torch.equal(model.conv2.weight[~off], start[~off])


def test_trainable_pool_option():
    torch.manual_seed(6)
    plain = L.LeNet5()
    paper = L.LeNet5(trainable_pool=True)
    assert isinstance(paper.pool1, L.TrainablePool2d) and paper.pool1.weight.shape == (6,)
    assert paper.pool2.bias.shape == (16,)
    # At init (coefficient 1, bias 0) it equals plain average pooling.
    x = torch.randn(2, 6, 28, 28)
    assert torch.allclose(paper.pool1(x), plain.pool1(x))


# --- preprocessing and loading -------------------------------------------------


def test_preprocess_shapes_dtype_and_values():
    img = np.zeros((28, 28), dtype=np.uint8)
    img[10:14, 12:16] = 255
    from_pil = L.preprocess(Image.fromarray(img))
    from_tensor = L.preprocess(torch.from_numpy(img).unsqueeze(0))
    from_array = L.preprocess(img)
    for x in (from_pil, from_tensor, from_array):
        assert x.shape == (1, 32, 32) and x.dtype == torch.float32
        assert torch.equal(x, from_pil)
    assert float(from_pil[0, 0, 0]) == pytest.approx(-0.1)  # padding = background
    assert float(from_pil[0, 12, 14]) == pytest.approx(1.175)  # pixel (10, 12) moved by the 2-pixel pad
    assert int((from_pil > 0).sum()) == 16
    assert L.preprocess(Image.fromarray(img).convert("RGB")).shape == (1, 32, 32)
    with pytest.raises(ValueError, match="uint8"):
        L.preprocess(torch.zeros(28, 28))
    with pytest.raises(ValueError, match="28x28"):
        L.preprocess(torch.zeros(20, 20, dtype=torch.uint8))
    assert L.to_input(torch.zeros(5, 28, 28, dtype=torch.uint8)).shape == (5, 1, 32, 32)


def test_load_random_and_bad_weights(tmp_path):
    model, pre = L.load(weights="random")
    assert not model.training and pre is L.preprocess
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
        L.load(weights=bad)
    with pytest.raises(ValueError, match="shipped LeNet-5 weights"):
        L.load(c3_table=True)


def test_registry_load_returns_eval_model():
    import adapters

    model, pre = adapters.load("lenet5")
    assert isinstance(model, L.LeNet5) and not model.training


def test_shipped_weights_reach_99_percent_on_full_mnist_test():
    ds = _mnist_test()
    assert len(ds) == 10_000
    model, _ = L.load()
    x = L.to_input(ds.data)
    with torch.no_grad():
        pred = torch.cat([L.predict(model, chunk) for chunk in x.split(2000)])
    correct = int((pred == ds.targets).sum())
    assert correct >= 9_900, f"shipped LeNet-5: {correct}/10000 correct"
    # The accuracy recorded next to the weights is the one measured here.
    record = json.loads((REPO / "adapters" / "weights" / "lenet5.json").read_text())
    assert abs(record["eval_correct"] - correct) <= 1


def test_shipped_weights_on_shipped_sample():
    sample = mnist_sample(transform=L.preprocess)
    assert len(sample) == 1000
    x, label = sample[0]
    assert x.shape == (1, 32, 32) and label == 7  # the first MNIST test digit is a 7
    model, _ = L.load()
    pred = L.predict(model, L.to_input(sample.data))
    assert int((pred == sample.targets).sum()) >= 985


# --- data ----------------------------------------------------------------------


def test_mnist_sample_equals_first_1000_test_images():
    ds = _mnist_test()
    sample = mnist_sample()
    assert torch.equal(sample.data, ds.data[:1000])
    assert torch.equal(sample.targets, ds.targets[:1000])
    image, label = sample[3]
    assert image.mode == "L" and image.size == (28, 28) and label == int(ds.targets[3])
    assert (REPO / "adapters" / "data" / "mnist_test_1000.npz").stat().st_size < 1_000_000


def test_mnist_missing_files_give_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MNIST/raw/t10k-images-idx3-ubyte"):
        mnist(tmp_path, train=False)


# --- trainer -------------------------------------------------------------------


def _small_spec(n: int = 256, epochs: int = 2) -> TrainSpec:
    ds = _mnist_test()
    torch.manual_seed(0)
    x = L.to_input(ds.data[:n])
    y = ds.targets[:n].long()
    return TrainSpec(
        model=L.LeNet5(),
        train_set=TensorDataset(x, y),
        val_set=TensorDataset(L.to_input(ds.data[n:n + 128]), ds.targets[n:n + 128].long()),
        recipe=Recipe(name="test", epochs=epochs, batch_size=32, lr=3e-3, weight_decay=1e-4, scheduler="cosine"),
        loss_fn=L.lecun_loss,
        scores_fn=L.penalties_to_scores,
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
    res = evaluate(model, ds, L.lecun_loss, L.penalties_to_scores)
    assert res["top1"] == 0.5 and res["top5"] == 1.0 and res["n"] == 2


def test_cosine_recipe_schedule():
    r = Recipe(name="r", epochs=4, batch_size=8, lr=1.0, scheduler="cosine")
    assert r.lr_factor(0, 10) == 1.0
    assert r.lr_factor(20, 10) == pytest.approx(0.5)
    assert r.lr_factor(39, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert L.recipe().to_dict()["lr"] == 1e-3 and L.recipe().epochs == 30 and L.recipe().batch_size == 64


# --- CLI -----------------------------------------------------------------------


def test_cli_unknown_model_lists_trainable(capsys):
    from interp.cli import main

    assert main(["train", "resnet19", "--data", str(DATA)]) == 2
    err = capsys.readouterr().err
    assert "not trainable" in err and "lenet5" in err and len(err.strip().splitlines()) == 1


def test_cli_train_tiny_run(tmp_path, capsys):
    from interp.cli import main

    _mnist_test()
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


def test_preprocess_resizes_an_ordinary_photo_to_the_mnist_grid():
    """A 160 px colour photo becomes a 1x32x32 input: greyscale, 28x28, padded like MNIST."""
    from PIL import Image

    from adapters.lenet5 import preprocess, to_input

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, size=(160, 120, 3), dtype=np.uint8))
    x = preprocess(photo)
    small = np.asarray(photo.convert("L").resize((28, 28), Image.BILINEAR), dtype=np.uint8)
    assert x.shape == (1, 32, 32)
    assert torch.equal(x, to_input(torch.from_numpy(small.copy())[None])[0])
    with pytest.raises(ValueError, match="28x28 or 32x32 greyscale image, got a tensor of shape"):
        preprocess(torch.zeros(3, 64, 64, dtype=torch.uint8))

"""Tests of the LeNet-5 adapter and the MNIST data helpers (its training is tested under tests/training)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adapters import lenet5 as L
from adapters.datasets import mnist, mnist_sample

from _lenet import mnist_test, one_thread  # noqa: F401 (one_thread: an autouse fixture)
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


def _penalty_loss(penalties: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Any differentiable loss on the penalties will do for these architecture checks
    # (LeCun's MAP criterion itself lives with the training code).
    return torch.nn.functional.cross_entropy(-penalties, target)


# --- RBF, prototypes ------------------------------------------------------------


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
    _penalty_loss(model(torch.randn(4, 1, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
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
        _penalty_loss(model(x), t).backward()
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


def test_shipped_weights_reach_99_percent_on_fullmnist_test():
    ds = mnist_test()
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
    ds = mnist_test()
    sample = mnist_sample()
    assert torch.equal(sample.data, ds.data[:1000])
    assert torch.equal(sample.targets, ds.targets[:1000])
    image, label = sample[3]
    assert image.mode == "L" and image.size == (28, 28) and label == int(ds.targets[3])
    assert (REPO / "adapters" / "data" / "mnist_test_1000.npz").stat().st_size < 1_000_000


def test_mnist_missing_files_give_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MNIST/raw/t10k-images-idx3-ubyte"):
        mnist(tmp_path, train=False)


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

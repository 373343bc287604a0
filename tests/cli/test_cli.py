"""The engine's CLI verbs: layers and rf."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import interp
from interp.cli import main


def test_rf_json_prints_every_layer(capsys):
    assert main(["rf", "torchvision:vgg16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_name = {d["layer"]: d for d in data["layers"]}
    assert by_name["features.0"]["size"] == [3, 3] and by_name["features.0"]["offset"] == [-1, -1]
    # conv13 of VGG-16 (features.28): the textbook 196 px field, stride 16.
    assert by_name["features.28"]["size"] == [196, 196] and by_name["features.28"]["stride"] == [16, 16]
    assert by_name["features.30"]["size"] == [212, 212]


def test_layers_and_file_factory(tmp_path, capsys):
    src = tmp_path / "net.py"
    src.write_text(
        "import torch.nn as nn, torch.nn.functional as F\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.a = nn.Conv2d(3, 4, 3); self.b = nn.Conv2d(4, 4, 3)\n"
        "    def forward(self, x):\n"
        "        return self.b(F.relu(self.a(x))) + 1\n"
        "def make():\n"
        "    return Net()\n"
    )
    assert main(["layers", f"{src}:make", "--json"]) == 0
    names = json.loads(capsys.readouterr().out)
    assert names == ["a", "b", "relu", "add"]
    assert main(["rf", f"{src}:make", "--input-size", "16", "--layers", "b"]) == 0
    assert "5x5" in capsys.readouterr().out
    # The table: forward order, type, output shape of a 16x16 probe, and the convN aliases.
    assert main(["layers", f"{src}:make", "--input-size", "16"]) == 0
    rows = [r.split() for r in capsys.readouterr().out.splitlines()]
    assert rows == [["layer", "type", "output", "alias"], ["a", "Conv2d", "4x14x14", "conv1"],
                    ["relu", "relu", "4x14x14"], ["b", "Conv2d", "4x12x12", "conv2"], ["add", "add", "4x12x12"]]
    assert main(["layers", f"{src}:make", "--input-size", "16", "--json", "--details"]) == 0
    detail = json.loads(capsys.readouterr().out)
    assert detail["layers"][0] == {"name": "a", "type": "Conv2d", "output_shape": [4, 14, 14], "aliases": ["conv1"]}


def test_errors_are_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "interp.cli", "rf", "torchvision:resnet18", "--layers", "layer1.0.cnv1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "closest: layer1.0.conv1" in lines[0]


def test_convN_alias_is_nth_conv_in_forward_order():
    import torchvision

    model = torchvision.models.resnet18()
    convs = interp.conv_layers(model)
    # forward order puts the downsample conv after the block's two convs
    assert convs[:8] == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
                         "layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]
    assert interp.resolve_layer(model, "conv8").name == "layer2.0.downsample.0"


def test_cli_random_init_is_seeded_and_leaves_the_global_rng_alone():
    # Two runs of a command on a model without weights must draw the same
    # weights (and torchrun ranks too), without touching the caller's RNG.
    import torch

    from interp.commands._models import load_model

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, _, _ = load_model("torchvision:resnet18")
    assert torch.equal(torch.rand(3), expected_next)
    b, _, _ = load_model("torchvision:resnet18")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert float(sa["conv1.weight"].std()) > 0.01  # really initialised, not zeros


def test_cli_loads_a_model_without_reading_any_dataset(data_root, tmp_path, monkeypatch):
    # Run from a folder where the default data location does not exist: the
    # Imagenette preprocess ships its training statistics (it reads no data,
    # and does not fall back to ImageNet's mean/std with a warning).
    import warnings

    from adapters.datasets.imagenette import dataset_stats
    from interp.commands._models import load_model

    stats = dataset_stats(data_root / "imagenette2-160")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CNN_INTERNALS_DATA", str(tmp_path / "nowhere"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would announce itself with a warning
        _, pre, _ = load_model("resnet18")
    from PIL import Image
    import numpy as np

    gray = Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8))
    x = pre(gray)
    expected = (128 / 255 - np.asarray(stats.mean)) / np.asarray(stats.std)
    np.testing.assert_allclose(x[:, 100, 100].numpy(), expected, rtol=1e-4)


def test_cli_data_reads_an_mnist_root_through_the_adapters(data_root):
    """``--data ROOT`` with MNIST's idx files: the test digits, as the engine's in-memory images."""
    from torchvision.datasets import MNIST

    from interp.commands._data import open_images
    from interp.data import ArrayImages

    ds = open_images(data_root, None, mode="L", limit=5)  # ../shared/data: MNIST for a 1-channel model
    assert isinstance(ds.parent, ArrayImages)
    assert len(ds) == 5 and [ds[i][1] for i in range(5)] == [0, 2500, 5000, 7499, 9999]
    assert ds.describe(2500) == "MNIST-test[2500]" and ds.path(2500) is None
    ref = MNIST(str(data_root), train=False, download=False).data[7499].numpy() / 255.0
    np.testing.assert_allclose(ds.raw(7499)[:, :, 0], ref, atol=1e-6)
    assert open_images(data_root / "MNIST", None, split="train").describe(0) == "MNIST-train[0]"
    assert open_images(data_root / "MNIST", None).describe(3) == "MNIST-test[3]"
    with pytest.raises(ValueError, match="holds several datasets"):
        open_images(data_root, None, mode="RGB")
    with pytest.raises(ValueError, match="unknown split 'dev' for MNIST"):
        open_images(data_root / "MNIST", None, split="dev")
    val = open_images(data_root / "imagenette2-160", None, limit=3)  # anything else: the engine's reader
    assert all("/val/" in val.path(i) for i in val.indices)


def test_cli_data_names_an_mnist_root_inside_an_empty_folder(data_root, tmp_path):
    from interp.commands._data import open_images

    (tmp_path / "digits" / "MNIST" / "raw").mkdir(parents=True)  # what tells an MNIST root
    with pytest.raises(FileNotFoundError, match="no images found in .*an MNIST root.*it holds an MNIST root: "):
        open_images(tmp_path, None, mode="L")


def test_layers_blocks_lists_what_all_blocks_picks(capsys):
    assert main(["layers", "torchvision:resnet18", "--blocks", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert main(["layers", "torchvision:squeezenet1_0", "--blocks"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["layer", "type", "output", "alias"]
    assert [r.split()[:2] for r in rows[1:]] == [[f"features.{i}", "Fire"] for i in (3, 4, 5, 7, 8, 9, 10, 12)]
    assert rows[1].split()[2] == "128x54x54"  # the probe forward at 224: after the stride-2 conv and pool

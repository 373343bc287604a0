"""Where the weights came from: announced when random, recorded in topk.json, gallery.json and the page."""
from __future__ import annotations

import hashlib
import json

import torch

import adapters
from _tiny import image_folder, model_file
from interp.cli import main
from interp.commands._models import announce_weights, load_model_info

SE_MODEL = '''
import torch
from torch import nn


class SE(nn.Module):
    def __init__(self):
        super().__init__(); self.a = nn.Conv2d(3, 4, 3); self.b = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        y = self.a(x)
        return self.b(y * torch.sigmoid(y.mean((2, 3), keepdim=True)))


def make():
    return SE()
'''


def test_weights_source_of_built_ins_without_loading():
    assert adapters.weights_source("vgg16") == {"random": True}
    assert adapters.weights_source("torchvision:resnet18") == {"random": True}
    assert adapters.weights_source("timm:resnet18", "pretrained") == {"name": "timm:resnet18", "weights": "pretrained"}
    shipped = adapters.weights_source("lenet5")
    from adapters.lenet5 import DEFAULT_WEIGHTS

    assert shipped["name"] == "lenet5" and shipped["file"] == str(DEFAULT_WEIGHTS)
    assert shipped["sha256"] == hashlib.sha256(DEFAULT_WEIGHTS.read_bytes()).hexdigest()
    assert adapters.weights_source("lenet5", "random") == {"random": True}


def test_random_weights_are_announced_once(capsys):
    loaded = load_model_info("torchvision:resnet18")
    assert loaded.weights == {"random": True, "seed": 0}
    announce_weights("torchvision:resnet18", loaded)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["note: torchvision:resnet18 has random weights (seed 0); pass --weights FILE (a .pt/.pth/"
                   ".safetensors checkpoint) to see what trained weights learnt"]
    announce_weights("lenet5", load_model_info("lenet5"))
    assert capsys.readouterr().err == ""


def test_visualize_records_the_weights_file(tmp_path, capsys):
    spec = model_file(tmp_path)
    net = load_model_info(spec).model
    ckpt = tmp_path / "ckpt.pt"
    torch.save(net.state_dict(), ckpt)
    out = tmp_path / "out"
    assert main(["visualize", spec, "--weights", str(ckpt), "--data", str(image_folder(tmp_path / "imgs")),
                 "--channels", "0", "--top", "1", "--out", str(out)]) == 0
    assert "random weights" not in capsys.readouterr().err
    expected = {"name": spec, "file": str(ckpt.resolve()), "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest()}
    assert json.loads((out / "topk.json").read_text())["weights"] == expected
    assert json.loads((out / "gallery.json").read_text())["weights"] == expected
    page = (out / "index.html").read_text()
    assert f"weights: {spec}, ckpt.pt, sha256 {expected['sha256'][:12]}" in page


def test_visualize_announces_and_records_random_weights(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["visualize", "torchvision:resnet18", "--data", str(image_folder(tmp_path / "imgs", n=2)),
                 "--layers", "conv1", "--channels", "0", "--top", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "note: torchvision:resnet18 has random weights (seed 0); pass --weights" in err
    assert json.loads((out / "topk.json").read_text())["weights"] == {"random": True, "seed": 0}
    assert "weights: random (seed 0), not trained" in (out / "index.html").read_text()


def test_rf_notes_go_to_stderr(tmp_path, capsys):
    (tmp_path / "se.py").write_text(SE_MODEL)
    assert main(["rf", f"{tmp_path / 'se.py'}:make", "--input-size", "16"]) == 0
    captured = capsys.readouterr()
    assert "note:" not in captured.out and captured.out.splitlines()[0].split()[0] == "layer"
    assert len(captured.out.splitlines()) == 6  # header + 5 layers, nothing else
    notes = captured.err.strip().splitlines()
    assert notes and all(line.startswith("note: global context") for line in notes)

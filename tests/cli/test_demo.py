"""``cnn-internals demo`` end to end, on a smaller slice of the shipped MNIST sample."""
from __future__ import annotations

import json

from interp.cli import main
from interp.topk import TopK


def test_demo_writes_panels_topk_and_gallery(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--limit", "60", "--only", "lenet5"]) == 0
    out = tmp_path / "demo" / "lenet5"
    printed = capsys.readouterr().out
    assert str(out / "index.html") in printed and str(out / "topk.json") in printed
    expected = {f"lenet5_{layer}_{method}.png" for layer in ("conv1", "conv2", "conv3")
                for method in ("deconvnet", "guided")}
    assert {p.name for p in out.glob("*.png")} == expected
    for name in expected:
        assert 5_000 < (out / name).stat().st_size < 600_000
    tk = TopK.load(out / "topk.json")
    assert tk.weights["name"] == "lenet5" and tk.weights["file"].endswith("lenet5.safetensors")
    assert tk.model_id == "lenet5" and tk.n_images == 60 and tk.input_size == (32, 32)
    assert list(tk.layers) == ["conv1", "conv2", "conv3"]
    for layer, size in (("conv1", 5), ("conv2", 14), ("conv3", 32)):
        assert tk.channels(layer) == list(range(6))
        assert all(len(tk[layer, c]) == 9 for c in range(6))
        assert tk.layers[layer].rf_size == (size, size)
    manifest = json.loads((out / "gallery.json").read_text())
    assert manifest["methods"] == ["deconvnet", "guided"]
    assert [L["title"] for L in manifest["layers"]] == ["Layer 1 (conv1)", "Layer 2 (conv2)", "Layer 3 (conv3)"]
    html = (out / "index.html").read_text()
    assert html.count('class="tile"') == 3 * 6 * 9


def test_demo_mobilenet_shows_live_channels_of_a_real_imagenet_network(tmp_path, capsys):
    """The shipped TF-slim MobileNet v1 on the shipped photos: five panels, only channels that fire."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--limit", "12", "--only", "mobilenet"]) == 0
    out = tmp_path / "demo" / "mobilenet"
    tk = TopK.load(out / "topk.json")
    assert list(tk.layers) == ["conv2", "conv4", "conv8", "conv12", "conv20"] and tk.n_images == 12
    for layer in tk.layers:
        assert len(tk.channels(layer)) == 6
        assert all(tk[layer, c][0].value > 0 for c in tk.channels(layer))
    assert len(list(out.glob("*_guided.png"))) == 5
    assert tk.weights["name"] == "pretrained:mobilenet_v1_100_tflite" and len(tk.weights["sha256"]) == 64

"""``cnn-internals demo`` end to end, on a smaller slice of the shipped MNIST sample."""
from __future__ import annotations

import json

from interp.cli import main
from interp.topk import TopK


def test_demo_writes_panels_topk_and_gallery(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--limit", "60"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "index.html") in printed and str(out / "topk.json") in printed
    expected = {f"lenet5_{layer}_{method}.png" for layer in ("conv1", "conv2", "conv3")
                for method in ("deconvnet", "guided")}
    assert {p.name for p in out.glob("*.png")} == expected
    for name in expected:
        assert 5_000 < (out / name).stat().st_size < 600_000
    tk = TopK.load(out / "topk.json")
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

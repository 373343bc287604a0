"""Linear CKA against hand-computed values, a model against itself, and the compare verb end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from interp.draw.cka import center_gram, cka_matrix, gram_linear, linear_cka


def test_cka_one_dimensional_by_hand():
    # x = (1, 2, 3), y = (1, 3, 2): centred (-1, 0, 1) and (-1, 1, 0);
    # <yc, xc>^2 = 1, ||xc||^2 = ||yc||^2 = 2, so CKA = 1 / (2 * 2) = 0.25
    # (= Pearson r^2, r = 1/2).
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [3.0], [2.0]])
    assert linear_cka(x, y) == pytest.approx(0.25, abs=1e-12)


def test_cka_two_dimensional_by_hand():
    # X columns centred: (-1, 1, -1, 1) and (-1, -1, 1, 1); Y = first column of X only.
    # Xc^T Xc = diag(4, 4) (Frobenius 4*sqrt(2)), Yc^T Yc = 4, Yc^T Xc = (4, 0) -> ||.||^2 = 16.
    # CKA = 16 / (4 * sqrt(2) * 4) = 1 / sqrt(2).
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    y = x[:, :1]
    assert linear_cka(x, y) == pytest.approx(1 / np.sqrt(2), abs=1e-12)


def test_cka_matches_the_feature_space_formula_and_invariances():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(12, 7, generator=gen, dtype=torch.float64) + x @ torch.randn(5, 7, generator=gen, dtype=torch.float64)
    xc, yc = (x - x.mean(0)).numpy(), (y - y.mean(0)).numpy()
    ref = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert linear_cka(x, y) == pytest.approx(ref, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    assert linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0, abs=1e-12)
    # Centring the Gram matrix = Gram of the centred features.
    xc_t = torch.from_numpy(xc)
    torch.testing.assert_close(center_gram(gram_linear(x)), xc_t @ xc_t.T)


def test_cka_errors_are_clear():
    with pytest.raises(ValueError, match="same inputs"):
        linear_cka(torch.ones(3, 2), torch.ones(4, 2))
    with pytest.raises(ValueError, match="same for every input"):
        linear_cka(torch.ones(3, 2), torch.randn(3, 2))


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()


def test_model_against_itself_has_unit_diagonal():
    from interp.draw.compare import layer_grams
    from interp.mine import resolve_layers

    model = _small_cnn()
    x = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    names = resolve_layers(model, "all-conv")
    assert names == ["0", "2", "4"]
    grams, idx = layer_grams(model, x, names, progress=False)
    assert idx == list(range(10))
    m = cka_matrix(grams, grams)
    torch.testing.assert_close(torch.diagonal(m), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(m, m.T)
    # Pooled features really are what the hook saw: the last layer's 8x8 maps pooled to 4x4.
    with torch.no_grad():
        ref = torch.nn.functional.adaptive_avg_pool2d(model[:5](x), 4).reshape(10, -1).double()
    torch.testing.assert_close(grams[2], ref @ ref.T, rtol=1e-5, atol=1e-6)


MODEL_FILE = '''
import torch
from torch import nn


def small():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def other():
    torch.manual_seed(1)
    return small()[:4]
'''


def test_compare_verb_end_to_end(tmp_path, capsys):
    from PIL import Image

    from interp.cli import main

    (tmp_path / "m.py").write_text(MODEL_FILE)
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    out = tmp_path / "out"
    spec = f"{tmp_path / 'm.py'}:small"
    rc = main(["compare", spec, spec, "--data", str(tmp_path / "img"), "--layers", "conv1,conv2,conv3",
               "--top", "2", "--channels", "0-1", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["n_images"] == 8 and summary["a"]["layers"] == ["0", "2", "4"]
    values = np.array(summary["cka"]["values"])
    assert values.shape == (3, 3)
    np.testing.assert_allclose(np.diag(values), 1.0, atol=1e-6)
    for name in ("0", "2", "4"):
        img = Image.open(out / f"compare_{name}_vs_{name}_guided.png")
        left = Image.open(out / "a-m-A" / f"m-A_{name}_guided.png")
        right = Image.open(out / "b-m-B" / f"m-B_{name}_guided.png")
        # A left, B right, 16 px apart, under a 28 px title row.
        assert img.size == (left.width + 16 + right.width, 28 + max(left.height, right.height))
    assert Image.open(out / "cka.png").size[0] > 100
    assert (out / "a-m-A" / "index.html").is_file() and (out / "b-m-B" / "index.html").is_file()
    assert "linear CKA over 8 images" in capsys.readouterr().out

    # Two different models: the second has only two convs, so B's conv3 is a clear error.
    rc = main(["compare", spec, f"{tmp_path / 'm.py'}:other", "--data", str(tmp_path / "img"),
               "--layers", "conv1,conv3", "--out", str(tmp_path / "out2")])
    assert rc == 2 and "conv3" in capsys.readouterr().err


def test_cka_layers_can_differ_from_the_panel_layers(tmp_path, capsys):
    # Panels for one layer only, the heatmap over every conv of both models.
    from PIL import Image

    from interp.cli import main

    (tmp_path / "m.py").write_text(MODEL_FILE)
    rng = np.random.default_rng(1)
    (tmp_path / "img").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    out = tmp_path / "out"
    a, b = f"{tmp_path / 'm.py'}:small", f"{tmp_path / 'm.py'}:other"
    rc = main(["compare", a, b, "--data", str(tmp_path / "img"), "--layers", "conv1", "--cka-layers", "all-conv",
               "--top", "2", "--channels", "0", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["a"]["layers"] == ["0"] and summary["b"]["layers"] == ["0"]
    assert summary["cka"]["rows"] == ["0", "2", "4"] and summary["cka"]["cols"] == ["0", "2"]
    values = np.array(summary["cka"]["values"])
    assert values.shape == (3, 2)
    # "other" re-seeds and builds the same first two convs: its layers equal small's.
    np.testing.assert_allclose(values[:2, :2].diagonal(), 1.0, atol=1e-6)
    assert [p["file"] for p in summary["panels"]] == ["compare_0_vs_0_guided.png"]
    assert "linear CKA over 6 images" in capsys.readouterr().out

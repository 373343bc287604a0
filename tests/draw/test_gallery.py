"""The static HTML gallery, loaded in headless Chromium from file://."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import interp
from interp.cli import main
from interp.data import ArrayImages
from interp.draw.gallery import write_gallery

from _chromium import load_in_chromium


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.act = nn.Tanh()
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gallery")
    pixels = np.random.default_rng(0).integers(0, 256, size=(12, 16, 16), dtype=np.uint8)
    data = ArrayImages(pixels, lambda im: torch.from_numpy(np.asarray(im, np.float32)[None] / 255.0), mode="L")
    interp.visualize(Net().eval(), data, out, ["conv1", "conv2"], k=5, methods=["guided", "deconvnet"],
                     model_id="net", progress=False)
    return out


def test_gallery_loads_without_errors_and_shows_every_tile(gallery_dir, tmp_path):
    report = load_in_chromium(gallery_dir / "index.html", tmp_path)
    assert report["errors"] == [] and report["console"] == []
    assert report["tiles"] == 2 * 6 * 5
    assert report["broken"] == 0
    assert report["visibleProj"] == 2 * 6 * 5  # one projection per tile: the selected method's
    # The click on the last tile (conv2, channel 5, rank 5) drew its box on the input.
    manifest = json.loads((gallery_dir / "gallery.json").read_text())
    tile = manifest["layers"][1]["channels"][5]["tiles"][4]
    assert report["shown"] == "t1-5-4"
    top, left, bottom, right = tile["box"]
    fw, fh = report["frame"]
    expected = [top / 16 * fh, left / 16 * fw, (right - left) / 16 * fw, (bottom - top) / 16 * fh]
    np.testing.assert_allclose(report["box"], expected, atol=1.5)


def test_gallery_probe_catches_a_missing_file(gallery_dir, tmp_path):
    # The check above is only worth something if a broken page fails it.
    broken = tmp_path / "copy"
    shutil.copytree(gallery_dir, broken)
    (broken / "assets" / "conv1" / "crops" / "c0_r0.png").unlink()
    shown = json.loads((broken / "gallery.json").read_text())["layers"][1]["channels"][5]["tiles"][4]["input"]
    (broken / shown).unlink()  # the input the probe's click shows
    with pytest.raises(FileNotFoundError, match="missing"):
        write_gallery(broken)
    report = load_in_chromium(broken / "index.html", tmp_path)
    assert report["broken"] == 1 and len(report["errors"]) == 2  # the crop, then the clicked input


def test_gallery_command_rewrites_index(gallery_dir, capsys):
    (gallery_dir / "index.html").unlink()
    assert main(["gallery", str(gallery_dir)]) == 0
    assert "60 tiles" in capsys.readouterr().out
    assert (gallery_dir / "index.html").is_file()


def test_gallery_command_on_a_folder_without_manifest(tmp_path, capsys):
    assert main(["gallery", str(tmp_path)]) == 2
    assert "no gallery.json" in capsys.readouterr().err


def test_gallery_shows_a_layer_note_where_it_belongs(gallery_dir, tmp_path):
    """A layer with notes (gallery.json "notes") gets a visible note box under its title, the others none."""
    noted = tmp_path / "noted"
    shutil.copytree(gallery_dir, noted)
    manifest = json.loads((noted / "gallery.json").read_text())
    assert [L["notes"] for L in manifest["layers"]] == [[], []]
    note = "conv2 sees global context (a test note); panels and crops use its local field"
    manifest["layers"][1]["notes"] = [note]
    (noted / "gallery.json").write_text(json.dumps(manifest))
    write_gallery(noted)
    report = load_in_chromium(noted / "index.html", tmp_path)
    assert report["errors"] == [] and report["noted"] == 1
    assert report["notes"][0] is None and note in report["notes"][1]

"""Panel geometry: 6 blocks of 3x3 projections and crops, crops = receptive-field boxes."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import interp
from interp.data import ArrayImages
from interp.draw.panels import PAD, crop_tile, normalise_tile, panel_tiles
from interp.topk import TopK


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv3(self.relu2(self.conv2(self.pool1(self.relu1(self.conv1(x))))))


@pytest.fixture(scope="module")
def setup():
    model = SmallCNN().eval()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(24, 20, 20, 3), dtype=np.uint8)
    data = ArrayImages(pixels, lambda im: torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1),
                       mode="RGB")
    tk = interp.mine(model, data, ["conv1", "conv2", "conv3", "relu2"], k=9, progress=False)
    return model, data, pixels, tk


def _projections(model, data, tk, layer):
    idx = tk.image_indices(layer)
    local = {n: i for i, n in enumerate(idx)}
    xs = torch.stack([data.item(n) for n in idx])
    units = [(local[n], c, y, x) for n, c, y, x in tk.units(layer)]
    return interp.project(model, xs, layer, units, method="gradient")


@pytest.mark.parametrize("layer", ["conv1", "conv2", "conv3"])
def test_tile_grid_and_crops_equal_receptive_field_boxes(setup, layer):
    model, data, pixels, tk = setup
    proj = _projections(model, data, tk, layer)
    tiles = panel_tiles(tk, layer, proj, data.raw)
    rf = interp.receptive_field(model, layer, (20, 20))
    assert tiles.channels == [0, 1, 2, 3, 4, 5]
    assert [len(r) for r in tiles.proj] == [9] * 6 and [len(r) for r in tiles.crops] == [9] * 6
    th, tw = min(rf.size[0], 20), min(rf.size[1], 20)
    assert tiles.tile_size == (th, tw)
    for b, c in enumerate(tiles.channels):
        for r, e in enumerate(tiles.entries[b]):
            assert (e.channel, e.rank) == (c, r)
            crop, pr = tiles.crops[b][r], tiles.proj[b][r]
            assert crop.shape == pr.shape == (th, tw, 3)
            top, left, bottom, right = rf.box(e.y, e.x)
            clipped = rf.box(e.y, e.x, clip=(20, 20))
            assert tiles.boxes[b][r] == clipped
            ct, cl, cb, cr = clipped
            # Where the clipped box sits inside the tile: shifted by what was cut off.
            oy, ox = min(ct - top, th - (cb - ct)), min(cl - left, tw - (cr - cl))
            expected = pixels[e.index, ct:cb, cl:cr].astype(np.float32) / 255.0
            np.testing.assert_allclose(crop[oy:oy + cb - ct, ox:ox + cr - cl], expected, atol=1e-6)
            outside = np.ones((th, tw), bool)
            outside[oy:oy + cb - ct, ox:ox + cr - cl] = False
            assert np.all(crop[outside] == PAD)
            # The projection tile is the same box of the projection, scaled symmetrically
            # around zero by the 99.5th percentile of |value| and clipped (computed here by hand).
            p = proj[tk.units(layer).index(e.unit)].permute(1, 2, 0).numpy()[ct:cb, cl:cr]
            a = np.sort(np.abs(p).ravel())
            pos = 0.995 * (a.size - 1)
            s = a[int(np.floor(pos))] + (a[int(np.ceil(pos))] - a[int(np.floor(pos))]) * (pos - np.floor(pos))
            if s > 0:
                np.testing.assert_allclose(pr[oy:oy + cb - ct, ox:ox + cr - cl],
                                           np.clip(0.5 + 0.5 * p / s, 0, 1), atol=1e-5)


def test_box_outside_the_image_is_padded_grey():
    img = np.arange(5 * 5, dtype=np.float32).reshape(5, 5, 1)
    canvas, mask, clipped = crop_tile(img, (-2, 3, 1, 6), (3, 3))
    assert clipped == (0, 3, 1, 5)
    np.testing.assert_array_equal(canvas[:, :, 0], [[PAD, PAD, PAD], [PAD, PAD, PAD], [3, 4, PAD]])
    assert mask.sum() == 2
    norm = normalise_tile(canvas, mask, percentile=100)
    np.testing.assert_array_equal(norm[:, :, 0], [[PAD] * 3, [PAD] * 3, [0.875, 1, PAD]])


def test_display_scale_is_symmetric_and_ignores_outliers():
    """Zero is grey; one huge pixel does not flatten the rest (it did with min-max)."""
    tile = np.zeros((20, 20, 1), np.float32)
    tile[:10] = 1.0
    tile[10:] = -1.0
    tile[0, 0] = 1000.0
    norm = normalise_tile(tile)
    assert norm[0, 0, 0] == 1.0 and norm[5, 5, 0] == 1.0 and norm[15, 5, 0] == 0.0
    assert np.all(normalise_tile(np.zeros((4, 4, 3), np.float32)) == 0.5)


def test_panel_png_title_and_size(setup, tmp_path):
    model, data, _, tk = setup
    proj = _projections(model, data, tk, "conv2")
    fig = interp.panel(tk, "conv2", proj, data.raw, tmp_path / "p.png", method="guided", web="webp")
    png = (tmp_path / "p.png").read_bytes()
    assert 10_000 < len(png) < 600_000
    assert Image.open(tmp_path / "p.webp").size == (fig.shape[1], fig.shape[0])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).shape, fig.shape)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    assert interp.draw.panels.layer_title(tk, "conv2") == "Layer 2 (conv2)"


def test_redraw_from_saved_topk(setup, tmp_path):
    model, data, _, tk = setup
    loaded = TopK.load(tk.save(tmp_path / "topk.json"))
    proj = _projections(model, data, loaded, "conv3")
    a = interp.panel(tk, "conv3", proj, data.raw)
    b = interp.panel(loaded, "conv3", proj, data.raw)
    assert np.array_equal(a, b)


def test_non_conv_layer_gets_its_kind_in_the_title_and_field_crops(setup):
    model, data, _, tk = setup
    proj = _projections(model, data, tk, "relu2")
    tiles = panel_tiles(tk, "relu2", proj, data.raw)
    assert tiles.title == "relu2 (ReLU)" and tiles.note is None
    rf = interp.receptive_field(model, "relu2", (20, 20))
    assert tiles.tile_size == (min(rf.size[0], 20), min(rf.size[1], 20))
    e = tk["relu2", 0][0]
    assert tiles.boxes[0][0] == rf.box(e.y, e.x, clip=(20, 20))


def test_fewer_images_than_k_gives_fewer_tiles_and_says_so():
    model = SmallCNN().eval()
    pixels = np.random.default_rng(1).integers(0, 256, size=(4, 20, 20, 3), dtype=np.uint8)
    data = ArrayImages(pixels, lambda im: torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1))
    tk = interp.mine(model, data, ["conv2"], k=9, progress=False)
    proj = _projections(model, data, tk, "conv2")
    tiles = panel_tiles(tk, "conv2", proj, data.raw)
    assert [len(r) for r in tiles.proj] == [4] * 6
    assert tiles.title == "Layer 2 (conv2) - only 4 images, fewer than top-9"
    interp.panel(tk, "conv2", proj, data.raw)  # draws with empty slots


def test_titles_follow_the_originals_numbering():
    """ResNet-18's conv8 is the 9th conv called (shortcuts in between): still "Layer 8 (conv8)";
    an aliased layer names its alias and module."""
    import adapters

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model, _ = adapters.load("resnet18")
    tk = interp.mine(model, x, ["conv8"], channels=[0], k=1, progress=False)
    assert tk.layer("conv8").number == 9 and interp.draw.panels.layer_title(tk, "conv8") == "Layer 8 (conv8)"
    model, _ = adapters.load("inception")
    tk = interp.mine(model, x, ["conv4"], channels=[0], k=1, progress=False)
    (name,) = tk.layers
    assert interp.draw.panels.layer_title(tk, name) == f"Layer 4 (conv4: {name})" and name != "conv4"

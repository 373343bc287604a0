"""``cnn-internals visualize`` end to end, data errors, and model hygiene."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import interp
from interp.cli import main
from interp.data import open_images
from interp.topk import TopK

# Same rule as tests/conftest.py: ../shared/data unless CNN_INTERNALS_DATA says otherwise.
from conftest import DATA_ROOT as DATA  # noqa: E402
IMAGENETTE_VAL = DATA / "imagenette2-160" / "val"


def imagenette_folder(dst: Path, n_per_class: int = 1, classes: int = 4) -> Path:
    """A small ImageFolder copy of Imagenette val images."""
    if not IMAGENETTE_VAL.is_dir():
        pytest.fail(f"test data missing: {IMAGENETTE_VAL} (see ../shared/data/MANIFEST.md)")
    for wnid in sorted(p.name for p in IMAGENETTE_VAL.iterdir())[:classes]:
        (dst / wnid).mkdir(parents=True)
        for f in sorted((IMAGENETTE_VAL / wnid).iterdir())[:n_per_class]:
            shutil.copy(f, dst / wnid / f.name)
    return dst


FACTORY = '''
import torch
from torch import nn
from torchvision.transforms import v2 as T


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def build():
    torch.manual_seed(0)
    pre = T.Compose([T.ToImage(), T.Resize(40, antialias=True), T.CenterCrop(32),
                     T.ToDtype(torch.float32, scale=True), T.Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])])
    return Tiny(), pre
'''


def _factory(tmp_path: Path) -> str:
    (tmp_path / "tiny_model.py").write_text(FACTORY)
    return f"{tmp_path / 'tiny_model.py'}:build"


def test_visualize_resnet18_on_imagenette(tmp_path, capsys):
    data = imagenette_folder(tmp_path / "imgs", n_per_class=1, classes=4)
    out = tmp_path / "out"
    rc = main(["visualize", "torchvision:resnet18", "--data", str(data), "--layers", "conv1,layer1.0.conv2",
               "--top", "3", "--method", "guided,deconvnet", "--out", str(out), "--batch-size", "4"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "index.html" in printed and "topk.json" in printed
    for layer in ("conv1", "layer1.0.conv2"):
        for method in ("guided", "deconvnet"):
            assert (out / f"torchvision-resnet18_{layer}_{method}.png").is_file()
    tk = TopK.load(out / "topk.json")
    assert list(tk.layers) == ["conv1", "layer1.0.conv2"]
    assert tk.input_size == (224, 224) and tk.n_images == 4
    files = sorted(str(p) for p in data.rglob("*.JPEG"))
    for e in tk.iter_entries("layer1.0.conv2"):
        assert e.path == files[e.index]
    assert tk.layers["conv1"].number == 1 and tk.layers["layer1.0.conv2"].number == 3
    html = (out / "index.html").read_text()
    assert html.count('class="tile"') == 2 * 6 * 3
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary files left behind


def test_visualize_file_factory_model_all_conv_and_redraw(tmp_path, capsys):
    spec = _factory(tmp_path)
    data = imagenette_folder(tmp_path / "imgs", n_per_class=2, classes=3)
    out = tmp_path / "out"
    assert main(["visualize", spec, "--data", str(data), "--layers", "all-conv", "--channels", "0-2",
                 "--top", "3", "--out", str(out)]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["tiny_model_features.0_guided.png", "tiny_model_features.3_guided.png"]
    tk = TopK.load(out / "topk.json")
    assert tk.channels("features.3") == [0, 1, 2]
    # Redraw from topk.json with another method, without mining.
    before = (out / "topk.json").read_text()
    assert main(["visualize", spec, "--data", str(data), "--topk", str(out / "topk.json"),
                 "--method", "gradient", "--out", str(out)]) == 0
    assert (out / "tiny_model_features.3_gradient.png").is_file()
    assert "mining 0.0 s" in capsys.readouterr().out
    assert json.loads((out / "topk.json").read_text()) == json.loads(before)


def test_raw_images_are_unnormalised_model_geometry(tmp_path):
    from torchvision.transforms import v2 as T

    data_dir = imagenette_folder(tmp_path / "imgs", n_per_class=1, classes=2)
    pre = T.Compose([T.ToImage(), T.Resize(40, antialias=True), T.CenterCrop(32),
                     T.ToDtype(torch.float32, scale=True), T.Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])])
    ds = open_images(data_dir, pre)
    x, idx = ds[1]
    raw = ds.raw(1)
    assert idx == 1 and raw.shape == (32, 32, 3)
    np.testing.assert_allclose(raw, (x.permute(1, 2, 0).numpy() * 0.25 + 0.5).clip(0, 1), atol=1e-5)
    assert ds.path(1).endswith(".JPEG")
    # TF-style: normalised on the 0..255 scale (the TFLite/Keras twins); shown in [0, 1] all the same.
    tf_pre = T.Compose([T.ToImage(), T.Resize(40, antialias=True), T.CenterCrop(32),
                        T.ToDtype(torch.float32, scale=False), T.Normalize([128.0] * 3, [128.0] * 3)])
    tf_ds = open_images(data_dir, tf_pre)
    x_tf, _ = tf_ds[1]
    np.testing.assert_allclose(tf_ds.raw(1), (x_tf.permute(1, 2, 0).numpy() * 128 + 128) / 255, atol=1e-5)
    np.testing.assert_allclose(tf_ds.raw(1), raw_unnorm := ds.raw(1), atol=2e-3)  # the same picture
    assert raw_unnorm.max() <= 1.0
    # Decoded once for both (what visualize's loading uses): the same as item() and raw() apart;
    # also through a subset, and for tensors (their own item/raw).
    for d, i in ((ds, 1), (ds.subset([1, 0]), 0)):
        both = d.item_and_raw(i)
        assert torch.equal(both[0], d.item(i)) and np.array_equal(both[1], d.raw(i))
    from interp.data import TensorImages

    t = TensorImages(torch.randn(2, 3, 8, 8))
    assert torch.equal(t.item_and_raw(1)[0], t.item(1)) and np.array_equal(t.item_and_raw(1)[1], t.raw(1))


def test_corrupt_image_is_named_and_can_be_skipped(tmp_path, capsys):
    spec = _factory(tmp_path)
    data = imagenette_folder(tmp_path / "imgs", n_per_class=1, classes=3)
    bad = data / "n01440764" / "zz_broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rc = main(["visualize", spec, "--data", str(data), "--top", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "zz_broken.JPEG" in err and "--skip-corrupt" in err
    last = err.strip().splitlines()[-1]  # (lines above: the progress bar)
    assert last.startswith("cnn-internals visualize: error: cannot read image") and "zz_broken.JPEG" in last
    assert not (tmp_path / "out" / "topk.json").exists()
    with pytest.warns(UserWarning, match="zz_broken.JPEG"):
        rc = main(["visualize", spec, "--data", str(data), "--top", "2", "--skip-corrupt",
                   "--out", str(tmp_path / "out")])
    assert rc == 0 and TopK.load(tmp_path / "out" / "topk.json").n_images == 3


def test_empty_folder_and_missing_path(tmp_path, capsys):
    spec = _factory(tmp_path)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert main(["visualize", spec, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no images found in" in capsys.readouterr().err
    assert main(["visualize", spec, "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "data path not found" in capsys.readouterr().err


def test_fewer_images_than_top(tmp_path):
    spec = _factory(tmp_path)
    data = imagenette_folder(tmp_path / "imgs", n_per_class=1, classes=2)
    assert main(["visualize", spec, "--data", str(data), "--top", "9", "--layers", "features.3",
                 "--out", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "gallery.json").read_text())
    assert manifest["layers"][0]["title"] == "Layer 2 (conv2: features.3) - only 2 images, fewer than top-9"
    assert all(len(ch["tiles"]) == 2 for ch in manifest["layers"][0]["channels"])


def test_activation_layer_is_drawn_and_a_flat_layer_refused_in_one_line(tmp_path, capsys):
    spec = _factory(tmp_path)
    data = imagenette_folder(tmp_path / "imgs", n_per_class=1, classes=2)
    assert main(["visualize", spec, "--data", str(data), "--layers", "features.1", "--top", "2",
                 "--out", str(tmp_path / "out")]) == 0
    manifest = json.loads((tmp_path / "out" / "gallery.json").read_text())
    assert manifest["layers"][0]["title"].startswith("features.1 (ReLU)")
    assert (tmp_path / "out" / "tiny_model_features.1_guided.png").is_file()
    capsys.readouterr()
    assert main(["visualize", spec, "--data", str(data), "--layers", "head",
                 "--out", str(tmp_path / "out2")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "not an N x C x H x W feature map" in err[0] and "--blocks" in err[0]


def _snapshot(model):
    return [(n, m.training, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for n, m in model.named_modules()]


def test_model_left_as_it_was_after_success_and_error(tmp_path):
    import importlib.util

    (tmp_path / "tiny_model.py").write_text(FACTORY)
    spec = importlib.util.spec_from_file_location("tiny_model_t", tmp_path / "tiny_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, pre = mod.build()
    model.train()
    data_dir = imagenette_folder(tmp_path / "imgs", n_per_class=1, classes=3)
    ds = open_images(data_dir, pre)
    x = torch.stack([ds.item(i) for i in range(len(ds))])
    before = _snapshot(model)
    with torch.no_grad():
        out = model(x)
    interp.visualize(model, ds, tmp_path / "out", "all-conv", k=2, methods=["guided", "deconvnet"],
                     progress=False)
    assert _snapshot(model) == before
    with torch.no_grad():
        assert torch.equal(model(x), out)
    # An unreadable image in the middle of mining: hooks are already registered.
    Image.new("RGB", (8, 8)).save(data_dir / "n01440764" / "b.JPEG")
    (data_dir / "n01440764" / "b.JPEG").write_bytes(b"broken")
    ds = open_images(data_dir, pre)
    with pytest.raises(ValueError, match="b.JPEG"):
        interp.visualize(model, ds, tmp_path / "out2", "all-conv", k=2, batch_size=1, progress=False)
    assert _snapshot(model) == before
    with torch.no_grad():
        assert torch.equal(model(x), out)
    assert not (tmp_path / "out2").exists()


def test_engine_reads_folders_and_files_and_knows_no_dataset_layout(tmp_path):
    """The engine reads image files; an MNIST root (idx files) is the command line's business."""
    from interp.data import NoImagesFound

    val = open_images(DATA / "imagenette2-160", None, limit=20)  # train/ + val/ root: val by default
    assert all("/val/" in val.path(val.indices[i]) for i in range(20))
    assert len({Path(val.path(i)).parent.name for i in val.indices}) == 10  # spread over every class
    with pytest.raises(NoImagesFound, match="no images found in"):
        open_images(DATA / "MNIST", None, mode="L")  # idx files, no image file
    one = next((DATA / "imagenette2-160" / "val").rglob("*.JPEG"))
    assert len(open_images(one, None)) == 1
    (tmp_path / "x.txt").write_text("no image")
    with pytest.raises(ValueError, match="neither a folder of images nor an image file"):
        open_images(tmp_path / "x.txt", None)


def test_worker_processes_decode_ahead_with_the_same_files(tmp_path):
    """num_workers > 0: the layers' top images come from DataLoader workers, in job order; every file is
    byte-identical to decoding them in this process."""
    import importlib.util

    (tmp_path / "tiny_model.py").write_text(FACTORY)
    spec = importlib.util.spec_from_file_location("tiny_model_w", tmp_path / "tiny_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, pre = mod.build()
    ds = open_images(imagenette_folder(tmp_path / "imgs", n_per_class=2, classes=3), pre)
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"out{workers}"
        interp.visualize(model, ds, out, "all-conv", k=3, methods=["guided", "deconvnet"], progress=False,
                         num_workers=workers)
        runs[workers] = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
                         if p.is_file()}
    assert len(runs[0]) > 5 and runs[0].keys() == runs[2].keys()
    assert all(runs[0][name] == runs[2][name] for name in runs[0]), \
        [name for name in runs[0] if runs[0][name] != runs[2][name]]


def test_the_one_process_core_writes_the_wrappers_files(tmp_path, monkeypatch):
    """visualize_local (no bar, no process group) writes byte for byte what interp.visualize writes."""
    from interp import parallel
    from interp.draw.visualize import visualize_local

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2)).eval()
    x = torch.rand(6, 3, 20, 20, generator=torch.Generator().manual_seed(0))

    def tree(out: Path) -> dict[str, bytes]:
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    wrapped = interp.visualize(model, x, tmp_path / "a", "all-conv", k=2, methods=["guided", "gradient"])
    monkeypatch.setattr(parallel, "active", lambda: pytest.fail("the core looked for a process group"))
    alone = visualize_local(model, x, tmp_path / "b", "all-conv", k=2, methods=["guided", "gradient"])
    assert tree(tmp_path / "a") == tree(tmp_path / "b") and len(tree(tmp_path / "a")) > 6
    assert alone.topk.to_dict() == wrapped.topk.to_dict() and set(alone.timings) == set(wrapped.timings)
    seen: list[tuple[int, int]] = []
    visualize_local(model, x, tmp_path / "c", "0", k=2, topk=alone.topk, report=lambda *a: seen.append(a))
    assert seen == [(1, 1)]  # one job: layer 0, guided

"""Any layer with a feature-map output: traced nodes, blocks, all-blocks, and per-layer notes."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.squeezenet import Fire

import interp
import interp.rf
from _sweep import run_hooked
from interp.cli import main
from interp.layers import block_layers, layer_kind
from interp.mine import resolve_layers
from interp.notices import EngineWarning, GlobalContextWarning
from interp.topk import TopK

from conftest import DATA_ROOT as DATA  # noqa: E402


def _reference_topk(maps: torch.Tensor, channels, k: int) -> dict[int, list[tuple[int, float]]]:
    """Brute force over all images: (image, max value) of the k strongest images per channel."""
    vals = maps.double().amax(dim=(2, 3))  # (n, c)
    out = {}
    for c in channels:
        order = sorted(range(len(vals)), key=lambda n: (-float(vals[n, c]), n))[:k]
        out[c] = [(n, float(vals[n, c])) for n in order]
    return out


def _per_image(model: nn.Module, x: torch.Tensor, compute) -> torch.Tensor:
    """``compute(image batch of 1)`` image by image: no batching shared with the miner."""
    with torch.no_grad():
        return torch.cat([compute(x[i : i + 1]) for i in range(len(x))])


def _hooked(model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of ``modules`` for ``x`` with plain forward hooks (clones, first call)."""
    got: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, inputs, output) -> None:  # returns None: the forward goes on with its own tensor
            got.setdefault(name, output.detach().clone())
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in modules.items()]
    run_hooked(model, x, handles)
    return got


def _check(tk: TopK, layer: str, ref: dict) -> None:
    for c, want in ref.items():
        got = [(e.index, e.value) for e in tk[layer, c]]
        assert [n for n, _ in got] == [n for n, _ in want], (layer, c)
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-5, atol=1e-5)


def test_traced_add_and_block_equal_an_independent_reference():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(12, 3, 48, 48)
    layers = ["layer1.0.add", "layer2.0.add", "layer1.1", "layer2.0.conv1"]
    tk = interp.mine(model, x, layers, k=4, batch_size=5, progress=False, channels_last=False)
    assert [tk.layers[n].kind for n in layers] == ["add", "add", "BasicBlock", "Conv2d"]

    # The add before each block's final ReLU: bn2 output + the shortcut (block input, or downsample).
    modules = {"bn2a": model.layer1[0].bn2, "in_a": model.maxpool,
               "bn2b": model.layer2[0].bn2, "down_b": model.layer2[0].downsample}
    hooked = [_hooked(model, modules, x[i : i + 1]) for i in range(len(x))]
    sum_a = torch.cat([h["bn2a"] + h["in_a"] for h in hooked])
    sum_b = torch.cat([h["bn2b"] + h["down_b"] for h in hooked])
    _check(tk, "layer1.0.add", _reference_topk(sum_a, range(6), 4))
    _check(tk, "layer2.0.add", _reference_topk(sum_b, range(6), 4))
    assert (sum_a < 0).any()  # really before the ReLU (which runs in place on the same tensor)
    block = _per_image(model, x, lambda xi: _hooked(model, {"b": model.layer1[1]}, xi)["b"])
    _check(tk, "layer1.1", _reference_topk(block, range(6), 4))


def test_inception_cat_equals_concatenated_branches():
    torch.manual_seed(0)
    model = torchvision.models.googlenet(init_weights=False, aux_logits=False, transform_input=False).eval()
    x = torch.randn(6, 3, 64, 64)
    chans = [0, 70, 200, 250]  # one channel from each branch (64 + 128 + 32 + 32)
    tk = interp.mine(model, x, ["inception3a.cat"], channels=chans, k=3, progress=False, channels_last=False)
    assert tk.layers["inception3a.cat"].kind == "cat" and tk.layers["inception3a.cat"].out_shape[0] == 256
    b = model.inception3a

    def branches(xi):
        h = _hooked(model, {f"b{i}": getattr(b, f"branch{i}") for i in range(1, 5)}, xi)
        return torch.cat([h[f"b{i}"] for i in range(1, 5)], dim=1)

    _check(tk, "inception3a.cat", _reference_topk(_per_image(model, x, branches), chans, 3))


def _snapshot(model):
    return ([(n, m.training, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
             for n, m in model.named_modules()]
            + [(n, p.data_ptr(), p.stride(), p.requires_grad) for n, p in model.named_parameters()]
            + [(n, b.data_ptr()) for n, b in model.named_buffers()])


def test_model_untouched_after_mining_a_traced_node():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.train()
    model.layer1.eval()  # mixed flags must come back exactly
    x = torch.randn(4, 3, 32, 32)
    before = _snapshot(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train()
    model.layer1.eval()
    interp.mine(model, x, ["layer1.0.add", "layer3.1.add", "layer2"], k=2, batch_size=3, progress=False)
    assert _snapshot(model) == before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BN statistics too
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), out)


def test_all_blocks_and_children_selectors():
    resnet = torchvision.models.resnet18()
    expected = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert resolve_layers(resnet, "all-blocks") == expected
    assert resolve_layers(resnet, "conv1,all-blocks,layer1.0") == ["conv1"] + expected
    assert resolve_layers(resnet, ["children:layer2"]) == ["layer2.0", "layer2.1"]
    squeeze = torchvision.models.squeezenet1_0()
    assert block_layers(squeeze) == [f"features.{i}" for i in (3, 4, 5, 7, 8, 9, 10, 12)]
    assert {layer_kind(squeeze, n) for n in block_layers(squeeze)} == {"Fire"}
    effnet = block_layers(torchvision.models.efficientnet_b0())
    assert effnet[:4] == ["features.0", "features.1.0", "features.2.0", "features.2.1"] and len(effnet) == 18
    google = block_layers(torchvision.models.googlenet(init_weights=False))
    assert google[3:] == ["inception3a", "inception3b", "inception4a", "inception4b", "inception4c",
                          "inception4d", "inception4e", "inception5a", "inception5b"]  # aux heads: not 4-D/not run
    with pytest.raises(ValueError, match="no blocks"):
        resolve_layers(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "all-blocks")
    with pytest.raises(ValueError, match="unknown layer"):
        resolve_layers(resnet, "children:layer9")


def test_all_blocks_timm():
    timm = pytest.importorskip("timm")
    assert block_layers(timm.create_model("resnet18"))[:3] == ["layer1.0", "layer1.1", "layer2.0"]
    eff = block_layers(timm.create_model("efficientnet_b0"))
    assert eff[:3] == ["blocks.0.0", "blocks.1.0", "blocks.1.1"] and len(eff) == 16


def test_flat_layer_is_refused_with_one_clear_line():
    model = torchvision.models.resnet18().eval()
    with pytest.raises(ValueError) as err:
        interp.mine(model, torch.randn(2, 3, 32, 32), ["layer1.0.add", "fc"], progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "'fc' outputs shape (2, 1000), not an N x C x H x W feature map" in msg


class Blocks(nn.Module):
    """A stem, then a Bottleneck, a Fire module and a BasicBlock in one stage."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(Bottleneck(16, 4), Fire(16, 4, 8, 8), BasicBlock(16, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.body(F.relu(self.stem(x))).mean((2, 3)))


def test_visualize_blocks_and_a_traced_node_write_panels_and_gallery(tmp_path):
    model = Blocks().eval()
    assert block_layers(model) == ["body.0", "body.1", "body.2"]
    x = torch.rand(6, 3, 24, 24)
    res = interp.visualize(model, x, tmp_path, "all-blocks,body.2.add", k=3, channels=[0, 1],
                           methods=["guided", "deconvnet"], progress=False)
    manifest = json.loads((tmp_path / "gallery.json").read_text())
    titles = {L["name"]: L["title"] for L in manifest["layers"]}
    assert titles == {"body.0": "body.0 (Bottleneck)", "body.1": "body.1 (Fire)", "body.2": "body.2 (BasicBlock)",
                      "body.2.add": "body.2.add (add)"}
    for L in manifest["layers"]:
        assert L["notes"] == [] and len(L["channels"]) == 2 and all(len(ch["tiles"]) == 3 for ch in L["channels"])
        for m in ("guided", "deconvnet"):
            assert (tmp_path / L["panels"][m]).is_file()
    html = (tmp_path / "index.html").read_text()
    assert html.count('class="tile"') == 4 * 2 * 3 and "body.1 (Fire)" in html
    # A block's crops are its receptive field, as for a conv.
    rf = interp.receptive_field(model, "body.1", (24, 24))
    assert tuple(manifest["layers"][1]["tile_size"]) == (min(rf.size[0], 24), min(rf.size[1], 24))
    assert res.notes == {}


# -- a global-context layer: its note reaches the user once ----------------------------------------

SE_FACTORY = '''
import torch
from torch import nn


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.se = SE(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.se(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        return self.head(x.mean((2, 3)))


def build():
    torch.manual_seed(0)
    return SENet(), None
'''

_FAKE_NOTE = "se: a squeeze-and-excitation gate sees the whole input (test stand-in for interp.rf)"


@dataclasses.dataclass(frozen=True)
class _FieldWithLocal(interp.rf.ReceptiveField):
    """What interp.rf returns for a global-context layer once it knows ``local`` (stand-in)."""

    local: interp.rf.ReceptiveField | None = None
    measured: bool = False

    @property
    def spatial(self) -> interp.rf.ReceptiveField:
        return self.local if self.local is not None else self


def _with_local_field(monkeypatch, model: nn.Module, size: int) -> None:
    """Make interp.rf give layer ``se`` a global field with a local one, unless it already does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real_local = getattr(interp.receptive_field(model, "se", (size, size)), "local", None)
    if real_local is not None:
        return  # the real engine knows global-context layers: test it, not the stand-in
    real = interp.rf.receptive_field

    def fake(model, layer, input_size=(224, 224), in_channels=None):
        rf = real(model, layer, input_size, in_channels)
        if layer != "se":
            return rf
        warnings.warn(_FAKE_NOTE, GlobalContextWarning, stacklevel=2)
        local = real(model, "conv2", input_size, in_channels)
        kept = {f.name: getattr(rf, f.name) for f in dataclasses.fields(interp.rf.ReceptiveField)}
        return _FieldWithLocal(**{**kept, "is_global": True, "local": local})

    monkeypatch.setattr(interp.rf, "receptive_field", fake)


def _images(dst: Path, n: int = 3) -> Path:
    val = DATA / "imagenette2-160" / "val"
    if not val.is_dir():
        pytest.fail(f"test data missing: {val} (see ../shared/data/MANIFEST.md)")
    for wnid in sorted(p.name for p in val.iterdir())[:n]:
        (dst / wnid).mkdir(parents=True)
        f = sorted((val / wnid).iterdir())[0]
        shutil.copy(f, dst / wnid / f.name)
    return dst


def test_global_context_note_once_in_stderr_gallery_and_topk(tmp_path, capsys, monkeypatch):
    (tmp_path / "se_net.py").write_text(SE_FACTORY)
    spec = f"{tmp_path / 'se_net.py'}:build"
    import importlib.util

    mod_spec = importlib.util.spec_from_file_location("se_net_t", tmp_path / "se_net.py")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    _with_local_field(monkeypatch, mod.build()[0], 32)
    data = _images(tmp_path / "imgs")
    out = tmp_path / "out"
    assert main(["visualize", spec, "--data", str(data), "--size", "32", "--layers", "conv2,se", "--top", "2",
                 "--method", "guided,gradient", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    manifest = {L["name"]: L for L in json.loads((out / "gallery.json").read_text())["layers"]}
    se_notes = manifest["se"]["notes"]
    assert se_notes and len(se_notes) == len(set(se_notes)) and manifest["conv2"]["notes"] == []
    assert any("whole input" in n or "global" in n.lower() for n in se_notes)
    printed = [line for line in err.splitlines() if line.startswith("note: layer ")]
    assert printed == [f"note: layer se: {n}" for n in se_notes]  # each once, nothing for conv2
    assert "Warning" not in err  # not printed a second time as a Python warning
    tk = TopK.load(out / "topk.json")
    info = tk.layers["se"]
    assert info.rf_local and not info.rf_global and info.notes == se_notes[: len(info.notes)]
    # Boxes and crops use the local field (that of conv2, whose map SE gates), not the whole image.
    assert info.rf_size == tk.layers["conv2"].rf_size and info.rf_size[0] < 32
    assert all(e.box == info.box(e.y, e.x) and e.box[2] - e.box[0] == info.rf_size[0] for e in tk.iter_entries("se"))
    assert tuple(manifest["se"]["tile_size"]) == info.rf_size and manifest["se"]["rf_local"] is True
    html = (out / "index.html").read_text()
    assert html.count('class="notes"') == 1 and 'class="noted"' in html


def test_torchrun_notes_reach_rank_0_once(tmp_path):
    """Under torchrun the projections run on both ranks; the notes still land once per layer."""
    import subprocess
    import sys

    from _ranks import free_port, loopback_env

    (tmp_path / "se_net.py").write_text(SE_FACTORY)
    import importlib.util

    mod_spec = importlib.util.spec_from_file_location("se_net_d", tmp_path / "se_net.py")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if getattr(interp.receptive_field(mod.build()[0], "se", (32, 32)), "local", None) is None:
            pytest.skip("interp.rf gives no local field for squeeze-and-excitation (a subprocess cannot be patched)")
    data = _images(tmp_path / "imgs", n=4)

    def args(out: Path) -> list[str]:
        return ["visualize", f"{tmp_path / 'se_net.py'}:build", "--data", str(data), "--size", "32",
                "--layers", "conv2,se,se.fc1", "--top", "2", "--method", "guided,gradient", "--out", str(out)]

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", **loopback_env())
    one = subprocess.run([sys.executable, "-m", "interp.cli", *args(tmp_path / "one")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "interp.cli", *args(tmp_path / "two")]
    two = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = ((tmp_path / d / "gallery.json").read_text() for d in ("one", "two"))
    assert a == b
    layers = {L["name"]: L["notes"] for L in json.loads(b)["layers"]}
    assert layers["se"] and layers["se.fc1"] and layers["conv2"] == []
    for proc in (one, two):
        printed = [line[line.index("note: layer "):] for line in proc.stderr.splitlines() if "note: layer " in line]
        assert printed == [f"note: layer {n}: {t}" for n in ("se", "se.fc1") for t in layers[n]]


def test_mine_keeps_engine_warnings_as_layer_notes_and_raises_each_once(tmp_path, monkeypatch):
    (tmp_path / "se_net.py").write_text(SE_FACTORY)
    import importlib.util

    mod_spec = importlib.util.spec_from_file_location("se_net_m", tmp_path / "se_net.py")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    model = mod.build()[0]
    _with_local_field(monkeypatch, model, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tk = interp.mine(model, torch.rand(5, 3, 32, 32), "conv2,se,se.mul", k=2, progress=False)
    engine = [str(w.message) for w in caught if issubclass(w.category, EngineWarning)]
    assert tk.layers["conv2"].notes == [] and tk.layers["se"].notes
    assert engine and len(engine) == len(set(engine))  # once per layer, none repeated
    assert all(any(m in n for n in tk.layers["se"].notes + tk.layers["se.mul"].notes) for m in engine)
    assert tk.layers["se"].kind == "SE" and tk.layers["se.mul"].kind == "mul" and tk.layers["se"].rf_local


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, forward hooks still reach its modules."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))

    def forward(self, x):
        x = self.stem(x)
        if x.shape[-1] > 1:  # fx: "symbolically traced variables cannot be used as inputs to control flow"
            x = x.flip(-1)
        return self.body(x).mean((2, 3))


def test_a_model_fx_cannot_trace_keeps_hooks_for_modules_and_blocks():
    model = Untraceable().eval()
    x = torch.randn(6, 3, 16, 16)
    assert resolve_layers(model, "all-blocks") == ["body.0", "body.1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (its receptive field is composed from modules, with a note)
        tk = interp.mine(model, x, "all-blocks", k=3, progress=False, channels_last=False)
    block = _per_image(model, x, lambda xi: _hooked(model, {"b": model.body[1]}, xi)["b"])
    _check(tk, "body.1", _reference_topk(block, range(6), 3))
    assert tk.layers["body.1"].kind == "BasicBlock"
    with pytest.raises(ValueError, match="not fx-traceable"):
        interp.mine(model, x, "body.0.add", progress=False)

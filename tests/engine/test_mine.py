"""Top-k mining against a brute-force reference, ties, early stop, memory, model hygiene."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import interp
from interp.topk import TopK


class IntCNN(nn.Module):
    """Integer weights on integer images: every activation is exact in float32,
    so equal values are *exactly* equal whatever the batch composition (real
    ties, not near-ties)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(8, 7, 2)
        self.head = nn.Linear(7, 3)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2, self.conv3):
                conv.weight.copy_(torch.randint(-1, 2, conv.weight.shape, generator=g).float())
                conv.bias.copy_(torch.randint(-1, 2, conv.bias.shape, generator=g).float())

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.conv3(self.pool(x))
        return self.head(x.mean(dim=(2, 3)))


def int_images(n: int = 40, size: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 4, (max(n, 40), 1, size, size), generator=g).float()
    x[5] = x[17]  # duplicates: equal values on different images, the lower index must win
    x[30] = x[2]
    x[9] = 2.0  # constant image: its maps tie at many positions, the first row-major must win
    x[11] = 0.0
    return x[:n]


def brute_force(model: nn.Module, x: torch.Tensor, layer: str, channels, k: int):
    """Reference: keep every activation map, then sort in numpy."""
    store = {}
    module = dict(model.named_modules())[layer]
    h = module.register_forward_hook(lambda m, i, o: store.setdefault("out", o.detach().clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    acts = store["out"].double().numpy()
    result, ties = {}, {"within": 0, "across": 0}
    for c in channels:
        rows = []
        for n in range(len(x)):
            flat = acts[n, c].ravel()
            v = flat.max()
            hits = np.flatnonzero(flat == v)
            ties["within"] += len(hits) > 1
            y, xx = divmod(int(hits[0]), acts.shape[3])
            rows.append((-v, n, y, xx))
        rows.sort()
        top = rows[:k]
        values = [-r[0] for r in rows]
        ties["across"] += sum(values.count(-r[0]) > 1 for r in top)
        result[c] = [(n, y, xx, -negv) for negv, n, y, xx in top]
    return result, ties


def test_mine_equals_brute_force_for_several_layers_with_ties():
    model = IntCNN().eval()
    x = int_images()
    layers = ["conv1", "relu2", "conv3"]
    channels = {"conv1": [0, 2, 5], "relu2": [1, 3, 4, 7], "conv3": [6, 0]}
    tk = interp.mine(model, x, layers, channels=channels, k=7, batch_size=6, progress=False)
    total_ties = {"within": 0, "across": 0}
    for layer in layers:
        ref, ties = brute_force(model, x, layer, channels[layer], 7)
        total_ties = {key: total_ties[key] + ties[key] for key in ties}
        for c in channels[layer]:
            got = [(e.index, e.y, e.x, e.value) for e in tk[layer, c]]
            assert got == ref[c], (layer, c)
            assert [e.rank for e in tk[layer, c]] == list(range(7))
    # The data really exercises both tie rules.
    assert total_ties["within"] > 10 and total_ties["across"] > 10


def test_same_result_for_any_batch_size_and_tensor_or_dataset():
    model = IntCNN().eval()
    x = int_images()
    a = interp.mine(model, x, "conv2", k=9, batch_size=1, progress=False)
    b = interp.mine(model, x, "conv2", k=9, batch_size=40, progress=False)
    ds = torch.utils.data.TensorDataset(x, torch.zeros(len(x)))  # (image, label) items
    c = interp.mine(model, ds, "conv2", k=9, batch_size=13, progress=False)
    assert a.to_dict() == b.to_dict() == c.to_dict()
    assert a.channels("conv2") == [0, 1, 2, 3, 4, 5]  # default: the first 6


def test_receptive_field_box_and_json_roundtrip(tmp_path):
    model = IntCNN().eval()
    x = int_images()
    tk = interp.mine(model, x, ["conv1", "conv2"], k=3, model_id="intcnn", progress=False)
    rf = interp.receptive_field(model, "conv2", (12, 12))
    for e in tk.iter_entries("conv2"):
        assert e.box == rf.box(e.y, e.x)
    info = tk.layers["conv2"]
    assert (info.rf_size, info.rf_stride, info.rf_offset) == ((5, 5), (2, 2), (-1, -1))
    assert info.number == 2 and tk.layers["conv1"].number == 1
    path = tk.save(tmp_path / "topk.json")
    raw = json.loads(path.read_text())
    entry = raw["layers"][1]["entries"][0]
    assert set(entry) == {"channel", "rank", "index", "path", "y", "x", "value", "box"}
    assert raw["model_id"] == "intcnn"
    assert TopK.load(path).to_dict() == tk.to_dict()


def test_forward_stops_after_deepest_requested_layer():
    model = IntCNN().eval()
    calls = []
    model.conv3.register_forward_pre_hook(lambda m, i: calls.append(1))
    try:
        # (receptive_fields=False: computing them runs one dummy forward of its own.)
        interp.mine(model, int_images(8), ["conv2", "conv1"], k=2, batch_size=2, progress=False,
                    receptive_fields=False)
    finally:
        model.conv3._forward_pre_hooks.clear()
    assert calls == []


def _snapshot(model):
    return ([(name, m.training, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
             for name, m in model.named_modules()]
            # channels_last mining gives every weight back: same storage, same strides
            + [(name, p.data_ptr(), p.stride()) for name, p in model.named_parameters()])


def test_model_left_as_it_was_after_success_and_error():
    model = IntCNN()
    model.train()
    model.conv2.eval()  # mixed modes must come back exactly
    x = int_images(10)
    before = _snapshot(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(x).detach()
    interp.mine(model, x, ["conv1", "conv3"], k=3, progress=False)
    assert _snapshot(model) == before
    with pytest.raises(ValueError, match="has 7 channels"):
        # The error comes from a hook in the middle of the forward pass.
        interp.mine(model, x, ["conv1", "conv3"], channels={"conv1": [0], "conv3": [0, 9]}, k=3,
                    progress=False)
    assert _snapshot(model) == before
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(model(x).detach(), out)


def test_clear_errors():
    model = IntCNN().eval()
    x = int_images(4)
    with pytest.raises(ValueError, match="unknown layer"):
        interp.mine(model, x, ["conv9x"], progress=False)
    with pytest.raises(ValueError, match="N x C x H x W"):
        interp.mine(model, x, ["head"], progress=False)
    with pytest.raises(ValueError, match="empty"):
        interp.mine(model, x[:0], ["conv1"], progress=False)


def test_fewer_images_than_k():
    tk = interp.mine(IntCNN().eval(), int_images(4), ["conv1"], k=9, progress=False)
    assert tk.n_images == 4 and all(len(tk["conv1", c]) == 4 for c in tk.channels("conv1"))


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch, interp
    from torch import nn

    class Lazy(torch.utils.data.Dataset):
        # Images made on the fly, so the dataset itself costs no memory.
        def __init__(self, n): self.n = n
        def __len__(self): return self.n
        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return torch.rand(3, 32, 32, generator=g), 0

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    interp.mine(model, Lazy(64), ["0", "2"], k=9, batch_size=32, progress=False, receptive_fields=False)
    small = peak_mb()
    interp.mine(model, Lazy(640), ["0", "2"], k=9, batch_size=32, progress=False, receptive_fields=False)
    big = peak_mb()
    import tracemalloc
    tracemalloc.start()
    interp.mine(model, Lazy(64), ["0", "2"], k=9, batch_size=32, progress=False, receptive_fields=False)
    py_small = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    interp.mine(model, Lazy(640), ["0", "2"], k=9, batch_size=32, progress=False, receptive_fields=False)
    py_big = tracemalloc.get_traced_memory()[1]
    print(small, big, py_small, py_big)
    """
)


def test_memory_does_not_grow_with_dataset_size():
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    small, big, py_small, py_big = (float(v) for v in out.stdout.split())
    # Keeping the maps of 576 more images would cost 576 * 2 * 16*32*32*4 B = 72 MB.
    assert big - small < 8.0, (small, big)
    # Python-level allocations: no per-image bookkeeping either.
    assert py_big - py_small < 64 * 1024, (py_small, py_big)


def test_channels_last_and_model_layout_give_the_same_top_k():
    torch.manual_seed(0)
    import torchvision

    model = torchvision.models.resnet18().eval()
    x = torch.randn(24, 3, 64, 64)
    layers = ["conv1", "layer2.0.conv1", "layer4.1.conv2"]
    fast = interp.mine(model, x, layers, k=5, batch_size=8, progress=False)  # channels_last (default)
    plain = interp.mine(model, x, layers, k=5, batch_size=8, progress=False, channels_last=False)
    for layer in layers:
        for c in range(6):
            a, b = fast[layer, c], plain[layer, c]
            assert [(e.index, e.y, e.x) for e in a] == [(e.index, e.y, e.x) for e in b], (layer, c)
            assert np.allclose([e.value for e in a], [e.value for e in b], rtol=1e-5, atol=1e-6)


# -- the one-process core and the public wrapper --------------------------------------------------------


def test_the_core_gives_the_wrappers_topk_without_a_process_group(monkeypatch):
    """interp.mine (progress bar, workers) and the core mine_local give the same TopK; the core asks
    nothing of torch.distributed (every query of it fails here) and its module never imports interp.parallel."""
    import ast
    import importlib
    import inspect

    from interp import parallel

    core = importlib.import_module("interp.mine")  # the module (``interp.mine`` is the public function)

    model, x = IntCNN().eval(), int_images(40)
    ds = interp.data.ArrayImages(x[:, 0].to(torch.uint8).numpy() * 60, mode="L")
    wrapped = interp.mine(model, ds, ["conv1", "conv2"], k=5, batch_size=7, progress=True, num_workers=2)
    for name in ("active", "world", "is_main", "collect", "broadcast", "shard_blocks", "check_same_module"):
        monkeypatch.setattr(parallel, name, lambda *a, **k: pytest.fail("the core looked for a process group"))
    alone = core.mine_local(model, ds, ["conv1", "conv2"], k=5, batch_size=7)
    assert alone.to_dict() == wrapped.to_dict()
    tree = ast.parse(inspect.getsource(core))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
               {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and ("parallel" in m or "tqdm" in m)}


def test_scans_of_parts_merge_into_the_scan_of_the_whole():
    """What ranks do, in one process: scan two blocks of whole batches, merge, and get the one-pass TopK."""
    from interp.mine import Scan, iter_batches, mine_local, plan, scan

    model, x = IntCNN().eval(), int_images(40)
    whole = mine_local(model, x, ["conv2", "relu2"], k=6, batch_size=8)
    todo = plan(model, x, ["conv2", "relu2"], k=6, batch_size=8)
    parts = [scan(model, todo, iter_batches(x, 8, positions=span)).state() for span in (range(0, 24), range(24, 40))]
    merged = Scan.merged(todo, parts).require_images()
    assert merged.n_images == 40
    assert merged.topk(model, None, merged.fields(model)).to_dict() == whole.to_dict()
    empty = plan(model, x, ["conv2"], k=2, batch_size=8)
    with pytest.raises(ValueError, match="no images to mine"):
        Scan.merged(empty, [scan(model, empty, iter_batches(x, 8, positions=range(0, 0))).state()]).require_images()


def test_the_core_mines_the_batches_it_is_given():
    from interp.mine import iter_batches, mine_local

    model, x = IntCNN().eval(), int_images(40)
    first = mine_local(model, x, ["conv1"], k=3, batches=iter_batches(x, 10, positions=range(0, 20)))
    assert first.n_images == 20
    assert {e.index for e in first.iter_entries("conv1")} <= set(range(20))
    assert first.to_dict()["layers"] == mine_local(model, x[:20], ["conv1"], k=3).to_dict()["layers"]

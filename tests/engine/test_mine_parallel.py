"""Mining and ``visualize`` under torch.distributed: two Gloo ranks on loopback equal one process.

A module-scoped fixture spawns two ranks (``torch.multiprocessing.spawn``,
``127.0.0.1``, a free port) that mine several small datasets through the
public :func:`interp.mine` with the process group initialised, as a user's
script under torchrun would; every rank saves the :class:`TopK` it ended
with. The tests compare those with the same calls made here in one process.
The data put exactly equal images on both sides of the shard boundary and
use sizes that two ranks cannot split evenly. The last test runs the real
CLI under ``python -m torch.distributed.run`` and compares every output file
byte for byte with a single-process run.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import interp
from interp import parallel as dist

from _ranks import free_port, loopback_env, spawn_ranks
from interp.data import ArrayImages
from interp.topk import TopK

SPAWN_TIMEOUT_S = 180  # a hung collective fails the test instead of hanging it
LAYERS = ["conv1", "conv2"]




class IntNet(nn.Module):
    """Integer weights on integer images: every activation is exact in float32,
    so duplicate images tie *exactly* and the tie-breaking rule decides."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv1 = nn.Conv2d(1, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 4, 3, stride=2)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            for layer in (self.conv1, self.conv2, self.head):  # the same weights in every process
                layer.weight.copy_(torch.randint(-1, 2, layer.weight.shape, generator=g).float())
                layer.bias.copy_(torch.randint(-1, 2, layer.bias.shape, generator=g).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def _images(n: int, seed: int) -> torch.Tensor:
    """``n`` random integer 1 x 10 x 10 images with values 0-2."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (n, 1, 10, 10), generator=g).float()


def _tensor_case() -> torch.Tensor:
    # 11 images, batches of 2: one process forms 6 batches, so rank 0 mines
    # 0-5 and rank 1 mines 6-10. Duplicates straddle that boundary (5 | 6),
    # sit at its two ends (0 | 10), and a pair sits inside rank 1 (7, 9);
    # the bright pair (values 2-4) tops the channels that like bright input.
    x = _images(11, seed=1)
    x[6] = x[5] = torch.randint(2, 5, (1, 10, 10), generator=torch.Generator().manual_seed(9)).float()
    x[10] = x[0]
    x[9] = x[7]
    return x


def _array_case() -> interp.data.IndexedImages:
    # uint8 files-like data, a subset with non-contiguous global indices
    # (what --limit gives): positions 0..8, indices 0, 2, 4, ..., 16.
    arr = (_images(17, seed=2)[:, 0] * 60).to(torch.uint8).numpy()
    arr[6] = arr[4]  # positions 2 | 3: the boundary for 3 batches of 3 on 2 ranks
    return ArrayImages(arr, mode="L").subset(list(range(0, 17, 2)))


class _Listed(torch.utils.data.Dataset):
    """A plain dataset of ``(image, label)``: the index is the position."""

    def __init__(self, x: torch.Tensor, bad: int | None = None) -> None:
        self.x, self.bad = x, bad

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if i == self.bad:
            raise ValueError(f"cannot decode item {i}")
        return self.x[i], 7


# name -> (data factory, mine keyword arguments)
CASES = {
    "tensor": (_tensor_case, {"k": 3, "batch_size": 2}),
    "subset": (_array_case, {"k": 4, "batch_size": 3, "channels": [1, 3]}),
    "plain": (lambda: _Listed(_images(7, seed=4)), {"k": 5, "batch_size": 3}),
    # 3 images in batches of 4: one batch, so rank 1 has nothing to mine.
    "empty-rank": (lambda: _images(3, seed=5), {"k": 2, "batch_size": 4}),
}


def _mine(name: str, **extra) -> TopK:
    torch.manual_seed(0)
    model = IntNet()
    factory, kwargs = CASES[name]
    return interp.mine(model, factory(), LAYERS, model_id=name, progress=False, **{**kwargs, **extra})


def _worker(rank: int, port: int, out: str, mnist: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **loopback_env())
    torch.set_num_threads(1)
    dist.init_from_env("cpu")
    try:
        got: dict = {name: _mine(name).to_dict() for name in CASES}
        got["alone"] = _mine("tensor", distributed=False).to_dict()  # opt out inside a process group
        model = IntNet().train()
        interp.mine(model, _tensor_case(), LAYERS, k=2, batch_size=2, progress=False)
        got["hygiene"] = [model.training, model.conv1.training, len(model.conv1._forward_hooks)]
        torch.manual_seed(rank)  # a random initialisation per rank, as without saved weights
        own = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU())
        try:
            interp.mine(own, _images(6, seed=6), "0", k=2, batch_size=2, progress=False)
        except ValueError as exc:
            got["differ"] = [str(exc), dist.told_everyone(exc)]
        dist.sync_module(own)  # now every rank holds rank 0's weights
        got["synced"] = [own[0].weight.flatten().tolist(),
                         interp.mine(own, _images(6, seed=6), "0", k=2, batch_size=2, progress=False).to_dict()]
        got["queue"] = sorted(dist.work_queue(7))
        got["queue-again"] = sorted(dist.work_queue(3))  # a second queue starts from 0 again
        try:  # item 5 is in rank 1's shard (batches of 3: rank 0 mines 0-2, rank 1 3-6)
            interp.mine(IntNet(), _Listed(_images(7, seed=4), bad=5), LAYERS, batch_size=3, progress=False)
            got["error"] = None
        except Exception as exc:  # noqa: BLE001 - recorded for the test to check
            got["error"] = [type(exc).__name__, str(exc), dist.told_everyone(exc)]
        # Last: the command leaves the process group when it ends. 40 images
        # in batches of 8 give both ranks data, and both find channel 99 missing.
        from interp.cli import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            got["cli-rc"] = main(["visualize", "lenet5", "--data", mnist, "--limit", "40", "--batch-size", "8",
                                  "--channels", "0-99", "--out", str(Path(out, "cli"))])
        got["cli-stderr"] = err.getvalue()
        Path(out, f"rank{rank}.json").write_text(json.dumps(got))
    finally:
        dist.shutdown()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, data_root) -> list[dict]:
    outs: list[Path] = []  # a fresh folder for each attempt (spawn_ranks may retry once)

    def attempt() -> tuple[int, str, str]:
        outs.append(tmp_path_factory.mktemp("dist_mine"))
        return free_port(), str(outs[-1]), str(data_root / "MNIST")

    spawn_ranks(_worker, attempt, SPAWN_TIMEOUT_S, what="ranks")
    return [json.loads((outs[-1] / f"rank{r}.json").read_text()) for r in range(2)]


def test_shard_blocks_keeps_whole_batches_and_covers_everything():
    assert [dist.shard_blocks(11, 2, r, 2) for r in range(2)] == [range(0, 6), range(6, 11)]
    assert [dist.shard_blocks(3, 4, r, 2) for r in range(2)] == [range(0, 0), range(0, 3)]
    for n in (0, 1, 7, 64, 65, 1000):
        for block in (1, 3, 64):
            for size in (1, 2, 3, 5):
                parts = [dist.shard_blocks(n, block, r, size) for r in range(size)]
                assert [i for p in parts for i in p] == list(range(n))
                assert all(p.start % block == 0 for p in parts if len(p))
    with pytest.raises(ValueError, match="block"):
        dist.shard_blocks(5, 0, 0, 2)


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_ranks_mine_the_single_process_topk(ranks, name):
    alone = json.loads(json.dumps(_mine(name).to_dict()))  # as the ranks' JSON files hold it
    assert ranks[0][name] == alone
    assert ranks[1][name] == alone  # every rank ends with the merged result
    assert json.dumps(ranks[0][name], indent=1) == json.dumps(alone, indent=1)  # what topk.json holds


def test_ties_across_the_shard_boundary_keep_the_lower_index_first(ranks):
    tk = TopK.from_dict(ranks[0]["tensor"])
    assert tk.n_images == 11  # the global count, not one shard's
    for layer in LAYERS:
        led = 0
        for c in tk.channels(layer):
            top = tk[layer, c]
            if top[0].index == 5:
                # 5 (rank 0) and 6 (rank 1) are the same image: an exact tie,
                # and the lower index ranks first, as in one process.
                assert top[1].index == 6 and top[1].value == top[0].value
                assert (top[1].y, top[1].x) == (top[0].y, top[0].x)
                assert top[2].value < top[1].value
                led += 1
        assert led >= 3  # the bright pair leads most channels of each layer
    # Ties between different images spanning both shards: lower index first.
    c2 = [(e.index, e.value) for e in tk["conv2", 2]]
    assert c2 == [(0, 8.0), (2, 8.0), (8, 8.0)]
    # the other duplicate pairs tie too wherever both appear
    for layer in LAYERS:
        for c in tk.channels(layer):
            vals = {e.index: e.value for e in tk[layer, c]}
            for a, b in ((0, 10), (7, 9)):
                if a in vals and b in vals:
                    assert vals[a] == vals[b]
    sub = TopK.from_dict(ranks[0]["subset"])
    assert sub.n_images == 9
    assert {e.index for layer in LAYERS for e in sub.iter_entries(layer)} <= set(range(0, 17, 2))
    # 4 (rank 0's last image) and 6 (rank 1's first) are the same image.
    top = [(e.index, e.value) for e in sub["conv1", 1]]
    assert [i for i, _ in top] == [0, 2, 4, 6] and len({v for _, v in top}) == 1


def test_the_model_is_left_as_it_was(ranks):
    assert ranks[0]["hygiene"] == ranks[1]["hygiene"] == [True, True, 0]


def test_ranks_with_different_weights_are_refused_until_synced(ranks):
    for r in range(2):
        message, told = ranks[r]["differ"]
        assert "rank(s) 1 hold a model with other weights than rank 0" in message and "sync_module" in message
        assert told
    torch.manual_seed(0)
    rank0 = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU())  # what rank 0 built
    assert ranks[0]["synced"][0] == ranks[1]["synced"][0] == rank0[0].weight.flatten().tolist()
    alone = interp.mine(rank0, _images(6, seed=6), "0", k=2, batch_size=2, progress=False).to_dict()
    assert ranks[0]["synced"][1] == ranks[1]["synced"][1] == json.loads(json.dumps(alone))


def test_the_cli_reports_an_error_of_every_rank_once(ranks):
    assert ranks[0]["cli-rc"] == ranks[1]["cli-rc"] == 2
    lines = [line for line in ranks[0]["cli-stderr"].splitlines() if "error" in line]  # not the progress bar
    assert len(lines) == 1 and "channel(s)" in lines[0] and "--channels" in lines[0]
    assert ranks[1]["cli-stderr"] == ""  # rank 1 failed alike (and shows no bar): rank 0's line says it


def test_empty_rank_and_opt_out(ranks):
    assert ranks[0]["empty-rank"]["n_images"] == 3
    assert ranks[0]["alone"] == json.loads(json.dumps(_mine("tensor").to_dict()))  # distributed=False: this process, all data


def test_work_queue_hands_each_item_to_one_rank(ranks):
    for key, n in (("queue", 7), ("queue-again", 3)):
        a, b = ranks[0][key], ranks[1][key]
        assert sorted(a + b) == list(range(n)) and not set(a) & set(b)


def test_an_error_on_one_rank_fails_every_rank(ranks):
    kind0, msg0, told0 = ranks[0]["error"]
    kind1, msg1, told1 = ranks[1]["error"]
    assert (kind1, msg1) == ("ValueError", "cannot decode item 5")  # the failing rank: its own error
    assert (kind0, msg0) == ("PeerError", "rank 1 failed: ValueError: cannot decode item 5")
    assert told0 and told1  # so the CLI prints it once, on rank 0


def test_distributed_true_without_a_process_group_says_what_to_do():
    with pytest.raises(ValueError, match="torchrun"):
        _mine("tensor", distributed=True)


def _cli_args(data_root: Path, out: Path) -> list[str]:
    # 150 MNIST test images in batches of 32: 5 batches, 2 + 3 over two ranks.
    return ["visualize", "lenet5", "--data", str(data_root / "MNIST"), "--limit", "150", "--batch-size", "32",
            "--top", "4", "--channels", "0-3", "--method", "guided,gradient", "--out", str(out)]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_torchrun_visualize_writes_the_single_process_files(data_root, tmp_path):
    from interp.cli import main

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_cli_args(data_root, one)) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", **loopback_env())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "interp.cli", *_cli_args(data_root, two)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("top-k:") == 1 and "(2 processes" in proc.stdout  # rank 0 reports, once
    a, b = _tree(one), _tree(two)
    assert sorted(a) == sorted(b)
    assert [f for f in a if a[f] != b[f]] == []  # topk.json, panels, tiles, gallery: byte for byte
    assert not [f for f in b if f.endswith(".tmp")]
    tk = TopK.load(two / "topk.json")
    assert tk.n_images == 150 and list(tk.layers) == ["conv1", "conv2", "conv3"]
    from PIL import Image

    panel = np.asarray(Image.open(two / "lenet5_conv2_guided.png").convert("RGB"))
    assert panel.shape[0] > 100 and panel.std() > 10  # a real figure, not an empty canvas

"""DistributedDataParallel training on the CPU: two Gloo processes on loopback, then resume in one process.

One module-scoped fixture spawns two ranks (``torch.multiprocessing.spawn``,
``MASTER_ADDR=127.0.0.1``, a free port) that run several small fits and
save what each rank holds; the tests compare those files with each other,
with rank 0's checkpoint and with the same runs in this (single) process.
A second test launches the real CLI under ``python -m torch.distributed.run``.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from adapters.preprocess import imagenet_stats as fallback_stats
from adapters.training import AUGMENTATIONS, DeviceImagenette, Recipe, TrainSpec, UInt8Split, fit, rank_blocks
from adapters.training import finetune as ft
from interp import parallel as dist

from _ranks import free_port, spawn_ranks

from conftest import REPO  # noqa: E402
SPAWN_TIMEOUT_S = 240  # a hung collective fails the test instead of hanging it


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The single-process runs here are tiny: one thread is faster than two fighting over a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



def _data(n: int, seed: int) -> TensorDataset:
    """A learnable 4-class problem: the signs of the first two channels' means."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    return TensorDataset(x, y)


class _Net(nn.Module):
    def __init__(self, bn: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.fc = nn.Linear(8 * 36, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _spec(bn: bool, n_train: int) -> TrainSpec:
    torch.manual_seed(0)  # the same initial weights in every process
    return TrainSpec(model=_Net(bn), train_set=_data(n_train, 1), val_set=_data(37, 2),
                     recipe=Recipe("ddp-test", epochs=3, batch_size=15, lr=1e-2, scheduler="cosine"),
                     loss_fn=nn.CrossEntropyLoss())


class _Tiny(nn.Module):
    """No BatchNorm: DDP over the device batches must then equal one process."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1))


def _uint8(n: int, seed: int) -> UInt8Split:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 24, 24), generator=g, dtype=torch.uint8)
    sizes = torch.tensor([[160, 213] if i % 2 else [213, 160] for i in range(n)])
    return UInt8Split(images, torch.arange(n) % 10, sizes)


def _device_run(out: Path, device: torch.device | str = "cpu"):
    torch.manual_seed(0)
    model = _Tiny()
    data = DeviceImagenette(_uint8(13, 4), _uint8(7, 5), AUGMENTATIONS["mobilenet"].at(16), fallback_stats(), 16,
                            device=device)
    spec = TrainSpec(model=model, train_set=TensorDataset(torch.zeros(13)), val_set=TensorDataset(torch.zeros(7)),
                     recipe=Recipe("dev", epochs=2, batch_size=5, lr=1e-2), loss_fn=nn.CrossEntropyLoss())
    result = fit(spec, out, device=device, seed=5, progress=False, log=lambda _m: None, batches=data)
    return result, model


def _features_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, out: str) -> None:
    """One rank: the runs the tests check, each rank's final state saved next to rank 0's files."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A spawned process would spawn its DataLoader workers too (a fresh interpreter each); under torchrun
    # the ranks are plain processes whose workers fork, as here.
    multiprocessing.set_start_method("fork", force=True)
    root = Path(out)
    device = dist.init_from_env("cpu")
    try:
        # BatchNorm, uneven blocks (15 = 7 + 8) and a left-out last batch (91 = 6 x 15 + 1): stop after 2 of 3 epochs.
        spec = _spec(bn=True, n_train=91)
        result = fit(spec, root / "bn", device=device, seed=3, progress=False, stop_after=2)
        torch.save({"state": _state(spec.model), "history": result["history"]}, root / f"bn-rank{rank}.pt")
        # Same world size: stopping and resuming equals the uninterrupted run.
        spec = _spec(bn=True, n_train=91)
        fit(spec, root / "bn-full", device=device, seed=3, progress=False)
        torch.save(_state(spec.model), root / f"bn-full-rank{rank}.pt")
        if rank == 0:
            shutil.copytree(root / "bn", root / "bn-resumed")
        dist.barrier()
        spec = _spec(bn=True, n_train=91)
        fit(spec, root / "bn-resumed", device=device, seed=3, progress=False, resume=True)
        torch.save(_state(spec.model), root / f"bn-resumed-rank{rank}.pt")
        # No BatchNorm, persistent worker per rank: must equal one process.
        spec = _spec(bn=False, n_train=101)
        fit(spec, root / "plain", device=device, seed=3, workers=1, progress=False, stop_after=2)
        torch.save(_state(spec.model), root / f"plain-rank{rank}.pt")
        # The --cache-uint8 path: device-side batches split over the ranks.
        _, model = _device_run(root / "dev", device)
        torch.save(_state(model), root / f"dev-rank{rank}.pt")
        # SyncBatchNorm is CUDA-only in torch: on the CPU every rank stops with the same clear error.
        try:
            fit(_spec(bn=True, n_train=91), root / "sync", device=device, sync_bn=True, progress=False)
        except ValueError as exc:
            (root / f"sync-rank{rank}.txt").write_text(str(exc))
        # finetune's feature pass, split over the ranks and gathered.
        f, logits, y = ft.backbone_features(_features_model(), _data(23, 3), key=None, batch_size=4, progress=False)
        torch.save({"features": f, "logits": logits, "labels": y}, root / f"feat-rank{rank}.pt")
    finally:
        dist.shutdown()


@pytest.fixture(scope="module")
def ddp_dir(tmp_path_factory) -> Path:
    outs: list[Path] = []  # a fresh folder for each attempt (spawn_ranks may retry once)

    def attempt() -> tuple[int, str]:
        outs.append(tmp_path_factory.mktemp("ddp"))
        return free_port(), str(outs[-1])

    spawn_ranks(_worker, attempt, SPAWN_TIMEOUT_S, what="DDP ranks")
    return outs[-1]


def test_rank_blocks_split_every_global_batch_exactly():
    # 23 items, global batch 10, 3 ranks: 10 = 3+3+4, 10 = 3+3+4, the last 3 = 1+1+1.
    blocks = [rank_blocks(23, 10, r, 3) for r in range(3)]
    assert blocks[0] == [(0, 10, 0, 3), (10, 20, 10, 13), (20, 23, 20, 21)]
    assert blocks[2] == [(0, 10, 6, 10), (10, 20, 16, 20), (20, 23, 22, 23)]
    covered = sorted(i for r in range(3) for _, _, a, b in blocks[r] for i in range(a, b))
    assert covered == list(range(23))  # nothing padded, nothing repeated
    # A last batch with fewer items than ranks is left out on every rank alike.
    assert [len(rank_blocks(21, 10, r, 3)) for r in range(3)] == [2, 2, 2]
    assert rank_blocks(21, 10, 0, 1) == [(0, 10, 0, 10), (10, 20, 10, 20), (20, 21, 20, 21)]


def test_two_ranks_learn_hold_the_same_model_and_rank0_saves_it(ddp_dir):
    r0 = torch.load(ddp_dir / "bn-rank0.pt", weights_only=True)
    r1 = torch.load(ddp_dir / "bn-rank1.pt", weights_only=True)
    assert r0["state"].keys() == r1["state"].keys()
    # Parameters and BatchNorm buffers alike (rank 0's buffers are shared at every epoch end).
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert int(r0["state"]["bn.num_batches_tracked"]) == 2 * 6  # 6 steps per epoch: the 1-image batch left out
    losses = [h["train_loss"] for h in r0["history"]]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses) and losses[1] < losses[0]
    assert r0["history"] == r1["history"]
    ckpt = torch.load(ddp_dir / "bn" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2
    assert set(ckpt["model"]) == set(r0["state"])  # the unwrapped module: no "module." prefix
    for k, v in r0["state"].items():
        assert torch.equal(ckpt["model"][k], v), k
    log = json.loads((ddp_dir / "bn" / "log.json").read_text())
    assert log["world_size"] == 2 and log["global_batch"] == 15 and [e["world_size"] for e in log["epochs"]] == [2, 2]
    assert not list((ddp_dir / "bn").glob(".*.tmp"))  # no temporary file left behind by the atomic writes


def test_resume_with_the_same_world_size_is_exact(ddp_dir):
    full = torch.load(ddp_dir / "bn-full-rank0.pt", weights_only=True)
    resumed = torch.load(ddp_dir / "bn-resumed-rank0.pt", weights_only=True)
    for k, v in full.items():
        assert torch.equal(resumed[k], v), k


def test_resume_with_one_process_continues_the_schedule(ddp_dir, tmp_path):
    run = shutil.copytree(ddp_dir / "bn", tmp_path / "bn")  # the other tests read the 2-epoch files
    messages: list[str] = []
    spec = _spec(bn=True, n_train=91)
    result = fit(spec, run, seed=3, resume=True, progress=False, log=messages.append)
    assert "saved by 2 process(es), continuing with 1" in messages[0]
    assert result["epochs_run"] == 1
    h = result["history"]
    assert [r["epoch"] for r in h] == [1, 2, 3] and [r["world_size"] for r in h] == [2, 2, 1]
    assert math.isfinite(h[2]["train_loss"]) and h[2]["train_loss"] < h[0]["train_loss"]
    # The schedule counted the left-out batch: the resumed run ends the cosine exactly where one process does.
    ref = fit(_spec(bn=True, n_train=91), tmp_path / "ref", seed=3, progress=False, log=lambda _m: None)
    assert [r["lr_end"] for r in h] == pytest.approx([r["lr_end"] for r in ref["history"]], abs=1e-12)
    assert h[2]["lr_end"] == pytest.approx(0.0, abs=1e-12)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["world_size"] == 1 and "rng_ranks" not in ckpt


def test_ddp_update_is_the_global_batch_update(ddp_dir, tmp_path):
    # Without BatchNorm, weighting each rank's loss by its share of the global batch makes two ranks
    # (blocks of 7 and 8, last batch 5 + 6) follow one process's trajectory up to float rounding.
    spec = _spec(bn=False, n_train=101)
    fit(spec, tmp_path / "one", seed=3, progress=False, stop_after=2, log=lambda _m: None)
    ddp = torch.load(ddp_dir / "plain-rank0.pt", weights_only=True)
    for k, v in spec.model.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6)
    one = json.loads((tmp_path / "one" / "log.json").read_text())["epochs"]
    two = json.loads((ddp_dir / "plain" / "log.json").read_text())["epochs"]
    assert [e["val_top1"] for e in two] == [e["val_top1"] for e in one]  # sharded evaluation, summed counts
    assert [e["train_loss"] for e in two] == pytest.approx([e["train_loss"] for e in one], rel=1e-5)


def test_device_batches_split_over_ranks_equal_one_process(ddp_dir, tmp_path):
    result, model = _device_run(tmp_path / "one")
    ddp = torch.load(ddp_dir / "dev-rank0.pt", weights_only=True)
    assert torch.equal(ddp["conv.weight"], torch.load(ddp_dir / "dev-rank1.pt", weights_only=True)["conv.weight"])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6)
    two = json.loads((ddp_dir / "dev" / "log.json").read_text())["epochs"]
    assert [e["val_top1"] for e in two] == [e["val_top1"] for e in result["history"]]


def test_feature_pass_split_over_ranks_equals_one_process(ddp_dir):
    f, logits, y = ft.backbone_features(_features_model(), _data(23, 3), key=None, batch_size=4, progress=False)
    for rank in (0, 1):
        got = torch.load(ddp_dir / f"feat-rank{rank}.pt", weights_only=True)
        assert torch.equal(got["labels"], y)
        torch.testing.assert_close(got["features"], f, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["logits"], logits, rtol=1e-6, atol=1e-6)


def test_sync_bn_conversion_round_trip_and_cpu_error(ddp_dir, capsys):
    from adapters.training import convert_sync_bn as _convert_sync_bn
    from adapters.training import restore_bn as _restore_bn
    from interp.cli import main

    for rank in (0, 1):
        assert (ddp_dir / f"sync-rank{rank}.txt").read_text().startswith("--sync-bn needs CUDA")
    model = _Net(bn=True)
    found = _convert_sync_bn(model)
    # SyncBatchNorm takes over the very tensors, so the restored layer holds what was trained.
    assert isinstance(model.bn, nn.SyncBatchNorm) and model.bn.weight is found[0][2].weight
    _restore_bn(found)
    assert type(model.bn) is nn.BatchNorm2d and model.bn.weight is found[0][2].weight
    assert main(["finetune", "x", "--sync-bn"]) == 2
    assert "--sync-bn: only with --full fine-tuning" in capsys.readouterr().err


def test_torchrun_cli_two_processes_then_resume_alone(data_root, tmp_path, capsys):
    from interp.cli import main

    out = tmp_path / "lenet"
    args = ["train", "lenet5", "--data", str(data_root), "--limit", "200", "--epochs", "2", "--batch-size", "50",
            "--out", str(out), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "interp.cli", *args, "--stop-after", "1", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Rank 0 alone prints: one start line, one epoch line.
    lines = proc.stdout.splitlines()
    assert sum(x.startswith("training lenet5") for x in lines) == 1
    assert sum(x.startswith("epoch 1/2") for x in lines) == 1 and "stopped after epoch 1/2" in proc.stdout
    assert "(25 per process x 2 processes)" in proc.stdout and "2 processes)" in proc.stdout
    assert not (out / "lenet5.safetensors").exists()  # the run is not complete yet
    assert main(args + ["--resume"]) == 0
    text = capsys.readouterr().out
    assert "1/2 epochs done (saved by 2 process(es), continuing with 1)" in text and "epoch 2/2" in text
    log = json.loads((out / "log.json").read_text())
    assert [e["world_size"] for e in log["epochs"]] == [2, 1]
    assert log["epochs"][1]["train_loss"] < log["epochs"][0]["train_loss"]
    record = json.loads((out / "lenet5.json").read_text())
    assert record["epochs"] == 2 and (out / "lenet5.safetensors").is_file()

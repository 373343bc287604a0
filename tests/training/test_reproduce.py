"""`cnn-internals reproduce`: job runner (deadline, failures), results table, and a tiny end-to-end run."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapters.training import reproduce as rp
from adapters.training import results

from conftest import REPO as ROOT  # noqa: E402


def _job(tmp_path: Path, name: str, code: str, done: bool = True) -> rp.Job:
    marker = tmp_path / f"{name}.done"
    body = code + (f"; open({str(marker)!r}, 'w').close()" if done else "")
    return rp.Job(name, [sys.executable, "-c", body], tmp_path / f"{name}.log", marker)


def test_run_jobs_statuses_and_deadline(tmp_path):
    ok = _job(tmp_path, "ok", "print('fine')")
    crash = _job(tmp_path, "crash", "raise SystemExit(3)")
    silent = _job(tmp_path, "silent", "pass", done=False)  # exit 0 but wrote nothing: not "done"
    slow = _job(tmp_path, "slow", "import time; time.sleep(60)")
    later = _job(tmp_path, "later", "pass")
    said: list[str] = []
    t0 = time.monotonic()
    # 4 at once: "later" waits for a free slot, which "slow" never gives back before the deadline.
    rp.run_jobs([ok, crash, silent, slow, later], parallel=4, deadline=time.monotonic() + 4, say=said.append,
                poll=0.1)
    assert time.monotonic() - t0 < 30
    assert ok.status == "done" and ok.done.is_file()
    assert crash.status == "failed (exit 3)"
    assert silent.status == "failed (exit 0)"
    assert slow.status == "stopped at deadline" and slow.proc.poll() is not None  # no orphan left running
    assert 3 < slow.seconds < 30  # how long it ran, not when it started
    assert later.status == "done"  # started once "ok" finished, well before the deadline
    assert "fine" in ok.log.read_text()
    assert any("slow: stopped at the deadline" in s for s in said)


def test_pending_jobs_not_started_after_deadline(tmp_path):
    first = _job(tmp_path, "first", "import time; time.sleep(60)")
    second = _job(tmp_path, "second", "pass")
    rp.run_jobs([first, second], parallel=1, deadline=time.monotonic() + 1, say=lambda _m: None, poll=0.1)
    assert first.status == "stopped at deadline"
    assert second.status == "not started (deadline)" and second.proc is None


def _log(path: Path, planned: int, tops: list[float], seconds: float = 6.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = [{"val_top1": t, "val_top5": min(1.0, t + 0.1), "train_top1": t, "seconds": seconds} for t in tops]
    path.write_text(json.dumps({"recipe": {"epochs": planned, "batch_size": 256}, "extra": {"image_size": 224},
                                "device": "cuda", "amp": "bf16", "val_n": 3925, "epochs": epochs}))


def test_results_table_from_logs(tmp_path):
    _log(tmp_path / "train" / "resnet18" / "log.json", 3, [0.5, 0.93, 0.92])
    (tmp_path / "train" / "resnet18" / "resnet18.json").write_text("{}")
    _log(tmp_path / "train" / "vgg16" / "log.json", 20, [0.2, 0.4])  # cut by a deadline: no final file
    _log(tmp_path / "finetune" / "pretrained_mobilenet_v1_100_tflite" / "log.json", 5, [0.95] * 5, 12.0)
    (tmp_path / "finetune" / "pretrained_mobilenet_v1_100_tflite" / "finetune.json").write_text("{}")
    family = {"pretrained:mobilenet_v1_100_tflite": "mobilenet"}
    res = results.collect_results(tmp_path, ["resnet18", "vgg16", "alexnet"], ["pretrained:mobilenet_v1_100_tflite"],
                             family)
    rows = {r["model"]: r for r in res["rows"]}
    r = rows["resnet18"]
    assert r["status"] == "complete" and r["epochs"] == 3
    assert r["val_top1"] == 0.92 and r["best_val_top1"] == 0.93 and r["best_epoch"] == 2
    assert r["target_top1"] == 0.90 and r["target_met"] is True
    assert r["minutes"] == pytest.approx(0.3)
    assert rows["vgg16"]["status"] == "partial (2/20 epochs)" and rows["vgg16"]["target_met"] is False
    assert rows["alexnet"]["status"] == "not run"
    twin = rows["pretrained:mobilenet_v1_100_tflite"]
    assert twin["family"] == "mobilenet" and twin["target_top1"] == 0.97 and twin["target_met"] is False
    table = results.results_markdown(res)
    assert "| resnet18 | from scratch | complete | 3 | 92.0% | 93.0% (2) | 100.0% | 90.0% | yes | 0.3 |" in table
    assert "| alexnet | from scratch | not run |" in table
    assert len(table.splitlines()) == 2 + 4


def test_tuned_runs_are_labelled_with_their_deviations(tmp_path):
    _log(tmp_path / "train" / "resnet18" / "log.json", 3, [0.5, 0.6, 0.7])
    log = json.loads((tmp_path / "train" / "resnet18" / "log.json").read_text())
    assert results.deviations("resnet18", log) == ""  # the recipe as written
    log["recipe"].update(image_size=160, batch_size=64)
    log["extra"] = {"image_size": 160, "crop_scale": [0.35, 1.0]}
    assert results.deviations("resnet18", log) == ", tuned: 160 px, crop 0.35-1, batch 64"


@pytest.mark.parametrize("argv, message", [
    (["--models", "lenet6"], "unknown model lenet6"),
    (["--twins", "timm:nonsense"], "unknown twin timm:nonsense"),
    (["--stages", "train,draw"], "unknown stage draw"),
    (["--parallel", "0"], "--parallel must be >= 1"),
])
def test_bad_arguments_are_one_line(tmp_path, argv, message):
    res = subprocess.run([sys.executable, "-m", "interp.cli", "reproduce", "--out", str(tmp_path / "o"), *argv],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode != 0
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_tiny_run_end_to_end_and_resume(tmp_path, data_root):
    """Train one model for one epoch on 20 images, draw its panels, write the table; a rerun skips it all."""
    out = tmp_path / "rp"
    argv = [sys.executable, "-m", "interp.cli", "reproduce", "--data", str(data_root), "--out", str(out),
            "--models", "resnet18", "--twins", "none", "--limit", "20", "--epochs", "1", "--panel-limit", "20",
            "--workers", "1"]
    res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    (row,) = results["rows"]
    assert row["model"] == "resnet18" and row["status"] == "complete" and row["epochs"] == 1
    assert row["val_images"] == 20
    panels = sorted(p.name for p in (out / "panels" / "resnet18").glob("*.png"))
    assert panels == sorted(f"resnet18_{n}_guided.png" for n in ("conv2", "conv4", "conv6", "conv8", "conv10",
                                                                   "conv13"))
    assert len(list((out / "panels" / "resnet18").glob("*.webp"))) == 6
    assert (out / "results.md").read_text().count("| resnet18 |") == 1
    assert "## Panels" in (out / "results.md").read_text()
    # The GPU script's bundle: few files, each small, the numbers and the web panels inside.
    dest = tmp_path / "bundle"
    res_b = subprocess.run(["bash", str(ROOT / "examples" / "gpu_train_all.sh"), "bundle", str(out), str(dest)],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res_b.returncode == 0, res_b.stderr[-2000:]
    files = sorted(p.name for p in dest.iterdir())
    assert files == ["images.tar", "results.tgz"]  # ResNet-18 in fp16 is 22 MB: over the 15 MB a file may have
    assert all((dest / f).stat().st_size < 15 * 2**20 for f in files)
    import tarfile

    with tarfile.open(dest / "results.tgz") as tar:
        names = tar.getnames()
    assert "results.json" in names and "train/resnet18/log.json" in names and "logs/train_resnet18.log" in names
    with tarfile.open(dest / "images.tar") as tar:
        assert len([n for n in tar.getnames() if n.endswith(".webp")]) == 6
    # Again: the training is complete, so nothing trains; panels are redrawn from the final weights.
    res2 = subprocess.run(argv + ["--stages", "train,report"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res2.returncode == 0, res2.stderr[-2000:]
    assert "0 job(s) to run (1 already complete)" in res2.stdout


def test_gpu_script_packs_pieces_under_the_limit_and_stages_them_back(tmp_path):
    """`pack` cuts the data into pieces by their real (compressed) size; `stage` puts them back together."""
    data = tmp_path / "data"
    rng = __import__("random").Random(0)
    for split, n in (("val", 6), ("train", 14)):
        d = data / "imagenette2-160" / split / "n01440764"
        d.mkdir(parents=True)
        for i in range(n):  # incompressible, like JPEG
            (d / f"{i}.JPEG").write_bytes(bytes(rng.getrandbits(8) for _ in range(200_000)))
    script = str(ROOT / "examples" / "gpu_train_all.sh")
    res = subprocess.run(["bash", script, "pack", str(data), str(tmp_path / "pieces"), "1.5"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    pieces = sorted((tmp_path / "pieces").glob("piece*.tgz"))
    assert len(pieces) >= 3 and all(p.stat().st_size <= 1.5 * 2**20 for p in pieces)
    for p in pieces:
        assert subprocess.run(["bash", script, "stage", str(p), str(tmp_path / "staged")], capture_output=True,
                              timeout=60).returncode == 0
    for f in data.rglob("*.JPEG"):
        g = tmp_path / "staged" / f.relative_to(data)
        assert g.read_bytes() == f.read_bytes()
    assert sum(1 for _ in (tmp_path / "staged").rglob("*.JPEG")) == 20

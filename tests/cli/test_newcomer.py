"""The newcomer's path after the README's set-up commands (which `.ci/run` runs on a fresh clone):
a timm model on an ordinary folder of photos with the real console command, then its gallery
opened in headless Chromium."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from adapters.datasets import NATURAL_IMAGES
from _chromium import load_in_chromium


def test_visualize_a_timm_model_on_a_folder_then_open_the_gallery(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for f in sorted(NATURAL_IMAGES.glob("*.JPEG"))[::10]:
        shutil.copy(f, photos / f.name)
    out = tmp_path / "out"
    cmd = shutil.which("cnn-internals") or sys.executable
    args = [] if cmd != sys.executable else ["-m", "interp.cli"]
    proc = subprocess.run([cmd, *args, "visualize", "timm:mobilenetv3_small_050", "--data", str(photos),
                           "--layers", "conv1,conv8", "--top", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "random weights" in proc.stderr  # said once, up front
    assert len(list(Path(out).glob("*_guided.png"))) == 2
    report = load_in_chromium(out / "index.html", tmp_path)
    assert report["errors"] == [] and report["broken"] == 0
    assert report["tiles"] == 2 * 6 * 3

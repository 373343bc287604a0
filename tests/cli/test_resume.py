"""A failure or Ctrl-C after mining keeps topk.json, says so, and --topk resumes from it."""
from __future__ import annotations

import json
import sys

import pytest

from _tiny import image_folder, model_file
from interp.cli import main
from interp.topk import TopK


def _run(tmp_path, *extra: str) -> int:
    data = image_folder(tmp_path / "imgs")
    return main(["visualize", model_file(tmp_path), "--data", str(data), "--layers", "all-conv",
                 "--channels", "0-1", "--top", "2", "--method", "gradient", "--out", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize("failure, code", [(KeyboardInterrupt, 130), (RuntimeError("projection exploded"), 2)])
def test_failure_after_mining_keeps_topk_and_resumes(tmp_path, monkeypatch, capsys, failure, code):
    project_module = sys.modules["interp.draw.visualize"]  # where the visualize core calls interp.project
    real = project_module.project

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(project_module, "project", fail)
    assert _run(tmp_path) == code
    err = capsys.readouterr().err.strip().split("\n")
    topk_path = tmp_path / "out" / "topk.json"
    hint = f"the mining results were kept in {topk_path}; resume with --topk {topk_path}"
    # (progress bars draw on stderr too, with carriage returns)
    lines = [line.rsplit("\r", 1)[-1] for line in err]
    lines = [line for line in lines if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].endswith(hint)
    start = "error: projection exploded; " if code == 2 else "interrupted; "
    assert lines[0].startswith("cnn-internals visualize: " + start)
    # Complete: every mined layer and channel has its k entries.
    topk = TopK.load(topk_path)
    assert list(topk.layers) == ["0", "3"]
    assert all(len(topk[name, c]) == 2 for name in topk.layers for c in (0, 1))
    assert topk.weights == {"name": "tiny_net.py:build", "source": "factory"}
    assert not (tmp_path / "out" / "index.html").exists()

    monkeypatch.setattr(project_module, "project", real)
    before = json.loads(topk_path.read_text())
    assert _run(tmp_path, "--topk", str(topk_path)) == 0
    assert "mining 0.0 s" in capsys.readouterr().out
    assert (tmp_path / "out" / "tiny_net_3_gradient.png").is_file() and (tmp_path / "out" / "index.html").is_file()
    assert json.loads(topk_path.read_text()) == before


def test_failure_while_mining_promises_nothing(tmp_path, monkeypatch, capsys):
    engine = sys.modules["interp.api"]  # the public wrapper hands its mine (bar, workers) to the core

    def fail(*args, **kwargs):
        raise RuntimeError("mining exploded")

    monkeypatch.setattr(engine, "mine", fail)
    assert _run(tmp_path) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert [line.rsplit("\r", 1)[-1] for line in err] == ["cnn-internals visualize: error: mining exploded"]
    assert not (tmp_path / "out" / "topk.json").exists()


def test_topk_missing_file_fails_before_loading(tmp_path, capsys):
    assert _run(tmp_path, "--topk", str(tmp_path / "nope.json")) == 2
    assert "top-k file not found" in capsys.readouterr().err

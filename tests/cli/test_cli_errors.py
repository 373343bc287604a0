"""Every CLI error is one line on stderr with exit status 2; --debug shows the traceback; early checks."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from _tiny import image_folder, model_file
from interp.cli import main, plain_text


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_unexpected_error_is_one_line_with_its_type(tmp_path, monkeypatch, capsys):
    import interp.commands.layers as layers_cmd

    def boom(*args, **kwargs):
        raise TypeError("surprise\nand a second line")

    monkeypatch.setattr(layers_cmd, "load_model", boom)
    assert main(["layers", "lenet5"]) == 2
    assert one_line(capsys.readouterr().err) == "cnn-internals layers: error: TypeError: surprise"
    # --debug, before or after the verb: the exception itself, with its traceback.
    with pytest.raises(TypeError):
        main(["--debug", "layers", "lenet5"])
    with pytest.raises(TypeError):
        main(["layers", "lenet5", "--debug"])


def test_ctrl_c_exits_130_in_one_line(monkeypatch, capsys):
    import interp.commands.layers as layers_cmd

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(layers_cmd, "load_model", interrupted)
    assert main(["layers", "lenet5"]) == 130
    assert one_line(capsys.readouterr().err) == "cnn-internals layers: interrupted"


def test_usage_errors_are_one_line():
    proc = subprocess.run([sys.executable, "-m", "interp.cli", "rf", "lenet5", "--input-size", "0"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert "--input-size" in line and "at least 1" in line


@pytest.mark.parametrize("value", ["0", "-3", "abc"])
def test_rf_input_size_is_checked_before_loading(value, monkeypatch, capsys):
    import interp.commands.rf as rf_cmd

    monkeypatch.setattr(rf_cmd, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(SystemExit) as exc:
        main(["rf", "lenet5", "--input-size", value])
    assert exc.value.code == 2
    assert "--input-size" in one_line(capsys.readouterr().err)
    assert main(["rf", "lenet5", "--input-size", "8", "8", "8"]) == 2
    assert "H or H W" in one_line(capsys.readouterr().err)


def test_factory_that_raises_is_named(tmp_path, capsys):
    assert main(["layers", model_file(tmp_path, "broken")]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("cnn-internals layers: error: error in factory tiny_net.py:broken")
    assert line.endswith("ValueError: bad width")


def test_model_file_that_does_not_import_is_named(tmp_path, capsys):
    (tmp_path / "syntax.py").write_text("import torch\ndef make(:\n")
    assert main(["layers", f"{tmp_path / 'syntax.py'}:make"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "error in model file syntax.py (line 2): SyntaxError" in line
    (tmp_path / "missing.py").write_text("import no_such_module_here\n")
    assert main(["layers", f"{tmp_path / 'missing.py'}:make"]) == 2
    assert "missing.py (line 1): ModuleNotFoundError: No module named 'no_such_module_here'" in \
        one_line(capsys.readouterr().err)


def test_visualize_checks_the_output_folder_before_loading(tmp_path, monkeypatch, capsys):
    import interp.commands.visualize as vis_cmd

    monkeypatch.setattr(vis_cmd, "load_model_info", lambda *a, **k: pytest.fail("loaded the model first"))
    (tmp_path / "afile").write_text("x")
    data = image_folder(tmp_path / "imgs")
    assert main(["visualize", "lenet5", "--data", str(data), "--out", str(tmp_path / "afile" / "out")]) == 2
    line = one_line(capsys.readouterr().err)
    assert "cannot create output folder" in line and "afile is a file" in line
    assert main(["visualize", "lenet5", "--data", str(data), "--out", str(tmp_path / "o"), "--method", "x"]) == 2
    assert "unknown --method" in one_line(capsys.readouterr().err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_visualize_refuses_a_read_only_output_folder(tmp_path, monkeypatch, capsys):
    import interp.commands.visualize as vis_cmd

    monkeypatch.setattr(vis_cmd, "load_model_info", lambda *a, **k: pytest.fail("loaded the model first"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["visualize", "lenet5", "--data", str(tmp_path), "--out", str(locked / "out")]) == 2
    finally:
        locked.chmod(0o700)
    assert "cannot write to output folder" in one_line(capsys.readouterr().err)


def test_visualize_engine_checks_the_folder_before_mining(tmp_path):
    import numpy as np
    import torch

    import interp
    from interp.data import ArrayImages

    (tmp_path / "afile").write_text("x")
    data = ArrayImages(np.zeros((2, 8, 8), np.uint8), lambda im: torch.zeros(1, 8, 8), mode="L")
    with pytest.raises(ValueError, match="afile is a file"):
        interp.visualize(torch.nn.Conv2d(1, 1, 3), data, tmp_path / "afile" / "x", progress=False)


def test_size_is_refused_for_a_model_with_its_own_preprocess(tmp_path, capsys):
    data = image_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    assert main(["visualize", model_file(tmp_path), "--data", str(data), "--size", "64", "--out", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "--size applies only to models without their own preprocessing" in line
    assert not (out / "topk.json").exists()


def test_size_is_applied_to_a_model_without_preprocess(tmp_path, capsys):
    data = image_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    assert main(["visualize", model_file(tmp_path, "bare"), "--data", str(data), "--size", "12", "--top", "2",
                 "--channels", "0", "--out", str(out)]) == 0
    import json

    assert json.loads((out / "topk.json").read_text())["input_size"] == [12, 12]


def test_help_is_plain_text():
    assert plain_text("see ``--topk`` and :func:`interp.mine` or :class:`~interp.topk.TopK`") == \
        "see --topk and interp.mine or interp.topk.TopK"
    for verb in ("visualize", "gallery", "layers", "rf", "train", "compare"):
        proc = subprocess.run([sys.executable, "-m", "interp.cli", verb, "--help"], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        assert "``" not in proc.stdout and ":func:`" not in proc.stdout and ":mod:`" not in proc.stdout, verb

"""Reading weights files: every file that is not a checkpoint gets one clear line."""
from __future__ import annotations

import pytest
import torch

import adapters
from adapters.checkpoint import load_state_dict
from interp.cli import main


class _NotATensor:
    pass


def _junk_files(tmp_path):
    files = {}
    files["random bytes"] = tmp_path / "random.pt"
    files["random bytes"].write_bytes(bytes(range(256)) * 7)
    files["text"] = tmp_path / "notes.pth"
    files["text"].write_text("these are not weights\n")
    files["corrupt safetensors"] = tmp_path / "broken.safetensors"
    files["corrupt safetensors"].write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    files["python objects"] = tmp_path / "objects.pt"
    torch.save({"layer": _NotATensor()}, files["python objects"])
    files["not a state dict"] = tmp_path / "numbers.pt"
    torch.save({"conv.weight": torch.zeros(1), "epoch": 3}, files["not a state dict"])
    return files


@pytest.mark.parametrize("kind", ["random bytes", "text", "corrupt safetensors", "python objects", "not a state dict"])
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, kind):
    path = _junk_files(tmp_path)[kind]
    with pytest.raises(ValueError) as err:
        load_state_dict(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg


def test_python_objects_are_named_as_such(tmp_path):
    with pytest.raises(ValueError, match="Python objects besides tensors"):
        load_state_dict(_junk_files(tmp_path)["python objects"])


def test_cli_junk_weights_one_line_exit_2(tmp_path, capsys):
    junk = _junk_files(tmp_path)["random bytes"]
    assert main(["layers", "lenet5", "--weights", str(junk)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a PyTorch checkpoint" in err


def test_a_real_state_dict_still_loads(tmp_path):
    from safetensors.torch import save_file

    state = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save({"model": state, "epoch": 1}, tmp_path / "ckpt.pt")
    save_file(state, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_state_dict(tmp_path / "ckpt.pt")["w"], state["w"])
    assert torch.equal(load_state_dict(tmp_path / "w.safetensors")["w"], state["w"])


@pytest.mark.parametrize("name", ["alexnet", "resnet18", "mobilenet"])
def test_random_weights_keep_the_initialisation(name):
    """``weights="random"`` reads no file: the same seed gives the same model as no weights at all."""
    torch.manual_seed(3)
    random_model, _ = adapters.load(name, weights="random")
    torch.manual_seed(3)
    default_model, _ = adapters.load(name)
    for (key, a), b in zip(random_model.state_dict().items(), default_model.state_dict().values()):
        assert torch.equal(a, b), key

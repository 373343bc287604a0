"""``pretrained:mobilenet_v1_100_tflite``: the float twin of the uint8 TFLite MobileNet v1 1.0/224.

Needs only the pure-Python ``tflite`` package (in the ``test`` extra), never the
TFLite runtime: the twin's first layers are checked against a numpy forward
written directly from the dequantized file tensors, and its predictions against
the runtime's own, recorded in ``tflite_mobilenet_v1_predictions.json`` by
``examples/check_tflite_import.py --per-class 2 --fixture ...``. The real files
in shared/data/weights are required: missing ones fail, never skip.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import adapters
from adapters import pretrained

from conftest import DATA_ROOT

FILES = [DATA_ROOT / "weights" / rel for rel in pretrained.TFLITE_MOBILENET_V1_FILES]
# The fixture stayed in tests/ when this file moved to tests/adapters/.
FIXTURE = Path(__file__).resolve().parents[1] / "tflite_mobilenet_v1_predictions.json"
VAL = DATA_ROOT / "imagenette2-160" / "val"


@pytest.fixture(scope="module")
def twin():
    for f in FILES + [VAL]:
        if not f.exists():
            pytest.fail(f"{f} not found: the TFLite twin tests need shared/data (see MANIFEST.md)", pytrace=False)
    return adapters.load("pretrained:mobilenet_v1_100_tflite")


def _numpy_reference(u8: np.ndarray, n_ops: int) -> np.ndarray:
    """The first ``n_ops`` operators of the backbone file in numpy, float (HWC), straight from the flatbuffer."""
    import tflite

    buf = FILES[0].read_bytes()
    m = tflite.Model.GetRootAsModel(buf, 0)
    g = m.Subgraphs(0)

    def const(i):
        t = g.Tensors(int(i))
        q = t.Quantization()
        raw = m.Buffers(t.Buffer()).DataAsNumpy().tobytes()
        dtype = np.int32 if t.Type() == tflite.TensorType.INT32 else np.uint8
        arr = np.frombuffer(raw, dtype=dtype).reshape(t.ShapeAsNumpy()).astype(np.float64)
        return q.ScaleAsNumpy()[0] * (arr - q.ZeroPointAsNumpy()[0])

    x = (u8.astype(np.float64) - 128) / 128
    for k in range(n_ops):
        op = g.Operators(k)
        w, b = const(op.InputsAsNumpy()[1]), const(op.InputsAsNumpy()[2])
        stride = 2 if x.shape[0] // g.Tensors(int(op.OutputsAsNumpy()[0])).ShapeAsNumpy()[1] == 2 else 1
        # TF "SAME" for 3x3 / 1x1: output ceil(n / s), padding before = total // 2.
        kh = w.shape[1]
        n = x.shape[0]
        out = -(-n // stride)
        total = max((out - 1) * stride + kh - n, 0)
        xp = np.pad(x, ((total // 2, total - total // 2), (total // 2, total - total // 2), (0, 0)))
        patches = np.stack([xp[i : i + stride * out : stride, j : j + stride * out : stride]
                            for i in range(kh) for j in range(kh)], axis=2)  # out x out x k*k x C
        code = m.OperatorCodes(op.OpcodeIndex())
        if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) == tflite.BuiltinOperator.DEPTHWISE_CONV_2D:
            y = np.einsum("hwkc,kc->hwc", patches, w[0].reshape(kh * kh, -1))
        else:
            y = np.einsum("hwkc,okc->hwo", patches, w.reshape(w.shape[0], kh * kh, -1))
        x = np.clip(y + b, 0, 6)  # fused ReLU6
    return x


def test_twin_structure_and_first_layers_match_a_numpy_forward(twin):
    model, preprocess = twin
    assert isinstance(model, pretrained.TFLiteMobileNetV1) and model.width_mult == 1.0
    assert model.fc.weight.shape == (1001, 1024) and model.tf_padded == (1, 4, 8, 12, 24)
    assert isinstance(model.relu5, torch.nn.ReLU6)
    from PIL import Image

    f = sorted((VAL / "n03888257").iterdir())[0]
    x = preprocess(Image.open(f).convert("RGB"))
    assert x.shape == (3, 224, 224) and float(x.min()) >= -1 and float(x.max()) <= 127 / 128
    u8 = np.round(x.permute(1, 2, 0).numpy() * 128 + 128)
    n = 4  # conv1 (s2), conv2 dw, conv3 pw, conv4 dw (s2)
    ref = _numpy_reference(u8, n)
    y = x[None]
    with torch.no_grad():
        for i in range(1, n + 1):
            if i in model.tf_padded:
                y = getattr(model, f"pad{i}")(y)
            y = getattr(model, f"relu{i}")(getattr(model, f"bn{i}")(getattr(model, f"conv{i}")(y)))
    ours = y[0].permute(1, 2, 0).numpy()
    assert ours.shape == ref.shape == (56, 56, 64)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_twin_predictions_match_the_recorded_tflite_runtime(twin):
    from PIL import Image

    model, preprocess = twin
    recorded = json.loads(FIXTURE.read_text())["images"]
    assert len(recorded) == 20
    x = torch.stack([preprocess(Image.open(VAL / r["file"]).convert("RGB")) for r in recorded])
    with torch.no_grad():
        logits = model(x)
    top1 = logits.argmax(1).tolist()
    agree = sum(a == r["tflite_top1"] for a, r in zip(top1, recorded))
    assert agree >= 19, agree  # measured: 20 of 20
    # The runtime's top-1 is always in the twin's top-5.
    top5 = logits.topk(5, 1).indices.tolist()
    assert all(r["tflite_top1"] in t for r, t in zip(recorded, top5))
    # Twin logits are on the runtime's scale (its max logit, dequantized, within a few uint8 steps of 0.166).
    diff = [abs(float(logits[k].max()) - r["tflite_logit_max"]) for k, r in enumerate(recorded)]
    assert max(diff) < 1.5, diff
    # Zero-shot over the 10 Imagenette classes (index = ImageNet class + 1): 19 of 20 measured.
    cols = [c + 1 for c in pretrained.IMAGENETTE_IMAGENET_CLASSES]
    hits = sum(int(logits[k, cols].argmax()) == r["label"] for k, r in enumerate(recorded))
    assert hits >= 18, hits


def test_missing_tflite_file_is_one_clear_error(tmp_path):
    from adapters.pretrained import tflite_mobilenet_v1

    missing = tmp_path / "weights" / "tflite" / "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite"
    with pytest.raises(FileNotFoundError) as err:
        tflite_mobilenet_v1((missing, missing.with_name("head.tflite")))
    msg = str(err.value)
    assert "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite" in msg and "\n" not in msg
    assert str(tmp_path / "weights" / "tflite") in msg


def test_shipped_tflite_files_are_the_data_folders_and_load_without_it(data_root, tmp_path, monkeypatch):
    """The package's copies are byte-for-byte the MANIFEST's files; the twin loads with no data folder."""
    import hashlib

    from adapters.pretrained import SHIPPED_WEIGHTS, TFLITE_MOBILENET_V1_FILES, tflite_mobilenet_v1

    for rel in TFLITE_MOBILENET_V1_FILES:
        shipped = (SHIPPED_WEIGHTS / Path(rel).name).read_bytes()
        assert hashlib.sha256(shipped).digest() == hashlib.sha256((data_root / "weights" / rel).read_bytes()).digest()
    monkeypatch.setenv("CNN_INTERNALS_WEIGHTS", str(tmp_path / "nothing-here"))
    model, _ = adapters.load("pretrained:mobilenet_v1_100_tflite")
    reference = tflite_mobilenet_v1(tuple(data_root / "weights" / rel for rel in TFLITE_MOBILENET_V1_FILES))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_fine_tuned_state_dict_sets_the_head_size(tmp_path):
    """A state dict written by `finetune` (10-way fc) loads back without the .tflite files."""
    from safetensors.torch import save_file

    from adapters.pretrained import TFLiteMobileNetV1

    torch.manual_seed(0)
    tuned = TFLiteMobileNetV1(num_classes=10).eval()
    path = tmp_path / "tuned.safetensors"
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, str(path))
    model, _ = adapters.load("pretrained:mobilenet_v1_100_tflite", weights=str(path))
    assert model.fc.out_features == 10
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), tuned(x))

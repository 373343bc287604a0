"""The uint8 TF-slim MobileNet v1 1.0/224 TFLite pair, dequantized into a float :class:`TFLiteMobileNetV1`.

Two files, quantization-aware trained: ``mobilenet_v1_1.0_224_quant_embedding_extractor.tflite``
(up to the pooled 1024-d embedding) and ``mobilenet_quant_v1_224_head_layers.tflite``
(the 1x1 logits conv), parsed with the pure-Python ``tflite`` package and
dequantized (``scale * (q - zero_point)``, per-tensor in these files; int32
biases with scale = input scale x weight scale). :class:`TFLiteMobileNetV1`
has our module names, ReLU6 and TF "SAME" padding like the Keras twin,
BatchNorm already folded (identity-plus-bias ``bn<i>``) and a 1001-way ``fc``
(index 0 "background", ImageNet class = index - 1). Preprocess: resize to
224x224 uint8, ``(x - 128) / 128``.

The package ships both files (Apache-2.0, ``adapters/weights/NOTICE-mobilenet_v1.md``),
byte-for-byte the ones under ``<weights_dir>/tflite``, so the twin loads with
no data folder at all.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import torch
from torchvision.transforms import v2 as T

from . import SHIPPED_WEIGHTS, find_weights_file, set_identity_bn
from .keras import KerasMobileNetV1

__all__ = ["TFLITE_MOBILENET_V1_FILES", "TFLiteMobileNetV1", "tflite_graph", "tflite_dequantize",
           "tflite_mobilenet_v1", "tflite_preprocess"]

#: (backbone, head), relative to the weights folder; the package ships both in :data:`SHIPPED_WEIGHTS`.
TFLITE_MOBILENET_V1_FILES = (
    "tflite/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite",
    "tflite/mobilenet_quant_v1_224_head_layers.tflite",
)


class TFLiteMobileNetV1(KerasMobileNetV1):
    """:class:`MobileNetV1` computing what the TF-slim MobileNet v1 TFLite graph computes, in float.

    The same parameter-free differences from :class:`MobileNetV1` as
    :class:`KerasMobileNetV1` (ReLU6, TF "SAME" padding on the stride-2
    convolutions as ``pad<i>`` modules); BatchNorm is folded into the
    convolutions in the file, so every ``bn<i>`` is an exact
    identity-plus-bias (mean 0, variance 1, gamma ``sqrt(1 + eps)``, beta =
    the folded bias). ``fc`` is the file's 1x1 ``Conv2d_1c_1x1`` logits
    layer: 1001 outputs, index 0 "background", ImageNet class = index - 1.
    """

    def __init__(self, num_classes: int = 1001, width_mult: float = 1.0) -> None:
        super().__init__(num_classes=num_classes, width_mult=width_mult)


def _import_tflite() -> ModuleType:
    """The ``tflite`` flatbuffer schema package (an optional extra), or one line on how to install it."""
    try:
        import tflite
    except ImportError as exc:
        raise ImportError(
            "reading TFLite files needs the 'tflite' package: pip install tflite==2.18.0 "
            "(or pip install -e '.[tflite]')"
        ) from exc
    return tflite


def _tensor(tflite: ModuleType, model: Any, g: Any, i: int) -> dict:
    """One tensor of subgraph ``g``: name, shape, constant data (or None) and quantization."""
    dtypes = {tflite.TensorType.UINT8: np.uint8, tflite.TensorType.INT32: np.int32, tflite.TensorType.INT8: np.int8}
    t = g.Tensors(int(i))
    q = t.Quantization()
    data = model.Buffers(t.Buffer()).DataAsNumpy() if t.Buffer() < model.BuffersLength() else 0
    arr = None
    if not isinstance(data, int) and data.size and t.Type() in dtypes:
        arr = np.frombuffer(data.tobytes(), dtype=dtypes[t.Type()]).reshape(t.ShapeAsNumpy())
    return {
        "name": t.Name().decode(),
        "shape": tuple(int(s) for s in t.ShapeAsNumpy()),
        "q": arr,
        "scale": q.ScaleAsNumpy() if q is not None and q.ScaleLength() else None,
        "zero_point": q.ZeroPointAsNumpy() if q is not None and q.ZeroPointLength() else None,
        "axis": q.QuantizedDimension() if q is not None else 0,
    }


def tflite_graph(file: Path) -> list[dict]:
    """The operators of a one-subgraph TFLite file: ``{"op", "inputs", "outputs", "options"}`` each.

    Tensors are ``{"name", "shape", "q" (uint8/int32 array or None), "scale", "zero_point"}``
    (scale and zero point as float / int arrays, one entry for per-tensor quantization).
    """
    tflite = _import_tflite()
    model = tflite.Model.GetRootAsModel(file.read_bytes(), 0)
    if model.SubgraphsLength() != 1:
        raise ValueError(f"{file}: expected one subgraph, found {model.SubgraphsLength()}")
    g = model.Subgraphs(0)
    op_names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
    ops = []
    for k in range(g.OperatorsLength()):
        op = g.Operators(k)
        oc = model.OperatorCodes(op.OpcodeIndex())
        name = op_names.get(max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode()), "?")
        options = None
        table = op.BuiltinOptions()
        cls = {"CONV_2D": tflite.Conv2DOptions, "DEPTHWISE_CONV_2D": tflite.DepthwiseConv2DOptions,
               "AVERAGE_POOL_2D": tflite.Pool2DOptions}.get(name)
        if cls is not None and table is not None:
            options = cls()
            options.Init(table.Bytes, table.Pos)
        ops.append({"op": name, "inputs": [_tensor(tflite, model, g, i) for i in op.InputsAsNumpy()],
                    "outputs": [_tensor(tflite, model, g, i) for i in op.OutputsAsNumpy()], "options": options})
    return ops


def tflite_dequantize(t: dict) -> np.ndarray:
    """``scale * (q - zero_point)`` of a constant TFLite tensor, per tensor or per channel (``axis``)."""
    q = t["q"].astype(np.float64)
    scale, zp = np.asarray(t["scale"], np.float64), np.asarray(t["zero_point"], np.float64)
    if scale.size > 1:  # per-channel along the quantized dimension
        shape = [1] * q.ndim
        shape[t["axis"]] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (scale * (q - zp)).astype(np.float32)


@torch.no_grad()
def _copy_convs(model: TFLiteMobileNetV1, convs: list[dict], file: Path) -> None:
    """Check each backbone operator against ``conv<i>`` and copy its dequantized kernel and folded bias."""
    tflite = _import_tflite()
    for i, op in enumerate(convs, 1):
        conv, bn = getattr(model, f"conv{i}"), getattr(model, f"bn{i}")
        o = op["options"]
        depthwise = op["op"] == "DEPTHWISE_CONV_2D"
        if (depthwise != (conv.groups > 1) or o.StrideW() != conv.stride[1] or o.StrideH() != conv.stride[0]
                or o.Padding() != tflite.Padding.SAME or o.FusedActivationFunction() != tflite.ActivationFunctionType.RELU6):
            raise ValueError(f"{file}: operator {i} ({op['op']}, stride {o.StrideH()}) does not fit conv{i} "
                             f"(groups {conv.groups}, stride {conv.stride}) with SAME padding and ReLU6")
        w = torch.from_numpy(tflite_dequantize(op["inputs"][1]))
        # TFLite kernels are OHWI, depthwise [1, 3, 3, C]; torch wants OIHW / [C, 1, 3, 3].
        w = w.permute(3, 0, 1, 2) if depthwise else w.permute(0, 3, 1, 2)
        b = torch.from_numpy(tflite_dequantize(op["inputs"][2]))
        if w.shape != conv.weight.shape or b.shape != bn.bias.shape:
            raise ValueError(f"{file}: conv{i} weight {tuple(w.shape)}, the adapter needs {tuple(conv.weight.shape)}")
        conv.weight.copy_(w)
        set_identity_bn(bn, b)


def tflite_mobilenet_v1(paths: tuple[str | os.PathLike, str | os.PathLike] | None = None) -> TFLiteMobileNetV1:
    """Import the uint8 TF-slim MobileNet v1 1.0/224 (backbone + head files) into a float :class:`TFLiteMobileNetV1`.

    Weights ``scale * (q - zero_point)`` (uint8), biases ``scale * q`` (int32,
    scale = input scale x weight scale, as stored); conv kernels OHWI -> OIHW,
    depthwise ``[1, 3, 3, C]`` -> ``[C, 1, 3, 3]``. Checks every operator's
    type, stride, "SAME" padding and fused ReLU6 against the adapter.

    Parameters
    ----------
    paths:
        ``(backbone, head)``; default the two files shipped in ``adapters/weights``
        (byte-for-byte the ones under ``<weights_dir>/tflite``).

    Raises
    ------
    FileNotFoundError
        A file is missing (one line naming it and the folder).
    ValueError
        The graph is not MobileNet v1 1.0 as expected.
    """
    _import_tflite()  # fail with the install hint before looking at any file
    if paths is None:
        paths = tuple(SHIPPED_WEIGHTS / Path(rel).name for rel in TFLITE_MOBILENET_V1_FILES)
    files = [find_weights_file(p, rel) for p, rel in zip(paths, TFLITE_MOBILENET_V1_FILES)]
    backbone, head = tflite_graph(files[0]), tflite_graph(files[1])
    convs = [op for op in backbone if op["op"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    model = TFLiteMobileNetV1()
    if len(convs) != model.num_convs or backbone[-1]["op"] != "AVERAGE_POOL_2D":
        raise ValueError(f"{files[0]}: {len(convs)} convolutions then {backbone[-1]['op']}; "
                         f"MobileNet v1 has {model.num_convs} then AVERAGE_POOL_2D")
    logits = [op for op in head if op["op"] == "CONV_2D"]
    if len(logits) != 1:
        raise ValueError(f"{files[1]}: expected one CONV_2D logits layer, found {len(logits)}")
    _copy_convs(model, convs, files[0])
    w = torch.from_numpy(tflite_dequantize(logits[0]["inputs"][1]))
    b = torch.from_numpy(tflite_dequantize(logits[0]["inputs"][2]))
    if w.shape[1:3] != (1, 1) or w.shape[0] * w.shape[3] != model.fc.weight.numel():
        raise ValueError(f"{files[1]}: logits kernel {tuple(w.shape)}, expected (1001, 1, 1, 1024)")
    with torch.no_grad():
        model.fc.weight.copy_(w[:, 0, 0, :])
        model.fc.bias.copy_(b)
    return model.eval()


def tflite_preprocess(size: int = 224) -> Callable:
    """Resize to ``size`` x ``size`` (bilinear, uint8 like the TFLite input), then ``(x - 128) / 128``.

    The first three transforms give the uint8 ``3 x size x size`` image the
    TFLite file itself takes (input scale 1/128, zero point 128).
    """
    return T.Compose([
        T.ToImage(),
        T.Resize(size, antialias=True),
        T.CenterCrop(size),
        T.ToDtype(torch.float32, scale=False),
        T.Normalize([128.0, 128.0, 128.0], [128.0, 128.0, 128.0]),
    ])

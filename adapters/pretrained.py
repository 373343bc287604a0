"""Float PyTorch twins of the real pretrained ImageNet weights shipped in ``shared/data/weights``.

Three importers, each giving a model the toolkit opens like any other
(``adapters.load("pretrained:...")``):

``pretrained:mobilenet_v1_025_keras``
    Keras Applications' MobileNet v1, alpha 0.25, 224 px, *no top*
    (``weights/keras/mobilenet_2_5_224_tf_no_top.h5``), read with h5py into our
    :class:`adapters.mobilenet.MobileNetV1` at ``width_mult=0.25``: real
    BatchNorm (gamma, beta, moving mean and variance, Keras epsilon 1e-3),
    kernels HWIO -> OIHW, depthwise ``[3, 3, C, 1]`` -> ``[C, 1, 3, 3]``. Two
    things differ from our from-scratch adapter and are reproduced by
    :class:`KerasMobileNetV1`, a subclass that keeps every module name
    (``conv1..conv27``, ``bn1..27``, ``relu1..27``): Keras uses ReLU6, and TF
    "SAME" padding, which on a stride-2 3x3 convolution over an even-sized map
    pads 0 pixels top/left and 1 bottom/right (torch's ``padding=1`` would pad
    1 on every side and shift the sampling grid by one pixel). The file has no
    classifier, so ``fc`` is a freshly initialised ``num_classes``-way layer:
    train it with ``cnn-internals finetune`` (head only) or use the features.
    Preprocess: resize to 224x224, ``x / 127.5 - 1`` (Keras' ``preprocess_input``).

``pretrained:mobilenet_v2_int8``
    torchvision's int8-quantized MobileNetV2 as TorchScript
    (``weights/torchscript/mobilenetv2_quantized.pt``), dequantized into
    ``torchvision.models.mobilenet_v2``: each of the 53 quantized convolutions
    (BatchNorm already folded in) is unpacked with
    ``torch.ops.quantized.conv2d_unpack`` and its float weight put into the
    matching ``Conv2d``; the folded bias goes into the BatchNorm that follows,
    made an exact identity-plus-bias (mean 0, variance 1, gamma
    ``sqrt(1 + eps)``, beta = bias), so the module tree stays torchvision's.
    The quantizable MobileNetV2 replaced ReLU6 by ReLU before quantization, so
    the twin uses ReLU too. The classifier comes from
    ``torch.ops.quantized.linear_unpack``. 1000 ImageNet classes; preprocess:
    torchvision's for these weights (resize 256, centre crop 224, ImageNet
    mean/std).

    Agreement with the int8 file (Imagenette val, first 40 / 100 images per
    class, the int8 model run under QNNPACK): top-1 91.3 % of 400 (91.6 % of
    1,000); 95.8 % (95.5 %) within one step (0.153) of the int8 logit maximum;
    99.3 % (99.3 %) when both are restricted to the 10 Imagenette classes; the
    twin's top-5 holds the int8 top-1 for 99.8 % (99.9 %); top-5 overlap 4.49
    (4.44) of 5. ImageNet top-1 on the same images: twin 64.8 % / int8 64.8 %
    (63.3 % / 64.3 %). The gap to 100 % is the int8 model's own rounding, not
    an import error: given the same quantized input, every int8 convolution
    equals the twin's output rounded to its scale except for <= 0.7 % of the
    values, which differ by exactly one step (QNNPACK's float requantization
    at rounding ties); clamping the twin to the int8 ranges (input, every conv
    and residual add) changes no prediction (<= 0.01 % of values are ever
    clipped); and even a float simulation that quantizes every activation and
    the logits to the file's scales and zero points agrees on only 92.3 % of
    the 400, because those one-step differences grow through the 17 blocks
    (after 3 blocks 60 % of the values differ by a step or more).

``pretrained:mobilenet_v1_100_tflite``
    TF-slim MobileNet v1 1.0/224, uint8 quantization-aware trained, as two
    TFLite files (``weights/tflite/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite``
    up to the pooled 1024-d embedding, ``weights/tflite/mobilenet_quant_v1_224_head_layers.tflite``
    the 1x1 logits conv), parsed with the pure-Python ``tflite`` package and
    dequantized (``scale * (q - zero_point)``, per-tensor in these files; int32
    biases with scale = input scale x weight scale) into
    :class:`TFLiteMobileNetV1`: our module names, ReLU6, TF "SAME" padding
    like the Keras twin, BatchNorm already folded (identity-plus-bias ``bn<i>``),
    ``fc`` 1001-way (index 0 "background", ImageNet class = index - 1).
    Preprocess: resize to 224x224 uint8, ``(x - 128) / 128``.
    Agreement with the file run by its own runtime (ai-edge-litert 2.3.0,
    both parts chained, same uint8 input; ``examples/check_tflite_import.py``,
    Imagenette val, first 40 images per class): top-1 385 / 400 = 96.2 %
    (1001-way); at the 15 differences the twin's class is 0 (a tie), 1 or
    2 uint8 logit steps (0.166) below the runtime's maximum (5, 9 and 1
    images); 100 % when both are restricted to the 10 Imagenette classes.
    ImageNet top-1 on the same images: twin 249 / 400 = 62.3 %, TFLite
    251 / 400 = 62.7 %; zero-shot 10-way 98.2 % for both.

The weights folder is ``$CNN_INTERNALS_WEIGHTS``, else ``weights/`` under the
data root (``$CNN_INTERNALS_DATA`` or ``../shared/data``).
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .mobilenet import MobileNetV1

__all__ = [
    "KerasMobileNetV1",
    "keras_mobilenet_v1",
    "mobilenet_v2_from_torchscript",
    "load_mobilenet_v1_025_keras",
    "load_mobilenet_v2_int8",
    "weights_dir",
    "KERAS_MOBILENET_FILE",
    "TORCHSCRIPT_MOBILENET_V2_FILE",
    "KERAS_BN_EPS",
    "IMAGENETTE_IMAGENET_CLASSES",
    "TorchScriptReference",
    "TFLiteMobileNetV1",
    "tflite_mobilenet_v1",
    "tflite_dequantize",
    "tflite_preprocess",
    "load_mobilenet_v1_100_tflite",
    "TFLITE_MOBILENET_V1_FILES",
]

KERAS_MOBILENET_FILE = "keras/mobilenet_2_5_224_tf_no_top.h5"
TORCHSCRIPT_MOBILENET_V2_FILE = "torchscript/mobilenetv2_quantized.pt"
# keras.layers.BatchNormalization's default epsilon (torch's is 1e-5).
KERAS_BN_EPS = 1e-3
# ImageNet-1k class index of each Imagenette class, in sorted-wnid (ImageFolder) order.
IMAGENETTE_IMAGENET_CLASSES: tuple[int, ...] = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)


def weights_dir() -> Path:
    """Folder of the shipped pretrained files: ``$CNN_INTERNALS_WEIGHTS`` or ``<data root>/weights``."""
    if os.environ.get("CNN_INTERNALS_WEIGHTS"):
        return Path(os.environ["CNN_INTERNALS_WEIGHTS"])
    if os.environ.get("CNN_INTERNALS_DATA"):
        return Path(os.environ["CNN_INTERNALS_DATA"]) / "weights"
    # ../shared/data next to the working copy, then relative to the current directory.
    beside_repo = Path(__file__).resolve().parents[2] / "shared" / "data" / "weights"
    if beside_repo.is_dir():
        return beside_repo
    return Path("../shared/data/weights").resolve()


def _weights_file(path: str | os.PathLike | None, default_rel: str) -> Path:
    file = Path(path) if path is not None else weights_dir() / default_rel
    if not file.is_file():
        raise FileNotFoundError(
            f"pretrained weights file not found: {file}; put {Path(default_rel).name} in {file.parent}/ "
            "(see shared/data/MANIFEST.md), set CNN_INTERNALS_WEIGHTS to its weights/ folder, or pass weights=PATH"
        )
    return file


# -- Keras MobileNet v1 -------------------------------------------------------


class KerasMobileNetV1(MobileNetV1):
    """:class:`MobileNetV1` computing exactly what Keras' MobileNet computes.

    Same parameters and module names; the differences are parameter-free:
    ``relu1..27`` are ``nn.ReLU6``, every stride-2 convolution has
    ``padding=0`` and is preceded by ``pad<i>``, an ``nn.ZeroPad2d((0, 1, 0, 1))``
    (TF "SAME" on an even-sized input), and BatchNorm epsilon is 1e-3.

    "SAME" padding depends on the input size: the fixed right/bottom pixel is
    exact when every stride-2 input is even, i.e. for sides divisible by 32
    (224 as used by the preprocess); a warning is not given for other sizes
    because the network still runs, just with the grid shifted by one pixel.

    Parameters
    ----------
    num_classes:
        Size of the (untrained) output layer ``fc``.
    width_mult:
        Keras' alpha (0.25 for the shipped file).
    """

    def __init__(self, num_classes: int = 10, width_mult: float = 0.25) -> None:
        super().__init__(num_classes=num_classes, width_mult=width_mult)
        self.tf_padded: tuple[int, ...] = tuple(
            i for i in range(1, self.num_convs + 1) if getattr(self, f"conv{i}").stride != (1, 1)
        )
        for i in range(1, self.num_convs + 1):
            setattr(self, f"relu{i}", nn.ReLU6())
            getattr(self, f"bn{i}").eps = KERAS_BN_EPS
        for i in self.tf_padded:
            getattr(self, f"conv{i}").padding = (0, 0)
            self.add_module(f"pad{i}", nn.ZeroPad2d((0, 1, 0, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``fc`` for a batch ``Bx3xHxW`` (224x224 from the preprocess)."""
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last ReLU6 map (Keras' ``conv_pw_13_relu``), ``B x 256 x 7 x 7`` at 224 px, alpha 0.25."""
        for i in range(1, self.num_convs + 1):
            if i in self.tf_padded:
                x = getattr(self, f"pad{i}")(x)
            x = getattr(self, f"relu{i}")(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return x


def _keras_layer_arrays(h5, layer: str) -> dict[str, np.ndarray]:
    """``{"kernel": array, ...}`` of one Keras layer group (weight names without scope and ``:0``)."""
    if layer not in h5:
        raise ValueError(f"Keras file has no layer {layer!r}; is it MobileNet v1 (conv1, conv_dw_1 ... conv_pw_13)?")
    group = h5[layer]
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
    out = {}
    for n in names:
        out[n.split("/")[-1].split(":")[0]] = np.asarray(group[n][()], dtype=np.float32)
    return out


def keras_mobilenet_v1(path: str | os.PathLike | None = None, num_classes: int = 10) -> KerasMobileNetV1:
    """Import Keras' MobileNet v1 no-top ``.h5`` into a :class:`KerasMobileNetV1` (eval mode).

    Parameters
    ----------
    path:
        The ``.h5`` file; default ``<weights_dir>/keras/mobilenet_2_5_224_tf_no_top.h5``.
        alpha is read from the file (``conv1`` has ``32 * alpha`` filters).
    num_classes:
        Size of the new, untrained ``fc``.

    Raises
    ------
    FileNotFoundError
        If the file is missing (the message says where to put it).
    ValueError
        If a layer is missing or a shape does not fit.
    """
    import h5py

    file = _weights_file(path, KERAS_MOBILENET_FILE)
    with h5py.File(file, "r") as h5:
        root = h5["model_weights"] if "model_weights" in h5 else h5  # a full-model file nests the weights
        conv1 = _keras_layer_arrays(root, "conv1")["kernel"]
        alpha = conv1.shape[3] / 32
        model = KerasMobileNetV1(num_classes=num_classes, width_mult=alpha)
        # (torch conv index, Keras conv layer, kernel key, HWIO -> torch permutation)
        plan = [(1, "conv1", "kernel", (3, 2, 0, 1))]
        for j in range(1, 14):
            plan.append((2 * j, f"conv_dw_{j}", "depthwise_kernel", (2, 3, 0, 1)))  # [3,3,C,1] -> [C,1,3,3]
            plan.append((2 * j + 1, f"conv_pw_{j}", "kernel", (3, 2, 0, 1)))
        state: dict[str, torch.Tensor] = {}
        for i, layer, key, perm in plan:
            arrays = _keras_layer_arrays(root, layer)
            if key not in arrays:
                raise ValueError(f"Keras layer {layer} has no {key} (has {', '.join(arrays)})")
            state[f"conv{i}.weight"] = torch.from_numpy(arrays[key]).permute(*perm).contiguous()
            bn = _keras_layer_arrays(root, f"{layer}_bn")
            state[f"bn{i}.weight"] = torch.from_numpy(bn["gamma"])
            state[f"bn{i}.bias"] = torch.from_numpy(bn["beta"])
            state[f"bn{i}.running_mean"] = torch.from_numpy(bn["moving_mean"])
            state[f"bn{i}.running_var"] = torch.from_numpy(bn["moving_variance"])
    own = model.state_dict()
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(f"{file}: {key} has shape {tuple(value.shape)}, the alpha={alpha} model needs {tuple(own[key].shape)}")
    # fc and the BatchNorm step counters are not in the file: keep the model's own.
    missing, unexpected = model.load_state_dict(state, strict=False)
    left = [k for k in missing if not (k.startswith("fc.") or k.endswith("num_batches_tracked"))]
    if unexpected or left:
        raise ValueError(f"{file}: the import left {', '.join(left + list(unexpected))} unset; is this MobileNet v1?")
    return model.eval()


def keras_preprocess(size: int = 224) -> Callable:
    """Resize to ``size`` x ``size`` (bilinear), then ``x / 127.5 - 1`` like Keras' ``preprocess_input``."""
    from torchvision.transforms import v2 as T

    return T.Compose([
        T.ToImage(),
        # Resize the short side, then centre-crop: equal to a plain resize for square images.
        T.Resize(size, antialias=True),
        T.CenterCrop(size),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),  # (x/255 - 0.5)/0.5 = x/127.5 - 1
    ])


def _twin_from_state(weights: str | os.PathLike, build: Callable[[int], nn.Module], default_classes: int,
                     name: str) -> nn.Module:
    """A MobileNet v1 twin from a state-dict file, its ``fc`` as wide as the file's (e.g. 10 after fine-tuning)."""
    from .checkpoint import load_into, load_state_dict

    state = load_state_dict(weights)
    model = build(int(state["fc.weight"].shape[0]) if "fc.weight" in state else default_classes)
    load_into(model, weights, name, state)
    return model.eval()


def load_mobilenet_v1_025_keras(
    weights: str | os.PathLike | None = None, num_classes: int = 10, **kwargs
) -> tuple[nn.Module, Callable]:
    """``pretrained:mobilenet_v1_025_keras``: the Keras ImageNet backbone (+ untrained or fine-tuned head).

    Parameters
    ----------
    weights:
        ``None`` (the shipped ``.h5``), another Keras ``.h5``, or a ``.pt`` /
        ``.safetensors`` state dict of this twin (e.g. written by
        ``cnn-internals finetune``: backbone plus trained ``fc``).
    num_classes:
        Size of ``fc``.
    """
    if kwargs:
        raise ValueError(f"pretrained:mobilenet_v1_025_keras takes no options {', '.join(kwargs)}")
    if weights is not None and not str(weights).endswith((".h5", ".hdf5")):
        model = _twin_from_state(weights, lambda n: keras_mobilenet_v1(None, num_classes=n), num_classes,
                                 "pretrained:mobilenet_v1_025_keras")
        return model, keras_preprocess()
    return keras_mobilenet_v1(weights, num_classes=num_classes), keras_preprocess()


# -- TorchScript int8 MobileNetV2 ---------------------------------------------


def _conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Every Conv2d of ``model`` with the BatchNorm2d that follows it in module order."""
    pairs, pending = [], None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if pending is not None:
                raise ValueError("a Conv2d without a following BatchNorm2d")
            pending = m
        elif isinstance(m, nn.BatchNorm2d) and pending is not None:
            pairs.append((pending, m))
            pending = None
    return pairs


def mobilenet_v2_from_torchscript(path: str | os.PathLike | None = None) -> nn.Module:
    """Dequantize torchvision's TorchScript int8 MobileNetV2 into ``torchvision.models.mobilenet_v2`` (eval mode).

    See the module docstring for the mapping. Raises ``ValueError`` if the file
    is not that network (number, shapes, strides or groups of the convolutions).
    """
    import torchvision

    file = _weights_file(path, TORCHSCRIPT_MOBILENET_V2_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized-op deprecation warnings of torch.jit
        ts = torch.jit.load(str(file), map_location="cpu")
        qconvs = [m for _, m in ts.named_modules()
                  if getattr(m, "original_name", "") in ("Conv2d", "ConvReLU2d") and hasattr(m, "_packed_params")]
        qlinear = [m for _, m in ts.named_modules() if getattr(m, "original_name", "") == "Linear"]
        model = torchvision.models.mobilenet_v2(weights=None, num_classes=1000)
        pairs = _conv_bn_pairs(model)
        if len(qconvs) != len(pairs) or len(qlinear) != 1:
            raise ValueError(f"{file} has {len(qconvs)} quantized convs and {len(qlinear)} linear layers; "
                             f"torchvision mobilenet_v2 needs {len(pairs)} and 1")
        with torch.no_grad():
            for k, (q, (conv, bn)) in enumerate(zip(qconvs, pairs)):
                packed = q._packed_params
                w, b = torch.ops.quantized.conv2d_unpack(packed)
                stride = tuple(torch.ops.quantized.conv2d_stride(packed))
                groups = int(torch.ops.quantized.conv2d_groups(packed))
                if w.shape != conv.weight.shape or stride != conv.stride or groups != conv.groups:
                    raise ValueError(f"{file}: quantized conv {k} is {tuple(w.shape)}, stride {stride}, groups {groups}; "
                                     f"mobilenet_v2 expects {tuple(conv.weight.shape)}, {conv.stride}, {conv.groups}")
                conv.weight.copy_(w.dequantize())
                # Identity BatchNorm plus the folded bias: (x - 0) / sqrt(1 + eps) * sqrt(1 + eps) + b.
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0)
                bn.weight.fill_(math.sqrt(1.0 + bn.eps))
                bn.bias.copy_(b if b is not None else torch.zeros_like(bn.bias))
            w, b = torch.ops.quantized.linear_unpack(qlinear[0]._packed_params._packed_params)
            fc = model.classifier[1]
            if w.shape != fc.weight.shape:
                raise ValueError(f"{file}: classifier is {tuple(w.shape)}, expected {tuple(fc.weight.shape)}")
            fc.weight.copy_(w.dequantize())
            fc.bias.copy_(b)
    # The quantizable MobileNetV2 swapped ReLU6 for ReLU before calibration (torchvision's _replace_relu).
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, nn.ReLU())
    return model.eval()


class TorchScriptReference:
    """The original int8 TorchScript MobileNetV2, run with the QNNPACK engine it was quantized for.

    torchvision's quantized MobileNetV2 weights are ``IMAGENET1K_QNNPACK_V1``:
    calibrated without ``reduce_range``. On x86 torch's default engine
    (``x86``/``fbgemm``) multiplies uint8 x int8 pairs into saturating int16
    sums, which overflows on this model's first convolution (errors of 1.1 on
    outputs of at most 3.4 on a normal-noise input, against 0.0075 with
    QNNPACK). So the reference is loaded and run under QNNPACK; the engine
    setting is restored after every call.

    The trace fixed the batch size to 1, so :meth:`__call__` runs the images
    one at a time.
    """

    ENGINE = "qnnpack"

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        if self.ENGINE not in torch.backends.quantized.supported_engines:
            raise RuntimeError(f"this torch build lacks the {self.ENGINE} quantized engine the int8 MobileNetV2 needs")
        self.path = _weights_file(path, TORCHSCRIPT_MOBILENET_V2_FILE)
        with self._engine(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.module = torch.jit.load(str(self.path), map_location="cpu").eval()

    def _engine(self):
        import contextlib

        @contextlib.contextmanager
        def swap():
            before = torch.backends.quantized.engine
            torch.backends.quantized.engine = self.ENGINE
            try:
                yield
            finally:
                torch.backends.quantized.engine = before

        return swap()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``B x 1000`` for preprocessed images ``B x 3 x 224 x 224``."""
        with self._engine(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.cat([self.module(x[i : i + 1]) for i in range(x.shape[0])])


def mobilenet_v2_preprocess() -> Callable:
    """torchvision's transform for the quantized MobileNetV2 weights (resize 256, crop 224, ImageNet mean/std)."""
    from torchvision.models.quantization import MobileNet_V2_QuantizedWeights

    from .hub import _compose_of

    return _compose_of(MobileNet_V2_QuantizedWeights.IMAGENET1K_QNNPACK_V1.transforms())


def load_mobilenet_v2_int8(weights: str | os.PathLike | None = None, **kwargs) -> tuple[nn.Module, Callable]:
    """``pretrained:mobilenet_v2_int8``: the dequantized float twin and its preprocess.

    Parameters
    ----------
    weights:
        ``None`` (the shipped TorchScript file), another such ``.pt``
        TorchScript file, or a ``.safetensors`` / state-dict file of the float twin.
    """
    if kwargs:
        raise ValueError(f"pretrained:mobilenet_v2_int8 takes no options {', '.join(kwargs)}")
    if weights is not None and str(weights).endswith((".safetensors", ".pth")):
        import torchvision

        from .checkpoint import load_into

        model = torchvision.models.mobilenet_v2(weights=None, num_classes=1000)
        for parent in model.modules():
            for name, child in parent.named_children():
                if isinstance(child, nn.ReLU6):
                    setattr(parent, name, nn.ReLU())
        load_into(model, weights, "pretrained:mobilenet_v2_int8")
        return model.eval(), mobilenet_v2_preprocess()
    return mobilenet_v2_from_torchscript(weights), mobilenet_v2_preprocess()


# -- TFLite uint8 MobileNet v1 1.0/224 ------------------------------------------

TFLITE_MOBILENET_V1_FILES = (
    "tflite/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite",
    "tflite/mobilenet_quant_v1_224_head_layers.tflite",
)
# Byte-for-byte copies of the two files inside the package (the demo's ImageNet network).
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights"


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


def _tflite_graph(file: Path) -> list[dict]:
    """The operators of a one-subgraph TFLite file: ``{"op", "inputs", "outputs", "options"}`` each.

    Tensors are ``{"name", "shape", "q" (uint8/int32 array or None), "scale", "zero_point"}``
    (scale and zero point as float / int arrays, one entry for per-tensor quantization).
    """
    import tflite

    buf = file.read_bytes()
    model = tflite.Model.GetRootAsModel(buf, 0)
    if model.SubgraphsLength() != 1:
        raise ValueError(f"{file}: expected one subgraph, found {model.SubgraphsLength()}")
    g = model.Subgraphs(0)
    op_names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
    dtypes = {tflite.TensorType.UINT8: np.uint8, tflite.TensorType.INT32: np.int32, tflite.TensorType.INT8: np.int8}

    def tensor(i: int) -> dict:
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
        ops.append({"op": name, "inputs": [tensor(i) for i in op.InputsAsNumpy()],
                    "outputs": [tensor(i) for i in op.OutputsAsNumpy()], "options": options})
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
    try:
        import tflite
    except ImportError as exc:
        raise ImportError(
            "reading TFLite files needs the 'tflite' package: pip install tflite==2.18.0 "
            "(or pip install -e '.[tflite]')"
        ) from exc

    if paths is None:
        # The package ships both files (Apache-2.0, adapters/weights/NOTICE-mobilenet_v1.md), so the
        # twin and the demo load with no data folder at all.
        paths = tuple(SHIPPED_WEIGHTS / Path(rel).name for rel in TFLITE_MOBILENET_V1_FILES)
    files = [_weights_file(p, rel) for p, rel in zip(paths, TFLITE_MOBILENET_V1_FILES)]
    backbone, head = _tflite_graph(files[0]), _tflite_graph(files[1])
    convs = [op for op in backbone if op["op"] in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    model = TFLiteMobileNetV1()
    if len(convs) != model.num_convs or backbone[-1]["op"] != "AVERAGE_POOL_2D":
        raise ValueError(f"{files[0]}: {len(convs)} convolutions then {backbone[-1]['op']}; "
                         f"MobileNet v1 has {model.num_convs} then AVERAGE_POOL_2D")
    logits = [op for op in head if op["op"] == "CONV_2D"]
    if len(logits) != 1:
        raise ValueError(f"{files[1]}: expected one CONV_2D logits layer, found {len(logits)}")
    with torch.no_grad():
        for i, op in enumerate(convs, 1):
            conv, bn = getattr(model, f"conv{i}"), getattr(model, f"bn{i}")
            o = op["options"]
            depthwise = op["op"] == "DEPTHWISE_CONV_2D"
            if (depthwise != (conv.groups > 1) or o.StrideW() != conv.stride[1] or o.StrideH() != conv.stride[0]
                    or o.Padding() != tflite.Padding.SAME or o.FusedActivationFunction() != tflite.ActivationFunctionType.RELU6):
                raise ValueError(f"{files[0]}: operator {i} ({op['op']}, stride {o.StrideH()}) does not fit conv{i} "
                                 f"(groups {conv.groups}, stride {conv.stride}) with SAME padding and ReLU6")
            w = torch.from_numpy(tflite_dequantize(op["inputs"][1]))
            w = w.permute(3, 0, 1, 2) if depthwise else w.permute(0, 3, 1, 2)
            b = torch.from_numpy(tflite_dequantize(op["inputs"][2]))
            if w.shape != conv.weight.shape or b.shape != bn.bias.shape:
                raise ValueError(f"{files[0]}: conv{i} weight {tuple(w.shape)}, the adapter needs {tuple(conv.weight.shape)}")
            conv.weight.copy_(w)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            bn.weight.fill_(math.sqrt(1.0 + bn.eps))
            bn.bias.copy_(b)
        w = torch.from_numpy(tflite_dequantize(logits[0]["inputs"][1]))
        b = torch.from_numpy(tflite_dequantize(logits[0]["inputs"][2]))
        if w.shape[1:3] != (1, 1) or w.shape[0] * w.shape[3] != model.fc.weight.numel():
            raise ValueError(f"{files[1]}: logits kernel {tuple(w.shape)}, expected (1001, 1, 1, 1024)")
        model.fc.weight.copy_(w[:, 0, 0, :])
        model.fc.bias.copy_(b)
    return model.eval()


def tflite_preprocess(size: int = 224) -> Callable:
    """Resize to ``size`` x ``size`` (bilinear, uint8 like the TFLite input), then ``(x - 128) / 128``.

    The first three transforms give the uint8 ``3 x size x size`` image the
    TFLite file itself takes (input scale 1/128, zero point 128).
    """
    from torchvision.transforms import v2 as T

    return T.Compose([
        T.ToImage(),
        T.Resize(size, antialias=True),
        T.CenterCrop(size),
        T.ToDtype(torch.float32, scale=False),
        T.Normalize([128.0, 128.0, 128.0], [128.0, 128.0, 128.0]),
    ])


def load_mobilenet_v1_100_tflite(weights: str | os.PathLike | None = None, **kwargs) -> tuple[nn.Module, Callable]:
    """``pretrained:mobilenet_v1_100_tflite``: the float twin of the uint8 TFLite MobileNet v1 1.0/224.

    Parameters
    ----------
    weights:
        ``None`` (the two shipped ``.tflite`` files: 1001 outputs, index 0
        background) or a ``.pt`` / ``.pth`` / ``.safetensors`` state dict of
        this twin, whose ``fc`` sets the number of outputs (e.g. 10 after
        ``cnn-internals finetune``).
    """
    if kwargs:
        raise ValueError(f"pretrained:mobilenet_v1_100_tflite takes no options {', '.join(kwargs)}")
    if weights is not None:
        model = _twin_from_state(weights, lambda n: TFLiteMobileNetV1(num_classes=n), 1001,
                                 "pretrained:mobilenet_v1_100_tflite")
        return model, tflite_preprocess()
    return tflite_mobilenet_v1(), tflite_preprocess()

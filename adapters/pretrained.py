"""Float PyTorch twins of real pretrained ImageNet weights: the ``pretrained:`` models.

Each twin is opened like any other model (``adapters.load("pretrained:...")``)
and registers its card here; the format readers are in
:mod:`adapters.importers` (one module per format, with the mapping details).

``pretrained:mobilenet_v1_025_keras``
    Keras Applications' MobileNet v1, alpha 0.25, 224 px, *no top*
    (``weights/keras/mobilenet_2_5_224_tf_no_top.h5``) in
    :class:`~adapters.importers.keras.KerasMobileNetV1` (our module names,
    ReLU6, TF "SAME" padding, BatchNorm epsilon 1e-3;
    :mod:`adapters.importers.keras`). The file has no classifier, so ``fc``
    is a freshly initialised ``num_classes``-way layer: train it with
    ``cnn-internals finetune`` (head only) or use the features. Preprocess:
    resize to 224x224, ``x / 127.5 - 1`` (Keras' ``preprocess_input``).

``pretrained:mobilenet_v2_int8``
    torchvision's int8-quantized MobileNetV2 as TorchScript
    (``weights/torchscript/mobilenetv2_quantized.pt``), dequantized into
    ``torchvision.models.mobilenet_v2`` with ReLU for ReLU6
    (:mod:`adapters.importers.torchscript`). 1000 ImageNet classes;
    preprocess: torchvision's for these weights (resize 256, centre crop 224,
    ImageNet mean/std).

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
    TFLite files (backbone up to the pooled 1024-d embedding, and the 1x1
    logits conv; shipped in ``adapters/weights`` too), dequantized into
    :class:`~adapters.importers.tflite.TFLiteMobileNetV1`
    (:mod:`adapters.importers.tflite`): ``fc`` 1001-way (index 0
    "background", ImageNet class = index - 1). Preprocess: resize to 224x224
    uint8, ``(x - 128) / 128``.
    Agreement with the file run by its own runtime (ai-edge-litert 2.3.0,
    both parts chained, same uint8 input; ``examples/check_tflite_import.py``,
    Imagenette val, first 40 images per class): top-1 385 / 400 = 96.2 %
    (1001-way); at the 15 differences the twin's class is 0 (a tie), 1 or
    2 uint8 logit steps (0.166) below the runtime's maximum (5, 9 and 1
    images); 100 % when both are restricted to the 10 Imagenette classes.
    ImageNet top-1 on the same images: twin 249 / 400 = 62.3 %, TFLite
    251 / 400 = 62.7 %; zero-shot 10-way 98.2 % for both.

The weights folder is ``$CNN_INTERNALS_WEIGHTS``, else ``weights/`` under the
data root (``$CNN_INTERNALS_DATA`` or ``../shared/data``):
:func:`adapters.registry.weights_dir`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from torch import nn

from .checkpoint import load_into, load_state_dict
from .importers import SHIPPED_WEIGHTS, weights_dir
from .importers.keras import KERAS_BN_EPS, KERAS_MOBILENET_FILE, KerasMobileNetV1, keras_mobilenet_v1, keras_preprocess
from .importers.tflite import (TFLITE_MOBILENET_V1_FILES, TFLiteMobileNetV1, tflite_dequantize, tflite_mobilenet_v1,
                               tflite_preprocess)
from .importers.torchscript import (TORCHSCRIPT_MOBILENET_V2_FILE, TorchScriptReference, float_mobilenet_v2,
                                    mobilenet_v2_from_torchscript, mobilenet_v2_preprocess)
from .registry import Card, register_model

__all__ = [
    "KerasMobileNetV1",
    "keras_mobilenet_v1",
    "keras_preprocess",
    "mobilenet_v2_from_torchscript",
    "mobilenet_v2_preprocess",
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
    "SHIPPED_WEIGHTS",
    "CARDS",
]

#: ImageNet-1k class index of each Imagenette class, in sorted-wnid (ImageFolder) order.
IMAGENETTE_IMAGENET_CLASSES: tuple[int, ...] = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)


def _twin_from_state(weights: str | os.PathLike, build: Callable[[int], nn.Module], default_classes: int,
                     name: str) -> nn.Module:
    """A twin from a state-dict file, its ``fc`` as wide as the file's (e.g. 10 after fine-tuning)."""
    state = load_state_dict(weights)
    model = build(int(state["fc.weight"].shape[0]) if "fc.weight" in state else default_classes)
    load_into(model, weights, name, state)
    return model.eval()


def _no_options(name: str, kwargs: dict) -> None:
    if kwargs:
        raise ValueError(f"{name} takes no options {', '.join(kwargs)}")


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
    _no_options("pretrained:mobilenet_v1_025_keras", kwargs)
    if weights is not None and not str(weights).endswith((".h5", ".hdf5")):
        model = _twin_from_state(weights, lambda n: keras_mobilenet_v1(None, num_classes=n), num_classes,
                                 "pretrained:mobilenet_v1_025_keras")
        return model, keras_preprocess()
    return keras_mobilenet_v1(weights, num_classes=num_classes), keras_preprocess()


def load_mobilenet_v2_int8(weights: str | os.PathLike | None = None, **kwargs) -> tuple[nn.Module, Callable]:
    """``pretrained:mobilenet_v2_int8``: the dequantized float twin and its preprocess.

    Parameters
    ----------
    weights:
        ``None`` (the shipped TorchScript file), another such ``.pt``
        TorchScript file, or a ``.safetensors`` / state-dict file of the float twin.
    """
    _no_options("pretrained:mobilenet_v2_int8", kwargs)
    if weights is not None and str(weights).endswith((".safetensors", ".pth")):
        model = float_mobilenet_v2()
        load_into(model, weights, "pretrained:mobilenet_v2_int8")
        return model.eval(), mobilenet_v2_preprocess()
    return mobilenet_v2_from_torchscript(weights), mobilenet_v2_preprocess()


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
    _no_options("pretrained:mobilenet_v1_100_tflite", kwargs)
    if weights is not None:
        model = _twin_from_state(weights, lambda n: TFLiteMobileNetV1(num_classes=n), 1001,
                                 "pretrained:mobilenet_v1_100_tflite")
        return model, tflite_preprocess()
    return tflite_mobilenet_v1(), tflite_preprocess()


#: The three twins' cards. Their default weights: the Keras and TorchScript files live in the
#: data folder's ``weights/`` (relative paths, see :meth:`adapters.registry.Card.default_weights`);
#: the TFLite pair ships in the package (the card names the backbone file).
CARDS: tuple[Card, ...] = (
    register_model(Card(
        name="pretrained:mobilenet_v1_025_keras",
        build=load_mobilenet_v1_025_keras,
        preprocess=keras_preprocess,
        params=215_642,
        summary="Keras MobileNet v1 alpha 0.25 ImageNet backbone (no top), float, new 10-way head",
        dataset="imagenet",
        weights_file=Path(KERAS_MOBILENET_FILE),
    )),
    register_model(Card(
        name="pretrained:mobilenet_v2_int8",
        build=load_mobilenet_v2_int8,
        preprocess=mobilenet_v2_preprocess,
        params=3_504_872,
        summary="torchvision's int8 MobileNetV2 (TorchScript), dequantized to float, 1000 ImageNet classes",
        dataset="imagenet",
        weights_file=Path(TORCHSCRIPT_MOBILENET_V2_FILE),
    )),
    register_model(Card(
        name="pretrained:mobilenet_v1_100_tflite",
        build=load_mobilenet_v1_100_tflite,
        preprocess=tflite_preprocess,
        params=4_233_001,
        summary="TF-slim uint8 MobileNet v1 1.0/224 (TFLite), dequantized to float, 1001 outputs",
        dataset="imagenet",
        weights_file=SHIPPED_WEIGHTS / Path(TFLITE_MOBILENET_V1_FILES[0]).name,
    )),
)

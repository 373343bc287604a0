"""LeNet-5 (LeCun, Bottou, Bengio & Haffner, 1998), faithful to the paper.

Input is a 32x32 greyscale digit: an MNIST image padded by 2 pixels of
background, so that stroke ends can reach the centre of the highest-level
receptive fields (section II.B of the paper). ``print(LeNet5())``::

    LeNet5(
      (conv1): Conv2d(1, 6, kernel_size=(5, 5), stride=(1, 1))
      (tanh1): Tanh(a=1.7159, s=0.6667)
      (pool1): AvgPool2d(kernel_size=2, stride=2)
      (tanh2): Tanh(a=1.7159, s=0.6667)
      (conv2): Conv2d(6, 16, kernel_size=(5, 5), stride=(1, 1))
      (tanh3): Tanh(a=1.7159, s=0.6667)
      (pool2): AvgPool2d(kernel_size=2, stride=2)
      (tanh4): Tanh(a=1.7159, s=0.6667)
      (conv3): Conv2d(16, 120, kernel_size=(5, 5), stride=(1, 1))
      (tanh5): Tanh(a=1.7159, s=0.6667)
      (linear): Linear(in_features=120, out_features=84, bias=True)
      (tanh6): Tanh(a=1.7159, s=0.6667)
      (rbf): RBFOutputLayer()
    )

Shapes: 1x32x32 -> conv1 6x28x28 -> pool1 6x14x14 -> conv2 16x10x10 -> pool2
16x5x5 -> conv3 120x1x1 -> linear 84 -> rbf 10. **60,856** trainable
parameters (conv1 156, conv2 2,416, conv3 48,120, linear 10,164; the RBF
prototypes are a fixed buffer). With the paper's ``c3_table=True`` (60 of 96
C3 connections) and ``trainable_pool=True`` the effective count is the
paper's **60,000** (:func:`count_parameters` excludes masked C3 weights).

The ``rbf`` layer outputs one *penalty* per class, the squared distance
between the 84-unit F6 code and a fixed +/-1 prototype (stylised 7x12 digit
bitmaps after Fig. 3 of the paper, :data:`PROTOTYPE_BITMAPS`): the predicted
class is the **argmin** (:func:`predict`). :func:`preprocess` scales pixels
so that background is -0.1 and full ink 1.175 (paper, section II.A): no
dataset statistics.

Shipped weights ``weights/lenet5.safetensors``: the default architecture
trained on the 60,000 MNIST training images (seed 0, last of 30 epochs),
99.23 % on the 10,000 test images; how it was made is in
``weights/lenet5.json``. Design choices and the recipe: ``docs/models.md``.

Examples
--------
>>> model, preprocess = load()            # shipped weights, eval mode
>>> x = preprocess(image).unsqueeze(0)    # 1x1x32x32
>>> predict(model, x)                     # tensor([7])
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .checkpoint import load_state_dict
from .registry import Card, register_model

__all__ = [
    "LeNet5",
    "ScaledTanh",
    "AvgPool2d",
    "TrainablePool2d",
    "C3Conv2d",
    "RBFOutputLayer",
    "C3_TABLE",
    "PROTOTYPE_BITMAPS",
    "MIN_PROTOTYPE_HAMMING",
    "BACKGROUND",
    "FOREGROUND",
    "DEFAULT_WEIGHTS",
    "NUM_PARAMETERS",
    "count_parameters",
    "predict",
    "to_input",
    "preprocess",
    "load",
    "CARD",
]

# Value of white background / full ink after preprocessing (paper, section II.A).
BACKGROUND: float = -0.1
FOREGROUND: float = 1.175

#: Trainable parameters of the default architecture.
NUM_PARAMETERS = 60_856

DEFAULT_WEIGHTS: Path = Path(__file__).with_name("weights") / "lenet5.safetensors"

# Table I of the paper: which S2 maps (rows) feed which C3 maps (columns).
# C3 maps 0-5 see 3 contiguous S2 maps, 6-11 see 4 contiguous maps, 12-14 see
# 4 non-contiguous maps and 15 sees all 6: 18 + 24 + 12 + 6 = 60 connections.
# The paper breaks symmetry this way so that different C3 maps are forced to
# extract different (complementary) features.
C3_TABLE: tuple[tuple[int, ...], ...] = (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 0), (5, 0, 1),
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (3, 4, 5, 0), (4, 5, 0, 1), (5, 0, 1, 2),
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)

# Stylised 7 (wide) x 12 (tall) digit bitmaps for the RBF prototypes ('#' = +1,
# '.' = -1). Drawn after Fig. 3 of the paper: a two-pixel-thick stroke in a
# frame that leaves the top and bottom rows as margin. Drawn side by side, one
# line per bitmap row, so that the sheet reads like a font.
_DIGIT_SHEET: tuple[str, ...] = (
    # 0       1       2       3       4       5       6       7       8       9
    "....... ....... ....... ....... ....... ....... ....... ....... ....... .......",
    "..###.. ...##.. .#####. ######. ....##. ####### ...###. ####### .#####. .#####.",
    ".##.##. ..###.. ##...## .....## ...###. ##..... ..##... .....## ##...## ##...##",
    "##...## .####.. .....## .....## ..####. ##..... .##.... ....##. ##...## ##...##",
    "##...## ...##.. .....## .....## .##.##. ######. ##..... ....##. ##...## ##...##",
    "##...## ...##.. ....##. ..####. ##..##. .....## ######. ...##.. .#####. .######",
    "##...## ...##.. ...##.. .....## ####### .....## ##...## ...##.. ##...## .....##",
    "##...## ...##.. ..##... .....## ....##. .....## ##...## ..##... ##...## ....##.",
    "##...## ...##.. .##.... .....## ....##. .....## ##...## ..##... ##...## ...##..",
    ".##.##. ...##.. ##..... .....## ....##. ##...## ##...## .##.... ##...## ..##...",
    "..###.. .###### ####### ######. ....##. .#####. .#####. .##.... .#####. .##....",
    "....... ....... ....... ....... ....... ....... ....... ....... ....... .......",
)
PROTOTYPE_BITMAPS: tuple[tuple[str, ...], ...] = tuple(
    tuple(row.split()[digit] for row in _DIGIT_SHEET) for digit in range(10)
)


def _prototype_matrix() -> torch.Tensor:
    """The 10x84 matrix of +/-1 prototypes, row i = digit i, row-major bitmap."""
    rows = []
    for digit, bitmap in enumerate(PROTOTYPE_BITMAPS):
        if len(bitmap) != 12 or any(len(r) != 7 for r in bitmap):
            raise ValueError(f"prototype bitmap for digit {digit} is not 7 wide x 12 tall")
        rows.append([1.0 if c == "#" else -1.0 for r in bitmap for c in r])
    return torch.tensor(rows, dtype=torch.float32)


def _min_hamming() -> int:
    p = _prototype_matrix()
    d = (p[:, None, :] != p[None, :, :]).sum(-1)
    d.fill_diagonal_(10**6)
    return int(d.min())


# Smallest number of differing positions between two prototypes.
MIN_PROTOTYPE_HAMMING: int = _min_hamming()


class ScaledTanh(nn.Module):
    """LeCun's squashing function ``f(x) = a * tanh(s * x)``.

    With ``a = 1.7159`` and ``s = 2/3`` (paper, appendix A), ``f(1) = 1`` and
    ``f(-1) = -1``, and the second derivative is largest at +/-1, so the +/-1
    targets of the RBF prototypes sit where the function is still far from
    saturation.

    Parameters
    ----------
    a:
        Output amplitude.
    s:
        Input slope.
    """

    def __init__(self, a: float = 1.7159, s: float = 2.0 / 3.0) -> None:
        super().__init__()
        self.a = float(a)
        self.s = float(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.tanh (not nn.Tanh / F.tanh): the interpretation engine intercepts
        # this call to apply its backward rules to the non-linearity.
        return self.a * torch.tanh(self.s * x)

    def _get_name(self) -> str:
        # Printed as the original implementation prints it: "Tanh(a=..., s=...)".
        return "Tanh"

    def extra_repr(self) -> str:
        return f"a={self.a:.4f}, s={self.s:.4f}"


class AvgPool2d(nn.AvgPool2d):
    """Plain 2x2 average pooling, printed as ``AvgPool2d(kernel_size=2, stride=2)``.

    Identical to :class:`torch.nn.AvgPool2d`; only the printout is shorter, to
    match the architecture listing of the original implementation.
    """

    def __init__(self, kernel_size: int = 2, stride: int = 2) -> None:
        super().__init__(kernel_size=kernel_size, stride=stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class TrainablePool2d(AvgPool2d):
    """The paper's subsampling layer: 2x2 average times a trainable coefficient plus a trainable bias, per map.

    The paper sums the four inputs; averaging only rescales the coefficient by
    4. Coefficients start at 1 and biases at 0, so at initialisation the layer
    equals plain average pooling.

    Parameters
    ----------
    channels:
        Number of feature maps (one coefficient and one bias each).
    """

    def __init__(self, channels: int, kernel_size: int = 2, stride: int = 2) -> None:
        super().__init__(kernel_size=kernel_size, stride=stride)
        self.channels = int(channels)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = super().forward(x)
        return pooled * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, trainable=True"


class C3Conv2d(nn.Conv2d):
    """Conv2d(6, 16, 5) restricted to the paper's partial connection table (Table I).

    The weight tensor keeps its full ``16x6x5x5`` shape (so code that reads
    ``module.weight``, e.g. a deconvnet, works unchanged), but the 36 absent
    connections are zero in the stored weight *and* multiplied by a fixed
    0/1 mask in :meth:`forward`, so their gradient is exactly zero and no
    optimiser (with or without decoupled weight decay) can move them.
    """

    def __init__(self, table: tuple[tuple[int, ...], ...] = C3_TABLE) -> None:
        super().__init__(6, 16, kernel_size=5)
        mask = torch.zeros(16, 6, 1, 1)
        for out_map, inputs in enumerate(table):
            mask[out_map, list(inputs)] = 1.0
        # Not persistent: the mask is a property of the architecture, not a weight.
        self.register_buffer("mask", mask, persistent=False)
        with torch.no_grad():
            self.weight.mul_(self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)

    def _get_name(self) -> str:
        return "Conv2d"

    def extra_repr(self) -> str:
        return super().extra_repr() + f", connections={int(self.mask.sum())}/96"


class RBFOutputLayer(nn.Module):
    """Euclidean RBF output units with fixed +/-1 prototypes.

    ``y_i = sum_j (x_j - w_ij)^2`` for each class ``i``: a penalty, smaller is
    more likely. The prototypes ``w`` (``10x84``, the stylised 7x12 digit
    bitmaps of :data:`PROTOTYPE_BITMAPS`) are a buffer: saved with the weights
    but never trained, as in the paper.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("prototypes", _prototype_matrix())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 1, 84) - (1, 10, 84): exact per-element squares rather than the
        # |x|^2 - 2xw + |w|^2 expansion, which loses precision near a prototype.
        return (x.unsqueeze(1) - self.prototypes.unsqueeze(0)).pow(2).sum(-1)


def _fan_in_uniform_(module: nn.Module, fan_in: int | torch.Tensor) -> None:
    """Uniform(-2.4/F, 2.4/F) for weight and bias (paper, appendix A).

    The bias gets the same range as the weights because in the paper a bias is
    just one more weight, connected to a unit of constant input.
    ``fan_in`` may be a per-output-unit tensor (the C3 table gives maps with 3, 4
    or 6 inputs, i.e. fan-in 75, 100 or 150).
    """
    with torch.no_grad():
        bound = 2.4 / torch.as_tensor(fan_in, dtype=torch.float32)
        w = module.weight
        shape = (-1,) + (1,) * (w.dim() - 1)
        w.uniform_(-1.0, 1.0).mul_(bound.reshape(shape) if bound.dim() else bound)
        if module.bias is not None:
            module.bias.uniform_(-1.0, 1.0).mul_(bound)


def _check_conv3_input(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    # Without this a wrong input size surfaces as a bare kernel/matmul shape
    # error. Checked at conv3, not at the model's input: the engine runs partial
    # forwards on receptive-field crops (e.g. 5x5 for conv1) that never reach here.
    size = tuple(inputs[0].shape[-2:])
    if size != (5, 5):
        raise ValueError(
            f"LeNet5 needs Bx1x32x32 inputs (MNIST padded by 2; see preprocess): conv3 got a "
            f"{size[0]}x{size[1]} map instead of 5x5"
        )


class LeNet5(nn.Module):
    """LeNet-5 for 32x32 greyscale digits; outputs 10 RBF penalties (argmin = class).

    Parameters
    ----------
    c3_table:
        Connect conv2 (the paper's C3) through the partial table of the paper
        (60 of 96 map pairs) instead of fully.
    trainable_pool:
        Use the paper's subsampling (trainable coefficient and bias per map)
        instead of plain average pooling.
    """

    # Read by the engine (e.g. ``cnn-internals rf``) to size its dummy input.
    input_size: tuple[int, int] = (32, 32)
    num_classes: int = 10

    def __init__(self, c3_table: bool = False, trainable_pool: bool = False) -> None:
        super().__init__()
        self.c3_table = bool(c3_table)
        self.trainable_pool = bool(trainable_pool)
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5)
        self.tanh1 = ScaledTanh()
        self.pool1 = TrainablePool2d(6) if trainable_pool else AvgPool2d(2, 2)
        self.tanh2 = ScaledTanh()
        self.conv2 = C3Conv2d() if c3_table else nn.Conv2d(6, 16, kernel_size=5)
        self.tanh3 = ScaledTanh()
        self.pool2 = TrainablePool2d(16) if trainable_pool else AvgPool2d(2, 2)
        self.tanh4 = ScaledTanh()
        self.conv3 = nn.Conv2d(16, 120, kernel_size=5)
        self.tanh5 = ScaledTanh()
        self.linear = nn.Linear(120, 84)
        self.tanh6 = ScaledTanh()
        self.rbf = RBFOutputLayer()
        # The size check lives in a pre-hook, not in forward(), so that forward()
        # has no data-dependent branch and stays torch.fx-traceable (the engine
        # addresses layers through an fx trace).
        self.conv3.register_forward_pre_hook(_check_conv3_input)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fan-in uniform initialisation of conv and linear layers (see :func:`_fan_in_uniform_`)."""
        _fan_in_uniform_(self.conv1, 1 * 25)
        if self.c3_table:
            per_map = self.conv2.mask.flatten(1).sum(1) * 25
            _fan_in_uniform_(self.conv2, per_map)
            with torch.no_grad():
                self.conv2.weight.mul_(self.conv2.mask)
        else:
            _fan_in_uniform_(self.conv2, 6 * 25)
        _fan_in_uniform_(self.conv3, 16 * 25)
        _fan_in_uniform_(self.linear, 120)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``Bx1x32x32`` inputs to ``Bx10`` penalties."""
        x = self.tanh2(self.pool1(self.tanh1(self.conv1(x))))
        x = self.tanh4(self.pool2(self.tanh3(self.conv2(x))))
        x = self.tanh5(self.conv3(x))
        x = torch.flatten(x, 1)
        x = self.tanh6(self.linear(x))
        return self.rbf(x)

    @staticmethod
    def scores_to_pred(penalties: torch.Tensor) -> torch.Tensor:
        """Predicted class: the smallest penalty."""
        return penalties.argmin(dim=1)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters, not counting weights masked out by a connection table."""
    total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if isinstance(module, C3Conv2d) and name == "weight":
                total += int(module.mask.expand_as(p).sum())
            else:
                total += p.numel()
    return total


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class indices for a batch ``x`` (``Bx1x32x32``): the argmin of the RBF penalties."""
    return model(x).argmin(dim=1)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """Batch version of :func:`preprocess` for uint8 tensors.

    Parameters
    ----------
    images:
        ``uint8`` tensor ``Nx28x28`` (padded by 2) or ``Nx32x32`` (used as is).

    Returns
    -------
    torch.Tensor
        ``float32`` ``Nx1x32x32``, background -0.1, full ink 1.175.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels 0..255, got dtype {images.dtype}")
    if images.dim() != 3 or tuple(images.shape[1:]) not in ((28, 28), (32, 32)):
        raise ValueError(f"expected an Nx28x28 or Nx32x32 uint8 tensor, got shape {tuple(images.shape)}")
    x = images.float().unsqueeze(1)
    if x.shape[-1] == 28:
        # Pad with 0 (white) before scaling, so the border gets the background value.
        x = F.pad(x, (2, 2, 2, 2), value=0.0)
    return x * ((FOREGROUND - BACKGROUND) / 255.0) + BACKGROUND


def preprocess(image: Image.Image | torch.Tensor | np.ndarray) -> torch.Tensor:
    """Turn one digit image into the model's input ``1x32x32`` (float32).

    Parameters
    ----------
    image:
        A PIL image (converted to mode ``"L"``; a size other than 28x28 or
        32x32 is resized to 28x28), or a ``uint8`` tensor / numpy array of
        shape ``28x28``, ``1x28x28``, ``32x32`` or ``1x32x32``, white digit
        (255) on black background (0), as in MNIST. 28x28 images are padded by
        2 pixels of background.

    Returns
    -------
    torch.Tensor
        ``1x32x32``, background -0.1 and full ink 1.175 (paper, section II.A).
    """
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        if not isinstance(image, Image.Image):
            raise ValueError(f"expected a PIL image or a uint8 tensor, got {type(image).__name__}")
        image = image.convert("L")
        if image.size not in ((28, 28), (32, 32)):
            # An ordinary photo or scan: shrink it to MNIST's 28x28 (the network
            # only reads 32x32 inputs) rather than fail on its shape.
            image = image.resize((28, 28), Image.BILINEAR)
        image = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    if image.dim() == 3 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 2:
        raise ValueError(f"LeNet-5 takes one 28x28 or 32x32 greyscale image, got a tensor of shape "
                         f"{tuple(image.shape)}; pass a PIL image (any size is resized to 28x28) or crop it")
    return to_input(image.unsqueeze(0))[0]


def load(weights: str | Path | None = None, **kwargs) -> tuple[LeNet5, Callable]:
    """Build LeNet-5 with weights, in eval mode.

    Parameters
    ----------
    weights:
        ``None`` for the shipped MNIST weights (:data:`DEFAULT_WEIGHTS`, default
        architecture only), ``"random"`` for the fan-in initialisation, or a
        path to a ``.safetensors`` / ``.pt`` state dict (training checkpoints
        from :mod:`adapters.training` are accepted too).
    **kwargs:
        ``c3_table`` / ``trainable_pool``, passed to :class:`LeNet5`.

    Returns
    -------
    (model, preprocess)
    """
    model = LeNet5(**kwargs)
    if weights is None:
        if model.c3_table or model.trainable_pool:
            raise ValueError(
                "the shipped LeNet-5 weights are for the default architecture; "
                "pass weights=PATH (or 'random') with c3_table/trainable_pool"
            )
        weights = DEFAULT_WEIGHTS
    if str(weights) != "random":
        state = load_state_dict(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ValueError(f"{weights} does not fit LeNet5({_describe(kwargs)}): {first}") from exc
    model.eval()
    return model, preprocess


def _describe(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _preprocess_factory() -> Callable:
    """The card's preprocess factory: LeNet-5 takes 32x32 digits only, so there is one transform."""
    return preprocess


CARD = register_model(Card(
    name="lenet5",
    build=load,
    preprocess=_preprocess_factory,
    params=NUM_PARAMETERS,
    summary="LeNet-5 (LeCun et al. 1998) with RBF outputs, trained on MNIST (99.23 % test accuracy)",
    dataset="mnist",
    figure_layers=("conv1", "conv2", "conv3"),
    twins=(),
    weights_file=DEFAULT_WEIGHTS,
))

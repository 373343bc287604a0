"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012) with a 10-class Imagenette head.

Single-tower version of the paper's network (the two-GPU split is not
reproduced), with local response normalisation after ``relu1`` and ``relu2``
and dropout on the first two fully-connected layers.

Architecture (``print(AlexNet())``, module names and order as in the original
"CNN Internals" printout)::

    AlexNet(
      (conv1): Conv2d(3, 96, kernel_size=(11, 11), stride=(4, 4), padding=(2, 2))
      (relu1): ReLU()
      (lrn1): LocalResponseNorm(5, alpha=0.0005, beta=0.75, k=2)
      (pool1): MaxPool2d(kernel_size=3, stride=2, padding=0, dilation=1, ceil_mode=False)
      (conv2): Conv2d(96, 256, kernel_size=(5, 5), stride=(1, 1), padding=(2, 2))
      (relu2): ReLU()
      (lrn2): LocalResponseNorm(5, alpha=0.0005, beta=0.75, k=2)
      (pool2): MaxPool2d(kernel_size=3, stride=2, padding=0, dilation=1, ceil_mode=False)
      (conv3): Conv2d(256, 384, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
      (relu3): ReLU()
      (conv4): Conv2d(384, 384, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
      (relu4): ReLU()
      (conv5): Conv2d(384, 256, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
      (relu5): ReLU()
      (pool3): MaxPool2d(kernel_size=3, stride=2, padding=0, dilation=1, ceil_mode=False)
      (lin1): Linear(in_features=9216, out_features=4096, bias=True)
      (relu6): ReLU()
      (drop1): Dropout(p=0.5, inplace=False)
      (lin2): Linear(in_features=4096, out_features=4096, bias=True)
      (relu7): ReLU()
      (drop2): Dropout(p=0.5, inplace=False)
      (lin3): Linear(in_features=4096, out_features=10, bias=True)
    )

Shapes at 224x224: conv1 96x55x55 -> pool1 96x27x27 -> conv2 256x27x27 ->
pool2 256x13x13 -> conv3/4/5 384/384/256x13x13 -> pool3 256x6x6 -> 9216 ->
4096 -> 4096 -> 10. There is no adaptive pooling (none is printed), so the
input must be 223 to 226 pixels square for ``lin1`` to receive 9,216 features.

Parameter count
---------------
**58,322,314** trainable parameters::

    conv1  96*3*11*11 + 96        =     34,944
    conv2  256*96*5*5 + 256       =    614,656
    conv3  384*256*3*3 + 384      =    885,120
    conv4  384*384*3*3 + 384      =  1,327,488
    conv5  256*384*3*3 + 256      =    884,992
    lin1   4096*9216 + 4096       = 37,752,832
    lin2   4096*4096 + 4096       = 16,781,312
    lin3   10*4096 + 10           =     40,970

Initialisation: Kaiming normal conv/linear weights, zero biases
(:func:`adapters.init.init_weights`). Evaluation preprocessing (mean-image
subtraction, centre 224 crop): :func:`adapters.preprocess.mean_image_crop`
with the shipped Imagenette statistics.

Examples
--------
>>> model, preprocess = load()
>>> model(preprocess(image).unsqueeze(0)).shape
torch.Size([1, 10])
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from .checkpoint import built
from .init import init_weights
from .preprocess import imagenette_mean_image_crop
from .registry import Card, register_model

__all__ = ["AlexNet", "load", "NUM_PARAMETERS", "CARD"]

NUM_PARAMETERS = 58_322_314


def _check_lin1_input(module: nn.Linear, inputs: tuple[torch.Tensor, ...]) -> None:
    # Without this the user gets a bare matmul shape error.
    features = inputs[0].shape[-1]
    if features != module.in_features:
        raise ValueError(
            f"AlexNet needs a 224x224 input (lin1 takes {module.in_features} = 256x6x6 features); "
            f"this input gives {features}"
        )


class AlexNet(nn.Module):
    """AlexNet with flat, numbered module names (see the module docstring).

    Parameters
    ----------
    num_classes:
        Size of the output layer ``lin3``.
    dropout:
        Dropout probability of ``drop1`` and ``drop2``.
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        # Module names are already conv1..conv5, so the engine's "convN"
        # lookup needs no translation.
        self.layer_aliases: dict[str, str] = {}
        self.conv1 = nn.Conv2d(3, 96, kernel_size=11, stride=4, padding=2)
        self.relu1 = nn.ReLU()
        self.lrn1 = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2)
        self.pool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.conv2 = nn.Conv2d(96, 256, kernel_size=5, padding=2)
        self.relu2 = nn.ReLU()
        self.lrn2 = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2)
        self.pool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.conv3 = nn.Conv2d(256, 384, kernel_size=3, padding=1)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(384, 384, kernel_size=3, padding=1)
        self.relu4 = nn.ReLU()
        self.conv5 = nn.Conv2d(384, 256, kernel_size=3, padding=1)
        self.relu5 = nn.ReLU()
        self.pool3 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.lin1 = nn.Linear(256 * 6 * 6, 4096)
        self.relu6 = nn.ReLU()
        self.drop1 = nn.Dropout(dropout)
        self.lin2 = nn.Linear(4096, 4096)
        self.relu7 = nn.ReLU()
        self.drop2 = nn.Dropout(dropout)
        self.lin3 = nn.Linear(4096, num_classes)
        # The input-size check lives in a hook, not in forward(): a Python
        # branch on a tensor shape would make the model untraceable by torch.fx.
        self.lin1.register_forward_pre_hook(_check_lin1_input)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch ``Bx3x224x224``."""
        x = self.pool1(self.lrn1(self.relu1(self.conv1(x))))
        x = self.pool2(self.lrn2(self.relu2(self.conv2(x))))
        x = self.relu3(self.conv3(x))
        x = self.relu4(self.conv4(x))
        x = self.pool3(self.relu5(self.conv5(x)))
        x = torch.flatten(x, 1)
        x = self.drop1(self.relu6(self.lin1(x)))
        x = self.drop2(self.relu7(self.lin2(x)))
        return self.lin3(x)


def load(weights: str | os.PathLike | None = None, num_classes: int = 10, **kwargs) -> tuple[nn.Module, Callable]:
    """AlexNet in eval mode and its evaluation preprocess.

    Parameters
    ----------
    weights:
        A checkpoint for :func:`adapters.checkpoint.load_state_dict`; ``None``
        keeps the random (Kaiming) initialisation.
    num_classes:
        Output classes (10 for Imagenette).
    **kwargs:
        Passed to :class:`AlexNet` (``dropout``).

    Returns
    -------
    (model, preprocess)
        ``preprocess`` maps a PIL image to a ``3x224x224`` float tensor: resize
        to 256, centre 256 crop, scale to [0, 1], subtract the Imagenette
        training-set mean image (shipped in the package), centre 224 crop.
    """
    return built(AlexNet(num_classes=num_classes, **kwargs), weights, "alexnet", imagenette_mean_image_crop())


CARD = register_model(Card(
    name="alexnet",
    build=load,
    preprocess=imagenette_mean_image_crop,
    params=NUM_PARAMETERS,
    summary="AlexNet (Krizhevsky et al. 2012) with LRN, single tower, 10-class Imagenette head",
    dataset="imagenette",
    figure_layers=("conv2", "conv3", "conv4", "conv5"),
    twins=("torchvision:alexnet",),
))

"""The weight initialisation of the Imagenette models (their constructors call :func:`init_weights`)."""
from __future__ import annotations

from torch import nn

__all__ = ["init_weights"]


def init_weights(model: nn.Module) -> None:
    """The initialisation of the original recipes, in place.

    Kaiming normal weights for every ``Conv2d`` and ``Linear`` (fan-in mode,
    ReLU gain: the variance-preserving choice for ReLU networks, and correct
    for depthwise convolutions too, whose fan-out PyTorch miscounts), zero
    biases; ``BatchNorm2d`` weight 1, bias 0.

    Parameters
    ----------
    model:
        Any module; its submodules of those three types are initialised.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

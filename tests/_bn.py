"""BatchNorm statistics away from their init, so that a wrongly wired or folded BN shows in a test."""
from __future__ import annotations

import torch
from torch import nn


def randomise_bn(model: nn.Module, mean: float = 0.2, var: tuple[float, float] = (0.5, 1.5),
                 weight: tuple[float, float] = (0.5, 1.5), bias: float = 0.2) -> nn.Module:
    """Draw every ``BatchNorm2d``'s running statistics and affine parameters uniformly (in place); returns ``model``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-mean, mean)
                m.running_var.uniform_(*var)
                m.weight.uniform_(*weight)
                m.bias.uniform_(-bias, bias)
    return model

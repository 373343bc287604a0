"""Conv2d modules in the order a forward pass calls them, recorded with hooks (independent of the engine's fx tracing)."""
from __future__ import annotations

import torch
from torch import nn


def called_convs(model: nn.Module, size: int = 64) -> list[str]:
    """Names of ``model``'s Conv2d modules in call order on one random ``3 x size x size`` image."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _i, n=n: order.append(n))
               for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    return order

"""Independent reference rules for the projection tests.

Their own autograd functions, patched into a model the plain way (module
replacement), not through the library's TorchFunctionMode; and one
forward+backward per unit, the layer captured with a plain hook.
"""
from __future__ import annotations

import torch


class RefGuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return torch.where(out > 0, torch.where(g > 0, g, torch.zeros_like(g)), torch.zeros_like(g))


class RefDeconvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        return torch.where(g > 0, g, torch.zeros_like(g))


def reference_projection(model, images, layer_module, units, fn):
    """One forward+backward per unit, capturing the layer with a plain hook."""
    out = []
    for n, c, y, x in units:
        inp = images[n : n + 1].clone().requires_grad_(True)
        captured = []
        h = layer_module.register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            fn(inp)
        finally:
            h.remove()
        (g,) = torch.autograd.grad(captured[0][0, c, y, x], inp)
        out.append(g[0])
    return torch.stack(out)

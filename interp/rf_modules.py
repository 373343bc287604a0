"""Field rules for leaf modules (``call_module`` nodes of the traced graph)."""
from __future__ import annotations

from typing import Any

from torch import fx, nn
from torch.nn.modules import activation as _activation_mod

from . import rf_axes as ra
from . import rf_shape as rs
from .rf_ops import OpRules, Unsupported, conv_padding, pair

__all__ = ["module_field", "same_padding"]

_PADS = {nn.ZeroPad2d: "constant", nn.ConstantPad2d: "constant", nn.ReflectionPad2d: "reflect",
         nn.ReplicationPad2d: "replicate", getattr(nn, "CircularPad2d", nn.ZeroPad2d): "circular"}
_POINTWISE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.Identity, nn.LocalResponseNorm,
              nn.ChannelShuffle)
_NOT_POINTWISE = (nn.MultiheadAttention, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.GLU)


def same_padding(n_in: int, n_out: int, k: int, s: int, d: int, p: int) -> int:
    """Leading padding that gives ``n_out`` positions: the module's own ``p`` if it does,
    else TensorFlow's "same" padding computed in the forward (timm ``Conv2dSame``,
    ``MaxPool2dSame``): ``total = max((n_out - 1) s + d (k - 1) + 1 - n_in, 0)``,
    ``total // 2`` before."""
    if (n_in + 2 * p - d * (k - 1) - 1) // s + 1 == n_out:
        return p
    return max((n_out - 1) * s + d * (k - 1) + 1 - n_in, 0) // 2


def module_field(rules: OpRules, node: fx.Node, mod: nn.Module) -> Any:
    """Field of the output of a leaf module call."""
    f, shape = rules.first_input(node)
    out_shape = rules.g.shape(node)
    if isinstance(mod, nn.Conv2d):
        return _conv(rules, node, mod, f, shape, out_shape)
    if isinstance(mod, nn.ConvTranspose2d):
        return rules.conv_transpose(node, f, shape, pair(mod.kernel_size), pair(mod.stride), pair(mod.padding),
                                    pair(mod.dilation))
    if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d)):
        k = pair(mod.kernel_size)
        s = pair(mod.stride if mod.stride not in (None, (), []) else mod.kernel_size)
        d = pair(getattr(mod, "dilation", 1))
        p = pair(getattr(mod, "padding", 0))
        p = tuple(same_padding(shape[2 + i], out_shape[2 + i], k[i], s[i], d[i], p[i]) for i in range(2))
        return rules.window(node, f, k, s, p, d, channelwise=True)
    if isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return rules.adaptive(node, f)
    for cls, mode in _PADS.items():
        if isinstance(mod, cls):
            return rules.pad(f, shape, list(mod.padding), mode)
    if isinstance(mod, nn.Upsample):
        return rules.probe(node, f, mod)
    if isinstance(mod, (nn.PixelShuffle, nn.PixelUnshuffle)):
        shuffle = isinstance(mod, nn.PixelShuffle)
        r = mod.upscale_factor if shuffle else mod.downscale_factor
        return rules.pixel(f, shape, "pixel_shuffle" if shuffle else "pixel_unshuffle", r)
    if isinstance(mod, (nn.Flatten, nn.Unflatten)):
        return rs.reshape(f, shape, out_shape)
    return _along_module(rules, node, mod, f, shape)


def _along_module(rules: OpRules, node: fx.Node, mod: nn.Module, f: ra.NodeField, shape) -> Any:
    nd = len(shape)
    if isinstance(mod, nn.Linear):
        return rules.along(node, f, {nd - 1}, "linear")
    if isinstance(mod, nn.LayerNorm):
        return rules.along(node, f, {nd - 1 - i for i in range(len(mod.normalized_shape))}, "layer_norm")
    if isinstance(mod, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
        return rules.global_context(f, node, f"{type(mod).__name__} statistics over positions", keep_local=True)
    if isinstance(mod, nn.Softmax2d):
        return rules.along(node, f, {nd - 3}, "softmax")
    if isinstance(mod, (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.GLU)):
        dim = mod.dim if mod.dim is not None else 1
        return rules.along(node, f, {dim + nd if dim < 0 else dim}, type(mod).__name__.lower())
    if isinstance(mod, _POINTWISE) or (
        type(mod).__module__ == _activation_mod.__name__ and not isinstance(mod, _NOT_POINTWISE)
    ):
        return rules.pointwise(node)
    raise Unsupported(f"module {type(mod).__name__} not analysed")


def _conv(rules: OpRules, node: fx.Node, mod: nn.Conv2d, f: ra.NodeField, shape, out_shape) -> ra.NodeField:
    k, s, d = pair(mod.kernel_size), pair(mod.stride), pair(mod.dilation)
    p = conv_padding(mod.padding, k, d)
    if mod.padding_mode != "zeros":
        # The padding is read from the image (reflect, replicate, circular): pad, then an unpadded window.
        mode = {"reflect": "reflect", "replicate": "replicate", "circular": "circular"}[mod.padding_mode]
        pads = list(getattr(mod, "_reversed_padding_repeated_twice", [p[1], p[1], p[0], p[0]]))
        f = rules.pad(f, shape, pads, mode)
        p = (0, 0)
        shape = tuple(shape[:-2]) + (shape[-2] + pads[2] + pads[3], shape[-1] + pads[0] + pads[1])
    p = tuple(same_padding(shape[2 + i], out_shape[2 + i], k[i], s[i], d[i], p[i]) for i in range(2))
    return rules.window(node, f, k, s, p, d)

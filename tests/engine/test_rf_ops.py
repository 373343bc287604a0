"""Receptive fields through shape ops, resampling and global context, against gradient support.

The empirical reference is written here independently of ``interp.rf_measure``:
a float64 copy of the model with fresh positive weights (1/fan-in scale),
zero biases, activations/normalisation replaced by ``nn.Identity`` modules,
and ``F.max_pool2d`` patched to the average pool of the same geometry. Every
unit is then a positive combination of the pixels it depends on, so the
bounding box of ``d unit / d input != 0`` (one unit at a time) is its field.
For the local field of a layer that sees global context the same is done
with the outputs of the global pooling modules detached.
"""
from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import interp
from interp.notices import GlobalContextWarning, MeasuredFieldWarning

_IDENTITY = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LayerNorm,
             nn.GroupNorm, nn.BatchNorm2d, nn.Dropout, nn.Mish, nn.LeakyReLU)


def _avg_instead_of_max(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    stride = stride if stride not in (None, [], ()) else kernel_size
    return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, True)


def reference_twin(model: nn.Module) -> nn.Module:
    """Positive float64 twin (see the module docstring)."""
    twin = copy.deepcopy(model).double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                p.zero_()
            elif p.dim() >= 2:
                fan_in = max(p[0].numel(), 1)
                p.copy_((torch.rand(p.shape, generator=gen, dtype=p.dtype) * 0.5 + 0.5) / fan_in)
            else:
                p.fill_(1.0)
    for parent in list(twin.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, _IDENTITY):
                setattr(parent, child_name, nn.Identity())
    return twin


def support_boxes(twin, layer: str, size, positions, detach_global: bool = False, in_channels: int = 3,
                  dims=(2, 3)):
    """Bounding boxes of the gradient support of the channel-sum at each ``(y, x)`` of ``layer``."""
    modules = dict(twin.named_modules())
    captured, handles = [], []
    handles.append(modules[layer].register_forward_hook(lambda m, i, o: captured.append(o) if not captured else None))
    if detach_global:
        for m in twin.modules():
            if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                handles.append(m.register_forward_hook(lambda m, i, o: o.detach()))
    x = (1 + torch.rand(1, in_channels, *size, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    x.requires_grad_(True)
    orig = F.max_pool2d
    F.max_pool2d = _avg_instead_of_max
    try:
        twin(x)
    finally:
        F.max_pool2d = orig
        for h in handles:
            h.remove()
    out = captured[0]
    boxes = []
    for y, xx in positions:
        idx = [0] + [slice(None)] * (out.dim() - 1)
        idx[dims[0]], idx[dims[1]] = y, xx
        (g,) = torch.autograd.grad(out[tuple(idx)].sum(), x, retain_graph=True)
        nz = (g[0].abs().sum(0) > 0).nonzero()
        boxes.append((int(nz[:, 0].min()), int(nz[:, 1].min()), int(nz[:, 0].max()) + 1, int(nz[:, 1].max()) + 1))
    return boxes, (out.shape[dims[0]], out.shape[dims[1]])


def positions_of(h: int, w: int) -> list[tuple[int, int]]:
    return sorted({(0, 0), (h - 1, w - 1), (h // 2, w // 2), (h // 3, (2 * w) // 3), (h - 1, 0)})


def check(model, layer, size, rf=None, twin=None, in_channels=3, dims=(2, 3)):
    """The field's clipped boxes equal the gradient support; for global context, so do the
    local field's boxes with the global paths detached."""
    model = model.eval()
    if rf is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rf = interp.receptive_field(model, layer, size)
    twin = twin if twin is not None else reference_twin(model)
    h, w = rf.output_size
    pos = positions_of(h, w)
    boxes, out_size = support_boxes(twin, layer, size, pos, in_channels=in_channels, dims=dims)
    assert out_size == rf.output_size
    for (y, x), box in zip(pos, boxes):
        assert rf.box(y, x, clip=size) == box, (layer, (y, x), rf)
    if rf.local is not None:
        boxes, _ = support_boxes(twin, layer, size, pos, detach_global=True, in_channels=in_channels, dims=dims)
        for (y, x), box in zip(pos, boxes):
            assert rf.spatial.box(y, x, clip=size) == box, (layer, "local", (y, x), rf.local)
    return rf


# -- hand-written nets, one op family each -------------------------------------------------
class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, permute to NHWC, LayerNorm + Linear MLP, permute back, layer scale."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.act, self.fc2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 1e-6))
        self.out = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        x = x + (self.gamma * y).permute(0, 3, 1, 2)
        return self.out(x)


def test_convnext_block_channels_last_is_local():
    model = ConvNeXtBlock()
    rfs = interp.receptive_fields(model, (37, 41))
    assert not any(r.is_global or r.measured for r in rfs.values())
    # fc1 runs on NHWC: its rows/cols are dims 1, 2.
    assert rfs["fc1"].size == (4 + 6 * 4, 4 + 6 * 4) and rfs["fc1"].stride == (4, 4)
    assert rfs["fc1"].dims == (1, 2) and rfs["dw"].dims == (2, 3) and rfs["fc1"].to_dict()["dims"] == [1, 2]
    for layer in ["dw", "out"]:
        check(model, layer, (37, 41))
    check(model, "fc2", (37, 41), dims=(1, 2))


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, stride=2)

    def forward(self, x):
        x = self.a(x)
        x1, x2 = x.chunk(2, dim=1)
        x = torch.cat([x1, self.b(x2)], dim=1)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)  # channel shuffle
        parts = torch.split(x, [3, 5], dim=1)
        x = torch.cat([parts[1], parts[0]], 1)
        return self.c(x[:, :, 1:, :-1])  # slicing shifts the field


def test_channel_shuffle_chunk_split_slice():
    model = Shuffle()
    rf = check(model, "c", (30, 27))
    assert rf.exact and not rf.measured
    # a: 3 / stride 2, b: +2*2 (union with the chunk that skips it), c: +2*2.
    assert rf.size == (11, 11) and rf.stride == (4, 4)
    assert rf.offset == (-3 + 2, -3)  # row slice 1: starts one stride-2 step later


class SpaceToDepth(nn.Module):
    def __init__(self, bs=4):
        super().__init__()
        self.bs = bs
        self.conv = nn.Conv2d(3 * bs * bs, 6, 3, padding=1)
        self.up = nn.Conv2d(6 * 4, 8, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.tail = nn.Conv2d(2, 4, 3)

    def forward(self, x):
        n, c, h, w = x.size()
        x = x.view(n, c, h // self.bs, self.bs, w // self.bs, self.bs)
        x = x.permute(0, 3, 5, 1, 2, 4).reshape(n, c * self.bs * self.bs, h // self.bs, w // self.bs)
        x = self.conv(x)
        x = F.pixel_unshuffle(x, 2)
        return self.tail(self.shuffle(self.up(x)))


def test_space_to_depth_and_pixel_shuffle():
    model = SpaceToDepth()
    rf = check(model, "conv", (32, 48))
    assert (rf.size, rf.stride, rf.offset) == ((12, 12), (4, 4), (-4, -4))
    for layer in ["up", "shuffle", "tail"]:
        check(model, layer, (32, 48))


class Upsampler(nn.Module):
    def __init__(self, mode, align, scale=None, size=None):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2)
        self.kw = {"mode": mode}
        if align is not None:
            self.kw["align_corners"] = align
        self.kw.update({"scale_factor": scale} if scale else {"size": size})
        self.c = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.b(self.a(x))
        return self.c(F.interpolate(y, **self.kw))


@pytest.mark.parametrize("mode,align,scale,size", [
    ("nearest", None, 2, None), ("nearest", None, None, (13, 9)), ("nearest-exact", None, 3, None),
    ("bilinear", False, 2, None), ("bilinear", True, None, (11, 17)), ("bicubic", False, 1.5, None),
    ("bicubic", True, 2, None),
])
def test_interpolate_modes(mode, align, scale, size):
    model = Upsampler(mode, align, scale, size)
    rf = check(model, "c", (29, 34))
    assert not rf.measured and rf.regular == (False, False) and not rf.exact  # the summary is not exact
    assert interp.receptive_field(model, "b", (29, 34)).exact


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.deconv = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1)
        self.deconv2 = nn.ConvTranspose2d(4, 4, 4, stride=3, dilation=2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")
        self.out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.deconv(self.enc(x))  # back to the input size
        z = self.up(F.avg_pool2d(x, 2))
        return self.deconv2(self.out(torch.cat([y, self.up(F.avg_pool2d(y, 2))[:, :4] + z.mean(1, keepdim=True)
                                                + y], 1)))


def test_transposed_convolutions_and_upsample_module():
    model = Decoder()
    for layer in ["deconv", "out", "deconv2"]:
        rf = check(model, layer, (24, 22))
        assert not rf.measured


class SamePad(nn.Module):
    """TF "same" padding computed in the forward from x.size()."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2)
        self.b = nn.Conv2d(4, 4, 5, stride=2)

    @staticmethod
    def pad_same(x, k, s):
        ih, iw = x.size()[-2:]
        ph = max((-(-ih // s) - 1) * s + k - ih, 0)
        pw = max((-(-iw // s) - 1) * s + k - iw, 0)
        return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])

    def forward(self, x):
        return self.b(self.pad_same(self.a(self.pad_same(x, 3, 2)), 5, 2))


@pytest.mark.parametrize("size", [(32, 32), (33, 30)])
def test_tf_same_padding_computed_in_forward(size):
    rf = check(SamePad(), "b", size)
    assert rf.stride == (4, 4) and rf.size == (11, 11)


def test_timm_same_padding_layers():
    timm = pytest.importorskip("timm")
    model = nn.Sequential(timm.layers.create_conv2d(3, 4, 3, stride=2, padding="same"),
                          timm.layers.create_pool2d("max", 3, stride=2, padding="same"),
                          timm.layers.create_conv2d(4, 4, 4, stride=2, padding="same"))
    for layer in ["0", "1", "2"]:
        rf = check(model, layer, (31, 28))
        assert rf.exact and not rf.measured


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.a(x))
        x = x * torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))
        return self.b(x)


def test_squeeze_excitation_global_with_local_field():
    model = SE()
    with pytest.warns(GlobalContextWarning):
        rfs = interp.receptive_fields(model, (21, 26), ["a", "b"])
    a, b = rfs["a"], rfs["b"]
    assert not a.is_global and a.local is None and a.spatial is a
    assert b.is_global and b.exact and not b.measured and b.box(3, 4) == (0, 0, 21, 26)
    assert not b.local.is_global and b.spatial is b.local
    assert (b.local.size, b.local.stride, b.local.offset) == ((7, 7), (2, 2), (-3, -3))
    assert sum("global context" in n for n in b.notes) == 1
    d = json.loads(json.dumps(b.to_dict()))
    assert d["local"]["size"] == [7, 7] and d["spatial"]["size"] == [7, 7] and d["measured"] is False
    check(model, "b", (21, 26), rf=b)


def test_unpadded_strided_convs_read_extent():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 2, stride=2))
    for layer in ["0", "1", "2"]:
        check(model, layer, (32, 32))
    rf = interp.receptive_field(model, "1", (32, 32))
    # 32 -> 15 units reading rows 0..30: row 31 is never read, though the padded
    # second conv's last unit nominally reaches it.
    assert rf.read_extent == ((0, 31), (0, 31))
    assert rf.box(14, 14) == (26, 26, 33, 33) and rf.box(14, 14, clip=(32, 32)) == (26, 26, 31, 31)


class Unknown3d(nn.Module):
    """A 3-D pooling over (1, 3, 3): the analysis does not know it, so the field is measured."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x):
        x = torch.flip(self.a(x), dims=[1])  # channels only: still local...
        x = F.avg_pool3d(x.unsqueeze(1), (1, 3, 3), stride=1, padding=(0, 1, 1)).squeeze(1)  # ... not analysed
        return self.b(x * 2)


def test_unknown_op_is_measured():
    model = Unknown3d()
    assert model.training
    with pytest.warns(MeasuredFieldWarning, match="measured"):
        rf = interp.receptive_field(model, "b", (20, 18))
    assert rf.measured and not rf.exact and not rf.is_global
    assert (rf.size, rf.stride, rf.offset) == ((7, 7), (2, 2), (-3, -3))
    check(model, "b", (20, 18), rf=rf)
    assert rf.to_dict()["measured"] is True
    # The user's model is untouched (weights).
    assert model.a.weight.dtype == torch.float32


class TracesButFailsToRun(nn.Module):
    """fx bakes the ``isinstance`` branch taken at trace time: the graph flattens the input."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(4, 4, 3, stride=2)

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            x = x.flatten(1)
        return self.b(self.a(x))


def test_failing_shape_probe_prints_nothing(capfd):
    model = TracesButFailsToRun()
    with pytest.warns(MeasuredFieldWarning):
        rf = interp.receptive_field(model, "b", (16, 16))
    out, err = capfd.readouterr()
    assert err == "" and out == ""
    assert rf.measured and (rf.size, rf.stride, rf.offset) == ((5, 5), (2, 2), (0, 0))


def test_dummy_channels_from_the_first_called_conv():
    class Late(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(256, 8, 1)  # defined first, called last
            self.stem = nn.Conv2d(5, 256, 3, stride=2)

        def forward(self, x):
            return self.head(self.stem(x))

    rf = interp.receptive_field(Late(), "head", (17, 17))
    assert rf.exact and rf.size == (3, 3) and rf.output_size == (8, 8)


def test_group_norm_is_global_context():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3, padding=1))
    with pytest.warns(GlobalContextWarning):
        rf = interp.receptive_field(model, "2", (12, 12))
    assert rf.is_global and rf.local.size == (5, 5)


def test_spans_are_exact_for_upsampling():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, stride=2, padding=1), nn.Upsample(scale_factor=2))
    rf = interp.receptive_field(model, "1", (10, 10))
    assert rf.stride == (1, 1) and rf.box(0, 0, clip=(10, 10)) == (0, 0, 2, 2)
    assert rf.box(1, 1, clip=(10, 10)) == (0, 0, 2, 2) and rf.box(2, 2, clip=(10, 10)) == (1, 1, 4, 4)
    assert math.isclose(rf.size[0], 3)


class Tokens(nn.Module):
    """Positions flattened to tokens, a per-token MLP, and back; stack/unbind along channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, stride=2, padding=1, padding_mode="reflect")
        self.mlp = nn.Linear(6, 6)
        self.b = nn.Conv2d(6, 4, 3)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        t = self.mlp(x.flatten(2).transpose(1, 2))  # (n, h*w, c)
        x = t.transpose(1, 2).reshape(n, c, h, w)
        s = torch.stack([x, x * 2], dim=1).sum(1)  # a dim inserted before channels, then reduced
        u = s.unbind(1)
        x = torch.stack(u[:3] + u[3:], dim=1)
        x = F.adaptive_avg_pool2d(x, (x.shape[2] - 3, x.shape[3] // 2))  # uneven windows
        return self.b(x[..., None, :, :].squeeze(-3))


def test_tokens_stack_unbind_reflect_uneven_adaptive():
    model = Tokens()
    rfs = interp.receptive_fields(model, (26, 30))
    assert not any(r.measured or r.is_global for r in rfs.values())
    assert rfs["mlp"].output_size == (13, 15) and rfs["mlp"].dims == (1, 1)
    assert rfs["mlp"].size == rfs["a"].size and rfs["mlp"].box(12, 14) == rfs["a"].box(12, 14)
    assert not rfs["b"].exact and not all(rfs["b"].regular)  # uneven adaptive windows: a summary
    check(model, "a", (26, 30))
    check(model, "b", (26, 30))


class GlobalContext(nn.Module):
    """GCNet block: softmax attention over all positions pools a context vector added to the map."""

    def __init__(self, c=6):
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.key = nn.Conv2d(c, 1, 1)
        self.transform = nn.Conv2d(c, c, 1)
        self.b = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        attn = self.key(x).view(n, 1, h * w).softmax(dim=-1)  # (n, 1, hw)
        context = torch.matmul(x.view(n, c, h * w), attn.transpose(1, 2)).view(n, c, 1, 1)
        return self.b(x + self.transform(context))


def test_global_context_block_keeps_the_local_field():
    model = GlobalContext()
    with pytest.warns(GlobalContextWarning):
        rf = interp.receptive_field(model, "b", (15, 17))
    assert rf.is_global and not rf.measured and rf.box(0, 0, clip=(15, 17)) == (0, 0, 15, 17)
    assert (rf.local.size, rf.local.stride, rf.local.offset) == ((5, 5), (2, 2), (-1, -1))


def test_untraceable_model_is_measured_with_warning():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.b = nn.Conv2d(4, 4, 3, stride=2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: fx cannot trace this
                x = x * 2
            return self.b(F.relu(self.pool(torch.sigmoid(self.a(x)))))

    model = Dynamic()
    with pytest.warns(MeasuredFieldWarning, match="not fx-traceable"):
        rfs = interp.receptive_fields(model, (19, 22))
    assert set(rfs) == {"a", "pool", "b"} and all(r.measured and not r.exact for r in rfs.values())
    assert (rfs["b"].size, rfs["b"].stride, rfs["b"].offset) == ((3 + 1 + 2 * 2, 3 + 1 + 2 * 2), (4, 4), (-1, -1))
    for layer in rfs:
        check(model, layer, (19, 22), rf=rfs[layer])


class FlipRoll(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = torch.roll(self.a(x).flip(2), shifts=(3, -2), dims=(2, 3))
        return self.b(torch.flip(x, [-1]).flip(2, 3).flip(-2, -1))


def test_flip_and_roll_move_the_fields():
    model = FlipRoll()
    rf = interp.receptive_field(model, "b", (23, 20))
    assert not rf.measured and rf.regular == (False, False)
    check(model, "b", (23, 20), rf=rf)

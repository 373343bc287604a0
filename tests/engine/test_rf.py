"""Receptive fields against the empirical gradient support of units.

For the empirical side each model is turned into a "positive twin": conv and
linear weights made positive (1/fan-in scale, so activations stay O(1)),
biases zero, BatchNorm an identity, max-pool replaced by the average pool
with the same geometry. On an all-ones image every ReLU/ReLU6 is then in its
linear range, so the gradient of a unit is non-zero exactly on the input
pixels its field covers. The bounding box of that support must equal the
traced field's box clipped to the image.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import interp


def positive_twin(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model).double().eval()
    for name, m in list(twin.named_modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.rand_like(m.weight) * 0.5 / fan_in + 0.5 / fan_in)
                if m.bias is not None:
                    m.bias.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.zero_(), m.running_var.fill_(1 - m.eps), m.weight.fill_(1), m.bias.zero_()
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(m, child_name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode))
    return twin


class _Stop(Exception):
    pass


def support_boxes(model: nn.Module, layer: str, size: tuple[int, int], units: list[tuple]):
    """Bounding boxes (top, left, bottom, right) of d unit / d input != 0.

    ``units`` holds ``(channel, y, x)``; channel ``None`` sums all channels at
    that position (the union of their fields). One forward, stopped at the
    layer, serves every unit.
    """
    module = dict(model.named_modules())[layer]
    captured = []

    def hook(m, i, o):
        captured.append(o)
        raise _Stop

    handle = module.register_forward_hook(hook)
    c = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.ones(1, c, *size, dtype=torch.float64, requires_grad=True)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    out = captured[0]
    boxes = []
    for ch, y, xx in units:
        act = out[0, :, y, xx].sum() if ch is None else out[0, ch, y, xx]
        (g,) = torch.autograd.grad(act, x, retain_graph=True)
        nz = (g[0].abs().sum(0) > 0).nonzero()
        top, left = nz.min(0).values.tolist()
        bottom, right = (nz.max(0).values + 1).tolist()
        boxes.append((top, left, bottom, right))
    return boxes, tuple(out.shape[2:])


def check_layer(model, layer, size, twin=None):
    twin = twin if twin is not None else positive_twin(model)
    rf = interp.receptive_field(model, layer, input_size=size)
    h, w = rf.output_size
    positions = sorted({(h // 2, w // 2), (0, 0), (h - 1, w - 1), (h // 3, (2 * w) // 3)})
    units = [(None, y, x) for y, x in positions]
    # Per channel: after a concat each branch has its own field.
    units += [(end - 1, y, x) for y, x in positions for start, end, _ in rf.channel_fields]
    boxes, out_size = support_boxes(twin, layer, size, units)
    assert out_size == rf.output_size
    for (ch, y, x), box in zip(units, boxes):
        assert box == rf.box(y, x, clip=size, channel=ch), (layer, ch, (y, x), rf)
    return rf


class HandMade(nn.Module):
    """Dilation, groups (depthwise), ceil_mode, asymmetric kernels and strides."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, dilation=2, padding=2)
        self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.dw = nn.Conv2d(4, 4, 5, stride=2, padding=1, groups=4)
        self.c3 = nn.Conv2d(4, 6, (3, 1), stride=(1, 2), padding=(2, 0))
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.act(self.c1(x))
        x = self.act(self.c2(x))
        x = self.pool(x)
        x = self.act(self.dw(x))
        return self.c3(x)


def test_hand_made_stack_formula_and_support():
    model = HandMade().eval()
    rf = interp.receptive_field(model, "c3", input_size=(41, 37))
    # By hand: c1 3 -> c2 (dilated k_eff 5): 7 -> pool 3/2: 9, stride 2 -> dw 5/2: 17, stride 4
    # -> c3 (3,1) stride (1,2): rows 17 + 2*4 = 25, cols 17; strides (4, 8).
    assert rf.size == (25, 17) and rf.stride == (4, 8)
    # offsets: c1 -1; c2 -1-2 = -3; pool -3; dw -3 - 1*2 = -5; c3 rows -5 - 2*4 = -13, cols -5.
    assert rf.offset == (-13, -5)
    twin = positive_twin(model)
    for layer in ["c1", "c2", "pool", "dw", "c3"]:
        check_layer(model, layer, (41, 37), twin)


def test_box_clip_and_global():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    rf = interp.receptive_field(model, "2", input_size=(20, 30))
    assert rf.is_global and rf.box(0, 0) == (0, 0, 20, 30)
    assert any("global" in n for n in rf.notes)
    rf0 = interp.receptive_field(model, "0", input_size=(20, 30))
    assert rf0.box(0, 0) == (-1, -1, 2, 2) and rf0.box(0, 0, clip=(20, 30)) == (0, 0, 2, 2)


@pytest.mark.parametrize(
    "arch,layers,size",
    [
        ("alexnet", ["features.0", "features.2", "features.5", "features.10"], (127, 127)),
        ("vgg16", ["features.2", "features.9", "features.16"], (64, 64)),
        ("resnet18", ["maxpool", "layer1.0.conv2", "layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.bn2"], (96, 96)),
        ("googlenet", ["maxpool1", "conv3", "inception3a.branch2.1", "inception3a.branch4.1", "inception3b", "maxpool3"], (96, 96)),
        ("mobilenet_v2", ["features.1", "features.2.conv.1", "features.3", "features.5.conv.1"], (96, 96)),
    ],
)
def test_torchvision_models_match_gradient_support(arch, layers, size):
    kwargs = {"aux_logits": False, "init_weights": False} if arch == "googlenet" else {}
    model = torchvision.models.get_model(arch, weights=None, **kwargs).eval()
    # The classifier plays no part in these fields; dropping it from the twin
    # keeps the float64 copy small (VGG-16's head alone is 120M parameters).
    for head in ("classifier", "fc"):
        if hasattr(model, head):
            setattr(model, head, nn.Identity())
    twin = positive_twin(model)
    for layer in layers:
        check_layer(model, layer, size, twin)


def test_residual_add_is_union_of_branches():
    model = torchvision.models.resnet18().eval()
    add = interp.receptive_field(model, "layer2.0.add", (96, 96))
    conv = interp.receptive_field(model, "layer2.0.bn2", (96, 96))
    short = interp.receptive_field(model, "layer2.0.downsample.1", (96, 96))
    assert add.size == tuple(max(a, b) for a, b in zip(conv.size, short.size))
    assert add.offset == tuple(min(a, b) for a, b in zip(conv.offset, short.offset))


def test_inception_concat_has_per_branch_fields():
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False).eval()
    rf = interp.receptive_field(model, "inception3a", (224, 224))
    # Four branches: 64 (1x1), 128 (3x3), 32 ("5x5", a 3x3 in torchvision), 32 (pool + 1x1).
    assert [(a, b) for a, b, _ in rf.channel_fields] == [(0, 64), (64, 192), (192, 224), (224, 256)]
    one_by_one, three = rf.for_channel(0), rf.for_channel(100)
    assert three.size[0] == one_by_one.size[0] + 2 * rf.stride[0] == rf.size[0]


def test_untraceable_model_falls_back_with_note():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(4, 4, 3, stride=2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: fx cannot trace this
                x = x * 2
            return self.b(self.a(x))

    model = Dynamic()
    with pytest.warns(UserWarning, match="not fx-traceable"):
        rf = interp.receptive_field(model, "b", (16, 16))
    assert (rf.size, rf.stride, rf.offset, rf.exact) == ((5, 5), (2, 2), (0, 0), False)
    assert interp.layers(model) == ["a", "b"]


def test_float64_model_gets_its_field():
    import torchvision

    from interp.rf import receptive_field

    model = torchvision.models.vgg11(weights=None).double()
    rf = receptive_field(model, "features.3", (64, 64))  # conv3 -> pool2/2 -> conv3: 8 px
    assert rf.size == (8, 8) and rf.stride == (2, 2) and rf.exact

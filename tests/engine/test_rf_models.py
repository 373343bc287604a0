"""Receptive fields of modern architectures against the gradient support of a positive twin.

The first, a middle and the last convolution of each model (random weights,
small inputs) must give exactly the boxes of the independent reference in
``test_rf_ops`` (and, where a layer sees global context through
squeeze-and-excitation, the local field must give the boxes with the global
pooling detached). None of these models may need the measured fallback.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import interp
from test_rf_ops import check, reference_twin

timm = pytest.importorskip("timm")


def _model(name: str) -> nn.Module:
    if name.startswith("timm:"):
        model = timm.create_model(name[5:], pretrained=False)
    else:
        kwargs = {"aux_logits": False, "init_weights": False} if name == "inception_v3" else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    return model.eval()


def _convs(model: nn.Module, rfs: dict) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n in rfs]
    return [names[0], names[len(names) // 2], names[-1]]


@pytest.mark.parametrize("name,size,global_context", [
    ("convnext_tiny", 64, False),
    ("shufflenet_v2_x0_5", 64, False),
    ("efficientnet_b0", 64, True),
    ("regnet_y_400mf", 64, True),
    ("inception_v3", 107, False),
    ("timm:res2net50_26w_4s", 64, False),
    ("timm:cspresnet50", 64, False),
    ("timm:hrnet_w18_small", 64, False),
])
def test_modern_models_match_gradient_support(name, size, global_context):
    model = _model(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rfs = interp.receptive_fields(model, (size, size))
    assert not any(r.measured for r in rfs.values()), name
    assert not any(issubclass(w.category, interp.notices.MeasuredFieldWarning) for w in caught)
    layers = _convs(model, rfs)
    assert any(rfs[n].is_global for n in layers) == global_context
    twin = reference_twin(model)
    for layer in layers:
        check(model, layer, (size, size), rf=rfs[layer], twin=twin)


def test_inception_v3_boxes_end_where_the_gradient_does():
    # Unpadded strided convolutions and pools on 224 px never read the last three
    # rows and columns (223 after Conv2d_1a, 221 after maxpool2); a later padded
    # layer's last units nominally reach past them, their boxes must not.
    model = _model("inception_v3")
    layer = "Mixed_5b.branch5x5_2.conv"
    rf = interp.receptive_field(model, layer, (224, 224))
    last = rf.output_size[0] - 1
    assert rf.box(last, last)[2] > 224 and rf.read_extent == ((0, 221), (0, 221))
    assert rf.box(last, last, clip=(224, 224))[2:] == (221, 221)
    assert not rf.measured and rf.exact
    check(model, layer, (224, 224), rf=rf)


def test_se_layers_keep_a_local_field():
    model = _model("efficientnet_b0")
    with pytest.warns(interp.notices.GlobalContextWarning):
        rf = interp.receptive_field(model, "features.3.0.block.3.0", (96, 96))
    assert rf.is_global and rf.local is not None and not rf.local.is_global
    assert rf.spatial.size[0] < 96 * 4 and rf.spatial.stride == (8, 8)


def test_read_only_model_untouched():
    model = _model("shufflenet_v2_x0_5").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    interp.receptive_fields(model, (64, 64))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())

"""torchvision weights into our adapters: ResNet-18, GoogLeNet -> InceptionNet, VGG-16 (and vgg16_bn).

Every test builds a randomly initialised torchvision model (seeded; never a
download), gives its BatchNorm layers non-trivial statistics so that a wrongly
mapped or wrongly converted BatchNorm would show, saves its state dict where
the adapters read it, and checks that our adapter computes torchvision's
logits in eval mode.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import adapters
from adapters import hub, inception, vgg16


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
                # Small variances make the epsilon matter (GoogLeNet: 1e-3 there, 1e-5 here);
                # gamma ~ sqrt(var) keeps each layer's output scale near 1, so logits stay O(1).
                var = torch.rand(n, generator=gen) * 0.05 + 0.002
                m.running_var.copy_(var)
                m.weight.copy_(var.sqrt() * (torch.rand(n, generator=gen) * 0.8 + 0.8))
                m.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return model.eval()


def _calibrate_bn(model: nn.Module, x: torch.Tensor, seed: int) -> nn.Module:
    """BatchNorm statistics measured on ``x`` (one pass), then random gamma / beta.

    torchvision's GoogLeNet initialises weights with std 0.01, so with made-up
    statistics its activations fade to nothing and the logits would not show a
    difference anywhere; measured statistics keep every layer at unit scale.
    Its variances are small (many below 1e-2), so the 1e-3 vs 1e-5 epsilon matters.
    """
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    model.train()
    with torch.no_grad():
        model(x)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) * 0.4 - 0.2)
    return model.eval()


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| relative to the size of the logits (max |b|)."""
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture()
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("CNN_INTERNALS_OFFLINE", "1")
    return tmp_path


def test_resnet18_takes_torchvision_weights_from_the_hub_cache(torch_home):
    import torchvision

    torch.manual_seed(0)
    ref = _randomise_bn(torchvision.models.resnet18(), 1)
    file = hub.torchvision_weights_file("resnet18")
    file.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), file)
    model, preprocess = adapters.load("resnet18", weights="torchvision:resnet18")
    assert type(model).__name__ == "ResNet18" and not model.training and model.fc.out_features == 1000
    # torchvision's preprocess (ImageNet mean/std), not the Imagenette statistics.
    assert list(preprocess.transforms[-1].mean) == [0.485, 0.456, 0.406]
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = model(x), ref(x)
    assert b.std() > 1
    assert _max_rel_diff(a, b) <= 1e-5, _max_rel_diff(a, b)


def test_googlenet_transfers_exactly_with_torchvision_pools(tmp_path):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.googlenet(aux_logits=False, transform_input=False, init_weights=True)
    _calibrate_bn(ref, torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(7)), 1)
    assert float(ref.inception4a.branch3[1].bn.running_var.min()) < 1e-2  # the epsilon is not negligible
    state = inception.from_torchvision_state_dict(ref.state_dict())
    ours = inception.InceptionNet(num_classes=1000)
    ours.load_state_dict(state)
    ours.eval()
    # The "5x5" branch: torchvision's 3x3 kernel sits in the centre of a zero 5x5 kernel.
    k = ours.inception4a.branch3.conv2.weight
    assert k.shape == (48, 16, 5, 5)
    assert torch.equal(k[:, :, 1:4, 1:4], ref.inception4a.branch3[1].conv.weight)
    rim = k.detach().clone()
    rim[:, :, 1:4, 1:4] = 0
    assert not rim.any()
    assert torch.equal(ours.conv3.bias, torch.zeros(192))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        b = ref(x)
        seed_pools = ours(x)
        inception.use_torchvision_pools(ours)
        a = ours(x)
    assert b.std() > 1  # non-trivial logits (measured: std 6.2, max 22.5)
    assert _max_rel_diff(a, b) <= 1e-5, _max_rel_diff(a, b)
    # With the seed's own pools (windows shifted by a pixel, 3x3 instead of 2x2 at
    # maxpool4) the same weights give different logits: the pools are the one difference.
    assert _max_rel_diff(seed_pools, b) > 1e-2


def test_googlenet_published_file_layout_through_load(tmp_path):
    # The published file holds the auxiliary heads and expects transform_input=True;
    # our preprocess then normalises with 0.5 / 0.5, the same map as torchvision's
    # ImageNet normalisation followed by transform_input.
    import torchvision
    from PIL import Image

    torch.manual_seed(3)
    saved = torchvision.models.googlenet(aux_logits=True, transform_input=True, init_weights=True)
    _calibrate_bn(saved, torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(8)), 4)
    path = tmp_path / "googlenet-1378be20.pth"
    torch.save(saved.state_dict(), path)
    ref = torchvision.models.googlenet(aux_logits=False, transform_input=True, init_weights=False)
    ref.load_state_dict({k: v for k, v in saved.state_dict().items() if not k.startswith("aux")})
    ref.eval()
    model, preprocess = adapters.load("inception", weights=f"torchvision:googlenet:{path}", torchvision_pools=True)
    assert model.fc.out_features == 1000 and isinstance(model.maxpool4, nn.MaxPool2d) and model.maxpool4.kernel_size == 2
    tv_preprocess = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1.transforms()
    rng = torch.Generator().manual_seed(5)
    img = Image.fromarray(torch.randint(0, 256, (160, 200, 3), dtype=torch.uint8, generator=rng).numpy())
    with torch.no_grad():
        a = model(preprocess(img)[None])
        b = ref(tv_preprocess(img)[None])
    assert _max_rel_diff(a, b) <= 1e-5, _max_rel_diff(a, b)


def test_vgg16_transfers_exactly_classifier_included(tmp_path):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.vgg16(init_weights=False).eval()  # PyTorch's default init: random, and faster
    path = tmp_path / "vgg16.pth"
    torch.save(ref.state_dict(), path)
    model, _ = adapters.load("vgg16", weights=f"torchvision:vgg16:{path}")
    assert model.fc3.out_features == 1000 and torch.equal(model.conv13.weight, ref.features[28].weight)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(x), ref(x)
    assert b.abs().max() > 1e-2
    assert _max_rel_diff(a, b) <= 1e-5, _max_rel_diff(a, b)


def test_vgg16_bn_folds_batchnorm_into_the_convolutions():
    import torchvision

    torch.manual_seed(0)
    ref = _randomise_bn(torchvision.models.vgg16_bn(init_weights=False), 2)
    model = vgg16.VGG16(num_classes=1000)
    model.load_state_dict(vgg16.from_torchvision_state_dict(ref.state_dict()))
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(x), ref(x)
    assert b.abs().max() > 1e-2
    assert _max_rel_diff(a, b) <= 1e-5, _max_rel_diff(a, b)


def test_transfer_errors_are_one_clear_line(torch_home, tmp_path):
    with pytest.raises(ValueError, match="torchvision:vgg16 or torchvision:vgg16_bn") as err:
        adapters.load("vgg16", weights="torchvision:alexnet")
    assert "\n" not in str(err.value)
    # Offline and not cached: the file and the folder are named.
    with pytest.raises(FileNotFoundError) as err:
        adapters.load("inception", weights="torchvision:googlenet")
    msg = str(err.value)
    assert "googlenet-1378be20.pth" in msg and str(torch_home / "torch" / "hub" / "checkpoints") in msg
    assert "\n" not in msg
    # A state dict of another network.
    path = tmp_path / "not-googlenet.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a torchvision googlenet state dict"):
        adapters.load("inception", weights=f"torchvision:googlenet:{path}")
    with pytest.raises(ValueError, match="transform_input applies"):
        adapters.load("inception", transform_input=False)

"""The fast mining path (interp.fast): same top-k as the plain pass, user's model untouched, clean fallbacks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import interp
from interp import fast
from interp.mine import mine_local

from _bn import randomise_bn


class BnNet(nn.Module):
    """conv -> BN -> ReLU twice, a BN with negative and zero scales, a conv without BN, a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)  # no BN after it
        self.conv4 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)) + y)
        y = self.relu(self.conv3(y))
        return self.relu(self.bn4(self.conv4(y)))


def bn_net(zero_scale: bool = False) -> nn.Module:
    torch.manual_seed(0)
    m = BnNet()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2, m.bn4):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
        m.bn2.weight[1] = -0.7  # a negative scale: the max comes from the folded output's min
        if zero_scale:
            m.bn4.weight[0] = 0.0  # cannot be folded: conv4 stays as it is
    return m.eval()


def images(n: int = 300, size: int = 24) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def entries(tk):
    return {(n, c): [(e.index, e.y, e.x, e.value) for e in tk.entries[n][c]] for n in tk.entries
            for c in tk.entries[n]}


def compare(a, b, rel: float = 1e-5) -> int:
    """Entries that differ between two results; each must be a near-tie (values within ``rel``)."""
    differ = 0
    ea, eb = entries(a), entries(b)
    assert ea.keys() == eb.keys()
    for key in ea:
        for (ia, ya, xa, va), (ib, yb, xb, vb) in zip(ea[key], eb[key]):
            assert abs(va - vb) <= rel * max(abs(vb), 1e-6), (key, va, vb)
            differ += (ia, ya, xa) != (ib, yb, xb)
    return differ


@pytest.fixture(autouse=True)
def _screen_small_sets(monkeypatch):
    """These tests mine a few dozen images: let the screen serve them (it waits for 2,048 by default)."""
    monkeypatch.setattr(fast, "SCREEN_MIN_IMAGES", 0)


def test_small_sets_take_the_plain_pass(monkeypatch):
    monkeypatch.setattr(fast, "SCREEN_MIN_IMAGES", 100)
    assert not fast.applies(torch.zeros(99, 3, 8, 8), torch.device("cpu"))
    assert fast.applies(torch.zeros(100, 3, 8, 8), torch.device("cpu"))


@pytest.mark.parametrize("zero_scale", [False, True])
def test_fast_equals_plain_pass(zero_scale):
    model, x = bn_net(zero_scale), images()
    layers = ["conv1", "conv2", "conv3", "conv4"]
    a = mine_local(model, x, layers, k=5, batch_size=32, receptive_fields=False, fast=True)
    b = mine_local(model, x, layers, k=5, batch_size=32, receptive_fields=False, fast=False)
    # The exact stage reruns the plain path on the candidates: values agree to fp32 rounding
    # (other batches), and entries may differ only as near-ties (none seen here).
    assert compare(a, b) == 0


def test_the_screen_is_really_used_and_folds_bn():
    model, x = bn_net(), images(8)
    screen = fast.build_screen(model, ["conv1", "conv2", "conv4"], {"conv1": None, "conv2": [0, 1, 2], "conv4": None},
                               x)
    assert screen is not None
    assert set(screen.affine) == {"conv1", "conv2", "conv4"}
    assert screen.signed["conv2"] and not screen.signed["conv1"]
    got = screen.run(x)
    with torch.no_grad():
        ref = {}
        h = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: ref.__setitem__(n, o.amax(dim=(2, 3))))
             for n in ("conv1", "conv2", "conv4")]
        model(x)
        for hh in h:
            hh.remove()
    torch.testing.assert_close(got["conv2"], ref["conv2"][:, [0, 1, 2]], rtol=0.05, atol=0.05)
    torch.testing.assert_close(got["conv1"], ref["conv1"][:, :6], rtol=0.05, atol=0.05)


def test_a_zero_bn_scale_is_not_folded():
    model, x = bn_net(zero_scale=True), images(8)
    screen = fast.build_screen(model, ["conv4"], {"conv4": None}, x)
    assert screen is not None and "conv4" not in screen.affine


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [getattr(m, "inplace", None) for m in model.modules()],
            [p.stride() for p in model.parameters()])


def test_users_model_left_as_it_was_also_on_error():
    model = bn_net()
    model.train()
    model.conv2.training = False
    before = _snapshot(model)
    interp.mine(model, images(64), "all-conv", k=3, progress=False)
    after = _snapshot(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]
    with pytest.raises(ValueError):
        interp.mine(model, images(64), "conv1", channels=[99], k=3, progress=False)
    assert _snapshot(model)[1:] == before[1:]
    assert all(torch.equal(before[0][k], v) for k, v in _snapshot(model)[0].items())


def test_model_without_bn_and_traced_node_layers():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1)).eval()
    x = images(120, 16)
    a = mine_local(plain, x, "all-conv", k=4, receptive_fields=False, fast=True)
    b = mine_local(plain, x, "all-conv", k=4, receptive_fields=False, fast=False)
    assert compare(a, b) == 0
    model = bn_net()
    # A traced functional node ("add") is not a module: the screen declines, the plain pass runs.
    assert fast.build_screen(model, ["add"], {"add": None}, x[:2]) is None
    a = mine_local(model, images(80), ["add", "conv2"], k=3, receptive_fields=False, fast=True)
    b = mine_local(model, images(80), ["add", "conv2"], k=3, receptive_fields=False, fast=False)
    assert compare(a, b) == 0


def test_untraceable_model_falls_back():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.conv(x)
            return self.conv(-x)

    model = Branchy().eval()
    x = images(40, 12)
    assert fast.build_screen(model, ["conv"], {"conv": None}, x[:2]) is None
    a = mine_local(model, x, "conv", k=3, receptive_fields=False, fast=True)
    b = mine_local(model, x, "conv", k=3, receptive_fields=False, fast=False)
    assert compare(a, b) == 0


def test_dataset_images_and_checked_rounds(monkeypatch):
    # A tiny initial margin forces the check to widen the candidates (more rounds), still exact.
    monkeypatch.setattr(fast, "SCREEN_MARGIN", 0.0)
    model, x = bn_net(), images(200)
    data = interp.data.TensorImages(x)
    a = mine_local(model, data, ["conv2", "conv4"], k=4, batch_size=16, receptive_fields=False, fast=True)
    b = mine_local(model, data, ["conv2", "conv4"], k=4, batch_size=16, receptive_fields=False, fast=False)
    assert compare(a, b) == 0


def test_candidates_run_only_as_deep_as_they_are_needed():
    # Exact-stage images that are candidates of conv1 alone stop after conv1: conv4 sees fewer fp32 rows
    # (the screen runs in bfloat16 on a copy, so fp32 rows at the user's modules are the exact stage's).
    model, x = bn_net(), images(300)
    rows = {"conv1": 0, "conv4": 0}
    hooks = [getattr(model, n).register_forward_hook(
        lambda m, i, o, n=n: rows.__setitem__(n, rows[n] + (len(o) if o.dtype == torch.float32 else 0)))
        for n in rows]
    try:
        a = mine_local(model, x, ["conv1", "conv4"], k=5, batch_size=8, receptive_fields=False, fast=True)
    finally:
        for h in hooks:
            h.remove()
    b = mine_local(model, x, ["conv1", "conv4"], k=5, batch_size=8, receptive_fields=False, fast=False)
    assert compare(a, b) == 0
    assert 0 < rows["conv4"] < rows["conv1"] < len(x)


def test_the_last_conv_computes_only_the_channels_mined():
    model, x = bn_net(), images(8)
    screen = fast.build_screen(model, ["conv2", "conv4"], {"conv2": [1, 2], "conv4": [2, 3]}, x)
    # conv2 also feeds conv3: all its channels stay; conv4 feeds only its maxima: channels 2..3 alone.
    assert screen.narrowed == ["conv4"]
    got = screen.run(x)
    with torch.no_grad():
        ref = model.conv4(model.relu(model.conv3(model.relu(model.bn2(model.conv2(
            model.relu(model.bn1(model.conv1(x))))) + model.relu(model.bn1(model.conv1(x)))))))
    torch.testing.assert_close(got["conv4"], ref[:, 2:4].amax(dim=(2, 3)), rtol=0.05, atol=0.05)
    assert model.conv4.out_channels == 6 and model.conv4.weight.shape[0] == 6  # the user's model is untouched


def test_candidates_decoded_by_a_worker_process_keep_their_dataset_indices():
    # A subset's positions are not its dataset indices: the worker must read candidates by index.
    model, x = bn_net(), images(240)
    data = interp.data.SubsetImages(interp.data.TensorImages(x), list(range(239, -1, -2)))
    a = mine_local(model, data, ["conv1", "conv4"], k=4, batch_size=16, receptive_fields=False, fast=True,
                   num_workers=1)
    b = mine_local(model, data, ["conv1", "conv4"], k=4, batch_size=16, receptive_fields=False, fast=False)
    assert compare(a, b) == 0
    assert all(e.index % 2 == 1 for ents in a.entries.values() for row in ents.values() for e in row)


def _natural_images(root, n: int, size: int) -> torch.Tensor:
    """``n`` Imagenette val images, every class, resized to ``size`` px and normalised."""
    from torchvision.transforms import v2

    pre = v2.Compose([v2.Resize(size), v2.CenterCrop(size), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                      v2.Normalize([0.46, 0.46, 0.43], [0.28, 0.28, 0.30])])
    data = interp.data.open_images(root / "imagenette2-160", pre, split="val", limit=n)
    return torch.stack([data.item(i) for i in range(len(data))])


def test_a_real_network_on_real_images_at_full_scale(data_root, monkeypatch):
    # The default threshold (2,048 images) on natural images and a ResNet-18 with trained-like BN
    # statistics: the screen serves, far fewer images reach the exact stage, and the top-k of all 20
    # convs is the plain pass's. How many entries differ (near-ties only, values within 1e-5): 0 seen.
    import torchvision

    monkeypatch.setattr(fast, "SCREEN_MIN_IMAGES", 2048)
    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.resnet18(num_classes=10).eval(), 0.3, (0.5, 2.0), (0.3, 1.5))
    x = _natural_images(data_root, 2048, 64)
    assert fast.applies(x, torch.device("cpu"))
    passes = []
    real_pass = fast._exact_pass

    def counting(model, todo, data, need, *args, **kw):
        passes.append(set().union(*need.values()))
        return real_pass(model, todo, data, need, *args, **kw)

    monkeypatch.setattr(fast, "_exact_pass", counting)
    a = mine_local(model, x, "all-conv", k=9, receptive_fields=False, fast=True)
    monkeypatch.setattr(fast, "_exact_pass", real_pass)
    b = mine_local(model, x, "all-conv", k=9, receptive_fields=False, fast=False)
    assert passes, "the screen did not serve"
    assert len(set().union(*passes)) < len(x) // 2
    assert compare(a, b) == 0

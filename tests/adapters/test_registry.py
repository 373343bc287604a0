"""The model registry (cards), the shipped Imagenette statistics, and loading without any dataset.

The statistics test recomputes the Imagenette training statistics from the
data folder (the full 9,469-image train split: about 10 s here) and checks
the shipped file holds exactly them; the no-dataset tests point
``CNN_INTERNALS_DATA`` at an empty folder and make every dataset reader
raise, then check each built-in model still loads with the very preprocess
it had when it read the statistics from the data folder.
"""
from __future__ import annotations

import ast
import gc
import importlib
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2 as T

import adapters
from adapters import preprocess as P
from adapters import registry
from adapters import datasets
from adapters.datasets import imagenette

from conftest import REPO

#: The tables adapters/__init__.py held before the cards (git history), in their order.
OLD_TWINS = {
    "lenet5": (),
    "alexnet": ("torchvision:alexnet",),
    "vgg16": ("torchvision:vgg16", "torchvision:vgg16_bn"),
    "inception": ("torchvision:googlenet",),
    "resnet18": ("torchvision:resnet18",),
    "mobilenet": ("timm:mobilenetv1_100", "pretrained:mobilenet_v1_100_tflite", "pretrained:mobilenet_v1_025_keras"),
}
OLD_FIGURE_LAYERS = {
    "lenet5": ("conv1", "conv2", "conv3"),
    "alexnet": ("conv2", "conv3", "conv4", "conv5"),
    "vgg16": ("conv2", "conv4", "conv6", "conv8", "conv10", "conv13"),
    "inception": tuple(f"conv{n}" for n in range(2, 19, 2)),
    "resnet18": ("conv2", "conv4", "conv6", "conv8", "conv10", "conv13"),
    "mobilenet": ("conv2", "conv6", "conv10", "conv14", "conv18", "conv22"),
}
#: Built-in name -> the module that must register its card.
HOME = {
    "lenet5": "adapters.lenet5",
    "alexnet": "adapters.alexnet",
    "vgg16": "adapters.vgg16",
    "inception": "adapters.inception",
    "resnet18": "adapters.resnet18",
    "mobilenet": "adapters.mobilenet",
    "pretrained:mobilenet_v1_025_keras": "adapters.pretrained",
    "pretrained:mobilenet_v2_int8": "adapters.pretrained",
    "pretrained:mobilenet_v1_100_tflite": "adapters.pretrained",
}
IMAGENETTE_MODELS = ("alexnet", "vgg16", "inception", "resnet18", "mobilenet")


def _photos() -> list[Image.Image]:
    """A random non-square RGB image, a greyscale one, and a real shipped photo."""
    rng = np.random.default_rng(0)
    real = sorted((REPO / "adapters" / "data" / "natural").glob("*.JPEG"))[0]
    return [Image.fromarray(rng.integers(0, 256, (160, 213, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (300, 240), dtype=np.uint8)),
            Image.open(real).convert("RGB")]


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------- cards


def test_every_built_in_has_a_card_registered_from_its_own_module():
    assert set(HOME) <= set(adapters.names())
    for name, module in HOME.items():
        card = adapters.card(name)
        assert isinstance(card, adapters.Card) and card.name == name
        assert card.build.__module__ == module == registry.registered_by(name), name
        assert adapters.loader(name) is card.build
        assert card.summary and "\n" not in card.summary
        assert card.dataset in ("mnist", "imagenette", "imagenet")
    assert [c.name for c in adapters.cards()] == sorted(c.name for c in adapters.cards())


@pytest.mark.parametrize("name", sorted(HOME))
def test_card_params_and_preprocess_are_those_of_the_built_model(name):
    card = adapters.card(name)
    torch.manual_seed(0)
    model, preprocess = card.build()
    assert _n_params(model) == card.params
    assert not model.training
    # The factory gives the same transform as build(), without building anything.
    image = _photos()[0]
    if card.dataset == "mnist":
        image = image.convert("L")
    assert torch.equal(card.preprocess()(image), preprocess(image))
    del model
    gc.collect()


def test_twins_and_figure_layers_are_the_old_tables_and_read_only():
    assert dict(adapters.TWINS) == OLD_TWINS and list(adapters.TWINS) == list(OLD_TWINS)
    assert dict(adapters.FIGURE_LAYERS) == OLD_FIGURE_LAYERS and list(adapters.FIGURE_LAYERS) == list(OLD_FIGURE_LAYERS)
    assert all(adapters.card(n).twins == t for n, t in OLD_TWINS.items())
    with pytest.raises(TypeError):
        adapters.TWINS["vgg16"] = ()  # type: ignore[index]
    with pytest.raises(TypeError):
        adapters.FIGURE_LAYERS["new"] = ("conv1",)  # type: ignore[index]


def test_registering_a_model_from_its_file_needs_no_table(monkeypatch):
    # Work on copies of the registry's tables so that nothing leaks into other tests.
    monkeypatch.setattr(registry, "_CARDS", dict(registry._CARDS))
    monkeypatch.setattr(registry, "_ORIGINS", dict(registry._ORIGINS))

    def load(weights=None, **kwargs):
        return torch.nn.Conv2d(3, 4, 3), lambda x: x

    card = adapters.register_model(adapters.Card(
        name="tiny", build=load, preprocess=lambda: (lambda x: x), params=112, summary="a test model",
        dataset="imagenette", figure_layers=["conv1"], twins=["torchvision:alexnet"]))
    assert card.figure_layers == ("conv1",) and adapters.card("tiny") is card
    assert registry.registered_by("tiny") == __name__
    assert "tiny" in adapters.names() and adapters.FIGURE_LAYERS["tiny"] == ("conv1",)
    assert adapters.TWINS["tiny"] == ("torchvision:alexnet",)
    assert adapters.weights_source("tiny") == {"random": True}
    model, _ = adapters.load("tiny")
    assert _n_params(model) == card.params
    with pytest.raises(ValueError, match="already registered by adapters.vgg16"):
        adapters.register_model(adapters.Card(name="vgg16", build=load, preprocess=lambda: None, params=0,
                                              summary="", dataset="imagenette"))


def test_unknown_names_suggest_close_ones():
    for call in (adapters.load, adapters.loader, adapters.card):
        with pytest.raises(ValueError, match="unknown model 'vgg61'. Did you mean: vgg16"):
            call("vgg61")


def test_weights_source_comes_from_the_cards(tmp_path, monkeypatch):
    lenet = adapters.weights_source("lenet5")
    assert Path(lenet["file"]) == adapters.card("lenet5").weights_file
    assert lenet["sha256"] == adapters.file_sha256(REPO / "adapters" / "weights" / "lenet5.safetensors")
    assert adapters.weights_source("vgg16") == {"random": True}
    tflite = adapters.weights_source("pretrained:mobilenet_v1_100_tflite")
    assert Path(tflite["file"]).parent == REPO / "adapters" / "weights"
    # The large twins' files live in the weights folder, looked up when asked.
    monkeypatch.setenv("CNN_INTERNALS_WEIGHTS", str(tmp_path))
    assert adapters.weights_source("pretrained:mobilenet_v2_int8") == {
        "name": "pretrained:mobilenet_v2_int8", "file": str(tmp_path / "torchscript" / "mobilenetv2_quantized.pt")}


def test_bare_registered_loaders_still_work(monkeypatch):
    monkeypatch.setattr(registry, "_LOADERS", dict(registry._LOADERS))
    adapters.register("by-string", "adapters.vgg16:load")
    assert adapters.loader("by-string") is adapters.card("vgg16").build
    assert adapters.weights_source("by-string") == {"name": "by-string"}


def test_registry_and_model_files_import_no_model_file_dataset_or_training():
    """registry imports no model file (model files import it); no model-side file imports a dataset reader."""
    model_side = ["registry", "preprocess", "init", "lenet5", "alexnet", "vgg16", "inception", "resnet18",
                  "mobilenet", "pretrained", "hub", "checkpoint", "importers/__init__", "importers/keras",
                  "importers/tflite", "importers/torchscript"]
    for stem in model_side:
        tree = ast.parse((REPO / "adapters" / f"{stem}.py").read_text(encoding="utf-8"))
        targets = {(n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        targets |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any("datasets" in t for t in targets), stem
        if stem == "registry":
            assert not (targets & {"adapters", ""}) and not any(t.startswith(".") for t in targets), targets


# ----------------------------------------------------------------- shipped statistics


@pytest.fixture(scope="module")
def recomputed(data_root, tmp_path_factory):
    """The statistics of the full Imagenette train split, recomputed from the images (no cache)."""
    return imagenette.dataset_stats(data_root, cache_dir=tmp_path_factory.mktemp("stats"), recompute=True,
                                    progress=False)


def test_shipped_stats_are_the_full_training_split_statistics(recomputed):
    shipped = P.imagenette_stats()
    assert (shipped.n_images, shipped.size, shipped.key) == (9469, 160, "f5757281301f2d99")
    assert (recomputed.n_images, recomputed.size, recomputed.key) == (shipped.n_images, shipped.size, shipped.key)
    for field in ("mean", "std", "eigvals", "eigvecs", "mean_image"):
        # float64 sums over the same images in the same order: bit for bit the same float32 values.
        assert torch.equal(getattr(shipped, field), getattr(recomputed, field)), field
        assert getattr(shipped, field).dtype == torch.float32
    assert P.IMAGENETTE_STATS_FILE.stat().st_size < 1_000_000
    assert imagenette.DatasetStats is P.DatasetStats
    back = P.DatasetStats.from_dict(shipped.to_dict())
    assert back.key == shipped.key and torch.equal(back.mean_image, shipped.mean_image)


def _old_eval_preprocess(name: str, stats: P.DatasetStats):
    """The evaluation transforms as the recipes built them when loading read the data folder."""
    to_float = [T.ToImage(), T.RGB(), T.ToDtype(torch.float32, scale=True)]
    if name != "alexnet":
        return T.Compose([T.Resize(256, antialias=True), T.CenterCrop(224), *to_float,
                          T.Normalize(stats.mean.tolist(), stats.std.tolist())])
    mean_256 = F.interpolate(stats.mean_image[None], size=(256, 256), mode="bilinear", align_corners=False,
                             antialias=False)[0]
    base = T.Compose([T.Resize(256, antialias=True), T.CenterCrop(256), *to_float])
    return lambda im: (base(im) - mean_256)[:, 16:240, 16:240]


@pytest.fixture()
def no_dataset(tmp_path, monkeypatch):
    """An empty data folder and cache, and every dataset reader made to fail loudly."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("CNN_INTERNALS_DATA", str(empty))
    monkeypatch.setenv("CNN_INTERNALS_CACHE", str(tmp_path / "cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("loading a model read a dataset")

    for name in ("dataset_stats", "compute_stats", "find_split_dir"):
        monkeypatch.setattr(imagenette, name, refuse)
    monkeypatch.setattr(imagenette.Imagenette, "__init__", refuse)
    # The package re-exports a function named like its module: reach the module itself.
    monkeypatch.setattr(importlib.import_module("adapters.datasets.mnist"), "mnist", refuse)
    monkeypatch.setattr(datasets, "mnist", refuse)
    P.imagenette_stats.cache_clear()  # read the shipped file inside the test
    yield empty
    P.imagenette_stats.cache_clear()


@pytest.mark.parametrize("name", IMAGENETTE_MODELS)
def test_imagenette_models_load_without_data_and_preprocess_as_before(name, no_dataset, recomputed):
    torch.manual_seed(0)
    model, preprocess = adapters.load(name)
    assert not model.training
    old = _old_eval_preprocess(name, recomputed)
    for image in _photos():
        x = preprocess(image)
        assert x.shape == (3, 224, 224) and torch.equal(x, old(image)), name
    del model
    gc.collect()


def test_lenet5_and_the_shipped_twin_load_without_data(no_dataset):
    model, preprocess = adapters.load("lenet5")
    assert preprocess(_photos()[1]).shape == (1, 32, 32) and not model.training
    twin, tw_pre = adapters.load("pretrained:mobilenet_v1_100_tflite")
    assert tw_pre(_photos()[0]).shape == (3, 224, 224) and twin.fc.out_features == 1001


def test_model_loaders_take_no_data_options():
    for name in IMAGENETTE_MODELS:
        params = inspect.signature(adapters.loader(name)).parameters
        assert "data_root" not in params and "stats" not in params, name

"""torchvision / timm models by name (``"torchvision:resnet18"``, ``"timm:mobilenetv1_100"``).

Three ways to get weights, chosen by the ``weights`` argument of :func:`load`:

``None``
    Random initialisation (nothing is read or downloaded).
``"pretrained"`` / ``"DEFAULT"`` / a weights-enum member name (``"IMAGENET1K_V1"``)
    The library's own published weights, through the library's own cache:
    torchvision's weights enum and the torch.hub cache
    ``$TORCH_HOME/hub/checkpoints/<file name from the enum's URL>``; timm's
    pretrained config and the Hugging Face cache
    (``$HF_HUB_CACHE`` or ``$HF_HOME/hub``, ``models--<org>--<name>/snapshots/*/``)
    or, for timm weights hosted by URL, the torch.hub cache. A file already in
    the cache is used as is; a missing one is downloaded by the library,
    unless offline mode is on (``offline=True`` or ``CNN_INTERNALS_OFFLINE=1``):
    then :func:`load` raises one ``FileNotFoundError`` naming the exact file,
    where to download it from, and the folder to put it in.
A path to a ``.pth`` / ``.pt`` / ``.safetensors`` file
    A local state dict (read with ``weights_only=True`` or safetensors).

The preprocess is always the weights' own: ``Weights.transforms()`` for
torchvision (the enum's transform even for random or local weights, so a user's
fine-tuned copy is fed like the original; rebuilt as the equivalent v2
``Compose`` so the engine can show images without the normalisation), and timm's
``resolve_data_config`` rebuilt as a torchvision v2 pipeline (timm's own
``create_transform`` passes ``uint8`` tensors through un-scaled; the toolkit
feeds PIL images *or* tensors).
"""
from __future__ import annotations

import contextlib
import difflib
import os
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

import torch
import torchvision
from torchvision.models import _api as tv_api
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms._presets import ImageClassification

from .checkpoint import load_into, load_state_dict

__all__ = [
    "load",
    "offline_mode",
    "torch_hub_checkpoint_dir",
    "hf_hub_cache_dir",
    "PRETRAINED_WORDS",
    "parse_torchvision_weights",
    "torchvision_state_dict",
    "torchvision_weights_file",
    "torchvision_into",
    "compose_of",
    "imagenet_preprocess",
]

# ``weights`` values meaning "the library's default pretrained weights".
PRETRAINED_WORDS = ("pretrained", "DEFAULT", "default")

_TRUE = ("1", "true", "yes", "on")


def offline_mode(offline: bool | None = None) -> bool:
    """Whether downloads are forbidden: ``offline`` if given, else ``$CNN_INTERNALS_OFFLINE``."""
    if offline is not None:
        return bool(offline)
    return os.environ.get("CNN_INTERNALS_OFFLINE", "").strip().lower() in _TRUE


def torch_hub_checkpoint_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (torch.hub's cache), read from the environment now."""
    # torch.hub.get_dir() re-reads TORCH_HOME on every call unless set_dir() pinned it.
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``.

    Read from the environment at call time (``huggingface_hub.constants`` freezes
    it at import, which would ignore a test's temporary cache).
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
    return Path(home) / "hub"


def _is_path(weights: str | os.PathLike) -> bool:
    text = str(weights)
    return isinstance(weights, os.PathLike) or text.endswith((".pth", ".pt", ".safetensors", ".bin")) or os.sep in text


# -- torchvision -----------------------------------------------------------


def _tv_weights(arch: str, selector: str) -> torchvision.models.WeightsEnum:
    """The torchvision weights-enum member ``selector`` of ``arch``."""
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise ValueError(f"torchvision model {arch!r} has no published weights; pass weights=PATH") from None
    if selector in PRETRAINED_WORDS:
        return enum.DEFAULT
    try:
        return enum[selector]
    except KeyError:
        options = ", ".join(m.name for m in enum)
        raise ValueError(
            f"{selector!r} is neither a file nor a weights name of torchvision:{arch}; use one of {options}, "
            "'pretrained', or a .pth/.safetensors path"
        ) from None


def torchvision_weights_file(arch: str, selector: str = "DEFAULT") -> Path:
    """Where torch.hub caches the torchvision weights ``selector`` of ``arch``.

    The file name is the last component of the enum's URL (torch.hub keeps it),
    e.g. ``resnet18-f37072fd.pth`` for ``ResNet18_Weights.IMAGENET1K_V1``.
    """
    w = _tv_weights(arch, selector)
    return torch_hub_checkpoint_dir() / os.path.basename(urlparse(w.url).path)


@contextlib.contextmanager
def _tv_safe_state_dicts(offline: bool) -> Iterator[None]:
    """Make torchvision's builders read weights with ``weights_only=True`` (and never download offline).

    torchvision's ``Weights.get_state_dict`` calls torch.hub's
    ``load_state_dict_from_url`` with ``weights_only=False``; the builders also
    set model options from the weights (GoogLeNet's ``transform_input``, the
    class count), which we want, so we keep the builder and only swap the reader.
    """
    # torchvision.models._api is where the builders look the reader up, so that is where it is swapped.
    original = tv_api.load_state_dict_from_url

    def safe(url: str, *args, **kwargs) -> dict[str, torch.Tensor]:
        file = torch_hub_checkpoint_dir() / os.path.basename(urlparse(url).path)
        if offline and not file.is_file():
            raise FileNotFoundError(_missing_message(file.name, url, file.parent))
        kwargs["weights_only"] = True
        kwargs.setdefault("map_location", "cpu")
        return torch.hub.load_state_dict_from_url(url, *args, **kwargs)

    tv_api.load_state_dict_from_url = safe
    try:
        yield
    finally:
        tv_api.load_state_dict_from_url = original


def compose_of(transform: Callable) -> Callable:
    """torchvision's ``ImageClassification`` preset as an equivalent v2 ``Compose``.

    Same resize, crop, scaling and normalisation; as a ``Compose`` the engine can
    drop the ``Normalize`` step to show images in true colour
    (:func:`interp.data.display_transform`). Other transforms are returned as they are.
    """
    if not isinstance(transform, ImageClassification):
        return transform
    # Resize and crop before ToImage, as the preset does: a PIL image is resized by PIL.
    return T.Compose([
        T.Resize(list(transform.resize_size), interpolation=transform.interpolation,
                 antialias=bool(transform.antialias)),
        T.CenterCrop(list(transform.crop_size)),
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(list(transform.mean), list(transform.std)),
    ])


def _missing_message(file: str, source: str, folder: Path) -> str:
    return (
        f"offline mode: pretrained weights file {file} not found; download it from {source} "
        f"and put it in {folder}/ (or let it download: drop --offline / offline=True and unset CNN_INTERNALS_OFFLINE)"
    )


def _load_torchvision(arch: str, weights: str | os.PathLike | None, offline: bool, kwargs: dict) -> tuple[torch.nn.Module, Callable]:
    options = torchvision.models.list_models(module=torchvision.models)
    if arch not in options:
        close = difflib.get_close_matches(arch, options, n=3)
        raise ValueError(
            f"unknown torchvision model {arch!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
        )
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        enum = None
    if weights is not None and not _is_path(weights):
        w = _tv_weights(arch, str(weights))
        with _tv_safe_state_dicts(offline):
            model = torchvision.models.get_model(arch, weights=w, **kwargs)
        preprocess = compose_of(w.transforms())
    else:
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
        if weights is not None:
            load_into(model, weights, f"torchvision:{arch}")
        # The default weights' transform: how the architecture is fed in torchvision.
        preprocess = compose_of(enum.DEFAULT.transforms()) if enum is not None else imagenet_preprocess()
    model.eval()
    return model, preprocess


def parse_torchvision_weights(weights: object, archs: tuple[str, ...]) -> tuple[str, str] | None:
    """Split a ``"torchvision:ARCH[:WEIGHTS]"`` weights value for one of our adapters.

    Our adapters accept the weights of their torchvision counterpart (see
    :func:`torchvision_state_dict`): ``"torchvision:resnet18"`` (the default
    pretrained weights), ``"torchvision:vgg16_bn:IMAGENET1K_V1"`` (an enum
    member) or ``"torchvision:googlenet:/path/googlenet-1378be20.pth"`` (a
    local file in torchvision's format).

    Parameters
    ----------
    weights:
        The ``weights`` argument given to the adapter.
    archs:
        The torchvision architectures whose weights the adapter can take.

    Returns
    -------
    ``(arch, selector)`` or ``None``
        ``None`` when ``weights`` is not such a value (a path of our own format, or ``None``).

    Raises
    ------
    ValueError
        For ``torchvision:`` with an architecture the adapter cannot take.
    """
    if not isinstance(weights, str) or not weights.startswith("torchvision:"):
        return None
    _, arch, selector = (weights.split(":", 2) + [""])[:3]
    if arch not in archs:
        raise ValueError(f"{weights!r}: this model takes the weights of {' or '.join('torchvision:' + a for a in archs)}, "
                         f"not torchvision:{arch or '?'}")
    return arch, selector or "DEFAULT"


def torchvision_state_dict(
    arch: str, selector: str = "DEFAULT", offline: bool | None = None
) -> tuple[dict[str, torch.Tensor], Callable]:
    """The state dict of torchvision's ``arch`` weights and the preprocess they expect.

    Parameters
    ----------
    arch:
        A torchvision architecture with published weights (``"resnet18"``).
    selector:
        ``"DEFAULT"`` / ``"pretrained"`` / an enum member name, read through the
        torch.hub cache exactly as :func:`load` does (offline rules included),
        or the path of a local file in torchvision's format.
    offline:
        Forbid downloads; ``None`` reads ``$CNN_INTERNALS_OFFLINE``.

    Returns
    -------
    (state, preprocess)
        torchvision's keys and tensors, and the weights' own transform (for a
        local file, the default weights' transform).
    """
    if _is_path(selector):
        enum = torchvision.models.get_model_weights(arch)
        return load_state_dict(selector), compose_of(enum.DEFAULT.transforms())
    w = _tv_weights(arch, selector)
    with _tv_safe_state_dicts(offline_mode(offline)):
        state = w.get_state_dict(progress=True)
    return state, compose_of(w.transforms())


# -- timm --------------------------------------------------------------------


def torchvision_into(
    weights: object,
    archs: tuple[str, ...],
    head_key: str,
    build: Callable[[int], torch.nn.Module],
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
) -> tuple[torch.nn.Module, Callable] | None:
    """Our adapter with torchvision's weights, or ``None`` when ``weights`` is not ``"torchvision:..."``.

    Shared by the adapters that accept their torchvision counterpart's
    weights: ``head_key`` is the classifier weight in torchvision's state dict
    (its rows give the class count for ``build``), ``convert`` renames and
    reshapes torchvision's tensors into ours.

    Returns
    -------
    (model, preprocess) or None
        The model in eval mode and the preprocess the weights expect.
    """
    source = parse_torchvision_weights(weights, archs)
    if source is None:
        return None
    state, preprocess = torchvision_state_dict(*source)
    if head_key not in state:
        raise ValueError(f"{weights}: not a torchvision {source[0]} state dict (no {head_key})")
    model = build(int(state[head_key].shape[0]))
    model.load_state_dict(convert(state))
    return model.eval(), preprocess


def _timm_cached_file(cfg: dict) -> tuple[Path | None, str, Path]:
    """``(cached file or None, where it comes from, folder it belongs in)`` for a timm pretrained config."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        repo = hf_hub_cache_dir() / ("models--" + hub_id.replace("/", "--"))
        revision = "main"
        ref = repo / "refs" / "main"
        if ref.is_file():
            revision = ref.read_text().strip()
        for name in names:
            for snap in [repo / "snapshots" / revision] + sorted((repo / "snapshots").glob("*")):
                if (snap / name).is_file():
                    return snap / name, f"https://huggingface.co/{hub_id}", snap
        return None, f"https://huggingface.co/{hub_id}/resolve/main/{names[0]}", repo / "snapshots" / revision
    url = cfg.get("url") or ""
    if url:
        file = torch_hub_checkpoint_dir() / os.path.basename(urlparse(url).path)
        return (file if file.is_file() else None), url, file.parent
    return None, "", torch_hub_checkpoint_dir()


def _timm_preprocess(model: torch.nn.Module) -> Callable:
    """timm's ``resolve_data_config`` eval transform, as torchvision v2 ops (PIL or tensor input)."""
    import timm

    cfg = timm.data.resolve_data_config({}, model=model)
    size = cfg["input_size"][-2:]
    crop_pct = cfg.get("crop_pct", 0.875) or 1.0
    scale = int(size[0] / crop_pct) if size[0] == size[1] else tuple(int(s / crop_pct) for s in size)
    interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
              "nearest": InterpolationMode.NEAREST}.get(cfg.get("interpolation", "bilinear"), InterpolationMode.BILINEAR)
    return T.Compose([
        T.ToImage(),
        T.Resize(scale, interpolation=interp, antialias=True),
        T.CenterCrop(tuple(size)),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(list(cfg["mean"]), list(cfg["std"])),
    ])


def _load_timm(arch: str, weights: str | os.PathLike | None, offline: bool, kwargs: dict) -> tuple[torch.nn.Module, Callable]:
    import timm

    if arch not in timm.list_models() and not timm.list_models(arch) and not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise ValueError(f"unknown timm model {arch!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    if weights is not None and not _is_path(weights):
        if str(weights) not in PRETRAINED_WORDS:
            raise ValueError(f"{weights!r} is neither a file nor 'pretrained' for timm:{arch}; "
                             "pick a tag with timm:NAME.TAG, or pass a .pth/.safetensors path")
        cfg = dict(timm.create_model(arch, pretrained=False).pretrained_cfg)
        cached, source, folder = _timm_cached_file(cfg)
        if cached is not None:
            # Load the cached file through timm (its filter_fn remaps old checkpoints;
            # timm reads .bin with weights_only=True) without any hub lookup.
            model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(cached)}, **kwargs)
        elif offline:
            name = cfg.get("hf_hub_filename") or ("model.safetensors" if cfg.get("hf_hub_id") else
                                                  os.path.basename(urlparse(cfg.get("url") or "").path))
            raise FileNotFoundError(_missing_message(name or f"(timm:{arch} has no published file)", source, folder))
        else:
            model = timm.create_model(arch, pretrained=True, **kwargs)
    else:
        model = timm.create_model(arch, pretrained=False, **kwargs)
        if weights is not None:
            load_into(model, weights, f"timm:{arch}")
    model.eval()
    return model, _timm_preprocess(model)


def imagenet_preprocess(size: int = 224) -> Callable:
    """Resize 256, centre 224 crop, ImageNet mean/std: for architectures without a weights enum."""
    return T.Compose(
        [
            T.ToImage(),
            T.Resize(int(size * 256 / 224), antialias=True),
            T.CenterCrop(size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )


def load(
    name: str,
    weights: str | os.PathLike | None = None,
    offline: bool | None = None,
    **kwargs,
) -> tuple[torch.nn.Module, Callable]:
    """Build ``torchvision:NAME`` or ``timm:NAME``.

    Parameters
    ----------
    name:
        ``"torchvision:<arch>"`` (any classification model of
        ``torchvision.models``) or ``"timm:<arch>"`` (any timm model name,
        optionally with a ``.tag``).
    weights:
        ``None`` (random init), ``"pretrained"`` / ``"DEFAULT"`` / a torchvision
        weights-enum member name (library weights, see the module docstring),
        or the path of a local ``.pth`` / ``.safetensors`` state dict.
    offline:
        Forbid downloads; ``None`` reads ``$CNN_INTERNALS_OFFLINE``.
    **kwargs:
        Passed to the library's model builder (e.g. ``num_classes``).

    Returns
    -------
    (model, preprocess)
        The model in eval mode and the weights' own preprocessing.

    Raises
    ------
    FileNotFoundError
        Offline and the pretrained file is not in the cache (the message names
        the file, its URL and the folder to put it in), or a local file is missing.
    ValueError
        Unknown architecture or weights name, or a state dict that does not fit.
    """
    source, _, arch = name.partition(":")
    off = offline_mode(offline)
    if source == "torchvision":
        return _load_torchvision(arch, weights, off, kwargs)
    if source == "timm":
        return _load_timm(arch, weights, off, kwargs)
    raise ValueError(f"unknown model source {source!r}; use torchvision:NAME or timm:NAME")

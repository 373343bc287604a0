"""torchvision / timm models by name ("torchvision:resnet18", "timm:resnet18").

Nothing is downloaded here: a model is built with random weights, or with the
local checkpoint given as ``weights``.
"""
from __future__ import annotations

from typing import Callable

import torch

from .checkpoint import load_state_dict


def _default_preprocess(size: int = 224) -> Callable:
    from torchvision.transforms import v2 as T

    return T.Compose(
        [
            T.ToImage(),
            T.Resize(int(size * 256 / 224), antialias=True),
            T.CenterCrop(size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )


def load(name: str, weights: str | None = None, **kwargs) -> tuple[torch.nn.Module, Callable]:
    """Build ``torchvision:NAME`` or ``timm:NAME`` (random init unless ``weights``)."""
    source, _, arch = name.partition(":")
    if source == "torchvision":
        import torchvision

        try:
            model = torchvision.models.get_model(arch, weights=None, **kwargs)
        except ValueError as exc:
            import difflib

            options = torchvision.models.list_models(module=torchvision.models)
            close = difflib.get_close_matches(arch, options, n=3)
            raise ValueError(
                f"unknown torchvision model {arch!r}"
                + (f"; did you mean {', '.join(close)}?" if close else "")
            ) from exc
    elif source == "timm":
        import timm

        if not timm.list_models(arch) and arch not in timm.list_models():
            import difflib

            close = difflib.get_close_matches(arch, timm.list_models(), n=3)
            raise ValueError(
                f"unknown timm model {arch!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
            )
        model = timm.create_model(arch, pretrained=False, **kwargs)
    else:  # pragma: no cover - guarded by adapters.load
        raise ValueError(f"unknown model source {source!r}")
    if weights is not None:
        model.load_state_dict(load_state_dict(weights))
    model.eval()
    return model, _default_preprocess()

"""Head-only fine-tuning on Imagenette with cached backbone features, and the zero-shot baseline.

The backbone is frozen, so each image's input to the classifier never changes:
:func:`backbone_features` runs the data through the model once (eval mode, the
model's own preprocessing, no augmentation) and caches the features on disk
(safetensors, keyed by model, weights and the exact file list). The new
10-way linear head is then trained on those cached vectors in seconds on a CPU
(:func:`train_head`: full-batch Adam, cross-entropy, weight decay).

"The classifier" is the model's last ``nn.Linear`` in module order (``fc`` of
our adapters and ResNets, ``classifier.1`` of MobileNetV2, timm's
``classifier``/``head``); its input is captured with a forward pre-hook, so
any model whose logits come from one final linear layer works.

:func:`zero_shot` is the baseline for a 1000-way ImageNet model: the logits of
the 10 Imagenette classes' ImageNet indices, argmax among those 10.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .imagenette import Imagenette, default_cache_dir

__all__ = ["last_linear", "backbone_features", "train_head", "zero_shot", "replace_head", "IMAGENET_CLASSES"]

# ImageNet-1k index of each Imagenette class, in sorted-wnid order (MANIFEST.md).
IMAGENET_CLASSES: tuple[int, ...] = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """``(name, module)`` of the model's last ``nn.Linear`` (its classifier).

    Raises
    ------
    ValueError
        If the model has no ``nn.Linear``.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("head-only fine-tuning needs a model whose logits come from a final nn.Linear; this one has none")
    return found[-1]


def replace_head(model: nn.Module, head: nn.Linear) -> None:
    """Put ``head`` where the model's last ``nn.Linear`` is."""
    name, _ = last_linear(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, head)


def _cache_key(model_id: str, weights: str | None, data: Imagenette) -> str:
    h = hashlib.sha256(f"{model_id}\n{weights}\n{data.fingerprint()}\n".encode())
    if weights and Path(weights).is_file():
        st = Path(weights).stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def backbone_features(
    model: nn.Module,
    data: Imagenette,
    *,
    cache: str | os.PathLike | None = None,
    key: str | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of the classifier and the model's logits for every image, computed once and cached.

    Parameters
    ----------
    model:
        Model in eval mode; its last ``nn.Linear`` is the classifier.
    data:
        An :class:`adapters.imagenette.Imagenette` with the model's preprocess as transform.
    cache:
        Folder for the cache file (default ``<cnn-internals cache>/features``);
        the file is ``<key>.safetensors``, written atomically.
    key:
        Cache key (see :func:`_cache_key`); ``None`` disables the cache.

    Returns
    -------
    (features, logits, labels)
        ``N x D`` float32, ``N x K`` float32 (the original head's outputs), ``N`` int64.
    """
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    folder = Path(cache) if cache is not None else default_cache_dir() / "features"
    file = folder / f"{key}.safetensors" if key else None
    if file is not None and file.is_file():
        t = load_file(str(file))
        return t["features"], t["logits"], t["labels"]
    _, head = last_linear(model)
    feats: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: feats.append(args[0].detach().float().cpu()))
    logits, labels = [], []
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    model.eval().to(device)
    try:
        for x, y in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
            logits.append(model(x.to(device)).float().cpu())
            labels.append(y)
    finally:
        handle.remove()
    out = {"features": torch.cat(feats).contiguous(), "logits": torch.cat(logits).contiguous(),
           "labels": torch.cat(labels).to(torch.int64).contiguous()}
    if file is not None:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{file.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(out, tmp)
            os.replace(tmp, file)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out["features"], out["logits"], out["labels"]


def train_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int = 10,
    *,
    steps: int = 300,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> nn.Linear:
    """A new ``nn.Linear`` trained on cached features: full-batch Adam on cross-entropy.

    Features are used as they are (the backbone's own scale), so the head
    drops straight into the model with :func:`replace_head`.
    """
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features must be N x D with N labels, got {tuple(features.shape)} and {len(labels)}")
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        bound = 1 / features.shape[1] ** 0.5
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    # The problem is tiny (N x D times D x 10): thread start-up and contention
    # cost far more than they save (10x slower with 2 threads on a busy 2-core box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(head(features), labels)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return head.eval()


def zero_shot(logits: torch.Tensor, classes: Sequence[int] = IMAGENET_CLASSES) -> torch.Tensor:
    """Predicted Imagenette label (0..9) from 1000-way ImageNet logits, argmax over the 10 classes' logits."""
    if logits.shape[1] <= max(classes):
        raise ValueError(f"zero-shot needs ImageNet logits (1000 classes); the model gives {logits.shape[1]}")
    return logits[:, list(classes)].argmax(1)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``pred == labels``."""
    return float((pred == labels).float().mean())


def imagenette(root, split: str, preprocess: Callable, limit: int | None) -> Imagenette:
    """Imagenette ``split`` with ``preprocess`` as transform (``limit`` spread over the classes)."""
    return Imagenette(root, split=split, transform=preprocess, limit=limit)

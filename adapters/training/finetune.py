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

Full fine-tuning (:func:`full_setup`) trains every weight with the generic
trainer :func:`adapters.training.fit`, so it has ``train``'s conventions:
``last.pt`` / ``best.pt`` / ``log.json``, per-epoch progress bars, resume,
and DistributedDataParallel under ``torchrun``.

Under ``torchrun`` :func:`backbone_features` splits the images over the
processes (contiguous blocks, :func:`interp.parallel.shard`) and gathers the
features in order, so every rank holds what one process would compute.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from adapters.checkpoint import write_atomic
from adapters.datasets import Imagenette
from adapters.datasets.imagenette import default_cache_dir
from interp import parallel as dist

from .recipe import Recipe
from .spec import TrainSpec

__all__ = [
    "last_linear", "backbone_features", "train_head", "zero_shot", "replace_head", "full_setup", "new_head",
    "RandomFlip", "IMAGENET_CLASSES", "feature_cache_key", "accuracy", "imagenette",
]

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


def feature_cache_key(model_id: str, weights: str | None, data: Imagenette) -> str:
    """Key of the feature cache of model ``model_id`` with ``weights`` on ``data`` (its exact file list).

    A weights file's size and modification time are part of the key, so
    retrained weights under the same name get new features.
    """
    h = hashlib.sha256(f"{model_id}\n{weights}\n{data.fingerprint()}\n".encode())
    if weights and Path(weights).is_file():
        st = Path(weights).stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def backbone_features(
    model: nn.Module,
    data: Dataset,
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
        ``(image, label)`` pairs, e.g. an :class:`adapters.datasets.imagenette.Imagenette`
        with the model's preprocess as transform.
    cache:
        Folder for the cache file (default ``<cnn-internals cache>/features``);
        the file is ``<key>.safetensors``, written atomically (by rank 0).
    key:
        Cache key (see :func:`feature_cache_key`); ``None`` disables the cache.
    batch_size:
        Images per forward pass (per process).
    device:
        Where the forward passes run.
    progress:
        Show a tqdm bar (rank 0 only).
    desc:
        Label of the bar.

    Returns
    -------
    (features, logits, labels)
        ``N x D`` float32, ``N x K`` float32 (the original head's outputs), ``N`` int64;
        the same on every rank under torchrun.
    """
    folder = Path(cache) if cache is not None else default_cache_dir() / "features"
    file = folder / f"{key}.safetensors" if key else None
    # Rank 0 decides (and reads): the other ranks need not share its file system.
    hit = dist.broadcast(file is not None and dist.is_main() and file.is_file())
    if hit:
        t = dist.broadcast(load_file(str(file)) if dist.is_main() else None)
        return t["features"], t["logits"], t["labels"]
    _, head = last_linear(model)
    feats: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: feats.append(args[0].detach().float().cpu()))
    logits, labels = [], []
    part = Subset(data, dist.shard(len(data))) if dist.active() else data  # type: ignore[arg-type]
    loader = DataLoader(part, batch_size=batch_size, shuffle=False)
    model.eval().to(device)
    try:
        for x, y in tqdm(loader, desc=desc, unit="batch", disable=not progress or not dist.is_main(), leave=False):
            logits.append(model(x.to(device)).float().cpu())
            labels.append(torch.as_tensor(y))
    finally:
        handle.remove()
    mine = [torch.cat(t) if t else None for t in (feats, logits, labels)]
    # Contiguous blocks in rank order: concatenating them restores the data's order.
    blocks = [b for b in dist.gather(mine) if b[0] is not None]
    out = {"features": torch.cat([b[0] for b in blocks]).contiguous(),
           "logits": torch.cat([b[1] for b in blocks]).contiguous(),
           "labels": torch.cat([b[2] for b in blocks]).to(torch.int64).contiguous()}
    if file is not None and dist.is_main():
        write_atomic(file, save(out))
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
    progress: bool = False,
) -> nn.Linear:
    """A new ``nn.Linear`` trained on cached features: full-batch Adam on cross-entropy.

    Features are used as they are (the backbone's own scale), so the head
    drops straight into the model with :func:`replace_head`. ``progress``
    shows a tqdm bar over the steps (with the loss).
    """
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features must be N x D with N labels, got {tuple(features.shape)} and {len(labels)}")
    head = new_head(features.shape[1], num_classes, seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    # The problem is tiny (N x D times D x 10): thread start-up and contention
    # cost far more than they save (10x slower with 2 threads on a busy 2-core box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    bar = tqdm(total=steps, desc="head", unit="step", disable=not progress, leave=False, mininterval=1.0)
    try:
        for step in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(head(features), labels)
            loss.backward()
            opt.step()
            bar.update(1)
            if progress and step % 50 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    return head.eval()


def new_head(in_features: int, num_classes: int = 10, seed: int = 0) -> nn.Linear:
    """A fresh classifier: weights uniform in ``+-1/sqrt(in_features)`` from a generator seeded with ``seed``, bias 0."""
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(in_features, num_classes)
    with torch.no_grad():
        bound = 1 / in_features ** 0.5
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.zero_()
    return head


class RandomFlip(Dataset):
    """``dataset[i]`` with the image tensor mirrored left-right with probability 1/2.

    The augmentation of full fine-tuning: it comes after the model's own
    preprocessing (which is opaque here), so the inputs keep exactly the
    statistics the pretrained backbone expects. The coin comes from the
    global torch RNG, which :func:`adapters.training.fit` seeds per item in
    DataLoader workers and checkpoints in the main process.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        x, y = self.dataset[i]
        if torch.rand(()) < 0.5:
            x = torch.flip(x, dims=[-1])
        return x, y


def full_setup(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    *,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    seed: int = 0,
    num_classes: int = 10,
    name: str = "finetune-full",
    head: nn.Linear | None = None,
    frozen_bn: bool = True,
) -> TrainSpec:
    """A :class:`~adapters.training.spec.TrainSpec` that fine-tunes every weight of ``model`` with a new head.

    The last ``nn.Linear`` is replaced by ``head`` (e.g. one trained on frozen
    features first, :func:`train_head`: "linear probe, then fine-tune", which
    keeps a random head's large early gradients from distorting the
    pretrained features) or else a fresh ``num_classes``-way head
    (:func:`new_head`, seeded); all parameters train with AdamW (``lr``,
    ``weight_decay``), the learning rate following a cosine to zero over the
    epochs, stepped per batch, on cross-entropy. Training images are
    mirrored at random (:class:`RandomFlip`); validation images are used as
    the dataset gives them.

    Parameters
    ----------
    model:
        The pretrained model (any mode; it is put in training mode).
    train_set, val_set:
        ``(image_tensor, label)`` datasets with the model's preprocessing applied.
    epochs, batch_size, lr, weight_decay:
        The recipe (``batch_size`` is the global batch under torchrun).
    seed:
        Seed of the new head's initialisation.
    num_classes:
        Outputs of the new head.
    name:
        Recipe name (logs, checkpoints).
    head:
        The head to start from (``in_features`` must fit); ``None``: a fresh one.
    frozen_bn:
        BatchNorm layers keep their pretrained statistics (eval mode) while
        every weight trains (:attr:`adapters.training.spec.TrainSpec.frozen_bn`).
    """
    _, old = last_linear(model)
    if head is None:
        head = new_head(old.in_features, num_classes, seed)
    elif head.in_features != old.in_features:
        raise ValueError(f"the given head takes {head.in_features} features; the model gives {old.in_features}")
    replace_head(model, head.to(old.weight.device))
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    recipe = Recipe(name=name, epochs=epochs, batch_size=batch_size, optimizer="adamw", lr=lr,
                    optimizer_kwargs={"weight_decay": weight_decay}, scheduler="cosine")
    return TrainSpec(
        model=model, train_set=RandomFlip(train_set), val_set=val_set, recipe=recipe,
        loss_fn=nn.CrossEntropyLoss(), val_name=f"imagenette-val[{len(val_set)}]" if val_set is not None else "val",
        extra={"mode": "full", "new_head": [head.in_features, head.out_features], "augment": "random horizontal flip"},
        frozen_bn=frozen_bn,
    )


def zero_shot(logits: torch.Tensor, classes: Sequence[int] = IMAGENET_CLASSES) -> torch.Tensor:
    """Predicted Imagenette label (0..9) from ImageNet logits, argmax over the 10 classes' logits.

    1000-way logits are indexed by ImageNet class; 1001-way logits (TF-slim
    models, whose index 0 is "background") are shifted by one.
    """
    if logits.shape[1] not in (1000, 1001):
        raise ValueError(f"zero-shot needs ImageNet logits (1000 or 1001 classes); the model gives {logits.shape[1]}")
    offset = logits.shape[1] - 1000
    return logits[:, [c + offset for c in classes]].argmax(1)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``pred == labels``."""
    return float((pred == labels).float().mean())


def imagenette(root: str | os.PathLike | None, split: str, preprocess: Callable, limit: int | None) -> Imagenette:
    """Imagenette ``split`` with ``preprocess`` as transform (``limit`` spread over the classes)."""
    return Imagenette(root, split=split, transform=preprocess, limit=limit)

"""A small, generic, resumable supervised trainer.

Used for LeNet-5 on MNIST and meant to be reused as is for the Imagenette
models: everything model-specific comes in through a :class:`TrainSpec`
(model, datasets, :class:`Recipe`, loss function, and ``scores_fn`` that turns
the model's outputs into "larger = more likely" scores, which decides how
top-1 / top-5 are counted).

Output folder ``OUT``:

``OUT/last.pt``
    Written atomically after every epoch: model, optimizer and scheduler
    state, completed epoch, RNG states, recipe, metrics history.
``OUT/best.pt``
    Same content, for the epoch with the best validation top-1 so far.
``OUT/log.json``
    The recipe, the seed, the data pipeline (``amp``, ``channels_last``,
    device-side batches), the processes (``world_size``, ``global_batch``,
    ``sync_bn``), and one record per epoch (train loss/top-1, val
    loss/top-1/top-5, learning rate, seconds, images/s, the world size that
    trained it).

Speed options of :func:`fit` (all also run on the CPU, so CI covers them):

``amp``
    bfloat16 autocast of the forward passes and the loss, on CUDA and on the
    CPU alike (bf16 has float32's range, so no gradient scaler is needed;
    on CPUs without native bf16 it is slower, but the same code path).
``channels_last``
    Model and 4-D input batches in ``torch.channels_last`` memory format
    (the layout cuDNN's fastest convolutions use, especially with bf16).
``batches``
    An object such as :class:`adapters.gpu_data.DeviceImagenette` that
    yields ready training/validation batches on the device (uint8 cache +
    augmentation on the GPU) instead of the DataLoaders.
With ``workers > 0`` the DataLoaders are built once and keep their worker
processes (``persistent_workers``); ``pin_memory`` is on for CUDA.

Exact resumption: the shuffling order of epoch ``e`` comes from a generator
seeded with ``(seed, e)`` alone, the scheduler steps per batch and is saved,
and the global RNG states are saved at the end of every epoch, so training
``k`` epochs, stopping, and resuming gives the same weights (on the same
device and thread count) as training without a stop. With ``workers > 0``
each item's random augmentation is seeded from ``(seed, epoch, index)`` in
the worker (the workers persist across epochs, so their own RNG streams
would otherwise depend on the run's history); device-side batches draw
their augmentation from a generator seeded with ``(seed, epoch)``.

Distributed data parallel (``torchrun``): when :func:`interp.parallel.init_from_env`
has joined a process group of more than one process, :func:`fit` trains a
:class:`~torch.nn.parallel.DistributedDataParallel` replica per process
(Gloo on CPUs, NCCL on GPUs), optionally with ``SyncBatchNorm`` (CUDA only:
torch's implementation rejects CPU tensors).

* The recipe's ``batch_size`` stays the *global* batch, so its optimizer and
  learning rate mean what they mean in one process. Every rank draws the same
  epoch order (from ``(seed, epoch)``) and cuts it into the same global
  batches as a single process would; each global batch is split into one
  contiguous block per rank (:func:`rank_blocks`; sizes differ by at most one
  when ``batch_size`` is not a multiple of the world size). Each rank's loss
  is weighted by its share of the batch, so the averaged gradient is the
  gradient of the global batch's mean loss whatever the split. Nothing is
  padded or repeated; only a last global batch holding fewer images than
  there are ranks is left out (every rank must join every step), and the LR
  schedule still advances for it, so the schedule's position at each epoch
  end is the same for every world size.
* BatchNorm statistics are per rank (per-rank batch) unless ``sync_bn``; at
  every epoch end all ranks take rank 0's BatchNorm buffers, so every rank
  holds exactly the model rank 0 saves.
* Validation is sharded (:func:`interp.parallel.shard`) and the counts summed
  over the ranks: the same numbers as in one process.
* Rank 0 alone shows progress bars, logs, and writes ``last.pt``, ``best.pt``
  and ``log.json``; the other ranks wait at a barrier after each write, so no
  rank reads a half-written file. A resume is read by rank 0 and broadcast,
  so the output folder need not be shared between machines.
* Checkpoints hold the unwrapped model's state dict (no ``module.`` prefix),
  so they load in one process, and resume with any world size: weights,
  optimizer and scheduler state, epoch, history and the per-epoch data order
  carry over exactly. Each rank's RNG state is saved too; resuming with the
  *same* world size restores them (exact resumption as above), with a
  different one rank 0 takes the saved main state and the other ranks are
  seeded from ``(seed, rank, epoch)``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from interp import parallel as dist

from .checkpoint import atomic_save, load_checkpoint

__all__ = [
    "Recipe",
    "TrainSpec",
    "fit",
    "evaluate",
    "rank_blocks",
    "seed_everything",
    "rng_state",
    "set_rng_state",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "cnn-internals-train/1"

# Keys a training checkpoint must hold to be resumed from.
_RESUME_KEYS = ("format", "model", "optimizer", "scheduler", "epoch", "rng", "history", "recipe", "seed")


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one training run; also the optimizer / scheduler factories.

    Parameters
    ----------
    name:
        Recipe name recorded in logs and checkpoints.
    epochs:
        Number of passes over the training set; the LR schedule spans them.
    batch_size:
        Training batch size (evaluation uses twice as much).
    optimizer:
        ``"adamw"``, ``"adam"`` or ``"sgd"``.
    lr, weight_decay, momentum, nesterov, betas:
        Optimizer settings (``momentum``/``nesterov`` for SGD, ``betas`` for Adam/AdamW).
    scheduler:
        ``"constant"``, ``"cosine"`` (to 0 at the end of the run) or
        ``"step"`` (multiply by ``gamma`` every ``step_epochs``); all are
        stepped once per batch.
    warmup_epochs:
        Linear warm-up from 0, in (possibly fractional) epochs, before the schedule.
    step_epochs, gamma:
        Settings of the ``"step"`` schedule.
    grad_clip:
        Clip the global gradient norm to this value if set.
    """

    name: str
    epochs: int
    batch_size: int
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: str = "constant"
    warmup_epochs: float = 0.0
    step_epochs: int = 30
    gamma: float = 0.1
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"recipe {self.name!r}: epochs and batch_size must be >= 1")
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"recipe {self.name!r}: unknown optimizer {self.optimizer!r} (adamw, adam, sgd)")
        if self.scheduler not in ("constant", "cosine", "step"):
            raise ValueError(f"recipe {self.name!r}: unknown scheduler {self.scheduler!r} (constant, cosine, step)")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON- and ``weights_only``-safe)."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    def make_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """Build the optimizer over ``params``."""
        params = [p for p in params if p.requires_grad]
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov, weight_decay=self.weight_decay
            )
        cls = torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    def lr_factor(self, step: int, steps_per_epoch: int) -> float:
        """Multiplier of ``lr`` before optimizer step ``step`` (0-based, counted over the whole run)."""
        total = self.epochs * steps_per_epoch
        warmup = int(round(self.warmup_epochs * steps_per_epoch))
        if step < warmup:
            return (step + 1) / warmup
        if self.scheduler == "constant":
            return 1.0
        if self.scheduler == "step":
            return self.gamma ** (step // (self.step_epochs * steps_per_epoch))
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def make_scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
        """A per-batch ``LambdaLR`` implementing :meth:`lr_factor`."""
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.lr_factor(step, steps_per_epoch)
        )


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class TrainSpec:
    """What :func:`fit` trains: model, data, recipe, loss, and how outputs rank classes.

    Parameters
    ----------
    model:
        The network, freshly initialised.
    train_set, val_set:
        Datasets of ``(input_tensor, label)`` pairs.
    recipe:
        Hyper-parameters and optimizer/scheduler factories.
    loss_fn:
        ``loss_fn(outputs, labels) -> scalar``, the mean over the batch.
    scores_fn:
        Maps outputs to scores where larger = more likely; top-1 is their
        argmax, top-5 their 5 largest. Identity for logits; negation for
        LeNet-5's RBF penalties.
    val_name:
        Human-readable name of ``val_set``, recorded in logs.
    extra:
        Anything else worth recording in ``log.json`` (model options, preprocessing).
    frozen_bn:
        Keep every BatchNorm layer in eval mode while training: it normalises
        with its running statistics and does not update them (its affine
        weights still learn). For fine-tuning pretrained networks, whose
        statistics are part of what was learned (and, in a twin with
        BatchNorm folded into the convolutions, placeholders that batch
        statistics would replace).
    """

    model: nn.Module
    train_set: Dataset
    val_set: Dataset | None
    recipe: Recipe
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scores_fn: Callable[[torch.Tensor], torch.Tensor] = _identity
    val_name: str = "val"
    extra: dict[str, Any] = field(default_factory=dict)
    frozen_bn: bool = False


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """All global RNG states, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _loader(dataset: Dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None,
            workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )


class _EpochSampler(Sampler):
    """Yields ``(epoch, index)`` in the order :func:`_epoch_generator` shuffles epoch ``epoch``.

    Set :attr:`epoch` before iterating. Used with persistent workers, where
    one DataLoader serves every epoch; the order equals the one a fresh
    ``DataLoader(shuffle=True, generator=_epoch_generator(seed, epoch))``
    would draw (it takes one 64-bit draw for the workers' base seed, then
    the permutation).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i in _epoch_order(self.n, self.seed, self.epoch):
            yield (self.epoch, i)


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order ``DataLoader(shuffle=True, generator=_epoch_generator(seed, epoch))`` visits ``range(n)`` in."""
    g = _epoch_generator(seed, epoch)
    torch.empty((), dtype=torch.int64).random_(generator=g)  # the DataLoader's base-seed draw
    return torch.randperm(n, generator=g).tolist()


def rank_blocks(n: int, batch_size: int, rank: int, world: int) -> list[tuple[int, int, int, int]]:
    """Where this rank's part of every global batch of an epoch lies in the epoch's order.

    The order of ``n`` items is cut into global batches of ``batch_size``
    exactly as in one process (the last one may be smaller); a global batch of
    ``m`` items is split into ``world`` contiguous blocks whose sizes differ
    by at most one (:func:`interp.parallel.shard`). A global batch with fewer
    items than ranks is left out, since every rank must take part in every
    DDP step; only the last batch can be that small.

    Returns
    -------
    list of (batch_start, batch_stop, start, stop)
        Positions in the epoch's order: the global batch and this rank's block of it.
    """
    out = []
    for b0 in range(0, n, batch_size):
        b1 = min(n, b0 + batch_size)
        if b1 - b0 < world:
            continue
        part = dist.shard(b1 - b0, rank, world)
        out.append((b0, b1, b0 + part.start, b0 + part.stop))
    return out


class _RankBatches(Sampler):
    """Batch sampler: this rank's block of each global batch of epoch :attr:`epoch` (see :func:`rank_blocks`).

    Every rank computes the same epoch order as a single process, so the
    global batches are the single-process batches. With ``keyed`` the items
    are ``(epoch, index)`` keys for :class:`_SeededItems`.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int, keyed: bool) -> None:
        self.n = n
        self.seed = seed
        self.keyed = keyed
        self.blocks = rank_blocks(n, batch_size, rank, world)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        order = _epoch_order(self.n, self.seed, self.epoch)
        for _, _, start, stop in self.blocks:
            idx = order[start:stop]
            yield [(self.epoch, i) for i in idx] if self.keyed else idx


class _SeededItems(Dataset):
    """``dataset[index]`` with the worker's RNGs seeded from ``(seed, epoch, index)``.

    Makes the random augmentation of an item independent of which (persistent)
    worker loads it and of what that worker did before, so a resumed run sees
    the same images. Only reseeds inside worker processes: in the main
    process the global RNG belongs to the model (dropout) and is checkpointed.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if get_worker_info() is not None:
            s = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2**32)
        return self.dataset[index]


def _persistent_loader(dataset: Dataset, batch_size: int, sampler: Sampler | None, workers: int,
                       device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=True,
        drop_last=False,
        # The loader draws its workers' base seed when its iterator is first
        # made; from its own generator, so that draw never moves the global
        # RNG (which a resumed run would otherwise consume at another epoch).
        # _SeededItems reseeds every item anyway.
        generator=torch.Generator().manual_seed(0),
    )


def _rank_loader(dataset: Dataset, sampler: _RankBatches, workers: int, device: torch.device) -> DataLoader:
    """A DataLoader over this rank's blocks (kept for the whole run; persistent workers if any)."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),  # see _persistent_loader
    )


def _rank_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed of rank ``rank``'s global RNGs where no saved state applies (rank 0 of a fresh run uses ``seed``)."""
    return ((seed * 1_000_003 + rank) * 10_007 + epoch) % 2**63


def _sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), in place."""
    import torch.distributed as tdist

    for buf in model.buffers():
        tdist.broadcast(buf, src=0)


def _convert_sync_bn(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace the BatchNorm layers of ``model`` by ``SyncBatchNorm`` in place; returns what :func:`_restore_bn` needs.

    ``SyncBatchNorm`` takes over the original layers' parameter and buffer
    tensors, so putting the originals back after training leaves the trained
    values in a plain model.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    if isinstance(model, _BatchNorm):
        raise ValueError("sync_bn: the model itself is a BatchNorm layer; wrap it in a module")
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, _BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                found.append((parent, name, child))
    nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return found


def _restore_bn(found: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Undo :func:`_convert_sync_bn` (the original layers share the trained tensors)."""
    for parent, name, original in found:
        original.train(getattr(parent, name).training)
        setattr(parent, name, original)


def _autocast(device: torch.device, amp: bool):
    """bf16 autocast on ``device`` if ``amp``, else a no-op context."""
    import contextlib

    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    scores_fn: Callable[[torch.Tensor], torch.Tensor] = _identity,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    workers: int = 0,
    *,
    amp: bool = False,
    channels_last: bool = False,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    distributed: bool = False,
) -> dict[str, float]:
    """Loss, top-1 and (for more than 5 classes) top-5 accuracy of ``model`` on ``dataset``.

    Parameters
    ----------
    amp, channels_last:
        bf16 autocast / channels_last inputs (see :func:`fit`).
    batches:
        Ready ``(x, y)`` batches (a persistent DataLoader or device-side
        batches) used instead of a fresh loader over ``dataset``.
    distributed:
        Under a process group: evaluate only this rank's block of
        ``dataset`` (:func:`interp.parallel.shard`; ``batches``, if given, must
        already be this rank's part) and sum the counts over the ranks, so
        every rank returns the whole set's numbers. Pass the unwrapped
        module, not the DDP wrapper: ranks may run different numbers of
        batches, and DDP's forward would wait for the others.

    Returns
    -------
    dict
        ``n``, ``loss`` (if ``loss_fn``), ``top1`` and maybe ``top5``, accuracies as fractions.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    n = 0
    loss_sum = 0.0
    top1 = 0
    top5 = 0
    classes = 0
    if batches is None:
        if dataset is None:
            raise ValueError("evaluate needs a dataset or batches")
        if distributed:
            dataset = torch.utils.data.Subset(dataset, dist.shard(len(dataset)))  # type: ignore[arg-type]
        batches = _loader(dataset, batch_size, False, None, workers, device)
    for x, y in batches:
        x = _to_device(x, device, channels_last)
        y = y.to(device, non_blocking=True)
        with _autocast(device, amp):
            out = model(x)
            loss = loss_fn(out, y) if loss_fn is not None else None
        if loss is not None:
            loss_sum += float(loss) * len(y)
        scores = scores_fn(out.float())
        classes = scores.shape[1]
        top1 += int((scores.argmax(1) == y).sum())
        if classes > 5:
            top5 += int((scores.topk(5, dim=1).indices == y[:, None]).any(1).sum())
        n += len(y)
    model.train(was_training)
    if distributed:
        # Summed in rank order on every rank: every rank gets the same floats.
        parts = dist.gather((n, loss_sum, top1, top5, classes))
        n, top1, top5 = (sum(p[i] for p in parts) for i in (0, 2, 3))
        loss_sum = sum((p[1] for p in parts), 0.0)
        classes = max(p[4] for p in parts)
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    result: dict[str, float] = {"n": n, "top1": top1 / n}
    if loss_fn is not None:
        result["loss"] = loss_sum / n
    if classes > 5:
        result["top5"] = top5 / n
    return result


def _write_json(obj: Any, path: Path) -> None:
    """Write JSON atomically (temporary file + rename)."""
    from .checkpoint import write_atomic

    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Shuffle order depends on (seed, epoch) only, so a resumed run sees the
    # same batches as an uninterrupted one without saving the loader's state.
    g = torch.Generator()
    g.manual_seed(seed * 100_003 + epoch)
    return g


def _quiet(_msg: str) -> None:
    """The ``log`` of ranks other than 0."""


def _check_resume(ckpt: dict[str, Any], path: Path, recipe: Any, n_train: int, seed: int) -> None:
    """Raise ``ValueError`` unless ``ckpt`` continues this run (same format, recipe, data size, seed)."""
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has format {ckpt['format']!r}, expected {CHECKPOINT_FORMAT!r}")
    if ckpt["recipe"] != recipe.to_dict():
        raise ValueError(f"cannot resume: {path} was trained with recipe {ckpt['recipe']}, now {recipe.to_dict()}")
    if ckpt.get("n_train") != n_train or ckpt["seed"] != seed:
        raise ValueError(
            f"cannot resume: {path} was trained on {ckpt.get('n_train')} images with seed "
            f"{ckpt['seed']}, now {n_train} images with seed {seed}"
        )


def _read_resume(path: Path, recipe: Any, n_train: int, seed: int) -> dict[str, Any] | None:
    """The checked checkpoint at ``path`` on every rank, or ``None`` when there is none.

    Rank 0 reads it (``weights_only``) and broadcasts it, so that the other
    ranks need not see rank 0's file system, and a bad checkpoint raises the
    same error on every rank instead of leaving the others waiting.
    """
    ckpt: dict[str, Any] | None = None
    error: str | None = None
    if dist.is_main() and path.exists():
        try:
            ckpt = load_checkpoint(path, required=_RESUME_KEYS)
            _check_resume(ckpt, path, recipe, n_train, seed)
        except (ValueError, FileNotFoundError) as exc:
            ckpt, error = None, str(exc)
    if dist.active():
        ckpt, error = dist.broadcast((ckpt, error))
    if error is not None:
        raise ValueError(error)
    return ckpt


def _restore_rng(ckpt: dict[str, Any], rank: int, world: int, seed: int) -> None:
    """This rank's RNG state from ``ckpt`` (see the module docstring on resuming with another world size)."""
    saved = int(ckpt.get("world_size", 1))
    per_rank = ckpt.get("rng_ranks")
    if saved == world and per_rank is not None:
        set_rng_state(per_rank[rank])
    elif rank == 0:
        set_rng_state(ckpt["rng"])
    else:
        seed_everything(_rank_seed(seed, rank, int(ckpt["epoch"])))


def fit(
    spec: TrainSpec,
    out_dir: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    workers: int = 0,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    amp: bool = False,
    channels_last: bool = False,
    batches: Any | None = None,
    sync_bn: bool = False,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train ``spec.model`` for ``spec.recipe.epochs`` epochs, checkpointing every epoch.

    Runs alone or, after :func:`interp.parallel.init_from_env` under ``torchrun``,
    as one rank of a DistributedDataParallel run (module docstring).

    Parameters
    ----------
    spec:
        Model, data, recipe, loss and scoring.
    out_dir:
        Folder for ``last.pt``, ``best.pt`` and ``log.json``.
    device:
        ``"cpu"``, ``"cuda"`` or a ``torch.device`` (under torchrun the one
        :func:`interp.parallel.init_from_env` returned, ``cuda:LOCAL_RANK``).
    workers:
        DataLoader worker processes (0 = load in the main process), per rank.
    seed:
        Seeds the global RNGs on a fresh start and the per-epoch shuffling.
    resume:
        Continue from ``out_dir/last.pt`` (same recipe, same training-set
        size required; any world size). Without a ``last.pt`` a fresh run starts.
    progress:
        Show a tqdm bar per epoch (images/s as its rate; rank 0 only).
    log:
        Where the one-line epoch summaries go (rank 0 only).
    amp:
        bf16 autocast for forward passes and loss (CUDA and CPU).
    channels_last:
        Model and image batches in channels_last memory format.
    batches:
        Device-side batch source replacing the DataLoaders: an object with
        ``n_train``, ``train_batches(seed, epoch, batch_size)`` (a function of
        its arguments only, for exact resumption), ``val_batches(batch_size)``
        and ``describe()``, e.g. :class:`adapters.gpu_data.DeviceImagenette`.
        Under DDP both batch methods also take ``rank=`` and ``world=`` and
        yield only this rank's part (:func:`rank_blocks` for training,
        :func:`interp.parallel.shard` of the validation set).
    sync_bn:
        Under DDP, convert BatchNorm layers to ``SyncBatchNorm`` (batch
        statistics over the global batch; CUDA only). The model is handed
        back with its original BatchNorm layers holding the trained values.
        No effect in a single process.
    stop_after:
        Stop once this many epochs (counted from the start of the run, earlier
        sessions included) are done; the LR schedule still spans the recipe's
        epochs, so a later ``resume`` continues the same run, e.g. in the next
        time slot of a cluster job, with any number of processes.

    Returns
    -------
    dict
        ``history`` (one dict per epoch), ``best`` (its record), ``epochs_run``
        (epochs trained by this call), ``seconds`` (training time of this call).
    """
    from tqdm.auto import tqdm

    recipe = spec.recipe
    out = Path(out_dir)
    rank, world = dist.world()
    ddp = dist.active()
    main = rank == 0
    say = log if main else _quiet
    if main:
        out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu")
    if ddp and device.type == "cuda" and device.index is None:
        # A bare "cuda" would put every rank on GPU 0; init_from_env made this rank's GPU current.
        device = torch.device("cuda", torch.cuda.current_device())
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1 epoch, got {stop_after}")
    model = spec.model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_train = len(spec.train_set)
    if n_train == 0:
        raise ValueError("the training set is empty")
    if batches is not None and batches.n_train != n_train:
        raise ValueError(f"the device batches hold {batches.n_train} training images, the training set {n_train}")
    if ddp and n_train < world:
        raise ValueError(f"the training set has {n_train} images, fewer than the {world} processes; use fewer processes")
    if ddp and batches is not None:
        import inspect

        if "rank" not in inspect.signature(batches.train_batches).parameters:
            raise ValueError(f"{type(batches).__name__} cannot split its batches over processes (no rank/world "
                             "arguments); run it without torchrun")
    converted: list[tuple[nn.Module, str, nn.Module]] = []
    if sync_bn and ddp:
        if device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA: torch's SyncBatchNorm does not run on CPU tensors; "
                             "drop --sync-bn for CPU runs")
        converted = _convert_sync_bn(model)
    # Steps per epoch as in one process, whatever the world size, so that the
    # schedule is the recipe's and a resume with another world size continues it.
    steps_per_epoch = math.ceil(n_train / recipe.batch_size)
    optimizer = recipe.make_optimizer(model.parameters())
    scheduler = recipe.make_scheduler(optimizer, steps_per_epoch)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    best: dict[str, Any] | None = None
    last_path = out / "last.pt"
    ckpt = _read_resume(last_path, recipe, n_train, seed) if resume else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _restore_rng(ckpt, rank, world, seed)
        history = list(ckpt["history"])
        start_epoch = int(ckpt["epoch"])
        best = ckpt.get("best")
        saved_world = int(ckpt.get("world_size", 1))
        say(f"resuming from {last_path}: {start_epoch}/{recipe.epochs} epochs done"
            + (f" (saved by {saved_world} process(es), continuing with {world})" if saved_world != world else ""))
        del ckpt
    else:
        # Distinct streams per rank (dropout, main-process augmentation); rank 0 keeps the single-process seed.
        seed_everything(seed if rank == 0 else _rank_seed(seed, rank, 0))

    net: nn.Module = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        # Broadcasts rank 0's parameters and buffers now, and the buffers again at every training forward.
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(path: Path, epoch: int, rngs: list[dict[str, Any]]) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),  # the unwrapped module: no "module." prefix
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "rng": rngs[0],
            "world_size": world,
            "history": history,
            "best": best,
            "recipe": recipe.to_dict(),
            "seed": seed,
            "n_train": n_train,
        }
        if world > 1:
            state["rng_ranks"] = rngs
        atomic_save(state, path)

    def write_log() -> None:
        _write_json(
            {
                "recipe": recipe.to_dict(),
                "seed": seed,
                "n_train": n_train,
                "val": spec.val_name,
                "val_n": len(spec.val_set) if spec.val_set is not None else 0,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "world_size": world,
                "global_batch": recipe.batch_size,
                "sync_bn": bool(converted),
                "amp": "bf16" if amp else None,
                "channels_last": channels_last,
                "workers": workers,
                "device_batches": batches.describe() if batches is not None else None,
                "extra": spec.extra,
                "frozen_bn": spec.frozen_bn,
                "epochs": history,
            },
            out / "log.json",
        )

    # With workers, one DataLoader per split for the whole run (persistent
    # worker processes: no start-up cost per epoch); see _SeededItems. Under
    # DDP one loader over this rank's blocks, with or without workers.
    train_sampler = val_loader = persistent = rank_sampler = None
    eval_batch = 2 * math.ceil(recipe.batch_size / world)
    plan = rank_blocks(n_train, recipe.batch_size, rank, world) if ddp else []
    if batches is None and ddp:
        rank_sampler = _RankBatches(n_train, recipe.batch_size, seed, rank, world, keyed=workers > 0)
        persistent = _rank_loader(_SeededItems(spec.train_set, seed) if workers > 0 else spec.train_set,
                                  rank_sampler, workers, device)
        if spec.val_set is not None and workers > 0:
            val_part = torch.utils.data.Subset(spec.val_set, dist.shard(len(spec.val_set)))
            val_loader = _persistent_loader(val_part, eval_batch, None, workers, device)
    elif batches is None and workers > 0:
        train_sampler = _EpochSampler(n_train, seed)
        persistent = _persistent_loader(_SeededItems(spec.train_set, seed), recipe.batch_size, train_sampler,
                                        workers, device)
        if spec.val_set is not None:
            val_loader = _persistent_loader(spec.val_set, eval_batch, None, workers, device)
    # Reading the running loss forces a device sync; on a GPU do it only every
    # few batches so that the host can queue work ahead of the device.
    sync_every = 1 if device.type == "cpu" else 25
    last_epoch = recipe.epochs if stop_after is None else min(recipe.epochs, stop_after)

    t_run = time.perf_counter()
    try:
        for epoch in range(start_epoch, last_epoch):
            net.train()
            if spec.frozen_bn:
                for m in net.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
            if batches is not None:
                loader: Iterable = (batches.train_batches(seed, epoch, recipe.batch_size, rank=rank, world=world)
                                    if ddp else batches.train_batches(seed, epoch, recipe.batch_size))
            elif rank_sampler is not None:
                rank_sampler.epoch = epoch
                loader = persistent
            elif persistent is not None:
                train_sampler.epoch = epoch
                loader = persistent
            else:
                loader = _loader(spec.train_set, recipe.batch_size, True, _epoch_generator(seed, epoch), workers,
                                 device)
            bar = tqdm(
                total=sum(b1 - b0 for b0, b1, _, _ in plan) if ddp else n_train,
                desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="img", unit_scale=True,
                disable=not progress or not main, leave=False, file=sys.stderr, mininterval=1.0,
            )
            # Running sums stay on the device (float64: same value as summing Python floats).
            loss_acc = torch.zeros((), dtype=torch.float64, device=device)
            correct_acc = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            step = 0
            t0 = time.perf_counter()
            for x, y in loader:
                if ddp and step >= len(plan):
                    raise RuntimeError(f"the training batches of rank {rank} outnumber the {len(plan)} planned steps")
                x = _to_device(x, device, channels_last)
                y = y.to(device, non_blocking=True)
                with _autocast(device, amp):
                    out_b = net(x)
                    loss = spec.loss_fn(out_b, y)
                if sync_every == 1 and not torch.isfinite(loss):
                    raise RuntimeError(f"loss became {float(loss)} at epoch {epoch + 1}; lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                if ddp:
                    # DDP averages the ranks' gradients; weighting each rank's mean loss by its share of the
                    # global batch makes that average the gradient of the global batch's mean loss.
                    b0, b1, _, _ = plan[step]
                    share = world * len(y) / (b1 - b0)
                    (loss * share if share != 1.0 else loss).backward()
                else:
                    loss.backward()
                if recipe.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    loss_acc += loss.detach().double() * len(y)
                    correct_acc += (spec.scores_fn(out_b.detach().float()).argmax(1) == y).sum()
                seen += len(y)
                bar.update(plan[step][1] - plan[step][0] if ddp else len(y))
                step += 1
                if step % sync_every == 0:
                    running = float(loss_acc) / seen
                    if not math.isfinite(running):
                        raise RuntimeError(f"loss became {running} at epoch {epoch + 1}; lower the learning rate")
                    bar.set_postfix(loss=f"{running:.4f}", refresh=False)
            bar.close()
            loss_sum = float(loss_acc)
            correct = int(correct_acc)
            seconds = time.perf_counter() - t0
            if ddp:
                if step != len(plan):
                    raise RuntimeError(f"rank {rank} ran {step} training steps, {len(plan)} were planned")
                # The left-out last batch (fewer images than ranks): the schedule still counts it.
                for _ in range(steps_per_epoch - len(plan)):
                    scheduler.step()
                parts = dist.gather((loss_sum, correct, seen))
                loss_sum = sum((p[0] for p in parts), 0.0)
                correct = sum(p[1] for p in parts)
                seen = sum(p[2] for p in parts)
                seconds = dist.broadcast(seconds)  # rank 0's clock: identical records on every rank
                _sync_buffers(model)
            if not math.isfinite(loss_sum):
                raise RuntimeError(f"loss became {loss_sum / seen} at epoch {epoch + 1}; lower the learning rate")
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / seen,
                "train_top1": correct / seen,
                "lr_end": optimizer.param_groups[0]["lr"],
                "seconds": seconds,
                "images_per_s": seen / seconds,
                "world_size": world,
            }
            if spec.val_set is not None:
                if batches is not None:
                    val_batches = (batches.val_batches(eval_batch, rank=rank, world=world) if ddp
                                   else batches.val_batches(eval_batch))
                else:
                    val_batches = val_loader
                # The unwrapped module: ranks may run different numbers of validation batches.
                val = evaluate(model, spec.val_set, spec.loss_fn, spec.scores_fn,
                               batch_size=eval_batch, device=device, workers=workers,
                               amp=amp, channels_last=channels_last, batches=val_batches, distributed=ddp)
                record.update({f"val_{k}": v for k, v in val.items() if k != "n"})
            # Epoch-level schedules driven by a metric (ReduceLROnPlateau on val
            # top-1, adapters.recipes.EpochScheduler) step here, before the save;
            # the record is the same on every rank, so are their schedules.
            if hasattr(scheduler, "epoch_end"):
                scheduler.epoch_end(record)
            history.append(record)
            key = "val_top1" if "val_top1" in record else "train_top1"
            improved = best is None or record[key] > best[key]
            if improved:
                best = dict(record)
            rngs = dist.gather(rng_state())
            if main:
                save(last_path, epoch + 1, rngs)
                if improved:
                    save(out / "best.pt", epoch + 1, rngs)
                write_log()
            dist.barrier()  # nobody goes on (or reads last.pt) before rank 0 has written it
            msg = (
                f"epoch {epoch + 1}/{recipe.epochs}  train loss {record['train_loss']:.4f}  "
                f"train top-1 {100 * record['train_top1']:.2f}%"
            )
            if "val_top1" in record:
                msg += f"  {spec.val_name} loss {record['val_loss']:.4f}  top-1 {100 * record['val_top1']:.2f}%"
            if "val_top5" in record:
                msg += f"  top-5 {100 * record['val_top5']:.2f}%"
            msg += f"  ({seconds:.1f} s, {record['images_per_s']:.0f} img/s"
            msg += f", {world} processes)" if ddp else ")"
            say(msg)
    finally:
        _restore_bn(converted)
    if start_epoch >= last_epoch:
        if last_epoch == recipe.epochs:
            say(f"nothing to do: {last_path} already has all {recipe.epochs} epochs")
        else:
            say(f"nothing to do: {last_path} already has {start_epoch} epochs (stop after {last_epoch})")
        if main:
            write_log()
    elif last_epoch < recipe.epochs:
        say(f"stopped after epoch {last_epoch}/{recipe.epochs}; continue with resume (--resume)")
    return {
        "history": history,
        "best": best,
        "epochs_run": max(0, last_epoch - start_epoch),
        "seconds": time.perf_counter() - t_run,
    }

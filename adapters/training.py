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
    device-side batches), and one record per epoch (train loss/top-1, val
    loss/top-1/top-5, learning rate, seconds, images/s).

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

from .checkpoint import atomic_save, load_checkpoint

__all__ = [
    "Recipe",
    "TrainSpec",
    "fit",
    "evaluate",
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
    """

    model: nn.Module
    train_set: Dataset
    val_set: Dataset | None
    recipe: Recipe
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scores_fn: Callable[[torch.Tensor], torch.Tensor] = _identity
    val_name: str = "val"
    extra: dict[str, Any] = field(default_factory=dict)


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
        g = _epoch_generator(self.seed, self.epoch)
        torch.empty((), dtype=torch.int64).random_(generator=g)  # the DataLoader's base-seed draw
        for i in torch.randperm(self.n, generator=g).tolist():
            yield (self.epoch, i)


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
    )


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
) -> dict[str, float]:
    """Loss, top-1 and (for more than 5 classes) top-5 accuracy of ``model`` on ``dataset``.

    Parameters
    ----------
    amp, channels_last:
        bf16 autocast / channels_last inputs (see :func:`fit`).
    batches:
        Ready ``(x, y)`` batches (a persistent DataLoader or device-side
        batches) used instead of a fresh loader over ``dataset``.

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
    from interp._io import write_atomic

    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Shuffle order depends on (seed, epoch) only, so a resumed run sees the
    # same batches as an uninterrupted one without saving the loader's state.
    g = torch.Generator()
    g.manual_seed(seed * 100_003 + epoch)
    return g


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
) -> dict[str, Any]:
    """Train ``spec.model`` for ``spec.recipe.epochs`` epochs, checkpointing every epoch.

    Parameters
    ----------
    spec:
        Model, data, recipe, loss and scoring.
    out_dir:
        Folder for ``last.pt``, ``best.pt`` and ``log.json``.
    device:
        ``"cpu"``, ``"cuda"`` or a ``torch.device``.
    workers:
        DataLoader worker processes (0 = load in the main process).
    seed:
        Seeds the global RNGs on a fresh start and the per-epoch shuffling.
    resume:
        Continue from ``out_dir/last.pt`` (same recipe, same training-set
        size required). Without a ``last.pt`` a fresh run starts.
    progress:
        Show a tqdm bar per epoch (images/s as its rate).
    log:
        Where the one-line epoch summaries go.
    amp:
        bf16 autocast for forward passes and loss (CUDA and CPU).
    channels_last:
        Model and image batches in channels_last memory format.
    batches:
        Device-side batch source replacing the DataLoaders: an object with
        ``n_train``, ``train_batches(seed, epoch, batch_size)`` (a function of
        its arguments only, for exact resumption), ``val_batches(batch_size)``
        and ``describe()``, e.g. :class:`adapters.gpu_data.DeviceImagenette`.

    Returns
    -------
    dict
        ``history`` (one dict per epoch), ``best`` (its record), ``epochs_run``
        (epochs trained by this call), ``seconds`` (training time of this call).
    """
    from tqdm.auto import tqdm

    recipe = spec.recipe
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu")
    model = spec.model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_train = len(spec.train_set)
    if n_train == 0:
        raise ValueError("the training set is empty")
    if batches is not None and batches.n_train != n_train:
        raise ValueError(f"the device batches hold {batches.n_train} training images, the training set {n_train}")
    steps_per_epoch = math.ceil(n_train / recipe.batch_size)
    optimizer = recipe.make_optimizer(model.parameters())
    scheduler = recipe.make_scheduler(optimizer, steps_per_epoch)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    best: dict[str, Any] | None = None
    last_path = out / "last.pt"
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path, required=_RESUME_KEYS)
        if ckpt["format"] != CHECKPOINT_FORMAT:
            raise ValueError(f"{last_path} has format {ckpt['format']!r}, expected {CHECKPOINT_FORMAT!r}")
        if ckpt["recipe"] != recipe.to_dict():
            raise ValueError(
                f"cannot resume: {last_path} was trained with recipe {ckpt['recipe']}, now {recipe.to_dict()}"
            )
        if ckpt.get("n_train") != n_train or ckpt["seed"] != seed:
            raise ValueError(
                f"cannot resume: {last_path} was trained on {ckpt.get('n_train')} images with seed "
                f"{ckpt['seed']}, now {n_train} images with seed {seed}"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        history = list(ckpt["history"])
        start_epoch = int(ckpt["epoch"])
        best = ckpt.get("best")
        log(f"resuming from {last_path}: {start_epoch}/{recipe.epochs} epochs done")
    else:
        seed_everything(seed)

    def save(path: Path, epoch: int) -> None:
        atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "rng": rng_state(),
                "history": history,
                "best": best,
                "recipe": recipe.to_dict(),
                "seed": seed,
                "n_train": n_train,
            },
            path,
        )

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
                "amp": "bf16" if amp else None,
                "channels_last": channels_last,
                "workers": workers,
                "device_batches": batches.describe() if batches is not None else None,
                "extra": spec.extra,
                "epochs": history,
            },
            out / "log.json",
        )

    # With workers, one DataLoader per split for the whole run (persistent
    # worker processes: no start-up cost per epoch); see _SeededItems.
    train_sampler = val_loader = persistent = None
    if batches is None and workers > 0:
        train_sampler = _EpochSampler(n_train, seed)
        persistent = _persistent_loader(_SeededItems(spec.train_set, seed), recipe.batch_size, train_sampler,
                                        workers, device)
        if spec.val_set is not None:
            val_loader = _persistent_loader(spec.val_set, 2 * recipe.batch_size, None, workers, device)
    # Reading the running loss forces a device sync; on a GPU do it only every
    # few batches so that the host can queue work ahead of the device.
    sync_every = 1 if device.type == "cpu" else 25

    t_run = time.perf_counter()
    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        if batches is not None:
            loader: Iterable = batches.train_batches(seed, epoch, recipe.batch_size)
        elif persistent is not None:
            train_sampler.epoch = epoch
            loader = persistent
        else:
            loader = _loader(spec.train_set, recipe.batch_size, True, _epoch_generator(seed, epoch), workers, device)
        bar = tqdm(
            total=n_train, desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="img", unit_scale=True,
            disable=not progress, leave=False, file=sys.stderr, mininterval=1.0,
        )
        # Running sums stay on the device (float64: same value as summing Python floats).
        loss_acc = torch.zeros((), dtype=torch.float64, device=device)
        correct_acc = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        step = 0
        t0 = time.perf_counter()
        for x, y in loader:
            x = _to_device(x, device, channels_last)
            y = y.to(device, non_blocking=True)
            with _autocast(device, amp):
                out_b = model(x)
                loss = spec.loss_fn(out_b, y)
            if sync_every == 1 and not torch.isfinite(loss):
                raise RuntimeError(f"loss became {float(loss)} at epoch {epoch + 1}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                loss_acc += loss.detach().double() * len(y)
                correct_acc += (spec.scores_fn(out_b.detach().float()).argmax(1) == y).sum()
            seen += len(y)
            step += 1
            bar.update(len(y))
            if step % sync_every == 0:
                running = float(loss_acc) / seen
                if not math.isfinite(running):
                    raise RuntimeError(f"loss became {running} at epoch {epoch + 1}; lower the learning rate")
                bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        bar.close()
        loss_sum = float(loss_acc)
        correct = int(correct_acc)
        if not math.isfinite(loss_sum):
            raise RuntimeError(f"loss became {loss_sum / seen} at epoch {epoch + 1}; lower the learning rate")
        seconds = time.perf_counter() - t0
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_top1": correct / seen,
            "lr_end": optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            "images_per_s": seen / seconds,
        }
        if spec.val_set is not None:
            val_batches = batches.val_batches(2 * recipe.batch_size) if batches is not None else val_loader
            val = evaluate(model, spec.val_set, spec.loss_fn, spec.scores_fn,
                           batch_size=2 * recipe.batch_size, device=device, workers=workers,
                           amp=amp, channels_last=channels_last, batches=val_batches)
            record.update({f"val_{k}": v for k, v in val.items() if k != "n"})
        # Epoch-level schedules driven by a metric (ReduceLROnPlateau on val
        # top-1, adapters.recipes.EpochScheduler) step here, before the save.
        if hasattr(scheduler, "epoch_end"):
            scheduler.epoch_end(record)
        history.append(record)
        key = "val_top1" if "val_top1" in record else "train_top1"
        improved = best is None or record[key] > best[key]
        if improved:
            best = dict(record)
        save(last_path, epoch + 1)
        if improved:
            save(out / "best.pt", epoch + 1)
        write_log()
        msg = (
            f"epoch {epoch + 1}/{recipe.epochs}  train loss {record['train_loss']:.4f}  "
            f"train top-1 {100 * record['train_top1']:.2f}%"
        )
        if "val_top1" in record:
            msg += f"  {spec.val_name} loss {record['val_loss']:.4f}  top-1 {100 * record['val_top1']:.2f}%"
        if "val_top5" in record:
            msg += f"  top-5 {100 * record['val_top5']:.2f}%"
        msg += f"  ({seconds:.1f} s, {record['images_per_s']:.0f} img/s)"
        log(msg)
    if start_epoch >= recipe.epochs:
        log(f"nothing to do: {last_path} already has all {recipe.epochs} epochs")
        write_log()
    return {
        "history": history,
        "best": best,
        "epochs_run": max(0, recipe.epochs - start_epoch),
        "seconds": time.perf_counter() - t_run,
    }

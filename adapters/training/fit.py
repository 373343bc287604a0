"""The trainer: :func:`fit` composes the data (:mod:`~adapters.training.data`), the epoch and evaluation
(:mod:`~adapters.training.loop`) and the checkpoints (:mod:`~adapters.training.checkpoints`).

Everything model-specific comes in through a :class:`~adapters.training.spec.TrainSpec`
(model, datasets, :class:`~adapters.training.recipe.Recipe`, loss function,
and ``scores_fn`` that turns the model's outputs into "larger = more likely"
scores, which decides how top-1 / top-5 are counted).

Exact resumption: the epoch orders are functions of ``(seed, epoch)``, the
scheduler steps per batch and is saved, and the global RNG states are saved
at the end of every epoch, so training ``k`` epochs, stopping, and resuming
gives the same weights (on the same device and thread count) as training
without a stop.

Distributed data parallel (``torchrun``): when :func:`interp.parallel.init_from_env`
has joined a process group of more than one process, :func:`fit` trains a
:class:`~torch.nn.parallel.DistributedDataParallel` replica per process
(Gloo on CPUs, NCCL on GPUs), optionally with ``SyncBatchNorm`` (CUDA only:
torch's implementation rejects CPU tensors).

* The recipe's ``batch_size`` stays the *global* batch, so its optimizer and
  learning rate mean what they mean in one process; each global batch is
  split into one contiguous block per rank
  (:func:`~adapters.training.data.rank_blocks`). Nothing is padded or
  repeated; only a last global batch holding fewer images than there are
  ranks is left out (every rank must join every step), and the LR schedule
  still advances for it, so the schedule's position at each epoch end is the
  same for every world size.
* BatchNorm statistics are per rank (per-rank batch) unless ``sync_bn``; at
  every epoch end all ranks take rank 0's BatchNorm buffers, so every rank
  holds exactly the model rank 0 saves.
* Validation is sharded (:func:`interp.parallel.shard`) and the counts summed
  over the ranks: the same numbers as in one process.
* Rank 0 alone shows progress bars, logs, and writes ``last.pt``, ``best.pt``
  and ``log.json``; the other ranks wait at a barrier after each write, so no
  rank reads a half-written file.
"""
from __future__ import annotations

import inspect
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from interp import parallel

from .checkpoints import Checkpointer, read_resume, rank_seed, restore_rng, rng_state, seed_everything
from .data import EpochData
from .loop import EpochResult, convert_sync_bn, evaluate, freeze_bn, merge_ranks, restore_bn, train_epoch
from .spec import TrainSpec

__all__ = ["fit", "check_device"]


def _quiet(_msg: str) -> None:
    """The ``log`` of ranks other than 0."""


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; a clear error when it is CUDA and torch sees no GPU.

    Under torchrun a bare ``"cuda"`` becomes this rank's GPU (the one
    :func:`interp.parallel.init_from_env` made current), not GPU 0 for every rank.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu")
    if parallel.active() and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _check_inputs(spec: TrainSpec, batches: Any, stop_after: int | None, world: int) -> int:
    """The training-set size, after the checks that need no model."""
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1 epoch, got {stop_after}")
    n_train = len(spec.train_set)  # type: ignore[arg-type]
    if n_train == 0:
        raise ValueError("the training set is empty")
    if batches is not None and batches.n_train != n_train:
        raise ValueError(f"the device batches hold {batches.n_train} training images, the training set {n_train}")
    if world > 1 and n_train < world:
        raise ValueError(f"the training set has {n_train} images, fewer than the {world} processes; use fewer processes")
    if world > 1 and batches is not None and "rank" not in inspect.signature(batches.train_batches).parameters:
        raise ValueError(f"{type(batches).__name__} cannot split its batches over processes (no rank/world "
                         "arguments); run it without torchrun")
    return n_train


def _record(epoch: int, result: EpochResult, lr: float, world: int) -> dict[str, Any]:
    if not math.isfinite(result.loss_sum):
        raise RuntimeError(f"loss became {result.loss_sum / result.seen} at epoch {epoch + 1}; lower the learning rate")
    return {
        "epoch": epoch + 1,
        "train_loss": result.loss_sum / result.seen,
        "train_top1": result.correct / result.seen,
        "lr_end": lr,
        "seconds": result.seconds,
        "images_per_s": result.seen / result.seconds,
        "world_size": world,
    }


def _message(record: dict[str, Any], epochs: int, val_name: str, world: int) -> str:
    """The one-line summary of an epoch."""
    msg = (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f}  "
           f"train top-1 {100 * record['train_top1']:.2f}%")
    if "val_top1" in record:
        msg += f"  {val_name} loss {record['val_loss']:.4f}  top-1 {100 * record['val_top1']:.2f}%"
    if "val_top5" in record:
        msg += f"  top-5 {100 * record['val_top5']:.2f}%"
    msg += f"  ({record['seconds']:.1f} s, {record['images_per_s']:.0f} img/s"
    return msg + (f", {world} processes)" if world > 1 else ")")


def _resume(ckpt: dict[str, Any], model: nn.Module, optimizer: Any, scheduler: Any, seed: int,
            say: Callable[[str], None], last: Path, epochs: int) -> tuple[list, int, dict | None]:
    """Load ``ckpt`` into the run; returns ``(history, start_epoch, best)``."""
    rank, world = parallel.world()
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    restore_rng(ckpt, rank, world, seed)
    start = int(ckpt["epoch"])
    saved_world = int(ckpt.get("world_size", 1))
    say(f"resuming from {last}: {start}/{epochs} epochs done"
        + (f" (saved by {saved_world} process(es), continuing with {world})" if saved_world != world else ""))
    return list(ckpt["history"]), start, ckpt.get("best")


def _log_info(spec: TrainSpec, device: torch.device, world: int, sync_bn: bool, amp: bool, channels_last: bool,
              workers: int, batches: Any) -> dict[str, Any]:
    """The fixed part of ``log.json``."""
    return {
        "val": spec.val_name,
        "val_n": len(spec.val_set) if spec.val_set is not None else 0,  # type: ignore[arg-type]
        "device": str(device),
        "threads": torch.get_num_threads(),
        "world_size": world,
        "global_batch": spec.recipe.batch_size,
        "sync_bn": sync_bn,
        "amp": "bf16" if amp else None,
        "channels_last": channels_last,
        "workers": workers,
        "device_batches": batches.describe() if batches is not None else None,
        "extra": spec.extra,
        "frozen_bn": spec.frozen_bn,
    }


def _finish(say: Callable[[str], None], start: int, last_epoch: int, epochs: int, ckpt: Checkpointer,
            history: list) -> None:
    """The closing line of a call that trained nothing, or stopped before the end of the recipe."""
    if start >= last_epoch:
        if last_epoch == epochs:
            say(f"nothing to do: {ckpt.last} already has all {epochs} epochs")
        else:
            say(f"nothing to do: {ckpt.last} already has {start} epochs (stop after {last_epoch})")
        if parallel.is_main():
            ckpt.write_log(history)
    elif last_epoch < epochs:
        say(f"stopped after epoch {last_epoch}/{epochs}; continue with resume (--resume)")


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
        DataLoader worker processes (0 = load in the main process), per rank,
        kept alive across epochs; ``pin_memory`` is on for CUDA.
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
        and ``describe()``, e.g. :class:`adapters.training.gpu_batches.DeviceImagenette`.
        Under DDP both batch methods also take ``rank=`` and ``world=`` and
        yield only this rank's part.
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
    run = _start(spec, Path(out_dir), check_device(device), workers=workers, seed=seed, progress=progress, log=log,
                 amp=amp, channels_last=channels_last, batches=batches, sync_bn=sync_bn, stop_after=stop_after)
    history, start, best = run.resume(resume)
    run.prepare_epochs()
    last_epoch = spec.recipe.epochs if stop_after is None else min(spec.recipe.epochs, stop_after)
    t_run = time.perf_counter()
    try:
        for epoch in range(start, last_epoch):
            record = run.epoch(epoch)
            history.append(record)
            best = _save_epoch(run.ckpt, epoch, record, history, best, run.main)
            run.say(_message(record, spec.recipe.epochs, spec.val_name, run.world))
    finally:
        restore_bn(run.converted)
    _finish(run.say, start, last_epoch, spec.recipe.epochs, run.ckpt, history)
    return {"history": history, "best": best, "epochs_run": max(0, last_epoch - start),
            "seconds": time.perf_counter() - t_run}


@dataclass
class _Run:
    """One call of :func:`fit`, set up: the model (and its DDP wrapper), optimizer, schedule, data, checkpoints."""

    spec: TrainSpec
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ckpt: Checkpointer
    device: torch.device
    converted: list
    steps_per_epoch: int
    seed: int
    say: Callable[[str], None]
    options: dict[str, Any]  # workers, progress, amp, channels_last, batches
    world: int  # 1 without DDP
    main: bool
    net: nn.Module | None = None  # the model, or its DDP wrapper (prepare_epochs)
    data: EpochData | None = None  # prepare_epochs

    @property
    def ddp(self) -> bool:
        """Whether this run is one rank of a DistributedDataParallel run."""
        return self.world > 1

    def resume(self, resume: bool) -> tuple[list, int, dict | None]:
        """``(history, start_epoch, best)`` from ``last.pt`` when resuming, else a fresh start (RNGs seeded)."""
        recipe = self.spec.recipe
        saved = read_resume(self.ckpt.last, recipe, self.ckpt.n_train, self.seed) if resume else None
        if saved is not None:
            return _resume(saved, self.model, self.optimizer, self.scheduler, self.seed, self.say, self.ckpt.last,
                           recipe.epochs)
        # Distinct streams per rank (dropout, main-process augmentation); rank 0 keeps the single-process seed.
        rank = parallel.world()[0]
        seed_everything(self.seed if rank == 0 else rank_seed(self.seed, rank, 0))
        return [], 0, None

    def prepare_epochs(self) -> None:
        """Wrap the model for DDP and build the data sources; after :meth:`resume` has loaded any checkpoint."""
        # DDP broadcasts rank 0's parameters and buffers now, and the buffers again at every training forward.
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.net = DistributedDataParallel(self.model, device_ids=device_ids) if self.ddp else self.model
        spec, opts = self.spec, self.options
        self.data = EpochData(spec.train_set, spec.val_set, spec.recipe.batch_size, self.seed, opts["workers"],
                              self.device, opts["batches"], parallel.world()[0], self.world)

    def epoch(self, epoch: int) -> dict[str, Any]:
        """Train epoch ``epoch`` and evaluate; returns its record (the same on every rank)."""
        spec, data, opts, net = self.spec, self.data, self.options, self.net
        assert data is not None and net is not None, "prepare_epochs first"
        net.train()
        if spec.frozen_bn:
            freeze_bn(net)
        bar = tqdm(total=data.images_per_epoch(), desc=f"epoch {epoch + 1}/{spec.recipe.epochs}", unit="img",
                   unit_scale=True, disable=not opts["progress"] or not self.main, leave=False, file=sys.stderr,
                   mininterval=1.0)
        result = train_epoch(net, spec, self.optimizer, self.scheduler, data.train(epoch), epoch=epoch,
                             device=self.device, amp=opts["amp"], channels_last=opts["channels_last"],
                             plan=data.plan if self.ddp else None, world=self.world, bar=bar)
        bar.close()
        if self.ddp:
            merge_ranks(result, self.model, self.scheduler, len(data.plan), self.steps_per_epoch)
        record = _record(epoch, result, self.optimizer.param_groups[0]["lr"], self.world)
        if spec.val_set is not None:
            # The unwrapped module: ranks may run different numbers of validation batches.
            val = evaluate(self.model, spec.val_set, spec.loss_fn, spec.scores_fn, batch_size=data.eval_batch,
                           device=self.device, workers=opts["workers"], amp=opts["amp"],
                           channels_last=opts["channels_last"], batches=data.val(), distributed=self.ddp)
            record.update({f"val_{k}": v for k, v in val.items() if k != "n"})
        # Epoch-level schedules driven by a metric (ReduceLROnPlateau on val top-1, EpochScheduler)
        # step here, before the save; the record is the same on every rank, so are their schedules.
        if hasattr(self.scheduler, "epoch_end"):
            self.scheduler.epoch_end(record)
        return record


def _start(spec: TrainSpec, out: Path, device: torch.device, *, workers: int, seed: int, progress: bool,
           log: Callable[[str], None], amp: bool, channels_last: bool, batches: Any, sync_bn: bool,
           stop_after: int | None) -> _Run:
    """Check the inputs and build what the epochs need (in the order that keeps runs reproducible)."""
    rank, world = parallel.world()
    ddp = parallel.active()
    world = world if ddp else 1
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    n_train = _check_inputs(spec, batches, stop_after, world)
    model = spec.model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    converted = _sync_bn(model, device) if sync_bn and ddp else []
    # Steps per epoch as in one process, whatever the world size, so that the
    # schedule is the recipe's and a resume with another world size continues it.
    steps_per_epoch = math.ceil(n_train / spec.recipe.batch_size)
    optimizer = spec.recipe.make_optimizer(model.parameters())
    scheduler = spec.recipe.make_scheduler(optimizer, steps_per_epoch)
    ckpt = Checkpointer(out, model, optimizer, scheduler, spec.recipe, seed, n_train, world,
                        _log_info(spec, device, world, bool(converted), amp, channels_last, workers, batches))
    return _Run(spec, model, optimizer, scheduler, ckpt, device, converted, steps_per_epoch, seed,
                log if rank == 0 else _quiet,
                {"workers": workers, "progress": progress, "amp": amp, "channels_last": channels_last,
                 "batches": batches},
                world, rank == 0)


def _sync_bn(model: nn.Module, device: torch.device) -> list:
    if device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA: torch's SyncBatchNorm does not run on CPU tensors; "
                         "drop --sync-bn for CPU runs")
    return convert_sync_bn(model)


def _save_epoch(ckpt: Checkpointer, epoch: int, record: dict[str, Any], history: list, best: dict | None,
                main: bool) -> dict | None:
    """``last.pt`` (and ``best.pt`` on an improvement) and the log, by rank 0; returns the best record."""
    key = "val_top1" if "val_top1" in record else "train_top1"
    improved = best is None or record[key] > best[key]
    if improved:
        best = dict(record)
    rngs = parallel.gather(rng_state())
    if main:
        ckpt.save(ckpt.last, epoch + 1, history, best, rngs)
        if improved:
            ckpt.save(ckpt.out / "best.pt", epoch + 1, history, best, rngs)
        ckpt.write_log(history)
    parallel.barrier()  # nobody goes on (or reads last.pt) before rank 0 has written it
    return best

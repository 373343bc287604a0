"""One training epoch and one evaluation pass, alone or as one rank of a DistributedDataParallel run.

Speed options (all also run on the CPU, so CI covers them): ``amp`` is
bfloat16 autocast of the forward passes and the loss (bf16 has float32's
range, so no gradient scaler is needed); ``channels_last`` puts 4-D input
batches in ``torch.channels_last`` memory format (the layout cuDNN's fastest
convolutions use, especially with bf16).

Under DDP each rank's loss is weighted by its share of the global batch, so
the averaged gradient is the gradient of the global batch's mean loss
whatever the split (:func:`adapters.training.data.rank_blocks`).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import Dataset, Subset

from interp import parallel

from .data import plain_loader
from .losses import identity
from .spec import TrainSpec

__all__ = [
    "autocast", "to_device", "evaluate", "EpochResult", "train_epoch", "merge_ranks", "sync_buffers",
    "convert_sync_bn", "restore_bn", "freeze_bn",
]


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` if ``amp``, else a no-op context."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """``x`` on ``device`` (non-blocking), 4-D batches in channels_last format if asked."""
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    scores_fn: Callable[[torch.Tensor], torch.Tensor] = identity,
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
    model, dataset:
        What is evaluated, on what (``dataset`` may be ``None`` with ``batches``).
    loss_fn, scores_fn:
        The loss (optional) and the map from outputs to "larger = more likely" scores.
    batch_size, device, workers:
        Of the loader built over ``dataset``.
    amp, channels_last:
        bf16 autocast / channels_last inputs.
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
    n, loss_sum, top1, top5, classes = 0, 0.0, 0, 0, 0
    if batches is None:
        if dataset is None:
            raise ValueError("evaluate needs a dataset or batches")
        if distributed:
            dataset = Subset(dataset, parallel.shard(len(dataset)))  # type: ignore[arg-type]
        batches = plain_loader(dataset, batch_size, False, None, workers, device)
    for x, y in batches:
        x = to_device(x, device, channels_last)
        y = y.to(device, non_blocking=True)
        with autocast(device, amp):
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
        parts = parallel.gather((n, loss_sum, top1, top5, classes))
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


@dataclass
class EpochResult:
    """Totals of one training epoch (this rank's, until :func:`merge_ranks`)."""

    loss_sum: float
    correct: int
    seen: int
    steps: int
    seconds: float


def _diverged(value: float, epoch: int) -> RuntimeError:
    return RuntimeError(f"loss became {value} at epoch {epoch + 1}; lower the learning rate")


def train_epoch(net: nn.Module, spec: TrainSpec, optimizer: torch.optim.Optimizer, scheduler: Any,
                batches: Iterable, *, epoch: int, device: torch.device, amp: bool = False,
                channels_last: bool = False, plan: list[tuple[int, int, int, int]] | None = None,
                world: int = 1, bar: Any = None) -> EpochResult:
    """Train ``net`` (the model, or its DDP wrapper) on one epoch's ``batches``.

    ``plan`` (under DDP, :func:`adapters.training.data.rank_blocks`) weights
    each rank's loss by its share of the global batch and advances ``bar`` by
    whole global batches. The running sums stay on the device; on a GPU the
    loss is read (a device sync) only every 25 batches, so the host can
    queue work ahead of the device.
    """
    ddp = plan is not None
    sync_every = 1 if device.type == "cpu" else 25
    # float64 on the device: the same value as summing Python floats.
    loss_acc = torch.zeros((), dtype=torch.float64, device=device)
    correct_acc = torch.zeros((), dtype=torch.int64, device=device)
    seen = step = 0
    t0 = time.perf_counter()
    for x, y in batches:
        if ddp and step >= len(plan):
            raise RuntimeError(f"the training batches of rank {parallel.world()[0]} outnumber the {len(plan)} "
                               "planned steps")
        x = to_device(x, device, channels_last)
        y = y.to(device, non_blocking=True)
        with autocast(device, amp):
            out = net(x)
            loss = spec.loss_fn(out, y)
        if sync_every == 1 and not torch.isfinite(loss):
            raise _diverged(float(loss), epoch)
        optimizer.zero_grad(set_to_none=True)
        if ddp:
            # DDP averages the ranks' gradients; weighting each rank's mean loss by its share of the
            # global batch makes that average the gradient of the global batch's mean loss.
            b0, b1, _, _ = plan[step]
            share = world * len(y) / (b1 - b0)
            (loss * share if share != 1.0 else loss).backward()
        else:
            loss.backward()
        if spec.recipe.grad_clip is not None:
            nn.utils.clip_grad_norm_(spec.model.parameters(), spec.recipe.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            loss_acc += loss.detach().double() * len(y)
            correct_acc += (spec.scores_fn(out.detach().float()).argmax(1) == y).sum()
        seen += len(y)
        if bar is not None:
            bar.update(plan[step][1] - plan[step][0] if ddp else len(y))
        step += 1
        if step % sync_every == 0:
            running = float(loss_acc) / seen
            if not math.isfinite(running):
                raise _diverged(running, epoch)
            if bar is not None:
                bar.set_postfix(loss=f"{running:.4f}", refresh=False)
    return EpochResult(float(loss_acc), int(correct_acc), seen, step, time.perf_counter() - t0)


def merge_ranks(result: EpochResult, model: nn.Module, scheduler: Any, planned: int, steps_per_epoch: int) -> None:
    """Under DDP: check the steps, advance the schedule over a left-out batch, sum the totals over the ranks.

    Every rank then holds the whole epoch's totals, rank 0's clock (so the
    records are identical), and rank 0's BatchNorm buffers.
    """
    rank = parallel.world()[0]
    if result.steps != planned:
        raise RuntimeError(f"rank {rank} ran {result.steps} training steps, {planned} were planned")
    # The left-out last batch (fewer images than ranks): the schedule still counts it.
    for _ in range(steps_per_epoch - planned):
        scheduler.step()
    parts = parallel.gather((result.loss_sum, result.correct, result.seen))
    result.loss_sum = sum((p[0] for p in parts), 0.0)
    result.correct = sum(p[1] for p in parts)
    result.seen = sum(p[2] for p in parts)
    result.seconds = parallel.broadcast(result.seconds)
    sync_buffers(model)


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), in place."""
    for buf in model.buffers():
        tdist.broadcast(buf, src=0)


def freeze_bn(net: nn.Module) -> None:
    """Put every BatchNorm layer of ``net`` in eval mode (running statistics used, not updated)."""
    for m in net.modules():
        if isinstance(m, _BatchNorm):
            m.eval()


def convert_sync_bn(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace the BatchNorm layers of ``model`` by ``SyncBatchNorm`` in place; returns what :func:`restore_bn` needs.

    ``SyncBatchNorm`` takes over the original layers' parameter and buffer
    tensors, so putting the originals back after training leaves the trained
    values in a plain model.
    """
    if isinstance(model, _BatchNorm):
        raise ValueError("sync_bn: the model itself is a BatchNorm layer; wrap it in a module")
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, _BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                found.append((parent, name, child))
    nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return found


def restore_bn(found: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Undo :func:`convert_sync_bn` (the original layers share the trained tensors)."""
    for parent, name, original in found:
        original.train(getattr(parent, name).training)
        setattr(parent, name, original)

"""Where the trainer's batches come from: the epoch order, its split over processes, and the loaders.

Exact resumption: the shuffling order of epoch ``e`` comes from a generator
seeded with ``(seed, e)`` alone (:func:`epoch_generator`), so a resumed run
sees the same batches as an uninterrupted one without saving any loader
state. With ``workers > 0`` each item's random augmentation is seeded from
``(seed, epoch, index)`` in the worker (:class:`SeededItems`: the workers
persist across epochs, so their own RNG streams would otherwise depend on the
run's history); device-side batches draw their augmentation from a generator
seeded with ``(seed, epoch)``.

Under DDP every rank draws the same epoch order and cuts it into the same
global batches as a single process would; each global batch is split into one
contiguous block per rank (:func:`rank_blocks`).
"""
from __future__ import annotations

import math
import random
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, get_worker_info

from interp import parallel

__all__ = [
    "epoch_generator", "epoch_order", "rank_blocks", "EpochSampler", "RankBatches", "SeededItems",
    "plain_loader", "persistent_loader", "rank_loader", "EpochData",
]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that shuffles epoch ``epoch``: a function of ``(seed, epoch)`` only."""
    g = torch.Generator()
    g.manual_seed(seed * 100_003 + epoch)
    return g


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order ``DataLoader(shuffle=True, generator=epoch_generator(seed, epoch))`` visits ``range(n)`` in."""
    g = epoch_generator(seed, epoch)
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
        part = parallel.shard(b1 - b0, rank, world)
        out.append((b0, b1, b0 + part.start, b0 + part.stop))
    return out


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` in the order :func:`epoch_generator` shuffles epoch :attr:`epoch`.

    Set :attr:`epoch` before iterating. Used with persistent workers, where
    one DataLoader serves every epoch; the order equals the one a fresh
    ``DataLoader(shuffle=True, generator=epoch_generator(seed, epoch))``
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
        for i in epoch_order(self.n, self.seed, self.epoch):
            yield (self.epoch, i)


class RankBatches(Sampler):
    """Batch sampler: this rank's block of each global batch of epoch :attr:`epoch` (see :func:`rank_blocks`).

    Every rank computes the same epoch order as a single process, so the
    global batches are the single-process batches. With ``keyed`` the items
    are ``(epoch, index)`` keys for :class:`SeededItems`.
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
        order = epoch_order(self.n, self.seed, self.epoch)
        for _, _, start, stop in self.blocks:
            idx = order[start:stop]
            yield [(self.epoch, i) for i in idx] if self.keyed else idx


class SeededItems(Dataset):
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


def plain_loader(dataset: Dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None,
                 workers: int, device: torch.device) -> DataLoader:
    """A DataLoader for one pass (a fresh one per epoch when there are no workers)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=False)


def persistent_loader(dataset: Dataset, batch_size: int, sampler: Sampler | None, workers: int,
                      device: torch.device) -> DataLoader:
    """A DataLoader kept for the whole run, its worker processes alive across epochs."""
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=True, drop_last=False,
        # The loader draws its workers' base seed when its iterator is first
        # made; from its own generator, so that draw never moves the global
        # RNG (which a resumed run would otherwise consume at another epoch).
        # SeededItems reseeds every item anyway.
        generator=torch.Generator().manual_seed(0),
    )


def rank_loader(dataset: Dataset, sampler: RankBatches, workers: int, device: torch.device) -> DataLoader:
    """A DataLoader over this rank's blocks (kept for the whole run; persistent workers if any)."""
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),  # see persistent_loader
    )


class EpochData:
    """The training batches of each epoch and the validation batches, whichever source they come from.

    Sources, in order of precedence: device-side ``batches`` (e.g.
    :class:`adapters.training.gpu_batches.DeviceImagenette`); under DDP one
    loader over this rank's blocks; with workers one persistent loader per
    split; else a fresh single-process loader per epoch.

    Parameters
    ----------
    train_set, val_set:
        The datasets.
    batch_size:
        The global training batch (evaluation: twice the per-rank share).
    seed:
        Seed of the epoch orders.
    workers:
        DataLoader worker processes per rank.
    device:
        Where the batches go (``pin_memory`` on CUDA).
    batches:
        Device-side batch source, or ``None``.
    rank, world:
        This process and the number of processes (``world > 1``: DDP).
    """

    def __init__(self, train_set: Dataset, val_set: Dataset | None, batch_size: int, seed: int, workers: int,
                 device: torch.device, batches: Any | None, rank: int, world: int) -> None:
        self.train_set, self.val_set = train_set, val_set
        self.batch_size, self.seed, self.workers, self.device = batch_size, seed, workers, device
        self.batches, self.rank, self.world = batches, rank, world
        self.ddp = world > 1
        self.n_train = len(train_set)  # type: ignore[arg-type]
        self.eval_batch = 2 * math.ceil(batch_size / world)
        self.plan = rank_blocks(self.n_train, batch_size, rank, world) if self.ddp else []
        self.sampler: EpochSampler | RankBatches | None = None
        self.persistent: DataLoader | None = None
        self.val_loader: DataLoader | None = None
        if batches is None and self.ddp:
            self.sampler = RankBatches(self.n_train, batch_size, seed, rank, world, keyed=workers > 0)
            items = SeededItems(train_set, seed) if workers > 0 else train_set
            self.persistent = rank_loader(items, self.sampler, workers, device)
            if val_set is not None and workers > 0:
                part = Subset(val_set, parallel.shard(len(val_set)))  # type: ignore[arg-type]
                self.val_loader = persistent_loader(part, self.eval_batch, None, workers, device)
        elif batches is None and workers > 0:
            self.sampler = EpochSampler(self.n_train, seed)
            self.persistent = persistent_loader(SeededItems(train_set, seed), batch_size, self.sampler, workers,
                                                device)
            if val_set is not None:
                self.val_loader = persistent_loader(val_set, self.eval_batch, None, workers, device)

    def images_per_epoch(self) -> int:
        """Training images of one epoch over all ranks (a left-out last batch not counted)."""
        return sum(b1 - b0 for b0, b1, _, _ in self.plan) if self.ddp else self.n_train

    def train(self, epoch: int) -> Iterable:
        """This rank's ``(x, y)`` training batches of ``epoch``."""
        if self.batches is not None:
            if self.ddp:
                return self.batches.train_batches(self.seed, epoch, self.batch_size, rank=self.rank, world=self.world)
            return self.batches.train_batches(self.seed, epoch, self.batch_size)
        if self.sampler is not None:
            self.sampler.epoch = epoch
            return self.persistent  # type: ignore[return-value]
        return plain_loader(self.train_set, self.batch_size, True, epoch_generator(self.seed, epoch), self.workers,
                            self.device)

    def val(self) -> Iterable | None:
        """Ready validation batches (this rank's part under DDP), or ``None``: evaluate builds its own loader."""
        if self.batches is not None:
            if self.ddp:
                return self.batches.val_batches(self.eval_batch, rank=self.rank, world=self.world)
            return self.batches.val_batches(self.eval_batch)
        return self.val_loader

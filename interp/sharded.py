"""Mining and ``visualize`` shared among the ranks of a torchrun job (a ``torch.distributed`` process group).

The one-process cores (:mod:`interp.mine`, :mod:`interp.draw.visualize`)
know no process group; this module runs their stages on every rank and
combines the results with :mod:`interp.parallel`, so that every file and
every returned :class:`~interp.topk.TopK` equals the single-process one:

* mining: each rank scans a contiguous block of whole batches (the batches
  one process forms; nothing padded or repeated), the per-rank top-k are
  gathered and merged under the same order (value descending, then dataset
  index ascending); rank 0 computes the receptive fields and every rank gets
  them, so every rank returns the same :class:`TopK`;
* projecting and drawing: (layer, method) jobs handed out costliest first
  (:func:`interp.parallel.work_queue`), each the very :func:`interp.project`
  call one process makes (splitting a layer's units would change the crop
  size it picks, and with it the last bits of the gradients); rank 0
  gathers every job's bytes and writes every file.

:func:`interp.mine` and :func:`interp.visualize` call these when a process
group with more than one member is initialised (``distributed=None``).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from . import parallel
from ._utils import counted, progress_bar, progress_reporter
from .data import IndexedImages
from .draw.visualize import Jobs, VisualizeResult, Writer, prepare
from .mine import Scan, iter_batches, plan, scan
from .topk import TopK

__all__ = ["share_work", "mine_sharded", "visualize_sharded"]


def share_work(distributed: bool | None) -> bool:
    """Whether a call with this ``distributed`` argument shares its work among the ranks.

    ``None``: when a process group with more than one process is
    initialised; ``True`` without one is an error that says what to do.
    """
    spread = parallel.active() if distributed is None else bool(distributed)
    if spread and not parallel.active():
        raise ValueError("distributed=True needs an initialised torch.distributed process group with more than "
                         "one process: start the script with torchrun (see interp.parallel.init_from_env)")
    return spread


def mine_sharded(
    model: nn.Module,
    data,
    layers: str | Sequence[str],
    channels: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    k: int = 9,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    *,
    model_id: str | None = None,
    num_workers: int = 0,
    progress: bool = True,
    receptive_fields: bool = True,
    channels_last: bool = True,
) -> TopK:
    """:func:`interp.mine` over the ranks: every rank calls it alike and returns the same :class:`TopK`.

    Parameters are those of :func:`interp.mine`; rank 0 alone shows the
    progress bar. An error on one rank is raised on every rank
    (:func:`interp.parallel.collect`); ranks holding different weights are
    refused (:func:`interp.parallel.check_same_module`).
    """
    todo = plan(model, data, layers, channels, k, batch_size)
    try:
        total = len(data)
    except TypeError:
        raise ValueError(f"distributed mining splits the data by position, so it needs a length; "
                         f"{type(data).__name__} has none (pass a Dataset or a tensor)") from None
    positions = parallel.shard_blocks(total, batch_size)
    parallel.check_same_module(model)  # results of different models would merge silently
    desc = f"mining {len(todo.names)} layer(s) (rank 0 of {parallel.world()[1]})"

    def scan_here() -> dict:
        with progress_bar(len(positions), desc, "img", progress and parallel.is_main()) as bar:
            batches = counted(iter_batches(data, batch_size, num_workers, positions), bar)
            return scan(model, todo, batches, device, channels_last).state()

    # Each rank's top-k travels as CPU tensors; every rank merges them alike.
    seen = Scan.merged(todo, parallel.collect(scan_here)).require_images()
    fields: dict = {}
    if receptive_fields:
        # Rank 0 traces once and the others get its plain dicts (notes included).
        fields = parallel.broadcast(seen.fields(model) if parallel.is_main() else None)
    return seen.topk(model, model_id, fields, getattr(data, "path", None))


def visualize_sharded(
    model: nn.Module,
    data: IndexedImages | torch.Tensor,
    out_dir: str | os.PathLike,
    layers: str | Sequence[str] = "all-conv",
    *,
    channels: Sequence[int] | None = None,
    k: int = 9,
    methods: Sequence[str] = ("guided",),
    model_id: str = "model",
    batch_size: int = 64,
    project_batch_size: int | None = None,
    device: str | torch.device | None = None,
    topk: TopK | None = None,
    progress: bool = True,
    web: str | None = None,
    num_workers: int = 0,
    weights_info: dict | None = None,
) -> VisualizeResult:
    """:func:`interp.visualize` over the ranks: rank 0 writes the files one process would; all return the same.

    Parameters are those of :func:`interp.visualize`. Timings: ``loading``,
    ``projection`` and ``drawing`` are the busiest rank's, the others
    wall-clock.
    """
    def mine_names(images: IndexedImages, names: list[str]) -> TopK:
        return mine_sharded(model, images, names, channels, k, batch_size, device, model_id=model_id,
                            num_workers=num_workers, progress=progress)

    run = prepare(model, data, out_dir, layers, methods=methods, model_id=model_id, topk=topk,
                  weights_info=weights_info, mine=mine_names, save=parallel.is_main())
    if topk is not None:
        parallel.check_same_module(model)  # (mine_sharded checks it otherwise)
    # Costliest first so that the last jobs handed out are short: deeper
    # layers run more of the network per unit and on larger crops.
    depth = {n: (run.topk.layer(n).number or 0, i) for i, n in enumerate(run.names)}
    jobs = Jobs(run, sorted(run.jobs(), key=lambda job: depth[job[0]], reverse=True), device,
                project_batch_size, web, num_workers)
    writer = Writer(run)
    with progress_reporter("projecting + drawing", "panel", progress and parallel.is_main()) as report:
        run.timings.update(_share_jobs(jobs, writer, report))
    return writer.result(run.timings)


def _share_jobs(jobs: Jobs, writer: Writer, report: Callable[[int, int], None]) -> dict[str, float]:
    """Run this rank's jobs; rank 0 gathers every rank's (bytes and notes) and writes them all.

    Returns the timings: the busiest rank's loading, projection and drawing.
    """
    done_here: list[dict] = []

    def run_here() -> tuple[list[dict], dict[str, float]]:
        spent = jobs.run(done_here.append, parallel.work_queue(len(jobs.jobs)), in_order=False, report=report)
        return done_here, spent

    # Rank 0 receives every rank's finished jobs (bytes) and their timings.
    parts = parallel.collect(run_here, dst=0)
    if parallel.active():
        done_here.clear()  # rank 0 holds copies of every rank's jobs now (alone, ``parts`` is this very list)

    def write_here() -> dict[str, float]:
        if not parallel.is_main():
            return {}
        t0 = time.perf_counter()
        got = sorted((job["name"], job["method"]) for jobs_of_rank, _ in parts for job in jobs_of_rank)
        if got != sorted(jobs.jobs):  # each job exactly once, or the gallery would be wrong
            raise RuntimeError(f"internal error: the ranks returned {len(got)} panel jobs for {len(jobs.jobs)}")
        for jobs_of_rank, _ in parts:
            for job in jobs_of_rank:
                writer.add(job)
        writer.finish()
        return {"loading": max(spent["loading"] for _, spent in parts),
                "projection": max(spent["projection"] for _, spent in parts),
                "drawing": max(spent["drawing"] for _, spent in parts) + time.perf_counter() - t0}

    # Every rank waits for rank 0's writing and fails with it, so no rank
    # leaves (and tears the process group down) while files are written.
    return parallel.collect(write_here)[0]

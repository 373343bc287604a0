"""The public calls :func:`interp.mine` and :func:`interp.visualize`: thin wrappers around the cores.

The work itself is done by one-process cores that draw no progress bar and
know no process group: :func:`interp.mine.mine_local` and
:func:`interp.draw.visualize.visualize_local`. The wrappers here add what a
user running a script expects:

* a tqdm progress bar on stderr (``progress=True``);
* ``DataLoader`` worker processes that decode images (``num_workers``);
* under ``torchrun`` (a ``torch.distributed`` process group with more than
  one process, or ``distributed=True``), the work shared among the ranks by
  :mod:`interp.sharded`, with output identical to one process.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ._utils import counted, progress_bar, progress_reporter
from .data import IndexedImages, auto_workers
from .draw.visualize import VisualizeResult, visualize_local
from .mine import check_sizes, first_image, iter_batches, mine_local, resolve_layers
from .sharded import mine_sharded, share_work, visualize_sharded
from .topk import TopK

__all__ = ["mine", "visualize"]


def _length(data) -> int | None:
    """``len(data)``, or ``None`` for data without a length (the bar then counts without a total)."""
    try:
        return len(data)
    except TypeError:
        return None


def mine(
    model: nn.Module,
    data,
    layers: str | Sequence[str],
    channels: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    k: int = 9,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    *,
    model_id: str | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    receptive_fields: bool = True,
    distributed: bool | None = None,
    channels_last: bool = True,
    fast: bool = True,
) -> TopK:
    """Find the top-``k`` images per channel of several layers in one pass.

    Parameters
    ----------
    model:
        Any ``torch.nn.Module``. It is left as it was: hooks are removed and
        every module's train/eval flag restored even if an error is raised;
        if ``device`` differs from where it lives it is moved there for the
        pass and moved back.
    data:
        An :class:`interp.data.IndexedImages` (items ``(tensor, index)``), a
        ``N x C x H x W`` tensor, or any dataset whose items are images or
        ``(image, label)`` tuples (then the index is the item's position).
    layers:
        Layer names (see :func:`interp.layers`: modules, traced functional
        nodes such as ``"layer1.0.add"``), a comma-separated string, or the
        selectors ``"all-conv"``, ``"all-blocks"``, ``"children:NAME"`` (see
        :func:`resolve_layers`). Every layer must output ``N x C x H x W``.
    channels:
        Channels to mine, for every layer or as ``{layer: channels}``.
        ``None`` (default) means the first 6 (``range(6)``), or all of a layer
        that has fewer.
    k:
        Images kept per channel.
    batch_size:
        Images per forward pass.
    device:
        Where to run; default: the model's device.
    model_id:
        Stored in the result (and its JSON).
    num_workers:
        ``DataLoader`` worker processes that decode images; ``None``: one
        for an image folder of 512 images or more on a machine with two
        cores or more, none otherwise (:func:`interp.data.auto_workers`);
        none under torchrun unless given.
    progress:
        Show a tqdm bar (images/s) on stderr.
    receptive_fields:
        Also compute each layer's receptive field (for boxes and panels).
    distributed:
        Split the pass over the ranks of the initialised ``torch.distributed``
        process group (every rank must call :func:`mine` with the same
        arguments). ``None`` (default): when one with more than one process
        is initialised; ``False``: mine all of ``data`` in this process alone.
    channels_last:
        Run the pass in ``torch.channels_last`` memory format (the model's
        4-D weights are stored that way for the pass and given back
        unchanged): 1.06-1.8x faster forwards on a CPU (measured: ResNet-18
        1.15x, GoogLeNet 1.6x, MobileNet v2 1.8x). Values agree with the
        model's own layout to float rounding (~1e-6 relative), so two
        near-equal activations may swap ranks. ``False``: the model's layout.
    fast:
        Screen every image with a fast copy of the model (BatchNorm folded
        into the convs, bfloat16, frozen graph), then run the plain pass on
        the candidates only and check each channel's top-k against what was
        screened out (:mod:`interp.fast`): the same top-k as the plain pass.
        Used in one process on a CPU for module layers of an fx-traceable
        fp32 model with :class:`interp.data.IndexedImages` or tensor data;
        elsewhere (and with ``False``) the plain pass runs over every image.

    Returns
    -------
    TopK
        Per layer and channel at most ``k`` entries, one per image at most
        (its strongest position, the first in row-major order on ties),
        ordered by value descending; equal values keep the lower dataset index
        first.

    Notes
    -----
    One forward pass per batch serves every layer (:class:`interp.capture.LayerTaps`:
    hooks, or the model's fx graph when a layer is a traced node), cut short
    once every layer has produced its output; a module called several times
    per forward counts at its first call. ``LayerInfo.notes`` holds what the
    receptive-field analysis said about each layer, once per layer (each
    warning is also raised once, on rank 0 under torchrun). Under torchrun
    every rank mines a block of whole batches and returns the :class:`TopK`
    of one process (:mod:`interp.sharded`; an error on one rank is raised on
    every rank). One process alone runs the core, :func:`interp.mine.mine_local`.
    """
    if share_work(distributed):
        return mine_sharded(model, data, layers, channels, k, batch_size, device, model_id=model_id,
                            num_workers=num_workers or 0, progress=progress, receptive_fields=receptive_fields,
                            channels_last=channels_last)
    check_sizes(k, batch_size)  # before any layer is resolved, as the core does
    names = resolve_layers(model, layers, example=lambda: first_image(data))  # for the bar's title
    workers = auto_workers(data, num_workers)
    with progress_bar(_length(data), f"mining {len(names)} layer(s)", "img", progress) as bar:
        return mine_local(model, data, names, channels, k, batch_size, device, model_id=model_id,
                          receptive_fields=receptive_fields, channels_last=channels_last,
                          batches=counted(iter_batches(data, batch_size, workers), bar), fast=fast,
                          num_workers=workers)


def visualize(
    model: nn.Module,
    data: IndexedImages,
    out_dir: str | Path,
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
    num_workers: int | None = None,
    distributed: bool | None = None,
    weights_info: dict | None = None,
    fast: bool = True,
) -> VisualizeResult:
    """Mine, project and draw panels plus an HTML gallery into ``out_dir``.

    Parameters
    ----------
    model:
        Any ``torch.nn.Module`` (left exactly as it was).
    data:
        The images, with the model's preprocessing (:func:`interp.data.open_images`,
        :class:`interp.data.ArrayImages`), or an ``N x C x H x W`` tensor of
        model inputs (then shown min-max rescaled).
    out_dir:
        Output folder (created).
    layers:
        Layer names (any layer of :func:`interp.layers` with an ``N x C x H x W``
        output: convs, activations, blocks, traced nodes like ``"layer1.0.add"``),
        a comma-separated string, or the selectors ``"all-conv"``,
        ``"all-blocks"``, ``"children:NAME"`` (:func:`interp.mine.resolve_layers`).
    channels, k, batch_size, device, num_workers:
        As for :func:`interp.mine` (``channels=None``: the first 6). The
        ``num_workers`` processes also decode each layer's top images ahead
        of its projection.
    methods:
        Projection methods: ``"guided"``, ``"deconvnet"``, ``"gradient"``.
    model_id:
        Used in file names and titles.
    project_batch_size:
        Units per projection pass (default: the engine's).
    topk:
        A saved mining result (:meth:`TopK.load`): skips mining and redraws.
    web:
        Also write each panel as ``"webp"`` or ``"jpg"``.
    distributed:
        Share the work among the ranks of the initialised ``torch.distributed``
        process group (every rank calls :func:`visualize` alike); ``None``
        (default): when one with more than one process is initialised. Mining
        is split by images (:func:`interp.mine`); projecting and drawing by
        (layer, method) jobs, handed out costliest first, each one the same
        :func:`interp.project` call a single process makes, so the files are
        identical to a single-process run. Only rank 0 writes; every rank
        returns the same paths.
    weights_info:
        Where the model's weights came from, a JSON-ready dict such as
        ``{"name": ..., "file": ..., "sha256": ...}`` or
        ``{"random": True, "seed": 0}``: recorded as ``"weights"`` in
        ``topk.json`` and ``gallery.json`` and shown in the gallery header.
        ``None`` (default): the one a given ``topk`` holds, else unrecorded.
    fast:
        As for :func:`interp.mine` (one process only).

    Returns
    -------
    VisualizeResult
        Files written and ``timings`` with ``mining``, ``projection``,
        ``drawing`` and ``total`` seconds (under torchrun: ``projection`` and
        ``drawing`` are the busiest rank's, the others wall-clock).

    Notes
    -----
    ``topk.json`` is written as soon as mining ends, before any projection:
    when a later stage fails or is interrupted, the mining result stays in
    the folder and ``topk=TopK.load(out_dir / "topk.json")`` resumes from it.

    Every :class:`interp.notices.EngineWarning` raised for a layer (its
    receptive field while mining, its projections) is collected for that
    layer instead of being printed, de-duplicated, and returned in
    ``notes``, written to ``gallery.json`` (``"notes"`` per layer) and shown
    on the gallery page; under torchrun each job's notes travel to rank 0
    with its files.
    """
    if share_work(distributed):
        return visualize_sharded(model, data, out_dir, layers, channels=channels, k=k, methods=methods,
                                 model_id=model_id, batch_size=batch_size, project_batch_size=project_batch_size,
                                 device=device, topk=topk, progress=progress, web=web, num_workers=num_workers or 0,
                                 weights_info=weights_info)
    num_workers = auto_workers(data, num_workers)
    with progress_reporter("projecting + drawing", "panel", progress) as report:
        return visualize_local(model, data, out_dir, layers, channels=channels, k=k, methods=methods,
                               model_id=model_id, batch_size=batch_size, project_batch_size=project_batch_size,
                               device=device, topk=topk, web=web, num_workers=num_workers,
                               weights_info=weights_info, report=report,
                               mine=functools.partial(mine, num_workers=num_workers, progress=progress,
                                                      distributed=False, fast=fast))

"""The whole job: mine once, project, draw panels, write the gallery.

:func:`visualize` is what ``cnn-internals visualize`` and ``cnn-internals
demo`` run. For a model and an :class:`interp.data.IndexedImages` it

1. mines the top-k images of the requested channels of every layer in one
   pass (:func:`interp.mine`), unless a saved :class:`TopK` is given;
2. per layer, projects all its top-k units back to pixels, one
   :func:`interp.project` call per method (batched inside);
3. draws one seed-style panel per layer and method
   (``<model>_<layer>_<method>.png``), and writes the tiles the gallery shows;
4. writes ``topk.json``, ``gallery.json`` and ``index.html``.

It returns the files written and the time spent mining / projecting /
drawing, so a caller can see where the time goes.

Under ``torchrun`` (a ``torch.distributed`` process group) the ranks share
the work: mining by images, then projecting and drawing by (layer, method)
jobs; rank 0 writes every file. A job is the very :func:`interp.project`
call one process makes (splitting a layer's units would change the crop
size :func:`interp.project` picks for them, and with it the last bits of the
gradients), so the output files are byte-identical to a single-process run.
"""
from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import parallel as dist
from ..data import IndexedImages
from ..mine import collected_notes, eval_mode, first_image, mine, on_device, resolve_layers
from .gallery import encode_tile
from .panels import encode_figure, panel_tiles, render_panel
from .._utils import write_atomic
from ..topk import TopK

__all__ = ["visualize", "VisualizeResult", "METHODS", "slug", "prepare_out_dir"]

METHODS = ("guided", "deconvnet", "gradient")


def slug(text: str) -> str:
    """A file-name-safe version of a model or layer name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


@dataclass
class VisualizeResult:
    """What :func:`visualize` wrote, and how long each stage took (seconds)."""

    out_dir: Path
    topk: TopK
    panels: dict[tuple[str, str], Path] = field(default_factory=dict)
    topk_path: Path | None = None
    index_path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # layer -> what the engine could not do exactly there (receptive field,
    # projection rules), each sentence once; empty lists left out.
    notes: dict[str, list[str]] = field(default_factory=dict)


def prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` and check a file can be written there; returns it as a ``Path``.

    Called before any mining, so a folder that cannot be written (its parent
    is a file, no permission) fails in a second with one clear line instead
    of after the whole mining pass.

    Raises
    ------
    ValueError
        Naming the folder and what is wrong with it.
    """
    out_dir = Path(out_dir)
    blocker = next((p for p in [out_dir, *out_dir.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"cannot create output folder {out_dir}: {blocker} is a file, not a folder; "
                         "pass another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # A probe file per process (torchrun ranks share the folder), removed at once.
        probe = out_dir / f".cnn-internals-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueError(f"cannot write to output folder {out_dir}: {reason.lower()}; pass another --out") from None
    return out_dir


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
    num_workers: int = 0,
    distributed: bool | None = None,
    weights_info: dict | None = None,
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
    from ..data import TensorImages

    if isinstance(data, torch.Tensor):
        data = TensorImages(data)
    if not isinstance(data, IndexedImages):
        raise TypeError(
            "visualize needs an interp.data dataset (open_images(path, preprocess), ArrayImages, TensorImages) "
            f"or an N x C x H x W tensor, got {type(data).__name__}"
        )
    spread = dist.active() if distributed is None else bool(distributed)
    if spread and not dist.active():
        raise ValueError("distributed=True needs an initialised torch.distributed process group with more than "
                         "one process: start the script with torchrun (see interp.parallel.init_from_env)")

    t_start = time.perf_counter()
    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown method(s) {bad or methods}; choose from {', '.join(METHODS)}")
    created = not Path(out_dir).exists()
    out_dir = prepare_out_dir(out_dir)  # before mining: a folder we cannot write fails at once
    timings = {"mining": 0.0, "loading": 0.0, "projection": 0.0, "drawing": 0.0}

    if topk is None:
        names = resolve_layers(model, layers, example=lambda: first_image(data))
        t0 = time.perf_counter()
        topk = _mine_and_keep(model, data, names, out_dir, created, weights_info,
                              dict(channels=channels, k=k, batch_size=batch_size, device=device, model_id=model_id,
                                   progress=progress, num_workers=num_workers, distributed=spread))
        timings["mining"] = time.perf_counter() - t0
    else:
        names = (list(topk.layers) if layers == "all-conv"
                 else resolve_layers(model, layers, example=lambda: first_image(data)))
        for n in names:
            topk.layer(n)  # clear error for a layer the file does not hold
        if topk.model_id and model_id == "model":
            model_id = topk.model_id
        if spread:
            dist.check_same_module(model)  # (mine checks it otherwise)
        if weights_info is not None:
            topk.weights = dict(weights_info)

    writer = _Writer(out_dir, model_id, topk, names, methods)
    jobs = [(name, method) for name in names for method in methods]
    if spread:
        # Costliest first so that the last jobs handed out are short: deeper
        # layers run more of the network per unit and on larger crops.
        depth = {n: (topk.layer(n).number or 0, i) for i, n in enumerate(names)}
        jobs.sort(key=lambda j: depth[j[0]], reverse=True)
    run_jobs = _Jobs(model, data, topk, jobs, methods, spread, device, progress, num_workers,
                     project_batch_size, web).run

    if not spread:
        timings.update(run_jobs(writer.add))  # each job's files are written as it finishes
        t0 = time.perf_counter()
        writer.finish()
        timings["drawing"] += time.perf_counter() - t0
    else:
        timings.update(_run_spread(run_jobs, writer, jobs))
    timings["total"] = time.perf_counter() - t_start
    return VisualizeResult(
        out_dir=out_dir, topk=topk, panels={(n, m): writer.panel_path(n, m) for n in names for m in methods},
        topk_path=out_dir / "topk.json", index_path=out_dir / "index.html", timings=timings,
        notes={n: writer.notes_of(n) for n in names if writer.notes_of(n)},
    )


def _mine_and_keep(model: nn.Module, data: IndexedImages, names: list[str], out_dir: Path, created: bool,
                   weights_info: dict | None, mine_kwargs: dict) -> TopK:
    """Mine ``names`` and write ``out_dir/topk.json`` at once (rank 0), before any projection.

    The file survives whatever fails or is interrupted later, so the mining
    pass (the long part) need not be run again. A folder this call created
    is removed again when mining itself fails (nothing was written yet).
    """
    try:
        with collected_notes():  # its engine warnings are in LayerInfo.notes: said once, per layer, from there
            topk = mine(model, data, names, **mine_kwargs)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # (not empty: someone else's files; leave it)
                out_dir.rmdir()
        raise
    if weights_info is not None:
        topk.weights = dict(weights_info)
    if dist.is_main():
        topk.save(out_dir / "topk.json")
    return topk


def _run_spread(run_jobs, writer: "_Writer", jobs: list[tuple[str, str]]) -> dict[str, float]:
    """Run this rank's jobs; rank 0 gathers every rank's (bytes and notes) and writes them all.

    Returns the timings: the busiest rank's loading, projection and drawing.
    """
    done_here: list[dict] = []
    # Rank 0 receives every rank's finished jobs (bytes) and their timings.
    parts = dist.collect(lambda: (done_here, run_jobs(done_here.append)), dst=0)
    done_here.clear()

    def write_here() -> dict[str, float]:
        if not dist.is_main():
            return {}
        t0 = time.perf_counter()
        got = sorted((job["name"], job["method"]) for jobs_of_rank, _ in parts for job in jobs_of_rank)
        if got != sorted(jobs):  # each job exactly once, or the gallery would be wrong
            raise RuntimeError(f"internal error: the ranks returned {len(got)} panel jobs for {len(jobs)}")
        for jobs_of_rank, _ in parts:
            for job in jobs_of_rank:
                writer.add(job)
        writer.finish()
        return {"loading": max(spent["loading"] for _, spent in parts),
                "projection": max(spent["projection"] for _, spent in parts),
                "drawing": max(spent["drawing"] for _, spent in parts) + time.perf_counter() - t0}

    # Every rank waits for rank 0's writing and fails with it, so no rank
    # leaves (and tears the process group down) while files are written.
    return dist.collect(write_here)[0]


@dataclass
class _Jobs:
    """The (layer, method) jobs of one :func:`visualize` call, and how to run this rank's share."""

    model: nn.Module
    data: IndexedImages
    topk: TopK
    jobs: list[tuple[str, str]]
    methods: list[str]
    spread: bool
    device: str | torch.device | None
    progress: bool
    num_workers: int
    project_batch_size: int | None
    web: str | None

    def run(self, done) -> dict:
        """This rank's share of the jobs; ``done(job)`` receives each result, in job order.

        Projection runs here; drawing and encoding run in a few threads
        (PIL and zlib release the GIL), so a layer's panel is drawn while the
        next layer is projected. ``drawing`` is the wall time not spent loading
        or projecting, so the timings still add up to the total.
        """
        spent = {"loading": 0.0, "projection": 0.0, "drawing": 0.0}
        encoded: set[int] = set()  # input images this rank has already encoded
        lock = threading.Lock()  # guards ``encoded``: each input's bytes go with exactly one job
        loaded: tuple = (None, None)  # (layer, its images): reused by the layer's next method
        pending: list = []
        workers = _draw_threads()
        t_loop = time.perf_counter()
        # Under torchrun the next job is whatever the queue hands out; alone the layer order is known.
        order = None if self.spread else list(dict.fromkeys(name for name, _ in self.jobs))
        with eval_mode(self.model), on_device(self.model, self.device) as dev, \
                tqdm(total=len(self.jobs), desc="projecting + drawing", unit="panel", leave=False,
                     disable=not self.progress or (self.spread and not dist.is_main())) as bar, \
                ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cnn-internals-draw") as pool, \
                _LayerFeed(self.data, self.topk, order, dev, self.num_workers) as feed:
            for j in dist.work_queue(len(self.jobs)) if self.spread else range(len(self.jobs)):
                name, method = self.jobs[j]
                if loaded[0] != name:
                    t0 = time.perf_counter()
                    loaded = (name, feed.get(name))
                    spent["loading"] += time.perf_counter() - t0  # only the wait, when decoded ahead
                xs, units, raws = loaded[1]
                t0 = time.perf_counter()
                with collected_notes() as notes:
                    proj = _project_job(self.model, xs, name, units, method, self.project_batch_size)
                spent["projection"] += time.perf_counter() - t0
                pending.append(pool.submit(_render_job, self.data, self.topk, name, method, proj, raws,
                                           tiles_too=method == self.methods[0], encoded=encoded, lock=lock,
                                           web=self.web, notes=notes))
                # Hand finished jobs over in order; keep at most a few panels in flight (memory).
                while pending and (pending[0].done() or len(pending) > 2 * workers):
                    done(pending.pop(0).result())
                # Jobs handed out so far, over all ranks (rank 0 does only some of them).
                bar.update(max(0, j + 1 - bar.n))
            while pending:
                done(pending.pop(0).result())
        spent["drawing"] = time.perf_counter() - t_loop - spent["loading"] - spent["projection"]
        return spent


def _load_layer(data: IndexedImages, topk: TopK, name: str, dev: torch.device) -> tuple:
    """Model inputs (on ``dev``), units and display images of the top-k images of ``name``."""
    xs, raws = _collate_layer([data.item_and_raw(idx) for idx in topk.image_indices(name)])
    return _layer_inputs(topk, name, xs, raws, dev)


def _layer_inputs(topk: TopK, name: str, xs: torch.Tensor, raws: list, dev: torch.device) -> tuple:
    """``(inputs on dev, units indexing them, {dataset index: display image})`` of layer ``name``."""
    indices = topk.image_indices(name)
    local = {idx: i for i, idx in enumerate(indices)}
    units = [(local[n], c, y, x) for n, c, y, x in topk.units(name)]
    return xs.to(dev), units, dict(zip(indices, raws))


class _Decoded(torch.utils.data.Dataset):
    """``item_and_raw`` of a dataset as tensors (shared memory between processes, not pickles)."""

    def __init__(self, data: IndexedImages) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        x, raw = self.data.item_and_raw(index)
        return x, torch.from_numpy(np.ascontiguousarray(raw))


def _collate_layer(items):
    """``[(input, display), ...]`` of one layer -> ``(stacked inputs, [display, ...])``."""
    return torch.stack([x for x, _ in items]), [r for _, r in items]


class _LayerFeed:
    """Each layer's top images, for the projection that needs them.

    With ``order`` (the layers in job order, known when one process does
    every job) and ``num_workers`` > 0, DataLoader worker processes decode
    whole layers ahead (one batch per layer, in order), so the decoding
    overlaps the projection without competing with the interpreter that
    launches its kernels. Otherwise each layer is decoded here when it comes.

    Never in threads of this process: a preprocess is often an ``nn.Module``
    (torchvision's v2 transforms), and while torch.fx traces a model (the
    receptive fields a projection asks for) it patches ``nn.Module.__call__``
    for the whole process, so a module called from another thread lands in
    the trace and breaks it (seen: ``module is not installed as a submodule``).
    """

    def __init__(self, data: IndexedImages, topk: TopK, order: list[str] | None, dev: torch.device,
                 num_workers: int = 0) -> None:
        self.data, self.topk, self.order, self.dev = data, topk, order, dev
        self.position = 0
        self.batches = None
        if order and num_workers > 0:
            batches = torch.utils.data.DataLoader(
                _Decoded(data), batch_sampler=[topk.image_indices(n) for n in order],
                num_workers=min(num_workers, len(order)), collate_fn=_collate_layer)
            self.batches = iter(batches)

    def get(self, name: str) -> tuple:
        """``(inputs on the device, units, display images)`` of layer ``name``."""
        if self.batches is None:
            return _load_layer(self.data, self.topk, name, self.dev)
        if self.order[self.position] != name:  # pragma: no cover - the loop asks in order
            raise RuntimeError(f"internal error: layer {name!r} asked for out of order")
        self.position += 1
        xs, raws = next(self.batches)
        return _layer_inputs(self.topk, name, xs, [r.numpy() for r in raws], self.dev)

    def __enter__(self) -> "_LayerFeed":
        return self

    def __exit__(self, *exc) -> None:
        self.batches = None  # the DataLoader's workers stop with its iterator


def _draw_threads() -> int:
    """Drawing threads: half the CPUs (the other half feeds torch), 1 to 4."""
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def _project_job(model: nn.Module, xs: torch.Tensor, name: str, units, method: str,
                 project_batch_size: int | None) -> torch.Tensor:
    """One layer's units projected with one method, on the CPU (ready for drawing)."""
    from ..project import project

    return project(model, xs, name, units, method=method, batch_size=project_batch_size).cpu()


def _render_job(data: IndexedImages, topk: TopK, name: str, method: str, proj: torch.Tensor, raws: dict, *,
                tiles_too: bool, encoded: set[int], lock: threading.Lock, web: str | None,
                notes: list[str] | None = None) -> dict:
    """One layer's panel and gallery tiles for one method, encoded (thread-safe).

    The result holds bytes, not files, so that any rank can do the work and
    rank 0 write it. ``tiles_too`` (the job of the layer's first method) adds
    what does not depend on the method: crops, the input images not yet in
    ``encoded`` (claimed under ``lock``), and the tiles' metadata.
    """
    tiles = panel_tiles(topk, name, proj, raws)
    fig = render_panel(tiles, method=method)
    job: dict = {
        "name": name, "method": method, "channels": list(tiles.channels), "notes": list(notes or []),
        "panel": encode_figure(fig, "png"), "web": (web, encode_figure(fig, web)) if web else None,
        "proj": [[encode_tile(t) for t in row] for row in tiles.proj],
    }
    if tiles_too:
        job["title"], job["tile_size"], job["inputs"], job["tiles"] = tiles.title, list(tiles.tile_size), {}, []
        for b in range(len(tiles.channels)):
            row = []
            for r, e in enumerate(tiles.entries[b]):
                with lock:
                    mine = e.index not in encoded
                    encoded.add(e.index)
                if mine:
                    job["inputs"][e.index] = encode_tile(raws[e.index], max_px=None)
                row.append({
                    "rank": r, "index": e.index, "y": e.y, "x": e.x, "value": e.value,
                    "label": data.describe(e.index), "box": list(tiles.boxes[b][r]),
                    "crop": encode_tile(tiles.crops[b][r]),
                })
            job["tiles"].append(row)
    return job


class _Writer:
    """Writes finished jobs into the output folder, then ``topk.json``, ``gallery.json``, ``index.html``."""

    def __init__(self, out_dir: Path, model_id: str, topk: TopK, names: list[str], methods: list[str]):
        self.out_dir, self.model_id, self.topk = out_dir, model_id, topk
        self.names, self.methods = names, methods
        self.inputs: dict[int, str] = {}  # dataset index -> its file, relative to out_dir
        self.meta: dict[str, dict] = {}  # layer -> title, tile size, tiles (from its first method's job)
        self.proj: dict[tuple[str, str, int, int], str] = {}  # (layer, method, channel, rank) -> file
        self.notes: dict[str, list[str]] = {}  # layer -> notes raised by its projections

    def notes_of(self, name: str) -> list[str]:
        """Mining notes of ``name`` (``LayerInfo.notes``), then its projections', each once."""
        return list(dict.fromkeys(list(self.topk.layer(name).notes) + self.notes.get(name, [])))

    def panel_path(self, name: str, method: str) -> Path:
        return self.out_dir / f"{slug(self.model_id)}_{slug(name)}_{method}.png"

    def add(self, job: dict) -> None:
        """Write one job's panel and tiles."""
        name, method, out = job["name"], job["method"], self.out_dir
        self.notes.setdefault(name, []).extend(job.get("notes", []))
        path = self.panel_path(name, method)
        write_atomic(path, job["panel"])
        if job["web"] is not None:
            fmt, blob = job["web"]
            write_atomic(path.with_suffix("." + fmt), blob)
        assets = Path("assets") / slug(name)
        for b, c in enumerate(job["channels"]):
            for r, (blob, ext) in enumerate(job["proj"][b]):
                rel = assets / method / f"c{c}_r{r}.{ext}"
                write_atomic(out / rel, blob)
                self.proj[(name, method, c, r)] = rel.as_posix()
        if "tiles" not in job:
            return
        for index, (blob, ext) in job["inputs"].items():
            if index not in self.inputs:
                rel = Path("assets") / "inputs" / f"{index}.{ext}"
                write_atomic(out / rel, blob)
                self.inputs[index] = rel.as_posix()
        tiles = []
        for b, c in enumerate(job["channels"]):
            row = []
            for r, t in enumerate(job["tiles"][b]):
                blob, ext = t["crop"]
                rel = assets / "crops" / f"c{c}_r{r}.{ext}"
                write_atomic(out / rel, blob)
                row.append({**t, "crop": rel.as_posix()})
            tiles.append(row)
        self.meta[name] = {"title": job["title"], "tile_size": job["tile_size"], "channels": job["channels"],
                           "tiles": tiles}

    def finish(self) -> None:
        """Write ``topk.json``, ``gallery.json`` and ``index.html`` once every job was added."""
        import json

        from .gallery import write_gallery

        manifest: dict = {
            "format": "cnn-internals.gallery/1",
            "model_id": self.model_id,
            "methods": self.methods,
            "input_size": list(self.topk.input_size),
            "n_images": self.topk.n_images,
            "k": self.topk.k,
            "weights": self.topk.weights,
            "layers": [],
        }
        for name in self.names:
            meta = self.meta[name]
            info = self.topk.layer(name)
            entry: dict = {"name": name, "number": info.number, "kind": info.kind, "notes": self.notes_of(name),
                           "rf_local": info.rf_local, "rf_measured": info.rf_measured,
                           "panels": {m: self.panel_path(name, m).name for m in self.methods}, "channels": []}
            for c, row in zip(meta["channels"], meta["tiles"]):
                tiles = []
                for t in row:
                    tile = {key: t[key] for key in ("rank", "index", "y", "x", "value", "label", "box")}
                    tile["input"] = self.inputs[t["index"]]
                    tile["crop"] = t["crop"]
                    tile["proj"] = {m: self.proj[(name, m, c, t["rank"])] for m in self.methods}
                    tiles.append(tile)
                entry["channels"].append({"channel": c, "tiles": tiles})
            entry["title"], entry["tile_size"] = meta["title"], meta["tile_size"]
            manifest["layers"].append(entry)
        self.topk.save(self.out_dir / "topk.json")
        write_atomic(self.out_dir / "gallery.json", json.dumps(manifest, indent=1) + "\n")
        write_gallery(self.out_dir)

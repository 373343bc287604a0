"""The whole job in one process: mine once, project, draw panels, write the gallery.

:func:`visualize_local` is the one-process core of :func:`interp.visualize`
(:func:`interp.api.visualize`, what ``cnn-internals visualize`` and
``cnn-internals demo`` run). For a model and an
:class:`interp.data.IndexedImages` it

1. mines the top-k images of the requested channels of every layer in one
   pass (:func:`interp.mine`), unless a saved :class:`TopK` is given, and
   writes ``topk.json`` at once (:func:`prepare`);
2. per layer, projects all its top-k units back to pixels, one
   :func:`interp.project` call per method (batched inside), and draws one
   seed-style panel per layer and method (``<model>_<layer>_<method>.png``)
   and the tiles the gallery shows (:class:`Jobs`);
3. writes the panels, ``topk.json``, ``gallery.json`` and ``index.html``
   (:class:`Writer`).

It returns the files written and the time spent mining / projecting /
drawing, so a caller can see where the time goes. The same three stages
serve :func:`interp.sharded.visualize_sharded`, which shares them among the
ranks of a torchrun job; this module knows no process group and draws no
progress bar (the caller passes ``mine`` and ``report`` for that).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..data import IndexedImages, TensorImages
from ..layout import as_channels_last, channels_last as channels_last_layout
from ..mine import collected_notes, eval_mode, first_image, mine_local, on_device, resolve_layers
from ..project import project
from .gallery import encode_tile, write_gallery
from .panels import encode_figure, panel_tiles, render_panel
from .._utils import write_atomic
from ..topk import TopK

__all__ = ["visualize_local", "VisualizeResult", "METHODS", "slug", "prepare_out_dir", "prepare", "Prepared",
           "Jobs", "Writer", "as_images", "check_methods"]

METHODS = ("guided", "deconvnet", "gradient")

#: ``mine(data, names) -> TopK``: how :func:`prepare` mines (the caller's choice of process(es) and progress).
MineNames = Callable[[IndexedImages, list], TopK]


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


def as_images(data: IndexedImages | torch.Tensor) -> IndexedImages:
    """``data`` as an :class:`IndexedImages` (a tensor of model inputs becomes :class:`TensorImages`)."""
    if isinstance(data, torch.Tensor):
        data = TensorImages(data)
    if not isinstance(data, IndexedImages):
        raise TypeError(
            "visualize needs an interp.data dataset (open_images(path, preprocess), ArrayImages, TensorImages) "
            f"or an N x C x H x W tensor, got {type(data).__name__}"
        )
    return data


def check_methods(methods: Sequence[str]) -> list[str]:
    """The projection methods asked for, each once, in order; ``ValueError`` for an unknown one."""
    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown method(s) {bad or methods}; choose from {', '.join(METHODS)}")
    return methods


@dataclass
class Prepared:
    """A visualize run once its top-k is known: what the projection and drawing stages work on."""

    model: nn.Module
    data: IndexedImages
    out_dir: Path
    names: list[str]  # canonical layer names, in the order asked
    methods: list[str]
    topk: TopK
    model_id: str
    started: float  # time.perf_counter() at the start, for timings["total"]
    timings: dict[str, float] = field(default_factory=dict)

    def jobs(self) -> list[tuple[str, str]]:
        """The ``(layer, method)`` jobs, layer by layer."""
        return [(name, method) for name in self.names for method in self.methods]


def prepare(model: nn.Module, data: IndexedImages | torch.Tensor, out_dir: str | os.PathLike,
            layers: str | Sequence[str], *, methods: Sequence[str], model_id: str, topk: TopK | None,
            weights_info: dict | None, mine: MineNames, save: bool = True) -> Prepared:
    """Check the arguments, create ``out_dir``, then mine with ``mine(data, names)`` or take ``topk``.

    A fresh mining result is written to ``out_dir/topk.json`` at once
    (when ``save``: one process of several writes), before any projection.
    """
    started = time.perf_counter()
    data, methods = as_images(data), check_methods(methods)
    created = not Path(out_dir).exists()
    out_dir = prepare_out_dir(out_dir)  # before mining: a folder we cannot write fails at once
    timings = {"mining": 0.0, "loading": 0.0, "projection": 0.0, "drawing": 0.0}
    if topk is None:
        names = resolve_layers(model, layers, example=lambda: first_image(data))
        t0 = time.perf_counter()
        topk = _mine_and_keep(mine, data, names, out_dir, created, weights_info, save)
        timings["mining"] = time.perf_counter() - t0
    else:
        names = (list(topk.layers) if layers == "all-conv"
                 else resolve_layers(model, layers, example=lambda: first_image(data)))
        for n in names:
            topk.layer(n)  # clear error for a layer the file does not hold
        if topk.model_id and model_id == "model":
            model_id = topk.model_id
        if weights_info is not None:
            topk.weights = dict(weights_info)
    return Prepared(model, data, out_dir, names, methods, topk, model_id, started, timings)


def visualize_local(
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
    web: str | None = None,
    num_workers: int = 0,
    weights_info: dict | None = None,
    mine: Callable[..., TopK] = mine_local,
    report: Callable[[int, int], None] | None = None,
) -> VisualizeResult:
    """:func:`interp.visualize` in this process alone: mine, project, draw and write into ``out_dir``.

    Parameters
    ----------
    model, data, out_dir, layers, channels, k, methods, model_id, batch_size, project_batch_size:
        As for :func:`interp.visualize` (:func:`interp.api.visualize`).
    device, topk, web, num_workers, weights_info:
        As for :func:`interp.visualize`.
    mine:
        The mining function, called like :func:`interp.mine.mine_local`
        ``(model, data, names, channels=, k=, batch_size=, device=, model_id=)``
        (default: that one, without progress bar); the public wrapper passes
        :func:`interp.mine` with its progress bar and workers.
    report:
        Told ``(panel jobs done, panel jobs in all)`` after each job (a
        progress bar); default: nothing.

    Returns
    -------
    VisualizeResult
    """
    def mine_names(images: IndexedImages, names: list[str]) -> TopK:
        return mine(model, images, names, channels=channels, k=k, batch_size=batch_size, device=device,
                    model_id=model_id)

    run = prepare(model, data, out_dir, layers, methods=methods, model_id=model_id, topk=topk,
                  weights_info=weights_info, mine=mine_names)
    writer = Writer(run)
    jobs = Jobs(run, run.jobs(), device, project_batch_size, web, num_workers)
    # Each job's files are written as it finishes; the layers come in the order asked.
    run.timings.update(jobs.run(writer.add, range(len(jobs.jobs)), in_order=True, report=report))
    t0 = time.perf_counter()
    writer.finish()
    run.timings["drawing"] += time.perf_counter() - t0
    return writer.result(run.timings)


def _mine_and_keep(mine: MineNames, data: IndexedImages, names: list[str], out_dir: Path, created: bool,
                   weights_info: dict | None, save: bool) -> TopK:
    """Mine ``names`` and write ``out_dir/topk.json`` at once (when ``save``), before any projection.

    The file survives whatever fails or is interrupted later, so the mining
    pass (the long part) need not be run again. A folder this call created
    is removed again when mining itself fails (nothing was written yet).
    """
    try:
        with collected_notes():  # its engine warnings are in LayerInfo.notes: said once, per layer, from there
            topk = mine(data, names)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):  # (not empty: someone else's files; leave it)
                out_dir.rmdir()
        raise
    if weights_info is not None:
        topk.weights = dict(weights_info)
    if save:
        topk.save(out_dir / "topk.json")
    return topk


@dataclass
class Jobs:
    """The ``(layer, method)`` jobs of one visualize run, and how to run some of them in this process."""

    prepared: Prepared
    jobs: list[tuple[str, str]]
    device: str | torch.device | None = None
    project_batch_size: int | None = None
    web: str | None = None
    num_workers: int = 0

    def run(self, done: Callable[[dict], None], indices: Iterable[int], in_order: bool,
            report: Callable[[int, int], None] | None = None) -> dict[str, float]:
        """Run the jobs ``indices`` picks; ``done(job)`` receives each result, in the order run.

        Projection runs here; drawing and encoding run in a few threads
        (PIL and zlib release the GIL), so a layer's panel is drawn while the
        next layer is projected. ``in_order``: ``indices`` is every job in
        order, so worker processes can decode the layers' images ahead.
        ``report(j + 1, len(jobs))`` follows job ``j``. Returns the seconds
        spent ``loading``, in ``projection`` and ``drawing`` (the wall time
        not spent loading or projecting, so the timings add up to the total).
        """
        run = self.prepared
        spent = {"loading": 0.0, "projection": 0.0, "drawing": 0.0}
        encoded: set[int] = set()  # input images this process has already encoded
        lock = threading.Lock()  # guards ``encoded``: each input's bytes go with exactly one job
        loaded: tuple = (None, None)  # (layer, its images): reused by the layer's next method
        pending: list = []
        workers = _draw_threads()
        t_loop = time.perf_counter()
        order = list(dict.fromkeys(name for name, _ in self.jobs)) if in_order else None
        # channels_last as in mining: the projections run 10-15% faster (ResNet-18 on a CPU); their
        # values move by rounding, and a guided/deconvnet ReLU whose input is within rounding of 0 may
        # pass or block the other way (seen: 3e-3 of a tile's largest value, deepest ResNet-18 conv).
        with eval_mode(run.model), on_device(run.model, self.device) as dev, channels_last_layout(run.model), \
                ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cnn-internals-draw") as pool, \
                _LayerFeed(run.data, run.topk, order, dev, self.num_workers) as feed:
            for j in indices:
                name, method = self.jobs[j]
                if loaded[0] != name:
                    t0 = time.perf_counter()
                    loaded = (name, feed.get(name))
                    spent["loading"] += time.perf_counter() - t0  # only the wait, when decoded ahead
                xs, units, raws = loaded[1]
                t0 = time.perf_counter()
                with collected_notes() as notes:
                    proj = project(run.model, as_channels_last(xs), name, units, method=method,
                                   batch_size=self.project_batch_size).cpu()
                spent["projection"] += time.perf_counter() - t0
                pending.append(pool.submit(_render_job, run.data, run.topk, name, method, proj, raws,
                                           tiles_too=method == run.methods[0], encoded=encoded, lock=lock,
                                           web=self.web, notes=notes))
                # Hand finished jobs over in order; keep at most a few panels in flight (memory).
                while pending and (pending[0].done() or len(pending) > 2 * workers):
                    done(pending.pop(0).result())
                if report is not None:
                    report(j + 1, len(self.jobs))
            while pending:
                done(pending.pop(0).result())
        spent["drawing"] = time.perf_counter() - t_loop - spent["loading"] - spent["projection"]
        return spent


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
    """Each layer's top images, for the projection that needs them, each image decoded once.

    With ``order`` (the layers in job order, known when one process does
    every job), an image that several layers share is decoded for the first
    and kept until the last of them (a ResNet-18 report: 1,006 layer images,
    549 different ones). With ``order`` and ``num_workers`` > 0, DataLoader
    worker processes decode the layers' new images ahead (one batch per
    layer, in order), so the decoding overlaps the projection without
    competing with the interpreter that launches its kernels. Otherwise each
    layer is decoded here when it comes.

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
        self.kept: dict[int, tuple] = {}  # dataset index -> (input, display image), while a later layer needs it
        self.last: dict[int, int] = {}  # dataset index -> position of the last layer that needs it
        self.new: list[list[int]] = []  # per layer in order: its images no earlier layer had
        if order:
            for p, n in enumerate(order):
                self.new.append([i for i in topk.image_indices(n) if i not in self.last])
                self.last.update((i, p) for i in topk.image_indices(n))
        if order and num_workers > 0:
            batches = torch.utils.data.DataLoader(
                _Decoded(data), batch_sampler=[b for b in self.new if b],
                num_workers=min(num_workers, len(order)), collate_fn=_collate_layer)
            self.batches = iter(batches)

    def get(self, name: str) -> tuple:
        """``(inputs on the device, units, display images)`` of layer ``name``."""
        indices = self.topk.image_indices(name)
        if not self.order:
            xs, raws = _collate_layer([self.data.item_and_raw(idx) for idx in indices])
            return _layer_inputs(self.topk, name, xs, raws, self.dev)
        if self.order[self.position] != name:  # pragma: no cover - the loop asks in order
            raise RuntimeError(f"internal error: layer {name!r} asked for out of order")
        new = self.new[self.position]
        if self.batches is not None and new:
            xs, raws = next(self.batches)
            self.kept.update(zip(new, zip(xs, [r.numpy() for r in raws])))
        else:
            self.kept.update((idx, self.data.item_and_raw(idx)) for idx in new)
        xs, raws = _collate_layer([self.kept[idx] for idx in indices])
        for idx in indices:
            if self.last[idx] == self.position:
                del self.kept[idx]
        self.position += 1
        return _layer_inputs(self.topk, name, xs, raws, self.dev)

    def __enter__(self) -> "_LayerFeed":
        return self

    def __exit__(self, *exc) -> None:
        self.batches = None  # the DataLoader's workers stop with its iterator
        self.kept.clear()


def _draw_threads() -> int:
    """Drawing threads: half the CPUs (the other half feeds torch), 1 to 4."""
    return max(1, min(4, (os.cpu_count() or 1) // 2))


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


class Writer:
    """Writes finished jobs into the output folder, then ``topk.json``, ``gallery.json``, ``index.html``."""

    def __init__(self, run: Prepared):
        self.run = run
        self.out_dir, self.model_id, self.topk = run.out_dir, run.model_id, run.topk
        self.names, self.methods = run.names, run.methods
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

    def result(self, timings: dict[str, float]) -> VisualizeResult:
        """What was written (every process of a shared run returns the same), with ``timings["total"]``."""
        out, names = self.out_dir, self.names
        timings["total"] = time.perf_counter() - self.run.started
        return VisualizeResult(
            out_dir=out, topk=self.topk, panels={(n, m): self.panel_path(n, m) for n in names for m in self.methods},
            topk_path=out / "topk.json", index_path=out / "index.html", timings=timings,
            notes={n: self.notes_of(n) for n in names if self.notes_of(n)},
        )

"""``cnn-internals visualize MODEL --data PATH``: top-k panels, topk.json, gallery.

Mines the top-k images of the chosen channels of every chosen layer in one pass
over the data, projects those units to pixel space, and writes
``DIR/<model>_<layer>_<method>.png`` per layer, ``DIR/topk.json`` and
``DIR/index.html``.

Several processes share the work when started by torchrun, e.g.
``torchrun --nproc-per-node 2 -m interp.cli visualize MODEL --data PATH``
(with ``--device cuda`` each process drives GPU LOCAL_RANK): they split the
images when mining and the (layer, method) panels when projecting; rank 0
writes the same files a single process would.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import v2 as T

import interp
from interp import parallel as dist
from interp.api import visualize
from interp.draw.visualize import METHODS, prepare_out_dir
from interp.topk import TopK

from ._data import DATA_HELP, open_images
from ._models import MODEL_HELP, add_offline_flag, announce_weights, load_model_info


def parse_channels(text: str | None) -> list[int] | None:
    """``"0-5"`` / ``"0,3,8-9"`` -> list of ints (``None`` stays ``None``)."""
    if text is None:
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"bad --channels {text!r}; write e.g. 0-5 or 0,3,8-9") from None
    if not out:
        raise ValueError(f"bad --channels {text!r}; write e.g. 0-5 or 0,3,8-9")
    return list(dict.fromkeys(out))


def add_common(p: argparse.ArgumentParser) -> None:
    """Options shared by ``visualize`` and ``demo``."""
    p.add_argument("--device", default=None, help="cpu or cuda (default: where the model is, i.e. cpu)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass when mining (default 64)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("visualize", help="top-k panels per layer, topk.json and an HTML gallery",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--weights", help="checkpoint to load (.pt/.pth/.safetensors)")
    p.add_argument("--layers", default="all-conv",
                   help="comma-separated layer names (any layer of `cnn-internals layers MODEL` with a feature-map "
                        "output: convs, blocks, activations, traced nodes like layer1.0.add) or selectors: "
                        "all-conv (default), all-blocks, children:NAME")
    p.add_argument("--channels", default=None, help="channels per layer, e.g. 0-5 (default: the first 6)")
    p.add_argument("--top", type=int, default=9, help="images per channel (default 9)")
    p.add_argument("--method", default="guided",
                   help="guided, deconvnet or gradient; several comma-separated (default guided)")
    p.add_argument("--out", default="cnn-internals-out", help="output folder (default ./cnn-internals-out)")
    p.add_argument("--split", default=None, help="split of an Imagenette/MNIST root (default val / test)")
    p.add_argument("--limit", type=int, default=None,
                   help="use N images spread evenly over the dataset (default: all)")
    p.add_argument("--size", type=int, default=None,
                   help="resize + centre-crop to N pixels (only for a path/file.py:factory model that returns no "
                        "preprocess; the others bring their own and refuse --size)")
    p.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images with a warning")
    p.add_argument("--topk", default=None,
                   help="reuse a saved topk.json instead of mining again (a run that stopped after mining "
                        "keeps OUT/topk.json: pass it here to resume)")
    p.add_argument("--web", choices=["webp", "jpg"], default=None, help="also write each panel in this format")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes that decode images (default: 1 for a folder of 512 images "
                        "or more on 2 cores or more, else 0; 0 under torchrun)")
    add_common(p)
    add_offline_flag(p)
    p.set_defaults(func=run)


def input_mode(model) -> str | None:
    """PIL mode matching the model's first conv: "L" for 1 channel, "RGB" for 3."""
    modules = dict(model.named_modules())
    for name in interp.conv_layers(model):
        m = modules[name]
        if isinstance(m, nn.Conv2d):
            return {1: "L", 3: "RGB"}.get(m.in_channels)
    return "RGB"


def report_notes(result, stream=None) -> None:
    """Print each layer's notes (``result.notes``) once, one line each, on stderr."""
    err = stream or sys.stderr
    for layer, notes in result.notes.items():
        for note in notes:
            print(f"note: layer {layer}: {note}", file=err)


def report(result, stream=None, processes: int = 1) -> None:
    """Print where the files are and where the time went (over ``processes`` torchrun ranks)."""
    out = stream or sys.stdout
    panels = sorted({p for p in result.panels.values()})
    print(f"wrote {len(panels)} panel(s) to {result.out_dir}/", file=out)
    for p in panels:
        print(f"  {p}", file=out)
    print(f"top-k:   {result.topk_path}", file=out)
    print(f"gallery: {result.index_path}  (open it in a browser; works from file://)", file=out)
    t = result.timings
    print(f"time: mining {t['mining']:.1f} s, loading top images {t.get('loading', 0.0):.1f} s, "
          f"projection {t['projection']:.1f} s, "
          f"drawing {t['drawing']:.1f} s, total {t['total']:.1f} s"
          + (f" ({processes} processes; projection and drawing: the busiest one's)" if processes > 1 else ""),
          file=out)


def _preprocess_for_size(preprocess, size: int | None, spec: str):
    """The preprocess with ``--size`` applied, or a clear error where ``--size`` cannot apply.

    A model with its own preprocess (every built-in, torchvision: and timm:
    model) fixes its input size there; resizing before it would be undone,
    so ``--size`` is refused rather than silently ignored.
    """
    if size is None:
        return preprocess
    if size < 1:
        raise ValueError(f"--size must be a positive number of pixels, got {size}")
    if preprocess is not None:
        raise ValueError(f"--size applies only to models without their own preprocessing; {spec} brings its own "
                         "(it resizes every image to its input size): drop --size")
    return T.Compose([T.ToImage(), T.Resize(size, antialias=True), T.CenterCrop(size),
                      T.ToDtype(torch.float32, scale=True)])


def resume_hint(out: Path) -> str:
    """What to tell the user when a run stops after mining: the results are kept, and how to reuse them."""
    topk = out / "topk.json"
    return f"the mining results were kept in {topk}; resume with --topk {topk}"


def _check_args(args: argparse.Namespace) -> Path:
    """Every check that needs no model or data, so that a typo costs a second, not a mining pass."""
    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    if args.size is not None and args.size < 1:
        raise ValueError(f"--size must be a positive number of pixels, got {args.size}")
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown --method {','.join(bad) or args.method!r}; choose from {', '.join(METHODS)}")
    parse_channels(args.channels)
    if args.topk and not Path(args.topk).is_file():
        raise FileNotFoundError(f"top-k file not found: {args.topk}")
    return prepare_out_dir(args.out)


def run(args: argparse.Namespace) -> int:
    created = not Path(args.out).exists()
    out = _check_args(args)  # before any loading: fail in a second
    started = time.time()
    try:
        return _run(args, out, started)
    except BaseException:
        if created:  # failed before writing anything (a bad --data...): leave no empty folder behind
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _run(args: argparse.Namespace, out: Path, started: float) -> int:
    # Under torchrun: join the process group; --device cuda becomes this
    # rank's cuda:LOCAL_RANK. Without --device stay on the CPU, as one
    # process would (the model loads there).
    want = (args.device or "cpu") if dist.launched() else args.device
    with dist.process_group(want) as device:
        loaded = load_model_info(args.model, args.weights)
        if dist.is_main():
            announce_weights(args.model, loaded)
        model = loaded.model
        # Without --weights each process would draw its own random weights:
        # all ranks take rank 0's, so they run one model.
        dist.sync_module(model)
        preprocess = _preprocess_for_size(loaded.preprocess, args.size, args.model)
        data = open_images(args.data, preprocess, split=args.split, mode=input_mode(model),
                           skip_corrupt=args.skip_corrupt, limit=args.limit)
        topk = TopK.load(args.topk) if args.topk else None
        methods = [m.strip() for m in args.method.split(",") if m.strip()]
        try:
            result = visualize(model, data, out, args.layers, channels=parse_channels(args.channels),
                               k=args.top, methods=methods, model_id=loaded.model_id, batch_size=args.batch_size,
                               device=device, topk=topk, web=args.web, num_workers=args.workers,
                               weights_info=loaded.weights)
        except BaseException as exc:
            _tell_what_was_kept(exc, out, started, resumed=topk is not None)
            raise
        if dist.is_main():  # one report, not one per rank
            report_notes(result)
            report(result, processes=dist.world()[1])
    return 0


def _tell_what_was_kept(exc: BaseException, out: Path, started: float, resumed: bool) -> None:
    """After mining, a failure or Ctrl-C keeps ``topk.json``: say so, on the error's own line.

    The hint goes on ``exc`` as a note; :func:`interp.cli.main` prints it on
    the same line as the error (or as "interrupted" for Ctrl-C).
    """
    topk = out / "topk.json"
    if resumed or not dist.is_main() or not topk.is_file() or topk.stat().st_mtime < started - 1:
        return  # nothing new was mined (or another rank reports)
    exc.add_note(resume_hint(out))

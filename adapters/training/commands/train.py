"""``cnn-internals train MODEL``: train a built-in model with its recipe.

Writes ``OUT/last.pt``, ``OUT/best.pt``, ``OUT/log.json`` (see
:mod:`adapters.training.checkpoints`) and, when the run is complete, the final weights
``OUT/MODEL.safetensors`` plus ``OUT/MODEL.json`` (metrics, time, recipe,
seed, command) — the two files shipped under ``adapters/weights/``.

GPU fast path (``--device cuda --amp --channels-last --cache-uint8 160
--workers 16``): bf16 autocast, channels_last, pinned memory, persistent
workers, and the Imagenette images decoded once into a uint8 tensor cache
that lives on the GPU and is augmented there per batch
(:mod:`adapters.training.gpu_batches`, which lists what that augmentation approximates).
The cache file goes next to the output folder (``OUT/../imagenette-uint8-
SIZE-KEY.pt``, shared by the five models) unless ``--cache-file`` says
otherwise. All options also run on the CPU (smoke runs, CI).

Distributed data parallel: launched by ``torchrun`` (e.g. ``torchrun
--standalone --nproc-per-node 2 -m interp.cli train lenet5 ...``) every
process trains a DistributedDataParallel replica (Gloo on CPUs, NCCL on
GPUs, one GPU per process with ``--device cuda``); ``--batch-size`` / the
recipe's batch size is the global batch, split over the processes. Rank 0
alone prints, shows progress bars and writes files; ``--resume`` works with
any number of processes (:mod:`adapters.training.fit` says what carries over).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import shlex
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from safetensors.torch import save

from adapters.checkpoint import write_atomic
from adapters.preprocess import imagenette_stats
from interp import parallel

from ..checkpoints import seed_everything
from ..fit import fit
from ..gpu_batches import DeviceImagenette
from ..recipes import augmentation
from ..setups import SETUPS, accepts, setup_for
from ..spec import TrainSpec
from ..uint8_cache import cache_key, load_or_decode

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run", "check_cuda", "rank0_first"]

T = TypeVar("T")

HELP = "train a built-in model (checkpoints, log, final weights)"
DESCRIPTION = (
    "Train a built-in model with its recipe; resumable. On a GPU use e.g. "
    "'--device cuda --amp --channels-last --cache-uint8 160 --workers 16': bf16 autocast, "
    "channels_last, and Imagenette decoded once into a uint8 cache augmented on the GPU."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``train``."""
    p.add_argument("model", metavar="MODEL", help=f"one of: {', '.join(sorted(SETUPS))}")
    p.add_argument("--data", default=None,
                   help="data root holding MNIST/raw/ or imagenette2-160/ (default ../shared/data or $CNN_INTERNALS_DATA)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's number of epochs")
    p.add_argument("--batch-size", type=int, default=None,
                   help="override the recipe's batch size (the global batch under torchrun, split over the processes)")
    p.add_argument("--lr", type=float, default=None, help="override the recipe's learning rate")
    p.add_argument("--limit", type=int, default=None, help="use only N training and N validation images (smoke runs)")
    p.add_argument("--image-size", type=int, default=None,
                   help="train/eval crop size in px (Imagenette models; default the recipe's 224)")
    p.add_argument("--crop-scale", type=float, default=None, metavar="LO",
                   help="Imagenette models but AlexNet: RandomResizedCrop with area scale LO..1 instead of the "
                        "recipe's crop (colour jitter kept); a labelled deviation from the recipe")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default: cpu")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader workers, kept alive across epochs; with --cache-uint8 the decoding processes (default 0)")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast (CUDA; on the CPU too, where it is mostly slower: for checking only)")
    p.add_argument("--channels-last", action="store_true", help="model and batches in channels_last memory format")
    p.add_argument("--cache-uint8", type=int, default=None, metavar="SIZE",
                   help="Imagenette models: decode the images once at SIZExSIZE (e.g. 160) into a uint8 cache on "
                        "the device and augment each batch there")
    p.add_argument("--cache-file", default=None, metavar="PATH",
                   help="where --cache-uint8 keeps its cache (default OUT/../imagenette-uint8-SIZE-KEY.pt; "
                        "'none' keeps it in memory only)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default=None, help="output folder (default out/train/MODEL)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (with any number of processes)")
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                   help="stop once EPOCHS epochs are done (the LR schedule still spans the recipe); "
                        "continue later with --resume, e.g. in the next slot of a time-limited job")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun with --device cuda: SyncBatchNorm, batch statistics over the global batch")
    p.add_argument("--no-progress", action="store_true", help="no per-epoch progress bar")


def run(args: argparse.Namespace) -> int:
    """Train ``args.model``, alone or as one ``torchrun`` process; returns 0 on success."""
    _check_args(args)
    with parallel.process_group(args.device) as device:
        return _train(args, device)


def check_cuda(device: str) -> None:
    """Before torchrun's processes pick their GPUs: a clear line when there is none."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu")


def _check_args(args: argparse.Namespace) -> None:
    """Argument errors, before any process group is joined (so every process reports the same line)."""
    setup_for(args.model)
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    if args.workers < 0:
        raise ValueError("--workers must be >= 0")
    if getattr(args, "stop_after", None) is not None and args.stop_after < 1:
        raise ValueError("--stop-after must be >= 1 epoch")
    if args.cache_uint8 is not None:
        if not accepts(args.model, "stats"):  # the Imagenette setups
            raise ValueError(f"--cache-uint8 applies to the Imagenette models, not {args.model}")
        if args.cache_uint8 < 8:
            raise ValueError(f"--cache-uint8 SIZE must be >= 8 px, got {args.cache_uint8}")
    elif args.cache_file is not None:
        raise ValueError("--cache-file goes with --cache-uint8 SIZE")
    check_cuda(args.device)


def rank0_first(make: Callable[[], T]) -> T:
    """``make()`` on rank 0, then on the other ranks (after a barrier): rank 0 fills any file cache first."""
    result = make() if parallel.is_main() else None
    parallel.barrier()
    return make() if not parallel.is_main() else result  # type: ignore[return-value]


def _spec(args: argparse.Namespace) -> TrainSpec:
    """The run's :class:`TrainSpec`: the model's setup with the options given, the recipe overridden by flags."""
    setup = setup_for(args.model)
    kwargs: dict[str, Any] = {"data_root": args.data, "limit": args.limit}
    # Options only some setups take: a clear error for the others.
    for key, why in (("image_size", " (its input size is fixed)"), ("crop_scale", "")):
        value = getattr(args, key, None)
        if value is None:
            continue
        if not accepts(args.model, key):
            raise ValueError(f"--{key.replace('_', '-')} does not apply to {args.model}{why}")
        kwargs[key] = value
    if accepts(args.model, "stats"):
        kwargs["stats"] = imagenette_stats()  # the same numbers for the device batches (_device_batches)
    # Rank 0 first: a setup may fill a file cache, which the others then read.
    spec = rank0_first(lambda: setup(**kwargs))
    changes = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr))
               if v is not None}
    if changes:
        spec.recipe = dataclasses.replace(spec.recipe, **changes)
    return spec


def _train(args: argparse.Namespace, device: torch.device | None) -> int:
    rank, world = parallel.world()
    say = print if rank == 0 else (lambda *_a, **_k: None)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Seed before the model is built: its initial weights are part of the run
    # (and the same on every rank; DDP broadcasts rank 0's anyway).
    seed_everything(args.seed)
    spec = _spec(args)
    out = Path(args.out) if args.out else Path("out") / "train" / args.model
    batches = _device_batches(args, spec, out, device) if args.cache_uint8 is not None else None
    say(_start_line(args, spec, device, world, batches is not None, out))
    if args.sync_bn and world == 1:
        say("note: --sync-bn has no effect in a single process (launch with torchrun)")
    if str(device).startswith("cuda"):
        # Fixed input shapes: let cuDNN time its kernels once and keep the fastest.
        torch.backends.cudnn.benchmark = True
    result = fit(
        spec, out, device=device, workers=args.workers, seed=args.seed,
        resume=args.resume, progress=not args.no_progress,
        amp=args.amp, channels_last=args.channels_last, batches=batches,
        sync_bn=args.sync_bn, stop_after=args.stop_after,
    )
    history = result["history"]
    if len(history) == spec.recipe.epochs and rank == 0:
        _export(args, spec, history, out)
    return 0


def _start_line(args: argparse.Namespace, spec: TrainSpec, device: torch.device | None, world: int,
                cached: bool, out: Path) -> str:
    """The first line a run prints: recipe, batch split, data, device and speed options."""
    batch = spec.recipe.batch_size
    split = ""
    if world > 1:
        per = f"{batch // world}" if batch % world == 0 else f"{batch // world}-{batch // world + 1}"
        split = f" ({per} per process x {world} processes" + (", SyncBatchNorm" if args.sync_bn else "") + ")"
    return (
        f"training {args.model} with recipe {spec.recipe.name}: {spec.recipe.epochs} epochs, batch "
        f"{batch}{split}, {len(spec.train_set)} training images, device {device if world > 1 else args.device}, "
        f"{torch.get_num_threads()} threads"
        + (", bf16 autocast" if args.amp else "") + (", channels_last" if args.channels_last else "")
        + (f", uint8 cache at {args.cache_uint8} px augmented on {args.device}" if cached else "")
        + (f", crop scale {args.crop_scale:g}-1 (instead of the recipe's crop)"
           if getattr(args, "crop_scale", None) is not None else "")
        + f" -> {out}"
    )


def _device_batches(args: argparse.Namespace, spec: TrainSpec, out: Path,
                    device: torch.device | None = None) -> DeviceImagenette:
    """The :class:`DeviceImagenette` of ``--cache-uint8`` (decoded or read from its file).

    Under torchrun every process holds the whole cache on its own GPU (any
    image can fall into any rank's block of a batch); rank 0 decodes and
    writes the cache file first, the others then read it (or, with
    ``--cache-file none`` or no shared file system, decode it themselves).
    Its augmentation is the recipe's entry, the one the CPU transforms of
    ``spec`` were built from.
    """
    size = int(args.cache_uint8)
    if args.cache_file is not None and args.cache_file.lower() == "none":
        path = None
    elif args.cache_file is not None:
        path = Path(args.cache_file)
    else:
        key = cache_key(spec.train_set.fingerprint(), spec.val_set.fingerprint(), size)  # type: ignore[union-attr]
        path = out.resolve().parent / f"imagenette-uint8-{size}-{key}.pt"
    quiet = not parallel.is_main()
    train, val = rank0_first(lambda: load_or_decode(
        spec.train_set, spec.val_set, size, path, workers=args.workers, progress=not (args.no_progress or quiet),
        log=(lambda *_a, **_k: None) if quiet else print))
    image_size = int(spec.recipe.image_size)  # type: ignore[arg-type]
    aug = augmentation(spec.recipe, image_size, getattr(args, "crop_scale", None))
    return DeviceImagenette(train, val, aug, imagenette_stats(), image_size,
                            device=device if device is not None else args.device)


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (from the parsed arguments, not sys.argv)."""
    parts = ["cnn-internals", "train", args.model]
    for flag, value in (
        ("--data", args.data), ("--epochs", args.epochs), ("--batch-size", args.batch_size),
        ("--lr", args.lr), ("--limit", args.limit), ("--image-size", args.image_size),
        ("--crop-scale", getattr(args, "crop_scale", None)), ("--device", args.device),
        ("--workers", args.workers), ("--threads", args.threads), ("--seed", args.seed), ("--out", args.out),
        ("--cache-uint8", getattr(args, "cache_uint8", None)), ("--cache-file", getattr(args, "cache_file", None)),
    ):
        if value is not None:
            parts += [flag, str(value)]
    for flag, on in (("--amp", getattr(args, "amp", False)), ("--channels-last", getattr(args, "channels_last", False)),
                     ("--sync-bn", getattr(args, "sync_bn", False))):
        if on:
            parts.append(flag)
    return " ".join(shlex.quote(p) for p in parts)


def _export(args: argparse.Namespace, spec: TrainSpec, history: list[dict[str, Any]], out: Path) -> None:
    """Write the final (last-epoch) weights as safetensors and a JSON record of the run."""
    weights = out / f"{args.model}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in spec.model.state_dict().items()}
    write_atomic(weights, save(state))
    last = history[-1]
    record = {
        "model": args.model,
        "weights": weights.name,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "epochs": len(history),
        "seed": args.seed,
        "recipe": spec.recipe.to_dict(),
        "train_images": len(spec.train_set),  # type: ignore[arg-type]
        "eval_set": spec.val_name,
        "eval_images": len(spec.val_set) if spec.val_set is not None else 0,
        "eval_top1": last.get("val_top1"),
        "eval_correct": round(last["val_top1"] * len(spec.val_set)) if "val_top1" in last else None,
        "final": {k: v for k, v in last.items() if k.startswith("val_")},
        "train_seconds": sum(h["seconds"] for h in history),
        "seconds_per_epoch": sum(h["seconds"] for h in history) / len(history),
        "device": args.device,
        "world_size": history[-1].get("world_size", 1),  # of the session that finished the run
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": _command(args),
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_atomic(out / f"{args.model}.json", json.dumps(record, indent=2) + "\n")
    print(f"final weights: {weights}  ({spec.val_name} top-1 {100 * last.get('val_top1', float('nan')):.2f}%)")

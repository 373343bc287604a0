"""``cnn-internals train MODEL``: train a built-in model with its recipe.

Writes ``OUT/last.pt``, ``OUT/best.pt``, ``OUT/log.json`` (see
:mod:`adapters.training`) and, when the run is complete, the final weights
``OUT/MODEL.safetensors`` plus ``OUT/MODEL.json`` (metrics, time, recipe,
seed, command) — the two files shipped under ``adapters/weights/``.

GPU fast path (``--device cuda --amp --channels-last --cache-uint8 160
--workers 16``): bf16 autocast, channels_last, pinned memory, persistent
workers, and the Imagenette images decoded once into a uint8 tensor cache
that lives on the GPU and is augmented there per batch
(:mod:`adapters.gpu_data`, which lists what that augmentation approximates).
The cache file goes next to the output folder (``OUT/../imagenette-uint8-
SIZE-KEY.pt``, shared by the five models) unless ``--cache-file`` says
otherwise. All options also run on the CPU (smoke runs, CI).

Distributed data parallel: launched by ``torchrun`` (e.g. ``torchrun
--standalone --nproc-per-node 2 -m interp.cli train lenet5 ...``) every
process trains a DistributedDataParallel replica (Gloo on CPUs, NCCL on
GPUs, one GPU per process with ``--device cuda``); ``--batch-size`` / the
recipe's batch size is the global batch, split over the processes. Rank 0
alone prints, shows progress bars and writes files; ``--resume`` works with
any number of processes (:mod:`adapters.training` says what carries over).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import functools
import importlib
import inspect
import json
import platform
import shlex
import time
from pathlib import Path
from typing import Any

# Trainable model -> "module:function" returning an adapters.training.TrainSpec
# from (data_root, limit[, image_size]). The Imagenette recipes share one
# setup that takes the model name first.
_IMAGENETTE = "adapters.recipes:training_setup"
TRAINABLE: dict[str, str] = {
    "lenet5": "adapters.lenet5:training_setup",
    "alexnet": _IMAGENETTE,
    "vgg16": _IMAGENETTE,
    "inception": _IMAGENETTE,
    "resnet18": _IMAGENETTE,
    "mobilenet": _IMAGENETTE,
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``train`` verb."""
    p = subparsers.add_parser(
        "train",
        help="train a built-in model (checkpoints, log, final weights)",
        description=(
            "Train a built-in model with its recipe; resumable. On a GPU use e.g. "
            "'--device cuda --amp --channels-last --cache-uint8 160 --workers 16': bf16 autocast, "
            "channels_last, and Imagenette decoded once into a uint8 cache augmented on the GPU."
        ),
    )
    p.add_argument("model", metavar="MODEL", help=f"one of: {', '.join(sorted(TRAINABLE))}")
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
    p.set_defaults(func=run)
    return p


def _setup(name: str):
    if name not in TRAINABLE:
        raise ValueError(f"model {name!r} is not trainable here; trainable: {', '.join(sorted(TRAINABLE))}")
    module, func = TRAINABLE[name].split(":")
    setup = getattr(importlib.import_module(module), func)
    return functools.partial(setup, name) if TRAINABLE[name] == _IMAGENETTE else setup


def run(args: argparse.Namespace) -> int:
    """Train ``args.model``, alone or as one ``torchrun`` process; returns 0 on success."""
    from interp import parallel as dist

    _check_args(args)
    with dist.process_group(args.device) as device:
        return _train(args, device)


def _check_args(args: argparse.Namespace) -> None:
    """Argument errors, before any process group is joined (so every process reports the same line)."""
    _setup(args.model)
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    if args.workers < 0:
        raise ValueError("--workers must be >= 0")
    if getattr(args, "stop_after", None) is not None and args.stop_after < 1:
        raise ValueError("--stop-after must be >= 1 epoch")
    if args.cache_uint8 is not None:
        if TRAINABLE[args.model] != _IMAGENETTE:
            raise ValueError(f"--cache-uint8 applies to the Imagenette models, not {args.model}")
        if args.cache_uint8 < 8:
            raise ValueError(f"--cache-uint8 SIZE must be >= 8 px, got {args.cache_uint8}")
    elif args.cache_file is not None:
        raise ValueError("--cache-file goes with --cache-uint8 SIZE")
    _check_cuda(args.device)


def _check_cuda(device: str) -> None:
    """Before torchrun's processes pick their GPUs: a clear line when there is none."""
    import torch

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu")


def _train(args: argparse.Namespace, device) -> int:
    import torch

    from adapters.training import fit, seed_everything
    from interp import parallel as dist

    setup = _setup(args.model)
    rank, world = dist.world()
    say = print if rank == 0 else (lambda *_a, **_k: None)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Seed before the model is built: its initial weights are part of the run
    # (and the same on every rank; DDP broadcasts rank 0's anyway).
    seed_everything(args.seed)
    kwargs: dict[str, Any] = {"data_root": args.data, "limit": args.limit}
    # Options only some setups take: a clear error for the others.
    for key, why in (("image_size", " (its input size is fixed)"), ("crop_scale", "")):
        value = getattr(args, key, None)
        if value is None:
            continue
        if key not in inspect.signature(setup).parameters:
            raise ValueError(f"--{key.replace('_', '-')} does not apply to {args.model}{why}")
        kwargs[key] = value
    # Rank 0 first: a setup may compute and cache dataset statistics, which the others then read.
    spec = _rank0_first(lambda: setup(**kwargs))
    changes: dict[str, Any] = {}
    if args.epochs is not None:
        changes["epochs"] = args.epochs
    if args.batch_size is not None:
        changes["batch_size"] = args.batch_size
    if args.lr is not None:
        changes["lr"] = args.lr
    if changes:
        spec.recipe = dataclasses.replace(spec.recipe, **changes)
    out = Path(args.out) if args.out else Path("out") / "train" / args.model
    batches = _device_batches(args, spec, out, device) if args.cache_uint8 is not None else None
    batch = spec.recipe.batch_size
    split = ""
    if world > 1:
        per = f"{batch // world}" if batch % world == 0 else f"{batch // world}-{batch // world + 1}"
        split = f" ({per} per process x {world} processes" + (", SyncBatchNorm" if args.sync_bn else "") + ")"
    say(
        f"training {args.model} with recipe {spec.recipe.name}: {spec.recipe.epochs} epochs, batch "
        f"{batch}{split}, {len(spec.train_set)} training images, device {device if world > 1 else args.device}, "
        f"{torch.get_num_threads()} threads"
        + (", bf16 autocast" if args.amp else "") + (", channels_last" if args.channels_last else "")
        + (f", uint8 cache at {args.cache_uint8} px augmented on {args.device}" if batches is not None else "")
        + (f", crop scale {args.crop_scale:g}-1 (instead of the recipe's crop)"
           if getattr(args, "crop_scale", None) is not None else "")
        + f" -> {out}"
    )
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


def _rank0_first(make):
    """``make()`` on rank 0, then on the other ranks (after a barrier): rank 0 fills any file cache first."""
    from interp import parallel as dist

    result = make() if dist.is_main() else None
    dist.barrier()
    return make() if not dist.is_main() else result


def _device_batches(args: argparse.Namespace, spec, out: Path, device=None):
    """The :class:`adapters.gpu_data.DeviceImagenette` of ``--cache-uint8`` (decoded or read from its file).

    Under torchrun every process holds the whole cache on its own GPU (any
    image can fall into any rank's block of a batch); rank 0 decodes and
    writes the cache file first, the others then read it (or, with
    ``--cache-file none`` or no shared file system, decode it themselves).
    """
    from interp import parallel as dist

    from adapters import gpu_data
    from adapters.datasets.imagenette import dataset_stats
    from adapters.recipes import get_recipe

    size = int(args.cache_uint8)
    if args.cache_file is not None and args.cache_file.lower() == "none":
        path = None
    elif args.cache_file is not None:
        path = Path(args.cache_file)
    else:
        key = gpu_data.cache_key(spec.train_set.fingerprint(), spec.val_set.fingerprint(), size)
        path = out.resolve().parent / f"imagenette-uint8-{size}-{key}.pt"
    quiet = not dist.is_main()
    train, val = _rank0_first(lambda: gpu_data.load_or_decode(
        spec.train_set, spec.val_set, size, path, workers=args.workers, progress=not (args.no_progress or quiet),
        log=(lambda *_a, **_k: None) if quiet else print))
    recipe = get_recipe(args.model)
    image_size = int(spec.recipe.image_size)
    # dataset_stats is cached on disk: this is the same record training_setup used.
    stats = dataset_stats(args.data)
    spec_aug = gpu_data.aug_spec(recipe.train_transform, image_size, getattr(args, "crop_scale", None))
    return gpu_data.DeviceImagenette(train, val, spec_aug, stats,
                                     image_size, device=device if device is not None else args.device)


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


def _export(args: argparse.Namespace, spec, history: list[dict[str, Any]], out: Path) -> None:
    """Write the final (last-epoch) weights as safetensors and a JSON record of the run."""
    import torch
    from safetensors.torch import save

    from interp._utils import write_atomic

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
        "train_images": len(spec.train_set),
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

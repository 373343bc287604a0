"""``cnn-internals finetune MODEL --data ROOT``: fine-tuning on Imagenette (head-only or full), plus zero-shot.

Head-only (the default): freezes the backbone, runs the Imagenette train and
val images through it once (features cached under the cnn-internals cache),
trains a new 10-way linear head on the cached features (seconds on a CPU), and
reports val top-1. For a 1000-way ImageNet model it also reports the
zero-shot baseline: argmax over the logits of the 10 Imagenette classes'
ImageNet indices (0, 217, 482, 491, 497, 566, 569, 571, 574, 701).

``--full``: replaces the head by a new 10-way one and trains every weight
(AdamW, cosine schedule, random horizontal flips) with the same trainer and
the same conventions as ``cnn-internals train``: ``OUT/last.pt`` and
``OUT/best.pt`` after every epoch (atomic), ``OUT/log.json``, per-epoch
progress bars, ``--resume`` / ``--stop-after``.

Both modes write ``OUT/<model>.safetensors`` (the whole model with the new
head; for ``pretrained:mobilenet_v1_025_keras`` load it back with
``--weights``) and ``OUT/finetune.json`` (the numbers, image counts,
settings, times), atomically.

Under ``torchrun`` the feature pass (head-only) is split over the processes
and ``--full`` trains with DistributedDataParallel (``--batch-size`` is the
global batch; ``--sync-bn`` on GPUs); rank 0 alone prints and writes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save
from torch import nn

from adapters.checkpoint import write_atomic
from adapters.datasets import Imagenette
from interp import parallel as dist

from .. import finetune as ft
from ..fit import fit
from .train import check_cuda

__all__ = ["HELP", "DESCRIPTION", "add_arguments", "run", "ModelLoader"]

#: ``load_model(spec, weights) -> (model, preprocess, model_id)``: how the command resolves its MODEL argument.
ModelLoader = Callable[[str, str | None], tuple[nn.Module, Callable | None, str]]

HELP = "fine-tuning on Imagenette: head-only on cached features, or --full"
DESCRIPTION = __doc__


def add_arguments(p: argparse.ArgumentParser, model_help: str = "the model to fine-tune") -> None:
    """The flags of ``finetune`` (``model_help`` describes the MODEL argument: what the loader takes)."""
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument("--weights", default=None, help="pretrained weights (a file, or 'pretrained' for torchvision:/timm:)")
    p.add_argument("--data", default=None, help="Imagenette root (default ../shared/data or $CNN_INTERNALS_DATA)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--head-only", dest="full", action="store_false",
                      help="train only a new 10-way head on frozen, cached features (the default; the CPU path)")
    mode.add_argument("--full", dest="full", action="store_true",
                      help="train every weight with a new 10-way head (checkpoints, log, resume like `train`)")
    p.set_defaults(full=False)
    p.add_argument("--train-limit", type=int, default=None, help="use N train images spread over the classes (default all)")
    p.add_argument("--val-limit", type=int, default=None, help="use N val images spread over the classes (default all)")
    p.add_argument("--steps", type=int, default=300, help="full-batch Adam steps for the head on the frozen features (head-only, and --full's "
                        "probe; default 300)")
    p.add_argument("--epochs", type=int, default=5, help="--full: epochs (default 5)")
    p.add_argument("--head-init", choices=["probe", "random"], default="probe",
                   help="--full: start from a head trained on the frozen features first (probe, the default: "
                        "'linear probe, then fine-tune'), or from a random head")
    p.add_argument("--train-bn", action="store_true",
                   help="--full: BatchNorm layers use and update batch statistics (default: they keep the "
                        "pretrained running statistics)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 0.01 for the head-only head, 1e-4 for --full)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new head's initialisation and of --full's shuffling (default 0)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per forward pass when caching features; with --full the global training batch (default 64)")
    p.add_argument("--device", default="cpu", help="where to compute (default cpu; under torchrun 'cuda' = one GPU per process)")
    p.add_argument("--workers", type=int, default=0, help="--full: DataLoader workers per process (default 0)")
    p.add_argument("--amp", action="store_true", help="--full: bf16 autocast")
    p.add_argument("--channels-last", action="store_true", help="--full: channels_last memory format")
    p.add_argument("--sync-bn", action="store_true", help="--full under torchrun on GPUs: SyncBatchNorm")
    p.add_argument("--resume", action="store_true", help="--full: continue from OUT/last.pt (any number of processes)")
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                   help="--full: stop once EPOCHS epochs are done (continue with --resume)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cache", default=None, help="feature cache folder (default <cnn-internals cache>/features)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", default=None, help="output folder (default out/finetune/MODEL)")


def _check_args(args: argparse.Namespace) -> None:
    """Argument errors, before any process group is joined (every process reports the same line)."""
    for flag, value in (("--train-limit", args.train_limit), ("--val-limit", args.val_limit)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1")
    if args.batch_size < 1 or args.steps < 1 or args.epochs < 1:
        raise ValueError("--batch-size, --steps and --epochs must be >= 1")
    if args.workers < 0:
        raise ValueError("--workers must be >= 0")
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError("--stop-after must be >= 1 epoch")
    check_cuda(args.device)
    if not args.full:
        used = [f for f, on in (("--resume", args.resume), ("--stop-after", args.stop_after is not None),
                                ("--amp", args.amp), ("--channels-last", args.channels_last),
                                ("--sync-bn", args.sync_bn), ("--workers", args.workers > 0)) if on]
        if used:
            raise ValueError(f"{', '.join(used)}: only with --full fine-tuning; add --full or drop "
                             + ("it" if len(used) == 1 else "them"))


def run(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """Fine-tune ``args.model`` on Imagenette, alone or as one ``torchrun`` process; returns 0.

    ``load_model(spec, weights) -> (model, preprocess, model_id)`` resolves
    the MODEL argument (the command line's resolver: built-in names,
    ``torchvision:``/``timm:`` names, ``file.py:factory``).
    """
    _check_args(args)
    with dist.process_group(args.device) as device:
        return _run(args, device, load_model)


def _write_outputs(model: nn.Module, report: dict, out: Path, model_id: str) -> Path:
    """The model's weights (safetensors) and ``finetune.json``, each written atomically."""
    weights_path = out / f"{model_id}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(weights_path, save(state))
    report["weights_file"] = weights_path.name
    write_atomic(out / "finetune.json", json.dumps(report, indent=1) + "\n")
    return weights_path


def _run(args: argparse.Namespace, device: torch.device | None, load_model: ModelLoader) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, preprocess, model_id = load_model(args.model, args.weights)
    if preprocess is None:
        raise ValueError(f"{args.model} has no preprocess of its own; finetune needs the model's input transform")
    train = ft.imagenette(args.data, "train", preprocess, args.train_limit)
    val = ft.imagenette(args.data, "val", preprocess, args.val_limit)
    out = Path(args.out or Path("out") / "finetune" / model_id)
    report: dict = {
        "format": "cnn-internals.finetune/1",
        "model": args.model, "weights": args.weights, "mode": "full" if args.full else "head-only",
        "train_images": len(train), "val_images": len(val), "world_size": dist.world()[1],
    }
    if args.full:
        head = None
        probe_file = out / "probe.json"
        if args.head_init == "probe" and not (args.resume and (out / "last.pt").is_file()):
            # Linear probe first: the full fine-tune then starts from a trained head.
            head = _probe(args, model, model_id, train, val, device, report)
            if head is not None:
                _print_probe(report)
                # Kept beside the checkpoints: a resumed session skips the probe but reports it.
                write_atomic(probe_file, json.dumps(report, indent=1) + "\n")
        elif args.resume and probe_file.is_file():
            report.update({k: v for k, v in json.loads(probe_file.read_text()).items() if k not in report})
        return _full(args, device, model, model_id, train, val, out, report, t_start, head)
    head = _probe(args, model, model_id, train, val, device, report)
    if head is None:
        return 0  # the head trains in seconds on rank 0; the processes only shared the feature pass
    ft.replace_head(model, head.to(next(model.parameters()).device))
    report["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    weights_path = _write_outputs(model, report, out, model_id)
    _print_probe(report)
    print(f"wrote {weights_path} and {out / 'finetune.json'}")
    return 0


def _probe(args: argparse.Namespace, model: nn.Module, model_id: str, train: Imagenette, val: Imagenette,
           device: torch.device | None, report: dict) -> nn.Linear | None:
    """Backbone features (cached), zero-shot numbers and a trained 10-way head (``None`` off rank 0)."""

    def feats(data: Imagenette, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = None if args.no_cache else ft.feature_cache_key(model_id, args.weights, data)
        return ft.backbone_features(model, data, cache=args.cache, key=key, batch_size=args.batch_size,
                                    device=device if device is not None else "cpu", desc=f"{split} features",
                                    progress=not args.no_progress)

    t0 = time.perf_counter()
    ftr, _, ytr = feats(train, "train")
    fva, lva, yva = feats(val, "val")
    t_features = time.perf_counter() - t0
    if not dist.is_main():
        return None
    report["feature_dim"] = int(ftr.shape[1])
    if lva.shape[1] in (1000, 1001):  # ImageNet logits (1001: TF-slim, index 0 = background)
        report["zero_shot_val_top1"] = ft.accuracy(ft.zero_shot(lva), yva)
        # Top-1 over all ImageNet classes (the 10 classes' indices counted as correct).
        classes = torch.tensor(ft.IMAGENET_CLASSES) + (lva.shape[1] - 1000)
        report["imagenet_val_top1"] = ft.accuracy(lva.argmax(1), classes[yva])
    lr = 0.01 if (args.lr is None or args.full) else args.lr
    t0 = time.perf_counter()
    head = ft.train_head(ftr, ytr, 10, steps=args.steps, lr=lr, weight_decay=args.weight_decay, seed=args.seed,
                         progress=not args.no_progress)
    with torch.no_grad():
        report["head_only_train_top1"] = ft.accuracy(head(ftr).argmax(1), ytr)
        report["head_only_val_top1"] = ft.accuracy(head(fva).argmax(1), yva)
    t_head = time.perf_counter() - t0
    report.update(steps=args.steps, lr=lr, head_lr=lr, weight_decay=args.weight_decay, seed=args.seed,
                  seconds={"features": round(t_features, 1), "head": round(t_head, 2)})
    print(f"{args.model}: {len(train)} train / {len(val)} val images, features {ftr.shape[1]}-d "
          f"({t_features:.1f} s), head trained in {t_head:.1f} s")
    return head


def _print_probe(report: dict) -> None:
    if "zero_shot_val_top1" in report:
        print(f"  zero-shot val top-1 (10 ImageNet classes): {report['zero_shot_val_top1']:.2%}")
        print(f"  ImageNet 1000-way val top-1:              {report['imagenet_val_top1']:.2%}")
    print(f"  head-only val top-1:                       {report['head_only_val_top1']:.2%}")


def _full(args: argparse.Namespace, device: torch.device | None, model: nn.Module, model_id: str,
          train: Imagenette, val: Imagenette, out: Path, report: dict, t_start: float,
          head: nn.Linear | None = None) -> int:
    """``--full``: every weight trained by :func:`adapters.training.fit`; outputs when the run is complete."""
    say = print if dist.is_main() else (lambda *_a, **_k: None)
    lr = 1e-4 if args.lr is None else args.lr
    spec = ft.full_setup(model, train, val, epochs=args.epochs, batch_size=args.batch_size, lr=lr,
                         weight_decay=args.weight_decay, seed=args.seed, head=head, frozen_bn=not args.train_bn)
    # From the flag, not from ``head``: a resumed run skips the probe, its head is in the checkpoint.
    spec.extra["head_init"] = "linear probe" if args.head_init == "probe" else "random"
    world = dist.world()[1]
    say(f"fine-tuning all weights of {args.model}: {args.epochs} epochs, batch {args.batch_size}"
        + (f" over {world} processes" if world > 1 else "") + f", AdamW lr {lr:g} cosine, "
        f"{len(train)} train / {len(val)} val images -> {out}")
    if str(device).startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # fixed input shapes: keep cuDNN's fastest kernels
    result = fit(spec, out, device=device if device is not None else "cpu", workers=args.workers, seed=args.seed,
                 resume=args.resume, progress=not args.no_progress, log=say, amp=args.amp,
                 channels_last=args.channels_last, sync_bn=args.sync_bn, stop_after=args.stop_after)
    history = result["history"]
    if len(history) < args.epochs or not dist.is_main():
        return 0
    last = history[-1]
    report.update(
        epochs=args.epochs, batch_size=args.batch_size, lr=lr, weight_decay=args.weight_decay, seed=args.seed,
        head_init=spec.extra["head_init"], frozen_bn=spec.frozen_bn,
        full_val_top1=last.get("val_top1"), full_val_loss=last.get("val_loss"), full_train_top1=last["train_top1"],
        world_size=last.get("world_size", 1),
        seconds={**report.get("seconds", {}), "train": round(sum(h["seconds"] for h in history), 1),
                 "total_this_session": round(time.perf_counter() - t_start, 1)},
    )
    weights_path = _write_outputs(spec.model, report, out, model_id)
    print(f"  full fine-tune val top-1: {last.get('val_top1', float('nan')):.2%}")
    print(f"wrote {weights_path} and {out / 'finetune.json'} (checkpoints and log.json in {out})")
    return 0

"""``cnn-internals finetune MODEL --data ROOT``: head-only fine-tuning on Imagenette, plus zero-shot.

Freezes the backbone, runs the Imagenette train and val images through it once
(features cached under the cnn-internals cache), trains a new 10-way linear
head on the cached features (seconds on a CPU), and reports val top-1. For a
1000-way ImageNet model it also reports the zero-shot baseline: argmax over
the logits of the 10 Imagenette classes' ImageNet indices
(0, 217, 482, 491, 497, 566, 569, 571, 574, 701).

Writes ``OUT/<model>.safetensors`` (the whole model with the new head; for
``pretrained:mobilenet_v1_025_keras`` load it back with ``--weights``) and
``OUT/finetune.json`` (the numbers, image counts, settings, times).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from ._models import MODEL_HELP, load_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="head-only fine-tuning on Imagenette (cached features) and zero-shot top-1",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--weights", default=None, help="pretrained weights (a file, or 'pretrained' for torchvision:/timm:)")
    p.add_argument("--data", default=None, help="Imagenette root (default ../shared/data or $CNN_INTERNALS_DATA)")
    p.add_argument("--head-only", action="store_true", default=True,
                   help="train only a new 10-way head on frozen features (the CPU path; the default and only mode)")
    p.add_argument("--train-limit", type=int, default=None, help="use N train images spread over the classes (default all)")
    p.add_argument("--val-limit", type=int, default=None, help="use N val images spread over the classes (default all)")
    p.add_argument("--steps", type=int, default=300, help="full-batch Adam steps for the head (default 300)")
    p.add_argument("--lr", type=float, default=0.01, help="head learning rate (default 0.01)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="head weight decay (default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="head initialisation seed (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass when caching features")
    p.add_argument("--device", default="cpu", help="where to compute the features (default cpu)")
    p.add_argument("--cache", default=None, help="feature cache folder (default <cnn-internals cache>/features)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--out", default=None, help="output folder (default out/finetune/MODEL)")
    p.set_defaults(func=run)


def _atomic_bytes(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from adapters import finetune as ft

    t_start = time.perf_counter()
    model, preprocess, model_id = load_model(args.model, args.weights)
    if preprocess is None:
        raise ValueError(f"{args.model} has no preprocess of its own; finetune needs the model's input transform")
    train = ft.imagenette(args.data, "train", preprocess, args.train_limit)
    val = ft.imagenette(args.data, "val", preprocess, args.val_limit)
    out = Path(args.out or Path("out") / "finetune" / model_id)

    def feats(data, split):
        key = None if args.no_cache else ft._cache_key(model_id, args.weights, data)
        return ft.backbone_features(model, data, cache=args.cache, key=key, batch_size=args.batch_size,
                                    device=args.device, desc=f"{split} features")

    t0 = time.perf_counter()
    ftr, _, ytr = feats(train, "train")
    fva, lva, yva = feats(val, "val")
    t_features = time.perf_counter() - t0
    report: dict = {
        "format": "cnn-internals.finetune/1",
        "model": args.model, "weights": args.weights, "mode": "head-only",
        "train_images": len(train), "val_images": len(val), "feature_dim": int(ftr.shape[1]),
    }
    if lva.shape[1] == 1000:
        report["zero_shot_val_top1"] = ft.accuracy(ft.zero_shot(lva), yva)
        # Top-1 over all 1000 ImageNet classes (the 10 classes' indices counted as correct).
        classes = torch.tensor(ft.IMAGENET_CLASSES)
        report["imagenet_val_top1"] = ft.accuracy(lva.argmax(1), classes[yva])
    t0 = time.perf_counter()
    head = ft.train_head(ftr, ytr, 10, steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed)
    with torch.no_grad():
        report["head_only_train_top1"] = ft.accuracy(head(ftr).argmax(1), ytr)
        report["head_only_val_top1"] = ft.accuracy(head(fva).argmax(1), yva)
    t_head = time.perf_counter() - t0
    ft.replace_head(model, head)
    report.update(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                  seconds={"features": round(t_features, 1), "head": round(t_head, 2),
                           "total": round(time.perf_counter() - t_start, 1)})
    weights_path = out / f"{model_id}.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    _atomic_bytes(weights_path, lambda tmp: save_file(state, tmp))
    report["weights_file"] = weights_path.name
    _atomic_bytes(out / "finetune.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"))
    print(f"{args.model}: {len(train)} train / {len(val)} val images, features {ftr.shape[1]}-d "
          f"({t_features:.1f} s), head trained in {t_head:.1f} s")
    if "zero_shot_val_top1" in report:
        print(f"  zero-shot val top-1 (10 ImageNet classes): {report['zero_shot_val_top1']:.2%}")
        print(f"  ImageNet 1000-way val top-1:              {report['imagenet_val_top1']:.2%}")
    print(f"  head-only val top-1:                       {report['head_only_val_top1']:.2%}")
    print(f"wrote {weights_path} and {out / 'finetune.json'}")
    return 0

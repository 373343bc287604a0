"""``cnn-internals demo``: the original LeNet-5 figures, offline, in well under a minute.

Uses the shipped LeNet-5 MNIST weights and the shipped sample of the first
1,000 MNIST test images; mines the top-9 images of the first 6 channels of
conv1, conv2 and conv3, and writes seed-style panels for deconvnet and guided
backprop, ``topk.json`` and an ``index.html`` gallery.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .visualize import add_common, report, report_notes

LAYERS = ("conv1", "conv2", "conv3")
METHODS = ("deconvnet", "guided")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="LeNet-5 on MNIST: panels + gallery, offline, < 1 minute",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="cnn-internals-demo", help="output folder (default ./cnn-internals-demo)")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N images of the shipped sample (default: all 1,000)")
    p.add_argument("--weights", default=None,
                   help="LeNet-5 checkpoint (default: the shipped weights; 'random' for untrained)")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import adapters
    from adapters.data import mnist_sample

    from interp.data import ArrayImages
    from interp.visualize import visualize

    t0 = time.perf_counter()
    model, preprocess = adapters.load("lenet5", weights=args.weights)
    sample = mnist_sample()
    images = sample.data.numpy()
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {args.limit}")
        images = images[: args.limit]
    data = ArrayImages(images, preprocess, mode="L", name="mnist-test")
    result = visualize(model, data, Path(args.out), list(LAYERS), channels=range(6), k=9, methods=METHODS,
                       model_id="lenet5", batch_size=max(args.batch_size, 1), device=args.device)
    report_notes(result)
    report(result)
    print(f"demo finished in {time.perf_counter() - t0:.1f} s on {len(data)} MNIST test images")
    return 0

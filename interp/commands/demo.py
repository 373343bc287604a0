"""cnn-internals demo: what two real networks see, offline, in about half a minute.

1. LeNet-5 with its shipped MNIST weights on the shipped 1,000 MNIST test
   digits: the top-9 images of the first 6 channels of conv1, conv2 and conv3,
   projected with deconvnet and guided backprop (OUT/lenet5/).
2. The TF-slim MobileNet v1 1.0 trained on ImageNet (its uint8 TFLite weights
   ship in the package, Apache-2.0) on 86 natural photos that ship too: five
   conv layers from edges to object parts, guided backprop, the first 6 live
   channels of each layer (OUT/mobilenet_v1/).

Each part writes seed-style panels, topk.json and an index.html gallery.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import adapters
from adapters.datasets import NATURAL_IMAGES, mnist_sample

from interp.api import mine, visualize
from interp.data import ArrayImages, open_images
from interp.layers import resolve_layer

from .visualize import add_common, report, report_notes

LENET_LAYERS = ("conv1", "conv2", "conv3")
LENET_METHODS = ("deconvnet", "guided")
# Fields of 11, 27, 59, 123 and 251 px: edges, textures, patterns, parts.
MOBILENET_LAYERS = ("conv2", "conv4", "conv8", "conv12", "conv20")
MOBILENET = "pretrained:mobilenet_v1_100_tflite"
PARTS = ("lenet5", "mobilenet")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="LeNet-5 on MNIST and an ImageNet MobileNet on photos, offline, < 1 minute",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="cnn-internals-demo", help="output folder (default ./cnn-internals-demo)")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N images of each shipped sample (default: all)")
    p.add_argument("--weights", default=None,
                   help="LeNet-5 checkpoint (default: the shipped weights; 'random' for untrained)")
    p.add_argument("--only", choices=PARTS, default=None, help="run one part only (default both)")
    add_common(p)
    p.set_defaults(func=run)


def _limited(n: int, limit: int | None) -> int:
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    return n if limit is None else min(n, limit)


def run_lenet5(args: argparse.Namespace, out: Path):
    """LeNet-5 on the shipped MNIST digits; returns the :class:`~interp.draw.visualize.VisualizeResult`."""
    model, preprocess = adapters.load("lenet5", weights=args.weights)
    images = mnist_sample().data.numpy()
    images = images[: _limited(len(images), args.limit)]
    data = ArrayImages(images, preprocess, mode="L", name="mnist-test")
    return visualize(model, data, out, list(LENET_LAYERS), channels=range(6), k=9, methods=LENET_METHODS,
                     model_id="lenet5", weights_info=adapters.weights_source("lenet5", args.weights), batch_size=max(args.batch_size, 1), device=args.device, progress=False)


def live_channels(model, data, layers, n: int = 6, batch_size: int = 64, device=None) -> dict[str, list[int]]:
    """The first ``n`` channels of each layer whose largest activation over ``data`` is above zero.

    The TF-slim MobileNet has channels whose quantized weights are all zero:
    a panel of them would be nine grey tiles that teach nothing.
    """
    every = {layer: range(resolve_layer(model, layer).module.out_channels) for layer in layers}
    top = mine(model, data, list(layers), channels=every, k=1, batch_size=batch_size, device=device,
               progress=False, receptive_fields=False)
    chosen = {}
    for layer in layers:
        alive = [c for c in top.channels(layer) if top[layer, c][0].value > 0]
        chosen[layer] = alive[:n] or top.channels(layer)[:n]
    return chosen


def run_mobilenet(args: argparse.Namespace, out: Path):
    """The ImageNet MobileNet v1 on the shipped natural photos, guided backprop."""
    model, preprocess = adapters.load(MOBILENET)
    data = open_images(NATURAL_IMAGES, preprocess)
    if args.limit is not None:
        data = data.subset(range(_limited(len(data), args.limit)))
    channels = live_channels(model, data, MOBILENET_LAYERS, batch_size=max(args.batch_size, 1), device=args.device)
    return visualize(model, data, out, list(MOBILENET_LAYERS), channels=channels, k=9, methods=("guided",),
                     model_id="mobilenet_v1_imagenet", weights_info=adapters.weights_source(MOBILENET), batch_size=max(args.batch_size, 1), device=args.device,
                     progress=False)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = Path(args.out)
    parts = [args.only] if args.only else list(PARTS)
    for part in parts:
        result = (run_lenet5 if part == "lenet5" else run_mobilenet)(args, out / part)
        report_notes(result)
        report(result)
    print(f"demo finished in {time.perf_counter() - t0:.1f} s; open {out / parts[-1] / 'index.html'}")
    return 0

"""``cnn-internals compare A B --data ROOT --layers conv2,conv5``: two models side by side.

Mines both models on the same images (each with its own preprocessing), writes
side-by-side panels per layer (A left, B right; the same channel indices on
both sides, not matched channels), a layer-by-layer linear CKA heatmap
``DIR/cka.png`` (over the panel layers, or over ``--cka-layers``, e.g.
``all-conv``: CKA costs one forward pass, panels cost mining and projection),
``DIR/compare.json`` with the numbers, and each model's own gallery under
``DIR/a-<A>/`` and ``DIR/b-<B>/``. ``--offline`` forbids weight downloads.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from interp.draw.compare import compare

from ._data import open_images
from ._models import MODEL_HELP, add_offline_flag, announce_weights, load_model_info
from .visualize import input_mode, parse_channels, report_notes


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="two models on the same images: side-by-side panels and a CKA heatmap",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_a", metavar="A", help=MODEL_HELP)
    p.add_argument("model_b", metavar="B", help="the second model, same forms as A")
    p.add_argument("--data", required=True, help="image folder, Imagenette root (train/ val/) or MNIST root")
    p.add_argument("--weights-a", default=None,
                   help="weights for A: a checkpoint, or 'pretrained' for torchvision:/timm: models")
    p.add_argument("--weights-b", default=None, help="weights for B (as --weights-a)")
    p.add_argument("--layers", default="conv2,conv5",
                   help="layers of A (names, convN, comma-separated, or all-conv, all-blocks, children:NAME; "
                        "default conv2,conv5)")
    p.add_argument("--layers-b", default=None, help="layers of B if they differ (default: the same names as A)")
    p.add_argument("--cka-layers", default=None,
                   help="layers of A for the CKA heatmap, e.g. all-conv (default: the panel layers, --layers)")
    p.add_argument("--cka-layers-b", default=None,
                   help="layers of B for the CKA heatmap (default: --cka-layers names if given, else B's panel layers)")
    p.add_argument("--method", default="guided", help="guided, deconvnet or gradient; several comma-separated")
    p.add_argument("--channels", default=None, help="channels per layer, e.g. 0-5 (default: the first 6)")
    p.add_argument("--top", type=int, default=9, help="images per channel (default 9)")
    p.add_argument("--split", default=None, help="split of an Imagenette/MNIST root (default val / test)")
    p.add_argument("--limit", type=int, default=None, help="use N images spread evenly over the dataset")
    p.add_argument("--grid", type=int, default=4,
                   help="CKA: average-pool each map to at most GRID x GRID before comparing (0 = full maps; default 4)")
    p.add_argument("--out", default="cnn-internals-compare", help="output folder (default ./cnn-internals-compare)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", default=None, help="cpu or cuda (default cpu)")
    p.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images with a warning")
    add_offline_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    if args.grid < 0:
        raise ValueError(f"--grid must be 0 (full maps) or positive, got {args.grid}")
    loaded = [load_model_info(spec, weights)
              for spec, weights in ((args.model_a, args.weights_a), (args.model_b, args.weights_b))]
    for spec, one in zip((args.model_a, args.model_b), loaded):
        announce_weights(spec, one)  # a random model compared with a trained one says little
    (model_a, prep_a, id_a), (model_b, prep_b, id_b) = ((m.model, m.preprocess, m.model_id) for m in loaded)
    if id_a == id_b:
        id_a, id_b = id_a + "-A", id_b + "-B"  # one model against itself: keep the two galleries apart
    data_a = open_images(args.data, prep_a, split=args.split, mode=input_mode(model_a),
                         skip_corrupt=args.skip_corrupt, limit=args.limit)
    data_b = open_images(args.data, prep_b, split=args.split, mode=input_mode(model_b),
                         skip_corrupt=args.skip_corrupt, limit=args.limit)
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    result = compare(model_a, data_a, model_b, data_b, Path(args.out), args.layers, args.layers_b,
                     id_a=id_a, id_b=id_b, methods=methods, channels=parse_channels(args.channels), k=args.top,
                     grid=args.grid, batch_size=args.batch_size, device=args.device,
                     cka_layers_a=args.cka_layers, cka_layers_b=args.cka_layers_b)
    report_notes(result)
    print(f"wrote {len(result.panels)} side-by-side panel(s) to {result.out_dir}/")
    for p in result.panels.values():
        print(f"  {p}")
    print(f"CKA heatmap: {result.heatmap_path}")
    print(f"numbers:     {result.json_path}")
    width = max(len(n) for n in result.cka_layers_a)
    col = max([8] + [len(n) for n in result.cka_layers_b])
    print(f"linear CKA over {result.n_images} images (rows A = {id_a}, columns B = {id_b}):")
    print(" " * (width + 2) + "  ".join(f"{n:>{col}}" for n in result.cka_layers_b))
    for name, row in zip(result.cka_layers_a, result.cka.tolist()):
        print(f"{name:>{width}}  " + "  ".join(f"{v:{col}.3f}" for v in row))
    t = result.timings
    print(f"time: visualize {t['visualize']:.1f} s, CKA {t['cka']:.1f} s, drawing {t['drawing']:.1f} s, total {t['total']:.1f} s")
    return 0

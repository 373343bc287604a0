"""``cnn-internals layers MODEL``: list the layer names a model offers."""
from __future__ import annotations

import argparse
import json

from interp.layers import block_layers

from ._models import MODEL_HELP, add_offline_flag, load_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layers", help="list the addressable layers of a model", description=__doc__)
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--weights", help="checkpoint to load (.pt/.pth/.safetensors)")
    p.add_argument("--conv", action="store_true", help="only Conv2d layers, in forward order (all-conv)")
    p.add_argument("--blocks", action="store_true",
                   help="only the blocks (what --layers all-blocks picks: residual blocks, Fire/Inception modules, "
                        "MBConv...), in forward order")
    p.add_argument("--list", action="store_true", help="list the built-in model names instead")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_offline_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import interp

    if args.list or args.model is None:
        import adapters

        names = adapters.names()
        print(json.dumps(names) if args.json else "\n".join(names))
        return 0
    model, _, _ = load_model(args.model, args.weights)
    if args.conv and args.blocks:
        raise ValueError("pass --conv or --blocks, not both")
    if args.blocks:
        names = block_layers(model)
    else:
        names = interp.conv_layers(model) if args.conv else interp.layers(model)
    if args.json:
        print(json.dumps(names))
    else:
        aliases = getattr(model, "layer_aliases", None) or {}
        for name in names:
            print(name)
        for alias, target in aliases.items():
            print(f"{alias} -> {target}")
    return 0

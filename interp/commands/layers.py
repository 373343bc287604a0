"""``cnn-internals layers MODEL``: the layers a model offers, as a table.

One row per layer, in forward order: its name (what --layers accepts), its
type (module class or traced op), its output shape from one forward pass of
a zero image of --input-size (batch dimension left out), and its aliases:
``convN`` for the N-th convolution and any name the adapter defines.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

import adapters
import interp
from interp.capture import LayerTaps
from interp.layers import block_layers, layer_kind

from ._models import MODEL_HELP, add_offline_flag, load_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layers", help="list the addressable layers of a model (name, type, output shape, alias)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--weights", help="checkpoint to load (.pt/.pth/.safetensors)")
    p.add_argument("--conv", action="store_true", help="only Conv2d layers, in forward order (all-conv)")
    p.add_argument("--blocks", action="store_true",
                   help="only the blocks (what --layers all-blocks picks: residual blocks, Fire/Inception modules, "
                        "MBConv...), in forward order")
    p.add_argument("--input-size", type=int, default=None, metavar="N",
                   help="size of the probe image that gives the output shapes (default: the model's own, else 224)")
    p.add_argument("--list", action="store_true", help="list the built-in model names instead")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of the layer names (with --details: one object per row of the table)")
    p.add_argument("--details", action="store_true", help="with --json: name, type, output shape and aliases")
    add_offline_flag(p)
    p.set_defaults(func=run)


def _probe_size(model: nn.Module, size: int | None) -> tuple[int, int]:
    if size is not None:
        if size < 1:
            raise ValueError(f"--input-size must be at least 1 pixel, got {size}")
        return (size, size)
    own = getattr(model, "input_size", None)  # an adapter's native size (LeNet-5: 32x32)
    return tuple(own) if own else (224, 224)


def _in_channels(model: nn.Module) -> int:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


def output_shapes(model: nn.Module, names: list[str], size: tuple[int, int]) -> tuple[dict[str, list], str | None]:
    """``({layer: output shape without the batch dim}, None)`` in forward order, from one zero-image pass.

    The order is the order the outputs were computed in; a layer whose
    output is not a tensor gets ``[]``. When the forward fails (an input
    size the head does not accept), returns what it reached and the error's
    first line instead of ``None``; layers it did not reach are left out.
    """
    shapes: dict[str, list] = {}

    def sink(name: str, output) -> None:
        shapes[name] = list(output.shape[1:]) if isinstance(output, torch.Tensor) else []

    x = torch.zeros(1, _in_channels(model), *size)
    was_training = model.training
    model.eval()  # the probe must not update BatchNorm statistics
    try:
        with torch.no_grad(), LayerTaps(model, names).attached(sink) as run_once:
            run_once(x)
        problem = None
    except Exception as exc:  # noqa: BLE001 - a probe: report and show what it reached
        if len(shapes) and "did not run in the forward pass" in str(exc):
            return shapes, None  # modules the forward never calls (an unused head): no shape, no problem
        lines = str(exc).strip().splitlines()
        problem = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    finally:
        model.train(was_training)
    return shapes, problem


def aliases_of(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """``{layer: [alias, ...]}``: ``convN`` where it names that layer, and the adapter's ``layer_aliases``."""
    out: dict[str, list[str]] = {}
    for n, name in enumerate(interp.conv_layers(model), 1):
        # A module really called "convN" wins over the numbering (interp.layers' rule).
        if interp.resolve_layer(model, f"conv{n}").name == name and name != f"conv{n}":
            out.setdefault(name, []).append(f"conv{n}")
    for alias, target in (getattr(model, "layer_aliases", None) or {}).items():
        if target in names and alias not in out.get(target, []):
            out.setdefault(target, []).append(alias)
    return out


def layer_rows(model: nn.Module, names: list[str], size: tuple[int, int]) -> tuple[list[dict], str | None]:
    """One dict per layer (name, type, output shape, aliases) in forward order, and the probe's problem."""
    shapes, problem = output_shapes(model, names, size)
    aliases = aliases_of(model, names)
    # Forward order where the probe saw the layer; the rest after, in the order asked.
    ordered = [n for n in shapes if n in names] + [n for n in names if n not in shapes]
    rows = [{"name": n, "type": layer_kind(model, n), "output_shape": shapes.get(n),
             "aliases": aliases.get(n, [])} for n in ordered]
    return rows, problem


def print_table(rows: list[dict], stream=None) -> None:
    """The rows as aligned columns: name, type, output shape, alias."""
    out = stream or sys.stdout
    shape = [("x".join(map(str, r["output_shape"])) if r["output_shape"] else "-") for r in rows]
    w_name = max([len("layer")] + [len(r["name"]) for r in rows])
    w_type = max([len("type")] + [len(r["type"]) for r in rows])
    w_shape = max([len("output")] + [len(s) for s in shape])
    print(f"{'layer':<{w_name}}  {'type':<{w_type}}  {'output':<{w_shape}}  alias", file=out)
    for r, s in zip(rows, shape):
        print(f"{r['name']:<{w_name}}  {r['type']:<{w_type}}  {s:<{w_shape}}  {', '.join(r['aliases'])}".rstrip(),
              file=out)


def run(args: argparse.Namespace) -> int:
    if args.list or args.model is None:
        names = adapters.names()
        print(json.dumps(names) if args.json else "\n".join(names))
        return 0
    if args.conv and args.blocks:
        raise ValueError("pass --conv or --blocks, not both")
    if args.input_size is not None and args.input_size < 1:
        raise ValueError(f"--input-size must be at least 1 pixel, got {args.input_size}")
    model, _, _ = load_model(args.model, args.weights)
    if args.blocks:
        names = block_layers(model)
    else:
        names = interp.conv_layers(model) if args.conv else interp.layers(model)
    if args.json and not args.details:
        print(json.dumps(names))  # the plain list scripts rely on
        return 0
    size = _probe_size(model, args.input_size)
    rows, problem = layer_rows(model, names, size)
    if problem:
        print(f"note: the probe forward at {size[0]}x{size[1]} stopped ({problem}); shapes missing after it "
              "(try --input-size)", file=sys.stderr)
    if args.json:
        print(json.dumps({"input_size": list(size), "layers": rows}, indent=1))
    else:
        print_table(rows)
    return 0

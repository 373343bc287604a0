"""``cnn-internals rf MODEL``: receptive field (size, stride, offset) of every layer."""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from interp.notices import EngineWarning
from interp.rf import receptive_fields

from ._models import MODEL_HELP, add_offline_flag, load_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rf", help="receptive fields of every layer", description=__doc__)
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--weights", help="checkpoint to load")
    p.add_argument("--input-size", type=input_size_value, nargs="+", default=None, metavar="N",
                   help="input size H [W] (default 224, or the adapter's own size)")
    p.add_argument("--layers", help="comma-separated layer names (default: all with a feature map)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_offline_flag(p)
    p.set_defaults(func=run)


def input_size_value(text: str) -> int:
    """``--input-size`` values: whole numbers of pixels, at least 1 (argparse reports anything else)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of pixels") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a size in pixels (must be at least 1)")
    return value


def check_input_size(values: list[int] | None) -> None:
    """One or two sizes (H [W]), each at least 1 pixel: checked before the model is loaded."""
    if values is None:
        return
    if len(values) > 2:
        raise ValueError(f"--input-size takes H or H W, got {len(values)} numbers")
    if min(values) < 1:  # (input_size_value already refuses these; kept for callers building args)
        raise ValueError(f"--input-size must be at least 1 pixel, got {' '.join(map(str, values))}")


def run(args: argparse.Namespace) -> int:
    check_input_size(args.input_size)
    model, _, _ = load_model(args.model, args.weights)
    if args.input_size:
        size = tuple(args.input_size) if len(args.input_size) == 2 else (args.input_size[0],) * 2
    else:
        size = tuple(getattr(model, "input_size", (224, 224)))
    wanted = [s.strip() for s in args.layers.split(",")] if args.layers else None
    with warnings.catch_warnings():
        # Each field carries its notes; they are printed once below, not as Python warnings per layer.
        warnings.simplefilter("ignore", EngineWarning)
        rfs = receptive_fields(model, size, wanted)
    if args.json:
        print(json.dumps({"input_size": list(size), "layers": [r.to_dict() for r in rfs.values()]}, indent=1))
        return 0
    width = max((len(n) for n in rfs), default=5)
    print(f"{'layer':<{width}}  {'size':>9}  {'stride':>7}  {'offset':>10}  {'output':>9}")
    for name, r in rfs.items():
        size_s = "global" if r.is_global else f"{r.size[0]}x{r.size[1]}"
        out = f"{r.output_size[0]}x{r.output_size[1]}" if r.output_size else "-"
        print(f"{name:<{width}}  {size_s:>9}  {r.stride[0]:>3},{r.stride[1]:<3}  "
              f"{r.offset[0]:>4},{r.offset[1]:<5}  {out:>9}")
    # Notes go to stderr: stdout stays the table alone (safe to pipe or parse).
    notes = sorted({n for r in rfs.values() for n in r.notes})
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0

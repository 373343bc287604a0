"""``cnn-internals gallery DIR``: (re)write the static HTML gallery of a visualize folder.

The page works from ``file://`` (no server): it lists every layer and, per
channel, the top-k tiles; hovering or clicking a tile draws the unit's
receptive-field box on the full input image.
"""
from __future__ import annotations

import argparse

from interp.draw.gallery import load_manifest, write_gallery


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gallery", help="write DIR/index.html for a visualize output folder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="folder written by `cnn-internals visualize` (holds gallery.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = write_gallery(args.dir)
    manifest = load_manifest(args.dir)
    n = sum(len(ch["tiles"]) for layer in manifest["layers"] for ch in layer["channels"])
    print(f"gallery: {path} ({len(manifest['layers'])} layer(s), {n} tiles; open it in a browser)")
    return 0

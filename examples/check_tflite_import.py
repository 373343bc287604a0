"""Check ``pretrained:mobilenet_v1_100_tflite`` against the original uint8 TFLite model, run by its own runtime.

Needs the ``tflite`` extra (``pip install -e .[tflite]``: ``tflite`` and ``ai-edge-litert``).
Both sides get the same uint8 224x224 image (the twin's preprocess before its
``(x - 128) / 128``); the TFLite backbone's uint8 embedding is fed to the head
file unchanged, as MANIFEST.md describes.

Reports on the first ``--per-class`` Imagenette val images of each class:
top-1 agreement (1001-way), ImageNet top-1 of both (class = index - 1, against the
1000 classes, not restricted to the 10), and agreement when both are restricted
to the 10 Imagenette classes. ``--fixture PATH`` also writes the runtime's
predictions on the first 2 images per class (the CPU test's fixture).

    python examples/check_tflite_import.py --per-class 40
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from adapters import pretrained


def imagenette_val(root: Path, per_class: int) -> list[tuple[Path, int]]:
    """First ``per_class`` files of each class folder, sorted (the test helpers' order)."""
    wnids = sorted(p.name for p in root.iterdir())
    return [(f, c) for c, w in enumerate(wnids) for f in sorted((root / w).iterdir())[:per_class]]


class TFLiteRuntime:
    """The two TFLite files chained with ai-edge-litert: uint8 ``H x W x 3`` -> uint8 ``[1001]`` and its dequantized logits."""

    def __init__(self) -> None:
        from ai_edge_litert.interpreter import Interpreter

        wdir = pretrained.weights_dir()
        self.parts = []
        for rel in pretrained.TFLITE_MOBILENET_V1_FILES:
            it = Interpreter(model_path=str(wdir / rel), experimental_preserve_all_tensors=True)
            it.allocate_tensors()
            self.parts.append(it)
        # the head's input, before its softmax: the logits tensor (uint8, scale ~0.166)
        head = self.parts[1]
        self.logits_index = next(d["index"] for d in head.get_tensor_details() if d["name"].endswith("SpatialSqueeze1"))

    def __call__(self, u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 softmax ``[1001]``, dequantized uint8 logits ``[1001]``) for one uint8 ``224 x 224 x 3`` image."""
        a, b = self.parts
        a.set_tensor(a.get_input_details()[0]["index"], u8[None])
        a.invoke()
        emb = a.get_tensor(a.get_output_details()[0]["index"])
        b.set_tensor(b.get_input_details()[0]["index"], emb)
        b.invoke()
        probs = b.get_tensor(b.get_output_details()[0]["index"])[0]
        d = next(d for d in b.get_tensor_details() if d["index"] == self.logits_index)
        scale, zp = d["quantization"]
        logits = (b.get_tensor(self.logits_index)[0].astype(np.float32) - zp) * scale
        return probs, logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = Path(os.environ.get("CNN_INTERNALS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--data", type=Path, default=data / "imagenette2-160" / "val")
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--fixture", type=Path, default=None)
    args = ap.parse_args()

    t0 = time.time()
    model, preprocess = pretrained.load_mobilenet_v1_100_tflite()
    to_u8 = type(preprocess)(preprocess.transforms[:3])  # ToImage, Resize, CenterCrop: uint8 3x224x224
    normalize = type(preprocess)(preprocess.transforms[3:])
    runtime = TFLiteRuntime()
    items = imagenette_val(args.data, args.per_class)
    classes = list(pretrained.IMAGENETTE_IMAGENET_CLASSES)
    twin_top, rt_top, rt_lt, y, twin10, rt10, fixture, gaps = [], [], [], [], [], [], [], []
    for k, (f, c) in enumerate(items):
        u8 = to_u8(Image.open(f).convert("RGB"))
        probs, rt_logits = runtime(u8.permute(1, 2, 0).contiguous().numpy())
        with torch.no_grad():
            logits = model(normalize(u8)[None])[0]
        rt = int(np.argmax(probs))  # the file's own output; ties in the uint8 softmax: first index
        twin_top.append(int(logits.argmax()))
        if int(logits.argmax()) != rt:  # the runtime's own margin there, in uint8 logit steps
            step = float(np.min(np.diff(np.unique(rt_logits))))
            gaps.append(round(float(rt_logits.max() - rt_logits[int(logits.argmax())]) / step))
        rt_lt.append(int(np.argmax(rt_logits)))
        rt_top.append(rt)
        y.append(c)
        twin10.append(int(logits[[i + 1 for i in classes]].argmax()))
        rt10.append(int(np.argmax(rt_logits[[i + 1 for i in classes]])))
        if k % args.per_class < 2:
            fixture.append({"file": f"{f.parent.name}/{f.name}", "label": c, "tflite_top1": rt,
                            "tflite_top5": [int(i) for i in np.argsort(-rt_logits, kind="stable")[:5]],
                            "tflite_logit_max": round(float(rt_logits.max()), 4)})
    twin_top, rt_top, y = np.array(twin_top), np.array(rt_top), np.array(y)
    target = np.array([classes[c] + 1 for c in y])
    n = len(items)
    ptime = time.time() - t0
    print(f"images: {n} ({args.per_class} per class), {ptime:.0f} s")
    print(f"top-1 agreement twin vs TFLite runtime (1001-way): {(twin_top == rt_top).sum()}/{n} = {(twin_top == rt_top).mean():.1%}")
    print(f"  where they differ, the twin's class is this many uint8 logit steps below the runtime's maximum: {sorted(gaps)}")
    print(f"  runtime softmax top-1 == runtime logits top-1: {np.mean(rt_top == np.array(rt_lt)):.1%}")
    print(f"agreement restricted to the 10 Imagenette classes: {(np.array(twin10) == np.array(rt10)).mean():.1%}")
    print(f"ImageNet top-1 on these images: twin {(twin_top == target).sum()}/{n} = {(twin_top == target).mean():.1%}, "
          f"TFLite {(rt_top == target).sum()}/{n} = {(rt_top == target).mean():.1%}")
    print(f"zero-shot 10-way (argmax over the 10 Imagenette classes): twin {(np.array(twin10) == y).mean():.1%}, "
          f"TFLite {(np.array(rt10) == y).mean():.1%}")
    if args.fixture:
        args.fixture.write_text(json.dumps({"source": "ai-edge-litert runtime, both TFLite parts chained; "
                                            "input: tflite_preprocess() up to the uint8 224x224 image",
                                            "images": fixture}, indent=1) + "\n")
        print(f"wrote {args.fixture} ({len(fixture)} images)")


if __name__ == "__main__":
    main()

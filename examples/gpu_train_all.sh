#!/usr/bin/env bash
# Train the five Imagenette models, fully fine-tune the pretrained MobileNet v1
# twins, draw the original's panels and the scratch-vs-pretrained comparisons,
# on one GPU machine -- and pack the results small enough to bring back.
#
#   examples/gpu_train_all.sh pack DATA DEST [MiB]   # DATA's Imagenette + twin weights as pieces of <= MiB (55)
#   examples/gpu_train_all.sh stage PIECE.tgz DATA   # unpack one data piece into DATA (repeatable)
#   examples/gpu_train_all.sh run DATA OUT [DEADLINE_S [REPRODUCE ARGS...]]
#   examples/gpu_train_all.sh bundle OUT DEST        # <= 8 files, each < 16 MB, into DEST
#
# `run` is `cnn-internals reproduce --device cuda` (resumable: run it again to
# finish what a deadline cut). DEADLINE_S stops the training step after that
# many seconds, so the panels of what exists still get drawn. Further arguments
# go to `reproduce` as they are, e.g. the labelled "tuned" run:
#   run DATA OUT 300 --models vgg16,inception,mobilenet,resnet18 --image-size 160 \
#       --crop-scale 0.35 --batch-size 64 --stages train,report
#
# Data that cannot travel in one piece (a machine reached over a size-limited
# transfer): `pack` writes DEST/piece0.tgz, piece1.tgz, ... (val and the twins'
# weight files in the first, then the training images), and `stage` unpacks each
# piece into the same DATA folder as it arrives.
set -euo pipefail

cmd=${1:?usage: $0 pack|stage|run|bundle ...}
shift
py=${PYTHON:-python3}

case "$cmd" in
pack)
    data=${1:?pack DATA DEST [MiB]}
    dest=${2:?pack DATA DEST [MiB]}
    mib=${3:-55}
    mkdir -p "$dest"
    "$py" - "$data" "$dest" "$mib" <<'EOF'
import gzip, sys, tarfile
from pathlib import Path

data, dest, limit = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]) * 2**20
weights = ["weights/tflite/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite",
           "weights/tflite/mobilenet_quant_v1_224_head_layers.tflite",
           "weights/keras/mobilenet_2_5_224_tf_no_top.h5", "weights/tflite/imagenet_labels.txt"]
files = [w for w in weights if (data / w).is_file()]
for split in ("val", "train"):  # val first: the first piece alone serves the benchmarks
    files += sorted(str(p.relative_to(data)) for p in (data / "imagenette2-160" / split).rglob("*") if p.is_file())
# Pieces are cut by their real compressed size: a new one starts when this one is 1 MiB short of
# the limit (gzip's buffer is far smaller than that).
piece, raw, gz, tar = -1, None, None, None


def close():
    if tar is not None:
        tar.close(); gz.close(); raw.close()
        print(f"{raw.name}: {count} files, {Path(raw.name).stat().st_size / 2**20:.1f} MiB")


count = 0
for f in files:
    if tar is None or raw.tell() > limit - 2**20:
        close()
        piece, count = piece + 1, 0
        raw = open(dest / f"piece{piece}.tgz", "wb")
        gz = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1)
        tar = tarfile.open(fileobj=gz, mode="w")
    tar.add(data / f, arcname=f)
    count += 1
close()
EOF
    ;;
stage)
    piece=${1:?stage PIECE.tgz DATA}
    data=${2:?stage PIECE.tgz DATA}
    mkdir -p "$data"
    tar -xzf "$piece" -C "$data"
    echo "staged $piece: $(find "$data/imagenette2-160" -name '*.JPEG' 2>/dev/null | wc -l) images in $data"
    ;;
run)
    data=${1:?run DATA OUT [DEADLINE_S]}
    out=${2:?run DATA OUT [DEADLINE_S]}
    deadline=${3:-}
    shift $(($# < 3 ? $# : 3))
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$py" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
    "$py" -m interp.cli reproduce --data "$data" --out "$out" --device cuda --workers "$(nproc)" \
        ${deadline:+--deadline "$deadline"} "$@"
    ;;
bundle)
    out=${1:?bundle OUT DEST}
    dest=${2:?bundle OUT DEST}
    mkdir -p "$dest"
    "$py" - "$out" "$dest" <<'EOF'
"""Pack OUT for the trip back: numbers and logs, web-sized images, small fp16 checkpoints."""
import io, json, sys, tarfile
from pathlib import Path

out, dest = Path(sys.argv[1]), Path(sys.argv[2])
LIMIT = 15 * 2**20


def add_bytes(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# 1. numbers and logs
with tarfile.open(dest / "results.tgz", "w:gz") as tar:
    for pattern in ("results.*", "logs/*.log", "train/*/*.json", "finetune/*/*.json",
                    "panels/*/gallery.json", "panels/*/topk.json", "compare/*/compare.json", "compare/*/cka*.png"):
        for f in sorted(out.glob(pattern)):
            if f.stat().st_size < LIMIT:
                tar.add(f, arcname=str(f.relative_to(out)))
# 2. images: the panels' webp copies; the comparison panels re-encoded as webp
from PIL import Image

with tarfile.open(dest / "images.tar", "w") as tar:
    for f in sorted(out.glob("panels/*/*.webp")):
        tar.add(f, arcname=str(f.relative_to(out)))
    for f in sorted(out.glob("compare/*/compare_*.png")):
        buf = io.BytesIO()
        Image.open(f).convert("RGB").save(buf, "WEBP", quality=80, method=4)
        add_bytes(tar, str(f.relative_to(out).with_suffix(".webp")), buf.getvalue())
# 3. checkpoints that fit, in fp16 (safetensors)
import torch
from safetensors.torch import load_file, save_file

for f in sorted(list(out.glob("train/*/*.safetensors")) + list(out.glob("finetune/*/*.safetensors"))):
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(f).items()}
    n = sum(v.numel() * v.element_size() for v in state.values())
    if n < LIMIT:
        save_file(state, str(dest / f"{f.parent.name}.fp16.safetensors"))
for f in sorted(dest.iterdir()):
    print(f"{f.name}: {f.stat().st_size / 2**20:.1f} MiB")
EOF
    ;;
*)
    echo "unknown command $cmd; use pack, stage, run or bundle" >&2
    exit 2
    ;;
esac

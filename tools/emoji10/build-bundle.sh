#!/usr/bin/env bash
# Builds benches/models/emoji10-cnn from the ONNX export of tools/emoji10/train_model.py, the way
# a user brings their own classifier: import-onnx without --split (the tail is chosen
# automatically), then source reference samples.
# Usage: tools/emoji10/build-bundle.sh [MODEL.onnx]   (run from the repository root after
# tools/setup.sh; EDGEADAPT names the edgeadapt binary, default: build target/release/edgeadapt)
set -euo pipefail
model="${1:-target/emoji10-model/emoji10_cnn.onnx}"
out=benches/models/emoji10-cnn
if [ -z "${EDGEADAPT:-}" ]; then
    cargo build --release --locked --quiet
    EDGEADAPT=target/release/edgeadapt
fi
mkdir -p "$(dirname "$out")"
"$EDGEADAPT" import-onnx "$model" \
    --features features \
    --classes tools/emoji10/classes.txt \
    --color rgb --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5 \
    --name emoji10-cnn \
    --source "Small CNN (4 conv3x3 blocks, conv1x1 tail, linear head) trained from scratch on emoji10 source/train by tools/emoji10/train_model.py" \
    --licence "model weights Apache-2.0; reference samples (emoji10 source/test renders) CC BY-SA 4.0" \
    --force \
    --out "$out"
"$EDGEADAPT" add-reference --bundle "$out" --data target/data/emoji10/source/test --per-class 8

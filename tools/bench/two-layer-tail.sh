#!/usr/bin/env bash
# The default model imported again with its split one layer earlier, so that its tail has two
# weighted layers (the last block's 1152 -> 320 projection, then 320 -> 1280): the second bundle
# of the inference benchmark (docs/performance.md).
# Usage: tools/bench/two-layer-tail.sh [OUT_DIR]   (from the repository root; default
# target/two-layer-tail), then
#   EDGEADAPT_BENCH_BUNDLE=OUT_DIR/bundle cargo bench --bench inference
set -euo pipefail
out="${1:-target/two-layer-tail}"
mkdir -p "$out"
cargo build --release --locked --bin edgeadapt
bin=target/release/edgeadapt
"$bin" export-onnx --bundle models/efficientnet-lite0-fonts36 --out "$out/full.onnx" --force
# The export names the tail's layers edgeadapt_tail_<i>; the last one's output is the features.
"$bin" import-onnx "$out/full.onnx" \
    --split /_blocks.15/_swish_1/Clip_output_0 --features edgeadapt_tail_3_out \
    --classes tools/model/fonts36.classes.txt --color grayscale \
    --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 \
    --name efficientnet-lite0-two-layer-tail --out "$out/bundle" --force

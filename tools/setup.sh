#!/usr/bin/env bash
# Shared set-up for tools/demo.sh and tools/test.sh: the pinned ONNX Runtime library and the
# benchmark data. Idempotent and quick when everything is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 tools/fetch-onnxruntime.py --quiet

data=target/data
if [ ! -f "$data/fonts36/.extracted-$(sha256sum benches/data/fonts36.tar.gz | cut -c1-16)" ]; then
    rm -rf "$data/fonts36"
    mkdir -p "$data"
    tar -xzf benches/data/fonts36.tar.gz -C "$data"
    touch "$data/fonts36/.extracted-$(sha256sum benches/data/fonts36.tar.gz | cut -c1-16)"
fi

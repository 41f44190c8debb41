#!/usr/bin/env bash
# Shared set-up for tools/demo.sh and tools/test.sh: the pinned ONNX Runtime library and the
# benchmark data. Idempotent and quick when everything is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 tools/fetch-onnxruntime.py --quiet

data=target/data
mkdir -p "$data"
for archive in benches/data/*.tar.gz; do
    name=$(basename "$archive" .tar.gz)
    stamp="$data/$name/.extracted-$(sha256sum "$archive" | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        echo "Unpacking $archive into $data/$name" >&2
        rm -rf "${data:?}/$name"
        tar -xzf "$archive" -C "$data"
        touch "$stamp"
    fi
done

#!/usr/bin/env bash
# The main job on the embedded default: bundled model, bundled data, CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
bin=target/release/edgeadapt
if [ ! -x "$bin" ]; then
    echo "Building edgeadapt (release) for the first time: about 10 minutes on 2 cores, with cargo's progress below; later runs start in seconds." >&2
fi
cargo build --release --locked --bin edgeadapt
exec "$bin" demo "$@"

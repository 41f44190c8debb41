#!/usr/bin/env bash
# The main job on the embedded default: bundled model, bundled data, CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
cargo run --release --locked --quiet -- demo "$@"

#!/usr/bin/env bash
# The whole test suite, including formatting and lint checks, and the release build that ships.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
cargo fmt --all -- --check
# One build profile: the tests run on the release build that ships (the one tools/demo.sh
# makes), so the dependencies compile once.
cargo clippy --locked --release --all-targets -- -D warnings
# Tests that cannot run here (no Mosquitto, no GPU) pass without running: list them at the end.
skipped=target/tmp/skipped-tests.txt
mkdir -p target/tmp
rm -f "$skipped"
trap 'tools/skip-summary.sh "$skipped"' EXIT
cargo test --locked --release "$@"
cargo build --release --locked --bin edgeadapt
# Runs on Ubuntu 22.04 and JetPack 6 (glibc 2.35) and newer.
tools/check-glibc.sh target/release/edgeadapt 2.35

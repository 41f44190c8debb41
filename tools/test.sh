#!/usr/bin/env bash
# The whole test suite, including formatting and lint checks, and the release build that ships.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked "$@"
cargo build --release --locked --bin edgeadapt
# Runs on Ubuntu 22.04 and JetPack 6 (glibc 2.35) and newer.
tools/check-glibc.sh target/release/edgeadapt 2.35

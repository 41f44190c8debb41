#!/bin/sh
# Generate fonts36 and pack it reproducibly as benches/data/fonts36.tar.gz.
# Usage: sh tools/fonts36/package.sh [SEED]   (run from the repository root)
set -eu
seed="${1:-0}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 tools/fonts36/generate.py --out "$work" --seed "$seed"
mkdir -p benches/data
tmp="benches/data/.fonts36.tar.gz.tmp.$$"
tar -C "$work" --sort=name --owner=0 --group=0 --numeric-owner \
    --mtime='2000-01-01 00:00Z' --format=gnu -cf - fonts36 | gzip -n -9 > "$tmp"
mv "$tmp" benches/data/fonts36.tar.gz
ls -l benches/data/fonts36.tar.gz

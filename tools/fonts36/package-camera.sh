#!/bin/sh
# Generate fonts36-camera and pack it reproducibly as
# benches/data/fonts36-camera.tar.gz.
# Usage: sh tools/fonts36/package-camera.sh [SEED]   (run from the repository root)
set -eu
seed="${1:-0}"
work="$(mktemp -d)"
mkdir -p benches/data
tmp="benches/data/.fonts36-camera.tar.gz.tmp.$$"
trap 'rm -rf "$work" "$tmp"' EXIT
python3 tools/fonts36/camera.py --out "$work" --seed "$seed"
tar -C "$work" --sort=name --owner=0 --group=0 --numeric-owner \
    --mtime='2000-01-01 00:00Z' --format=gnu -cf - fonts36-camera | gzip -n -9 > "$tmp"
mv "$tmp" benches/data/fonts36-camera.tar.gz
ls -l benches/data/fonts36-camera.tar.gz

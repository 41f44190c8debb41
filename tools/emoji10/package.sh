#!/bin/sh
# Generate emoji10 and pack it reproducibly as benches/data/emoji10.tar.gz.
# Usage: sh tools/emoji10/package.sh [SEED]   (run from the repository root after
# tools/emoji10/fetch-assets.sh; PYTHON selects the interpreter, default python3)
set -eu
seed="${1:-0}"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" tools/emoji10/generate.py --out "$work" --seed "$seed" --assets target/emoji10-assets
mkdir -p benches/data
tmp="benches/data/.emoji10.tar.gz.tmp.$$"
tar -C "$work" --sort=name --owner=0 --group=0 --numeric-owner \
    --mtime='2000-01-01 00:00Z' --format=gnu -cf - emoji10 | gzip -n -9 > "$tmp"
mv "$tmp" benches/data/emoji10.tar.gz
ls -l benches/data/emoji10.tar.gz

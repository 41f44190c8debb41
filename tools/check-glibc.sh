#!/usr/bin/env bash
# Fails if BINARY needs a newer glibc than MAX (e.g. 2.35 for JetPack 6) and prints the newest
# GLIBC symbol version it needs. `readelf` reads binaries of any architecture.
set -euo pipefail
binary=${1:?usage: tools/check-glibc.sh BINARY MAX_GLIBC_VERSION}
max=${2:?usage: tools/check-glibc.sh BINARY MAX_GLIBC_VERSION}
newest=$(readelf -W --dyn-syms "$binary" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
echo "$binary needs glibc $newest (device has $max)"
if [ "$(printf '%s\n%s\n' "$newest" "$max" | sort -V | tail -1)" != "$max" ]; then
    echo "error: too new for the device; build with the cross-rs image (cross/README.md)" >&2
    exit 1
fi

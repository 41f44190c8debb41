#!/usr/bin/env bash
# The adaptation grid of docs/adaptation.md: fonts36 and fonts36-camera with 6/18/30 of 36
# classes seen, emoji10 (a small CNN brought in with import-onnx) with 5 of 10; the traffic as
# it is, then resampled to 5/20/50/80 % unseen; 3 seeds each; then the summary.
# Usage: tools/bench/grid.sh [OUT_DIR]   (run from the repository root after tools/setup.sh;
# about an hour on 2 cores). A case whose JSON file exists is kept: a stopped grid continues
# where it stopped; remove OUT_DIR to start over.
set -euo pipefail
out="${1:-target/bench-grid}"
mkdir -p "$out"
cargo build --release --locked
bin=target/release/edgeadapt
# data set, its bundle, the seen-class counts
benches=(
    "fonts36 models/efficientnet-lite0-fonts36 6,18,30"
    "fonts36-camera models/efficientnet-lite0-fonts36 6,18,30"
    "emoji10 benches/models/emoji10-cnn 5"
)
for share in none 0.05 0.2 0.5 0.8; do
    for bench in "${benches[@]}"; do
        read -r data bundle counts <<< "$bench"
        # GRID_ONLY="fonts36 emoji10" runs only those data sets.
        if [ -n "${GRID_ONLY:-}" ] && [[ " $GRID_ONLY " != *" $data "* ]]; then
            continue
        fi
        for seen in ${counts//,/ }; do
            name="$out/$data-k$seen-s$share"
            if [ -f "$name.json" ]; then
                echo "bench $data, $seen seen, traffic unseen share $share: $name.json exists, kept"
                continue
            fi
            methods="source,ft-tail+prior-source,recommended,recommended@true-share"
            extra=()
            if [ "$share" = none ]; then
                methods="source,ft-tail+alg,adapter+alg,ft-head+alg,$methods,recommended@balanced,oracle"
            else
                extra=(--traffic-unseen-share "$share")
            fi
            echo "bench $data, $seen seen, traffic unseen share $share -> $name.txt"
            "$bin" bench --bundle "$bundle" --data "target/data/$data" --seen "count:$seen,seed:0" --seeds 3 \
                --methods "$methods" "${extra[@]}" --json "$name.json" --force > "$name.txt"
        done
    done
done
python3 tools/bench/summarise.py "$out"

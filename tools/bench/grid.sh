#!/usr/bin/env bash
# The adaptation grid of docs/adaptation.md: fonts36 and fonts36-camera, 6/18/30 seen classes,
# the traffic as it is and resampled to 5/20/50/80 % unseen, 3 seeds each; then the summary.
# Usage: tools/bench/grid.sh [OUT_DIR]   (run from the repository root after tools/setup.sh;
# about 45 minutes on 2 cores)
set -euo pipefail
out="${1:-target/bench-grid}"
mkdir -p "$out"
cargo build --release --locked
bin=target/release/edgeadapt
for share in none 0.05 0.2 0.5 0.8; do
    for data in fonts36 fonts36-camera; do
        for seen in 6 18 30; do
            methods="source,ft-tail+prior-source,recommended,recommended@true-share"
            extra=()
            if [ "$share" = none ]; then
                methods="source,ft-tail+alg,adapter+alg,ft-tail+prior-source,recommended,recommended@true-share,oracle"
            else
                extra=(--traffic-unseen-share "$share")
            fi
            name="$out/$data-k$seen-s$share"
            echo "bench $data, $seen seen, traffic unseen share $share -> $name.txt"
            "$bin" bench --data "target/data/$data" --seen "count:$seen,seed:0" --seeds 3 \
                --methods "$methods" "${extra[@]}" --json "$name.json" --force > "$name.txt"
        done
    done
done
python3 tools/bench/summarise.py "$out"

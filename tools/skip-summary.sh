#!/usr/bin/env bash
# Prints the tests that did not run on this machine and why, from the list they append to
# (tests/common: `skipped`). Usage: tools/skip-summary.sh LIST
set -euo pipefail
list="$1"
if [ -s "$list" ]; then
    count=$(sort -u "$list" | wc -l)
    echo "Skipped on this machine: $count test(s), which passed without running:"
    sort -u "$list" | sed 's/^/  /'
else
    echo "No test was skipped."
fi

#!/usr/bin/env bash
# Set up, then run the cross-transport benchmark on loopback (every usable transport plus the
# reference rows). Extra arguments go to `polyrpc bench`, e.g. --seconds 1 --repeat 5.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh bench,fast  # no test extras: the benchmark needs none of them
mkdir -p bench/results
exec .venv/bin/polyrpc bench --json bench/results/latest.json "$@"

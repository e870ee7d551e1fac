#!/usr/bin/env bash
# How our step and the reference step grow with the rationale length T and the number of samples
# (issue 5): `gfnlm bench` on the arithmetic task with every trajectory forced to write exactly T
# actions (--fixed_length), one query per step so that the reference (one query per batch anyway)
# stays affordable on a CPU. T in {10, 20, 40} at 8 samples, then 4 and 16 samples at T = 20.
# About 30 minutes on 2 CPU cores; rerunning skips the finished points. Then the README table:
#   bash benchmarks/scaling.sh runs/bench-scaling
#   python3 scripts/results_table.py --bench runs/bench-scaling/*.json --readme README.md --section bench-scaling
set -euo pipefail
out=${1:-runs/bench-scaling}
bin=${GFNLM:-gfnlm}
mkdir -p "$out"
point() {  # name, then bench settings
    local name=$1; shift
    if [ -f "$out/$name.json" ]; then echo "$name: done"; return; fi
    "$bin" bench --queries 1 --fixed_length true --repeats 2 "$@" --output "$out/$name.json" 2>&1 | tee "$out/$name.log"
}
point T10-s8 --max_len 10 --samples 8
point T20-s8 --max_len 20 --samples 8 --profile_ops 8
point T40-s8 --max_len 40 --samples 8
point T20-s4 --max_len 20 --samples 4
point T20-s16 --max_len 20 --samples 16

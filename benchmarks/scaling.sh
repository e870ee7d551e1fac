#!/usr/bin/env bash
# How our step and the reference step grow with the rationale length T and the number of samples
# (issue 5): `gfnlm bench` on the arithmetic task with every trajectory forced to write exactly T
# actions (--fixed_length), one query per step so that the reference (one query per batch anyway)
# stays affordable on a CPU. T in {10, 20, 40} at 8 samples, 4, 8 and 16 samples at T = 20, and T in
# {10, 20, 40} at 4 samples. The reference keeps no KV cache while the calculator is on, so its
# memory grows as T^2: at T = 40 with 8 samples it took more than the 23 GB of our CPU machine and
# was killed, so that point times our step only; T = 40 with 4 samples has both.
# About 45 minutes on 2 CPU cores; rerunning skips the finished points. Then the README table:
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
point T40-s8 --max_len 40 --samples 8 --reference_repeats 0
point T20-s4 --max_len 20 --samples 4
point T20-s16 --max_len 20 --samples 16
point T10-s4 --max_len 10 --samples 4
point T40-s4 --max_len 40 --samples 4

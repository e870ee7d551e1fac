#!/usr/bin/env bash
# How our step and the reference step grow with the rationale length T and the number of samples
# (issue 5): `gfnlm bench` on the arithmetic task with every trajectory forced to write exactly T
# actions (--fixed_length), one query per step so that the reference (one query per batch anyway)
# stays affordable on a CPU: T in {10, 20, 40} at 8 and at 2 samples, and 2, 4, 8, 16 samples at
# T = 20. The reference keeps no KV cache while the calculator is on, so its memory grows as T^2
# (and with the samples): at T = 40 x 8 samples and T = 20 x 16 samples the process outgrew the
# 23 GB of our CPU machine and was killed, so those two points time our step only.
# About 40 minutes on 2 CPU cores; rerunning skips the finished points; a point that fails (e.g.
# killed for memory) is reported and the sweep goes on. Ends by writing the table in docs/benchmarks.md:
#   bash benchmarks/scaling.sh runs/bench-scaling
set -euo pipefail
out=${1:-runs/bench-scaling}
bin=${GFNLM:-gfnlm}
mkdir -p "$out"
files=()  # the finished points, in the order of the calls below (the table's row order)
point() {  # name, then bench settings
    local name=$1; shift
    if [ -f "$out/$name.json" ]; then
        echo "$name: done"
    elif ! "$bin" bench --queries 1 --fixed_length true --repeats 2 "$@" --output "$out/$name.json" 2>&1 \
            | tee "$out/$name.log"; then
        echo "$name: failed, see $out/$name.log"
    fi
    if [ -f "$out/$name.json" ]; then files+=("$out/$name.json"); fi
}
point T10-s8 --max_len 10 --samples 8
point T20-s8 --max_len 20 --samples 8 --profile_ops 8
point T40-s8 --max_len 40 --samples 8 --reference_repeats 0
point T10-s2 --max_len 10 --samples 2
point T20-s2 --max_len 20 --samples 2
point T40-s2 --max_len 40 --samples 2
point T20-s4 --max_len 20 --samples 4
point T20-s16 --max_len 20 --samples 16 --reference_repeats 0
python3 "$(dirname "$0")/../scripts/results_table.py" bench "${files[@]}" --doc docs/benchmarks.md --section bench-scaling

#!/usr/bin/env bash
# The sampler with the growing KV cache against the preallocated one (TrainConfig.static_cache):
# `gfnlm bench` at the default arithmetic point (4 queries x 8 samples, T <= 20) and at 16 x 16,
# each with --static_cache false and true. Our step only (--reference_repeats 0): the reference
# does not change with our cache. Rerunning skips the finished points. Ends by writing the table:
#   bash benchmarks/sampler.sh runs/bench-sampler                  # CPU (about 10 minutes on 2 cores)
#   DEVICE=cuda SECTION=bench-sampler-gpu bash benchmarks/sampler.sh runs/bench-sampler-gpu
set -euo pipefail
out=${1:-runs/bench-sampler}
bin=${GFNLM:-gfnlm}
mkdir -p "$out"
files=()
point() {  # name, then bench settings
    local name=$1; shift
    if [ ! -f "$out/$name.json" ]; then
        "$bin" bench --device "${DEVICE:-auto}" --reference_repeats 0 --repeats 3 "$@" --output "$out/$name.json" \
            2>&1 | tee "$out/$name.log"
    fi
    files+=("$out/$name.json")
}
for cache in false true; do
    point "4x8-static-$cache" --static_cache "$cache"
    point "16x16-static-$cache" --queries 16 --samples 16 --static_cache "$cache"
done
python3 scripts/results_table.py bench "${files[@]}" --doc docs/benchmarks.md --section "${SECTION:-bench-sampler}"

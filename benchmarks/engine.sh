#!/usr/bin/env bash
# Our training step by precision and decoding, on this machine, one sitting: the previous release's path
# (commit 254b703: float32, the sampler before the Policy), then ours in float32, in bfloat16 (the default
# where the CPU computes it natively) and in bfloat16 with the compiled decoding step; at the default
# arithmetic point (4 queries x 8 samples) and at 16 x 16, every trajectory T = 20 actions (--fixed_length).
# Our step only (--reference_repeats 0). Rerunning skips the finished points. Ends by writing the table:
#   bash benchmarks/engine.sh runs/bench-engine        # CPU: about an hour on 2 cores
#   DEVICE=cuda SECTION=bench-engine-gpu bash benchmarks/engine.sh runs/bench-engine-gpu   # the prepared GPU check
set -euo pipefail
out=${1:-runs/bench-engine}
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}  # the venv make install builds
mkdir -p "$out"
previous="$out/previous-release"
if [ ! -d "$previous" ]; then
    git worktree add --detach "$previous" 254b703 >/dev/null
fi
files=()
point() {  # name, source folder, then bench settings; a point that fails (out of memory) is noted, not retried
    local name=$1 src=$2; shift 2
    if [ ! -f "$out/$name.json" ] && [ ! -f "$out/$name.failed" ]; then
        PYTHONPATH="$src" "$python" -m gfnlm bench --device "${DEVICE:-auto}" --reference_repeats 0 --fixed_length true \
            --max_len 20 "$@" --output "$out/$name.json" 2>&1 | grep -v "it/s]" | tee "$out/$name.log" \
            || echo "exit status ${PIPESTATUS[0]} (137: killed, out of memory)" > "$out/$name.failed"
    fi
    [ -f "$out/$name.json" ] && files+=("$out/$name.json")
    return 0
}
for size in "4 8" "16 16"; do
    set -- $size
    at="--queries $1 --samples $2"
    [ "$1" = 16 ] && at="$at --repeats 1 --warmup 0"  # one timed run of each part: 256 trajectories a step
    point "$1x$2-previous" "$previous/src" $at
    point "$1x$2-float32" src $at --mixed_precision no --compile false
    point "$1x$2-default" src $at
    point "$1x$2-compiled" src $at --compile true
done
"$python" scripts/results_table.py bench:engine "${files[@]}" --doc docs/benchmarks.md --section "${SECTION:-bench-engine}"

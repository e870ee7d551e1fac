#!/usr/bin/env bash
# Arithmetic runs on one GPU: scripts/arithmetic_runs.py launched as processes side by side, each
# under a wall-clock limit. The model (135M parameters) leaves a big GPU mostly idle, so the
# processes share it. Three job sets:
#   bash scripts/arithmetic_gpu.sh runs/arith-gpu [table]   the table (paper Table 4) and Table E.3 at
#       one seed, in about 8 minutes: nine processes (three GFlowNet seeds, three seed-rationale
#       counts, SFT, PPO and prompting)
#   bash scripts/arithmetic_gpu.sh runs/arith-gpu-lik likelihood   the GFlowNet alone with a longer
#       budget: six processes, reward_likelihood_weight 1 and 3 at three seeds each (set MINUTES and
#       LIMIT_S to the budget, e.g. MINUTES='{"gfn": 5.5}' LIMIT_S=450)
#   bash scripts/arithmetic_gpu.sh runs/arith-gpu prompting   k-shot prompting with 3, 5, 10 and 20
#       examples at three shuffle seeds: four processes, no training (LIMIT_S=200 is enough)
# then the tables:
#   python3 scripts/results_table.py arithmetic runs/arith-gpu --doc docs/experiments/arithmetic.md --section arithmetic-gpu
# Environment: MINUTES (training time per method, JSON), LIMIT_S (wall-clock limit per process),
# NTEST (questions per test set), DEVICE.
set -euo pipefail
out=${1:?usage: arithmetic_gpu.sh OUT [table|likelihood]}
jobs=${2:-table}
minutes=${MINUTES:-'{"gfn": 3.5, "sft": 0.5, "ppo": 0.5}'}
limit=${LIMIT_S:-320}
runs="python3 scripts/arithmetic_runs.py $out --n-test ${NTEST:-100} --eval-batch-questions 100 --device ${DEVICE:-cuda}"
settings=(--gfn-settings train_file=../shared/data/arithmetic/1digit_34_op+-_train_50.json
          p_replay=0.5 p_tempered=0.25 buffer_sampling=reward)
variant=(--gfn-name gfn-worked-reward-logz "${settings[@]}")
mkdir -p "$out"
$runs --methods --shots  # the test sets, before the processes that share them start
export OMP_NUM_THREADS=1  # the GPU does the work; the processes must not fight over CPU threads
pids=()
launch() {  # log name, then arithmetic_runs.py arguments
    local name=$1; shift
    timeout "$limit" $runs --minutes "$minutes" "$@" > "$out/log-$name.txt" 2>&1 &
    pids+=($!)
}
case $jobs in
table)
    for seed in 0 1 2; do launch "gfn-$seed" --methods gfn --seeds "$seed" --shots "${variant[@]}"; done
    for count in 0 10 25; do launch "ablation-$count" --methods --seeds 0 --shots --ablation "$count" "${variant[@]}"; done
    launch sft --methods sft --seeds 0 1 2 --shots
    launch ppo --methods ppo --seeds 0 1 2 --shots
    launch prompting --methods --seeds 0 --shots 0 3 ;;
likelihood)
    for seed in 0 1 2; do
        launch "gfn-$seed" --methods gfn --seeds "$seed" --shots "${variant[@]}"
        launch "gfn-lik3-$seed" --methods gfn --seeds "$seed" --shots --gfn-name gfn-lik3 "${settings[@]}" \
            reward_likelihood_weight=3
    done ;;
prompting)
    for shots in 3 5 10 20; do launch "prompting-$shots" --methods --seeds 0 1 2 --shots "$shots"; done ;;
*) echo "unknown job set: $jobs (table, likelihood or prompting)" >&2; exit 2 ;;
esac
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
echo "$failed of ${#pids[@]} processes failed or hit the limit; logs: $out/log-*.txt"

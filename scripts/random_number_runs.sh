#!/usr/bin/env bash
# The random-number comparison (docs/experiments/random-number.md) on the embedded SmolLM2-135M: `gfnlm demo` (base
# model and GFlowNet fine-tuning), the same with twice the steps (in OUT/long), then SFT and PPO
# with the demo's budget (200 optimizer steps of 32 samples each, LoRA; PPO with one epoch per
# batch so that it also takes 200 steps), GRPO (TRL's GRPOTrainer) with the same steps, stopped at the
# GFlowNet's training time if it gets there first, then the docs tables from the runs' eval.json.
# Long (about 50 minutes on 2 CPU cores): run it in the background; rerunning resumes or reuses
# finished runs.
#   bash scripts/random_number_runs.sh runs/random-number
set -euo pipefail
out=${1:-runs/random-number}
bin=${GFNLM:-gfnlm}
common=(--task random-number --steps 200 --queries_per_step 1 --samples_per_query 32 --lora_rank 8
        --lora_alpha 16 --lr_decay cosine --save_every 20 --eval_samples 1000 --progress false)
resume() { if [ -d "$1/checkpoints" ]; then echo --resume; fi; }
"$bin" demo --output-dir "$out"
mkdir -p "$out/long/base" && cp -n "$out/base/eval.json" "$out/long/base/"  # the same base model: not evaluated twice
"$bin" demo --output-dir "$out/long" --steps 400
"$bin" train --method sft --output-dir "$out/sft" "${common[@]}" --lr 2e-3 $(resume "$out/sft")
"$bin" train --method ppo --output-dir "$out/ppo" "${common[@]}" --lr 1e-3 --ppo_epochs 1 $(resume "$out/ppo")
gfn_minutes=$(python3 -c "import json, sys; rows = [json.loads(l) for l in open(sys.argv[1])]; print(sum(r['step_time_s'] for r in rows) / 60)" "$out/gfn/metrics.jsonl")
grpo_resume=$([ -d "$out/grpo/trl" ] && echo --resume || true)
"$bin" train --method grpo --output-dir "$out/grpo" "${common[@]}" --lr 1e-4 --time_limit_minutes "$gfn_minutes" $grpo_resume
python3 scripts/results_table.py random-number "$out/base" "$out/gfn" --doc docs/experiments/random-number.md --section demo
python3 scripts/results_table.py random-number "$out/base" "$out/gfn" "$out/long/gfn" "$out/ppo" "$out/grpo" "$out/sft" --doc docs/experiments/random-number.md --section random-number
python3 scripts/results_table.py random-number "$out/base" "$out/gfn" "$out/grpo" --doc docs/experiments/random-number.md \
    --section random-number-grpo --figure docs/experiments/random-number-grpo.png

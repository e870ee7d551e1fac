"""The story-infilling comparison (paper §4.2, Table 2, Table C.7) on one model.

Fine-tunes the story LM, then (each through the command line, within a time budget, resumable)
SFT and the GFlowNet on top of it, and evaluates them, prompting and left-to-right sampling of the
story LM the same way on the validation stories. It writes
    OUT/story-lm/                  the story LM (LoRA on the reward and training splits; eval.json: its infills)
    OUT/{sft,gfn}-seed{S}/         the trained infillers (config.yaml, metrics.jsonl, checkpoints/, eval.json,
                                   samples.jsonl)
    OUT/{prompting,left-to-right}/ the baselines' eval.json and samples.jsonl
Rerunning skips finished evaluations and resumes unfinished training. Then
    python3 scripts/results_table.py infilling OUT/prompting OUT/left-to-right OUT/sft-seed0 OUT/gfn-seed0 \\
        --doc docs/experiments/infilling.md --section infilling
    python3 scripts/results_table.py infilling:samples OUT/prompting OUT/sft-seed0 OUT/gfn-seed0 \\
        --doc docs/experiments/infilling.md --section infilling-samples
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from run_folders import run_command, settings_flags  # scripts/run_folders.py

STORY_LM = ["--queries_per_step", "16", "--lr", "5e-4", "--save_every", "10"]
"""16 whole stories a step (of the 1771 of the reward and training splits), for --story-lm-steps steps."""
SFT = ["--steps", "10000", "--queries_per_step", "16", "--save_every", "50"]
"""Table C.2's SFT (lr 1e-4, LoRA) for as long as the time budget allows (the paper: 10 epochs of 900)."""
GFN = ["--steps", "10000", "--queries_per_step", "4", "--samples_per_query", "8", "--lr", "5e-4",
       "--warmup_steps", "10", "--reward_temp_horizon", "30", "--save_every", "10"]
"""Table C.2 (the task's defaults) on a CPU budget: 4 stories x 8 samples a step instead of 16 x 64, a
learning rate 5x the paper's for the few steps, the reward temperature annealed over 30 steps, not 100."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--minutes", type=float, default=60, help="training time of each GFlowNet")
    parser.add_argument("--story-lm-steps", type=int, default=120, help="steps of the story LM (120: about one pass)")
    parser.add_argument("--sft-minutes", type=float, default=20, help="training time of each SFT run")
    parser.add_argument("--eval-stories", type=int, default=None, help="first N validation stories (default: all 100)")
    parser.add_argument("--methods", nargs="*", default=["prompting", "left-to-right", "sft", "gfn"])
    parser.add_argument("--gfn-settings", nargs="*", default=[], metavar="KEY=VALUE", help="more GFlowNet settings")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    common = ["--task", "infilling", "--device", args.device, "--progress", "false"]
    common += ["--model", args.model] if args.model else []
    common += ["--eval_stories", str(args.eval_stories)] if args.eval_stories else []
    story_lm = args.out / "story-lm"
    run_command(["train", "--method", "story-lm", *common, *STORY_LM, "--steps", str(args.story_lm_steps)], story_lm)
    with_lm = [*common, "--story_lm", str(story_lm)]
    for method in ("prompting", "left-to-right"):
        if method in args.methods:
            run_command(["eval", "--method", method, *with_lm], args.out / method)
    gfn = [*GFN, "--time_limit_minutes", str(args.minutes), *settings_flags(parser, "--gfn-settings", args.gfn_settings)]
    for seed in args.seeds:
        if "sft" in args.methods:
            run_command(["train", "--method", "sft", "--seed", str(seed), "--time_limit_minutes", str(args.sft_minutes),
                         *with_lm, *SFT], args.out / f"sft-seed{seed}")
        if "gfn" in args.methods:
            run_command(["train", "--method", "gfn", "--seed", str(seed), *with_lm, *gfn], args.out / f"gfn-seed{seed}")


if __name__ == "__main__":
    main()

"""The story-infilling comparison (paper §4.2, Table 2, Table C.7) on one model.

Fine-tunes the story LM, then on top of it (each through the command line, resumable) the GFlowNet
for 80 steps, TRL's GRPO for the GFlowNet's training time and SFT for --sft-epochs passes, and
evaluates them, prompting and left-to-right sampling of the story LM the same way on the validation
stories. It writes
    OUT/story-lm/                  the story LM (LoRA on the reward and training splits; eval.json: its infills)
    OUT/{gfn,grpo,sft}-seed{S}/    the trained infillers (config.yaml, metrics.jsonl, checkpoints/, eval.json,
                                   samples.jsonl)
    OUT/{prompting,left-to-right}/ the baselines' eval.json and samples.jsonl
Rerunning skips finished evaluations and resumes unfinished training. Two processes of one thread each
(OMP_NUM_THREADS=1) share 2 cores: one with --methods gfn sft, one with --methods grpo --grpo-minutes M.
Then (a method's seeds make one row)
    python3 scripts/results_table.py infilling OUT/prompting OUT/left-to-right OUT/sft-seed* OUT/grpo-seed* \\
        OUT/gfn-seed* --doc docs/experiments/infilling.md --section infilling
    python3 scripts/results_table.py infilling:samples OUT/prompting OUT/sft-seed0 OUT/grpo-seed0 OUT/gfn-seed0 \\
        --doc docs/experiments/infilling.md --section infilling-samples
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from run_folders import GRPO, run_command, settings_flags  # scripts/run_folders.py

from gfnlm.runlog import logged_training_minutes, read_logged_metrics
from gfnlm.tasks.infilling import InfillingOptions

STORY_LM = ["--queries_per_step", "16", "--lr", "5e-4", "--save_every", "10"]
"""16 whole stories a step (of the 1771 of the reward and training splits), for --story-lm-steps steps."""
SFT_BATCH = 16
SFT = ["--queries_per_step", str(SFT_BATCH), "--save_every", "10"]
"""Table C.2's SFT (lr 1e-4, LoRA), 16 pairs a step, for --sft-epochs passes over the training stories (the paper: 10)."""
GFN = ["--steps", "80", "--queries_per_step", "4", "--samples_per_query", "8", "--lr", "5e-4",
       "--warmup_steps", "10", "--reward_temp_horizon", "40", "--save_every", "10"]
"""Table C.2 (the task's defaults) on a CPU budget: 80 steps of 4 stories x 8 samples instead of 1000 of 16 x 64,
a learning rate 5x the paper's for the few steps, the reward temperature at its end value by the middle of the
run (the paper: after 100 steps)."""


def grpo_minutes(args: argparse.Namespace, seed: int) -> float:
    """GRPO's time budget: --grpo-minutes, else the training time of the GFlowNet of the same seed."""
    if args.grpo_minutes is not None:
        return args.grpo_minutes
    logged = read_logged_metrics(args.out / f"gfn-seed{seed}")
    if not logged:
        raise SystemExit(f"GRPO trains for the GFlowNet's time: train gfn-seed{seed} first, or pass --grpo-minutes")
    return logged_training_minutes(logged)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--minutes", type=float, default=0, help="stop each GFlowNet after this many minutes of "
                        "training (default 0: its 80 steps)")
    parser.add_argument("--story-lm-steps", type=int, default=120, help="steps of the story LM (120: about one pass)")
    parser.add_argument("--sft-epochs", type=float, default=1, help="passes of SFT over the training stories")
    parser.add_argument("--grpo-minutes", type=float, default=None, help="training time of each GRPO run "
                        "(default: the training time of the GFlowNet of its seed)")
    parser.add_argument("--eval-stories", type=int, default=None, help="first N validation stories (default: all 100)")
    parser.add_argument("--methods", nargs="*", default=["prompting", "left-to-right", "sft", "gfn", "grpo"])
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
    sft_steps = math.ceil(args.sft_epochs * InfillingOptions.train_stories / SFT_BATCH)
    for seed in args.seeds:
        if "gfn" in args.methods:
            run_command(["train", "--method", "gfn", "--seed", str(seed), *with_lm, *gfn], args.out / f"gfn-seed{seed}")
        if "grpo" in args.methods:
            run_command(["train", "--method", "grpo", "--seed", str(seed), *with_lm, *GRPO, "--time_limit_minutes",
                         str(grpo_minutes(args, seed))], args.out / f"grpo-seed{seed}")
        if "sft" in args.methods:
            run_command(["train", "--method", "sft", "--seed", str(seed), "--steps", str(sft_steps), *with_lm, *SFT],
                        args.out / f"sft-seed{seed}")


if __name__ == "__main__":
    main()

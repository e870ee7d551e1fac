"""The sentence-continuation comparison (paper §4.1, Fig. 3, Table B.1) on one model.

Trains, through the command line, one GFlowNet per reward temperature and TRL's GRPO (each within a
time budget, resumable), evaluates each on the held-out prompts, and evaluates every decoding
baseline of the base model the same way (N continuations of each prompt, the same metrics). It writes
    OUT/gfn-T{T}/           GFlowNet runs (config.yaml, metrics.jsonl, checkpoints/, eval.json, samples.jsonl)
    OUT/grpo/               GRPO (TRL's trainer) on the base model's log p(Z . | X), for the GFlowNet's time
    OUT/eval-{rule}/        the baselines: greedy, beam, beam x5, diverse-beam, diverse-beam x5, nucleus,
                            top-k, sample (T = 1), tempered at each T
Rerunning skips finished evaluations and resumes unfinished training. Then
    python3 scripts/results_table.py continuation OUT/gfn-T* OUT/eval-* --doc docs/experiments/continuation.md \\
        --section continuation --figure docs/continuation-pareto.png
    python3 scripts/results_table.py continuation:samples OUT/gfn-T0.875 OUT/eval-tempered-T0.875 \\
        OUT/eval-diverse-beam-x5 --doc docs/experiments/continuation.md --section continuation-samples
Runs that share the 2 CPU cores should each get OMP_NUM_THREADS=1 (see --part).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from run_folders import GRPO, run_command, settings_flags  # scripts/run_folders.py

GFN = ["--steps", "10000", "--queries_per_step", "4", "--samples_per_query", "8", "--lr", "5e-4",
       "--warmup_steps", "10", "--reward_temp_horizon", "30", "--save_every", "10"]
"""The release's settings (the task's defaults) on a CPU budget: 4 prompts x 8 samples a step instead
of 32 x 8, a learning rate 5x the release's for the few steps, the reward temperature annealed over
30 steps instead of 750."""

BASELINES: dict[str, list[str]] = {
    "greedy": ["--method", "greedy"],
    "beam": ["--method", "beam"],
    "beam-x5": ["--method", "beam", "--beam_factor", "5"],
    "diverse-beam": ["--method", "diverse-beam"],
    "diverse-beam-x5": ["--method", "diverse-beam", "--beam_factor", "5"],
    "nucleus": ["--method", "nucleus"],
    "top-k": ["--method", "top-k"],
    "sample": ["--method", "sample"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--temps", nargs="*", default=["0.8", "0.875", "0.95"], help="final reward temperatures T")
    parser.add_argument("--minutes", type=float, default=60, help="training time of each GFlowNet and of GRPO")
    parser.add_argument("--eval-prompts", type=int, default=None, help="first N held-out prompts (default: all 50)")
    parser.add_argument("--part", choices=["gfn", "grpo", "baselines", "all"], default="all",
                        help="run only the GFlowNets, GRPO or the baselines (two processes side by side)")
    parser.add_argument("--gfn-settings", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more GFlowNet settings, e.g. lr=1e-4 queries_per_step=8")
    parser.add_argument("--encoder", default=None, help="sentence encoder of the diversity (default: the task's)")
    parser.add_argument("--baselines", nargs="*", choices=[*BASELINES, "tempered"], default=[*BASELINES, "tempered"],
                        help="which baselines --part baselines evaluates (default: all; 'tempered': at each T)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    common = ["--task", "continuation", "--device", args.device, "--progress", "false"]
    common += ["--model", args.model] if args.model else []
    common += ["--eval_prompts", str(args.eval_prompts)] if args.eval_prompts else []
    common += ["--encoder", args.encoder] if args.encoder else []
    gfn = [*GFN, "--time_limit_minutes", str(args.minutes), *settings_flags(parser, "--gfn-settings", args.gfn_settings)]
    if args.part in ("gfn", "all"):
        for temp in args.temps:
            run_command(["train", "--method", "gfn", "--reward_temp", temp, *common, *gfn], args.out / f"gfn-T{temp}")
    if args.part in ("grpo", "all"):
        run_command(["train", "--method", "grpo", *common, *GRPO, "--time_limit_minutes", str(args.minutes)],
                    args.out / "grpo")
    if args.part in ("baselines", "all"):
        for name in args.baselines:
            if name in BASELINES:
                run_command(["eval", *BASELINES[name], *common], args.out / f"eval-{name}")
        for temp in args.temps if "tempered" in args.baselines else []:
            run_command(["eval", "--method", "tempered", "--temperature", temp, *common], args.out / f"eval-tempered-T{temp}")


if __name__ == "__main__":
    main()

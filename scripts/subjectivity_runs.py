"""The subjectivity comparison (paper Table 3, and Table D.4 with --ablation) on one model.

For every training size (10, 20, 50 labelled reviews) and seed it trains, through the command
line, GFlowNet fine-tuning (E-step), then EM (an M-step on the GFlowNet policy's rationales) and
SFT at every learning rate of the sweep (--lrs), and evaluates few-shot prompting with as many
shuffled examples as the training size; zero-shot prompting is evaluated once. All are evaluated on the same
validation split of ../shared/data/subj/train.jsonl (or --test-file). It writes
    OUT/n{size}/{gfn,em-lr{LR},sft-lr{LR}}-seed{S}/eval.json  (run directories)
    OUT/n{size}/prompting-seed{S}/eval.json, OUT/zero-shot/eval.json, OUT/base-rationales/eval.json
    OUT/n{size}/gfn-noseed-seed{S}/eval.json               --ablation-sizes: buffer not seeded
    OUT/n{size}/gfn-noseed-noagg-seed{S}/eval.json         ... and one rationale per review
Rerunning skips finished runs and resumes unfinished training. The docs table comes from
    python3 scripts/results_table.py subjectivity OUT --doc docs/experiments/subjectivity.md --section subjectivity
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from run_folders import run_command, settings_flags  # scripts/run_folders.py

SUPERVISED = ["--steps", "50", "--warmup_steps", "10", "--queries_per_step", "8", "--samples_per_query", "1"]
"""SFT and EM's M-step: 400 examples seen (the paper: 100 steps x 256), within CPU reach."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", nargs="*", type=int, default=[10, 20, 50])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=["gfn", "em", "sft", "prompting"])
    parser.add_argument("--gfn-steps", type=int, default=60)
    parser.add_argument("--gfn-samples", type=int, default=8, help="rationales per review in a GFlowNet batch")
    parser.add_argument("--gfn-settings", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more GFlowNet settings, e.g. lr=5e-5 buffer_sampling=deficit (also for the ablation)")
    parser.add_argument("--lrs", nargs="*", default=["1e-3", "1e-4"], help="learning rates of SFT and of EM's M-step")
    parser.add_argument("--supervised-settings", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more settings of SFT and EM's M-step, e.g. balance_labels=true")
    parser.add_argument("--validation-size", type=int, default=100)
    parser.add_argument("--test-file", help="evaluate on this file instead of the validation split")
    parser.add_argument("--ablation-sizes", nargs="*", type=int, default=[],
                        help="training sizes at which to run Table D.4's ablation (first seed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    common = ["--task", "subjectivity", "--device", args.device, "--validation_size", str(args.validation_size),
              "--progress", "false"]
    common += ["--model", args.model] if args.model else []
    common += ["--test_file", args.test_file] if args.test_file else []
    # the paper's schedule (Table D.3) compressed to the step budget: reward temperature 1.2 -> 1.0
    gfn = ["--steps", str(args.gfn_steps), "--warmup_steps", "10", "--queries_per_step", "4",
           "--samples_per_query", str(args.gfn_samples), "--reward_temp_horizon", str(max(1, 2 * args.gfn_steps // 3)),
           "--save_every", "10"]
    gfn += settings_flags(parser, "--gfn-settings", args.gfn_settings)
    supervised = [*SUPERVISED, *settings_flags(parser, "--supervised-settings", args.supervised_settings)]
    if "prompting" in args.methods:
        run_command(["eval", "--method", "prompting", "--label", "zero-shot prompting", *common], args.out / "zero-shot")
    if "gfn" in args.methods:  # what the GFlowNet starts from: the base model's own rationales, then its answers
        run_command(["eval", "--label", "base model, sampled rationales", *common], args.out / "base-rationales")
    for size in args.sizes:
        root, data = args.out / f"n{size}", [*common, "--train_size", str(size)]
        for seed in args.seeds:
            seeded = [*data, "--seed", str(seed)]
            if "gfn" in args.methods or "em" in args.methods:
                run_command(["train", "--method", "gfn", *seeded, *gfn], root / f"gfn-seed{seed}")
            if "em" in args.methods:
                for lr in args.lrs:
                    run_command(["train", "--method", "em", "--e_step_run", str(root / f"gfn-seed{seed}"), "--lr", lr,
                         *seeded, *supervised], root / f"em-lr{lr}-seed{seed}")
            if "sft" in args.methods:
                for lr in args.lrs:
                    run_command(["train", "--method", "sft", "--lr", lr, *seeded, *supervised], root / f"sft-lr{lr}-seed{seed}")
            if "prompting" in args.methods:
                run_command(["eval", "--method", "prompting", "--shots", str(size), "--shot_seed", str(seed), *data],
                    root / f"prompting-seed{seed}")
        if size in args.ablation_sizes:
            seed = args.seeds[0]
            noseed = root / f"gfn-noseed-seed{seed}"
            run_command(["train", "--method", "gfn", "--seed_buffer", "false", *data, "--seed", str(seed), *gfn], noseed)
            run_command(["eval", "--adapter", str(noseed), "--eval_samples", "1", "--label", "gfn, no seeds, no aggregation"],
                root / f"gfn-noseed-noagg-seed{seed}")


if __name__ == "__main__":
    main()

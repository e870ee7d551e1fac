"""The arithmetic comparison (paper Table 4, and Table E.3 with --ablation) on one model.

Generates test sets with 3, 4 and 5 operands (disjoint from the training questions), trains
GFlowNet, SFT and PPO policies within a time budget each, evaluates them and k-shot prompting
of the base model on every test set, and writes one eval.json per (run, test set):
    OUT/data/test-{3,4,5}ops.json
    OUT/{gfn,sft,ppo}-seed{S}/            run directories (config.yaml, metrics.jsonl, checkpoints/)
    OUT/{GFN_NAME}-seed{S}/               a GFlowNet variant (--gfn-name with --gfn-settings)
    OUT/<run>/eval-{K}ops/eval.json       accuracy etc. (+ predictions.jsonl)
    OUT/prompting-k{K}-seed{S}/eval-...   k-shot prompting with shuffle seed S
    OUT/{GFN_NAME}-seeds{N}/              --ablation: the GFlowNet runs with N seed rationales
    OUT/{GFN_NAME}-seed{S}/curve/step-{N}/eval-{K}ops/eval.json
                                          --curve: every saved checkpoint of the GFlowNet runs
Everything runs in one process (the model loads once per run). Rerunning skips finished
evaluations and resumes unfinished training. The docs table comes from
    python3 scripts/results_table.py arithmetic OUT --doc docs/experiments/arithmetic.md --section arithmetic
and the learning curve (a table, and a figure with --figure) from
    python3 scripts/results_table.py arithmetic:curve OUT/{GFN_NAME}-seed0 --figure OUT/curve.png
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import yaml

from gfnlm.baselines.ppo import PPOConfig
from gfnlm.cli import RunSettings, write_json
from gfnlm.config import ConfigError, TrainConfig, apply_settings, parse_key_values
from gfnlm.models import DEFAULT_MODEL, load_adapter, load_model_and_tokenizer
from gfnlm.tasks.arithmetic import ZERO_SHOT_CUE, ArithmeticOptions, ArithmeticTask, generate_problems, load_problems
from gfnlm.policy import Policy, resolve_device
from gfnlm.runlog import logged_training_minutes, read_logged_metrics

OPERANDS = (3, 4, 5)
COMMON = {"lora_rank": 16, "lora_alpha": 32, "save_every": 25, "progress": False, "steps": 2000}
TRAIN_SETTINGS = {
    # on top of the task's Table E.2 settings (ArithmeticTask.method_settings): a higher learning
    # rate and a smaller batch for the short budget
    "gfn": {"lr": 5e-4, "warmup_steps": 10, "queries_per_step": 8, "samples_per_query": 8,
            "p_replay": 0.25, "p_tempered": 0.5},
    "sft": {"lr": 5e-4, "queries_per_step": 4, "samples_per_query": 8},
    "ppo": {"lr": 1e-4, "queries_per_step": 8, "samples_per_query": 8},
}


def make_test_sets(out: Path, n: int) -> dict[int, Path]:
    defaults = ArithmeticOptions()
    seen = {p.question for f in (defaults.train_file, defaults.worked_file) for p in load_problems(f)}
    files = {}
    for k in OPERANDS:
        path = out / "data" / f"test-{k}ops.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, generate_problems(k, n, seed=1000 + k, exclude=seen))
        files[k] = path
    return files


def evaluate_all(policy: Policy, run_dir: Path, files: dict[int, Path], options: dict, label: str, extra: dict) -> None:
    """``policy`` on every test set: ``run_dir/eval-{K}ops/eval.json`` with the run's ``extra`` facts (the
    results table reads ``operands``, ``method`` and the training budget from them)."""
    for k, path in files.items():
        out = run_dir / f"eval-{k}ops"
        if (out / "eval.json").is_file():
            continue
        task = ArithmeticTask(ArithmeticOptions(**options, test_file=str(path)), policy.tokenizer)
        started = time.perf_counter()
        result = task.evaluate(policy, out, label)
        result.update(extra, operands=k, eval_seconds=time.perf_counter() - started)
        write_json(out / "eval.json", result)
        logging.info("%s, %d operands: accuracy %.3f (%d questions)", label, k, result["accuracy"], result["n_questions"])


def evaluation_policy(model, tokenizer, device: str, options: dict) -> Policy:
    """``model`` (an adapter on it or not) as the task's policy with ``options``, the default precision, on ``device``."""
    return ArithmeticTask(ArithmeticOptions(**options), tokenizer).policy(model, TrainConfig(device=device))


def run_name(args, method: str, seed: int) -> str:
    """A method's run folder for one seed (the GFlowNet's under --gfn-name)."""
    return f"{args.gfn_name if method == 'gfn' else method}-seed{seed}"


def train_run(args, method: str, seed: int, files: dict[int, Path], seed_rationales: int = 50,
              name: str | None = None, settings: dict[str, str] | None = None) -> None:
    """Train one policy within its time budget, then evaluate it on every test set.

    ``settings`` override the method's training settings or the task's options (a variant's
    settings are recorded in its eval.json, so the results table can name the row)."""
    run_dir = args.out / (name or run_name(args, method, seed))
    if all((run_dir / f"eval-{k}ops" / "eval.json").is_file() for k in files):
        return
    train = TrainConfig()
    apply_settings([train], {**COMMON, **ArithmeticTask.method_settings(method, {}), **TRAIN_SETTINGS[method],
                             "seed": seed, "device": args.device, "time_limit_minutes": args.minutes[method]})
    if args.curve and method == "gfn":
        train.keep_checkpoints = 10**6  # every one, for curve_runs
    options = {"seed_rationales": seed_rationales, "eval_batch_questions": args.eval_batch_questions}
    task_options = ArithmeticOptions(**options)
    apply_settings([train, task_options], settings or {})
    model, tokenizer = load_model_and_tokenizer(args.model)
    task = ArithmeticTask(task_options, tokenizer)
    ppo = PPOConfig()
    apply_settings([ppo], {"ppo_reward": "log"})  # log p(X Z Y) is -5 to -80: exp() would give no signal
    run = RunSettings(args.model, "arithmetic", method, train, task.options, ppo)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(run.as_dict(), sort_keys=False))
    trainer = task.trainer(method, task.policy(model, train), train, ppo, run_dir)
    trainer.train(resume=trainer.latest_checkpoint() is not None)
    facts = trained_run_facts(run_dir, method, seed, task.options.seed_rationales, trainer.step,
                              train.queries_per_step * train.samples_per_query, settings or {})
    evaluate_all(trainer.policy, run_dir, files, options, method, facts)


def trained_run_facts(run_dir: Path, method: str, seed: int, seed_rationales: int, steps: int, samples_per_step: int,
                      settings: dict[str, str]) -> dict:
    """What the results table reads of a trained run beside its accuracy: the row's name (method, variant settings,
    seed rationales) and its training budget (steps x samples / minutes, from its metrics log)."""
    return {"method": method, "seed": seed, "seed_rationales": seed_rationales, "train_steps": steps,
            "train_minutes": logged_training_minutes(read_logged_metrics(run_dir)), "samples_per_step": samples_per_step,
            "settings": settings}


def curve_runs(args, files: dict[int, Path], settings: dict[str, str]) -> None:
    """Evaluate every saved checkpoint of the GFlowNet runs: accuracy against training steps."""
    options = {"eval_batch_questions": args.eval_batch_questions}
    for seed in args.seeds:
        run_dir = args.out / run_name(args, "gfn", seed)
        for checkpoint in sorted(run_dir.glob("checkpoints/step-*/adapter")):
            step = int(checkpoint.parent.name.removeprefix("step-"))
            out = run_dir / "curve" / f"step-{step}"
            if all((out / f"eval-{k}ops" / "eval.json").is_file() for k in files):
                continue
            model, tokenizer = load_model_and_tokenizer(args.model, device=resolve_device(args.device))
            policy = evaluation_policy(load_adapter(model, checkpoint), tokenizer, args.device, options)
            extra = {"method": "gfn", "seed": seed, "train_steps": step, "settings": settings}
            evaluate_all(policy, out, files, options, f"gfn step {step}", extra)


def prompting_runs(args, files: dict[int, Path]) -> None:
    model, tokenizer = load_model_and_tokenizer(args.model, device=resolve_device(args.device))
    policy = evaluation_policy(model, tokenizer, args.device, {})
    for k in args.shots:
        for seed in args.seeds if k > 0 else args.seeds[:1]:
            options = {"shots": k, "shot_seed": seed, "cue": "" if k else ZERO_SHOT_CUE,
                       "eval_batch_questions": args.eval_batch_questions}
            evaluate_all(policy, args.out / f"prompting-k{k}-seed{seed}", files, options,
                         f"{k}-shot prompting", {"method": "prompting", "shots": k, "seed": seed})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n-test", type=int, default=100, help="questions per test set")
    parser.add_argument("--methods", nargs="*", default=["gfn", "sft", "ppo"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="training seeds / k-shot shuffles")
    parser.add_argument("--shots", nargs="*", type=int, default=[0, 3, 5, 10, 20])
    parser.add_argument("--minutes", type=json.loads, default={"gfn": 4, "sft": 1, "ppo": 2},
                        help='training time per method, JSON, e.g. \'{"gfn": 4, "sft": 1, "ppo": 2}\'')
    parser.add_argument("--eval-batch-questions", type=int, default=50)
    parser.add_argument("--ablation", nargs="*", type=int, default=[], help="seed-rationale counts (Table E.3)")
    parser.add_argument("--gfn-settings", nargs="*", default=[], metavar="KEY=VALUE",
                        help="GFlowNet training settings or task options for a variant, e.g. p_replay=0.5")
    parser.add_argument("--gfn-name", default="gfn", help="run-folder prefix of the GFlowNet runs (name a variant)")
    parser.add_argument("--curve", action="store_true",
                        help="keep and evaluate every GFlowNet checkpoint (every 25 steps, 76 MB each on the embedded model)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        gfn_settings = parse_key_values(args.gfn_settings)
    except ConfigError as error:
        parser.error(f"--gfn-settings: {error}")
    if args.ablation and "seed_rationales" in gfn_settings:
        parser.error("--ablation sets seed_rationales itself: leave it out of --gfn-settings")
    files = make_test_sets(args.out, args.n_test)
    for method in args.methods:
        for seed in args.seeds:
            train_run(args, method, seed, files, settings=gfn_settings if method == "gfn" else None)
    if args.curve:
        curve_runs(args, files, gfn_settings)
    if args.shots:
        prompting_runs(args, files)
    for count in args.ablation:  # of the GFlowNet row's settings, the variant's if one is named
        train_run(args, "gfn", args.seeds[0], files, seed_rationales=count, name=f"{args.gfn_name}-seeds{count}",
                  settings=gfn_settings)


if __name__ == "__main__":
    main()

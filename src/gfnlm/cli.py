"""Command line: ``gfnlm train | eval | data | bench | demo``.

Settings come from ``--config FILE.yaml`` and ``--key value`` overrides (the command line wins);
``gfnlm train --help`` lists every key with its documentation. A run directory receives
``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``eval.json`` and the task's figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from gfnlm.config import (
    ConfigError,
    TrainConfig,
    apply_settings,
    field_help,
    load_yaml,
    parse_overrides,
    to_dict,
)

logger = logging.getLogger("gfnlm")
RUN_KEYS = ("model", "task", "method")  # chosen by flags; may also appear in a YAML file


@dataclasses.dataclass
class RunSettings:
    """Everything a command needs, resolved from flags, YAML and overrides."""

    model: str
    task: str
    method: str
    train: TrainConfig
    options: Any  # the task's Options dataclass
    ppo: Any

    def as_dict(self) -> dict:
        return {"model": self.model, "task": self.task, "method": self.method,
                **to_dict(self.train, self.options, self.ppo)}


def resolve_settings(args: argparse.Namespace, overrides: list[str], saved: dict | None = None,
                     evaluating: bool = False) -> RunSettings:
    """Defaults < the task's defaults for the method < a saved run's config.yaml < --config file <
    --key value overrides. The method must be one the task trains (or, ``evaluating``, evaluates)."""
    from gfnlm.baselines.ppo import PPOConfig
    from gfnlm.models import DEFAULT_MODEL
    from gfnlm.tasks import get_task

    settings: dict[str, Any] = dict(saved or {})
    if getattr(args, "config", None):
        settings.update(load_yaml(args.config))
    settings.update(parse_overrides(overrides))
    for key in RUN_KEYS:
        flag = getattr(args, key, None)
        if flag is not None:
            settings[key] = flag
    model = str(settings.pop("model", DEFAULT_MODEL))
    task = str(settings.pop("task", "random-number"))
    method = str(settings.pop("method", "gfn"))
    task_cls = get_task(task)
    methods = task_cls.train_methods + (task_cls.eval_methods if evaluating else ())
    if method not in methods:
        raise ConfigError(f"task {task!r} has no method {method!r}; methods: {', '.join(methods)}")
    train, options, ppo = TrainConfig(), task_cls.Options(), PPOConfig()
    apply_settings([train, options, ppo], task_cls.method_settings(method, settings) | settings)
    train.validate()
    ppo.validate()
    options.validate()
    return RunSettings(model, task, method, train, options, ppo)


def load_task_and_policy(run: RunSettings, adapter: str | None = None):
    """The run's task and its policy: the base model (``Task.prepare_base_model``) with the adapter of a run
    directory or peft folder applied (kept unmerged: tasks whose evaluation also runs the base model
    switch it off), on the run's device, in its precision."""
    from gfnlm.models import load_adapter, load_model_and_tokenizer
    from gfnlm.policy import resolve_device
    from gfnlm.tasks import get_task

    model, tokenizer = load_model_and_tokenizer(run.model, device=resolve_device(run.train.device))
    task = get_task(run.task)(run.options, tokenizer)  # bad input fails here, before anything is written
    model = task.prepare_base_model(model)
    return task, task.policy(load_adapter(model, adapter) if adapter is not None else model, run.train)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def train_and_evaluate(run: RunSettings, output_dir: Path, resume: bool, label: str | None = None) -> dict | None:
    """Train ``run`` into ``output_dir`` (or resume it), then evaluate and write eval.json and figures.

    Under ``torchrun`` / ``accelerate launch`` every process trains; rank 0 alone writes and evaluates
    (the others return None)."""
    from gfnlm.reports import get_report

    task, policy = load_task_and_policy(run)
    trainer = task.trainer(run.method, policy, run.train, run.ppo, output_dir)
    if trainer.ranks.writes:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(run.as_dict(), sort_keys=False))
    started = time.perf_counter()
    trainer.train(resume=resume)
    if not trainer.ranks.writes:
        return None
    logger.info("trained %d steps in %.0f s", trainer.step, time.perf_counter() - started)
    evaluated = trainer.policy.with_space(task.action_space(), task.tool())  # a method may train in a space of its own
    result = task.evaluate(evaluated, output_dir, label or task.eval_label(run.method, str(output_dir)))
    result["train_steps"] = trainer.step
    write_json(output_dir / "eval.json", result)
    get_report(run.task).figures([result], output_dir)
    return result


# ----------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    output_dir = Path(args.output_dir)
    saved = None
    if args.resume and (output_dir / "config.yaml").is_file():
        saved = yaml.safe_load((output_dir / "config.yaml").read_text())
    run = resolve_settings(args, overrides, saved)
    result = train_and_evaluate(run, output_dir, args.resume)
    if result is not None:
        print(format_table([result], _summary_keys(run.task)))
    return 0


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from gfnlm.reports import get_report
    from gfnlm.tasks import get_task

    saved = None
    if args.adapter and (Path(args.adapter) / "config.yaml").is_file():
        saved = yaml.safe_load((Path(args.adapter) / "config.yaml").read_text())
    run = resolve_settings(args, overrides, saved, evaluating=True)
    if run.method in get_task(run.task).eval_methods and args.adapter:
        raise ConfigError(f"--method {run.method} evaluates the base model; drop --adapter")
    output_dir = Path(args.output_dir or args.adapter or "eval")
    task, policy = load_task_and_policy(run, args.adapter)
    output_dir.mkdir(parents=True, exist_ok=True)
    label = args.label or task.eval_label(run.method, args.adapter)
    result = task.evaluate(policy, output_dir, label)
    write_json(output_dir / "eval.json", result)
    get_report(run.task).figures([result], output_dir)
    print(format_table([result], task.summary_keys))
    return 0


def cmd_data(args: argparse.Namespace, overrides: list[str]) -> int:
    """Write a task's generated data file (``Task.make_data``) with its ``DataOptions`` settings."""
    from gfnlm.tasks import get_task

    task_cls = get_task(args.task)
    if task_cls.DataOptions is None:
        raise ConfigError(f"task {args.task!r} generates no data files")
    options = task_cls.DataOptions()
    apply_settings([options], parse_overrides(overrides))
    rows = task_cls.make_data(options)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, rows)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


def cmd_bench(args: argparse.Namespace, overrides: list[str]) -> int:
    from gfnlm.bench import BenchSettings, run_bench

    settings = BenchSettings()
    values = parse_overrides(overrides)
    for key in ("task", "model"):
        if getattr(args, key, None):
            values[key] = getattr(args, key)
    apply_settings([settings], values)
    run_bench(settings)
    return 0


def _bench_epilog() -> str:
    from gfnlm.bench import BenchSettings

    return "settings (--key value):\n" + "\n".join(f"  --{k}: {h}" for k, h in field_help(BenchSettings).items())


def cmd_demo(args: argparse.Namespace, overrides: list[str]) -> int:
    """The main job: GFlowNet fine-tuning of the embedded model on random integers (paper Fig. 2)."""
    from gfnlm.reports import get_report

    root = Path(args.output_dir)
    demo_defaults = DEMO_SETTINGS | parse_overrides(overrides)
    args.task, args.method = "random-number", "gfn"
    run = resolve_settings(args, [f"--{k}={v}" for k, v in demo_defaults.items()])
    print(f"gfnlm demo: GFlowNet fine-tuning of {run.model} to draw uniform integers in "
          f"[{run.options.low}, {run.options.high}] ({run.train.steps} steps); output in {root}/")
    base_path = root / "base" / "eval.json"
    if base_path.is_file():
        base = json.loads(base_path.read_text())
    else:
        task, policy = load_task_and_policy(run)
        base = task.evaluate(policy, root / "base", "base model")
        base_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(base_path, base)
    keys = _summary_keys(run.task)
    print(format_table([base], keys))
    gfn_dir = root / "gfn"
    resume = (gfn_dir / "checkpoints").is_dir()
    tuned = train_and_evaluate(run, gfn_dir, resume=resume, label="GFlowNet fine-tuned")
    print()
    print(format_table([base, tuned], keys))
    figures = get_report(run.task).figures([base, tuned], root)
    print("figure:", ", ".join(map(str, figures)))
    return 0


DEMO_SETTINGS = {
    "steps": 200,
    "queries_per_step": 1,
    "samples_per_query": 32,
    "lr": 2e-3,
    "lr_decay": "cosine",
    "lora_rank": 8,
    "lora_alpha": 16,
    "log_z_lr": 0.05,
    "p_replay": 0.2,
    "buffer_sampling": "deficit",  # keeps "100" (and any integer the policy drops early) reachable
    "buffer_capacity": 128,  # more than the 101 valid integers, so none is ever evicted
    "p_tempered": 0.5,
    "pf_temp_min": 0.7,
    "pf_temp_max": 1.2,
    "save_every": 20,
    "eval_samples": 1000,
}
"""The demo's budget (about 10 minutes on 2 CPU cores); any of them can be overridden."""


def format_table(results: list[dict], keys: tuple[str, ...]) -> str:
    """A plain-text table of the given metrics, one row per evaluated model."""
    header = ["model", *keys]
    from gfnlm.reports.tables import format_number

    rows = [[str(r.get("label", "?")), *(format_number(r.get(k)) for k in keys)] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _summary_keys(task: str) -> tuple[str, ...]:
    from gfnlm.tasks import get_task

    return get_task(task).summary_keys


# ----------------------------------------------------------------------------- parser
def _settings_epilog() -> str:
    from gfnlm.baselines.ppo import PPOConfig
    from gfnlm.tasks import TASKS

    parts = ["methods by task (--method): " + "; ".join(
        f"{n}: {', '.join(t.train_methods)}" + (f" (eval also {', '.join(t.eval_methods)})" if t.eval_methods else "")
        for n, t in TASKS.items()), "", "settings (--key value, or in --config FILE.yaml):"]
    for title, cls in [("training", TrainConfig), ("ppo", PPOConfig)] + [(n, t.Options) for n, t in TASKS.items()]:
        parts.append(f"  [{title}]")
        parts += [f"    --{k}: {h}" for k, h in field_help(cls).items()]
    return "\n".join(parts)


def _data_epilog() -> str:
    from gfnlm.tasks import TASKS

    parts = ["settings (--key value):"]
    for name, task in TASKS.items():
        if task.DataOptions is not None:
            parts.append(f"  [{name}]")
            parts += [f"    --{k}: {h}" for k, h in field_help(task.DataOptions).items()]
    return "\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gfnlm", description="GFlowNet fine-tuning of language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    train = sub.add_parser("train", help="fine-tune a model on a task", epilog=_settings_epilog(), formatter_class=fmt)
    train.add_argument("--task", help="task name (default random-number)")
    train.add_argument("--method", help="gfn (default), sft, ppo, or a method of the task's own (listed below)")
    train.add_argument("--model", help="embedded model name, Hugging Face id or local folder")
    train.add_argument("--output-dir", required=True, help="run directory")
    train.add_argument("--config", help="YAML file of settings")
    train.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a base model or a trained adapter", epilog=_settings_epilog(),
                        formatter_class=fmt)
    ev.add_argument("--task")
    ev.add_argument("--model")
    ev.add_argument("--method", help="how the adapter was trained, or a baseline of the task's that evaluates the "
                    "base model (e.g. prompting; listed below)")
    ev.add_argument("--adapter", help="run directory or peft adapter folder (default: the base model)")
    ev.add_argument("--output-dir", help="where eval.json goes (default: the adapter's run directory)")
    ev.add_argument("--label", help="name of the model in tables and figures")
    ev.add_argument("--config")
    ev.set_defaults(func=cmd_eval)

    data = sub.add_parser("data", help="generate a task's data files", epilog=_data_epilog(), formatter_class=fmt)
    data.add_argument("task", help="task name, e.g. arithmetic")
    data.add_argument("--out", required=True, help="JSON file to write")
    data.set_defaults(func=cmd_data)

    bench = sub.add_parser("bench", help="time our training step against the paper's reference path",
                           epilog=_bench_epilog(), formatter_class=fmt)
    bench.add_argument("--task", help="task (default arithmetic)")
    bench.add_argument("--model", help="embedded model name, Hugging Face id or local folder")
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser("demo", help="the main job: random integers on the embedded model")
    demo.add_argument("--model")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    # peft calls a transformers property that transformers 5 deprecates; not actionable for users
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args, overrides)
    except (ConfigError, ValueError, FileExistsError) as err:
        print(f"gfnlm: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # models that cannot load, rewards that misbehave: one line, no trace
        from gfnlm.models import ModelLoadError
        from gfnlm.rewards import RewardError
        from gfnlm.trainer import TrainingDiverged

        if isinstance(err, (ModelLoadError, RewardError, TrainingDiverged)):
            print(f"gfnlm: error: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())

"""Every registered task's report renders each of its results tables, and draws each figure, from the folders
of a tiny run laid out as its experiment script writes them: a change to what a task's evaluation writes
that its tables no longer read fails here, not in the next experiment's write-up."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
import test_infilling
import test_subjectivity
from conftest import make_char_tokenizer, save_tiny_model
from test_arithmetic import PLAIN, WORKED
from test_arithmetic import _tokenizer as arithmetic_tokenizer
from test_continuation import PROMPTS
from test_cli import TINY_RUN

from gfnlm.cli import main
from gfnlm.models import load_adapter, load_model_and_tokenizer
from gfnlm.reports import REPORTS

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
ENCODER = "all-MiniLM-L6-v2"
QUIET = ["--progress", "false", "--device", "cpu", "--lora_rank", "2"]
ONE_STEP = ["--steps", "1", "--queries_per_step", "2", "--samples_per_query", "2"]

TablePaths = dict[str, list[Path]]
"""A report's table name -> the paths ``scripts/results_table.py TASK:NAME`` is given for it."""


def train(*argv: str) -> None:
    assert main(["train", *argv, *QUIET]) == 0


def evaluate(*argv: str) -> None:
    assert main(["eval", *argv, "--device", "cpu"]) == 0


def labels(runs: list[Path]) -> list[str]:
    return [json.loads((run / "eval.json").read_text())["label"] for run in runs]


def random_number_run(root: Path, monkeypatch) -> TablePaths:
    model = save_tiny_model(root / "tiny", make_char_tokenizer())
    train("--model", str(model), "--output-dir", str(root / "gfn"), *TINY_RUN)
    return {"": [root / "gfn"]}


def continuation_runs(root: Path, monkeypatch) -> TablePaths:
    (root / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS))
    common = ["--task", "continuation", "--model", str(save_tiny_model(root / "tiny", make_char_tokenizer("ab ."))),
              "--prompts_file", str(root / "prompts.txt"), "--prompts_used", "5", "--train_prompts", "3",
              "--max_len", "4", "--eval_samples", "3", "--encoder", ENCODER]
    for method, run in (("gfn", "gfn-T0.875"), ("grpo", "grpo")):
        train("--method", method, *ONE_STEP, "--output-dir", str(root / run), *common)
    evaluate("--method", "beam", "--output-dir", str(root / "eval-beam"), *common)
    runs = [root / "gfn-T0.875", root / "grpo", root / "eval-beam"]
    assert labels(runs) == ["GFlowNet T=0.875", "GRPO (TRL)", "beam"]
    return {"": runs, "samples": runs}


def infilling_runs(root: Path, monkeypatch) -> TablePaths:
    stories = test_infilling.write_stories(root / "stories.csv")
    common = ["--task", "infilling", "--model", str(save_tiny_model(root / "tiny", test_infilling.story_tokenizer())),
              "--stories_file", str(stories), "--validation_stories", "2", "--train_stories", "3", "--min_len", "1",
              "--max_len", "8", "--eval_samples", "3", "--bertscore_model", ENCODER, "--bertscore_layer", "4",
              "--bertscore_baseline_pairs", "8"]
    train("--method", "story-lm", "--steps", "1", "--queries_per_step", "2", "--output-dir", str(root / "story-lm"),
          *common)
    common += ["--story_lm", str(root / "story-lm")]
    for method in ("gfn", "grpo"):
        train("--method", method, *ONE_STEP, "--output-dir", str(root / f"{method}-seed0"), *common)
    evaluate("--method", "prompting", "--output-dir", str(root / "prompting"), *common)
    runs = [root / "prompting", root / "gfn-seed0", root / "grpo-seed0"]
    assert labels(runs) == ["prompting", "GFlowNet fine-tuning", "GRPO (TRL)"]
    return {"": runs, "samples": runs}


def subjectivity_runs(root: Path, monkeypatch) -> TablePaths:
    """One GFlowNet run where ``scripts/subjectivity_runs.py`` puts it: OUT/n{training size}/gfn-seed{S}."""
    data = test_subjectivity.write_reviews(root / "subj")
    model = save_tiny_model(root / "tiny", make_char_tokenizer(chars=test_subjectivity.CHARS))
    run = root / "out" / "n10" / "gfn-seed0"
    train("--model", str(model), "--task", "subjectivity", "--method", "gfn", "--data_dir", str(data),
          "--validation_size", "6", "--eval_samples", "2", "--max_len", "3", "--inverse_prompt_samples", "2",
          *ONE_STEP, "--output-dir", str(run))
    return {"": [root / "out"], "auc": [root / "out"], "log-odds": [run]}


def arithmetic_runs(root: Path, monkeypatch) -> TablePaths:
    """A GFlowNet run trained from the command line, evaluated by ``scripts/arithmetic_runs.py``'s own functions into
    its layout: OUT/gfn-seed0/eval-3ops (Table 4) and OUT/gfn-seed0/curve/step-1/eval-3ops (the learning curve)."""
    runs_script = _script_module("arithmetic_runs")
    worked, plain = root / "worked.json", root / "plain.json"
    worked.write_text(json.dumps(WORKED))
    plain.write_text(json.dumps(PLAIN))
    tokenizer = arithmetic_tokenizer()
    model_dir, run = save_tiny_model(root / "tiny", tokenizer), root / "out" / "gfn-seed0"
    options = {"worked_file": str(worked), "train_file": str(plain), "seed_rationales": 2, "reward_shots": 2,
               "eval_samples": 2, "eval_max_len": 6, "answer_max_tokens": 3}
    train("--task", "arithmetic", "--method", "gfn", "--model", str(model_dir), "--output-dir", str(run),
          "--worked-file", str(worked), "--train-file", str(plain), "--test-file", str(plain), "--seed-rationales", "2",
          "--reward-shots", "2", "--max-len", "24", "--min-len", "2", "--eval-samples", "2", "--eval-max-len", "6",
          "--answer-max-tokens", "3", "--steps", "1", "--queries-per-step", "2", "--samples-per-query", "2")
    model, _ = load_model_and_tokenizer(str(model_dir), device="cpu")
    policy = runs_script.evaluation_policy(load_adapter(model, next(run.glob("checkpoints/step-*/adapter"))),
                                           tokenizer, "cpu", options)
    facts = runs_script.trained_run_facts(run, "gfn", 0, 2, 1, 4, {})
    for folder in (run, run / "curve" / "step-1"):
        runs_script.evaluate_all(policy, folder, {3: plain}, options, "gfn", facts)
    return {"": [root / "out"], "curve": [run]}


def prompts_run(root: Path, monkeypatch) -> TablePaths:
    monkeypatch.syspath_prepend(str(root))
    (root / "contract_rewards.py").write_text(textwrap.dedent('''
        def digits(prompts, completions, **kwargs):
            return [sum(c.isdigit() for c in text) for text in completions]
    '''))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("12", "3+4", "5-")))
    monkeypatch.setitem(sys.modules, "contract_rewards", None)  # records it absent: dropped again when the test ends
    del sys.modules["contract_rewards"]
    train("--task", "prompts", "--data", str(root / "prompts.jsonl"), "--reward", "contract_rewards:digits",
          "--model", str(save_tiny_model(root / "tiny", make_char_tokenizer())), *ONE_STEP, "--max_len", "3",
          "--eval_prompts", "2", "--eval_samples", "2", "--output-dir", str(root / "gfn"))
    return {"": [root / "gfn"]}


TINY_RUNS: dict[str, Callable[..., TablePaths]] = {
    "random-number": random_number_run, "continuation": continuation_runs, "infilling": infilling_runs,
    "subjectivity": subjectivity_runs, "arithmetic": arithmetic_runs, "prompts": prompts_run,
}


def _script_module(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_registered_task_has_a_tiny_run_here():
    assert sorted(TINY_RUNS) == sorted(REPORTS), "add the new task's tiny run to TINY_RUNS"


@pytest.mark.parametrize("name", sorted(TINY_RUNS))
def test_every_results_table_and_figure_renders_from_a_tiny_run(name, tmp_path, monkeypatch):
    paths = TINY_RUNS[name](tmp_path, monkeypatch)
    tables = REPORTS[name].results_tables()
    assert sorted(paths) == sorted(tables), "a tiny run for every table the report declares"
    for table_name, table in tables.items():
        markdown = table.build(paths[table_name]).splitlines()
        assert markdown[1].startswith("|---") and len(markdown) >= 3, (table_name, markdown)  # a header and rows
        cells = [len(re.findall(r"(?<!\\)\|", line)) for line in markdown]  # unescaped "|": one per cell border
        assert len(set(cells)) == 1, (table_name, markdown)
        if table.draw is not None:
            png = table.draw(paths[table_name], tmp_path / f"{table_name or 'table'}.png")
            assert png.read_bytes()[:4] == b"\x89PNG"

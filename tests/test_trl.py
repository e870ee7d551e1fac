"""Side by side with TRL: a TRL reward as ours, a user's task from the command line, GRPO through TRL's trainer,
run tracking, and the bench against TRL's step."""

from __future__ import annotations

import itertools
import json
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from conftest import make_char_tokenizer, save_tiny_model

from gfnlm.cli import main
from gfnlm.rewards import RewardError, from_trl
from gfnlm.runlog import read_logged_metrics
from gfnlm.trajectories import Query, TrajectoryRecord, Trajectories

REWARDS = '''
def digit_sum(prompts, completions, completion_ids=None, bonus=None, **kwargs):
    """TRL's signature: one float per completion; the 'bonus' column of the data arrives as a list."""
    return [sum(int(c) for c in text if c.isdigit()) / 10 + (b or 0) for text, b in zip(completions, bonus)]

def too_few(prompts, completions, **kwargs):
    return []

def broken(prompts, completions, **kwargs):
    raise KeyError("answer")
'''


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    """A folder as a user would have it: a reward module, prompts with an extra column, a tiny model."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(REWARDS))
    rows = [{"prompt": p, "bonus": b} for p, b in [("12", 0.5), ("3+4", 0.0), ("5-", 1.0), ("67", 0.0)]]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_tiny_model(tmp_path / "tiny", make_char_tokenizer())
    yield tmp_path
    sys.modules.pop("my_rewards", None)


def _batch(tokenizer):
    query = Query("12", meta={"bonus": 1.0})
    ids = tokenizer("34", add_special_tokens=False)["input_ids"]
    return Trajectories.from_records([TrajectoryRecord(query, [1, 4, 5], ids, [True, True])], pad_token_id=0)


def test_a_trl_reward_sees_what_trl_passes_for_every_prefix(tokenizer):
    seen = {}

    def spy(prompts, completions, completion_ids, bonus, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, bonus=bonus, rest=kwargs)
        return [float(len(c)) for c in completions]

    log_r = from_trl(spy, tokenizer)(_batch(tokenizer))
    assert seen["prompts"] == ["12"] * 3 and seen["completions"] == ["", "3", "34"] and seen["bonus"] == [1.0] * 3
    assert seen["completion_ids"] == [[], [6], [6, 7]] and seen["rest"] == {}
    assert log_r.tolist() == [[0.0, 1.0, 2.0]]
    as_r = from_trl(lambda prompts, completions, **kw: [2.0] * len(completions), tokenizer, log_space=False)
    torch.testing.assert_close(as_r(_batch(tokenizer)), torch.full((1, 3), 2.0).log())


def test_a_trl_reward_may_skip_completions_only_with_a_value_for_them(tokenizer):
    skip_empty = lambda prompts, completions, **kw: [None if not c else 1.0 for c in completions]  # noqa: E731
    assert from_trl(skip_empty, tokenizer, missing=-20.0)(_batch(tokenizer)).tolist() == [[-20.0, 1.0, 1.0]]
    with pytest.raises(RewardError, match="returned None for the completion ''"):
        from_trl(skip_empty, tokenizer)(_batch(tokenizer))
    with pytest.raises(RewardError, match="returned 1 rewards for 3 texts"):
        from_trl(lambda prompts, completions, **kw: [0.0], tokenizer)(_batch(tokenizer))


def _train(*extra):
    return main(["train", "--task", "prompts", "--data", "prompts.jsonl", "--model", "tiny", "--steps", "2",
                 "--queries_per_step", "2", "--samples_per_query", "4", "--max_len", "4", "--lora_rank", "2",
                 "--eval_prompts", "2", "--eval_samples", "3", "--progress", "false", *extra])


@pytest.mark.parametrize("method", ["gfn", "grpo"])
def test_a_users_prompts_and_trl_reward_train_and_evaluate_from_the_command_line(user_files, method, capsys):
    assert _train("--reward", "my_rewards:digit_sum", "--method", method, "--output-dir", "run") == 0
    rows = read_logged_metrics(user_files / "run")
    assert [r["step"] for r in rows] == [1, 2] and all("loss" in r and r["step_time_s"] > 0 for r in rows)
    assert (user_files / "run" / "checkpoints").is_dir()
    result = json.loads((user_files / "run" / "eval.json").read_text())
    assert result["n_prompts"] == 2 and 1 <= result["distinct"] <= 3 and result["train_steps"] == 2
    # the run's adapter evaluates as any run's does
    assert main(["eval", "--task", "prompts", "--adapter", "run", "--output-dir", "again"]) == 0
    again = json.loads((user_files / "again" / "eval.json").read_text())
    assert again["reward_mean"] == pytest.approx(result["reward_mean"])


def test_grpo_trains_for_its_time_limit_in_all_across_a_resume(user_files, monkeypatch):
    import gfnlm.baselines.grpo as grpo_module

    clock = itertools.count(0, 25)  # every reading of grpo.py's clock is 25 s later: each step takes 25 s
    monkeypatch.setattr(grpo_module, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    limited = ("--reward", "my_rewards:digit_sum", "--method", "grpo", "--output-dir", "run", "--steps", "20",
               "--save_every", "1", "--time_limit_minutes", "1.0")
    assert _train(*limited) == 0
    first = read_logged_metrics(user_files / "run")
    seconds = [r["step_time_s"] for r in first]
    assert sum(seconds) >= 60 > sum(seconds[:-1]) and len(first) < 20  # stopped by the limit
    assert _train(*limited, "--resume") == 0  # the limit is spent: no further step, the same adapter evaluated
    assert read_logged_metrics(user_files / "run") == first
    assert json.loads((user_files / "run" / "eval.json").read_text())["train_steps"] == len(first)
    assert _train(*limited[:-1], "2.0", "--resume") == 0  # a larger limit goes on
    longer = read_logged_metrics(user_files / "run")
    assert len(first) < len(longer) < 20 and sum(r["step_time_s"] for r in longer) >= 120


@pytest.mark.parametrize("reward, data, message", [
    ("no_such_module:f", "prompts.jsonl", "cannot import module 'no_such_module'"),
    ("my_rewards:nothing", "prompts.jsonl", "module 'my_rewards' has no function 'nothing'"),
    ("my_rewards", "prompts.jsonl", "expected module:function"),
    ("my_rewards:too_few", "prompts.jsonl", "returned 0 values for one completion"),
    ("my_rewards:broken", "prompts.jsonl", "raised KeyError on the first prompt"),
    ("my_rewards:digit_sum", "no_prompt.jsonl", "no 'prompt' column"),
])
def test_bad_input_is_one_clear_error_and_nothing_is_written(user_files, reward, data, message, capsys):
    (user_files / "no_prompt.jsonl").write_text(json.dumps({"text": "12"}) + "\n")
    code = main(["train", "--task", "prompts", "--data", data, "--reward", reward, "--model", "tiny",
                 "--output-dir", "run"])
    error = capsys.readouterr().err
    assert code != 0 and error.startswith("gfnlm: error: ") and len(error.strip().splitlines()) == 1
    assert message in error, error
    assert not (user_files / "run").exists()


def test_arithmetic_keeps_ppo_because_trl_cannot_insert_the_calculators_tokens():
    from gfnlm.tasks import get_task

    assert "grpo" not in get_task("arithmetic").train_methods
    assert all("grpo" in get_task(name).train_methods for name in ("random-number", "continuation", "infilling",
                                                                  "subjectivity", "prompts"))


def test_tensorboard_receives_the_metrics_of_metrics_jsonl(user_files):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert _train("--reward", "my_rewards:digit_sum", "--output-dir", "run", "--report_to", "tensorboard") == 0
    scalar_folders = [folder for folder in {event.parent for event in (user_files / "run").rglob("events.out.tfevents.*")}
                      if EventAccumulator(str(folder)).Reload().Tags()["scalars"]]  # the run's config sits apart
    assert len(scalar_folders) == 1
    scalars = EventAccumulator(str(scalar_folders[0])).Reload()
    logged = read_logged_metrics(user_files / "run")
    for key in ("loss", "log_reward_mean", "samples_per_s"):
        written = [(e.step, e.value) for e in scalars.Scalars(key)]
        assert written == [(row["step"], pytest.approx(row[key], rel=1e-5)) for row in logged], key


def test_bench_against_trl_writes_both_rates_and_their_ratio(user_files):
    from gfnlm.bench import BenchSettings, run_bench

    output = user_files / "peer.json"
    run_bench(BenchSettings(model="tiny", task="random-number", peer="trl-grpo", queries=2, samples=2, max_len=3,
                            lora_rank=2, warmup=0, repeats=1, output=str(output)), echo=lambda line: None)
    result = json.loads(output.read_text())
    assert result["ours"]["samples_per_s"] > 0 and result["peer"]["samples_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["ours"]["samples_per_s"] / result["peer"]["samples_per_s"])
    assert result["peer"]["trl_version"].count(".") >= 1

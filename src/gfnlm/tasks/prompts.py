"""A user's own task from the command line: prompts from a file or dataset, a reward written for TRL.

    gfnlm train --task prompts --data FILE_OR_DATASET --reward my_module:my_reward [--method gfn|grpo] --output-dir DIR
    gfnlm eval  --task prompts --data FILE_OR_DATASET --reward my_module:my_reward --adapter DIR

The data is a JSON / JSON-lines file or a Hugging Face dataset with a ``prompt`` column; its other
columns reach the reward as TRL passes them (``gfnlm.rewards.TRLReward``). The reward is a function
``f(prompts, completions, **columns) -> list[float | None]`` named as ``module:function`` (the module
importable from the current folder or the Python path). Everything is checked when the task is
built, before a run writes anything: the data, the ``prompt`` column, the function's import, and one
call of it on the first prompt, which must return one value.
"""

from __future__ import annotations

import importlib
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from gfnlm.config import setting
from gfnlm.data import read_rows, row_name
from gfnlm.metrics import embedding_diversity
from gfnlm.policy import Policy
from gfnlm.rewards import RewardError, TRLReward, terminal_log_rewards
from gfnlm.tasks.base import Task, TaskOptions
from gfnlm.trajectories import ActionSpace, Query


@dataclass
class PromptsOptions(TaskOptions):
    data: str | None = setting(None, "Prompts: a JSON / JSON-lines file or a Hugging Face dataset with a 'prompt' "
                                     "column; the other columns reach the reward.")
    split: str = setting("train", "The dataset's split, for a Hugging Face dataset.")
    reward: str | None = setting(None, "The reward function as module:function, TRL's signature: "
                                       "f(prompts, completions, **columns) -> list[float | None].")
    log_space: bool = setting(True, "The function returns log R (true) or R > 0 (false).")
    missing_log_reward: float | None = setting(
        None, "log R of a completion the function scores None (TRL's 'does not apply'); without it a None is an error.")
    max_len: int = setting(32, "Most tokens of a completion; the stop is forced after them.")
    min_len: int = setting(1, "Fewest tokens before the policy may stop.")
    eval_prompts: int = setting(20, "Prompts evaluated (the first ones of the data).")
    eval_samples: int = setting(8, "Completions per evaluated prompt.")
    eval_seed: int = setting(0, "Seed of the evaluation samples.")
    encoder: str = setting("all-MiniLM-L6-v2", "Sentence encoder of the diversity metric (gfnlm.encoders).")

    def validate(self) -> None:
        """The data and the reward function load, and the function scores the first prompt."""
        self.load()

    def load(self) -> tuple[list[Query], Callable]:
        """The prompts and the reward function, checked (``validate``): the task's inputs, read once."""
        super().validate()
        if self.data is None or self.reward is None:
            raise ValueError("--task prompts needs --data FILE_OR_DATASET and --reward module:function")
        if self.eval_samples < 2:
            raise ValueError("eval_samples must be at least 2 (the diversity compares samples)")
        queries, function = load_prompts(self.data, self.split), load_reward_function(self.reward)
        check_reward(function, self.reward, queries[0])
        return queries, function


def load_reward_function(spec: str) -> Callable:
    """The function ``module:function`` names; the current folder is on the path, as for ``python -m``."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"--reward {spec!r}: expected module:function, e.g. my_rewards:length_reward")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise ValueError(f"--reward {spec!r}: cannot import module {module_name!r} "
                         f"({type(error).__name__}: {error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"--reward {spec!r}: module {module_name!r} has no function {function_name!r}")
    return function


def load_prompts(source: str, split: str) -> list[Query]:
    """One query a row: its ``prompt``, its other columns in ``meta``."""
    rows = read_rows(source, split)
    queries = []
    for index, row in enumerate(rows):
        if "prompt" not in row:
            raise ValueError(f"{row_name(source, index)}: no 'prompt' column (columns: {', '.join(row) or 'none'})")
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise ValueError(f"{row_name(source, index)}: 'prompt' must be a non-empty text, got {row['prompt']!r}")
        queries.append(Query(row["prompt"], meta={k: v for k, v in row.items() if k != "prompt"}))
    return queries


def check_reward(function: Callable, spec: str, query: Query) -> None:
    """One call on ``query`` with an empty completion: the function must run and give one value."""
    try:
        values = list(function(prompts=[query.prompt], completions=[""], completion_ids=[[]],
                               **{key: [value] for key, value in query.meta.items()}))
    except Exception as error:
        raise RewardError(f"the reward function {spec} raised {type(error).__name__} on the first "
                          f"prompt: {error}") from None
    if len(values) != 1:
        raise RewardError(f"the reward function {spec} returned {len(values)} values for one "
                          "completion; it must return one per completion")


class PromptsTask(Task):
    name = "prompts"
    Options = PromptsOptions
    options: PromptsOptions
    summary_keys = ("reward_mean", "diversity", "distinct", "mean_length")
    train_methods = ("gfn", "grpo", "ppo")

    def __init__(self, options: PromptsOptions, tokenizer):
        super().__init__(options, tokenizer)
        self.queries, self.function = options.load()

    def train_queries(self) -> list[Query]:
        return self.queries

    def action_space(self) -> ActionSpace:
        from gfnlm.models import stop_token_ids

        return ActionSpace(stop_token_ids(self.tokenizer), self.options.max_len, self.options.min_len)

    def reward(self, policy: Policy) -> TRLReward:
        return TRLReward(self.function, self.tokenizer, self.options.log_space, self.options.missing_log_reward)

    def evaluate(self, policy: Policy, output_dir: Path | None = None, label: str = "model") -> dict:
        from gfnlm.encoders import embed

        o = self.options
        queries = self.queries[: o.eval_prompts]
        generator = torch.Generator().manual_seed(o.eval_seed)
        traj = policy.sample([q for q in queries for _ in range(o.eval_samples)], 1.0, generator)
        log_r = terminal_log_rewards(self.reward(policy), traj).tolist()
        texts = traj.generated_texts(self.tokenizer)
        per_prompt = []
        for i, query in enumerate(queries):
            rows = slice(i * o.eval_samples, (i + 1) * o.eval_samples)
            vectors = embed([t if t.strip() else "(empty)" for t in texts[rows]], o.encoder)
            per_prompt.append({"prompt": query.prompt, "diversity": embedding_diversity(vectors),
                               "distinct": len(set(texts[rows])), "samples": texts[rows], "log_rewards": log_r[rows]})
        result = {
            "label": label,
            "reward_mean": statistics.mean(log_r),
            "diversity": statistics.mean(p["diversity"] for p in per_prompt),
            "distinct": statistics.mean(p["distinct"] for p in per_prompt),
            "mean_length": float(traj.lengths.float().mean()),
            "n_prompts": len(queries),
            "eval_samples": o.eval_samples,
            "reward_function": o.reward,
            "data": o.data,
        }
        if output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "samples.jsonl").write_text("".join(json.dumps(p) + "\n" for p in per_prompt))
        return result

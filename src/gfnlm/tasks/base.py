"""What a task supplies to the one engine: queries, action space, reward, optional tool and seeds.

A task never samples or computes a loss itself; the trainer and the baselines do that for every
task alike. Its options are a dataclass (``Options``) whose fields are documented like the
trainer's, so they can be set from YAML or ``--key value``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from gfnlm.config import setting
from gfnlm.rewards import Reward
from gfnlm.sampling import ToolHook
from gfnlm.trajectories import ActionSpace, Query, TrajectoryRecord


@dataclass
class TaskOptions:
    """Options shared by every task (subclasses add their own)."""


def likelihood_weight_setting(why: str) -> float:
    """The option v of a posterior reward R = p(Z | X) p(Y | X Z)^v (``LMSuffixReward``), for tasks that expose it."""
    return setting(1.0, f"Weight v of log p(Y | X Z) in the reward, R = p(Z | X) p(Y | X Z)^v: 1 is the paper's "
                        f"posterior; {why}")


class Task(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[TaskOptions]] = TaskOptions
    summary_keys: ClassVar[tuple[str, ...]] = ()
    """Metrics of ``evaluate`` shown in the command line's tables."""

    def __init__(self, options: TaskOptions, tokenizer):
        self.options, self.tokenizer = options, tokenizer

    @abstractmethod
    def train_queries(self) -> list[Query]:
        """The inputs X (and Y) the policy is trained on."""

    @abstractmethod
    def action_space(self) -> ActionSpace:
        """Stop tokens, length limits and allowed tokens of the policy."""

    @abstractmethod
    def reward(self, model) -> Reward:
        """log R for every prefix; ``model`` is the policy (LM rewards switch its adapter off)."""

    @classmethod
    def method_settings(cls, method: str, settings: dict[str, Any]) -> dict[str, Any]:
        """The task's defaults for a method ("gfn", "sft", "prompting", ...), below the user's ``settings``.

        E.g. the paper's schedule for this task, or the option that makes its evaluation fit the method.
        """
        return {}

    def tool(self) -> ToolHook | None:
        return None

    def seed_records(self, model, generator: torch.Generator) -> list[TrajectoryRecord]:
        """Known-good trajectories to put in the replay buffer before training. ``model`` is the
        policy, for tasks that propose seeds by prompting its base model (adapter switched off);
        ``generator`` (seeded with the training seed) draws any such samples."""
        return []

    def sft_examples(self, n: int, generator: torch.Generator) -> list[TrajectoryRecord]:
        """``n`` target trajectories for the supervised fine-tuning baseline."""
        raise NotImplementedError(f"task {self.name!r} has no data for supervised fine-tuning")

    @classmethod
    def figures(cls, results: list[dict], output_dir: Path) -> list[Path]:
        """Write the task's figures for one or more evaluated models (from their eval.json); returns paths."""
        return []

    @abstractmethod
    def evaluate(self, model, output_dir: Path | None, label: str) -> dict:
        """The task's metrics for ``model`` (its adapter on, if any)."""

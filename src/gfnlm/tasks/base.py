"""What a task supplies to the one engine: data, prompt format, action space, reward, metrics.

A task never samples or computes a loss itself; the trainer and the baselines do that for every
task alike. Everything the command line and the trainer need to know about a task is declared
here, on the task's class, so that a new task is one file under ``tasks/`` and one line in
``tasks/__init__.py`` (docs/design.md, "Adding a task"); its figures, results tables and row of the
README's results table are its report's (``gfnlm.reports``), which no task imports. Its options are
a dataclass (``Options``) whose fields are documented like the trainer's, so they can be set from
YAML or ``--key value``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from gfnlm.config import TrainConfig, setting
from gfnlm.policy import Policy
from gfnlm.rewards import Reward
from gfnlm.sampling import ToolHook
from gfnlm.trajectories import ActionSpace, Query, TrajectoryRecord

if TYPE_CHECKING:
    from gfnlm.baselines.ppo import PPOConfig
    from gfnlm.trainer import Trainer


@dataclass
class TaskOptions:
    """Options every task has (a task redeclares them with its own defaults and adds its own)."""

    max_len: int = setting(20, "Most actions (tokens) a trajectory writes; the stop is forced after them.")
    min_len: int = setting(0, "Fewest actions before the policy may stop.")
    eval_samples: int = setting(8, "Samples drawn per query in evaluation.")

    def validate(self) -> None:
        """Raise ``ValueError`` for options that cannot work; called before the model loads, so a typo
        costs no model load. A task that adds checks (without a tokenizer) calls this one first."""
        if self.max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {self.max_len}")
        if not 0 <= self.min_len <= self.max_len:
            raise ValueError(f"min_len must be between 0 and max_len ({self.max_len}), got {self.min_len}")
        if self.eval_samples < 1:
            raise ValueError(f"eval_samples must be at least 1, got {self.eval_samples}")


def likelihood_weight_setting(why: str) -> float:
    """The option v of a posterior reward R = p(Z | X) p(Y | X Z)^v (``LMSuffixReward``), for tasks that expose it."""
    return setting(1.0, f"Weight v of log p(Y | X Z) in the reward, R = p(Z | X) p(Y | X Z)^v: 1 is the paper's "
                        f"posterior; {why}")


class Task(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[TaskOptions]] = TaskOptions
    summary_keys: ClassVar[tuple[str, ...]] = ()
    """Metrics of ``evaluate`` shown in the command line's tables."""
    train_methods: ClassVar[tuple[str, ...]] = ("gfn", "sft", "ppo", "grpo")
    """Methods ``gfnlm train`` accepts; ``trainer`` builds each (a task adds its own by overriding it)."""
    eval_methods: ClassVar[tuple[str, ...]] = ()
    """Methods ``gfnlm eval`` accepts beyond the trained ones: baselines that evaluate the base model
    without an adapter (prompting, decoding rules). ``method_settings`` turns each into options."""
    DataOptions: ClassVar[type | None] = None
    """Settings of ``gfnlm data TASK`` (a dataclass like ``Options``), for tasks that generate data files."""

    def __init__(self, options: TaskOptions, tokenizer):
        self.options, self.tokenizer = options, tokenizer

    # ----------------------------------------------------------------- the engine's inputs
    @abstractmethod
    def train_queries(self) -> list[Query]:
        """The inputs X (and Y) the policy is trained on."""

    @abstractmethod
    def action_space(self) -> ActionSpace:
        """Stop tokens, length limits and allowed tokens of the policy."""

    @abstractmethod
    def reward(self, policy: Policy) -> Reward:
        """log R for every prefix; LM rewards run ``policy``'s model with its adapter switched off."""

    @classmethod
    def method_settings(cls, method: str, settings: dict[str, Any]) -> dict[str, Any]:
        """The task's defaults for a method ("gfn", "sft", "prompting", ...), below the user's ``settings``.

        E.g. the paper's schedule for this task, or the option that makes its evaluation fit the method.
        """
        return {}

    def prepare_base_model(self, model):
        """The base model the task works with, from the one loaded by name (default: that model).

        Called once, before training or evaluation; everything that runs "the base model" (LM
        rewards, prompting baselines, the policy's starting point) then runs what this returns.
        """
        return model

    def tool(self) -> ToolHook | None:
        return None

    def seed_records(self, policy: Policy, generator: torch.Generator) -> list[TrajectoryRecord]:
        """Known-good trajectories to put in the replay buffer before training. ``policy`` is there
        for tasks that propose seeds by prompting its base model (adapter switched off);
        ``generator`` (seeded with the training seed) draws any such samples."""
        return []

    def sft_examples(self, n: int, generator: torch.Generator) -> list[TrajectoryRecord]:
        """``n`` target trajectories for the supervised fine-tuning baseline."""
        raise NotImplementedError(f"task {self.name!r} has no data for supervised fine-tuning")

    def policy(self, model, config: TrainConfig) -> Policy:
        """``model`` as this task's policy: its action space and tool, ``config``'s device, precision and
        decoding settings."""
        return Policy.from_config(model, self.tokenizer, self.action_space(), config, self.tool())

    def trainer(self, method: str, policy: Policy, config: TrainConfig, ppo: PPOConfig, output_dir: Path | None) -> Trainer:
        """The trainer of ``method`` on this task's ``policy``: GFlowNet fine-tuning (its buffer seeded), SFT, PPO or
        GRPO (TRL's trainer, ``gfnlm.baselines.grpo``).

        A task with a method of its own (EM's M-step, a reward model to fine-tune) overrides this
        for that method and calls ``super().trainer`` for the rest.
        """
        from gfnlm.baselines.ppo import PPOTrainer
        from gfnlm.baselines.sft import SFTTrainer
        from gfnlm.gflownet import GFlowNetTrainer

        queries = self.train_queries()
        if method == "gfn":
            trainer = GFlowNetTrainer(policy, self.reward(policy), queries, config, output_dir)
            if trainer.latest_checkpoint() is None:  # a resumed run gets its buffer back from the checkpoint
                seeds = self.seed_records(policy, torch.Generator().manual_seed(config.seed))
                if seeds:
                    trainer.seed_buffer(seeds)
            return trainer
        if method == "ppo":
            return PPOTrainer(policy, self.reward(policy), queries, config, ppo, output_dir)
        if method == "sft":
            return SFTTrainer(policy, self.sft_examples, config, output_dir)
        if method == "grpo":
            from gfnlm.baselines.grpo import GRPOBaseline

            return GRPOBaseline(policy, self.reward(policy), queries, config, output_dir)
        raise ValueError(f"task {self.name!r} cannot train with method {method!r}; methods: {', '.join(self.train_methods)}")

    # ----------------------------------------------------------------- evaluation
    @abstractmethod
    def evaluate(self, policy: Policy, output_dir: Path | None, label: str) -> dict:
        """The task's metrics for ``policy`` (its adapter on, if any), over the task's action space."""

    def eval_label(self, method: str, adapter: str | None) -> str:
        """How ``gfnlm eval`` names the evaluated model in tables and figures."""
        if method == "prompting":
            return f"{getattr(self.options, 'shots', 0)}-shot prompting"  # tasks with k-shot prompts declare shots
        return method if adapter or method in self.eval_methods else "base"

    @classmethod
    def make_data(cls, options: Any) -> list[dict]:
        """The rows ``gfnlm data TASK`` writes, from ``DataOptions`` settings."""
        raise NotImplementedError(f"task {cls.name!r} generates no data files")

"""Supervised fine-tuning (LoRA): maximise log q(Z ⊤ | X) of given target trajectories.

The likelihood is the policy's own (``score_policy``), so SFT trains exactly the distribution
the sampler draws from, stop token included.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from gfnlm.config import TrainConfig
from gfnlm.scoring import terminal_log_prob
from gfnlm.trainer import Trainer
from gfnlm.policy import Policy
from gfnlm.trajectories import TrajectoryRecord, Trajectories

DrawExamples = Callable[[int, torch.Generator], Sequence[TrajectoryRecord]]
"""``draw(n, generator)`` -> n target trajectories (e.g. samples from the target distribution)."""


class EpochDraws:
    """A ``DrawExamples`` over a fixed dataset in epochs: each pass visits every record once, in an order drawn
    from the generator, so that ``k * len(records)`` draws are k epochs (uniform draws would miss about a third of
    the records in one epoch's worth). ``SFTTrainer`` checkpoints the pass in progress, so a resumed run draws
    what the uninterrupted one would have. Each process of a multi-process run makes its own passes."""

    def __init__(self, records: Sequence[TrajectoryRecord]):
        if not records:
            raise ValueError("no records to fine-tune on")
        self.records, self.pass_left = list(records), []

    def __call__(self, n: int, generator: torch.Generator) -> list[TrajectoryRecord]:
        picks: list[int] = []
        while len(picks) < n:
            if not self.pass_left:
                self.pass_left = torch.randperm(len(self.records), generator=generator).tolist()
            take = min(n - len(picks), len(self.pass_left))
            picks += self.pass_left[:take]
            del self.pass_left[:take]
        return [self.records[i] for i in picks]

    def state_dict(self) -> dict:
        return {"pass_left": torch.tensor(self.pass_left, dtype=torch.long)}

    def load_state_dict(self, state: dict) -> None:
        self.pass_left = state["pass_left"].tolist()


class SFTTrainer(Trainer):
    name = "sft"

    def __init__(self, policy: Policy, draw_examples: DrawExamples, config: TrainConfig | None = None, output_dir=None):
        super().__init__(policy, config, output_dir)
        self.draw_examples = draw_examples
        self.build_optimizer()

    def rank_state(self) -> dict:
        state = super().rank_state()
        if isinstance(self.draw_examples, EpochDraws):  # the pass in progress
            state["epoch_draws"] = self.draw_examples.state_dict()
        return state

    def load_rank_state(self, state: dict) -> None:
        super().load_rank_state(state)
        if isinstance(self.draw_examples, EpochDraws) and "epoch_draws" in state:  # older checkpoints: a fresh pass
            self.draw_examples.load_state_dict(state["epoch_draws"])

    def train_step(self) -> dict:
        c = self.config
        start = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses, n_samples, finite = [], 0, True
        for k in range(c.grad_accum):
            records = list(self.draw_examples(c.queries_per_step * c.samples_per_query, self.generator))
            traj = Trajectories.from_records(records, self.pad_id, self.device)
            with self.ranks.no_sync(self.scorer, skip=k < c.grad_accum - 1):
                with self.accelerator.autocast():
                    loss = -terminal_log_prob(*self.score(traj), traj.lengths).mean()
                ok = bool(torch.isfinite(loss))
                self.backward((loss if ok else self.zero_loss()) / c.grad_accum)
            finite &= ok
            losses.append(loss.item())
            n_samples += len(records)
        updated, grad_norm = self.apply_gradients(finite)
        return self.finish_step({"loss": sum(losses) / len(losses), "grad_norm": grad_norm}, updated, n_samples, start)

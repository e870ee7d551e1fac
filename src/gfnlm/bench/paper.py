"""The paper-path harness: our step and the paper's reference step (``gfnlm.bench.reference``) on one trainer, and
the check that both compute the same loss on the same trajectories."""

from __future__ import annotations

import time

import torch

from gfnlm.bench.measure import _sync
from gfnlm.bench.reference import per_prefix_suffix_rewards, sample_with_grad
from gfnlm.gflownet import GFlowNetTrainer, MicroBatch
from gfnlm.losses import modified_subtb_loss
from gfnlm.modes import adapter_disabled, eval_mode
from gfnlm.rewards import LMSuffixReward
from gfnlm.sampling import encode_prompts
from gfnlm.trajectories import Query

EQUALITY_TOLERANCE = 1e-4


class StepPaths:
    """Our step and the reference step on one trainer (same model, LoRA, optimizer, reward, queries)."""

    def __init__(self, trainer: GFlowNetTrainer, queries: list[Query], samples: int, seed: int):
        if not isinstance(trainer.reward, LMSuffixReward):
            raise ValueError("the reference path reproduces suffix rewards (LMSuffixReward); this trainer's "
                             f"reward is {type(trainer.reward).__name__}")
        self.trainer, self.samples = trainer, samples
        self.queries = queries
        self.generator = torch.Generator().manual_seed(seed)
        reward = trainer.reward
        self.context_ids = list(reward.context.ids) if reward.context is not None else []
        tok = trainer.policy.tokenizer
        self.suffix_ids = {q.key: tok(reward.suffix(q), add_special_tokens=False)["input_ids"] for q in queries}
        self.prompt_ids = dict(zip((q.key for q in queries), encode_prompts(tok, queries)))

    def rows(self) -> list[Query]:
        return [q for q in self.queries for _ in range(self.samples)]

    # ours
    def sample(self):
        return self.trainer.policy.sample(self.rows(), generator=self.generator)

    def loss(self, traj, log_r) -> torch.Tensor:
        return self.trainer.objective(MicroBatch(traj, log_r, torch.ones(len(traj), dtype=torch.bool)), 1.0)

    def fast_step(self) -> None:
        t = self.trainer
        t.model.train()
        t.optimizer.zero_grad(set_to_none=True)
        traj = self.sample()
        self.loss(traj, t.reward(traj)).backward()
        t.optimizer.step()

    # reference
    def reference_terms(self, query: Query, forced=None) -> list[torch.Tensor]:
        """log P_F, log P_⊤, log R, lengths and log Z of ``samples`` trajectories of one query, the paper's way."""
        t = self.trainer
        records, log_pf, log_pterm = sample_with_grad(
            t.model, self.prompt_ids[query.key], self.samples, t.space, t.policy.tool, query, self.generator, forced)
        with adapter_disabled(t.model), eval_mode(t.model):
            log_r = per_prefix_suffix_rewards(t.model, records, self.suffix_ids[query.key], self.context_ids)
        lengths = torch.tensor([sum(r.is_action) for r in records], device=log_pf.device)
        log_z = t.log_z.values[t.query_index[query.key]].expand(len(records))
        return [log_pf, log_pterm, log_r, lengths, log_z]

    def subtb(self, log_pf, log_pterm, log_r, lengths, log_z) -> torch.Tensor:
        t = self.trainer
        return modified_subtb_loss(log_pf, log_pterm, log_r, lengths, t.config.subtb_lambda, log_z=log_z,
                                   min_len=t.space.min_len)

    def reference_step(self) -> None:
        t = self.trainer
        t.model.train()
        t.optimizer.zero_grad(set_to_none=True)
        for query in self.queries:  # one query per batch
            (self.subtb(*self.reference_terms(query)) / len(self.queries)).backward()
        t.optimizer.step()

    def check_equal(self) -> tuple[float, float, float]:
        """Both losses on the same trajectories; raises if they differ. The reference side then
        finishes its step (backward, update), timed: returns (ours, reference, reference step seconds)."""
        t = self.trainer
        t.model.eval()  # dropout off: both paths must see the same function
        traj = self.sample()
        with torch.no_grad():
            fast = float(self.loss(traj, t.reward(traj)))
        records = traj.records()
        device = t.device
        _sync(device)
        start = time.perf_counter()
        t.optimizer.zero_grad(set_to_none=True)
        groups = [self.reference_terms(q, forced=records[i * self.samples : (i + 1) * self.samples])
                  for i, q in enumerate(self.queries)]
        loss = self.subtb(*(_pad_cat([g[k] for g in groups]) for k in range(5)))
        loss.backward()
        t.optimizer.step()
        _sync(device)
        seconds = time.perf_counter() - start
        ref = float(loss.detach())
        if abs(fast - ref) > EQUALITY_TOLERANCE * max(1.0, abs(ref)):
            raise AssertionError(f"our loss {fast:.6f} differs from the reference loss {ref:.6f} on the same trajectories")
        return fast, ref, seconds


def _pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [n_i, T_i] (or [n_i]) tensors along rows, zero-padding the time axis."""
    if tensors[0].ndim == 1:
        return torch.cat(tensors)
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors])

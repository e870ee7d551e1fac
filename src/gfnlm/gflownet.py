"""GFlowNet fine-tuning: the method's step on the shared loop (``gfnlm.trainer.Trainer``).

One optimizer step, top to bottom (``GFlowNetTrainer.train_step``), each part once:

1. For each of ``grad_accum`` micro-batches, draw ``queries_per_step`` queries and, per query,
   a source for its ``samples_per_query`` trajectories (``source``): the replay buffer, the base
   model (LoRA off), the tempered policy (temperature uniform in [pf_temp_min, pf_temp_max]) or
   the policy itself.
2. Sample all policy trajectories of the micro-batch in one batched, KV-cached call (no grad)
   (``draw_trajectories``).
3. Score every prefix's log-reward in one pass (no grad; ``reward_batch``), and its terminal value once.
4. One teacher-forced forward pass of the policy gives log P_F and log P_⊤ with gradients; queries
   seen for the first time get their log Z estimate from it (``objective``).
5. Loss (modified SubTB, TB or DB; ``loss``, a pure function of its inputs), backward scaled by
   1/grad_accum; new samples enter the buffer.
6. Clip, step, schedule (the ``Trainer`` base class, shared with the SFT and PPO baselines). A
   non-finite loss or gradient skips the update.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from gfnlm.buffer import ReplayBuffer
from gfnlm.config import TrainConfig
from gfnlm.losses import detailed_balance_loss, modified_subtb_loss, trajectory_balance_loss
from gfnlm.modes import adapter_disabled, eval_mode
from gfnlm.policy import Policy
from gfnlm.rewards import Reward, compute_log_rewards, terminal_log_rewards, terminal_values
from gfnlm.sampling import text_records
from gfnlm.scoring import terminal_log_prob
from gfnlm.trainer import Trainer
from gfnlm.trajectories import Query, TrajectoryRecord, Trajectories

logger = logging.getLogger("gfnlm")


class PerQueryLogZ(torch.nn.Module):
    """log Z of each training query: one scalar parameter per query, not one [N] vector.

    A query absent from a batch then has no gradient, and Adam skips it, moments and step count
    included. In a shared vector Adam keeps moving every query seen before along its stale momentum
    (about 10 × lr in all after each visit at β1 = 0.9), with no trajectories of its own to correct it.
    """

    def __init__(self, n_queries: int, device: torch.device):
        super().__init__()
        self.values = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros((), device=device)) for _ in range(n_queries))

    def forward(self, index: Tensor) -> Tensor:
        """``index`` [B] query numbers -> [B] their log Z (with gradients only to those queries)."""
        queries, inverse = index.unique(return_inverse=True)
        return torch.stack([self.values[i] for i in queries.tolist()])[inverse]

    def as_tensor(self) -> Tensor:
        """[N] every query's log Z, detached."""
        return torch.stack(list(self.values)).detach()

    @torch.no_grad()
    def set_(self, query: int, value: Tensor | float) -> None:
        self.values[query].fill_(value)

    @torch.no_grad()
    def load_(self, values: Tensor) -> None:
        """Set every query's log Z from ``values`` [N]."""
        for param, value in zip(self.values, values.tolist(), strict=True):
            param.fill_(value)


@dataclass
class MicroBatch:
    """One rewarded micro-batch: its trajectories, their untempered log R and where they came from."""

    traj: Trajectories
    log_r: Tensor  # [B, T+1] untempered log R of every state
    fresh: Tensor  # [B] bool: sampled now (enters the buffer), not replayed

    def __post_init__(self):
        self.log_r_end = terminal_values(self.log_r, self.traj)  # [B] the terminal states', computed once


class GFlowNetTrainer(Trainer):
    """Fine-tunes ``policy`` so that it samples trajectories with probability ∝ ``reward``.

    ``queries`` are the training inputs X; the policy's action space fixes stop tokens, lengths and
    allowed tokens, and its tool may insert context tokens after actions (e.g. a calculator). The
    trainer adds a LoRA adapter to the policy's model (``config.lora_rank``). With ``output_dir`` the
    run writes ``metrics.jsonl`` and checkpoints and can resume.
    """

    name = "gfn"
    progress_keys = ("loss", "log_reward_mean", "samples_per_s")

    def __init__(
        self,
        policy: Policy,
        reward: Reward,
        queries: Sequence[Query],
        config: TrainConfig | None = None,
        output_dir: str | Path | None = None,
    ):
        if not queries:
            raise ValueError("GFlowNetTrainer needs at least one training query")
        if config is not None and config.loss == "db" and policy.space.min_len > 0:
            raise ValueError("detailed balance needs every state to be terminable; use loss subtb or tb with min_len > 0")
        super().__init__(policy, config, output_dir)
        if self.ranks.world > len(queries):
            raise ValueError(f"{self.ranks.world} processes need at least as many training queries, got {len(queries)}: "
                             "each process draws its own")
        self.reward = reward
        self.queries = list(queries)
        self.query_index = {q.key: i for i, q in enumerate(self.queries)}
        self.buffer = ReplayBuffer(self.config.buffer_capacity, self.config.buffer_sampling)
        self.log_z = PerQueryLogZ(len(self.queries), self.device)
        self.log_z_ready = torch.zeros(len(self.queries), dtype=torch.bool, device=self.device)
        self.build_optimizer()

    @property
    def learns_log_z(self) -> bool:
        """TB always learns log Z; SubTB does when s_0 cannot terminate (min_len > 0)."""
        return self.config.loss == "tb" or self.space.min_len > 0

    def extra_parameters(self) -> list[dict]:
        # no weight decay: log Z sits at -5 to -60 for LM rewards, and decay would pull it towards 0
        group = {"params": list(self.log_z.parameters()), "lr": self.config.log_z_lr, "weight_decay": 0.0}
        return [group] if self.learns_log_z else []

    def extra_state(self) -> dict:
        return {"log_z": self.log_z.as_tensor().cpu(), "log_z_ready": self.log_z_ready.cpu()}

    def load_extra_state(self, state: dict) -> None:
        self.log_z.load_(state["log_z"])
        ready = state.get("log_z_ready", torch.ones_like(self.log_z_ready))  # older checkpoints: already learning
        self.log_z_ready.copy_(ready.to(self.device))

    def rank_state(self) -> dict:
        return {**super().rank_state(), "buffer": self.buffer.state_dict()}  # each rank replays its own samples

    def load_rank_state(self, state: dict) -> None:
        super().load_rank_state(state)
        self.buffer.load_state_dict(state["buffer"])

    def sync_gradients(self) -> None:
        if self.learns_log_z:
            self.ranks.sum_sparse_grads(list(self.log_z.parameters()))

    @property
    def estimates_log_z(self) -> bool:
        """Whether each query's log Z starts at an estimate from its first samples (``initialise_log_z``)."""
        return self.learns_log_z and self.config.log_z_init == "estimate"

    def awaits_log_z_estimate(self, query: int) -> bool:
        """Whether query number ``query`` has a log Z still to be estimated from its first samples."""
        return self.estimates_log_z and not bool(self.log_z_ready[query])

    @torch.no_grad()
    def initialise_log_z(self, index: Tensor, log_r_end: Tensor, log_q: Tensor) -> None:
        """Set log Z of queries seen for the first time to mean(log R(x) - log P_F(τ ⊤)) over their trajectories.

        ``index`` [B]: each trajectory's query; ``log_r_end`` [B]: its terminal log-reward (tempered as
        in the loss); ``log_q`` [B]: its log P_F(τ ⊤) under the policy.

        With ``log_z_init: estimate``. Starting at 0 instead, log Z is far above the truth for LM
        rewards (log p(Y | X) is often -5 to -20); every sampled trajectory then looks too likely,
        the loss lowers the probability of whatever the policy samples, and its mass drifts to the
        tail of the vocabulary, where rewards are lowest (measured: SmolLM2 on subjectivity, mean
        log-reward -52 -> -653 in 32 steps at lr 5e-4). The estimate is exact once the policy matches the
        target; on-policy it is a lower bound, useless when nearly every first sample gets the floor.
        Off-policy it is no estimate at all, so a query's first micro-batch is always drawn from the
        untempered policy (``source``). With several ranks, a query first seen by several gets
        the lowest rank's estimate on all, as one process would have taken the first micro-batch's.
        Estimated from replayed worked rationales, which
        the policy gives log q near -16 but the reward log R near -7, log Z started at up to +10,
        above its bound log p(X | demonstrations) < 0 (measured: SmolLM2 on arithmetic, half the
        queries in a 21-step run); every sampled rationale then looked too likely.
        """
        new = ~self.log_z_ready[index]  # [B]
        estimates = torch.full((len(self.queries),), math.nan, device=self.device)  # [Q]
        for query in index[new].unique().tolist():
            estimates[query] = (log_r_end - log_q)[index == query].mean()
        estimates = self.ranks.first_estimates(estimates)  # every rank sets what the lowest rank estimated
        for query in (~torch.isnan(estimates)).nonzero().flatten().tolist():
            self.log_z.set_(query, estimates[query])
            self.log_z_ready[query] = True

    # ----------------------------------------------------------------- schedules
    def reward_temperature(self, step: int | None = None) -> float:
        c = self.config
        step = self.step if step is None else step
        if c.reward_temp_horizon == 0:
            return c.reward_temp_end
        frac = min(1.0, step / c.reward_temp_horizon)
        return c.reward_temp_start + frac * (c.reward_temp_end - c.reward_temp_start)

    # ----------------------------------------------------------------- batches
    def seed_buffer(self, records: Sequence[TrajectoryRecord], batch_size: int = 32) -> int:
        """Score given trajectories (e.g. known-good rationales) and put them in the replay buffer.

        Only the terminal reward is kept, so only it is computed where the reward can (a suffix
        reward's every prefix costs T + 1 copies of Y: 900 infilling seeds took over half an hour on
        one CPU thread that way)."""
        added = 0
        batches = range(0, len(records), batch_size)
        show = self.config.progress and self.ranks.writes and len(batches) > 1
        for start in tqdm(batches, desc="seeding the replay buffer", unit="batch", disable=not show):
            chunk = list(records[start : start + batch_size])
            traj = Trajectories.from_records(chunk, self.pad_id, self.device)
            added += self.buffer.add(chunk, terminal_log_rewards(self.reward, traj).tolist())
        if added < len(records):
            logger.warning("replay buffer kept %d of %d seed trajectories (duplicates, or buffer_capacity %d is "
                           "smaller than the seeds of one query)", added, len(records), self.buffer.capacity)
        return added

    def seed_buffer_from_texts(self, examples: Sequence[tuple[Query, str]]) -> int:
        """Seed the buffer with texts Z given for queries X, each token an action of the policy."""
        records = text_records(self.policy.tokenizer, examples)
        for (_, text), record in zip(examples, records):
            if not 0 < record.length <= self.space.max_len:
                raise ValueError(f"seed text {text!r} has {record.length} tokens; the policy writes 1 to {self.space.max_len}")
        return self.seed_buffer(records)

    def source(self, query: int) -> str:
        """Where query number ``query``'s samples come from this time: "replay", "base", "tempered" or "policy".

        One uniform draw decides, always taken so that the random stream does not depend on the buffer. A
        query whose log Z awaits its estimate is sampled on-policy (only such samples estimate it,
        ``initialise_log_z``), as is one with nothing to replay yet (so the tempered share stays p_tempered)."""
        c = self.config
        u = float(torch.rand((), generator=self.generator))
        if self.awaits_log_z_estimate(query) or (u < c.p_replay and self.buffer.size(self.queries[query]) == 0):
            return "policy"
        edge = 0.0
        for name, share in (("replay", c.p_replay), ("base", c.p_base), ("tempered", c.p_tempered)):
            edge += share
            if u < edge:
                return name
        return "policy"

    def draw_trajectories(self) -> tuple[Trajectories, Tensor]:
        """Steps 1-2: ``queries_per_step`` queries, each with its ``samples_per_query`` trajectories from its
        source; returns them with ``fresh`` [B] (sampled now, not replayed)."""
        c = self.config
        picks = torch.randint(len(self.queries), (c.queries_per_step,), generator=self.generator).tolist()
        from_policy: list[Query] = []
        temperatures: list[float] = []
        from_base: list[Query] = []
        replayed: list[TrajectoryRecord] = []
        for i in picks:
            query, source = self.queries[i], self.source(i)
            if source == "replay":
                log_q = self.stored_log_probs(query) if c.buffer_sampling == "deficit" else None
                replayed += self.buffer.sample(query, c.samples_per_query, self.generator, log_q)
            elif source == "base":
                from_base += [query] * c.samples_per_query
            else:
                temperature = 1.0
                if source == "tempered":
                    r = float(torch.rand((), generator=self.generator))
                    temperature = c.pf_temp_min + r * (c.pf_temp_max - c.pf_temp_min)
                from_policy += [query] * c.samples_per_query
                temperatures += [temperature] * c.samples_per_query
        records: list[TrajectoryRecord] = []
        if from_policy:
            records += self.sample_records(from_policy, temperatures)
        if from_base:
            with adapter_disabled(self.model):
                records += self.sample_records(from_base, 1.0)
        fresh = torch.tensor([True] * len(records) + [False] * len(replayed))
        return Trajectories.from_records(records + replayed, self.pad_id, self.device), fresh

    def reward_batch(self, traj: Trajectories, fresh: Tensor) -> MicroBatch:
        """Step 3: log R of every state of every trajectory, untempered."""
        return MicroBatch(traj, compute_log_rewards(self.reward, traj), fresh)

    def update_buffer(self, batch: MicroBatch) -> None:
        """Fresh samples enter the buffer, ranked by their untempered terminal log-reward."""
        fresh = batch.fresh.tolist()
        records = [r for r, is_fresh in zip(batch.traj.records(), fresh) if is_fresh]
        self.buffer.add(records, [v for v, is_fresh in zip(batch.log_r_end.tolist(), fresh) if is_fresh])

    @torch.no_grad()
    def stored_log_probs(self, query: Query, batch_size: int = 64) -> list[float]:
        """The current policy's log q(τ ⊤) of every stored trajectory of ``query``, for deficit replay.

        One teacher-forced pass without gradients (and, like sampling, without dropout) over at most
        ``buffer_capacity`` trajectories, only on the steps that replay this query.
        """
        records, log_q = self.buffer.records(query), []
        for start in range(0, len(records), batch_size):
            traj = Trajectories.from_records(records[start : start + batch_size], self.pad_id, self.device)
            with eval_mode(self.model):
                log_pf, log_pterm = self.policy.score(traj)  # [b, T], [b, T+1]
            log_q += terminal_log_prob(log_pf, log_pterm, traj.lengths).tolist()
        return log_q

    def sample_records(self, queries: list[Query], temperature: float | list[float]) -> list[TrajectoryRecord]:
        return self.sample(queries, temperature).records()

    def objective(self, batch: MicroBatch, reward_temperature: float) -> Tensor:
        """Steps 4-5 on one rewarded micro-batch: score it (gradients kept), set the log Z of queries seen for the
        first time (``log_z_init: estimate``), then the loss with log R divided by ``reward_temperature``."""
        traj = batch.traj
        log_pf, log_pterm = self.score(traj)  # [B, T], [B, T+1]
        index = torch.tensor([self.query_index[q.key] for q in traj.queries], device=self.device)  # [B]
        if self.estimates_log_z:
            log_q = terminal_log_prob(log_pf.detach(), log_pterm.detach(), traj.lengths)  # [B]
            self.initialise_log_z(index, batch.log_r_end.to(log_q.device) / reward_temperature, log_q)
        return self.loss(log_pf, log_pterm, batch.log_r.to(log_pf.device) / reward_temperature, traj.lengths, index)

    def loss(self, log_pf: Tensor, log_pterm: Tensor, log_r: Tensor, lengths: Tensor, index: Tensor) -> Tensor:
        """The GFlowNet objective: modified SubTB, TB or DB of log P_F [B, T], log P_⊤ [B, T+1] and (tempered)
        log R [B, T+1], with the log Z of each trajectory's query (``index`` [B])."""
        log_z = self.log_z(index)  # [B]
        if self.config.loss == "subtb":
            return modified_subtb_loss(log_pf, log_pterm, log_r, lengths, self.config.subtb_lambda,
                                       log_z=log_z, min_len=self.space.min_len)
        if self.config.loss == "db":
            return detailed_balance_loss(log_pf, log_pterm, log_r, lengths)
        return trajectory_balance_loss(log_pf, log_pterm, log_r, lengths, log_z)

    # ----------------------------------------------------------------- one step
    def train_step(self) -> dict:
        c = self.config
        start = time.perf_counter()
        reward_temperature = self.reward_temperature()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses, terminal, lengths, n_samples, finite = [], [], [], 0, True
        for k in range(c.grad_accum):
            with self.ranks.no_sync(self.scorer, skip=k < c.grad_accum - 1):
                with self.accelerator.autocast():
                    batch = self.reward_batch(*self.draw_trajectories())
                    loss = self.objective(batch, reward_temperature)
                ok = bool(torch.isfinite(loss))
                self.backward((loss if ok else self.zero_loss()) / c.grad_accum)
            losses.append(loss.item())
            if not ok:  # its update is skipped (apply_gradients); the other micro-batches still run on every rank
                finite = False
                continue
            self.update_buffer(batch)
            terminal.append(batch.log_r_end.cpu())
            lengths.append(batch.traj.lengths.float().cpu())
            n_samples += len(batch.traj)

        updated, grad_norm = self.apply_gradients(finite)
        terminal_r = torch.cat(terminal) if terminal else torch.zeros(1)
        metrics = {
            "loss": sum(losses) / len(losses),
            "log_reward_mean": float(terminal_r.mean()),
            "log_reward_max": float(terminal_r.max()),
            "mean_length": float(torch.cat(lengths).mean()) if lengths else 0.0,
            "reward_temperature": reward_temperature,
            "grad_norm": grad_norm,
            "buffer_size": len(self.buffer),
        }
        if self.learns_log_z:
            log_z = self.log_z.as_tensor()
            if self.estimates_log_z:  # queries not yet estimated hold a placeholder 0
                log_z = log_z[self.log_z_ready]
            metrics["log_z_mean"] = log_z.mean().item()
        return self.finish_step(metrics, updated, n_samples, start)

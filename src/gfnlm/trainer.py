"""The GFlowNet fine-tuning loop.

One optimizer step, top to bottom (``GFlowNetTrainer.train_step``):

1. For each of ``grad_accum`` micro-batches, draw ``queries_per_step`` queries and, per query,
   a source for its ``samples_per_query`` trajectories: the replay buffer, the base model
   (LoRA off), the tempered policy (temperature uniform in [pf_temp_min, pf_temp_max]) or the
   policy itself.
2. Sample all policy trajectories of the micro-batch in one batched, KV-cached call (no grad).
3. Score every prefix's log-reward in one pass (no grad) and divide by the reward temperature.
4. One teacher-forced forward pass of the policy gives log P_F and log P_⊤ with gradients.
5. Loss (modified SubTB, TB or DB), backward scaled by 1/grad_accum; new samples enter the buffer.
   (Steps 1-5 are ``GFlowNetTrainer``'s; the ``Trainer`` base class owns the rest, shared with
   the SFT and PPO baselines.)
6. Clip, step, schedule. A non-finite loss or gradient skips the update.

Checkpoints hold everything a run needs to continue bit for bit: trainable weights, optimizer,
scheduler, buffer, log Z and all random-number-generator states.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from gfnlm.buffer import ReplayBuffer
from gfnlm.config import ConfigError, TrainConfig
from gfnlm.distributed import RANK_SEED_STRIDE, PolicyScorer, Ranks, make_accelerator, reduce_metrics
from gfnlm.losses import detailed_balance_loss, modified_subtb_loss, trajectory_balance_loss
from gfnlm.modes import adapter_disabled, eval_mode
from gfnlm.rewards import Reward, compute_log_rewards, terminal_log_rewards, terminal_values
from gfnlm.policy import Policy
from gfnlm.sampling import require_pad_token, text_records
from gfnlm.scoring import terminal_log_prob
from gfnlm.trajectories import ActionSpace, Query, TrajectoryRecord, Trajectories

logger = logging.getLogger("gfnlm")

METRICS_FILE = "metrics.jsonl"
"""A run's log in its output folder: one JSON line per logged step, appended across resumes."""

TIMING_KEYS = ("samples_per_s", "step_time_s", "peak_memory_mb")
"""Metrics that measure the machine rather than the run; they differ between identical runs."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is kept."""


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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
    traj: Trajectories
    log_r: Tensor  # [B, T+1] untempered
    fresh: Tensor  # [B] bool: sampled now (enters the buffer), not replayed


class Trainer:
    """What every fine-tuning method shares: LoRA, optimiser, warm-up, the loop, logging, checkpoints.

    A method implements ``train_step`` (one optimizer step, returning its metrics) and may add
    parameters (``extra_parameters``) and state (``extra_state``) that checkpoints must carry.
    """

    name = "train"

    def __init__(self, policy: Policy, config: TrainConfig | None = None, output_dir: str | Path | None = None):
        self.config = config or TrainConfig()
        self.config.validate()
        self.policy = policy
        self.pad_id = require_pad_token(policy.tokenizer)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        if self.config.report_to != "none" and self.output_dir is None:
            raise ConfigError(f"report_to {self.config.report_to} needs an output directory for the run")
        self.accelerator = make_accelerator(self.config, policy.device, policy.precision, self.output_dir)
        self.ranks = Ranks(self.accelerator)
        self.device = policy.device
        if self.ranks.world > 1 and self.device != self.accelerator.device and self.device.type != "cpu":
            raise ValueError(f"this process's policy is on {self.device}, but accelerate gave it {self.accelerator.device}")
        torch.manual_seed(self.config.seed)  # LoRA and head initialisation: the same on every rank
        policy.add_adapter(self.config)
        if self.ranks.world > 1:  # then each rank its own dropout masks
            torch.manual_seed(self.config.seed + self.ranks.rank * RANK_SEED_STRIDE)
        # the policy's scores as one module, which DDP wraps; the policy keeps the model itself
        self.scorer = self.accelerator.prepare(PolicyScorer(policy.model, policy.space))
        # all sampling and batch draws; rank 0's stream is the single process's
        self.generator = torch.Generator().manual_seed(self.config.seed + self.ranks.rank * RANK_SEED_STRIDE)
        self.step = 0
        self.nan_streak = 0

    @property
    def model(self):
        """The policy's model (with its adapter), as samplers and checkpoints see it."""
        return self.policy.model

    @property
    def space(self) -> ActionSpace:
        return self.policy.space

    def score(self, traj: Trajectories) -> tuple[Tensor, Tensor]:
        """The policy's log P_F [B, T] and log P_⊤ [B, T+1] with gradients (``score_policy``), through the
        data-parallel wrapper so that its gradients are averaged over the ranks."""
        return self.scorer(traj.input_ids, traj.attention_mask, traj.is_action, traj.prompt_len)

    def build_optimizer(self) -> None:
        """Call at the end of a subclass's __init__, once its extra parameters exist."""
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": self.config.lr}]
        groups += self.extra_parameters()
        self.optimizer = self.accelerator.prepare(torch.optim.AdamW(groups, weight_decay=self.config.weight_decay))
        # warm-up and decay shape the policy's learning rate; log Z and heads keep theirs, so that
        # a flow estimate still far off when the policy's rate decays can still settle
        factors = [self.lr_factor] + [lambda step: 1.0] * (len(groups) - 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factors)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak learning rate at ``step`` (0-based): warm-up, then the decay."""
        c = self.config
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.lr_decay == "constant":
            return 1.0
        progress = min(1.0, (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps))
        if c.lr_decay == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def extra_parameters(self) -> list[dict]:
        """Optimizer parameter groups beyond the model's trainable weights (e.g. log Z)."""
        return []

    def extra_state(self) -> dict:
        """Method state a checkpoint must carry (plain containers and tensors)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def rank_state(self) -> dict:
        """What differs between ranks and a checkpoint must hold for each: the random streams (and a
        subclass's own, e.g. the replay buffer)."""
        return {"generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def load_rank_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def sync_gradients(self) -> None:
        """Gradients of parameters that DDP does not hold (log Z), averaged over the ranks here."""

    def train_step(self) -> dict:
        raise NotImplementedError

    def backward(self, loss: Tensor) -> None:
        self.accelerator.backward(loss)

    def zero_loss(self) -> Tensor:
        """A loss of exactly 0 that reaches every trainable parameter: what a rank whose loss is not finite
        backpropagates, so that DDP's all-reduce still meets every rank (the step is then skipped)."""
        return sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0

    def apply_gradients(self, finite: bool = True) -> tuple[bool, float]:
        """Clip and step unless a loss (``finite`` false on any rank) or a gradient is non-finite; returns
        (updated, grad norm). Every rank reaches the same verdict, so the ranks' parameters stay equal."""
        c = self.config
        self.sync_gradients()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.ranks.any(not finite):
            self.optimizer.zero_grad(set_to_none=True)
            return False, float("nan")
        grad_norm = float(self.accelerator.clip_grad_norm_(params, c.max_grad_norm if c.max_grad_norm > 0 else float("inf")))
        if math.isfinite(grad_norm):
            self.optimizer.step()
            return True, grad_norm
        if self.accelerator.scaler is not None:  # fp16: the scaler skips this step itself and lowers its scale
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return False, grad_norm

    def finish_step(self, metrics: dict, updated: bool, n_samples: int, started: float) -> dict:
        """Advance the schedule and the step counter; add what every method logs."""
        if updated:
            self.nan_streak = 0
        else:
            self.nan_streak += 1
            logger.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", self.step + 1, self.nan_streak)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step += 1
        elapsed = time.perf_counter() - started
        row = {
            "step": self.step,
            **metrics,
            "lr": lr,
            "skipped": not updated,
            "samples_per_s": n_samples / elapsed,
            "step_time_s": elapsed,
            "peak_memory_mb": peak_memory_mb(self.device),
        }
        if self.ranks.world == 1:
            return row
        rows = self.ranks.gather((row, n_samples, elapsed))  # the metrics of the whole job
        return reduce_metrics([r for r, _, _ in rows], [n for _, n, _ in rows], [t for _, _, t in rows])

    # ----------------------------------------------------------------- the run
    progress_keys = ("loss", "samples_per_s")

    def train(self, resume: bool = False) -> list[dict]:
        """Run until ``config.steps``; with ``resume`` continue from the latest checkpoint."""
        c = self.config
        history: list[dict] = []
        writes = self.output_dir is not None and self.ranks.writes
        if self.output_dir is not None:
            if writes:
                self.output_dir.mkdir(parents=True, exist_ok=True)
            self.ranks.wait()
            if resume:
                self.load_latest_checkpoint()
            elif self.latest_checkpoint() is not None:
                raise FileExistsError(
                    f"{self.output_dir} already holds checkpoints; pass resume=True (--resume) to continue "
                    "that run, or choose another output directory"
                )
            if writes:
                truncate_logged_metrics(self.output_dir, self.step)
        tracking = writes and c.report_to != "none"
        if tracking:
            self.accelerator.init_trackers("gfnlm", config=scalars(dataclasses.asdict(c)))
        bar = tqdm(total=c.steps, initial=self.step, desc=self.name, disable=not (c.progress and self.ranks.writes),
                   dynamic_ncols=True)
        deadline = time.perf_counter() + 60 * c.time_limit_minutes if c.time_limit_minutes > 0 else math.inf
        try:
            while self.step < c.steps:
                if self.ranks.from_rank0(time.perf_counter() > deadline):  # every rank stops at the same step
                    logger.info("time limit of %g minutes reached at step %d", c.time_limit_minutes, self.step)
                    if self.output_dir is not None and self.nan_streak == 0:
                        self.save_checkpoint()
                    break
                metrics = self.train_step()
                history.append(metrics)
                bar.update(1)
                bar.set_postfix({k: f"{metrics[k]:.3g}" for k in self.progress_keys if k in metrics})
                if self.output_dir is not None:
                    if writes and (self.step % c.log_every == 0 or self.step == c.steps):
                        with open(self.output_dir / METRICS_FILE, "a") as f:
                            f.write(json.dumps(metrics) + "\n")
                        if tracking:
                            self.accelerator.log(scalars(metrics), step=self.step)
                    if self.nan_streak == 0 and (self.step % c.save_every == 0 or self.step == c.steps):
                        self.save_checkpoint()
                if self.nan_streak >= c.max_nan_steps:
                    where = f"; last good checkpoint: {self.latest_checkpoint()}" if self.output_dir else ""
                    raise TrainingDiverged(f"{self.nan_streak} non-finite losses in a row at step {self.step}{where}")
        finally:
            bar.close()
            if tracking:
                self.accelerator.end_training()
        return history

    def sample(self, queries: Sequence[Query], temperature: float | Sequence[float] = 1.0) -> Trajectories:
        """Draw one trajectory per query from the current policy (temperature scalar or per query), from the
        trainer's random stream."""
        return self.policy.sample(queries, temperature, self.generator)

    # ----------------------------------------------------------------- checkpoints
    @property
    def checkpoint_root(self) -> Path:
        if self.output_dir is None:
            raise ValueError("this trainer has no output_dir")
        return self.output_dir / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        if self.output_dir is None or not self.checkpoint_root.is_dir():
            return None
        done = sorted(p for p in self.checkpoint_root.glob("step-*") if (p / "trainer_state.pt").is_file())
        return done[-1] if done else None

    def save_checkpoint(self) -> Path:
        """Write a checkpoint to a temporary folder, then rename it into place (atomic). Rank 0 writes it,
        with every rank's own state (``rank_state``); the other ranks wait until it is in place."""
        ranks = self.ranks.gather(self.rank_state())
        final = self.checkpoint_root / f"step-{self.step:07d}"
        if self.ranks.writes:
            self._write_checkpoint(final, ranks)
        self.ranks.wait()
        return final

    def _write_checkpoint(self, final: Path, ranks: list[dict]) -> None:
        tmp = self.checkpoint_root / f".tmp-step-{self.step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trainable = {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
        save_file(trainable, tmp / "trainable.safetensors")
        if hasattr(self.model, "peft_config"):
            self.model.save_pretrained(tmp / "adapter")  # peft format, for `gfnlm eval --adapter`
        state = {
            "step": self.step,
            "nan_streak": self.nan_streak,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "extra": self.extra_state(),
            "ranks": ranks,
        }
        torch.save(state, tmp / "trainer_state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        old = sorted(p for p in self.checkpoint_root.glob("step-*"))[: -self.config.keep_checkpoints]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)

    def load_latest_checkpoint(self) -> bool:
        path = self.latest_checkpoint()
        if path is None:
            logger.info("no checkpoint in %s; starting from scratch", self.checkpoint_root)
            return False
        trainable = load_file(path / "trainable.safetensors", device=str(self.device))
        missing = set(trainable) - {n for n, p in self.model.named_parameters() if p.requires_grad}
        if missing:
            raise ValueError(f"checkpoint {path} does not fit this model (e.g. {sorted(missing)[:3]})")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in trainable.items():
                params[name].copy_(value)
        state = torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu")
        self.step, self.nan_streak = int(state["step"]), int(state["nan_streak"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as error:  # e.g. written before log Z had one parameter per query
            raise ValueError(f"checkpoint {path} does not fit this trainer's optimizer ({error}); it was written by "
                             "another gfnlm version or configuration: start a fresh run") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.load_extra_state(state["extra"])
        if "ranks" not in state:  # written before checkpoints held one state per rank: one process's
            state["ranks"] = [{key: state[key] for key in ("generator", "torch_rng", "cuda_rng")}
                              | ({"buffer": state["extra"]["buffer"]} if "buffer" in state["extra"] else {})]
        if len(state["ranks"]) != self.ranks.world:
            raise ValueError(f"checkpoint {path} was written by {len(state['ranks'])} processes; resume it with as many "
                             f"(this run has {self.ranks.world}): each process continues its own random stream and buffer")
        self.load_rank_state(state["ranks"][self.ranks.rank])
        logger.info("resumed from %s (step %d)", path, self.step)
        return True

def scalars(values: dict) -> dict:
    """The numbers (and flags, as 0 / 1) of a metrics row or a config, what trackers accept."""
    return {k: int(v) if isinstance(v, bool) else v for k, v in values.items() if isinstance(v, (int, float, str))}


def truncate_logged_metrics(output_dir: Path, step: int) -> None:
    """Drop the metrics a run logged after ``step``, where it (re)starts, so that a resumed log has no duplicates."""
    if not (output_dir / METRICS_FILE).exists():
        return
    kept = [row for row in read_logged_metrics(output_dir) if row["step"] <= step]
    (output_dir / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in kept))


def read_logged_metrics(output_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, one per logged step (none without a log)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def logged_training_minutes(rows: list[dict]) -> float:
    """A run's training time across all its resumes, from ``read_logged_metrics``: the sum of the
    step times (exact with ``log_every=1``; setup, checkpoints and evaluation excluded)."""
    return sum(r.get("step_time_s", 0.0) for r in rows) / 60


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
        untempered policy (``draw_micro_batch``). With several ranks, a query first seen by several gets
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

    def draw_micro_batch(self) -> MicroBatch:
        """Steps 1-3: compose one micro-batch from replay, base-model, tempered and on-policy sources."""
        c = self.config
        picks = torch.randint(len(self.queries), (c.queries_per_step,), generator=self.generator).tolist()
        from_policy: list[Query] = []
        temperatures: list[float] = []
        from_base: list[Query] = []
        replayed: list[TrajectoryRecord] = []
        for i in picks:
            query = self.queries[i]
            u = float(torch.rand((), generator=self.generator))
            if self.awaits_log_z_estimate(i):
                u = 1.0  # its first samples are on-policy: only they estimate log Z (``initialise_log_z``)
            elif u < c.p_replay and self.buffer.size(query) == 0:
                u = 1.0  # nothing to replay yet: on-policy, so that the tempered share stays p_tempered
            if u < c.p_replay:
                log_q = self.stored_log_probs(query) if c.buffer_sampling == "deficit" else None
                replayed += self.buffer.sample(query, c.samples_per_query, self.generator, log_q)
                continue
            if c.p_replay <= u < c.p_replay + c.p_base:
                from_base += [query] * c.samples_per_query
                continue
            temperature = 1.0
            if u < c.p_replay + c.p_base + c.p_tempered:
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
        traj = Trajectories.from_records(records + replayed, self.pad_id, self.device)
        log_r = compute_log_rewards(self.reward, traj)
        return MicroBatch(traj, log_r, fresh)

    def update_buffer(self, batch: MicroBatch, log_r_end: Tensor) -> None:
        """Fresh samples enter the buffer, ranked by their untempered terminal log-reward."""
        fresh = batch.fresh.tolist()
        records = [r for r, is_fresh in zip(batch.traj.records(), fresh) if is_fresh]
        self.buffer.add(records, [v for v, is_fresh in zip(log_r_end.tolist(), fresh) if is_fresh])

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

    def loss(self, batch: MicroBatch, reward_temperature: float) -> Tensor:
        """Step 4-5: the GFlowNet objective on one micro-batch (with gradients)."""
        traj = batch.traj
        log_pf, log_pterm = self.score(traj)
        log_r = batch.log_r.to(log_pf.device) / reward_temperature
        lengths = traj.lengths
        index = torch.tensor([self.query_index[q.key] for q in traj.queries], device=self.device)
        if self.estimates_log_z:
            log_q = terminal_log_prob(log_pf.detach(), log_pterm.detach(), lengths)  # [B]
            self.initialise_log_z(index, terminal_values(log_r, traj), log_q)
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
                    batch = self.draw_micro_batch()
                    loss = self.loss(batch, reward_temperature)
                ok = bool(torch.isfinite(loss))
                self.backward((loss if ok else self.zero_loss()) / c.grad_accum)
            losses.append(loss.item())
            if not ok:  # its update is skipped (apply_gradients); the other micro-batches still run on every rank
                finite = False
                continue
            log_r_end = terminal_values(batch.log_r, batch.traj)
            self.update_buffer(batch, log_r_end)
            terminal.append(log_r_end.cpu())
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

"""The loop every fine-tuning method shares: LoRA, optimiser, warm-up, the loop, logging, checkpoints.

A method (``gfnlm.gflownet.GFlowNetTrainer``, the SFT and PPO baselines) implements ``train_step``, one
optimizer step that returns its metrics; ``Trainer.train`` runs the steps, stops at the step count or
the time limit, logs every step to ``metrics.jsonl`` (and a tracker) and writes checkpoints that hold
everything a run needs to continue bit for bit: trainable weights, optimizer, scheduler, the method's
own state (the buffer, log Z) and all random-number-generator states.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from gfnlm.config import ConfigError, TrainConfig
from gfnlm.distributed import RANK_SEED_STRIDE, PolicyScorer, Ranks, make_accelerator, reduce_metrics
from gfnlm.policy import Policy
from gfnlm.runlog import append_logged_metrics, scalars, truncate_logged_metrics
from gfnlm.sampling import require_pad_token
from gfnlm.trajectories import ActionSpace, Query, Trajectories

logger = logging.getLogger("gfnlm")


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is kept."""


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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
        self.train_seconds = 0.0  # the run's training steps' time, resumed sessions included: time_limit_minutes

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
        self.train_seconds += elapsed
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
        budget_s = 60 * c.time_limit_minutes if c.time_limit_minutes > 0 else math.inf
        try:
            while self.step < c.steps:
                if self.ranks.from_rank0(self.train_seconds >= budget_s):  # every rank stops at the same step
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
                        append_logged_metrics(self.output_dir, metrics)
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
            "train_seconds": self.train_seconds,
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
        self.train_seconds = float(state.get("train_seconds", 0.0))  # 0 in checkpoints written before it was kept
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

"""PPO baseline (reward maximisation), as the paper's comparison: clipped surrogate, a value
head, a per-action KL penalty to the base model (LoRA switched off) with adaptive control.

The episode is the trajectory: actions z_1..z_n and then the stop action ⊤, whose step receives
the task's terminal reward. Rollouts come from the same sampler as GFlowNet training and the
log-probabilities from the same scorer, so both methods optimise the same policy object.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from gfnlm.config import ConfigError, TrainConfig, setting
from gfnlm.losses import state_mask
from gfnlm.modes import adapter_disabled
from gfnlm.rewards import Reward, compute_log_rewards, terminal_values
from gfnlm.policy import Policy
from gfnlm.scoring import action_log_probs, state_hidden
from gfnlm.trainer import Trainer
from gfnlm.trajectories import Query, Trajectories


@dataclass
class PPOConfig:
    """PPO settings (paper §E: 4 epochs per batch, clip 0.2, adaptive KL)."""

    ppo_epochs: int = setting(4, "Optimisation epochs over each rollout batch.")
    clip_range: float = setting(0.2, "Clipping range of the probability ratio (and of the value update).")
    vf_coef: float = setting(0.1, "Weight of the value loss.")
    gae_lambda: float = setting(0.95, "GAE lambda (discount is 1: episodes are short).")
    init_kl_coef: float = setting(0.2, "Initial weight of the KL penalty to the base model.")
    target_kl: float = setting(6.0, "Target KL of the adaptive controller (Ziegler et al., 2019).")
    kl_horizon: int = setting(10000, "Horizon of the adaptive KL controller, in samples.")
    ppo_reward: Literal["exp", "log"] = setting(
        "exp", "Terminal reward: R itself ('exp' of the task's log R, the paper's random-number setup) or log R."
    )

    def validate(self) -> None:
        if self.ppo_epochs < 1 or self.clip_range <= 0 or self.kl_horizon < 1:
            raise ConfigError("ppo_epochs and kl_horizon must be >= 1 and clip_range > 0")


def episode_log_probs(log_pf: Tensor, log_pterm: Tensor, lengths: Tensor) -> Tensor:
    """Log-probs of the episode's actions z_1..z_n, ⊤ as [B, T+1]; zero past step n."""
    padded = torch.cat([log_pf, log_pf.new_zeros(log_pf.shape[0], 1)], dim=1)  # [B, T+1]
    steps = torch.arange(padded.shape[1], device=padded.device)[None, :]
    out = torch.where(steps == lengths[:, None], log_pterm, padded)
    return torch.where(steps <= lengths[:, None], out, torch.zeros_like(out))


def generalised_advantages(rewards: Tensor, values: Tensor, valid: Tensor, lam: float) -> Tensor:
    """GAE with discount 1 over [B, T+1] steps; the value after an episode's last step is 0."""
    next_valid = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1) * next_valid
    deltas = rewards + next_values - values  # [B, T+1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for k in reversed(range(rewards.shape[1])):
        running = torch.where(valid[:, k], deltas[:, k] + lam * running, 0.0)
        advantages[:, k] = running
    return advantages


class PPOTrainer(Trainer):
    name = "ppo"
    progress_keys = ("loss", "reward_mean", "kl", "samples_per_s")

    def __init__(self, policy: Policy, reward: Reward, queries: Sequence[Query], config: TrainConfig | None = None,
                 ppo: PPOConfig | None = None, output_dir=None):
        super().__init__(policy, config, output_dir)
        if self.ranks.world > 1:
            raise ConfigError("the PPO baseline runs in one process: launch it without accelerate (gfnlm train)")
        self.ppo = ppo or PPOConfig()
        self.ppo.validate()
        self.reward, self.queries = reward, list(queries)
        hidden = self.model.get_input_embeddings().weight.shape[1]
        self.value_head = torch.nn.Linear(hidden, 1).to(self.device)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        self.kl_coef = self.ppo.init_kl_coef
        self.build_optimizer()

    def extra_parameters(self) -> list[dict]:
        return [{"params": list(self.value_head.parameters()), "lr": self.config.lr}]

    def extra_state(self) -> dict:
        return {"value_head": self.value_head.state_dict(), "kl_coef": self.kl_coef}

    def load_extra_state(self, state: dict) -> None:
        self.value_head.load_state_dict(state["value_head"])
        self.kl_coef = float(state["kl_coef"])

    def _policy(self, traj: Trajectories) -> tuple[Tensor, Tensor]:
        """Episode log-probs [B, T+1] and values [B, T+1] of the current policy."""
        hidden = state_hidden(self.model, traj)  # [B, T+1, H]
        log_pf, log_pterm = action_log_probs(self.model, hidden, traj, self.space)
        values = self.value_head(hidden.float()).squeeze(-1)
        return episode_log_probs(log_pf, log_pterm, traj.lengths), values

    @torch.no_grad()
    def rollout(self) -> dict[str, Tensor]:
        c = self.config
        picks = torch.randint(len(self.queries), (c.queries_per_step,), generator=self.generator).tolist()
        queries = [self.queries[i] for i in picks for _ in range(c.samples_per_query)]
        traj = self.sample(queries)
        lengths = traj.lengths
        valid = state_mask(lengths, traj.horizon + 1)
        self.model.eval()
        old_lp, values = self._policy(traj)
        with adapter_disabled(self.model):
            ref_lp = episode_log_probs(*self.policy.score(traj), lengths)
        log_r = terminal_values(compute_log_rewards(self.reward, traj), traj)  # [B]
        terminal = log_r.exp() if self.ppo.ppo_reward == "exp" else log_r
        kl_per_step = torch.where(valid, old_lp - ref_lp, 0.0)
        rewards = -self.kl_coef * kl_per_step
        rewards[torch.arange(len(traj), device=rewards.device), lengths.to(rewards.device)] += terminal.to(rewards.device)
        advantages = generalised_advantages(rewards, values, valid, self.ppo.gae_lambda)
        returns = advantages + values
        flat = advantages[valid]
        advantages = torch.where(valid, (advantages - flat.mean()) / (flat.std() + 1e-8), 0.0)
        return {"traj": traj, "valid": valid, "old_lp": old_lp, "values": values, "advantages": advantages,
                "returns": returns, "reward": terminal, "kl": kl_per_step.sum(1)}

    def train_step(self) -> dict:
        start = time.perf_counter()
        batch = self.rollout()
        traj, valid, clip = batch["traj"], batch["valid"], self.ppo.clip_range
        self.model.train()
        losses, updated_all, grad_norm = [], True, float("nan")
        for _ in range(self.ppo.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            new_lp, values = self._policy(traj)
            ratio = torch.exp(torch.where(valid, new_lp - batch["old_lp"], 0.0))
            adv = batch["advantages"]
            pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
            clipped_values = batch["values"] + (values - batch["values"]).clamp(-clip, clip)
            vf = 0.5 * torch.maximum((values - batch["returns"]).square(), (clipped_values - batch["returns"]).square())
            n = valid.sum()
            loss = (pg * valid).sum() / n + self.ppo.vf_coef * (vf * valid).sum() / n
            if not torch.isfinite(loss):
                updated_all = False
                break
            self.backward(loss)
            updated, grad_norm = self.apply_gradients()
            updated_all &= updated
            losses.append(loss.item())
        kl = float(batch["kl"].mean())
        # adaptive KL controller
        error = max(-0.2, min(0.2, kl / self.ppo.target_kl - 1))
        self.kl_coef *= 1 + error * len(traj) / self.ppo.kl_horizon
        metrics = {
            "loss": sum(losses) / len(losses) if losses else math.nan,
            "reward_mean": float(batch["reward"].mean()),
            "kl": kl,
            "kl_coef": self.kl_coef,
            "mean_length": float(traj.lengths.float().mean()),
            "grad_norm": grad_norm,
        }
        return self.finish_step(metrics, updated_all, len(traj), start)

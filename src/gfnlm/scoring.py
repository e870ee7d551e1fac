"""Teacher-forced log-probabilities of trajectories: one forward pass, gradients kept.

This is the only place the policy's log-probabilities carry gradients. Logits are computed
only for columns P-1 .. L-1 (``logits_to_keep``) and the log-softmax only at the T+1 states of
each trajectory, not at tool-inserted tokens or padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gfnlm.trajectories import ActionSpace, Trajectories


def state_logits(model, traj: Trajectories, with_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Next-token logits at the last token of every state s_0 .. s_T: [B, T+1, V].

    With ``with_hidden`` also the last layer's hidden states there, [B, T+1, H] (for value heads).
    """
    keep = traj.input_ids.shape[1] - traj.prompt_len + 1  # columns P-1 .. L-1
    out = model(
        input_ids=traj.input_ids,
        attention_mask=traj.attention_mask,
        position_ids=traj.position_ids,
        logits_to_keep=keep,
        use_cache=False,
        output_hidden_states=with_hidden,
    )
    state_cols = traj.state_columns()  # [B, T+1]
    logits = out.logits  # [B, keep, V]
    kept_cols = state_cols - (traj.prompt_len - 1)
    state = logits.gather(1, kept_cols[..., None].expand(-1, -1, logits.shape[-1]))
    if not with_hidden:
        return state
    hidden = out.hidden_states[-1]  # [B, L, H]
    return state, hidden.gather(1, state_cols[..., None].expand(-1, -1, hidden.shape[-1]))


def state_log_probs(model, traj: Trajectories, space: ActionSpace) -> tuple[Tensor, Tensor]:
    """log q(z_{i+1} | s_i) [B, T] and log q(⊤ | s_i) [B, T+1] under ``space``'s mask.

    No forced stop is applied here. Entries past each trajectory's length are finite but
    meaningless.
    """
    return action_log_probs(state_logits(model, traj), traj, space)


def action_log_probs(logits: Tensor, traj: Trajectories, space: ActionSpace) -> tuple[Tensor, Tensor]:
    """State logits [B, T+1, V] -> log q(z_{i+1} | s_i) [B, T] and log q(⊤ | s_i) [B, T+1]."""
    log_probs = space.masked_log_probs(logits.float())  # [B, T+1, V]
    log_pterm = space.stop_log_prob(log_probs)  # [B, T+1]
    actions = traj.input_ids.gather(1, traj.action_columns())  # [B, T]
    log_pf = log_probs[:, :-1].gather(2, actions[..., None]).squeeze(2)  # [B, T]
    return log_pf, log_pterm


@torch.no_grad()
def final_state_log_probs(model, traj: Trajectories, space: ActionSpace) -> Tensor:
    """The policy's masked next-token log-probs at each trajectory's last state s_{n_b}: [B, V]."""
    logits = state_logits(model, traj)  # [B, T+1, V]
    final = logits.gather(1, traj.lengths[:, None, None].expand(-1, 1, logits.shape[-1])).squeeze(1)
    return space.masked_log_probs(final.float())


def score_policy(model, traj: Trajectories, space: ActionSpace) -> tuple[Tensor, Tensor]:
    """The policy's log P_F [B, T] and log P_⊤ [B, T+1], as the sampler draws them.

    At ``space.max_len`` actions the stop is forced, so log P_⊤ there is 0: the trained policy
    is exactly the one that samples, and its distribution over terminal sequences matches the
    reward restricted to lengths <= max_len.
    """
    return with_forced_stop(*state_log_probs(model, traj, space), space)


def with_forced_stop(log_pf: Tensor, log_pterm: Tensor, space: ActionSpace) -> tuple[Tensor, Tensor]:
    """Set log P_⊤ = 0 at states with ``space.max_len`` actions, where the sampler must stop."""
    at_max = torch.arange(log_pterm.shape[1], device=log_pterm.device)[None, :] >= space.max_len
    return log_pf, torch.where(at_max, torch.zeros_like(log_pterm), log_pterm)


def terminal_log_prob(log_pf: Tensor, log_pterm: Tensor, lengths: Tensor) -> Tensor:
    """log q(z_1:n ⊤) [B] of each whole trajectory."""
    steps = torch.arange(log_pf.shape[1], device=log_pf.device)[None, :] < lengths[:, None]
    return torch.where(steps, log_pf, 0.0).sum(dim=1) + log_pterm.gather(1, lengths[:, None]).squeeze(1)

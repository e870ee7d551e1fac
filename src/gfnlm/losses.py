"""GFlowNet objectives for autoregressive sequence generation in which every state can terminate.

Shapes follow one contract (see ``docs/design.md``):

    log_pf    [B, T]    log q(z_{i+1} | s_i)       valid for i <  n_b
    log_pterm [B, T+1]  log q(⊤ | s_i)            valid for i <= n_b
    log_r     [B, T+1]  log R(s_i ⊤) / temperature  valid for i <= n_b
    lengths   [B]       n_b, the number of generated tokens of trajectory b (0 <= n_b <= T)

Entries past a trajectory's length may hold anything (NaN and ±inf included): they are replaced
by zeros with ``torch.where`` before any arithmetic, so they change neither the value nor the
gradient.

All three objectives use the substitution of Deleu et al. (2022) for terminable states,
F(s_i) = R(s_i ⊤) / q(⊤ | s_i), so no flow network is learned. Writing

    u_i = log R(s_i ⊤) - log q(⊤ | s_i) - sum_{k<i} log q(z_{k+1} | s_k),

the sub-trajectory residual of paper Eq. 3 for a pair i < j is simply u_i - u_j.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "balance_potentials",
    "modified_subtb_loss",
    "trajectory_balance_loss",
    "detailed_balance_loss",
]


def _check_shapes(log_pf: Tensor, log_pterm: Tensor, log_r: Tensor, lengths: Tensor) -> None:
    batch, horizon = log_pf.shape
    if log_pterm.shape != (batch, horizon + 1) or log_r.shape != (batch, horizon + 1):
        raise ValueError(
            f"expected log_pf [B, T], log_pterm and log_r [B, T+1]; got {tuple(log_pf.shape)}, "
            f"{tuple(log_pterm.shape)}, {tuple(log_r.shape)}"
        )
    if lengths.shape != (batch,):
        raise ValueError(f"expected lengths [B] = [{batch}], got {tuple(lengths.shape)}")
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > horizon):
        raise ValueError(f"lengths must lie in [0, T={horizon}], got {lengths.tolist()}")


def state_mask(lengths: Tensor, num_states: int) -> Tensor:
    """[B, num_states] bool: state i of trajectory b exists (i <= n_b)."""
    return torch.arange(num_states, device=lengths.device)[None, :] <= lengths[:, None]


def balance_potentials(
    log_pf: Tensor,
    log_pterm: Tensor,
    log_r: Tensor,
    lengths: Tensor,
    log_z: Tensor | None = None,
    min_len: int = 0,
) -> tuple[Tensor, Tensor]:
    """u [B, T+1] and which states are endpoints of balance conditions [B, T+1] (bool).

    u_i = log_r_i - log_pterm_i - sum_{k<i} log_pf_k at terminable states i (min_len <= i <= n_b).
    When the policy cannot stop before ``min_len`` actions, R(s_i ⊤)/q(⊤ | s_i) says nothing about
    the flow through those states; s_0 then takes its flow from a learned ``log_z`` [B] (u_0 =
    log Z) and states 1 .. min_len-1 are no endpoint. Everything else is zero, gradient included.
    """
    _check_shapes(log_pf, log_pterm, log_r, lengths)
    num_states = log_pterm.shape[1]
    valid_state = state_mask(lengths, num_states)  # [B, T+1]
    valid_action = valid_state[:, 1:]  # [B, T]: action k exists iff k < n_b
    index = torch.arange(num_states, device=lengths.device)[None, :]
    terminable = valid_state & (index >= min_len)
    zero = log_pf.new_zeros(())
    log_pf = torch.where(valid_action, log_pf, zero)
    log_pterm = torch.where(terminable, log_pterm, zero)
    log_r = torch.where(terminable, log_r, zero)
    prefix_log_pf = torch.cat([log_pf.new_zeros(log_pf.shape[0], 1), log_pf.cumsum(dim=1)], dim=1)  # [B, T+1]
    u = torch.where(terminable, log_r - log_pterm - prefix_log_pf, zero)
    if min_len == 0:
        return u, terminable
    if log_z is None or log_z.shape != lengths.shape:
        raise ValueError(f"with min_len > 0 the loss needs log_z of shape [B] = {tuple(lengths.shape)}")
    if int(lengths.min()) < min_len:
        raise ValueError(f"a trajectory is shorter than min_len={min_len}, which the policy cannot produce")
    u = torch.cat([log_z[:, None].to(u.dtype), u[:, 1:]], dim=1)
    return u, terminable | (index == 0)


def modified_subtb_loss(
    log_pf: Tensor,
    log_pterm: Tensor,
    log_r: Tensor,
    lengths: Tensor,
    subtb_lambda: float = 1.0,
    log_z: Tensor | None = None,
    min_len: int = 0,
) -> Tensor:
    """Modified sub-trajectory balance (paper Eq. 3), vectorised over all pairs 0 <= i < j <= n_b.

    Each squared residual (u_i - u_j)^2 is weighted by ``subtb_lambda ** (j - i - 1)``; the loss
    is the weighted sum over the batch divided by the sum of the weights, so long and short
    trajectories in one batch are weighted per sub-trajectory, as in the paper's code.
    With ``min_len`` > 0 (no stop before ``min_len`` actions) pass the learned ``log_z`` [B]
    (see ``balance_potentials``). Memory is O(B T^2), negligible next to the language model.
    """
    if subtb_lambda <= 0:
        raise ValueError(f"subtb_lambda must be positive, got {subtb_lambda}")
    u, endpoint = balance_potentials(log_pf, log_pterm, log_r, lengths, log_z, min_len)  # [B, T+1]
    num_states = u.shape[1]
    residual = u[:, :, None] - u[:, None, :]  # [B, i, j]
    idx = torch.arange(num_states, device=u.device)
    gap = idx[None, :] - idx[:, None]  # [i, j] = j - i
    upper = gap > 0
    weight = torch.where(
        upper, torch.tensor(subtb_lambda, dtype=u.dtype, device=u.device) ** (gap - 1).clamp(min=0), 0.0
    )  # [i, j]
    pair_exists = upper[None] & endpoint[:, :, None] & endpoint[:, None, :]  # [B, i, j]
    weight = weight[None] * pair_exists  # [B, i, j]
    total_weight = weight.sum()
    if total_weight == 0:  # every trajectory is empty: nothing to balance
        return u.sum() * 0.0
    return (weight * residual.square()).sum() / total_weight


def trajectory_balance_loss(
    log_pf: Tensor, log_pterm: Tensor, log_r: Tensor, lengths: Tensor, log_z: Tensor
) -> Tensor:
    """Trajectory balance with a learned log Z(x) per trajectory ([B]), mean over the batch.

    Residual: log Z + sum_{k<n} log_pf_k + log_pterm_n - log_r_n, i.e. log Z - u_n.
    """
    if log_z.shape != lengths.shape:
        raise ValueError(f"log_z must have shape [B] = {tuple(lengths.shape)}, got {tuple(log_z.shape)}")
    u, _ = balance_potentials(log_pf, log_pterm, log_r, lengths)
    u_final = u.gather(1, lengths[:, None]).squeeze(1)  # [B]
    return (log_z - u_final).square().mean()


def detailed_balance_loss(log_pf: Tensor, log_pterm: Tensor, log_r: Tensor, lengths: Tensor) -> Tensor:
    """Modified detailed balance: residuals u_i - u_{i+1} of single transitions, mean over them.

    Needs every state to be terminable (no ``min_len``).
    """
    u, _ = balance_potentials(log_pf, log_pterm, log_r, lengths)
    transition_exists = state_mask(lengths, u.shape[1])[:, 1:]  # [B, T]
    count = transition_exists.sum()
    if count == 0:
        return u.sum() * 0.0
    return ((u[:, :-1] - u[:, 1:]).square() * transition_exists).sum() / count

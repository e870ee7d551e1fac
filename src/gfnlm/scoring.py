"""Teacher-forced log-probabilities of trajectories, gradients kept.

This is the only place the policy's log-probabilities carry gradients. Each distinct prompt is
run once (its last column's logits only) and its KV cache shared by its samples; logits of the
generated region follow in one pass; the policy's log-softmax is taken only at the T+1 states of
each trajectory, not at tool-inserted tokens or padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gfnlm.trajectories import ActionSpace, Trajectories


def split_model(model) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    """The decoder body (ids -> final normed hidden states), the output head and its logit soft cap.

    LoRA layers live inside the modules, so a peft model's adapter (or ``disable_adapter``) still applies.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cap = getattr(base.config, "final_logit_softcapping", None)
    return base.get_decoder(), base.get_output_embeddings(), cap


def head_log_probs(model, hidden: Tensor, token_ids: Tensor, rows_per_chunk: int = 512) -> Tensor:
    """log p(token_ids[..., k] | hidden state) for K candidate tokens per position. [..., H], [..., K] -> [..., K].

    The output head runs on a few hundred positions at a time and only the K gathered values and
    the log-normaliser of each position are kept, so the full [N, V] logits (V ~ 50k) never exist
    at once. Meant for no-grad scoring (rewards); it is exact, not an approximation.
    """
    _, head, cap = split_model(model)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    flat_ids = token_ids.reshape(flat_hidden.shape[0], -1)  # [N, K]
    out = []
    for start in range(0, flat_hidden.shape[0], rows_per_chunk):
        logits = head(flat_hidden[start : start + rows_per_chunk]).float()  # [n, V]
        if cap:
            logits = cap * torch.tanh(logits / cap)
        chosen = logits.gather(1, flat_ids[start : start + rows_per_chunk])
        out.append(chosen - logits.logsumexp(dim=1, keepdim=True))
    return torch.cat(out).reshape(token_ids.shape)


def state_logits(model, traj: Trajectories, with_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Next-token logits at the last token of every state s_0 .. s_T: [B, T+1, V].

    Two passes that share work between samples of the same query: the distinct prompts once
    ([U, P], gradients kept), their KV cache gathered to the B rows, then the generated region
    ([B, G]) on top of it. Identical to one pass over [B, P+G], at U*P + B*G tokens instead of
    B*(P+G). With ``with_hidden`` also the last layer's hidden states there, [B, T+1, H].
    """
    p = traj.prompt_len
    representative, inverse = traj.distinct_prompts()
    prompt = model(
        input_ids=traj.input_ids[representative, :p],
        attention_mask=traj.attention_mask[representative, :p],
        position_ids=traj.position_ids[representative, :p],
        use_cache=True,
        logits_to_keep=1,
        output_hidden_states=with_hidden,
    )
    logits = prompt.logits[inverse]  # [B, 1, V]: state s_0 ends in column P-1
    hidden = prompt.hidden_states[-1][inverse, -1:] if with_hidden else None  # [B, 1, H]
    if traj.input_ids.shape[1] > p:
        cache = prompt.cache
        cache.reorder_cache(inverse)
        generated = model(
            input_ids=traj.input_ids[:, p:],
            attention_mask=traj.attention_mask,
            position_ids=traj.position_ids[:, p:],
            cache=cache,
            use_cache=True,
            output_hidden_states=with_hidden,
        )
        logits = torch.cat([logits, generated.logits], dim=1)  # [B, G+1, V]: columns P-1 .. L-1
        if with_hidden:
            hidden = torch.cat([hidden, generated.hidden_states[-1]], dim=1)
    kept_cols = traj.state_columns() - (p - 1)  # [B, T+1] into columns P-1 .. L-1
    state = logits.gather(1, kept_cols[..., None].expand(-1, -1, logits.shape[-1]))
    if not with_hidden:
        return state
    return state, hidden.gather(1, kept_cols[..., None].expand(-1, -1, hidden.shape[-1]))


def action_log_probs(logits: Tensor, traj: Trajectories, space: ActionSpace) -> tuple[Tensor, Tensor]:
    """State logits [B, T+1, V] -> the policy's log q(z_{i+1} | s_i) [B, T] and log q(⊤ | s_i) [B, T+1]."""
    batch, num_states, vocab = logits.shape
    n_actions = torch.arange(num_states, device=logits.device).repeat(batch)  # state i has i actions
    log_probs = space.policy_log_probs(logits.reshape(-1, vocab), n_actions).reshape(batch, num_states, vocab)
    log_pterm = space.stop_log_prob(log_probs)  # [B, T+1]
    actions = traj.input_ids.gather(1, traj.action_columns())  # [B, T]
    log_pf = log_probs[:, :-1].gather(2, actions[..., None]).squeeze(2)  # [B, T]
    return log_pf, log_pterm


def score_policy(model, traj: Trajectories, space: ActionSpace) -> tuple[Tensor, Tensor]:
    """The policy's log P_F [B, T] and log P_⊤ [B, T+1] in one teacher-forced pass, with gradients.

    These are exactly the probabilities the sampler draws from at temperature 1: stop forced
    (log P_⊤ = 0) at ``max_len`` and impossible (-inf) before ``min_len``. Entries past each
    trajectory's length are finite but meaningless.
    """
    return action_log_probs(state_logits(model, traj), traj, space)


@torch.no_grad()
def final_state_log_probs(model, traj: Trajectories, space: ActionSpace) -> Tensor:
    """The policy's next-token log-probs at each trajectory's last state s_{n_b}: [B, V]."""
    logits = state_logits(model, traj)  # [B, T+1, V]
    final = logits.gather(1, traj.lengths[:, None, None].expand(-1, 1, logits.shape[-1])).squeeze(1)
    return space.policy_log_probs(final, traj.lengths)


def terminal_log_prob(log_pf: Tensor, log_pterm: Tensor, lengths: Tensor) -> Tensor:
    """log q(z_1:n ⊤) [B] of each whole trajectory."""
    steps = torch.arange(log_pf.shape[1], device=log_pf.device)[None, :] < lengths[:, None]
    return torch.where(steps, log_pf, 0.0).sum(dim=1) + log_pterm.gather(1, lengths[:, None]).squeeze(1)

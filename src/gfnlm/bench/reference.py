"""Straightforward per-prefix computations, the way the paper's code does them.

One forward pass per prefix state: slow (T passes of length up to T) but obviously right. The
tests check the fast batched paths against these, and ``gfnlm bench`` times the paper's whole
training step built from them (``sample_with_grad``, ``per_prefix_suffix_rewards``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from gfnlm.sampling import ToolHook, draw_tokens, take_action
from gfnlm.trajectories import ActionSpace, Query, TrajectoryRecord, Trajectories


@torch.no_grad()
def per_prefix_log_likelihoods(
    model,
    traj: Trajectories,
    stop_token_ids: Sequence[int] | None = None,
    suffix_ids: Sequence[Sequence[int]] | None = None,
) -> Tensor:
    """Same quantity as ``rewards.lm_prefix_log_likelihoods``, one forward pass per prefix. [B, T+1]."""
    device = traj.input_ids.device
    out = torch.zeros((len(traj), traj.horizon + 1), dtype=torch.float32, device=device)
    for b, record in enumerate(traj.records()):
        for i, end in enumerate(record.state_ends()):
            generated = record.generated_ids[:end]
            suffix = list(suffix_ids[b]) if suffix_ids is not None else []
            ids = torch.tensor([record.prompt_ids + generated + suffix], device=device)
            log_probs = model(input_ids=ids).logits.float().log_softmax(-1)[0]  # [len, V]
            p = len(record.prompt_ids)
            scored = ids[0, p:]  # generated tokens, then the suffix
            total = log_probs[p - 1 : ids.shape[1] - 1].gather(1, scored[:, None]).sum()
            if stop_token_ids is not None:
                total = total + log_probs[p + end - 1, list(stop_token_ids)].logsumexp(-1)
            out[b, i] = total
    return out


# ----------------------------------------------------------------------------- the paper's training step
def _right_padded(seqs: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Token ids and attention mask [R, width], padded on the right: causal attention never sees it."""
    width = max(map(len, seqs))
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, seq in enumerate(seqs):
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
    return ids, mask


def sample_with_grad(
    model,
    query_prompt_ids: list[int],
    n: int,
    space: ActionSpace,
    tool: ToolHook | None,
    query: Query,
    generator: torch.Generator | None = None,
    forced: Sequence[TrajectoryRecord] | None = None,
) -> tuple[list[TrajectoryRecord], Tensor, Tensor]:
    """``n`` trajectories of one query, log-probs taken from the sampling loop itself (gradients kept).

    As in the paper's code: no KV cache (a tool inserts tokens, so every step re-runs the whole
    sequence), one query per batch, and the graph of every step kept for the backward pass.
    With ``forced`` the given trajectories are replayed instead of sampled (same work, same
    log-probs), so that both paths can be compared on the same trajectories.
    Returns the records, log P_F [n, T] and log P_⊤ [n, T+1] (rows padded with 0).
    """
    device = next(model.parameters()).device
    generated: list[list[int]] = [[] for _ in range(n)]
    is_action: list[list[bool]] = [[] for _ in range(n)]
    steps_pf: list[list[Tensor]] = [[] for _ in range(n)]
    steps_pterm: list[list[Tensor]] = [[] for _ in range(n)]
    done = [False] * n
    forced_actions = None
    if forced is not None:
        forced_actions = [[t for t, a in zip(r.generated_ids, r.is_action) if a] for r in forced]
    while not all(done):
        rows = [b for b in range(n) if not done[b]]
        ids, mask = _right_padded([query_prompt_ids + generated[b] for b in rows])
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [R, width, V]
        last = logits[torch.arange(len(rows)), mask.sum(1) - 1]  # [R, V]
        n_actions = torch.tensor([sum(is_action[b]) for b in rows], device=device)
        log_probs = space.policy_log_probs(last, n_actions)
        stop_lp = space.stop_log_prob(log_probs)
        if forced_actions is not None:
            picks = [forced_actions[b][int(n_actions[r])] if int(n_actions[r]) < len(forced_actions[b])
                     else space.stop_token_ids[0] for r, b in enumerate(rows)]
        else:
            picks = draw_tokens(log_probs.detach().exp().cpu(), generator).tolist()
        for r, b in enumerate(rows):
            steps_pterm[b].append(stop_lp[r])
            token = int(picks[r])
            if token in space.stop_token_ids:
                done[b] = True
                continue
            steps_pf[b].append(log_probs[r, token])
            take_action(query, generated[b], is_action[b], token, tool)
    horizon = max(len(p) for p in steps_pf)
    zero = torch.zeros((), device=device)
    log_pf = torch.stack([torch.stack(p + [zero] * (horizon - len(p))) for p in steps_pf])
    log_pterm = torch.stack([torch.stack(p + [zero] * (horizon + 1 - len(p))) for p in steps_pterm])
    records = [TrajectoryRecord(query, list(query_prompt_ids), g, a) for g, a in zip(generated, is_action)]
    return records, log_pf, log_pterm


@torch.no_grad()
def per_prefix_suffix_rewards(model, records: Sequence[TrajectoryRecord], suffix_ids: Sequence[int],
                              context_ids: Sequence[int] = ()) -> Tensor:
    """log p(s_i Y | context X) for every state, one forward pass per prefix index (rows of one query
    batched, the context recomputed every time), as the paper's code does. [n, T+1]."""
    device = next(model.parameters()).device
    ends = [r.state_ends() for r in records]
    horizon = max(len(e) for e in ends) - 1
    out = torch.zeros((len(records), horizon + 1), device=device)
    suffix = list(suffix_ids)
    for i in range(horizon + 1):
        rows = [b for b in range(len(records)) if i < len(ends[b])]
        seqs = [list(context_ids) + records[b].prompt_ids + records[b].generated_ids[: ends[b][i]] + suffix for b in rows]
        ids, _ = _right_padded(seqs)
        log_probs = model(input_ids=ids.to(device)).logits.float().log_softmax(-1)  # [R, width, V]
        for r, b in enumerate(rows):
            start = len(context_ids) + len(records[b].prompt_ids)
            targets = ids[r, start : len(seqs[r])].to(device)
            out[b, i] = log_probs[r, start - 1 : len(seqs[r]) - 1].gather(1, targets[:, None]).sum()
    return out

"""Teacher-forced log-probabilities of trajectories, gradients kept.

This is the only place the policy's log-probabilities carry gradients. Each distinct prompt is
run once and its KV cache shared by its samples (``shared_prompt_hidden``, which the LM rewards
use too); the generated region follows in one pass; the output head and the policy's
log-softmax run only at the n_b + 1 states each trajectory reaches, not at tool-inserted tokens,
padding or the states past its end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gfnlm.trajectories import ActionLayout, ActionSpace, Trajectories

if TYPE_CHECKING:
    from transformers import DynamicCache

    from gfnlm.context import SharedContext


def split_model(model) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    """The decoder body (ids -> final normed hidden states), the output head and its logit soft cap.

    LoRA layers live inside the modules, so a peft model's adapter (or ``disable_adapter``) still applies.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cap = getattr(base.config, "final_logit_softcapping", None)
    return base.get_decoder(), base.get_output_embeddings(), cap


def compute_dtype(model) -> torch.dtype:
    """The dtype the decoder computes in: what its input embeddings hand it (a float32 head tied to them keeps
    their weights float32, ``gfnlm.policy.store_weights``)."""
    embedding = model.get_input_embeddings()
    return getattr(embedding, "_gfnlm_dtype", embedding.weight.dtype)


def soft_capped(logits: Tensor, cap: float | None) -> Tensor:
    """The model's logit soft cap (Gemma's ``final_logit_softcapping``), if it has one."""
    return cap * torch.tanh(logits / cap) if cap else logits


def output_logits(model, hidden: Tensor) -> Tensor:
    """The output head (with its logit soft cap, if any) in float32 (``gfnlm.policy.store_weights``). [..., H] -> [..., V]."""
    _, head, cap = split_model(model)
    return soft_capped(head(hidden).float(), cap)


def head_log_probs(model, hidden: Tensor, token_ids: Tensor, keep: Tensor | None = None,
                   rows_per_chunk: int = 512) -> Tensor:
    """log p(token_ids[..., k] | hidden state) for K candidate tokens per position. [..., H], [..., K] -> [..., K].

    The output head runs on a few hundred positions at a time and only the K gathered values and
    the log-normaliser of each position are kept, so the full [N, V] logits (V ~ 50k) never exist
    at once. With ``keep`` (bool, [...]) only those positions are scored and the rest are 0, so
    no head runs on padding or on states a trajectory never reached.
    Meant for no-grad scoring (rewards); it is exact, not an approximation. The head runs in the decoder's
    dtype (bf16 weights: a bf16 copy of the float32 head, made once per call): an LM reward's log R is only as
    exact as its bf16 decoder makes it (docs/design.md, "Precision"), and the float32 head cost the
    arithmetic reward a third of its time. The policy's own head stays float32 (``PolicyHead``).
    """
    if keep is not None:
        out = hidden.new_zeros(token_ids.shape, dtype=torch.float32)
        out[keep] = head_log_probs(model, hidden[keep], token_ids[keep], rows_per_chunk=rows_per_chunk)
        return out
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    flat_ids = token_ids.reshape(flat_hidden.shape[0], -1)  # [N, K]
    _, head, cap = split_model(model)
    if type(head) is torch.nn.Linear:
        weights = (head.weight.to(hidden.dtype), None if head.bias is None else head.bias.to(hidden.dtype))

        def logits_of(rows: Tensor) -> Tensor:
            return soft_capped(torch.nn.functional.linear(rows, *weights).float(), cap)
    else:
        logits_of = lambda rows: output_logits(model, rows)  # noqa: E731 (a wrapped head: as the model runs it)
    out = []
    for start in range(0, flat_hidden.shape[0], rows_per_chunk):
        logits = logits_of(flat_hidden[start : start + rows_per_chunk])  # [n, V]
        chosen = logits.gather(1, flat_ids[start : start + rows_per_chunk])
        out.append(chosen - logits.logsumexp(dim=1, keepdim=True))
    return torch.cat(out).reshape(token_ids.shape)


def shared_prompt_hidden(model, traj: Trajectories, input_ids: Tensor, position_ids: Tensor, mask: Tensor,
                         context: SharedContext | None = None) -> tuple[Tensor, DynamicCache]:
    """Final hidden states of columns P-1 .. of the packed inputs [B, total], P = traj.prompt_len,
    and the KV cache of all columns (for continuing the rows).

    Each distinct prompt runs once and its KV cache is gathered to the rows that share it (all the
    samples of one query), then the rest of every row runs over that cache. ``mask`` is [B, C + total]
    or [B, 1, total, C + total] (C context columns in front); ``position_ids`` already count the context.
    """
    p = traj.prompt_len
    first_rows, row_slot = traj.distinct_prompts()
    cache = None if context is None else context.cache(len(first_rows), input_ids.device)
    columns = mask.shape[-1] - input_ids.shape[1] + p  # context and prompt columns
    prompt_mask = mask[first_rows, :columns] if mask.ndim == 2 else mask[first_rows, :, :p, :columns]
    body, _, _ = split_model(model)
    out = body(input_ids=input_ids[first_rows, :p], attention_mask=prompt_mask,
               position_ids=position_ids[first_rows, :p], cache=cache, use_cache=True)
    hidden = out.last_hidden_state[row_slot, -1:]  # [B, 1, H]: column P-1
    cache = out.cache
    cache.reorder_cache(row_slot)
    if input_ids.shape[1] > p:
        rest_mask = mask if mask.ndim == 2 else mask[:, :, p:, :]
        rest = body(input_ids=input_ids[:, p:], attention_mask=rest_mask, position_ids=position_ids[:, p:],
                    cache=cache, use_cache=True).last_hidden_state  # [B, total - P, H]
        hidden = torch.cat([hidden, rest], dim=1)
    return hidden, cache


def state_hidden(model, traj: Trajectories) -> Tensor:
    """Last-layer hidden states at the last token of every state s_0 .. s_T: [B, T+1, H].

    The distinct prompts run once ([U, P], gradients kept), their KV cache gathered to the B rows,
    then the generated region ([B, G]) on top of it: U*P + B*G tokens instead of B*(P+G).
    """
    hidden, _ = shared_prompt_hidden(model, traj, traj.input_ids, traj.position_ids, traj.attention_mask)
    kept_cols = traj.state_columns() - (traj.prompt_len - 1)  # [B, T+1] into columns P-1 .. L-1
    return hidden.gather(1, kept_cols[..., None].expand(-1, -1, hidden.shape[-1]))


def vocab_size(model) -> int:
    """V, the width of the model's logits (the output head's rows, which may exceed the tokenizer's length)."""
    return split_model(model)[1].weight.shape[0]


class PolicyHead:
    """The output head on an action layout's columns: hidden states [N, H] -> logits [N, A] in float32.

    For a restricted action space the head's rows of the A columns are taken once and multiplied
    alone (arithmetic: 21 of 49,152 rows), instead of computing every logit and dropping the rest.
    A space that keeps most of the vocabulary computes the whole head and selects its columns, as does
    a head that is not a plain linear layer (an adapter on it, say). Build it where the weights are
    fixed for its lifetime: once per sampling call, once per scoring pass.
    """

    def __init__(self, model, layout: ActionLayout):
        _, head, self.cap = split_model(model)
        self.model, self.layout = model, layout
        self.rows: tuple[Tensor, Tensor | None] | None = None
        if layout.token_ids is not None and 2 * layout.width <= layout.vocab_size and type(head) is torch.nn.Linear:
            bias = head.bias.index_select(0, layout.token_ids) if head.bias is not None else None
            self.rows = (head.weight.index_select(0, layout.token_ids), bias)

    def __call__(self, hidden: Tensor) -> Tensor:
        if self.rows is None:
            return self.layout.select(output_logits(self.model, hidden))
        return soft_capped(torch.nn.functional.linear(hidden.to(self.rows[0].dtype), *self.rows), self.cap)


def action_log_probs(model, hidden: Tensor, traj: Trajectories, space: ActionSpace) -> tuple[Tensor, Tensor]:
    """State hidden states [B, T+1, H] -> the policy's log q(z_{i+1} | s_i) [B, T] and log q(⊤ | s_i) [B, T+1].

    The output head and the log-softmax run only at the states each trajectory reaches (i <= n_b),
    and only on the action space's columns (``PolicyHead``). Entries past n_b are 0; an action the
    space does not allow (a hand-made trajectory's) gets -inf.
    """
    batch, num_states, _ = hidden.shape
    layout = space.layout(vocab_size(model), hidden.device)
    state = torch.arange(num_states, device=hidden.device).expand(batch, -1)  # [B, T+1]
    lengths = traj.lengths.to(hidden.device)[:, None]
    live = state <= lengths  # [B, T+1]
    log_probs = layout.log_probs(PolicyHead(model, layout)(hidden[live]), state[live])  # [N, A], N live states
    log_pterm = hidden.new_zeros((batch, num_states), dtype=log_probs.dtype)
    log_pterm[live] = layout.stop_log_prob(log_probs)
    acting = state[:, :-1] < lengths  # [B, T]: states followed by an action
    columns = layout.columns(traj.input_ids.gather(1, traj.action_columns())[acting])  # [M], -1 if not allowed
    chosen = log_probs[(state < lengths)[live]].gather(1, columns.clamp(min=0)[:, None]).squeeze(1)
    log_pf = hidden.new_zeros((batch, num_states - 1), dtype=log_probs.dtype)
    log_pf[acting] = torch.where(columns >= 0, chosen, float("-inf"))
    return log_pf, log_pterm


def score_policy(model, traj: Trajectories, space: ActionSpace) -> tuple[Tensor, Tensor]:
    """The policy's log P_F [B, T] and log P_⊤ [B, T+1] in one teacher-forced pass, with gradients.

    These are exactly the probabilities the sampler draws from at temperature 1: stop forced
    (log P_⊤ = 0) at ``max_len`` and impossible (-inf) before ``min_len``. Entries past each
    trajectory's length are 0 and meaningless.
    """
    return action_log_probs(model, state_hidden(model, traj), traj, space)


@torch.no_grad()
def final_state_log_probs(model, traj: Trajectories, space: ActionSpace) -> Tensor:
    """The policy's next-token log-probs at each trajectory's last state s_{n_b}, on the whole vocabulary: [B, V]."""
    hidden = state_hidden(model, traj)  # [B, T+1, H]
    final = hidden.gather(1, traj.lengths[:, None, None].expand(-1, 1, hidden.shape[-1])).squeeze(1)  # [B, H]
    layout = space.layout(vocab_size(model), final.device)
    return layout.expand(layout.log_probs(PolicyHead(model, layout)(final), traj.lengths))


def terminal_log_prob(log_pf: Tensor, log_pterm: Tensor, lengths: Tensor) -> Tensor:
    """log q(z_1:n ⊤) [B] of each whole trajectory."""
    steps = torch.arange(log_pf.shape[1], device=log_pf.device)[None, :] < lengths[:, None]
    return torch.where(steps, log_pf, 0.0).sum(dim=1) + log_pterm.gather(1, lengths[:, None]).squeeze(1)

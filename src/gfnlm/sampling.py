"""Batched autoregressive sampling from the policy, under no_grad with the KV cache kept on.

Sampling never carries gradients: the scorer recomputes log-probabilities in one teacher-forced
pass afterwards (see ``scoring``). A tool hook may insert tokens after any action; those tokens
go through the model in the same cached step as the action that triggered them, so the cache is
never dropped. Rows then advance by different numbers of tokens per step; the shorter ones are
padded with masked columns, which the position ids skip, so every row sees exactly the
positions it would see alone.

With ``static_cache=True`` the keys and values live in transformers' ``StaticCache``: buffers
preallocated once for the whole trajectory (and regrown, rarely, when tool insertions outrun
them), written in place, with the attention mask padded to their length. Every decoding step then
has the same tensor shapes and addresses, which is what ``torch.compile`` and CUDA graphs need,
and no step copies the cache to grow it. The tokens and log-probs are those of the growing cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import StaticCache

from gfnlm.modes import eval_mode
from gfnlm.trajectories import ActionSpace, Query, TrajectoryRecord, Trajectories

if TYPE_CHECKING:
    from gfnlm.context import SharedContext

ToolHook = Callable[[Query, list[int]], list[int]]
"""Called after every action with the query and the generated ids so far (actions and earlier
insertions); returns the token ids to insert as context (empty list: nothing)."""


def take_action(query: Query, generated: list[int], is_action: list[bool], token: int,
                tool: ToolHook | None) -> list[int]:
    """Append action ``token`` and whatever ``tool`` inserts after it (context, not actions), in place.

    Returns the inserted ids. The one place that says how a tool's tokens join a trajectory, shared
    by the sampler, the reference path and tasks that rebuild known trajectories.
    """
    generated.append(token)
    is_action.append(True)
    inserted = list(tool(query, list(generated))) if tool is not None else []
    generated.extend(inserted)
    is_action.extend([False] * len(inserted))
    return inserted


def require_pad_token(tokenizer) -> int:
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token; set one before sampling, e.g. "
            "tokenizer.pad_token = tokenizer.eos_token (padding is always masked out)"
        )
    return int(tokenizer.pad_token_id)


def encode_prompts(tokenizer, queries: Sequence[Query]) -> list[list[int]]:
    """Token ids of each query's prompt, with the tokenizer's special tokens (e.g. <bos>)."""
    ids = tokenizer([q.prompt for q in queries], add_special_tokens=True)["input_ids"]
    for q, row in zip(queries, ids):
        if not row:
            raise ValueError(f"prompt {q.prompt!r} encodes to no tokens; the policy needs a first state")
    return [list(row) for row in ids]


def text_records(tokenizer, examples: Sequence[tuple[Query, str]]) -> list[TrajectoryRecord]:
    """Trajectories that write each text Z after its query X, every token an action of the policy.

    For texts given rather than sampled (buffer seeds, SFT targets, rationales to score); no tool
    inserts anything into them.
    """
    prompts = encode_prompts(tokenizer, [query for query, _ in examples])
    records = []
    for (query, text), prompt in zip(examples, prompts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        records.append(TrajectoryRecord(query, prompt, ids, [True] * len(ids)))
    return records


def _as_row_temperatures(temperature: float | Sequence[float] | Tensor, batch: int) -> Tensor:
    temps = torch.as_tensor(temperature, dtype=torch.float32).flatten()
    if temps.numel() == 1:
        temps = temps.expand(batch)
    if temps.numel() != batch:
        raise ValueError(f"expected one temperature or {batch}, got {temps.numel()}")
    if not (temps >= 0).all() or not torch.isfinite(temps).all():
        raise ValueError(f"sampling temperatures must be non-negative and finite, got {temps.tolist()}")
    return temps.clone()


def draw_tokens(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row of ``probs`` [B, V] (unnormalised is fine), by inverse CDF: [B].

    Same distribution as ``torch.multinomial(probs, 1)``, about ten times faster over a 50k-token
    vocabulary on CPU. Tokens of probability zero are never drawn.
    """
    cdf = probs.double().cumsum(dim=1)  # [B, V]
    u = torch.rand((probs.shape[0], 1), generator=generator, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[1] - 1).squeeze(1)


def truncate(log_probs: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Keep the ``top_k`` likeliest tokens and / or the smallest set whose probability reaches ``top_p``
    (nucleus), renormalised; the rest get -inf. [N, V] -> [N, V]. The likeliest token always stays."""
    if top_k is None and top_p is None:
        return log_probs
    ordered, order = log_probs.sort(dim=-1, descending=True)  # [N, V]
    keep = torch.ones_like(ordered, dtype=torch.bool)
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        keep[:, top_k:] = False
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        mass_before = ordered.exp().cumsum(dim=-1) - ordered.exp()  # probability of the likelier tokens
        keep &= mass_before < top_p
    kept = torch.full_like(log_probs, float("-inf")).scatter(1, order, ordered.masked_fill(~keep, float("-inf")))
    return kept.log_softmax(dim=-1)


def _next_step_logits(model, chunk: Tensor, chunk_mask: Tensor, full_mask: Tensor, cache) -> tuple[Tensor, object]:
    """Feed a [B, K] chunk through the cached model; return each row's logits at its last real token.

    Logits are computed only from the earliest such column on (``logits_to_keep``): for a
    left-padded prompt that is one column instead of the whole prompt times the vocabulary.
    A static cache sees the mask padded with zeros to its full length.
    """
    seen = full_mask[:, : full_mask.shape[1] - chunk.shape[1]].sum(dim=1, keepdim=True)
    positions = (seen + chunk_mask.cumsum(dim=1) - 1).clamp(min=0)
    columns = torch.arange(chunk.shape[1], device=chunk.device)
    last = torch.where(chunk_mask.bool(), columns, -1).max(dim=1).values.clamp(min=0)  # [B]
    keep = chunk.shape[1] - int(last.min())
    attention = full_mask
    if isinstance(cache, StaticCache):
        attention = F.pad(full_mask, (0, cache.get_max_length() - full_mask.shape[1]))  # [B, max_cache_len]
    out = model(
        input_ids=chunk,
        attention_mask=attention,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=keep,
    )
    rows = torch.arange(chunk.shape[0], device=chunk.device)
    logits = out.logits[rows, last - (chunk.shape[1] - keep)]  # [B, V]
    return logits.float(), out.cache


def _static_copy(model, cache, columns: int, max_cache_len: int) -> StaticCache:
    """A ``StaticCache`` of ``max_cache_len`` columns holding the first ``columns`` of ``cache``'s keys
    and values (a growing cache after the prompts, or a static one that is about to overflow).

    Sliding-window layers (Gemma 3's) must hold the whole sequence: past the window a static layer
    rolls its buffer, which the copy could not follow."""
    window = getattr(model.config.get_text_config(decoder=True), "sliding_window", None)
    if window and any(getattr(layer, "is_sliding", False) for layer in cache.layers) and max_cache_len > window:
        raise ValueError(f"static_cache needs sequences within the model's sliding window ({window} tokens), "
                         f"these need {max_cache_len}; sample with static_cache=False")
    static = StaticCache(config=model.config, max_cache_len=max_cache_len)
    for index, layer in enumerate(cache.layers):
        static.update(layer.keys[:, :, :columns], layer.values[:, :, :columns], index)
    return static


def _room_for(model, cache, full_mask: Tensor, width: int, trajectory_len: int):
    """``cache``, or a larger static copy of it when the next ``width`` columns would not fit."""
    if not isinstance(cache, StaticCache) or full_mask.shape[1] + width <= cache.get_max_length():
        return cache
    return _static_copy(model, cache, full_mask.shape[1], full_mask.shape[1] + width + trajectory_len)


@torch.no_grad()
def sample(
    model,
    tokenizer,
    queries: Sequence[Query],
    space: ActionSpace,
    temperature: float | Sequence[float] | Tensor = 1.0,
    generator: torch.Generator | None = None,
    tool: ToolHook | None = None,
    context: SharedContext | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    static_cache: bool = False,
) -> Trajectories:
    """Draw one trajectory per query (repeat a query to draw several).

    ``temperature`` (scalar or one per row) tempers the behaviour policy only; 0 picks the most
    likely token (greedy decoding). ``top_k`` / ``top_p`` truncate it too (top-k and nucleus
    sampling, ``truncate``). ``context`` is a fixed text before every prompt whose base-model
    cache is reused (``gfnlm.context``); use it only when ``model`` runs as its base model. The log-probs
    recorded in ``sampling_log_pf`` / ``sampling_log_pterm`` are those of the policy itself
    (temperature 1, action-space mask and forced stop applied), which is what the scorer computes.
    ``generator`` must live on the CPU; draws are made there so runs are reproducible across devices.
    ``static_cache`` preallocates the KV cache (see the module's docstring).
    """
    pad_id = require_pad_token(tokenizer)
    device = next(model.parameters()).device
    batch = len(queries)
    temps = _as_row_temperatures(temperature, batch).to(device)
    prompts = encode_prompts(tokenizer, queries)
    prompt_batch = Trajectories.from_records([TrajectoryRecord(q, p, [], []) for q, p in zip(queries, prompts)],
                                             pad_id, device)  # prompts left-padded
    full_mask = prompt_batch.attention_mask if context is None else context.mask(prompt_batch.attention_mask)

    with eval_mode(model):
        # each distinct prompt runs once; its KV cache is then gathered to every row that uses it
        first_rows, row_slot = prompt_batch.distinct_prompts()
        prompt_mask = prompt_batch.attention_mask[first_rows]
        cache = None if context is None else context.cache(len(first_rows), device)
        logits, cache = _next_step_logits(model, prompt_batch.input_ids[first_rows], prompt_mask,
                                          full_mask[first_rows], cache)
        logits = logits[row_slot]
        cache.reorder_cache(row_slot)
        if static_cache:  # room for the prompts and a full trajectory without tools; regrown if they need more
            cache = _static_copy(model, cache, full_mask.shape[1], full_mask.shape[1] + space.max_len + 1)
        generated: list[list[int]] = [[] for _ in range(batch)]
        is_action: list[list[bool]] = [[] for _ in range(batch)]
        log_pf: list[list[float]] = [[] for _ in range(batch)]
        log_pterm: list[list[float]] = [[] for _ in range(batch)]
        n_actions = torch.zeros(batch, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        stop_ids = torch.tensor(space.stop_token_ids, device=device)
        while True:
            log_probs = space.policy_log_probs(logits, n_actions)  # [B, V] the policy itself
            stop_lp = space.stop_log_prob(log_probs)  # [B]
            behaviour = truncate(space.policy_log_probs(logits, n_actions, temps.clamp(min=1e-6)), top_k, top_p)
            drawn = draw_tokens(behaviour.exp().cpu(), generator).to(device)
            token = torch.where(temps == 0, log_probs.argmax(dim=1), drawn)  # [B]
            stops = torch.isin(token, stop_ids)
            token_lp = log_probs.gather(1, token[:, None]).squeeze(1)

            chunks: list[list[int]] = [[] for _ in range(batch)]
            active = (~done).nonzero().flatten().tolist()
            for b in active:
                log_pterm[b].append(float(stop_lp[b]))
                if stops[b]:
                    continue
                tok = int(token[b])
                log_pf[b].append(float(token_lp[b]))
                chunks[b] = [tok] + take_action(queries[b], generated[b], is_action[b], tok, tool)
            n_actions += (~done & ~stops).long()
            done |= stops
            if bool(done.all()):
                break
            width = max(map(len, chunks))
            chunk = torch.full((batch, width), pad_id, dtype=torch.long)
            chunk_mask = torch.zeros((batch, width), dtype=torch.long)
            for b, row in enumerate(chunks):
                if row:
                    chunk[b, : len(row)] = torch.tensor(row)
                    chunk_mask[b, : len(row)] = 1
            chunk, chunk_mask = chunk.to(device), chunk_mask.to(device)
            cache = _room_for(model, cache, full_mask, width, space.max_len + 1)
            full_mask = torch.cat([full_mask, chunk_mask], dim=1)
            logits, cache = _next_step_logits(model, chunk, chunk_mask, full_mask, cache)

    records = [TrajectoryRecord(q, p, g, a) for q, p, g, a in zip(queries, prompts, generated, is_action)]
    traj = Trajectories.from_records(records, pad_id, device=device)
    horizon = traj.horizon
    traj.sampling_log_pf = _pad_rows(log_pf, horizon, device)
    traj.sampling_log_pterm = _pad_rows(log_pterm, horizon + 1, device)
    return traj


def _pad_rows(rows: list[list[float]], width: int, device) -> Tensor:
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out.to(device)

"""Batched autoregressive sampling from the policy, under no_grad with the KV cache kept on.

Sampling never carries gradients: the scorer recomputes log-probabilities in one teacher-forced
pass afterwards (see ``scoring``). All rows of a batch advance together, one action (or the stop)
per decoding step, so a step's work outside the model is a handful of batched tensor operations on
the policy's columns (``ActionLayout``): no per-row Python, no mask rebuilt, one host sync to see
whether every row has stopped. A tool may insert tokens after an action that can trigger it
(``Tool.triggers``); those tokens go through the model in the same cached step as the action, so
the cache is never dropped. Rows then advance by different numbers of tokens in that step; the
shorter ones are padded with masked columns, which the position ids skip, so every row sees
exactly the positions it would see alone.

With a static cache (``Policy(static_cache=True)``) the keys and values live in transformers'
``StaticCache``: buffers preallocated once for the whole trajectory (regrown, rarely, when tool
insertions outrun them), written in place, with the attention mask padded to their length. Every
decoding step then has the same tensor shapes and addresses, which is what ``torch.compile`` and
CUDA graphs need (``Policy(compile=True)`` runs the one-token steps compiled), and no step copies
the cache to grow it. The tokens and log-probs are those of the growing cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor
from transformers import StaticCache

from gfnlm.modes import eval_mode
from gfnlm.scoring import PolicyHead, split_model, vocab_size
from gfnlm.trajectories import ActionLayout, Query, TrajectoryRecord, Trajectories

if TYPE_CHECKING:
    from gfnlm.context import SharedContext
    from gfnlm.policy import Policy


class Tool:
    """Inserts context tokens after some actions (the calculator writes a value after "=").

    ``__call__`` gets the query and the generated ids so far (actions and earlier insertions) and
    returns the ids to insert (empty: nothing). ``triggers`` says which action tokens can make it
    insert anything at all, so that the sampler asks only the rows that wrote one; by default every
    token can, and the sampler asks after every action.
    """

    def __call__(self, query: Query, generated: list[int]) -> list[int]:
        raise NotImplementedError

    def triggers(self, token_ids: Sequence[int]) -> list[bool]:
        return [True] * len(token_ids)


ToolHook = Tool | Callable[[Query, list[int]], list[int]]
"""A ``Tool``, or a plain function with its ``__call__``'s signature (asked after every action)."""


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


def _trigger_columns(tool: ToolHook | None, layout: ActionLayout) -> Tensor | None:
    """[A] bool: the columns whose token can make ``tool`` insert; None without a tool."""
    if tool is None:
        return None
    ids = list(range(layout.vocab_size)) if layout.token_ids is None else layout.token_ids.tolist()
    flags = tool.triggers(ids) if isinstance(tool, Tool) else [True] * len(ids)
    return torch.tensor(flags, dtype=torch.bool, device=layout.is_stop.device)


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
    """One column per row of ``probs`` [B, V] (unnormalised is fine), by inverse CDF: [B], on probs' device.

    Same distribution as ``torch.multinomial(probs, 1)``, about ten times faster over a 50k-token
    vocabulary on CPU. Columns of probability zero are never drawn. The B uniforms come from
    ``generator`` on the CPU, so a seed gives the same draws on every device.
    """
    cdf = probs.double().cumsum(dim=1)  # [B, V]
    u = torch.rand((probs.shape[0], 1), generator=generator, dtype=torch.float64).to(cdf.device) * cdf[:, -1:]
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




def _choose(log_probs: Tensor, temps: Tensor, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None) -> Tensor:
    """Each row's column [B] from the policy's log-probs [B, A]: the likeliest at temperature 0, else a
    draw from the tempered (and truncated) policy, softmax(log q / T), which is softmax(logits / T)."""
    behaviour = log_probs
    if not bool((temps == 1).all()):
        behaviour = log_probs / temps.clamp(min=1e-6)[:, None]
    behaviour = truncate(behaviour.log_softmax(dim=-1) if top_k or top_p else behaviour, top_k, top_p)
    drawn = draw_tokens((behaviour - behaviour.amax(dim=1, keepdim=True)).exp(), generator)
    return torch.where(temps == 0, log_probs.argmax(dim=1), drawn)


@torch.no_grad()
def sample(
    policy: Policy,
    queries: Sequence[Query],
    temperature: float | Sequence[float] | Tensor = 1.0,
    generator: torch.Generator | None = None,
    context: SharedContext | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Trajectories:
    """Draw one trajectory per query from ``policy`` (repeat a query to draw several); ``Policy.sample``.

    ``temperature`` (scalar or one per row) tempers the behaviour policy only; 0 picks the most
    likely token (greedy decoding). ``top_k`` / ``top_p`` truncate it too (top-k and nucleus
    sampling, ``truncate``). ``context`` is a fixed text before every prompt whose base-model
    cache is reused (``gfnlm.context``); use it only when the model runs as its base model. The log-probs
    recorded in ``sampling_log_pf`` / ``sampling_log_pterm`` are those of the policy itself
    (temperature 1, action-space mask and forced stop applied), which is what the scorer computes.
    ``generator`` must live on the CPU; draws are made from it so runs are reproducible across devices.
    """
    model, space, tool = policy.model, policy.space, policy.tool
    pad_id = require_pad_token(policy.tokenizer)
    device = policy.device
    batch = len(queries)
    temps = _as_row_temperatures(temperature, batch).to(device)
    layout = space.layout(vocab_size(model), device)
    prompts = encode_prompts(policy.tokenizer, queries)
    prompt_batch = Trajectories.from_records([TrajectoryRecord(q, p, [], []) for q, p in zip(queries, prompts)],
                                             pad_id, device)  # prompts left-padded
    with eval_mode(model):
        head = PolicyHead(model, layout)
        triggers = _trigger_columns(tool, layout)
        decoder = _Decoder(policy, prompt_batch, context, new_tokens=space.max_len + 1)
        hidden = decoder.prefill()  # [B, H]
        steps: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # per step: token [B], acted [B], log_pf [B], log_pterm [B]
        insertions: dict[tuple[int, int], list[int]] = {}  # (row, step) -> the tool's tokens after that action
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(space.max_len + 1):  # every row still going has taken exactly `step` actions
            log_probs = layout.log_probs(head(hidden), step)  # [B, A] the policy itself
            column = _choose(log_probs, temps, top_k, top_p, generator)  # [B]
            acts = ~done & ~layout.is_stop[column]
            token = torch.where(acts, layout.tokens(column), pad_id)
            log_pf = torch.where(acts, log_probs.gather(1, column[:, None]).squeeze(1), 0.0)
            steps.append((token, acts, log_pf, torch.where(done, 0.0, layout.stop_log_prob(log_probs))))
            done |= ~acts
            if bool(done.all()):
                break
            chunk, chunk_mask = token[:, None], acts[:, None]  # [B, 1]
            if triggers is not None and bool((fire := acts & triggers[column]).any()):
                chunk, chunk_mask = _insert(policy, queries, steps, insertions, fire, pad_id)  # [B, 1 + insertion]
            hidden = decoder.step(chunk, chunk_mask)
    return _collate(policy, queries, prompts, steps, insertions, pad_id)


def _generated_so_far(steps: list[tuple[Tensor, ...]], insertions: dict[tuple[int, int], list[int]], row: int) -> list[int]:
    ids = []
    for step, (token, acts, _, _) in enumerate(steps):
        if bool(acts[row]):
            ids.append(int(token[row]))
            ids += insertions.get((row, step), [])
    return ids


def _insert(policy: Policy, queries: Sequence[Query], steps: list[tuple[Tensor, ...]],
            insertions: dict[tuple[int, int], list[int]], fire: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Ask the tool about the rows in ``fire`` [B] (they just wrote a trigger token); record what it inserts.
    Returns this step's chunk and its mask [B, 1 + longest insertion]: each row's action, then its insertion."""
    step, (token, acts) = len(steps) - 1, steps[-1][:2]
    rows = fire.nonzero().flatten().tolist()
    for row in rows:
        inserted = list(policy.tool(queries[row], _generated_so_far(steps, insertions, row)))
        if inserted:
            insertions[(row, step)] = inserted
    width = 1 + max((len(insertions.get((row, step), [])) for row in rows), default=0)
    chunk = torch.full((len(queries), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(queries), width), dtype=torch.bool)
    chunk[:, 0], mask[:, 0] = token.cpu(), acts.cpu()
    for row in rows:
        inserted = insertions.get((row, step), [])
        chunk[row, 1 : 1 + len(inserted)] = torch.tensor(inserted, dtype=torch.long)
        mask[row, 1 : 1 + len(inserted)] = True
    return chunk.to(token.device), mask.to(token.device)


def _collate(policy: Policy, queries: Sequence[Query], prompts: list[list[int]], steps: list[tuple[Tensor, ...]],
             insertions: dict[tuple[int, int], list[int]], pad_id: int) -> Trajectories:
    """The sampled batch, with the log-probs recorded while sampling ([B, T], [B, T+1])."""
    tokens, acted, log_pf, log_pterm = (torch.stack(parts, dim=1) for parts in zip(*steps))  # [B, S] each
    records = []
    for row, (query, prompt, row_tokens, row_acted) in enumerate(zip(queries, prompts, tokens.tolist(), acted.tolist())):
        generated: list[int] = []
        is_action: list[bool] = []
        for step, (tok, act) in enumerate(zip(row_tokens, row_acted)):
            if act:
                inserted = insertions.get((row, step), [])
                generated += [tok, *inserted]
                is_action += [True] + [False] * len(inserted)
        records.append(TrajectoryRecord(query, prompt, generated, is_action))
    traj = Trajectories.from_records(records, pad_id, device=policy.device)
    horizon = traj.horizon
    traj.sampling_log_pf = log_pf[:, :horizon].float()
    traj.sampling_log_pterm = log_pterm[:, : horizon + 1].float()
    return traj


class _Decoder:
    """The model's side of sampling: the prompts' prefill, then one cached forward per decoding step.

    It holds the KV cache (growing, or a preallocated ``StaticCache``), the attention mask over every
    column written so far and each row's next position. Each distinct prompt runs once and its keys
    and values are gathered to the rows that share it (all the samples of one query).
    """

    def __init__(self, policy: Policy, prompts: Trajectories, context: SharedContext | None, new_tokens: int):
        self.policy, self.prompts, self.context, self.new_tokens = policy, prompts, context, new_tokens
        self.body = split_model(policy.model)[0]
        mask = prompts.attention_mask
        self.mask = mask if context is None else context.mask(mask)  # [B, columns written]
        self.columns = self.mask.shape[1]
        self.next_position = self.mask.sum(dim=1)  # [B]
        self.cache = None

    def prefill(self) -> Tensor:
        """The prompts through the model; returns each row's last hidden state [B, H]."""
        first_rows, row_slot = self.prompts.distinct_prompts()
        mask = self.mask[first_rows]
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -self.prompts.prompt_len :]
        cache = None if self.context is None else self.context.cache(len(first_rows), mask.device)
        out = self.body(input_ids=self.prompts.input_ids[first_rows], attention_mask=mask, position_ids=positions,
                        cache=cache, use_cache=True)
        if self.policy.static_cache:  # room for the prompts and a whole trajectory without tools
            self.cache = _static_copy(self.policy.model, out.cache, self.columns, self.columns + self.new_tokens, row_slot)
            self.mask = _pad_columns(self.mask, self.cache.get_max_length())
        else:
            self.cache = out.cache
            self.cache.reorder_cache(row_slot)
        return out.last_hidden_state[row_slot, -1]  # left-padded prompts end in their last column

    def step(self, chunk: Tensor, chunk_mask: Tensor) -> Tensor:
        """Feed ``chunk`` [B, K] (real where ``chunk_mask``); returns each row's hidden state at its last real
        column [B, H] (rows without one: any)."""
        width = chunk.shape[1]
        chunk_mask = chunk_mask.long()
        positions = self.next_position[:, None] + chunk_mask.cumsum(dim=1) - 1  # [B, K]
        self.next_position = self.next_position + chunk_mask.sum(dim=1)
        if isinstance(self.cache, StaticCache):
            if self.columns + width > self.cache.get_max_length():  # tool insertions outran the buffers
                self.cache = _static_copy(self.policy.model, self.cache, self.columns,
                                          self.columns + width + self.new_tokens)
                self.mask = _pad_columns(self.mask[:, : self.columns], self.cache.get_max_length())
            self.mask[:, self.columns : self.columns + width] = chunk_mask
        else:
            self.mask = torch.cat([self.mask, chunk_mask], dim=1)
        self.columns += width
        if width == 1 and self.policy.compiled_step is not None:
            return self.policy.compiled_step(self.body, chunk, self.mask, positions.clamp(min=0), self.cache)
        hidden = decode_step(self.body, chunk, self.mask, positions.clamp(min=0), self.cache, last=False)  # [B, K, H]
        last = torch.where(chunk_mask.bool(), torch.arange(width, device=chunk.device), 0).amax(dim=1)  # [B]
        return hidden[torch.arange(len(hidden), device=hidden.device), last]


def decode_step(body, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache, last: bool = True) -> Tensor:
    """One cached forward of the decoder body: hidden states [B, K, H], or of the last column [B, H].
    The function ``Policy(compile=True)`` compiles, for one-token steps over a static cache."""
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                  use_cache=True).last_hidden_state
    return hidden[:, -1] if last else hidden


def _pad_columns(mask: Tensor, width: int) -> Tensor:
    """``mask`` [B, C] padded with zeros on the right to [B, width] (a static cache's unwritten columns)."""
    return torch.nn.functional.pad(mask, (0, width - mask.shape[1]))


def _static_copy(model, cache, columns: int, max_cache_len: int, rows: Tensor | None = None) -> StaticCache:
    """A ``StaticCache`` of ``max_cache_len`` columns holding the first ``columns`` of ``cache``'s keys and
    values (of ``rows``, in that order, when given: one copy instead of a gather then a copy).

    Sliding-window layers (Gemma 3's) must hold the whole sequence: past the window a static layer
    rolls its buffer, which the copy could not follow."""
    window = getattr(model.config.get_text_config(decoder=True), "sliding_window", None)
    if window and any(getattr(layer, "is_sliding", False) for layer in cache.layers) and max_cache_len > window:
        raise ValueError(f"static_cache needs sequences within the model's sliding window ({window} tokens), "
                         f"these need {max_cache_len}; sample with static_cache=False")
    static = StaticCache(config=model.config, max_cache_len=max_cache_len)
    for index, layer in enumerate(cache.layers):
        keys, values = layer.keys[:, :, :columns], layer.values[:, :, :columns]
        if rows is not None:
            keys, values = keys[rows], values[rows]
        static.update(keys, values, index)
    return static

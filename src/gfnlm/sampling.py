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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Protocol, Sequence

import torch
from torch import Tensor
from transformers import StaticCache

from gfnlm.modes import eval_mode
from gfnlm.scoring import PolicyHead, split_model, vocab_size
from gfnlm.trajectories import ActionLayout, ActionSpace, Query, TrajectoryRecord, Trajectories

if TYPE_CHECKING:
    from gfnlm.context import SharedContext

STATIC_CACHE_BUCKET = 32
"""Static caches are allocated in multiples of this many columns, so that compiled steps see few shapes."""


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


class SamplingPolicy(Protocol):
    """What the sampler reads of a policy (``gfnlm.policy.Policy``, which calls it)."""

    model: Any
    tokenizer: Any
    space: ActionSpace
    tool: ToolHook | None
    device: torch.device
    static_cache: bool
    compiled_step: Callable | None

    def adapters_in_compute_dtype(self) -> ContextManager[None]: ...


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
    policy: SamplingPolicy,
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

    Every decoding step feeds one token per row: the action the row just chose, or the next token
    a tool inserted after its previous action (the row chooses again once they are all in), or
    nothing once it has stopped. Steps never widen, so a compiled step serves every one of them.
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
    steps: list[_Step] = []
    with eval_mode(model), policy.adapters_in_compute_dtype():
        head = PolicyHead(model, layout)
        triggers = _trigger_columns(tool, layout)
        decoder = _Decoder(policy, prompt_batch, context, new_tokens=space.max_len + 1)
        hidden = decoder.prefill()  # [B, H]
        pending: dict[int, list[int]] = {}  # row -> inserted tokens still to feed
        n_actions = torch.zeros(batch, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        feeding = torch.zeros(batch, dtype=torch.bool, device=device)  # rows with inserted tokens to feed
        while True:
            chooses = ~done & ~feeding  # rows at the end of a state: they act or stop
            counts = len(steps) if tool is None else n_actions  # without a tool every going row is at step len(steps)
            log_probs = layout.log_probs(head(hidden), counts)  # [B, A] the policy itself
            column = _choose(log_probs, temps, top_k, top_p, generator)  # [B]
            acts = chooses & ~layout.is_stop[column]
            step = _Step(token=torch.where(acts, layout.tokens(column), pad_id), acted=acts, fed=feeding.clone(),
                         chose=chooses, log_pf=log_probs.gather(1, column[:, None]).squeeze(1),
                         log_pterm=layout.stop_log_prob(log_probs))
            steps.append(step)
            done |= chooses & ~acts
            n_actions += acts.long()
            if pending:
                _feed_inserted(step, pending, feeding)
            if triggers is not None and bool((fire := acts & triggers[column]).any()):
                _ask_tool(policy, queries, steps, fire, pending, feeding)
            if bool(done.all()):
                break
            hidden = decoder.step(step.token[:, None], (step.acted | step.fed)[:, None])
    return _collate(policy, queries, prompts, steps, pad_id)


@dataclass
class _Step:
    """One decoding step of every row ([B] each): the token it fed (an action, an inserted token or padding),
    and the policy's log-probs of the chosen column and of stopping, for the rows that chose."""

    token: Tensor  # long
    acted: Tensor  # bool: the token is an action
    fed: Tensor  # bool: the token is a tool's insertion
    chose: Tensor  # bool: the row acted or stopped
    log_pf: Tensor
    log_pterm: Tensor


def _feed_inserted(step: _Step, pending: dict[int, list[int]], feeding: Tensor) -> None:
    """This step's tokens of the rows still feeding a tool's insertion (one each, in order), in place."""
    for row in feeding.nonzero().flatten().tolist():
        step.token[row] = pending[row].pop(0)
        if not pending[row]:
            del pending[row]
            feeding[row] = False


def _ask_tool(policy: SamplingPolicy, queries: Sequence[Query], steps: list[_Step], fire: Tensor,
              pending: dict[int, list[int]], feeding: Tensor) -> None:
    """Ask the tool about the rows in ``fire`` [B] (they just wrote a trigger token); queue what it inserts."""
    for row in fire.nonzero().flatten().tolist():
        generated = [int(s.token[row]) for s in steps if bool(s.acted[row] | s.fed[row])]
        inserted = list(policy.tool(queries[row], generated))
        if inserted:
            pending[row] = inserted
            feeding[row] = True


def _collate(policy: SamplingPolicy, queries: Sequence[Query], prompts: list[list[int]], steps: list[_Step],
             pad_id: int) -> Trajectories:
    """The sampled batch, with the log-probs recorded while sampling ([B, T], [B, T+1])."""
    columns = {name: torch.stack([getattr(s, name) for s in steps], dim=1).tolist()  # [B, S] each
               for name in ("token", "acted", "fed", "chose", "log_pf", "log_pterm")}
    records, log_pf, log_pterm = [], [], []
    for row, (query, prompt) in enumerate(zip(queries, prompts)):
        token, acted, fed, chose = (columns[name][row] for name in ("token", "acted", "fed", "chose"))
        kept = [k for k in range(len(steps)) if acted[k] or fed[k]]
        records.append(TrajectoryRecord(query, prompt, [token[k] for k in kept], [acted[k] for k in kept]))
        log_pf.append([columns["log_pf"][row][k] for k in range(len(steps)) if acted[k]])
        log_pterm.append([columns["log_pterm"][row][k] for k in range(len(steps)) if chose[k]])
    traj = Trajectories.from_records(records, pad_id, device=policy.device)
    traj.sampling_log_pf = _pad_rows(log_pf, traj.horizon, policy.device)
    traj.sampling_log_pterm = _pad_rows(log_pterm, traj.horizon + 1, policy.device)
    return traj


def _pad_rows(rows: list[list[float]], width: int, device) -> Tensor:
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out.to(device)


class _Decoder:
    """The model's side of sampling: the prompts' prefill, then one cached forward of one token per row.

    It holds the KV cache (growing, or a preallocated ``StaticCache``), the attention mask over every
    column written so far and each row's next position. Each distinct prompt runs once and its keys
    and values are gathered to the rows that share it (all the samples of one query).
    """

    def __init__(self, policy: SamplingPolicy, prompts: Trajectories, context: SharedContext | None, new_tokens: int):
        self.policy, self.prompts, self.context, self.new_tokens = policy, prompts, context, new_tokens
        self.body = split_model(policy.model)[0]
        mask = prompts.attention_mask
        self.mask = mask if context is None else context.mask(mask)  # [B, columns written] (static: [B, capacity])
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
            self.cache = self._static(out.cache, rows=row_slot)
        else:
            self.cache = out.cache
            self.cache.reorder_cache(row_slot)
        return out.last_hidden_state[row_slot, -1]  # left-padded prompts end in their last column

    def _static(self, cache, rows: Tensor | None = None) -> StaticCache:
        """A static copy of ``cache`` with room for ``new_tokens`` more columns, in multiples of a bucket (so that
        compiled steps see few shapes); the mask padded to it."""
        bucket = STATIC_CACHE_BUCKET
        capacity = -(-(self.columns + self.new_tokens) // bucket) * bucket
        static = _static_copy(self.policy.model, cache, self.columns, capacity, rows)
        self.mask = _pad_columns(self.mask[:, : self.columns], capacity)
        return static

    def step(self, tokens: Tensor, real: Tensor) -> Tensor:
        """Feed one token per row ([B, 1], real where ``real`` [B, 1]); returns each row's hidden state [B, H]."""
        real = real.long()
        positions = self.next_position[:, None] + real - 1  # [B, 1]; a padding column repeats the last position
        self.next_position = self.next_position + real[:, 0]
        if isinstance(self.cache, StaticCache):
            if self.columns == self.cache.get_max_length():  # tool insertions used up the room
                self.cache = self._static(self.cache)
            self.mask[:, self.columns] = real[:, 0]
        else:
            self.mask = torch.cat([self.mask, real], dim=1)
        self.columns += 1
        step = self.policy.compiled_step or decode_step
        return step(self.body, tokens, self.mask, positions.clamp(min=0), self.cache)


def decode_step(body, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache) -> Tensor:
    """One cached forward of one token per row through the decoder body: [B, 1] -> hidden states [B, H]. The
    function ``Policy(compile=True)`` compiles (over a static cache)."""
    return body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                use_cache=True).last_hidden_state[:, -1]


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

"""Queries, the action space of the policy, and batches of trajectories.

A trajectory is a prompt X followed by generated tokens. Most generated tokens are *actions*
chosen by the policy; a tool (the calculator) may insert further tokens after an action, which
are context, not actions. State s_i is everything up to and including action i and the tokens
inserted after it; s_0 is the prompt. The stop action ⊤ is never stored as a token: a trajectory
of n actions ends in state s_n, from which it stopped.

Batches keep prompts left-padded so that every prompt ends in column P-1 and the generated
region starts in column P; a teacher-forced forward pass then needs logits for columns
P-1 .. L-1 only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class Query:
    """One conditioning input X (and, for posterior tasks, the observation Y it must explain)."""

    prompt: str
    target: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        """Identity used by the replay buffer and log Z: prompt and target together."""
        return self.prompt if self.target is None else f"{self.prompt}\x00{self.target}"


@dataclass(frozen=True)
class ActionSpace:
    """What the policy may do at each state; the one definition shared by sampler and scorer.

    The policy is the language model's next-token distribution restricted to
    ``allowed_token_ids`` and the stop tokens, with the stop action impossible before
    ``min_len`` actions and forced at ``max_len`` (each renormalised). All of it is part of the
    trained policy, so the probabilities the scorer computes are exactly those the sampler draws
    from. States before ``min_len`` cannot terminate; the losses then learn log Z for s_0.
    """

    stop_token_ids: tuple[int, ...]
    max_len: int
    min_len: int = 0
    allowed_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.stop_token_ids:
            raise ValueError("ActionSpace needs at least one stop token id")
        if self.max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {self.max_len}")
        if not 0 <= self.min_len <= self.max_len:
            raise ValueError(f"need 0 <= min_len <= max_len, got min_len={self.min_len}, max_len={self.max_len}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(int(t) for t in self.allowed_token_ids))

    def layout(self, vocab_size: int, device: torch.device | str = "cpu") -> ActionLayout:
        """This space laid out over a vocabulary of ``vocab_size`` tokens on ``device`` (built once, then cached)."""
        return _layout(self, int(vocab_size), torch.device(device))

    def policy_log_probs(self, logits: Tensor, n_actions: Tensor | int) -> Tensor:
        """log q(· | s) over the whole vocabulary at states with ``n_actions`` actions. [N, V] -> [N, V].

        Tokens the policy cannot write get -inf. The same numbers as ``ActionLayout.log_probs`` on the
        policy's columns, for callers that hold full-vocabulary logits (beam search, references in tests).
        """
        layout = self.layout(logits.shape[-1], logits.device)
        return layout.expand(layout.log_probs(layout.select(logits), n_actions))

    def stop_log_prob(self, log_probs: Tensor) -> Tensor:
        """log q(⊤ | s) from whole-vocabulary log-probs [..., V] -> [...] (``ActionLayout.stop_log_prob``)."""
        return _stop_log_prob(log_probs[..., list(self.stop_token_ids)])


@dataclass(frozen=True, eq=False)
class ActionLayout:
    """An action space over a vocabulary of V tokens, as tensors on one device: the policy's A columns.

    The policy can write only its allowed tokens and the stop tokens, so its logits, log-softmax and
    draws need only those A columns: for a restricted space (arithmetic: about 20 of SmolLM2's 49,152
    tokens) the output head and everything after it shrink by the same factor. An unrestricted space
    keeps all V columns in vocabulary order (``token_ids`` None). Built once per space, vocabulary
    and device (``ActionSpace.layout``), so no step rebuilds a mask.
    """

    space: ActionSpace
    vocab_size: int
    token_ids: Tensor | None  # [A] long: the vocabulary id of each column, ascending; None: column = token id
    is_stop: Tensor  # [A] bool: the stop tokens' columns
    column_of: Tensor | None  # [V] long: each token's column, -1 for tokens the policy cannot write
    forced_stop: Tensor  # [A] log-probs of a state at max_len: 0 at the first stop token, -inf elsewhere

    @property
    def width(self) -> int:
        """A, the number of columns."""
        return self.is_stop.shape[0]

    def select(self, logits: Tensor) -> Tensor:
        """The policy's columns of whole-vocabulary values. [..., V] -> [..., A]."""
        return logits if self.token_ids is None else logits.index_select(-1, self.token_ids)

    def expand(self, values: Tensor, fill: float = float("-inf")) -> Tensor:
        """Column values back on the whole vocabulary, ``fill`` elsewhere. [N, A] -> [N, V]."""
        if self.token_ids is None:
            return values
        out = values.new_full((*values.shape[:-1], self.vocab_size), fill)
        return out.index_copy_(-1, self.token_ids, values)

    def tokens(self, columns: Tensor) -> Tensor:
        """Vocabulary ids of columns (any shape)."""
        return columns if self.token_ids is None else self.token_ids[columns]

    def columns(self, token_ids: Tensor) -> Tensor:
        """Columns of vocabulary ids (any shape); -1 for a token the policy cannot write."""
        return token_ids if self.column_of is None else self.column_of[token_ids]

    def log_probs(self, logits: Tensor, n_actions: Tensor | int) -> Tensor:
        """log q(· | s) on the policy's columns at states with ``n_actions`` actions ([N] or one count
        for every row). [N, A] -> [N, A] float32.

        The stop columns are masked before ``min_len`` actions; at ``max_len`` the first stop token
        takes all the mass. The other stop tokens' columns then hold -inf, so that summing the stop
        columns (``stop_log_prob``) counts the forced stop once.
        """
        logits = logits.float()
        space, minus_inf = self.space, float("-inf")
        if isinstance(n_actions, int):  # every row at the same count: the sampler's case, no per-row work
            if n_actions >= space.max_len:
                return self.forced_stop.expand_as(logits).clone()
            if n_actions < space.min_len:
                logits = logits.masked_fill(self.is_stop, minus_inf)
            return logits.log_softmax(dim=-1)
        n_actions = n_actions.to(logits.device)[:, None]
        logits = logits.masked_fill((n_actions < space.min_len) & self.is_stop, minus_inf)
        return torch.where(n_actions >= space.max_len, self.forced_stop, logits.log_softmax(dim=-1))

    def stop_log_prob(self, log_probs: Tensor) -> Tensor:
        """log q(⊤ | s): the stop columns' probabilities summed. [..., A] -> [...]."""
        return _stop_log_prob(log_probs[..., self.is_stop])


def _stop_log_prob(stops: Tensor) -> Tensor:
    """logsumexp over the stop tokens' log-probs [..., S] -> [...]: -inf where stopping is impossible,
    without the NaN gradient that ``logsumexp`` of all -inf inputs would send back."""
    possible = torch.isfinite(stops).any(dim=-1)
    total = torch.where(possible[..., None], stops, 0.0).logsumexp(dim=-1)
    return torch.where(possible, total, float("-inf"))


@functools.lru_cache(maxsize=64)
def _layout(space: ActionSpace, vocab_size: int, device: torch.device) -> ActionLayout:
    stops = set(space.stop_token_ids)
    if max(stops) >= vocab_size or (space.allowed_token_ids and max(space.allowed_token_ids) >= vocab_size):
        raise ValueError(f"the action space names token ids beyond the vocabulary of {vocab_size} tokens")
    ids = list(range(vocab_size)) if space.allowed_token_ids is None else sorted(stops | set(space.allowed_token_ids))
    is_stop = torch.tensor([t in stops for t in ids], dtype=torch.bool)
    forced_stop = torch.full((len(ids),), float("-inf"))
    forced_stop[ids.index(space.stop_token_ids[0])] = 0.0
    if space.allowed_token_ids is None:
        return ActionLayout(space, vocab_size, None, is_stop.to(device), None, forced_stop.to(device))
    token_ids = torch.tensor(ids, dtype=torch.long)
    column_of = torch.full((vocab_size,), -1, dtype=torch.long)
    column_of[token_ids] = torch.arange(len(ids))
    return ActionLayout(space, vocab_size, token_ids.to(device), is_stop.to(device), column_of.to(device),
                        forced_stop.to(device))


@dataclass
class TrajectoryRecord:
    """One trajectory as plain lists: what the replay buffer stores and batches are built from."""

    query: Query
    prompt_ids: list[int]
    generated_ids: list[int]
    is_action: list[bool]

    @property
    def length(self) -> int:
        return sum(self.is_action)

    def state_ends(self) -> list[int]:
        """For each state s_0..s_n, how many generated tokens it holds.

        State i ends just before action i+1, so tool tokens after action i belong to state i.
        """
        return [k for k, is_act in enumerate(self.is_action) if is_act] + [len(self.generated_ids)]


@dataclass
class Trajectories:
    """A batch of trajectories, right-aligned prompts, ready for one teacher-forced forward pass."""

    input_ids: Tensor  # [B, L] long; prompt in columns < P (left-padded), generated tokens from P
    attention_mask: Tensor  # [B, L] long; 0 on padding
    is_action: Tensor  # [B, L] bool; True where the policy chose the token
    prompt_len: int  # P
    queries: list[Query]
    # log-probs of the (untempered) policy recorded while sampling, for checks: [B, T], [B, T+1]
    sampling_log_pf: Tensor | None = None
    sampling_log_pterm: Tensor | None = None

    @property
    def lengths(self) -> Tensor:
        """[B] number of actions n_b."""
        return self.is_action.sum(dim=1)

    @property
    def horizon(self) -> int:
        """T, the largest number of actions in the batch."""
        return int(self.lengths.max()) if len(self) else 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def position_ids(self) -> Tensor:
        """[B, L] positions that skip padding, as the sampler's KV cache saw them."""
        return (self.attention_mask.cumsum(dim=1) - 1).clamp(min=0)

    def distinct_prompts(self) -> tuple[Tensor, Tensor]:
        """The first row of each distinct prompt [U], and each row's prompt index [B].

        Lets a forward pass run every distinct prompt once and share its KV cache.
        """
        p = self.prompt_len
        key = torch.cat([self.input_ids[:, :p], self.attention_mask[:, :p]], dim=1)  # [B, 2P]
        _, inverse = torch.unique(key, dim=0, return_inverse=True)
        rows = torch.arange(len(inverse), device=key.device)
        first = torch.zeros(int(inverse.max()) + 1, dtype=torch.long, device=key.device)
        first.scatter_reduce_(0, inverse, rows, reduce="amin", include_self=False)
        return first, inverse

    def action_columns(self) -> Tensor:
        """[B, T] column of action k (k < n_b); padded with the last column."""
        batch, width = self.is_action.shape
        horizon = self.horizon
        cols = torch.full((batch, horizon + 1), width - 1, dtype=torch.long, device=self.input_ids.device)
        rank = self.is_action.long().cumsum(dim=1) - 1  # action rank of each column
        target = torch.where(self.is_action, rank, horizon)  # non-actions go to the spill slot
        column = torch.arange(width, device=cols.device).expand(batch, width)
        cols.scatter_(1, target, column)
        return cols[:, :horizon]

    def state_columns(self) -> Tensor:
        """[B, T+1] column of the last token of state s_i; past n_b, the last state's column.

        s_i (i < n_b) ends at the last real token before action i+1; s_{n_b} at the last real token.
        """
        batch, width = self.input_ids.shape
        column = torch.arange(width, device=self.input_ids.device).expand(batch, width)
        last_real = torch.where(self.attention_mask.bool(), column, -1).cummax(dim=1).values  # [B, L]
        before_action = last_real.gather(1, (self.action_columns() - 1).clamp(min=0))  # [B, T]
        final = last_real[:, -1:].expand(batch, 1)
        cols = torch.cat([before_action, final], dim=1)  # [B, T+1]
        state_index = torch.arange(self.horizon + 1, device=cols.device)[None, :]
        from_end = state_index >= self.lengths[:, None]  # s_{n_b} and the padding states after it
        return torch.where(from_end, final, cols)

    def generated_texts(
        self, tokenizer, upto_state: bool = False, skip_special_tokens: bool = True
    ) -> list[str] | list[list[str]]:
        """Decoded generated text of each trajectory, or of every prefix state s_0..s_{n_b}."""
        records = self.records()
        if not upto_state:
            return [tokenizer.decode(r.generated_ids, skip_special_tokens=skip_special_tokens) for r in records]
        out = []
        for r in records:
            out.append([tokenizer.decode(r.generated_ids[:end], skip_special_tokens=skip_special_tokens) for end in r.state_ends()])
        return out

    def records(self) -> list[TrajectoryRecord]:
        """Split the batch back into per-trajectory lists (padding dropped)."""
        out = []
        ids, mask, act = self.input_ids.tolist(), self.attention_mask.tolist(), self.is_action.tolist()
        p = self.prompt_len
        for b, query in enumerate(self.queries):
            prompt = [t for t, m in zip(ids[b][:p], mask[b][:p]) if m]
            gen = [(t, a) for t, m, a in zip(ids[b][p:], mask[b][p:], act[b][p:]) if m]
            out.append(TrajectoryRecord(query, prompt, [t for t, _ in gen], [a for _, a in gen]))
        return out

    @classmethod
    def from_records(cls, records: Sequence[TrajectoryRecord], pad_token_id: int, device: torch.device | str = "cpu") -> "Trajectories":
        """Collate records: prompts left-padded to a common end column, generations right-padded."""
        if not records:
            raise ValueError("cannot build a batch from zero trajectories")
        prompt_len = max(len(r.prompt_ids) for r in records)
        gen_len = max(len(r.generated_ids) for r in records)
        width = prompt_len + gen_len
        input_ids = torch.full((len(records), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(records), width), dtype=torch.long)
        is_action = torch.zeros((len(records), width), dtype=torch.bool)
        for b, r in enumerate(records):
            if len(r.generated_ids) != len(r.is_action):
                raise ValueError("generated_ids and is_action differ in length")
            start = prompt_len - len(r.prompt_ids)
            stop = prompt_len + len(r.generated_ids)
            input_ids[b, start:stop] = torch.tensor(r.prompt_ids + r.generated_ids, dtype=torch.long)
            attention[b, start:stop] = 1
            is_action[b, prompt_len:stop] = torch.tensor(r.is_action, dtype=torch.bool)
        return cls(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            is_action=is_action.to(device),
            prompt_len=prompt_len,
            queries=[r.query for r in records],
        )

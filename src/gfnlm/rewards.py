"""Rewards: callables that map a batch of trajectories to log R(s_i ⊤) for every prefix state.

Every reward returns a tensor [B, T+1] (T = ``traj.horizon``), computed without gradients.
Entries past a trajectory's length are ignored by the losses. The trainer divides by the
current reward temperature; rewards themselves return untempered log R.

LM rewards use the policy's own weights with the LoRA adapter switched off (or any other model
passed in), and score every prefix of every trajectory in ONE forward pass:

* ``LMStopReward``   log p_LM(s_i ⊤ | X): the prefix's likelihood plus the model's stop probability.
* ``LMSuffixReward`` log p_LM(s_i Y | X): the prefix's likelihood plus the likelihood of the
  observation Y after it. The T+1 continuations are packed behind the trajectory as copies of Y,
  each attending (through a 4D attention mask) only to its own prefix and to itself, with
  positions continuing from that prefix — identical to T+1 separate passes, at the cost of one.

``TextReward`` wraps any Python function of the decoded text.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from gfnlm.losses import state_mask
from gfnlm.modes import adapter_disabled, eval_mode
from gfnlm.scoring import compute_dtype, head_log_probs, shared_prompt_hidden, split_model
from gfnlm.trajectories import ActionSpace, Query, TrajectoryRecord, Trajectories

if TYPE_CHECKING:
    from gfnlm.context import SharedContext
    from gfnlm.policy import Policy


class Reward(Protocol):
    def __call__(self, traj: Trajectories) -> Tensor:
        """log R(s_i ⊤) [B, T+1]."""
        ...


@runtime_checkable
class TerminalReward(Reward, Protocol):
    """A reward that computes the terminal state's log R for less than all of ``__call__`` (``LMSuffixReward``:
    two plain passes instead of T + 1 copies of Y); ``terminal_log_rewards`` uses it where it exists."""

    def terminal(self, traj: Trajectories) -> Tensor:
        """log R(x ⊤) of each trajectory's terminal state x: [B]."""
        ...


class RewardError(ValueError):
    """A reward returned something the losses cannot use."""


def check_log_rewards(log_r: Tensor, traj: Trajectories, name: str = "reward") -> Tensor:
    """Validate shape and finiteness on the states that exist; return ``log_r`` as float32."""
    expected = (len(traj), traj.horizon + 1)
    if not isinstance(log_r, Tensor) or tuple(log_r.shape) != expected:
        shape = tuple(log_r.shape) if isinstance(log_r, Tensor) else type(log_r).__name__
        raise RewardError(f"{name} must return log-rewards of shape [B, T+1] = {list(expected)}, got {shape}")
    exists = torch.arange(expected[1], device=log_r.device)[None, :] <= traj.lengths.to(log_r.device)[:, None]
    bad = exists & ~torch.isfinite(log_r)
    if bad.any():
        b, i = bad.nonzero()[0].tolist()
        raise RewardError(
            f"{name} returned a non-finite log-reward ({float(log_r[b, i])}) for trajectory {b} at state {i} "
            f"(query {traj.queries[b].prompt!r}); give invalid outputs a finite floor instead"
        )
    return log_r.float()


def compute_log_rewards(reward: Reward, traj: Trajectories) -> Tensor:
    """Call any reward (built-in or user-written) and validate what it returns."""
    name = getattr(reward, "__name__", type(reward).__name__)
    return check_log_rewards(reward(traj), traj, name)


def terminal_values(per_state: Tensor, traj: Trajectories) -> Tensor:
    """Each trajectory's entry at its terminal state, from per-state values such as log R [B, T+1]: [B]."""
    return per_state.gather(1, traj.lengths[:, None].to(per_state.device)).squeeze(1)


def terminal_log_rewards(reward: Reward, traj: Trajectories) -> Tensor:
    """log R of each trajectory's terminal state alone: [B]. A reward that can compute it for less
    than every prefix declares ``terminal(traj)`` (``TerminalReward``, e.g. ``LMSuffixReward``); any other is
    called in full and read at the end."""
    if not isinstance(reward, TerminalReward):
        return terminal_values(compute_log_rewards(reward, traj), traj)
    log_r = reward.terminal(traj)
    if not torch.isfinite(log_r).all():
        raise RewardError(f"{type(reward).__name__}.terminal returned a non-finite log-reward")
    return log_r.float()


def _packed_suffix_inputs(traj: Trajectories, suffix_ids: Sequence[Sequence[int]], pad_id: int, dtype: torch.dtype):
    """Append T+1 copies of each row's suffix Y, less its last token, behind the trajectory, with a 4D additive mask.

    Y's first token is predicted from the state itself, and each copy's token k predicts Y's token k+1, so a
    copy needs Y's first m - 1 tokens (the m-th would predict nothing). Returns input ids [B, L + S], position
    ids [B, L + S], the mask [B, 1, L + S, L + S] (S = (T+1)(m-1), m the longest suffix), the suffixes
    [B, m] and which of their tokens are real [B, m]. Copy i of row b sees the real tokens of state s_i
    and its own earlier real tokens.
    """
    device = traj.input_ids.device
    batch, width = traj.input_ids.shape
    num_states = traj.horizon + 1
    m = max(len(s) for s in suffix_ids)
    suffix = torch.full((batch, m), pad_id, dtype=torch.long, device=device)
    suffix_real = torch.zeros((batch, m), dtype=torch.bool, device=device)
    for b, ids in enumerate(suffix_ids):
        suffix[b, : len(ids)] = torch.tensor(list(ids), dtype=torch.long, device=device)
        suffix_real[b, : len(ids)] = True
    c = m - 1  # tokens per copy
    total = width + num_states * c
    state_cols = traj.state_columns()  # [B, T+1]
    positions = traj.position_ids  # [B, L]
    copy_pos = positions.gather(1, state_cols)[:, :, None] + 1 + torch.arange(c, device=device)  # [B, T+1, c]
    input_ids = torch.cat([traj.input_ids, suffix[:, None, :c].expand(-1, num_states, -1).reshape(batch, -1)], 1)
    position_ids = torch.cat([positions, copy_pos.reshape(batch, -1)], dim=1)

    real_main = traj.attention_mask.bool()  # [B, L]
    col = torch.arange(width, device=device)
    allowed = torch.zeros((batch, total, total), dtype=torch.bool, device=device)
    # the trajectory itself: causal over real tokens
    allowed[:, :width, :width] = (col[None, :, None] >= col[None, None, :]) & real_main[:, None, :]
    # copy i of Y sees the real tokens of state s_i ...
    sees_prefix = (col[None, None, :] <= state_cols[:, :, None]) & real_main[:, None, :]  # [B, T+1, L]
    allowed[:, width:, :width] = sees_prefix[:, :, None, :].expand(-1, -1, c, -1).reshape(batch, -1, width)
    # ... and its own earlier real tokens, causally
    k = torch.arange(c, device=device)
    own = (k[:, None] >= k[None, :])[None] & suffix_real[:, None, :c]  # [B, c, c]
    for i in range(num_states):
        lo = width + i * c
        allowed[:, lo : lo + c, lo : lo + c] = own
    allowed |= torch.eye(total, dtype=torch.bool, device=device)[None]  # padding attends to itself: no NaN rows
    mask = torch.zeros((batch, 1, total, total), dtype=dtype, device=device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return input_ids, position_ids, mask, suffix, suffix_real


@torch.no_grad()
def lm_prefix_log_likelihoods(
    model,
    traj: Trajectories,
    stop_token_ids: Sequence[int] | None = None,
    suffix_ids: Sequence[Sequence[int]] | None = None,
    pad_token_id: int = 0,
    context: SharedContext | None = None,
    prior_weight: float = 1.0,
    likelihood_weight: float = 1.0,
) -> Tensor:
    """For every state s_i: w log p(s_i | X) + v ([log p(⊤ | s_i)] [+ log p(Y | s_i)]), in one pass. [B, T+1].

    log p(s_i | X) counts every generated token of the state, tool insertions included, so the
    reward is the likelihood of the text the model actually sees. With ``context`` (e.g. k-shot
    demonstrations, cached once) every probability is also conditioned on the context before X.
    ``prior_weight`` w scales the prior term and ``likelihood_weight`` v the stop's and Y's (both
    1: the joint; w = 0: the likelihood only).
    """
    batch, width = traj.input_ids.shape
    start = traj.prompt_len - 1  # first column whose logits are needed
    dtype = compute_dtype(model)
    if suffix_ids is not None:
        if len(suffix_ids) != batch or any(len(s) == 0 for s in suffix_ids):
            raise RewardError("suffix rewards need one non-empty suffix Y per trajectory")
        input_ids, position_ids, mask, suffix, suffix_real = _packed_suffix_inputs(traj, suffix_ids, pad_token_id, dtype)
    else:
        input_ids, position_ids, mask = traj.input_ids, traj.position_ids, traj.attention_mask
    if context is not None:  # the context's columns come first, visible to every real token
        position_ids = position_ids + len(context)
        if mask.ndim == 4:
            mask = torch.cat([mask.new_zeros((*mask.shape[:3], len(context))), mask], dim=3)
        else:
            mask = context.mask(mask)
    hidden, _ = shared_prompt_hidden(model, traj, input_ids, position_ids, mask, context)  # [B, total - start, H]
    # the token each column predicts, where it counts: the trajectory's next token, then in the copies Y's next
    live = state_mask(traj.lengths, traj.horizon + 1)  # [B, T+1]: states s_0 .. s_{n_b}
    next_ids = torch.cat([input_ids[:, start + 1 : width], input_ids[:, :1]], dim=1)  # [B, width - start]
    scored = torch.zeros(next_ids.shape, dtype=torch.bool, device=next_ids.device)
    scored[:, : width - traj.prompt_len] = traj.attention_mask[:, traj.prompt_len :].bool()  # real generated tokens
    if suffix_ids is not None:  # Y's tokens 2..m, predicted in the copies of live states
        copies = live.shape[1]
        next_ids = torch.cat([next_ids, suffix[:, None, 1:].expand(-1, copies, -1).reshape(batch, -1)], dim=1)
        scored = torch.cat([scored, (live[:, :, None] & suffix_real[:, None, 1:]).reshape(batch, -1)], dim=1)
    next_lp = head_log_probs(model, hidden, next_ids[..., None], keep=scored).squeeze(-1)  # [B, total - start]
    state_cols = traj.state_columns()  # [B, T+1]

    # log p(s_i | X): cumulative log-prob of the real generated tokens up to the state's last column
    token_lp = next_lp[:, : width - 1 - start] * traj.attention_mask[:, traj.prompt_len :]  # [B, G]
    cumulative = torch.cat([token_lp.new_zeros(batch, 1), token_lp.cumsum(dim=1)], dim=1)  # [B, G+1]
    prior = cumulative.gather(1, state_cols - start)  # [B, T+1]
    likelihood = torch.zeros_like(prior)  # [B, T+1]: log p(⊤ | s_i) and / or log p(Y | s_i)

    # at each state: the stop tokens and Y's first token
    candidates = list(stop_token_ids or [])
    n_stop = len(candidates)
    cand_ids = torch.tensor(candidates, dtype=torch.long, device=input_ids.device).expand(batch, state_cols.shape[1], -1)
    if suffix_ids is not None:
        first = suffix[:, None, :1].expand(-1, state_cols.shape[1], -1)  # [B, T+1, 1]
        cand_ids = torch.cat([cand_ids, first], dim=2)
    if cand_ids.shape[2]:
        state_hidden = hidden.gather(1, (state_cols - start)[..., None].expand(-1, -1, hidden.shape[-1]))
        cand_lp = head_log_probs(model, state_hidden, cand_ids, keep=live)  # [B, T+1, K], 0 past n_b
        if n_stop:
            likelihood = likelihood + cand_lp[..., :n_stop].logsumexp(dim=-1)
        if suffix_ids is not None:
            likelihood = likelihood + cand_lp[..., n_stop]
    if suffix_ids is not None:
        rest = next_lp[:, width - start :].reshape(batch, state_cols.shape[1], suffix.shape[1] - 1)  # Y's tokens 2..m
        likelihood = likelihood + (rest * suffix_real[:, None, 1:]).sum(dim=2)
    return prior_weight * prior + likelihood_weight * likelihood


@torch.no_grad()
def lm_continuation_log_likelihoods(
    model,
    traj: Trajectories,
    continuations: Sequence[Sequence[int]],
    context: SharedContext | None = None,
) -> Tensor:
    """log p(c_k | X s_n) of each continuation c_k after every trajectory's final state: [B, K].

    For choosing among a few answers (class labels): the trajectories run once (each distinct
    prompt once), then each continuation over their KV cache, which is cropped back after each.
    Far cheaper than a suffix reward, which scores every prefix state, or one pass per answer.
    """
    if not continuations or any(len(c) == 0 for c in continuations):
        raise RewardError("every continuation needs at least one token")
    batch, device, p = len(traj), traj.input_ids.device, traj.prompt_len
    mask, positions = traj.attention_mask, traj.position_ids
    if context is not None:
        mask, positions = context.mask(mask), positions + len(context)
    hidden, cache = shared_prompt_hidden(model, traj, traj.input_ids, positions, mask, context)  # [B, 1 + G, H]
    body, _, _ = split_model(model)
    final_col = traj.state_columns().gather(1, traj.lengths[:, None].to(device))  # [B, 1]
    final_hidden = hidden.gather(1, (final_col - (p - 1))[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, 1, H]
    final_pos = positions.gather(1, final_col)  # [B, 1]
    if hasattr(cache, "activate_past_recording"):  # sliding-window layers (Gemma 3) keep what crop() removes
        cache.activate_past_recording()
    scores = []
    for ids in continuations:
        tokens = torch.tensor(list(ids), dtype=torch.long, device=device).expand(batch, -1)  # [B, m]
        log_p = head_log_probs(model, final_hidden, tokens[:, :1, None]).sum(dim=(1, 2))  # [B]
        if tokens.shape[1] > 1:
            rest = tokens[:, :-1]  # [B, m-1]: each predicts the next
            rest_hidden = body(
                input_ids=rest,
                attention_mask=torch.cat([mask, mask.new_ones(rest.shape)], dim=1),
                position_ids=final_pos + 1 + torch.arange(rest.shape[1], device=device),
                cache=cache,
                use_cache=True,
            ).last_hidden_state  # [B, m-1, H]
            log_p = log_p + head_log_probs(model, rest_hidden, tokens[:, 1:, None]).sum(dim=(1, 2))
            cache.crop(-rest.shape[1])  # drop this continuation: back to the trajectories alone
        scores.append(log_p)
    return torch.stack(scores, dim=1).float()  # [B, K]


class LMStopReward:
    """log R(s_i ⊤) = log p_LM(s_i ⊤ | X): the base model's probability of the prefix and of stopping there.

    ``policy``'s model runs with its adapter switched off, in the policy's action space: restricted to
    its allowed tokens and stop tokens, renormalised at every step, as a policy of that space is. The
    target is then the base model's own sampling distribution within the action space (e.g.
    sentences that can only end with "."). The length rules are not applied: the stop is never
    forced, so every state keeps its own probability of stopping.
    """

    def __init__(self, policy: Policy):
        self.policy = policy

    def __call__(self, traj: Trajectories) -> Tensor:
        space, model = self.policy.space, self.policy.model
        with adapter_disabled(model), eval_mode(model):
            if space.allowed_token_ids is None:
                log_r = lm_prefix_log_likelihoods(model, traj, stop_token_ids=space.stop_token_ids)
            else:  # the base model as a policy of the space, without length rules
                unbounded = ActionSpace(space.stop_token_ids, max_len=traj.horizon + 1,
                                        allowed_token_ids=space.allowed_token_ids)
                log_r = policy_prefix_log_likelihoods(self.policy.with_space(unbounded), traj)
        return check_log_rewards(log_r, traj, type(self).__name__)


@torch.no_grad()
def policy_prefix_log_likelihoods(policy: Policy, traj: Trajectories) -> Tensor:
    """log q(z_1..z_i ⊤) of every prefix under ``policy``, in one teacher-forced pass. [B, T+1]."""
    log_pf, log_pterm = policy.score(traj)  # [B, T], [B, T+1]; 0 past each length
    prefix = torch.cat([log_pf.new_zeros(len(traj), 1), log_pf.cumsum(dim=1)], dim=1)  # [B, T+1]
    return prefix + log_pterm


class LMSuffixReward:
    """log R(s_i ⊤) = log p_LM(s_i Y | X): the posterior target p_LM(Z | X, Y) ∝ p_LM(X Z Y).

    ``policy``'s model runs with its adapter switched off. ``suffix`` maps a query to the text Y
    (default: ``query.target``). The weights target
    p_LM(Z | X)^w p_LM(Y | X Z)^v instead (the paper's posterior: w = v = 1). w = 0 keeps only the
    likelihood of Y. v > 1 sharpens the likelihood, so that rationales which make Y likely weigh
    more against a small LM's preference for short ones. Prefer v > 1 to w < 1: p^w with w < 1
    sums to far more than 1 over the exponentially many rationales, most of them junk, and on
    arithmetic w = 0.25 collapsed the policy onto junk digit strings (docs/experiments/arithmetic.md). With
    ``context`` (e.g. k-shot demonstrations) the reward is conditioned on it too,
    p_LM(X Z Y | context) up to a constant per query; its computation is cached once.
    """

    def __init__(
        self,
        policy: Policy,
        suffix: Callable[[Query], str] | None = None,
        prior_weight: float = 1.0,
        likelihood_weight: float = 1.0,
        context: SharedContext | None = None,
    ):
        if prior_weight < 0 or likelihood_weight < 0:
            raise ValueError(f"prior_weight and likelihood_weight must be non-negative, got {prior_weight}, {likelihood_weight}")
        self.policy, self.tokenizer = policy, policy.tokenizer
        self.suffix = suffix or _query_target
        self.prior_weight, self.likelihood_weight = prior_weight, likelihood_weight
        self.context = context

    def _suffix_ids(self, queries: Sequence[Query]) -> list[list[int]]:
        return [self.tokenizer(self.suffix(q), add_special_tokens=False)["input_ids"] for q in queries]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    def __call__(self, traj: Trajectories) -> Tensor:
        model = self.policy.model
        with adapter_disabled(model), eval_mode(model):
            log_r = lm_prefix_log_likelihoods(
                model, traj, suffix_ids=self._suffix_ids(traj.queries), pad_token_id=self.pad_id, context=self.context,
                prior_weight=self.prior_weight, likelihood_weight=self.likelihood_weight,
            )
        return check_log_rewards(log_r, traj, type(self).__name__)

    def terminal(self, traj: Trajectories) -> Tensor:
        """log R of the terminal states only: [B], without the T + 1 copies of Y of ``__call__``.

        Two plain passes: w log p(Z | X) over the trajectory, then v log p(Y | X Z) with Z moved into
        the prompt (horizon 0: one copy of Y). For seeding the buffer with known texts."""
        model, pad = self.policy.model, self.pad_id
        with adapter_disabled(model), eval_mode(model):
            prior = lm_prefix_log_likelihoods(model, traj, pad_token_id=pad, context=self.context)  # [B, T+1]
            whole = [TrajectoryRecord(r.query, r.prompt_ids + r.generated_ids, [], []) for r in traj.records()]
            moved = Trajectories.from_records(whole, pad, traj.input_ids.device)
            likelihood = lm_prefix_log_likelihoods(model, moved, suffix_ids=self._suffix_ids(moved.queries),
                                                   pad_token_id=pad, context=self.context, prior_weight=0.0)[:, 0]  # [B]
        return self.prior_weight * terminal_values(prior, traj) + self.likelihood_weight * likelihood


def _query_target(query: Query) -> str:
    if query.target is None:
        raise RewardError(f"LMSuffixReward needs query.target (Y) for query {query.prompt!r}")
    return query.target


class TextReward:
    """Wraps ``fn(texts, queries) -> rewards`` over decoded prefix texts (one call per batch).

    ``fn`` receives the decoded generated text of every prefix state of every trajectory and
    the matching queries; it returns one number per text: log R if ``log_space`` (default),
    else R > 0. With ``skip_special_tokens=False`` special tokens stay in the text, so that a
    reward can reject them.
    """

    def __init__(
        self,
        fn: Callable[[list[str], list[Query]], Sequence[float]],
        tokenizer,
        log_space: bool = True,
        skip_special_tokens: bool = True,
    ):
        self.fn, self.tokenizer, self.log_space = fn, tokenizer, log_space
        self.skip_special_tokens = skip_special_tokens

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", "reward function")

    def values(self, texts: list[str], queries: list[Query], ids: list[list[int]]) -> list:
        """The function's value of each text (with its query, and its token ids for rewards that want them)."""
        return list(self.fn(texts, queries))

    def log_rewards(self, texts: list[str], queries: list[Query], ids: list[list[int]]) -> list[float]:
        """``values`` checked (one per text) and in log space."""
        values, name = self.values(texts, queries, ids), self.name
        if len(values) != len(texts):
            raise RewardError(f"{name} returned {len(values)} rewards for {len(texts)} texts")
        if not self.log_space:
            if any(v <= 0 for v in values):
                raise RewardError(f"{name} returned a non-positive reward; with log_space=False rewards must be > 0")
            values = [math.log(v) for v in values]
        return [float(v) for v in values]

    def decoded_log_rewards(self, ids: list[list[int]], queries: list[Query]) -> list[float]:
        """``log_rewards`` of the texts these token ids spell."""
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.log_rewards(texts, queries, ids)

    def __call__(self, traj: Trajectories) -> Tensor:
        records = traj.records()
        ids = [r.generated_ids[:end] for r in records for end in r.state_ends()]
        values = iter(self.decoded_log_rewards(ids, [r.query for r in records for _ in r.state_ends()]))
        log_r = torch.zeros((len(traj), traj.horizon + 1), dtype=torch.float32)
        for b, record in enumerate(records):
            for i in range(record.length + 1):
                log_r[b, i] = next(values)
        return check_log_rewards(log_r.to(traj.input_ids.device), traj, self.name)

    def terminal(self, traj: Trajectories) -> Tensor:
        """log R of each whole text only: [B] (buffer seeding, GRPO), one call of the function on B texts."""
        records = traj.records()
        log_r = self.decoded_log_rewards([r.generated_ids for r in records], [r.query for r in records])
        return torch.tensor(log_r, device=traj.input_ids.device)


class TRLReward(TextReward):
    """A reward function written for TRL as a gfnlm reward (``from_trl``).

    TRL calls ``fn(prompts, completions, completion_ids, **columns)`` and reads one float per completion,
    None where the function does not apply. Here every prefix of every trajectory is a completion (the
    losses need each prefix's reward): its text, its token ids, its query's prompt, and the query's
    other dataset columns (``Query.meta``) as lists, as TRL passes a dataset's columns. The value is log R,
    or R > 0 with ``log_space=False``; a None becomes ``missing`` (a log R), or an error without one.
    """

    def __init__(self, fn: Callable[..., Sequence[float | None]], tokenizer, log_space: bool = True,
                 missing: float | None = None):
        super().__init__(fn, tokenizer, log_space)
        self.missing = missing

    def values(self, texts: list[str], queries: list[Query], ids: list[list[int]]) -> list:
        columns = {key: [q.meta.get(key) for q in queries] for key in (queries[0].meta if queries else {})}
        try:
            values = list(self.fn(prompts=[q.prompt for q in queries], completions=texts, completion_ids=ids, **columns))
        except Exception as error:
            raise RewardError(f"the reward function {self.name} raised {type(error).__name__}: {error}") from error
        if None in values:
            if self.missing is None:
                text = texts[values.index(None)]
                raise RewardError(f"{self.name} returned None for the completion {text!r}; give missing_log_reward "
                                  "(a log R for the completions it does not score)")
            fill = self.missing if self.log_space else math.exp(self.missing)  # missing is a log R
            values = [fill if v is None else v for v in values]
        return values


def from_trl(fn: Callable[..., Sequence[float | None]], tokenizer, log_space: bool = True,
             missing: float | None = None) -> TRLReward:
    """A TRL reward function (``f(prompts, completions, **columns) -> list[float | None]``) as a gfnlm reward: its
    value is log R (or R with ``log_space=False``), None becomes ``missing`` (``TRLReward``)."""
    return TRLReward(fn, tokenizer, log_space, missing)


class SumReward:
    """Weighted sum of log-rewards: a product of rewards raised to powers."""

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float] | None = None):
        self.rewards = list(rewards)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.rewards)

    def __call__(self, traj: Trajectories) -> Tensor:
        return sum(w * r(traj) for w, r in zip(self.weights, self.rewards))

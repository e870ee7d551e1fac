"""Decoding rules, one interface: N continuations per query, all inside the same action space.

The baselines of an evaluation differ only in how they pick tokens, never in what they may pick:
every rule draws from the policy of an ``ActionSpace`` (allowed tokens renormalised, no stop
before ``min_len``, stop forced at ``max_len``), so its continuations are comparable with the
GFlowNet's and are scored by the same reward.

* sampling rules go through the one sampler (``Policy.sample``): ``sample`` (temperature 1),
  ``tempered`` (temperature T), ``nucleus`` (top-p), ``top-k``, ``greedy`` (temperature 0);
* ``beam``: transformers' beam search (``generate``, ``length_penalty`` 0, so a hypothesis scores
  its summed log-probability), with the action space as a logits processor;
* ``diverse-beam``: diverse (group) beam search (Vijayakumar et al., 2016), which recent
  transformers no longer ships: ``diverse_beam_search`` below, the same algorithm as the removed
  implementation (Hamming diversity between groups, penalised scores accumulated).

``TokenCounter`` measures the compute a rule spends: the token positions the model runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence, get_args

import torch
from torch import Tensor

from gfnlm.modes import eval_mode
from gfnlm.sampling import encode_prompts, require_pad_token
from gfnlm.trajectories import ActionSpace, Query, TrajectoryRecord, Trajectories

if TYPE_CHECKING:
    from gfnlm.policy import Policy

RuleName = Literal["policy", "sample", "tempered", "nucleus", "top-k", "greedy", "beam", "diverse-beam"]
RULES: tuple[str, ...] = get_args(RuleName)


@dataclass(frozen=True)
class DecodingRule:
    """How to pick N continuations. ``policy`` samples the model as given (a trained adapter on);
    the others are baselines on the base model."""

    name: RuleName
    temperature: float = 1.0  # tempered
    top_p: float = 0.95  # nucleus
    top_k: int = 50  # top-k
    beam_factor: int = 1  # beam and diverse-beam search keep beam_factor x N beams and return the best N
    diversity_penalty: float = 1.0  # diverse-beam: subtracted once per earlier group that chose the token

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ValueError(f"unknown decoding rule {self.name!r}; rules: {', '.join(RULES)}")
        if self.beam_factor < 1:
            raise ValueError(f"beam_factor must be at least 1, got {self.beam_factor}")
        if self.diversity_penalty < 0:
            raise ValueError(f"diversity_penalty must be non-negative, got {self.diversity_penalty}")

    @property
    def label(self) -> str:
        """The rule and its setting, as tables name it."""
        detail = {"tempered": f" T={self.temperature:g}", "nucleus": f" p={self.top_p:g}", "top-k": f" k={self.top_k}",
                  "diverse-beam": f" penalty={self.diversity_penalty:g}"}.get(self.name, "")
        factor = f" x{self.beam_factor}" if self.name in ("beam", "diverse-beam") and self.beam_factor > 1 else ""
        return self.name + detail + factor


class TokenCounter:
    """Counts the token positions the decoder runs (padding included), with and without gradients."""

    def __init__(self, model):
        from gfnlm.scoring import split_model

        self.body = split_model(model)[0]
        self.with_grad = self.without_grad = 0
        self.handle = self.body.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        n = ids.numel() if ids is not None else kwargs["inputs_embeds"].shape[:2].numel()
        if torch.is_grad_enabled():
            self.with_grad += n
        else:
            self.without_grad += n

    @property
    def total(self) -> int:
        return self.with_grad + self.without_grad

    def reset(self) -> None:
        self.with_grad = self.without_grad = 0

    def remove(self) -> None:
        self.handle.remove()

    def flops(self, n_params: int) -> float:
        """2 N per token forward; backward through frozen weights (LoRA) costs about as much again."""
        return 2 * n_params * (self.without_grad + 2 * self.with_grad)


def decode(policy: Policy, queries: Sequence[Query], rule: DecodingRule, n: int,
           generator: torch.Generator | None = None) -> list[list[TrajectoryRecord]]:
    """``n`` continuations of each query by ``rule`` in the policy's action space: one list of records per
    query, in order."""
    if n < 1:
        raise ValueError(f"need at least one continuation per query, got {n}")
    if rule.name == "beam":
        return [beam_search(policy, query, n, rule.beam_factor * n) for query in queries]
    if rule.name == "diverse-beam":
        return [diverse_beam_search(policy, query, n, groups=n, group_beams=rule.beam_factor,
                                    diversity_penalty=rule.diversity_penalty) for query in queries]
    temperature = {"tempered": rule.temperature, "greedy": 0.0}.get(rule.name, 1.0)
    top_k = rule.top_k if rule.name == "top-k" else None
    top_p = rule.top_p if rule.name == "nucleus" else None
    rows = [query for query in queries for _ in range(n)]
    records = policy.sample(rows, temperature, generator, top_k=top_k, top_p=top_p).records()
    return [records[i * n : (i + 1) * n] for i in range(len(queries))]


def _record(query: Query, prompt: list[int], tokens: list[int]) -> TrajectoryRecord:
    return TrajectoryRecord(query, prompt, list(tokens), [True] * len(tokens))


def search_log_probs(space: ActionSpace, logits: Tensor, n_actions: Tensor) -> Tensor:
    """The policy's log-probs [N, V] for a search, with stopping as one candidate: the first stop token
    carries log q(⊤ | s), the others -inf. A vocabulary with two "." tokens (Gemma's) would otherwise
    finish every hypothesis twice, each with half its stop probability."""
    log_probs = space.policy_log_probs(logits, n_actions)
    stop = space.stop_log_prob(log_probs)  # [N]
    log_probs[:, list(space.stop_token_ids)] = float("-inf")
    log_probs[:, space.stop_token_ids[0]] = stop
    return log_probs


class _ActionSpaceProcessor:
    """A transformers logits processor that turns next-token scores into ``space``'s policy log-probs."""

    def __init__(self, space: ActionSpace, prompt_len: int):
        self.space, self.prompt_len = space, prompt_len

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        actions = torch.full((scores.shape[0],), input_ids.shape[1] - self.prompt_len, device=scores.device)
        return search_log_probs(self.space, scores, actions)


@torch.no_grad()
def beam_search(policy: Policy, query: Query, n: int, beams: int) -> list[TrajectoryRecord]:
    """The ``n`` best finished hypotheses of ``beams`` beams by summed log-probability (transformers' ``generate``)."""
    from transformers import LogitsProcessorList

    model, tokenizer, space = policy.model, policy.tokenizer, policy.space
    pad_id = require_pad_token(tokenizer)
    prompt = encode_prompts(tokenizer, [query])[0]
    device = policy.device
    with eval_mode(model):
        out = model.generate(
            input_ids=torch.tensor([prompt], device=device), attention_mask=torch.ones(1, len(prompt), device=device,
                                                                                     dtype=torch.long),
            num_beams=beams, num_return_sequences=n, length_penalty=0.0, early_stopping=True, do_sample=False,
            max_new_tokens=space.max_len + 1, eos_token_id=list(space.stop_token_ids), pad_token_id=pad_id,
            logits_processor=LogitsProcessorList([_ActionSpaceProcessor(space, len(prompt))]),
            temperature=None, top_p=None, top_k=None,
        )
    stops = set(space.stop_token_ids)
    records = []
    for row in out[:, len(prompt) :].tolist():
        end = next((i for i, token in enumerate(row) if token in stops), len(row))
        records.append(_record(query, prompt, row[:end]))
    return records


@torch.no_grad()
def diverse_beam_search(policy: Policy, query: Query, n: int, groups: int, group_beams: int,
                        diversity_penalty: float) -> list[TrajectoryRecord]:
    """Diverse beam search: ``groups`` groups of ``group_beams`` beams; the ``n`` best finished hypotheses.

    At each step the groups choose in turn. Group g scores a token by its log-probability minus
    ``diversity_penalty`` times the number of beams of groups 0..g-1 that chose that token at this
    step, and runs ordinary beam search on those scores (which accumulate, penalties included, as in
    the transformers implementation this replaces). A group finishes a hypothesis when one of its
    top ``k`` candidates is a stop token, and is done once it holds ``k`` hypotheses that no running
    beam can beat (scores only fall). All hypotheses are ranked by score; the best ``n`` are returned.
    With one group this is plain beam search.
    """
    model, tokenizer, space, device = policy.model, policy.tokenizer, policy.space, policy.device
    k = group_beams
    beams = k * groups
    prompt = encode_prompts(tokenizer, [query])[0]
    stops, pad_id = set(space.stop_token_ids), require_pad_token(tokenizer)
    tokens: list[list[int]] = [[] for _ in range(beams)]
    # only the first beam of each group is live at the start, so that a group's beams differ
    scores = torch.full((beams,), float("-inf"), dtype=torch.float64, device=device)
    scores[::k] = 0.0
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(groups)]
    done = [False] * groups
    with eval_mode(model):
        out = model(input_ids=torch.tensor([prompt] * beams, device=device), use_cache=True, logits_to_keep=1)
        for step in range(space.max_len + 1):
            log_probs = search_log_probs(space, out.logits[:, -1], torch.full((beams,), step, device=device))  # [beams, V]
            vocab = log_probs.shape[1]
            chosen = torch.zeros(vocab, dtype=torch.float64, device=device)  # running beams' tokens, earlier groups
            parents, next_tokens = list(range(beams)), [pad_id] * beams  # done groups idle on padding
            for g in range(groups):
                rows = list(range(g * k, (g + 1) * k))
                if done[g]:
                    continue
                candidates = (scores[rows, None] + log_probs[rows].double() - diversity_penalty * chosen).flatten()
                top = candidates.topk(min(2 * k, int(torch.isfinite(candidates).sum())))
                running: list[tuple[int, int, float]] = []  # (parent row, token, score)
                for rank, (value, index) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
                    row, token = rows[index // vocab], index % vocab
                    if token in stops:
                        if rank < k:  # as in beam search: a stop among the top k finishes a hypothesis
                            finished[g].append((value, tokens[row]))
                    elif len(running) < k:
                        running.append((row, token, value))
                finished[g] = sorted(finished[g], key=lambda h: -h[0])[:k]
                best_running = max((value for _, _, value in running), default=float("-inf"))
                done[g] = not running or (len(finished[g]) == k and best_running <= finished[g][-1][0])
                for slot in rows:  # the group's beams for the next step; unfilled slots idle at -inf
                    row, token, value = running[slot - rows[0]] if slot - rows[0] < len(running) else (slot, pad_id, float("-inf"))
                    parents[slot], next_tokens[slot], scores[slot] = row, token, value
                for _, token, _ in running:
                    chosen[token] += 1
            if all(done):
                break
            tokens = [tokens[p] + [t] for p, t in zip(parents, next_tokens)]
            cache = out.cache
            cache.reorder_cache(torch.tensor(parents, device=device))
            out = model(input_ids=torch.tensor(next_tokens, device=device)[:, None], cache=cache, use_cache=True)
    hypotheses = sorted((h for group in finished for h in group), key=lambda h: -h[0])[:n]
    return [_record(query, prompt, hyp) for _, hyp in hypotheses]


def as_batch(records: Sequence[TrajectoryRecord], tokenizer, device) -> Trajectories:
    return Trajectories.from_records(list(records), require_pad_token(tokenizer), device)

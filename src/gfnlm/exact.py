"""Exact probabilities of finitely many outcomes under the sampling policy, by tree expansion.

For a task whose valid outputs form a small set of strings (the integers 0..100, say), the
probability the policy gives each outcome is the sum over every token sequence that decodes to
it and then stops. We expand the tree of token sequences breadth first, keeping only children
whose decoded text is still a prefix of some valid string, and score each depth of the tree in
one batched forward pass. No sampling error, no missed tokenisations (e.g. "42" as one token or
as "4" "2"), as long as every token of a valid string decodes to a piece of it on its own —
true for byte-level BPE and SentencePiece vocabularies on ASCII digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Hashable

import torch

from gfnlm.modes import eval_mode
from gfnlm.sampling import encode_prompts, require_pad_token
from gfnlm.scoring import final_state_log_probs
from gfnlm.trajectories import Query, TrajectoryRecord, Trajectories

if TYPE_CHECKING:
    from gfnlm.policy import Policy


@dataclass
class OutcomeDistribution:
    probabilities: dict[Hashable, float]  # outcome -> probability of producing it
    valid_mass: float  # sum of the above: the probability of producing any valid outcome
    nodes: int  # token sequences scored


def token_strings(tokenizer) -> dict[int, str]:
    """Each token's text on its own (special tokens kept verbatim, so they never look valid)."""
    return {i: tokenizer.decode([i], skip_special_tokens=False) for i in range(len(tokenizer))}


@torch.no_grad()
def exact_outcome_distribution(
    policy: Policy,
    query: Query,
    is_valid_prefix: Callable[[str], bool],
    outcome: Callable[[str], Hashable | None],
    vocabulary: dict[int, str] | None = None,
    batch_size: int = 256,
) -> OutcomeDistribution:
    """Probability of each outcome under ``policy`` sampling at temperature 1 (its action space's rules applied),
    in its own precision: the distribution its samples follow. Log-softmax and sums over tokens in float32.

    ``is_valid_prefix(text)`` says whether ``text`` can still grow into a valid output;
    ``outcome(text)`` maps a complete valid output to its outcome (None if invalid).
    ``vocabulary`` restricts the tokens tried (default: every token; pass ``token_strings``
    filtered to the relevant characters to save time on large vocabularies).
    """
    model, tokenizer, space = policy.model, policy.tokenizer, policy.space
    pad_id = require_pad_token(tokenizer)
    vocabulary = vocabulary if vocabulary is not None else token_strings(tokenizer)
    if space.allowed_token_ids is not None:
        allowed = set(space.allowed_token_ids)
        vocabulary = {t: s for t, s in vocabulary.items() if t in allowed}
    vocabulary = {t: s for t, s in vocabulary.items() if s and t not in space.stop_token_ids}
    prompt = encode_prompts(tokenizer, [query])[0]
    probabilities: dict[Hashable, float] = {}
    frontier: list[tuple[list[int], str, float]] = [([], "", 0.0)]  # token ids, text, log q(ids)
    nodes = 0
    with eval_mode(model):
        for depth in range(space.max_len + 1):
            children = []
            for start in range(0, len(frontier), batch_size):
                chunk = frontier[start : start + batch_size]
                records = [TrajectoryRecord(query, prompt, ids, [True] * len(ids)) for ids, _, _ in chunk]
                traj = Trajectories.from_records(records, pad_id, policy.device)
                log_probs = final_state_log_probs(model, traj, space).cpu()  # [b, V]
                stop = space.stop_log_prob(log_probs)  # [b]
                nodes += len(chunk)
                for row, (ids, text, log_q) in enumerate(chunk):
                    key = outcome(text)
                    if key is not None:
                        probabilities[key] = probabilities.get(key, 0.0) + float(torch.exp(log_q + stop[row]))
                    if depth == space.max_len:
                        continue
                    for token, piece in vocabulary.items():
                        if is_valid_prefix(text + piece) and log_probs[row, token] > float("-inf"):
                            children.append((ids + [token], text + piece, log_q + float(log_probs[row, token])))
            frontier = children
            if not frontier:
                break
    return OutcomeDistribution(probabilities, sum(probabilities.values()), nodes)

"""Random integers (paper §2, Fig. 2): make the LM's numbers follow a chosen distribution.

Prompt: "The following is a random integer drawn uniformly between 0 and 100: ". The policy
writes until its stop token. The reward of a text is the target probability of the integer it
spells (exactly the decimal digits of an integer in [low, high]: no sign, no leading zeros, no
spaces, no special tokens), and a small floor for anything else. Every prefix is scored the same
way, so "4" and "42" are both terminable states with their own rewards.

Tokenisation: SmolLM2's tokenizer (and Llama-3-style ones) writes numbers one digit per token,
"100" -> "1" "0" "0"; others may have multi-digit tokens. The exact evaluation does not depend
on it: it sums every token sequence whose decoded text is the integer (``gfnlm.exact``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from gfnlm.config import setting
from gfnlm.exact import exact_outcome_distribution, token_strings
from gfnlm.metrics import js_divergence, kl_divergence, normalise, total_variation
from gfnlm.rewards import TextReward
from gfnlm.policy import Policy
from gfnlm.sampling import text_records
from gfnlm.tasks.base import Task, TaskOptions
from gfnlm.trajectories import ActionSpace, Query, TrajectoryRecord

PAPER_PROMPT = "The following is a random integer drawn uniformly between 0 and 100: "
_CANONICAL = re.compile(r"0|[1-9][0-9]*")


@dataclass
class RandomNumberOptions(TaskOptions):
    prompt: str = setting(PAPER_PROMPT, "The prompt X (paper §2).")
    low: int = setting(0, "Smallest valid integer.")
    high: int = setting(100, "Largest valid integer.")
    target: Literal["uniform", "binomial", "poisson", "weights"] = setting(
        "uniform", "Target distribution on [low, high]: uniform, binomial(high - low, binomial_p) shifted by "
        "low, Poisson(poisson_rate) restricted to the range, or the given weights."
    )
    binomial_p: float = setting(0.5, "Success probability of the binomial target.")
    poisson_rate: float = setting(30.0, "Rate of the Poisson target.")
    weights: list[float] | None = setting(None, "One weight per integer low..high, for target 'weights'.")
    invalid_log_reward: float = setting(
        -60.0, "log R of a text that is not a valid integer (the floor). It must lie far below "
        "-max_len * ln(vocabulary size) (about -43 for SmolLM2 and 4 tokens): the invalid texts are so many "
        "that a higher floor gives them most of the target's mass."
    )
    max_len: int = setting(4, "Most tokens the policy may write before the stop is forced.")
    min_len: int = setting(1, "Fewest tokens before the stop: at least 1, the empty text is never an integer.")
    eval_samples: int = setting(10000, "Samples drawn for the histogram and the sampled valid fraction.")
    eval_batch_size: int = setting(500, "Samples drawn per batch in evaluation.")


class RandomNumberTask(Task):
    name = "random-number"
    Options = RandomNumberOptions
    summary_keys = ("valid_mass", "kl", "tv", "js")
    options: RandomNumberOptions

    def __init__(self, options: RandomNumberOptions, tokenizer):
        super().__init__(options, tokenizer)
        o = options
        if o.high < o.low:
            raise ValueError(f"high ({o.high}) must be at least low ({o.low})")
        if o.low < 0:
            raise ValueError("the random-number task covers non-negative integers only")
        if o.min_len < 1:
            raise ValueError("min_len must be at least 1: the empty text is never an integer")
        self.integers = list(range(o.low, o.high + 1))
        self.target_probs = target_distribution(o)
        self.log_target = {
            n: (math.log(p) if p > 0 else o.invalid_log_reward) for n, p in zip(self.integers, self.target_probs)
        }
        self._digit_vocab: dict[int, str] | None = None

    # ----------------------------------------------------------------- the engine's inputs
    def train_queries(self) -> list[Query]:
        return [Query(self.options.prompt)]

    def stop_token_ids(self) -> tuple[int, ...]:
        from gfnlm.models import stop_token_ids

        return stop_token_ids(self.tokenizer)

    def action_space(self) -> ActionSpace:
        return ActionSpace(stop_token_ids=self.stop_token_ids(), max_len=self.options.max_len, min_len=self.options.min_len)

    def parse(self, text: str) -> int | None:
        """The integer a generated text spells, or None if it is not exactly a valid integer."""
        if not _CANONICAL.fullmatch(text):
            return None
        value = int(text)
        return value if self.options.low <= value <= self.options.high else None

    def is_valid_prefix(self, text: str) -> bool:
        return any(str(n).startswith(text) for n in self.integers) if text else True

    def log_reward(self, texts: list[str], queries) -> list[float]:
        values = (self.parse(t) for t in texts)
        return [self.log_target[v] if v is not None else self.options.invalid_log_reward for v in values]

    def reward(self, policy: Policy) -> TextReward:
        return TextReward(self.log_reward, self.tokenizer, skip_special_tokens=False)

    def sft_examples(self, n: int, generator: torch.Generator) -> list[TrajectoryRecord]:
        """Integers drawn from the target, written as the policy would write them."""
        query = self.train_queries()[0]
        draws = torch.multinomial(torch.tensor(self.target_probs), n, replacement=True, generator=generator)
        return text_records(self.tokenizer, [(query, str(self.integers[i])) for i in draws.tolist()])

    # ----------------------------------------------------------------- evaluation
    def digit_vocabulary(self) -> dict[int, str]:
        if self._digit_vocab is None:
            self._digit_vocab = {t: s for t, s in token_strings(self.tokenizer).items() if s.isascii() and s.isdigit()}
        return self._digit_vocab

    def exact_distribution(self, policy: Policy) -> tuple[list[float], float]:
        """Policy probability of each integer low..high (not renormalised) and the valid mass."""
        dist = exact_outcome_distribution(policy, self.train_queries()[0], self.is_valid_prefix, self.parse,
                                          self.digit_vocabulary())
        return [dist.probabilities.get(n, 0.0) for n in self.integers], dist.valid_mass

    def sample_integers(self, policy: Policy, n: int, seed: int = 0) -> list[int | None]:
        generator = torch.Generator().manual_seed(seed)
        query = self.train_queries()[0]
        out: list[int | None] = []
        while len(out) < n:
            batch = min(self.options.eval_batch_size, n - len(out))
            traj = policy.sample([query] * batch, generator=generator)
            out += [self.parse(t) for t in traj.generated_texts(self.tokenizer, skip_special_tokens=False)]
        return out

    def evaluate(self, policy: Policy, output_dir: Path | None = None, label: str = "model",
                 n_samples: int | None = None) -> dict:
        probs, valid_mass = self.exact_distribution(policy)
        on_valid = normalise(probs) if valid_mass > 0 else [0.0] * len(probs)
        n = self.options.eval_samples if n_samples is None else n_samples
        draws = self.sample_integers(policy, n) if n > 0 else []
        counts = Counter(d for d in draws if d is not None)
        result = {
            "label": label,
            "valid_mass": valid_mass,
            "kl": kl_divergence(on_valid, self.target_probs),
            "tv": total_variation(on_valid, self.target_probs),
            "js": js_divergence(on_valid, self.target_probs),
            "sampled_valid_fraction": (sum(counts.values()) / n) if n else None,
            "n_samples": n,
            "integers": self.integers,
            "probabilities": probs,
            "target": self.target_probs,
            "sample_counts": [counts.get(i, 0) for i in self.integers],
        }
        return result


def target_distribution(o: RandomNumberOptions) -> list[float]:
    """The target probabilities of low..high."""
    integers = range(o.low, o.high + 1)
    if o.target == "uniform":
        weights = [1.0] * len(integers)
    elif o.target == "binomial":
        trials = o.high - o.low
        weights = [math.comb(trials, k) * o.binomial_p**k * (1 - o.binomial_p) ** (trials - k) for k in range(trials + 1)]
    elif o.target == "poisson":
        weights = [math.exp(n * math.log(o.poisson_rate) - o.poisson_rate - math.lgamma(n + 1)) for n in integers]
    elif o.target == "weights":
        if o.weights is None or len(o.weights) != len(integers):
            got = "none" if o.weights is None else len(o.weights)
            raise ValueError(f"target 'weights' needs one weight per integer {o.low}..{o.high} ({len(integers)}), got {got}")
        if any(w < 0 for w in o.weights):
            raise ValueError("target weights must be non-negative")
        weights = list(o.weights)
    else:
        raise ValueError(f"unknown target {o.target!r}; choose uniform, binomial, poisson or weights")
    return normalise(weights)

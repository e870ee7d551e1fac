"""Divergences between distributions over a finite set of outcomes."""

from __future__ import annotations

import math
from typing import Sequence


def _check(p: Sequence[float], q: Sequence[float]) -> None:
    if len(p) != len(q):
        raise ValueError(f"distributions differ in size: {len(p)} vs {len(q)}")


def normalise(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0 or not math.isfinite(total):
        raise ValueError("weights must have a positive finite sum")
    return [w / total for w in weights]


def kl_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """KL(p || q) in nats; inf where p has mass that q lacks."""
    _check(p, q)
    total = 0.0
    for a, b in zip(p, q):
        if a > 0:
            if b <= 0:
                return math.inf
            total += a * math.log(a / b)
    return max(total, 0.0)


def total_variation(p: Sequence[float], q: Sequence[float]) -> float:
    _check(p, q)
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence in nats (at most log 2)."""
    _check(p, q)
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)


def embedding_diversity(embeddings) -> float:
    """1 - the mean cosine similarity over all pairs of the unit-norm rows of ``embeddings`` [n, d].

    0 when every row is the same; the paper's diversity of N continuations of one prompt (§4.1).
    """
    n = embeddings.shape[0]
    if n < 2:
        raise ValueError(f"diversity needs at least 2 samples, got {n}")
    similarity = embeddings @ embeddings.T  # [n, n]
    upper = similarity.triu(diagonal=1)
    return float(1.0 - upper.sum() / (n * (n - 1) / 2))

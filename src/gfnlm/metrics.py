"""Metrics: divergences between distributions over finite outcomes, diversity of samples, text similarity."""

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
    return max(0.0, float(1.0 - upper.sum() / (n * (n - 1) / 2)))  # not -5e-8 for identical rows


# ----------------------------------------------------------------------------- text similarity (infilling)
def bleu4(candidate: str, reference: str) -> float:
    """BLEU-4 x 100 as the paper's code computes it: nltk ``sentence_bleu`` on whitespace tokens, smoothing method1."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    return 100 * sentence_bleu([reference.split()], candidate.split(), smoothing_function=SmoothingFunction().method1)


def gleu4(candidate: str, reference: str) -> float:
    """GLEU-4 x 100 (Wu et al., 2016): nltk ``sentence_gleu`` on whitespace tokens, 1- to 4-grams."""
    from nltk.translate.gleu_score import sentence_gleu

    return 100 * sentence_gleu([reference.split()], candidate.split())


def sacrebleu4(candidate: str, reference: str) -> float:
    """sacrebleu's sentence BLEU (its own tokenizer and smoothing; 0-100): a cross-check of ``bleu4``."""
    import sacrebleu

    return sacrebleu.sentence_bleu(candidate, [reference]).score


class BertScore:
    """BERTScore F1 through the ``bert-score`` package, rescaled by a baseline.

    ``backbone`` is a Hugging Face model name or folder (our embedded sentence encoders by name, see
    ``gfnlm.encoders.encoder_path``) and ``layer`` the layer whose embeddings are matched. A backbone
    ``bert-score`` knows (e.g. microsoft/deberta-xlarge-mnli, the paper's, layer 40) is rescaled with
    the baseline bert-score ships. For any other, ``baseline_pairs`` (pairs of unrelated sentences)
    give the baseline as bert-score's authors made theirs, the mean F1 b of such pairs, and
    rescaled F1 = (F1 - b) / (1 - b): about 0 for unrelated sentences, 1 for identical ones.
    """

    def __init__(self, backbone: str, layer: int | None = None, baseline_pairs: Sequence[tuple[str, str]] = ()):
        from bert_score import BERTScorer
        from bert_score.utils import model2layers

        from gfnlm.encoders import encoder_path

        self.backbone, self.layer = backbone, layer if layer is not None else model2layers.get(backbone)
        if self.layer is None:
            raise ValueError(f"bert-score knows no default layer of {backbone!r}: give the layer")
        shipped = backbone in model2layers and not baseline_pairs
        if not shipped and not baseline_pairs:
            raise ValueError(f"rescaling BERTScore of {backbone!r} needs baseline_pairs of unrelated sentences")
        self.scorer = BERTScorer(model_type=encoder_path(backbone), num_layers=self.layer, lang="en",
                                 rescale_with_baseline=shipped)
        self.baseline: float | None = None  # None: bert-score's own
        if not shipped:
            candidates, references = zip(*baseline_pairs)
            self.baseline = float(self.scorer.score(list(candidates), list(references))[2].mean())

    def f1(self, candidates: Sequence[str], references: Sequence[str]) -> list[float]:
        """Rescaled F1 of each candidate against its reference."""
        f1 = self.scorer.score(list(candidates), list(references))[2]
        if self.baseline is not None:
            f1 = (f1 - self.baseline) / (1 - self.baseline)
        return f1.tolist()

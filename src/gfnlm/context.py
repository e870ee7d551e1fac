"""A fixed text placed before every prompt (e.g. k-shot demonstrations), run through the model once.

The paper's arithmetic reward is p_LM(X Z Y | demonstrations): the same demonstrations precede
every query. Recomputing them for every batch would cost more than the trajectories themselves,
so ``SharedContext`` keeps their KV cache and hands each batch a view of it. The cache belongs to
the *frozen base model* (it is computed with any adapter switched off), so it stays valid while
the policy's LoRA weights train; use it only where the base model runs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import DynamicCache

from gfnlm.modes import adapter_disabled, eval_mode


class SharedContext:
    """Token ids of ``text`` and the base model's keys and values for them (batch of one).

    The keys and values are computed on first use and again whenever the model has moved to another
    device or dtype since (a policy stores its weights in bfloat16, say), so they always match the
    model that reads them."""

    def __init__(self, model, tokenizer, text: str):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if not ids:
            raise ValueError("a shared context needs at least one token")
        self.text, self.ids = text, list(ids)
        self.model, self.config = model, model.config
        self._layers: list[tuple[Tensor, Tensor]] = []
        self._computed_for: tuple[torch.device, tuple[str, ...]] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def _keys_and_values(self) -> list[tuple[Tensor, Tensor]]:
        weight = self.model.get_input_embeddings().weight
        dtypes = tuple(sorted({str(p.dtype) for p in self.model.parameters()}))  # a precision change recomputes
        if self._computed_for != (weight.device, dtypes):
            with torch.no_grad(), adapter_disabled(self.model), eval_mode(self.model):
                out = self.model(input_ids=torch.tensor([self.ids], device=weight.device), use_cache=True,
                                 logits_to_keep=1)
            self._layers = [(layer.keys, layer.values) for layer in out.cache.layers]
            self._computed_for = (weight.device, dtypes)
        return self._layers

    def cache(self, batch: int, device: torch.device) -> DynamicCache:
        """A fresh cache holding the context for ``batch`` rows on ``device`` (expanded views: no copy
        until it grows)."""
        data = [(k.to(device).expand(batch, -1, -1, -1), v.to(device).expand(batch, -1, -1, -1))
                for k, v in self._keys_and_values()]
        return DynamicCache(ddp_cache_data=data, config=self.config)

    def mask(self, attention_mask: Tensor) -> Tensor:
        """``attention_mask`` [B, L] with the context's columns (all real) in front: [B, C + L]."""
        ones = attention_mask.new_ones((attention_mask.shape[0], len(self)))
        return torch.cat([ones, attention_mask], dim=1)


def prompting_context(model, tokenizer, examples: Sequence, shots: int, shuffle_seed: int) -> SharedContext | None:
    """k-shot prompting (an evaluation baseline): ``shots`` of ``examples``, shuffled by ``shuffle_seed``,
    as the text before every prompt (each example's ``demonstration()``); None for zero shots.

    The cache holds the base model's keys and values, so the prompted model must be the base model:
    with an adapter on, its later layers would attend to keys it never computed.
    """
    if not shots:
        return None
    if hasattr(model, "peft_config"):
        raise ValueError("k-shot prompting evaluates the base model; it cannot be combined with an adapter")
    pool = list(examples)
    random.Random(shuffle_seed).shuffle(pool)
    return SharedContext(model, tokenizer, "".join(example.demonstration() for example in pool[:shots]))

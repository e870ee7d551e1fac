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
    """Token ids of ``text`` and the base model's keys and values for them (batch of one)."""

    def __init__(self, model, tokenizer, text: str):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if not ids:
            raise ValueError("a shared context needs at least one token")
        self.text, self.ids = text, list(ids)
        self.config = model.config
        device = next(model.parameters()).device
        with torch.no_grad(), adapter_disabled(model), eval_mode(model):
            out = model(input_ids=torch.tensor([self.ids], device=device), use_cache=True, logits_to_keep=1)
        self._layers: list[tuple[Tensor, Tensor]] = [(layer.keys, layer.values) for layer in out.cache.layers]

    def __len__(self) -> int:
        return len(self.ids)

    def cache(self, batch: int, device: torch.device) -> DynamicCache:
        """A fresh cache holding the context for ``batch`` rows on ``device`` (expanded views: no copy
        until it grows). The model may have moved since the context was computed (e.g. to the GPU)."""
        if self._layers[0][0].device != torch.device(device):
            self._layers = [(k.to(device), v.to(device)) for k, v in self._layers]
        data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self._layers]
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

"""Attention for short queries in bfloat16 on the CPU: a grouped matmul instead of torch's fused kernel.

torch's fused CPU attention (``scaled_dot_product_attention``) is slow in bfloat16 for the shapes a
decoding step has: one query per row against a few dozen keys took 1.1 ms per layer on this
project's CPU (2.1 ms at 120 keys), against 0.24 ms for two batched matmuls and a float32 softmax;
at 45 queries (the scorer's generated region) 3.8 ms against 1.3 ms. For long queries (the
rewards' packed suffixes, hundreds of columns) the fused kernel is the faster one and is kept.
``Policy`` switches a CPU model in bfloat16 to this implementation (``use_grouped_attention``);
the masks are transformers' SDPA masks, so the function is a drop-in for ``sdpa_attention_forward``.
"""

from __future__ import annotations

import torch
from torch import Tensor

NAME = "gfnlm_grouped"
LONGEST_GROUPED_QUERY = 64
"""Queries up to this many columns take the grouped matmul; longer ones torch's fused kernel."""


def grouped_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                      **kwargs) -> tuple[Tensor, None]:
    """query [B, Hq, Lq, D], key and value [B, Hkv, Lk, D] -> output [B, Lq, Hq, D], as SDPA computes it.

    Each key-value head serves its group of Hq / Hkv query heads in one matmul (no repeated keys);
    the scores and the softmax are float32. ``attention_mask`` is boolean (True: attend) or additive,
    [B, 1 or Hq, Lq, Lk]; without one, Lq > 1 means causal from the first key, as SDPA's ``is_causal``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    if length > LONGEST_GROUPED_QUERY or dropout or kwargs.get("position_bias") is not None or kwargs.get("softcap"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    kv_heads = key.shape[1]
    group = heads // kv_heads
    if attention_mask is None and length > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        key, value = key[:, :, :length], value[:, :, :length]
        attention_mask = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()[None, None]
    keys = key.shape[2]
    scale = scaling if scaling is not None else dim**-0.5
    scores = query.reshape(batch, kv_heads, group * length, dim) @ key.transpose(-1, -2)  # [B, Hkv, g*Lq, Lk]
    scores = scores.float().view(batch, kv_heads, group, length, keys) * scale
    if attention_mask is not None:
        mask = attention_mask.view(attention_mask.shape[0], -1, 1, length, keys)  # [B, 1, 1, Lq, Lk] (shared by heads)
        if attention_mask.shape[1] == heads:
            mask = attention_mask.view(attention_mask.shape[0], kv_heads, group, length, keys)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # a finite floor: padding rows get no NaN
        else:
            scores = scores + mask.float()
    weights = scores.softmax(dim=-1).to(value.dtype).view(batch, kv_heads, group * length, keys)
    out = (weights @ value).view(batch, heads, length, dim)
    return out.transpose(1, 2).contiguous(), None


def use_grouped_attention(model) -> None:
    """Switch ``model``'s SDPA attention to ``grouped_attention`` (registered with transformers under ``NAME``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(NAME)

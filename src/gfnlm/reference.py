"""Straightforward per-prefix computations, the way the paper's code does them.

One unpadded forward pass per prefix state: slow (T passes of length up to T) but obviously
right. The tests check the fast batched paths against these, and the benchmark times them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from gfnlm.trajectories import Trajectories


@torch.no_grad()
def per_prefix_log_likelihoods(
    model,
    traj: Trajectories,
    stop_token_ids: Sequence[int] | None = None,
    suffix_ids: Sequence[Sequence[int]] | None = None,
) -> Tensor:
    """Same quantity as ``rewards.lm_prefix_log_likelihoods``, one forward pass per prefix. [B, T+1]."""
    device = traj.input_ids.device
    out = torch.zeros((len(traj), traj.horizon + 1), dtype=torch.float32, device=device)
    for b, record in enumerate(traj.records()):
        for i, end in enumerate(record.state_ends()):
            generated = record.generated_ids[:end]
            suffix = list(suffix_ids[b]) if suffix_ids is not None else []
            ids = torch.tensor([record.prompt_ids + generated + suffix], device=device)
            log_probs = model(input_ids=ids).logits.float().log_softmax(-1)[0]  # [len, V]
            p = len(record.prompt_ids)
            scored = ids[0, p:]  # generated tokens, then the suffix
            total = log_probs[p - 1 : ids.shape[1] - 1].gather(1, scored[:, None]).sum()
            if stop_token_ids is not None:
                total = total + log_probs[p + end - 1, list(stop_token_ids)].logsumexp(-1)
            out[b, i] = total
    return out

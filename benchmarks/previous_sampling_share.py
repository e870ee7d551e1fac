#!/usr/bin/env python3
"""The share of a sampling call that the previous release's sampler (commit 254b703, before the Policy) spent
outside the decoder's forward passes, measured as ``gfnlm bench`` measures ours (``model_forward_share``): at the
default arithmetic point (4 queries x 8 samples, T = 20 fixed, float32, LoRA rank 8). Run it with that commit's
source first on the path; benchmarks/engine.sh makes the worktree:

    PYTHONPATH=runs/bench-engine/previous-release/src python3 benchmarks/previous_sampling_share.py
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from gfnlm.config import TrainConfig
from gfnlm.models import load_model_and_tokenizer
from gfnlm.sampling import sample
from gfnlm.scoring import split_model
from gfnlm.tasks import get_task
from gfnlm.trainer import apply_lora

model, tokenizer = load_model_and_tokenizer()
task_cls = get_task("arithmetic")
task = task_cls(task_cls.Options(max_len=20), tokenizer)
model = apply_lora(model, TrainConfig(lora_rank=8, lora_alpha=16))
space = replace(task.action_space(), min_len=20)
queries = [q for q in task.train_queries()[:4] for _ in range(8)]
generator = torch.Generator().manual_seed(0)
body, inside, started = split_model(model)[0], [0.0], [0.0]
body.register_forward_pre_hook(lambda *_: started.__setitem__(0, time.perf_counter()))
body.register_forward_hook(lambda *_: inside.__setitem__(0, inside[0] + time.perf_counter() - started[0]))
sample(model, tokenizer, queries, space, generator=generator, tool=task.tool())  # warm-up
shares = []
for _ in range(3):
    inside[0] = 0.0
    start = time.perf_counter()
    sample(model, tokenizer, queries, space, generator=generator, tool=task.tool())
    shares.append(1 - inside[0] / (time.perf_counter() - start))
print(f"previous sampler: {100 * sorted(shares)[1]:.0f}% of a sampling call outside the decoder's forward passes "
      f"(median of 3: {', '.join(f'{100 * s:.0f}%' for s in shares)})")

#!/usr/bin/env python3
"""How far bfloat16 weights move the policy's log-probs and the LM rewards from float32, on the embedded model.

    python benchmarks/precision.py [--model smollm2-135m] [--samples 64] [--doc docs/design.md --section precision]

For two tasks (arithmetic: 21 allowed tokens, the calculator, the suffix reward with its
demonstrations; continuation: one sentence over nearly the whole vocabulary, the stop reward), it
draws trajectories from the float32 policy, then scores the same trajectories with a float32 and
a bfloat16 copy of the model: per token (each action's log P_F and each state's log P_⊤), per
trajectory (log q(τ ⊤)) and for the rewards (each state's log R, and the terminal one). It also
compares, in bfloat16, the log-probs the sampler recorded with those the scorer computes for its own
samples (the sampler's KV-cached steps against the teacher-forced pass). Prints a table; with --doc
writes it into the page's generated block.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gfnlm.config import TrainConfig
from gfnlm.models import load_model_and_tokenizer
from gfnlm.policy import Policy
from gfnlm.reports.tables import markdown_table, replace_section
from gfnlm.rewards import terminal_values
from gfnlm.scoring import terminal_log_prob
from gfnlm.tasks import get_task


def _stats(diff: torch.Tensor) -> str:
    """'max / mean' of absolute differences, over the finite ones (a stop impossible before min_len is -inf in both)."""
    diff = diff[torch.isfinite(diff)].abs().double()
    return f"{float(diff.max()):.3g} / {float(diff.mean()):.3g}"


def _compare(task_name: str, options: dict, model_name: str, samples: int) -> list[list[str]]:
    rows = []
    policies, rewards = {}, {}
    for precision in ("no", "bf16"):
        model, tokenizer = load_model_and_tokenizer(model_name)
        task_cls = get_task(task_name)
        task = task_cls(task_cls.Options(**options), tokenizer)
        policies[precision] = Policy.from_config(model, tokenizer, task.action_space(), TrainConfig(mixed_precision=precision),
                                                 task.tool())
        rewards[precision] = task.reward(policies[precision])
    queries = [q for q in task.train_queries()[: max(1, samples // 8)] for _ in range(8)]
    generator = torch.Generator().manual_seed(0)
    traj = policies["no"].sample(queries, 1.0, generator)
    scores, log_r = {}, {}
    with torch.no_grad():
        for precision, policy in policies.items():
            scores[precision] = policy.score(traj)
            log_r[precision] = rewards[precision](traj)
    lengths = traj.lengths
    steps = torch.arange(traj.horizon)[None, :] < lengths[:, None]  # [B, T] actions
    states = torch.arange(traj.horizon + 1)[None, :] <= lengths[:, None]  # [B, T+1]
    (pf32, pt32), (pf16, pt16) = scores["no"], scores["bf16"]
    token = torch.cat([(pf16 - pf32)[steps], (pt16 - pt32)[states]])
    trajectory = terminal_log_prob(pf16, pt16, lengths) - terminal_log_prob(pf32, pt32, lengths)
    reward_state = (log_r["bf16"] - log_r["no"])[states]
    reward_end = terminal_values(log_r["bf16"], traj) - terminal_values(log_r["no"], traj)
    own = policies["bf16"].sample(queries, 1.0, torch.Generator().manual_seed(1))
    own_pf, own_pt = policies["bf16"].score(own)
    own_steps = torch.arange(own.horizon)[None, :] < own.lengths[:, None]
    own_states = torch.arange(own.horizon + 1)[None, :] <= own.lengths[:, None]
    sampler_gap = torch.cat([(own.sampling_log_pf - own_pf)[own_steps], (own.sampling_log_pterm - own_pt)[own_states]])
    rows.append([task_name, f"{len(traj)} x {float(lengths.float().mean()):.1f}", _stats(token), _stats(trajectory),
                 _stats(reward_state), _stats(reward_end), f"{float(log_r['no'][states].mean()):.1f}",
                 _stats(sampler_gap)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--output", type=Path, help="also write the rows as JSON")
    parser.add_argument("--doc", type=Path)
    parser.add_argument("--section", default="precision")
    args = parser.parse_args()
    rows = _compare("arithmetic", {"max_len": 20}, args.model, args.samples)
    rows += _compare("continuation", {"max_len": 20}, args.model, args.samples)
    header = ["task", "trajectories x mean actions", "log-prob per token: max / mean |bf16 - fp32|",
              "log q(τ) per trajectory", "log R per state", "log R per trajectory", "mean log R (fp32)",
              "bf16 sampler vs bf16 scorer, per token"]
    table = markdown_table(header, rows)
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    if args.doc:
        replace_section(args.doc, args.section, table)


if __name__ == "__main__":
    main()

"""``gfnlm bench --peer trl-grpo``: our GFlowNet step against TRL's GRPO step on the same task, model and settings."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from gfnlm.bench.measure import _device_name
from gfnlm.bench.settings import BenchSettings
from gfnlm.config import TrainConfig


def run_peer(settings: BenchSettings, echo: Callable[[str], None] = print) -> dict:
    """Samples/s of our GFlowNet step and of TRL's GRPO step (``gfnlm.baselines.grpo``) on the bench's task, each
    on a fresh copy of the model with the same settings; ``ratio`` = ours / TRL's. Both steps sample, score the
    reward and take one update; ours also scores every prefix's reward and stop probability (SubTB), TRL's
    normalises each group's rewards (GRPO's advantages)."""
    import tempfile

    import trl

    from gfnlm.baselines.ppo import PPOConfig
    from gfnlm.models import load_model_and_tokenizer
    from gfnlm.policy import resolve_device
    from gfnlm.tasks import get_task

    s = settings
    device = resolve_device(s.device)
    steps = s.warmup + s.repeats
    config = TrainConfig(steps=steps, queries_per_step=s.queries, samples_per_query=s.samples, p_replay=0.0,
                         p_tempered=0.0, lora_rank=s.lora_rank, lora_alpha=2 * s.lora_rank, device=str(device),
                         progress=False, seed=s.seed, mixed_precision=s.mixed_precision, compile=s.compile,
                         save_every=10**6)

    def build(method: str, output_dir: Path):
        model, tokenizer = load_model_and_tokenizer(s.model, device=device)
        task_cls = get_task(s.task)
        task = task_cls(task_cls.Options(max_len=s.max_len), tokenizer)
        return task.trainer(method, task.policy(model, config), config, PPOConfig(), output_dir)

    results: dict = {"settings": asdict(s), "device": _device_name(device)}
    with tempfile.TemporaryDirectory() as tmp:
        for side, method in (("ours", "gfn"), ("peer", "grpo")):
            trainer = build(method, Path(tmp) / side)
            echo(f"{side}: {steps} steps of {method} ({trainer.policy.precision} weights), {s.queries} queries x "
                 f"{s.samples} samples, at most {s.max_len} tokens ...")
            rows = trainer.train()
            times = [row["step_time_s"] for row in rows][s.warmup :]
            step = statistics.median(times)
            results[side] = {"samples_per_s": s.queries * s.samples / step, "step_s": step, "steps_timed": len(times)}
    results["peer"]["trl_version"] = trl.__version__
    results["ratio"] = results["ours"]["samples_per_s"] / results["peer"]["samples_per_s"]
    echo(f"samples/s: ours {results['ours']['samples_per_s']:.2f}, TRL GRPO {results['peer']['samples_per_s']:.2f} "
         f"(trl {trl.__version__}); ratio {results['ratio']:.2f}")
    s.save(results)
    return results

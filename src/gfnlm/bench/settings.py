"""``gfnlm bench``'s settings, in a module of their own: the entry point and each measurement import them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gfnlm.config import setting


@dataclass
class BenchSettings:
    task: str = setting("arithmetic", "Task whose step is timed (the reference path needs an LM suffix reward).")
    model: str = setting("smollm2-135m", "Embedded model name, Hugging Face id or local folder.")
    queries: int = setting(4, "Queries per step.")
    samples: int = setting(8, "Samples per query.")
    max_len: int = setting(20, "Most rationale tokens (actions).")
    fixed_length: bool = setting(
        False, "Every trajectory writes exactly max_len actions (no stop before): how the step grows with T, "
        "which the policy's own stopping would otherwise hide (arithmetic rationales end after ~13 tokens)."
    )
    warmup: int = setting(1, "Untimed iterations before each measurement.")
    repeats: int = setting(3, "Timed iterations of each part of our step.")
    reference_repeats: int = setting(
        1, "Timed iterations of the (slow) reference step; 0 skips it and the equality check (without a KV "
        "cache its memory grows as T^2: 8 arithmetic samples at T = 40 took more than 23 GB)."
    )
    lora_rank: int = setting(8, "LoRA rank of the policy.")
    mixed_precision: str = setting(
        "auto", "Precision of our step (TrainConfig.mixed_precision). The comparison with the reference path runs in "
                "float32 on both sides, so auto is no while reference_repeats > 0.")
    compile: bool | Literal["auto"] = setting("auto", "Our sampler's compiled decoding step (TrainConfig.compile).")
    static_cache: bool = setting(False, "Our sampler with the preallocated KV cache (TrainConfig.static_cache).")
    device: str = setting("auto", "cpu, cuda or auto.")
    seed: int = setting(0, "Seed of the sampled trajectories.")
    output: str | None = setting(None, "Write every figure to this JSON file.")
    profile_ops: int = setting(0, "Also print the N operators that take most of one of our steps (torch.profiler).")
    processes: int = setting(
        0, "Instead: the data-parallel throughput of N processes against 1, on the CPU, one thread each (real "
           "training steps through torchrun; samples/s of the whole job, median after the first step).")
    process_steps: int = setting(4, "Training steps of each run of the --processes comparison.")
    peer: Literal["trl-grpo"] | None = setting(
        None, "Instead: our GFlowNet step against another library's step on the same model, precision, LoRA rank, "
              "queries x samples, generation length and task reward: trl-grpo (TRL's GRPOTrainer). Samples/s of "
              "each, median over `repeats` steps after `warmup`, and their ratio (ours / peer).")

    def save(self, results: dict) -> None:
        """Write a measurement's results to ``output`` as JSON, if one was given."""
        if self.output:
            Path(self.output).parent.mkdir(parents=True, exist_ok=True)
            Path(self.output).write_text(json.dumps(results, indent=1))

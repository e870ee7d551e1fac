"""``gfnlm bench --processes N``: the data-parallel throughput of N CPU processes against one, each run real training
launched by torchrun. This module is also each rank's entry point (``python -m gfnlm.bench.processes``)."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from gfnlm.bench.settings import BenchSettings
from gfnlm.config import TrainConfig

def run_process_scaling(settings: BenchSettings, echo: Callable[[str], None] = print) -> dict:
    """Samples/s of the GFlowNet step on 1 and ``processes`` CPU processes (one thread each), and the
    scaling efficiency: throughput(N) / (N x throughput(1)). Each run is real training (``scaling_worker``)
    launched by torchrun; its metrics.jsonl holds the job's samples/s, reduced over the ranks."""
    import os
    import socket
    import subprocess
    import sys
    import tempfile

    from gfnlm.runlog import read_logged_metrics

    s = settings
    results: dict = {"settings": asdict(s), "device": f"CPU, {s.processes} processes x 1 thread", "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted({1, s.processes}):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = str(probe.getsockname()[1])
            out = Path(tmp) / f"processes-{n}"
            echo(f"training {s.process_steps} steps on {n} process(es) ...")
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", port,
                       "-m", "gfnlm.bench.processes", json.dumps(asdict(s)), str(out)]
            done = subprocess.run(command, capture_output=True, text=True,
                                  env=os.environ | {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})
            if done.returncode != 0:
                raise RuntimeError(f"the {n}-process run failed:\n{done.stderr[-2000:]}")
            rows = read_logged_metrics(out)
            rate = statistics.median(r["samples_per_s"] for r in rows[1:] or rows)
            results["runs"][str(n)] = {"samples_per_s": rate, "step_s": statistics.median(r["step_time_s"] for r in rows)}
            echo(f"  {n} process(es): {rate:.2f} samples/s")
    one, many = results["runs"]["1"]["samples_per_s"], results["runs"][str(s.processes)]["samples_per_s"]
    results["scaling_efficiency"] = many / (s.processes * one)
    echo(f"{s.processes} processes: {many / one:.2f}x the samples/s of one, scaling efficiency "
         f"{100 * results['scaling_efficiency']:.0f}%")
    s.save(results)
    return results


def scaling_worker(settings: BenchSettings, out: Path) -> None:
    """One rank of ``run_process_scaling``: GFlowNet training steps of the bench's task, no evaluation."""
    from gfnlm.baselines.ppo import PPOConfig
    from gfnlm.models import load_model_and_tokenizer
    from gfnlm.tasks import get_task

    s = settings
    model, tokenizer = load_model_and_tokenizer(s.model)
    task_cls = get_task(s.task)
    task = task_cls(task_cls.Options(max_len=s.max_len), tokenizer)
    config = TrainConfig(steps=s.process_steps, queries_per_step=s.queries, samples_per_query=s.samples,
                         lora_rank=s.lora_rank, lora_alpha=2 * s.lora_rank, device="cpu", progress=False, seed=s.seed,
                         save_every=10**6, mixed_precision=s.mixed_precision, compile=s.compile)
    task.trainer("gfn", task.policy(model, config), config, PPOConfig(), out).train()


if __name__ == "__main__":  # a rank of run_process_scaling, started by torchrun
    import sys

    scaling_worker(BenchSettings(**json.loads(sys.argv[1])), Path(sys.argv[2]))

"""``gfnlm bench``: time our training step against the paper's way of doing the same work.

Both paths train the same LoRA policy on the same queries with the same loss. Ours samples
under no_grad with the KV cache on (tool insertions included) and all queries together, scores
every prefix's reward in one pass with the demonstrations cached, and re-scores the policy in one
teacher-forced pass. The reference (``gfnlm.bench.reference``) does what the paper's code does: one
query per batch, log-probs taken from a sampling loop that carries gradients with the cache off
(a tool is in use), and one forward pass per prefix for the reward (demonstrations recomputed).

Before anything is timed, both paths compute the loss on the same trajectories and must agree
within 1e-4 (relative to the loss's size). Then each part is timed (warm-up, repeats, median and
spread), peak memory is measured in separate untimed runs (bytes allocated above the start: malloc
on CPU, the CUDA allocator on GPU),
and the floating-point work of a step is compared with the machine's measured matmul throughput.

Modules: ``settings`` (``BenchSettings``), ``run`` (``run_bench``), ``measure`` (timings, memory, operators, matmul peak),
``paper`` (``StepPaths``: our step and the reference step on one trainer), ``reference`` (the paper's
per-prefix computations), ``tables`` (results tables of ``--output`` files), ``peer`` (against TRL's
GRPO step), ``processes`` (data-parallel scaling through torchrun; its ranks run that module).
The names below load their module on first use, so importing the package loads neither trl nor a
model, and ``python -m gfnlm.bench.processes`` finds its module not yet imported.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "BenchSettings": "settings",
    "run_bench": "run",
    **dict.fromkeys(("Timing", "PeakMemory", "cpu_memory_mb", "time_it", "measure_peak", "op_profile",
                     "rank_operators", "matmul_peak_gflops", "model_forward_share"), "measure"),
    "StepPaths": "paper",
    **dict.fromkeys(("results_table", "engine_table", "peer_table", "scaling_table"), "tables"),
    "run_peer": "peer",
    **dict.fromkeys(("run_process_scaling", "scaling_worker"), "processes"),
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})

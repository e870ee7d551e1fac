"""``gfnlm bench``'s entry point: our step against the paper's, timed part by part (below), or, with
``--peer`` or ``--processes``, against another library's step (``bench.peer``) or on N processes (``bench.processes``)."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Callable

from gfnlm.bench.measure import (
    Timing,
    _device_name,
    _precision_name,
    matmul_peak_gflops,
    measure_peak,
    model_forward_share,
    op_profile,
    time_it,
)
from gfnlm.bench.paper import StepPaths
from gfnlm.bench.peer import run_peer
from gfnlm.bench.settings import BenchSettings
from gfnlm.bench.processes import run_process_scaling
from gfnlm.bench.tables import _table
from gfnlm.config import ConfigError, TrainConfig
from gfnlm.decoding import TokenCounter


def run_bench(settings: BenchSettings, echo: Callable[[str], None] = print) -> dict:
    if settings.processes:
        return run_process_scaling(settings, echo)
    if settings.peer:
        return run_peer(settings, echo)
    from gfnlm.baselines.ppo import PPOConfig
    from gfnlm.models import load_model_and_tokenizer
    from gfnlm.policy import Policy, resolve_device
    from gfnlm.tasks import get_task

    s = settings
    device = resolve_device(s.device)
    if s.reference_repeats > 0 and s.mixed_precision not in ("auto", "no"):
        raise ConfigError("the comparison with the reference path runs in float32 on both sides: use "
                          "--mixed_precision no (or auto), or --reference_repeats 0 to time our step alone")
    precision = "no" if s.reference_repeats > 0 else s.mixed_precision
    model, tokenizer = load_model_and_tokenizer(s.model, device=device)
    task_cls = get_task(s.task)
    task = task_cls(task_cls.Options(max_len=s.max_len), tokenizer)
    config = TrainConfig(queries_per_step=s.queries, samples_per_query=s.samples, p_replay=0.0, p_tempered=0.0,
                         lora_rank=s.lora_rank, lora_alpha=2 * s.lora_rank, device=str(device), progress=False,
                         seed=s.seed, mixed_precision=precision, static_cache=s.static_cache, compile=s.compile)
    space = task.action_space()
    if s.fixed_length:
        space = replace(space, min_len=space.max_len)
    policy = Policy.from_config(model, tokenizer, space, config, task.tool())
    trainer = task.trainer("gfn", policy, config, PPOConfig(), None)
    queries = trainer.queries[: s.queries]
    paths = StepPaths(trainer, queries, s.samples, s.seed)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    echo(f"gfnlm bench: task {s.task}, model {s.model} on {_device_name(device)}, {_precision_name(policy)}; "
         f"{s.queries} queries x {s.samples} samples, max {s.max_len} rationale tokens")

    results: dict = {"settings": asdict(s), "device": _device_name(device), "precision": policy.precision,
                     "compiled": policy.compile, "static_cache": policy.static_cache}
    if s.reference_repeats > 0:
        echo("computing the loss both ways on the same trajectories; the reference takes one query at a time, "
             "so this is the slowest part ...")
        fast, ref, ref_seconds = paths.check_equal()
        echo(f"same trajectories, same loss: ours {fast:.6f}, reference {ref:.6f} (|diff| {abs(fast - ref):.2e})")
        results |= {"loss_ours": fast, "loss_reference": ref, "loss_abs_diff": abs(fast - ref)}
    timings: dict[str, Timing] = {}
    peak = matmul_peak_gflops(device, policy.dtype)  # first: a compiled step's worker processes may linger after
    first = time.perf_counter()
    traj = paths.sample()  # the first call compiles the decoding step, where it is compiled
    results["first_sampling_s"] = time.perf_counter() - first
    log_r = trainer.reward(traj)
    tokens = int(traj.attention_mask[:, traj.prompt_len :].sum())
    prefixes = int((traj.lengths + 1).sum())
    results["mean_actions"] = float(traj.lengths.float().mean())
    results["mean_generated_tokens"] = tokens / len(traj)

    timings["sampling"] = time_it(paths.sample, s.warmup, s.repeats, device)
    inside = None if policy.compile else model_forward_share(paths.sample, policy, device)
    timings["reward"] = time_it(lambda: trainer.reward(traj), s.warmup, s.repeats, device)

    def forward_backward() -> None:
        trainer.model.train()
        paths.loss(traj, log_r).backward()
        trainer.optimizer.zero_grad(set_to_none=True)

    timings["forward+loss+backward"] = time_it(forward_backward, s.warmup, s.repeats, device)
    counter = TokenCounter(trainer.model)
    for _ in range(s.warmup):
        paths.fast_step()
    counter.reset()
    timings["step"] = time_it(paths.fast_step, 0, s.repeats, device)
    counted_steps = s.repeats
    if policy.compile:  # compiled decoding steps bypass the counter's hook: count one more step, run eagerly
        compiled_step, policy.compiled_step = policy.compiled_step, None
        counter.reset()
        paths.fast_step()
        counted_steps, policy.compiled_step = 1, compiled_step
    fast_flops = counter.flops(n_params) / counted_steps
    memory = measure_peak(paths.fast_step, device)
    results["ours"] = {
        "sampling_tokens_per_s": tokens / timings["sampling"].median,
        "reward_prefixes_per_s": prefixes / timings["reward"].median,
        "peak_memory_mb": memory,
        "step_flop": fast_flops,
        "sampling_outside_model_share": None if inside is None else 1.0 - inside,
        **{f"{k}_s": t.median for k, t in timings.items()},
    }
    echo(_table(timings, tokens, prefixes))
    if inside is not None:  # compiled steps run as one graph, past the hooks that time the decoder
        echo(f"sampling: {100 * (1 - inside):.0f}% of its time outside the decoder's forward passes")

    dtype = policy.dtype
    achieved = fast_flops / timings["step"].median / 1e9
    results["matmul_peak_gflops"] = peak
    echo(f"work of our step ~ {fast_flops / 1e12:.2f} TFLOP ({counter.total // counted_steps} tokens through the "
         f"decoder); {achieved:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of the measured {dtype} matmul peak "
         f"({peak:.0f} GFLOP/s)")
    step_parts = ("sampling", "reward", "forward+loss+backward")
    parts = sum(timings[k].median for k in step_parts)
    echo("where our step's time goes: " + ", ".join(
        f"{k} {100 * timings[k].median / parts:.0f}%" for k in step_parts) + " (optimizer update: the rest)")

    if s.profile_ops > 0:
        results["profile"] = op_profile(paths.fast_step, device, s.profile_ops)
        echo("operators taking most of our step: " + ", ".join(
            f"{op['op']} {100 * op['share']:.0f}% ({op['calls']} calls)" for op in results["profile"]))

    if s.reference_repeats > 0:
        counter.reset()
        ref_timing = time_it(paths.reference_step, 0, s.reference_repeats - 1, device)
        ref_flops = counter.flops(n_params) / max(1, s.reference_repeats - 1)
        ref_timing.seconds.append(ref_seconds)  # the equality check's reference step counts as one run
        ref_memory = measure_peak(paths.reference_step, device)
        speedup = ref_timing.median / timings["step"].median
        memory_ratio = memory / ref_memory if ref_memory > 0 else float("nan")
        results["reference"] = {"step_s": ref_timing.median, "step_runs_s": ref_timing.seconds,
                                "peak_memory_mb": ref_memory, "step_flop": ref_flops if s.reference_repeats > 1 else None}
        results["speedup"], results["memory_ratio"] = speedup, memory_ratio
        echo(f"reference step: {ref_timing.median:.2f} s (spread {ref_timing.spread()} s, {len(ref_timing.seconds)} "
             f"runs), peak memory {ref_memory:.0f} MB; ours: {timings['step'].median:.2f} s, peak memory {memory:.0f} MB")
    counter.handle.remove()
    s.save(results)
    if "speedup" in results:
        echo(f"step speedup vs reference: {results['speedup']:.1f}x, peak memory ratio: {results['memory_ratio']:.2f}")
    return results

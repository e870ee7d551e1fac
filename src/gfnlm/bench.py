"""``gfnlm bench``: time our training step against the paper's way of doing the same work.

Both paths train the same LoRA policy on the same queries with the same loss. Ours samples
under no_grad with the KV cache on (tool insertions included) and all queries together, scores
every prefix's reward in one pass with the demonstrations cached, and re-scores the policy in one
teacher-forced pass. The reference (``gfnlm.reference``) does what the paper's code does: one
query per batch, log-probs taken from a sampling loop that carries gradients with the cache off
(a tool is in use), and one forward pass per prefix for the reward (demonstrations recomputed).

Before anything is timed, both paths compute the loss on the same trajectories and must agree
within 1e-4 (relative to the loss's size). Then each part is timed (warm-up, repeats, median and
spread), peak memory is measured in separate untimed runs (bytes allocated above the start: malloc
on CPU, the CUDA allocator on GPU),
and the floating-point work of a step is compared with the machine's measured matmul throughput.
"""

from __future__ import annotations

import ctypes
import json
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch

from gfnlm.config import ConfigError, TrainConfig, setting
from gfnlm.decoding import TokenCounter
from gfnlm.losses import modified_subtb_loss
from gfnlm.modes import adapter_disabled, eval_mode
from gfnlm.reference import per_prefix_suffix_rewards, sample_with_grad
from gfnlm.rewards import LMSuffixReward
from gfnlm.sampling import encode_prompts
from gfnlm.gflownet import GFlowNetTrainer, MicroBatch
from gfnlm.trajectories import Query

EQUALITY_TOLERANCE = 1e-4


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


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def spread(self) -> str:
        return f"{min(self.seconds):.3g}-{max(self.seconds):.3g}"


# ----------------------------------------------------------------------------- measuring
class PeakMemory:
    """Peak memory in use above the level at entry: bytes allocated by malloc on CPU (glibc's
    ``mallinfo2``, sampled every 5 ms; RSS elsewhere, which freed-but-kept memory blurs), and
    allocated bytes on CUDA. Unlike RSS, allocated bytes are not hidden by memory a previous
    step freed and the allocator kept."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    @contextmanager
    def measure(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            yield
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
            return
        base, peak, stop = cpu_memory_mb(), [0.0], threading.Event()

        def poll() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], cpu_memory_mb())
                stop.wait(0.005)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.peak_mb = max(peak[0], cpu_memory_mb()) - base


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def cpu_memory_mb() -> float:
    """Bytes in use from malloc (all arenas, mmapped blocks included), or RSS where glibc is absent."""
    if _MALLINFO2 is not None:
        info = _MALLINFO2()
        return (info.uordblks + info.hblkhd) / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> Timing:
    for _ in range(warmup):
        fn()
    timing = Timing()
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        timing.seconds.append(time.perf_counter() - start)
    return timing


def measure_peak(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory (MB above the start) of one untimed call: the CPU poller slows the code it watches."""
    memory = PeakMemory(device)
    with memory.measure():
        fn()
    return memory.peak_mb


def op_profile(fn: Callable[[], object], device: torch.device, top: int) -> list[dict]:
    """The ``top`` operators by own time (device time on CUDA) in one call of ``fn``, with their share.

    On CPU only ``aten::`` operators are ranked: the profiler also times scopes such as
    ``Optimizer.step#AdamW.step`` or ``autograd::engine::evaluate_function``, whose own time is the
    Python and dispatch overhead between operators, not an operator to optimise. On CUDA the ranked
    events are the kernels. Shares stay fractions of all recorded own time.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        fn()
        _sync(device)
    return rank_operators(prof.key_averages(), top, cuda)


def rank_operators(events, top: int, cuda: bool = False) -> list[dict]:
    """``op_profile``'s ranking of profiler events (``key``, ``count`` and own time in microseconds)."""
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(own(e) for e in events) or 1.0
    operators = [e for e in events if cuda or e.key.startswith("aten::")]
    ranked = sorted(operators, key=own, reverse=True)[:top]
    return [{"op": e.key, "share": own(e) / total, "seconds": own(e) / 1e6, "calls": e.count} for e in ranked]


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 1.0) -> float:
    """Measured matrix-multiply throughput of this machine, in the model's dtype."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    _sync(device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
        if device.type == "cuda" and n % 10:
            continue
        _sync(device)
    _sync(device)
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e9


# ----------------------------------------------------------------------------- the two paths
class StepPaths:
    """Our step and the reference step on one trainer (same model, LoRA, optimizer, reward, queries)."""

    def __init__(self, trainer: GFlowNetTrainer, queries: list[Query], samples: int, seed: int):
        if not isinstance(trainer.reward, LMSuffixReward):
            raise ValueError("the reference path reproduces suffix rewards (LMSuffixReward); this trainer's "
                             f"reward is {type(trainer.reward).__name__}")
        self.trainer, self.samples = trainer, samples
        self.queries = queries
        self.generator = torch.Generator().manual_seed(seed)
        reward = trainer.reward
        self.context_ids = list(reward.context.ids) if reward.context is not None else []
        tok = trainer.policy.tokenizer
        self.suffix_ids = {q.key: tok(reward.suffix(q), add_special_tokens=False)["input_ids"] for q in queries}
        self.prompt_ids = dict(zip((q.key for q in queries), encode_prompts(tok, queries)))

    def rows(self) -> list[Query]:
        return [q for q in self.queries for _ in range(self.samples)]

    # ours
    def sample(self):
        return self.trainer.policy.sample(self.rows(), generator=self.generator)

    def loss(self, traj, log_r) -> torch.Tensor:
        return self.trainer.objective(MicroBatch(traj, log_r, torch.ones(len(traj), dtype=torch.bool)), 1.0)

    def fast_step(self) -> None:
        t = self.trainer
        t.model.train()
        t.optimizer.zero_grad(set_to_none=True)
        traj = self.sample()
        self.loss(traj, t.reward(traj)).backward()
        t.optimizer.step()

    # reference
    def reference_terms(self, query: Query, forced=None) -> list[torch.Tensor]:
        """log P_F, log P_⊤, log R, lengths and log Z of ``samples`` trajectories of one query, the paper's way."""
        t = self.trainer
        records, log_pf, log_pterm = sample_with_grad(
            t.model, self.prompt_ids[query.key], self.samples, t.space, t.policy.tool, query, self.generator, forced)
        with adapter_disabled(t.model), eval_mode(t.model):
            log_r = per_prefix_suffix_rewards(t.model, records, self.suffix_ids[query.key], self.context_ids)
        lengths = torch.tensor([sum(r.is_action) for r in records], device=log_pf.device)
        log_z = t.log_z.values[t.query_index[query.key]].expand(len(records))
        return [log_pf, log_pterm, log_r, lengths, log_z]

    def subtb(self, log_pf, log_pterm, log_r, lengths, log_z) -> torch.Tensor:
        t = self.trainer
        return modified_subtb_loss(log_pf, log_pterm, log_r, lengths, t.config.subtb_lambda, log_z=log_z,
                                   min_len=t.space.min_len)

    def reference_step(self) -> None:
        t = self.trainer
        t.model.train()
        t.optimizer.zero_grad(set_to_none=True)
        for query in self.queries:  # one query per batch
            (self.subtb(*self.reference_terms(query)) / len(self.queries)).backward()
        t.optimizer.step()

    def check_equal(self) -> tuple[float, float, float]:
        """Both losses on the same trajectories; raises if they differ. The reference side then
        finishes its step (backward, update), timed: returns (ours, reference, reference step seconds)."""
        t = self.trainer
        t.model.eval()  # dropout off: both paths must see the same function
        traj = self.sample()
        with torch.no_grad():
            fast = float(self.loss(traj, t.reward(traj)))
        records = traj.records()
        device = t.device
        _sync(device)
        start = time.perf_counter()
        t.optimizer.zero_grad(set_to_none=True)
        groups = [self.reference_terms(q, forced=records[i * self.samples : (i + 1) * self.samples])
                  for i, q in enumerate(self.queries)]
        loss = self.subtb(*(_pad_cat([g[k] for g in groups]) for k in range(5)))
        loss.backward()
        t.optimizer.step()
        _sync(device)
        seconds = time.perf_counter() - start
        ref = float(loss.detach())
        if abs(fast - ref) > EQUALITY_TOLERANCE * max(1.0, abs(ref)):
            raise AssertionError(f"our loss {fast:.6f} differs from the reference loss {ref:.6f} on the same trajectories")
        return fast, ref, seconds


def _pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [n_i, T_i] (or [n_i]) tensors along rows, zero-padding the time axis."""
    if tensors[0].ndim == 1:
        return torch.cat(tensors)
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors])


# ----------------------------------------------------------------------------- the benchmark
def run_bench(settings: BenchSettings, echo: Callable[[str], None] = print) -> dict:
    if settings.processes:
        return run_process_scaling(settings, echo)
    if settings.peer:
        return run_peer(settings, echo)
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
    trainer = GFlowNetTrainer(policy, task.reward(policy), task.train_queries(), config)
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
    if s.output:
        Path(s.output).parent.mkdir(parents=True, exist_ok=True)
        Path(s.output).write_text(json.dumps(results, indent=1))
    if "speedup" in results:
        echo(f"step speedup vs reference: {results['speedup']:.1f}x, peak memory ratio: {results['memory_ratio']:.2f}")
    return results


def _table(timings: dict[str, Timing], tokens: int, prefixes: int) -> str:
    rows = [f"{'part':<24}{'median s':>10}  {'spread s':<16}rate"]
    rates = {"sampling": f"{tokens / timings['sampling'].median:.0f} tokens/s",
             "reward": f"{prefixes / timings['reward'].median:.0f} prefixes/s"}
    for name, t in timings.items():
        rows.append(f"{name:<24}{t.median:>10.3f}  {t.spread():<16}{rates.get(name, '')}")
    return "\n".join(rows)


def _precision_name(policy) -> str:
    weights = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[policy.precision]
    decoding = "compiled decoding" if policy.compile else ("static KV cache" if policy.static_cache else "eager decoding")
    return f"{weights} weights, {decoding}"


def model_forward_share(fn: Callable[[], object], policy, device: torch.device) -> float:
    """The share of one call of ``fn`` (a sampling call) spent inside the decoder body's forward passes, the
    prompts' included; the rest is the sampler's own work (the head, the action space, draws, bookkeeping)."""
    from gfnlm.scoring import split_model

    body, inside, started = split_model(policy.model)[0], [0.0], [0.0]

    def enter(*_) -> None:
        _sync(device)
        started[0] = time.perf_counter()

    def leave(*_) -> None:
        _sync(device)
        inside[0] += time.perf_counter() - started[0]

    handles = [body.register_forward_pre_hook(enter), body.register_forward_hook(leave)]
    try:
        seconds = time_it(fn, 0, 1, device).median
    finally:
        for handle in handles:
            handle.remove()
    return inside[0] / seconds


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def engine_table(files: list[Path]) -> str:
    """One row per ``gfnlm bench --output`` file of our step alone, in the order given: its precision and decoding,
    the step's time and its speed-up over our float32 eager step at the same point (queries x samples, T), its
    parts' rates, the share of the matmul peak measured in the same run in that precision, and the share of
    sampling spent outside the decoder. A file without a precision comes from before the Policy (float32, eager)."""
    from gfnlm.reports.tables import markdown_table

    header = ["our step", "queries x samples", "max T (mean)", "step (s)", "speed-up vs float32 eager",
              "sampling tok/s", "reward prefixes/s", "forward+backward (s)", "share of matmul peak",
              "sampling outside the decoder", "first sampling call (s)"]
    results = [json.loads(Path(path).read_text()) for path in files]
    point_of = lambda r: (r["settings"]["queries"], r["settings"]["samples"], r["settings"]["max_len"])  # noqa: E731
    baseline = {point_of(r): r["ours"]["step_s"] for r in results if r.get("precision") == "no" and not r["compiled"]}
    rows = []
    for r in results:
        st, ours = r["settings"], r["ours"]
        point = f"{st['queries']} x {st['samples']}"
        reference = baseline.get(point_of(r))
        if "precision" in r:
            weights = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[r["precision"]]
            path_name = f"{weights}, {'compiled' if r['compiled'] else 'eager'} decoding"
        else:
            path_name = "float32, before the Policy (previous release)"
        share = ours["step_flop"] / ours["step_s"] / 1e9 / r["matmul_peak_gflops"]
        outside = ours.get("sampling_outside_model_share")
        rows.append([path_name, point, f"{st['max_len']} ({r['mean_actions']:.1f})", f"{ours['step_s']:.2f}",
                     f"{reference / ours['step_s']:.2f}x" if reference else "-", f"{ours['sampling_tokens_per_s']:.0f}",
                     f"{ours['reward_prefixes_per_s']:.0f}", f"{ours['forward+loss+backward_s']:.2f}",
                     f"{100 * share:.0f}% of {r['matmul_peak_gflops']:.0f} GFLOP/s",
                     f"{100 * outside:.0f}%" if outside is not None else "-",
                     f"{r['first_sampling_s']:.1f}" if "first_sampling_s" in r else "-"])
    return markdown_table(header, rows)


def results_table(files: list[Path]) -> str:
    """One row per ``gfnlm bench --output`` file (device): our step, the reference step, speed-up and memory.
    A run of the sampler with the static KV cache says so after its device."""
    from gfnlm.reports.tables import markdown_table

    header = ["device", "queries x samples", "max T (mean)", "our step (s)", "reference step (s)", "speed-up",
              "our peak MB", "reference peak MB", "memory ratio", "sampling tok/s", "reward prefixes/s",
              "share of matmul peak"]
    rows = []
    for path in files:
        r = json.loads(Path(path).read_text())
        ours, ref = r["ours"], r.get("reference", {})
        share = ours["step_flop"] / ours["step_s"] / 1e9 / r["matmul_peak_gflops"]
        st = r["settings"]
        device = r["device"] + (", static KV cache" if st.get("static_cache") else "")
        rows.append([device, f"{st['queries']} x {st['samples']}", f"{st['max_len']} ({r['mean_actions']:.1f})",
                     f"{ours['step_s']:.2f}", f"{ref['step_s']:.2f}" if ref else "-",
                     f"{r['speedup']:.1f}x" if ref else "-", f"{ours['peak_memory_mb']:.0f}",
                     f"{ref['peak_memory_mb']:.0f}" if ref else "-", f"{r['memory_ratio']:.2f}" if ref else "-",
                     f"{ours['sampling_tokens_per_s']:.0f}", f"{ours['reward_prefixes_per_s']:.0f}", f"{100 * share:.0f}%"])
    return markdown_table(header, rows)


# ----------------------------------------------------------------------------- another library's step
def run_peer(settings: BenchSettings, echo: Callable[[str], None] = print) -> dict:
    """Samples/s of our GFlowNet step and of TRL's GRPO step (``gfnlm.baselines.grpo``) on the bench's task, each
    on a fresh copy of the model with the same settings; ``ratio`` = ours / TRL's. Both steps sample, score the
    reward and take one update; ours also scores every prefix's reward and stop probability (SubTB), TRL's
    normalises each group's rewards (GRPO's advantages)."""
    import tempfile

    import trl

    from gfnlm.baselines.grpo import GRPOBaseline
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
        policy = task.policy(model, config)
        if method == "grpo":
            return GRPOBaseline(policy, task.reward(policy), task.train_queries(), config, output_dir)
        return task.trainer(method, policy, config, None, output_dir)

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
    if s.output:
        Path(s.output).parent.mkdir(parents=True, exist_ok=True)
        Path(s.output).write_text(json.dumps(results, indent=1))
    return results


def peer_table(files: list[Path]) -> str:
    """One row per ``gfnlm bench --peer trl-grpo --output`` file: both steps' samples/s and their ratio."""
    from gfnlm.reports.tables import markdown_table

    rows = []
    for path in files:
        r = json.loads(Path(path).read_text())
        st = r["settings"]
        rows.append([r["device"], f"{st['task']}, {st['queries']} x {st['samples']}, T <= {st['max_len']}",
                     f"{r['ours']['samples_per_s']:.2f}", f"{r['peer']['samples_per_s']:.2f}",
                     r["peer"]["trl_version"], f"{r['ratio']:.2f}"])
    return markdown_table(["device", "task, queries x samples, length", "ours (GFlowNet) samples/s",
                           "TRL GRPO samples/s", "trl", "ratio"], rows)


# ----------------------------------------------------------------------------- data-parallel scaling
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
                       "-m", "gfnlm.bench", json.dumps(asdict(s)), str(out)]
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
    if s.output:
        Path(s.output).parent.mkdir(parents=True, exist_ok=True)
        Path(s.output).write_text(json.dumps(results, indent=1))
    return results


def scaling_worker(settings: BenchSettings, out: Path) -> None:
    """One rank of ``run_process_scaling``: GFlowNet training steps of the bench's task, no evaluation."""
    from gfnlm.models import load_model_and_tokenizer
    from gfnlm.tasks import get_task

    s = settings
    model, tokenizer = load_model_and_tokenizer(s.model)
    task_cls = get_task(s.task)
    task = task_cls(task_cls.Options(max_len=s.max_len), tokenizer)
    config = TrainConfig(steps=s.process_steps, queries_per_step=s.queries, samples_per_query=s.samples,
                         lora_rank=s.lora_rank, lora_alpha=2 * s.lora_rank, device="cpu", progress=False, seed=s.seed,
                         save_every=10**6, mixed_precision=s.mixed_precision, compile=s.compile)
    task.trainer("gfn", task.policy(model, config), config, None, out).train()


def scaling_table(files: list[Path]) -> str:
    """One row per ``gfnlm bench --processes N --output`` file: samples/s of 1 and N processes, efficiency."""
    from gfnlm.reports.tables import markdown_table

    rows = []
    for path in files:
        r = json.loads(Path(path).read_text())
        n, st = r["settings"]["processes"], r["settings"]
        rows.append([f"{st['task']}, {st['queries']} x {st['samples']} a process", str(n),
                     f"{r['runs']['1']['samples_per_s']:.2f}", f"{r['runs'][str(n)]['samples_per_s']:.2f}",
                     f"{100 * r['scaling_efficiency']:.0f}%"])
    return markdown_table(["step (queries x samples)", "processes N", "samples/s, 1 process", "samples/s, N processes",
                           "scaling efficiency"], rows)


if __name__ == "__main__":  # a rank of run_process_scaling, started by torchrun
    import sys

    scaling_worker(BenchSettings(**json.loads(sys.argv[1])), Path(sys.argv[2]))

"""Measuring tools of ``gfnlm bench``: timings, peak memory, the operators that take a call's time, the machine's
matmul throughput, the share of sampling spent in the decoder, and how a run names its device and precision."""

from __future__ import annotations

import ctypes
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def spread(self) -> str:
        return f"{min(self.seconds):.3g}-{max(self.seconds):.3g}"


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

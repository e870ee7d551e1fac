"""Tables of ``gfnlm bench`` results: the parts of our step as the bench prints them, and one row per ``--output``
file for the docs (``scripts/results_table.py bench ...``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gfnlm.bench.measure import Timing


def _table(timings: dict[str, Timing], tokens: int, prefixes: int) -> str:
    rows = [f"{'part':<24}{'median s':>10}  {'spread s':<16}rate"]
    rates = {"sampling": f"{tokens / timings['sampling'].median:.0f} tokens/s",
             "reward": f"{prefixes / timings['reward'].median:.0f} prefixes/s"}
    for name, t in timings.items():
        rows.append(f"{name:<24}{t.median:>10.3f}  {t.spread():<16}{rates.get(name, '')}")
    return "\n".join(rows)


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

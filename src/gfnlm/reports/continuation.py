"""The continuation task's report: its row of the README's results table, Fig. 3's numbers and
Pareto plot, and Table B.1's samples."""

from __future__ import annotations

import json
from pathlib import Path

from gfnlm.reports.base import TaskReport
from gfnlm.reports.tables import Headline, Pick, ResultsTable, markdown_table, read_eval, training_budget
from gfnlm.tasks.continuation import ContinuationTask

EXAMPLE_PROMPTS = (0, 1, 4)
"""Held-out prompts (lines 951, 952, 955) of the Table B.1-like list: three of Appendix B's four."""


class ContinuationReport(TaskReport):
    task = ContinuationTask.name

    headline = Headline(
        experiment="Sentence continuation (§4.1)", page="continuation.md",
        metric="max log-likelihood of 8 next sentences / their diversity",
        columns=("max log-likelihood", "diversity"),
        gfn=Pick("continuation", {"method": "GFlowNet T=0.875"}),
        baseline=Pick("continuation", {"method": "diverse-beam penalty=1 x5"}), baseline_name="diverse beam search, 5x compute",
        paper="above diverse beam search in max log-likelihood, on par with it at 5x compute, more diverse (GPT-2 XL, Fig. 3)",
        setting="SmolLM2-135M, 2 CPU cores", budget="{training}")

    @classmethod
    def results_tables(cls) -> dict[str, ResultsTable]:
        return {
            "": ResultsTable(metrics_table,
                             "one row per evaluation folder (Fig. 3's numbers); --figure draws the Pareto plot",
                             draw=lambda runs, png: draw_pareto([read_eval(r) for r in runs], png)),
            "samples": ResultsTable(samples_table, "Table B.1: three held-out prompts, each evaluation's continuations"),
        }

    @classmethod
    def figures(cls, results: list[dict], output_dir: Path) -> list[Path]:
        return [draw_pareto(results, output_dir / "pareto.png")]


def metrics_table(runs: list[Path]) -> str:
    """Fig. 3's numbers: one row per evaluation folder (a GFlowNet run's, or a decoding baseline's), and whether
    it is on the Pareto front of max log-likelihood x diversity among these rows."""
    header = ["method", "max log-likelihood", "diversity", "on the front", "mean log-likelihood", "mean tokens",
              "ended by '.'", "distinct of N", "forward tokens / prompt", "s / prompt", "prompts", "training"]
    results = [read_eval(run) for run in runs]
    front = pareto_front(results)
    rows = [[r["label"], f"{r['max_log_likelihood']:.2f}", f"{r['diversity']:.3f}", "yes" if on else "",
             f"{r['mean_log_likelihood']:.2f}", f"{r['mean_length']:.1f}", f"{r['ended_fraction']:.2f}",
             f"{r['distinct']:.1f} / {r['eval_samples']}", f"{r['forward_tokens_per_prompt']:.0f}",
             f"{r['seconds_per_prompt']:.1f}", str(r["n_prompts"]), training_budget(run)]
            for run, r, on in zip(runs, results, front, strict=True)]
    return markdown_table(header, rows)


def pareto_front(results: list[dict]) -> list[bool]:
    """For each result, whether no other one is at least as likely and as diverse and better in one of the two."""
    points = [(r["max_log_likelihood"], r["diversity"]) for r in results]
    return [not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points) for p in points]


def samples_table(runs: list[Path]) -> str:
    """Paper Table B.1: for three held-out prompts, the continuations of each evaluation (one row each)."""
    rows = []
    for index in EXAMPLE_PROMPTS:
        for run in runs:
            lines = (run / "samples.jsonl").read_text().splitlines()
            if index >= len(lines):
                continue
            entry = json.loads(lines[index])
            texts = " / ".join(f"{c['text'].strip()} ({c['log_likelihood']:.1f})" for c in entry["continuations"])
            rows.append([entry["prompt"], read_eval(run)["label"], texts])
    return markdown_table(["prompt", "method", "continuations (log-likelihood)"], rows)


def draw_pareto(results: list[dict], path: Path) -> Path:
    """Paper Fig. 3: max log-likelihood (y) against diversity (x), one labelled point per method."""
    from gfnlm.reports.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    front = sorted((r["diversity"], r["max_log_likelihood"]) for r, on in zip(results, pareto_front(results)) if on)
    ax.plot(*zip(*front), color="0.6", linestyle="--", linewidth=1, zorder=1, label="Pareto front")
    gfn = sorted((r for r in results if r["label"].startswith("GFlowNet")), key=lambda r: r["diversity"])
    if len(gfn) > 1:  # the temperature sweep as one curve, as in the paper's figure (diversity grows with T)
        ax.plot([r["diversity"] for r in gfn], [r["max_log_likelihood"] for r in gfn], color="#c44e52", linewidth=1,
                zorder=2)
    for r in results:
        star = r["label"].startswith("GFlowNet")
        ax.scatter(r["diversity"], r["max_log_likelihood"], marker="*" if star else "o", s=120 if star else 40,
                   color="#c44e52" if star else "#4c72b0", zorder=3)
        ax.annotate(r["label"], (r["diversity"], r["max_log_likelihood"]), textcoords="offset points",
                    xytext=(9, -3) if star else (5, 4), fontsize=7)  # stars' labels level, right of their curve
    ax.set_xlim(right=max(1.0, ax.get_xlim()[1]))  # room for the labels of the most diverse points
    ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("diversity (1 - mean pairwise cosine similarity)")
    ax.set_ylabel("max log-likelihood over N samples")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)

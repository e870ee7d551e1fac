"""The random-number task's report: its row of the README's results table, its default table and its
figure, the histograms of paper Fig. 2."""

from __future__ import annotations

from pathlib import Path

from gfnlm.reports.base import TaskReport
from gfnlm.reports.tables import Headline, Pick, ResultsTable, read_eval
from gfnlm.tasks.random_number import RandomNumberTask


class RandomNumberReport(TaskReport):
    task = RandomNumberTask.name
    headline = Headline(
        experiment="Random integers (§2, Fig. 2)", page="random-number.md", metric="KL(policy ‖ uniform on 0..100)",
        columns=("kl",), gfn=Pick("demo", {"model": "GFlowNet fine-tuned", "steps": "200"}),
        baseline=Pick("random-number", {"model": "sft"}), baseline_name="SFT on target samples",
        paper="9.75e-5, from 3.37 (GPT-J 6B); PPO stays skewed (no figure)",
        setting="SmolLM2-135M, 2 CPU cores (`make demo`)", budget="{steps} steps x 32 samples, {train min} min")

    @classmethod
    def results_tables(cls) -> dict[str, ResultsTable]:
        table = super().results_tables()[""]
        return {"": ResultsTable(table.build, table.help + "; --figure draws their histograms (paper Fig. 2)",
                                 draw=lambda runs, png: draw_histograms([read_eval(run) for run in runs], png))}

    @classmethod
    def figures(cls, results: list[dict], output_dir: Path) -> list[Path]:
        return [draw_histograms(results, output_dir / "histogram.png")]


def draw_histograms(results: list[dict], path: Path) -> Path:
    """Paper Fig. 2: one panel per model, the distribution of the integers it writes, log axis.

    Bars are frequencies among the valid samples; the solid line is the policy's exact
    distribution on the valid integers (renormalised, what ``kl`` compares) and the dashed line
    the target. The title gives the sampled valid fraction and the exact valid mass.
    """
    panels = len(results)
    from gfnlm.reports.plots import plt, save_figure

    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), sharey=True, squeeze=False)
    for ax, result in zip(axes[0], results):
        integers = result["integers"]
        valid_samples = max(sum(result["sample_counts"]), 1)
        freq = [c / valid_samples for c in result["sample_counts"]]
        mass = sum(result["probabilities"])
        exact = [p / mass for p in result["probabilities"]] if mass > 0 else result["probabilities"]
        ax.bar(integers, freq, width=1.0, color="#4c72b0", alpha=0.75, label="sampled (valid)")
        ax.plot(integers, exact, color="#dd8452", lw=1.0, label="exact (renormalised)")
        ax.plot(integers, result["target"], color="black", ls="--", lw=0.8, label="target")
        ax.set_yscale("log")
        ax.set_ylim(1e-5, 1.0)
        ax.set_xlabel("generated number")
        sampled = result.get("sampled_valid_fraction")
        sampled_text = f"{100 * sampled:.1f}% of samples valid, " if sampled is not None else ""
        ax.set_title(
            f"{result['label']}\n{sampled_text}valid mass {result['valid_mass']:.4g}, KL {result['kl']:.3g}", fontsize=9
        )
    axes[0][0].set_ylabel("probability")
    axes[0][0].legend(fontsize=8, loc="upper right")
    return save_figure(fig, path)

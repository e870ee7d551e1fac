"""Figures written by tasks and reports (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def random_number_histograms(results: list[dict], path: Path) -> Path:
    """Paper Fig. 2: one panel per model, the distribution of the integers it writes, log axis.

    Bars are frequencies among the valid samples; the solid line is the policy's exact
    distribution on the valid integers (renormalised, what ``kl`` compares) and the dashed line
    the target. The title gives the sampled valid fraction and the exact valid mass.
    """
    panels = len(results)
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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_curves(curves: dict[str, dict[int, dict[int, tuple[float, float | None]]]], path: Path) -> Path:
    """Accuracy (%) against training steps, one panel per run (side by side, same y axis), one
    colour per test set (operand count): solid lines the answers' accuracy, dashed the chains'
    own (their last calculator result, before the LM completes the answer).
    ``curves``: {run name: {step: {operands: (accuracy, chain accuracy or None)}}}."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4.6 * len(curves), 3.6), sharex=True, sharey=True, squeeze=False)
    for ax, (name, points) in zip(axes[0], curves.items()):
        steps = list(points)
        for operands in sorted({k for row in points.values() for k in row}):
            xs = [s for s in steps if operands in points[s]]
            line, = ax.plot(xs, [100 * points[s][operands][0] for s in xs], marker="o", label=f"{operands} operands")
            chain = [(s, points[s][operands][1]) for s in xs if points[s][operands][1] is not None]
            if chain:
                ax.plot([s for s, _ in chain], [100 * c for _, c in chain], ls="--", color=line.get_color(), alpha=0.7)
        ax.set_xlabel("training step")
        ax.set_ylim(-2, 102)
        ax.set_title(name, fontsize=9)
    axes[0][0].plot([], [], ls="--", color="gray", label="chain's own answer")
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

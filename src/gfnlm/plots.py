"""Figures written by tasks and reports (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def random_number_histograms(results: list[dict], path: Path) -> Path:
    """Paper Fig. 2: one panel per model, empirical frequency of each integer on a log axis.

    Bars are sampled frequencies; the line is the policy's exact probability of each integer
    and the dashed line the target.
    """
    panels = len(results)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), sharey=True, squeeze=False)
    for ax, result in zip(axes[0], results):
        integers = result["integers"]
        n = max(result["n_samples"], 1)
        freq = [c / n for c in result["sample_counts"]]
        ax.bar(integers, freq, width=1.0, color="#4c72b0", alpha=0.75, label="sampled")
        ax.plot(integers, result["probabilities"], color="#dd8452", lw=1.0, label="exact")
        ax.plot(integers, result["target"], color="black", ls="--", lw=0.8, label="target")
        ax.set_yscale("log")
        ax.set_ylim(1e-5, 1.0)
        ax.set_xlabel("generated number")
        valid = result.get("sampled_valid_fraction")
        valid_text = f"{100 * valid:.1f}% valid" if valid is not None else f"{100 * result['valid_mass']:.1f}% valid"
        ax.set_title(f"{result['label']}\n{valid_text}, KL {result['kl']:.3g}", fontsize=10)
    axes[0][0].set_ylabel("probability")
    axes[0][0].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

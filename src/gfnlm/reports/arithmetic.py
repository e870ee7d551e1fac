"""The arithmetic task's report: its row of the README's results table, Table 4 / E.3 (accuracy per
operand count over seeds) and the learning curves of ``scripts/arithmetic_runs.py --curve`` runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gfnlm.reports.base import TaskReport
from gfnlm.reports.tables import Headline, Pick, ResultsTable, markdown_table, mean_std, one_folder
from gfnlm.tasks.arithmetic import ArithmeticTask


class ArithmeticReport(TaskReport):
    task = ArithmeticTask.name

    headline = Headline(
        experiment="Integer arithmetic with a calculator (§4.4)", page="arithmetic.md",
        metric="accuracy (%), 3 / 4 / 5 operands (5: out of distribution)",
        columns=("3 operands", "4 operands", "5 operands"),
        gfn=Pick("arithmetic-gpu-likelihood", {"method": "GFlowNet fine-tuning (train_file=1digit_34_op+-_train_50.json, "
                 "p_replay=0.5, p_tempered=0.25, buffer_sampling=reward, reward_likelihood_weight=3)"}),
        baseline=Pick("arithmetic-gpu", {"method": "supervised fine-tuning"}), baseline_name="SFT",
        paper="95.2 / 75.4 / 40.7; SFT 72.1 / 19.6 / 12.8 (GPT-J 6B)",
        setting="SmolLM2-135M, one H200, the likelihood p(Y | X Z) cubed in the reward",
        budget="{training (steps x samples / time)}, {n seeds} seeds")

    @classmethod
    def results_tables(cls) -> dict[str, ResultsTable]:
        return {
            "": ResultsTable(lambda paths: accuracy_table(one_folder(paths, "scripts/arithmetic_runs.py")),
                             "accuracy per operand count over seeds, from scripts/arithmetic_runs.py's output folder"),
            "curve": ResultsTable(lambda runs: curve_table(_curves(runs)),
                                  "accuracy against training steps of runs made with arithmetic_runs.py --curve",
                                  draw=lambda runs, png: draw_curves(_curves(runs), png)),
        }


def accuracy_table(root: Path) -> str:
    """Paper Table 4 from ``scripts/arithmetic_runs.py``'s output ``root``: rows are methods (and seed-rationale
    counts), columns the accuracy per operand count over seeds, then the same for the chain's own answer
    (``chain_accuracy``: the last calculator result, before the base LM completes Y), where the eval.json
    files have it."""
    groups: dict[str, dict[int, list[float]]] = {}
    chains: dict[str, dict[int, list[float]]] = {}
    budget: dict[str, list[str]] = {}
    for path in sorted(root.glob("*/eval-*ops/eval.json")):
        r = json.loads(path.read_text())
        if r["method"] == "prompting":
            name = f"{r['shots']}-shot prompting" + (" (step by step)" if r["shots"] == 0 else "")
        else:
            name = {"gfn": "GFlowNet fine-tuning", "sft": "supervised fine-tuning", "ppo": "PPO"}[r["method"]]
            if r.get("settings"):  # a variant: its settings name the row (file paths by their file name)
                name += " (" + ", ".join(f"{k}={Path(str(v)).name}" for k, v in r["settings"].items()) + ")"
            if re.search(r"-seeds\d+$", path.parent.parent.name):  # the seed-rationale ablation (Table E.3)
                name += f", {r['seed_rationales']} seed rationales"
        groups.setdefault(name, {}).setdefault(r["operands"], []).append(r["accuracy"])
        if r.get("chain_accuracy") is not None:
            chains.setdefault(name, {}).setdefault(r["operands"], []).append(r["chain_accuracy"])
        if "train_steps" in r and r["operands"] == 3:
            budget.setdefault(name, []).append(f"{r['train_steps']} x {r['samples_per_step']} / {r['train_minutes']:.1f} min")
    operands = sorted({k for g in groups.values() for k in g})
    chain_operands = operands if chains else []
    header = ["method", *(f"{k} operands" for k in operands), *(f"chain, {k} operands" for k in chain_operands),
              "n seeds", "training (steps x samples / time)"]
    order = sorted(groups, key=lambda n: (n.startswith("GFlowNet"), "prompting" not in n,
                                          int(n.split("-")[0]) if n[0].isdigit() else 0, n))
    rows = []
    for name in order:
        cells = [mean_std(groups[name][k]) if k in groups[name] else "-" for k in operands]
        cells += [mean_std(chains[name][k]) if k in chains.get(name, {}) else "-" for k in chain_operands]
        seeds = max(len(v) for v in groups[name].values())
        rows.append([name, *cells, str(seeds), "; ".join(budget.get(name, ["-"]))])
    return markdown_table(header, rows)


CurvePoints = dict[int, dict[int, tuple[float, float | None]]]  # {step: {operands: (accuracy, chain accuracy)}}


def learning_curve(run: Path) -> CurvePoints:
    """A GFlowNet run's accuracy per checkpoint, from ``arithmetic_runs.py --curve``'s folders."""
    points: CurvePoints = {}
    for path in run.glob("curve/step-*/eval-*ops/eval.json"):
        r = json.loads(path.read_text())
        points.setdefault(r["train_steps"], {})[r["operands"]] = (r["accuracy"], r.get("chain_accuracy"))
    if not points:
        raise SystemExit(f"{run} has no curve/step-*/eval-*ops/eval.json: run scripts/arithmetic_runs.py --curve")
    return dict(sorted(points.items()))


def curve_table(curves: dict[str, CurvePoints]) -> str:
    """Rows: runs, then training steps; columns: accuracy, then the chains' own accuracy, per operand count (%)."""
    operands = sorted({k for points in curves.values() for row in points.values() for k in row})
    header = ["run", "step", *(f"{k} operands" for k in operands), *(f"chain, {k} operands" for k in operands)]
    rows = []
    for name, points in curves.items():
        for step, row in points.items():
            cells = [f"{100 * row[k][i]:.0f}" if k in row and row[k][i] is not None else "-"
                     for i in (0, 1) for k in operands]
            rows.append([name, str(step), *cells])
    return markdown_table(header, rows)


def draw_curves(curves: dict[str, CurvePoints], path: Path) -> Path:
    """Accuracy (%) against training steps, one panel per run (side by side, same y axis), one
    colour per test set (operand count): solid lines the answers' accuracy, dashed the chains'
    own (their last calculator result, before the LM completes the answer)."""
    from gfnlm.reports.plots import plt, save_figure

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
    return save_figure(fig, path)


def _curves(runs: list[Path]) -> dict[str, CurvePoints]:
    return {run.name: learning_curve(run) for run in runs}

"""The subjectivity task's report: its row of the README's results table, Table 3 / D.4 (accuracy or
ROC AUC per training size over seeds) and each run's log-odds."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from gfnlm.reports.base import TaskReport
from gfnlm.reports.tables import Headline, Pick, ResultsTable, markdown_table, mean_std, one_folder
from gfnlm.tasks.subjectivity import SubjectivityTask


class SubjectivityReport(TaskReport):
    task = SubjectivityTask.name

    headline = Headline(
        experiment="Subjectivity with latent rationales (§4.3)", page="subjectivity.md",
        metric="accuracy (%), 10 / 20 labelled examples", columns=("10 examples", "20 examples"),
        gfn=Pick("subjectivity", {"method": "GFlowNet fine-tuning"}),
        baseline=Pick("subjectivity", {"method": "supervised fine-tuning, lr 1e-4"}), baseline_name="SFT",
        paper="71.4 / 81.1; SFT 64.3 / 69.1 (GPT-J 6B)", setting="gemma3-270m, 2 CPU cores",
        budget="{steps} steps x 32 samples, {n seeds} seeds")

    @classmethod
    def results_tables(cls) -> dict[str, ResultsTable]:
        return {
            "": ResultsTable(lambda paths: accuracy_table(one_folder(paths, "scripts/subjectivity_runs.py")),
                             "accuracy per training size over seeds, from scripts/subjectivity_runs.py's output folder"),
            "auc": ResultsTable(lambda paths: accuracy_table(one_folder(paths, "scripts/subjectivity_runs.py"), "auc"),
                                "the same with the ROC AUC of the per-review log-odds instead of accuracy"),
            "log-odds": ResultsTable(log_odds_table, "per run: where it puts its decision (from predictions.jsonl)"),
        }


SUBJECTIVITY_ROWS = {  # run-name prefix (before any "-lr{LR}") -> row name, in the paper's order
    "prompting": "few-shot prompting",
    "sft": "supervised fine-tuning",
    "gfn": "GFlowNet fine-tuning",
    "em": "GFlowNet + M-step (EM)",
    "gfn-noseed": "GFlowNet, (-) seed buffer",
    "gfn-noseed-noagg": "GFlowNet, (-) seed buffer (-) aggregating",
}
UNTRAINED_ROWS = {"zero-shot": "zero-shot prompting", "base-rationales": "base model, sampled rationales"}
"""Folders of ``scripts/subjectivity_runs.py``'s output that need no training examples -> row name."""


def table_row(run_name: str) -> tuple[tuple[int, float], str] | None:
    """A run folder's row (sort key, name): "sft-lr5e-4-seed1" -> "supervised fine-tuning, lr 5e-4"; None
    for folders of other methods. Rows of one method sort by falling learning rate."""
    prefix = run_name.rsplit("-seed", 1)[0]
    method, _, lr = prefix.partition("-lr")
    if method not in SUBJECTIVITY_ROWS:
        return None
    try:
        key = (list(SUBJECTIVITY_ROWS).index(method), -float(lr) if lr else 0.0)
    except ValueError:
        return None
    return key, SUBJECTIVITY_ROWS[method] + (f", lr {lr}" if lr else "")


def _seed_counts(by_size: dict[int, list[float]], sizes: list[int]) -> str:
    """How many seeds each column averages: one number, or one per column ("3 / 1") where they differ."""
    counts = [str(len(by_size[n])) if n in by_size else "-" for n in sizes]
    present = {c for c in counts if c != "-"}
    return present.pop() if len(present) == 1 else " / ".join(counts)


def run_score(run: Path, result: dict, metric: str) -> float:
    """A run's accuracy (its eval.json ``result``), or the ROC AUC of its per-review log-odds (predictions.jsonl)."""
    if metric == "accuracy":
        return result["accuracy"]
    return roc_auc(*log_odds_by_label(read_predictions(run)))


def read_predictions(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]


def log_odds_by_label(predictions: list[dict]) -> list[list[float]]:
    """Each review's mean log-odds log p(subjective) - log p(objective), for objective then subjective reviews."""
    return [[statistics.mean(p["log_odds"]) for p in predictions if p["label"] == y] for y in (0, 1)]


def accuracy_table(root: Path, metric: str = "accuracy") -> str:
    """Paper Table 3 / D.4 from ``scripts/subjectivity_runs.py``'s output ``root``: rows are methods, columns
    the accuracy (or ROC AUC) per training size over seeds (the untrained rows fill every column)."""
    groups: dict[str, dict[int, list[float]]] = {}
    steps: dict[str, set[int]] = {}
    reviews: set[int] = set()
    sizes = sorted(int(p.name[1:]) for p in root.glob("n*") if p.name[1:].isdigit())
    for folder, name in UNTRAINED_ROWS.items():
        path = root / folder / "eval.json"
        if path.is_file():  # needs no training examples: the same figure in every column
            r = json.loads(path.read_text())
            groups[name] = {n: [run_score(path.parent, r, metric)] for n in sizes}
            reviews.add(r["n_reviews"])
    order: dict[str, tuple[int, float]] = {}
    for path in sorted(root.glob("n*/*-seed*/eval.json")):
        row = table_row(path.parent.name)
        if row is None:
            continue
        key, name = row
        order[name] = key
        r = json.loads(path.read_text())
        groups.setdefault(name, {}).setdefault(int(path.parent.parent.name[1:]), []).append(
            run_score(path.parent, r, metric))
        reviews.add(r["n_reviews"])
        if "train_steps" in r:
            steps.setdefault(name, set()).add(r["train_steps"])
    column = "{} examples" if metric == "accuracy" else "ROC AUC, {} examples"
    header = ["method", *(column.format(n) for n in sizes), "n seeds", "steps", "reviews evaluated"]
    untrained = [n for n in UNTRAINED_ROWS.values() if n in groups]
    rows = []
    for name in [*untrained, *sorted(order, key=order.get)]:
        cells = [mean_std(groups[name][n]) if n in groups[name] else "-" for n in sizes]
        rows.append([name, *cells, _seed_counts(groups[name], sizes),
                     ", ".join(map(str, sorted(steps.get(name, [])))) or "-", "/".join(map(str, sorted(reviews)))])
    return markdown_table(header, rows)


def log_odds_table(runs: list[Path]) -> str:
    """One row per run: accuracy, reviews predicted subjective, mean log-odds per true label, and
    the ROC AUC of the log-odds: how well they rank the reviews, whatever the threshold. A run that
    ranks reviews well but answers one label for all of them has the two means apart but on one side of 0."""
    header = ["run", "accuracy", "predicted subjective", "mean log-odds, objective reviews",
              "mean log-odds, subjective reviews", "ROC AUC"]
    rows = []
    for run in runs:
        predictions = read_predictions(run)
        by_label = log_odds_by_label(predictions)
        means = [f"{statistics.mean(v):.2f}" if v else "-" for v in by_label]
        auc = f"{roc_auc(*by_label):.2f}" if all(by_label) else "-"
        correct = sum(p["correct"] for p in predictions)
        rows.append([str(run), f"{correct} / {len(predictions)}", str(sum(p["prediction"] for p in predictions)),
                     *means, auc])
    return markdown_table(header, rows)


def roc_auc(negatives: list[float], positives: list[float]) -> float:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney statistic)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))

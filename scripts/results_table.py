#!/usr/bin/env python3
"""Build a README results table from runs' eval.json files (never typed by hand).

    python scripts/results_table.py runs/rn/base runs/rn/gfn runs/rn/ppo runs/rn/sft \
        --readme README.md --section random-number

prints a Markdown table (one row per run: its label, the task's metrics, training steps and
wall time from metrics.jsonl) and, with --readme, replaces the lines between
``<!-- results:SECTION -->`` and ``<!-- /results:SECTION -->`` in that file.

    python scripts/results_table.py --arithmetic runs/arith --readme README.md --section arithmetic

builds the arithmetic table (paper Table 4) from ``scripts/arithmetic_runs.py``'s output: accuracy
in % on 3, 4 and 5 operands, mean ± std over seeds (shuffles for k-shot prompting), and the
accuracy of the chains' own answers (the last calculator result) beside it.

    python scripts/results_table.py --arithmetic-curve runs/arith/gfn-seed0 --figure runs/arith/curve.png

tabulates (and draws) a GFlowNet run's accuracy against training steps, from its checkpoints'
evaluations (``arithmetic_runs.py --curve``).

    python scripts/results_table.py --bench runs/bench/cpu.json runs/bench/gpu.json --readme README.md --section bench

builds the benchmark table from ``gfnlm bench --output`` files.

    python scripts/results_table.py --subjectivity runs/subj --readme README.md --section subjectivity

builds the subjectivity table (paper Table 3, Table D.4) from ``scripts/subjectivity_runs.py``'s
output: accuracy in % for 10, 20 and 50 training examples, mean ± std over seeds. With
``--metric auc``: the ROC AUC of each run's per-review log-odds instead (in %), which says how
well a method ranks the reviews whatever the decision threshold.

    python scripts/results_table.py --subjectivity-log-odds runs/subj/n20/em-lr1e-4-seed*

shows where subjectivity runs put their decision (from predictions.jsonl): how many reviews each
predicts subjective, and the mean over reviews of the rationales' mean log-odds
log p(subjective) - log p(objective), separately for objective and subjective reviews. A run that
ranks reviews well but answers one label for all of them has the two means apart but on one side of 0.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from gfnlm.trainer import logged_training_minutes, read_logged_metrics

METRICS = ("valid_mass", "kl", "tv", "js")


def run_row(run: Path) -> list[str]:
    result = json.loads((run / "eval.json").read_text())
    steps, seconds = "-", "-"
    rows = read_logged_metrics(run)
    if rows:
        steps = str(rows[-1]["step"])
        seconds = f"{logged_training_minutes(rows):.1f}"
    cells = [f"{result[k]:.4g}" if isinstance(result.get(k), float) else "-" for k in METRICS]
    return [result.get("label", run.name), *cells, steps, seconds]


def table(runs: list[Path]) -> str:
    header = ["model", *METRICS, "steps", "train min"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(run_row(run)) + " |" for run in runs]
    return "\n".join(lines)


def _mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{100 * mean:.1f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def arithmetic_table(root: Path) -> str:
    """Rows: methods (and seed-rationale counts); columns: accuracy per operand count over seeds,
    then the same for the chain's own answer (``chain_accuracy``: the last calculator result,
    before the base LM completes Y), where the eval.json files have it."""
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
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = sorted(groups, key=lambda n: (n.startswith("GFlowNet"), "prompting" not in n,
                                          int(n.split("-")[0]) if n[0].isdigit() else 0, n))
    for name in order:
        cells = [_mean_std(groups[name][k]) if k in groups[name] else "-" for k in operands]
        cells += [_mean_std(chains[name][k]) if k in chains.get(name, {}) else "-" for k in chain_operands]
        seeds = max(len(v) for v in groups[name].values())
        lines.append("| " + " | ".join([name, *cells, str(seeds), "; ".join(budget.get(name, ["-"]))]) + " |")
    return "\n".join(lines)


CurvePoints = dict[int, dict[int, tuple[float, float | None]]]  # {step: {operands: (accuracy, chain accuracy)}}


def arithmetic_curve(run: Path) -> CurvePoints:
    """A GFlowNet run's accuracy per checkpoint, from ``arithmetic_runs.py --curve``'s folders."""
    points: CurvePoints = {}
    for path in run.glob("curve/step-*/eval-*ops/eval.json"):
        r = json.loads(path.read_text())
        points.setdefault(r["train_steps"], {})[r["operands"]] = (r["accuracy"], r.get("chain_accuracy"))
    if not points:
        raise SystemExit(f"{run} has no curve/step-*/eval-*ops/eval.json: run scripts/arithmetic_runs.py --curve")
    return dict(sorted(points.items()))


def arithmetic_curve_table(curves: dict[str, CurvePoints]) -> str:
    """Rows: runs, then training steps; columns: accuracy, then the chains' own accuracy, per operand count (%)."""
    operands = sorted({k for points in curves.values() for row in points.values() for k in row})
    header = ["run", "step", *(f"{k} operands" for k in operands), *(f"chain, {k} operands" for k in operands)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, points in curves.items():
        for step, row in points.items():
            cells = [f"{100 * row[k][i]:.0f}" if k in row and row[k][i] is not None else "-"
                     for i in (0, 1) for k in operands]
            lines.append("| " + " | ".join([name, str(step), *cells]) + " |")
    return "\n".join(lines)


SUBJECTIVITY_ROWS = {  # run-name prefix (before any "-lr{LR}") -> row name, in the paper's order
    "prompting": "few-shot prompting",
    "sft": "supervised fine-tuning",
    "gfn": "GFlowNet fine-tuning",
    "em": "GFlowNet + M-step (EM)",
    "gfn-noseed": "GFlowNet, (-) seed buffer",
    "gfn-noseed-noagg": "GFlowNet, (-) seed buffer (-) aggregating",
}


def subjectivity_row(run_name: str) -> tuple[tuple[int, float], str] | None:
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


def subjectivity_score(run: Path, result: dict, metric: str) -> float:
    """A run's accuracy (its eval.json ``result``), or the ROC AUC of its per-review log-odds (predictions.jsonl)."""
    if metric == "accuracy":
        return result["accuracy"]
    return roc_auc(*_log_odds_by_label(_predictions(run)))


def _predictions(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]


def _log_odds_by_label(predictions: list[dict]) -> list[list[float]]:
    """Each review's mean log-odds log p(subjective) - log p(objective), for objective then subjective reviews."""
    return [[statistics.mean(p["log_odds"]) for p in predictions if p["label"] == y] for y in (0, 1)]


def subjectivity_table(root: Path, metric: str = "accuracy") -> str:
    """Rows: methods; columns: accuracy (or ROC AUC) per training size over seeds (zero-shot in every column)."""
    groups: dict[str, dict[int, list[float]]] = {}
    steps: dict[str, set[int]] = {}
    reviews: set[int] = set()
    sizes = sorted(int(p.name[1:]) for p in root.glob("n*") if p.name[1:].isdigit())
    for folder, name in (("zero-shot", "zero-shot prompting"), ("base-rationales", "base model, sampled rationales")):
        path = root / folder / "eval.json"
        if path.is_file():  # needs no training examples: the same figure in every column
            r = json.loads(path.read_text())
            groups[name] = {n: [subjectivity_score(path.parent, r, metric)] for n in sizes}
            reviews.add(r["n_reviews"])
    order: dict[str, tuple[int, float]] = {}
    for path in sorted(root.glob("n*/*-seed*/eval.json")):
        row = subjectivity_row(path.parent.name)
        if row is None:
            continue
        key, name = row
        order[name] = key
        r = json.loads(path.read_text())
        groups.setdefault(name, {}).setdefault(int(path.parent.parent.name[1:]), []).append(
            subjectivity_score(path.parent, r, metric))
        reviews.add(r["n_reviews"])
        if "train_steps" in r:
            steps.setdefault(name, set()).add(r["train_steps"])
    column = "{} examples" if metric == "accuracy" else "ROC AUC, {} examples"
    header = ["method", *(column.format(n) for n in sizes), "n seeds", "steps", "reviews evaluated"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    untrained = [n for n in ("zero-shot prompting", "base model, sampled rationales") if n in groups]
    for name in [*untrained, *sorted(order, key=order.get)]:
        cells = [_mean_std(groups[name][n]) if n in groups[name] else "-" for n in sizes]
        lines.append("| " + " | ".join([name, *cells, _seed_counts(groups[name], sizes), ", ".join(map(str, sorted(steps.get(name, [])))) or "-",
                                        "/".join(map(str, sorted(reviews)))]) + " |")
    return "\n".join(lines)


def subjectivity_log_odds_table(runs: list[Path]) -> str:
    """One row per run: accuracy, reviews predicted subjective, mean log-odds per true label, and
    the ROC AUC of the log-odds: how well they rank the reviews, whatever the threshold."""
    header = ["run", "accuracy", "predicted subjective", "mean log-odds, objective reviews",
              "mean log-odds, subjective reviews", "ROC AUC"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        predictions = _predictions(run)
        by_label = _log_odds_by_label(predictions)
        means = [f"{statistics.mean(v):.2f}" if v else "-" for v in by_label]
        auc = f"{roc_auc(*by_label):.2f}" if all(by_label) else "-"
        correct = sum(p["correct"] for p in predictions)
        cells = [str(run), f"{correct} / {len(predictions)}", str(sum(p["prediction"] for p in predictions)), *means, auc]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def roc_auc(negatives: list[float], positives: list[float]) -> float:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney statistic)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def bench_table(files: list[Path]) -> str:
    """One row per benchmark run (device): our step, the reference step, speed-up and memory."""
    header = ["device", "queries x samples", "max T (mean)", "our step (s)", "reference step (s)", "speed-up", "our peak MB", "reference peak MB",
              "memory ratio", "sampling tok/s", "reward prefixes/s", "share of matmul peak"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for path in files:
        r = json.loads(path.read_text())
        ours, ref = r["ours"], r.get("reference", {})
        share = ours["step_flop"] / ours["step_s"] / 1e9 / r["matmul_peak_gflops"]
        st = r["settings"]
        cells = [r["device"], f"{st['queries']} x {st['samples']}", f"{st['max_len']} ({r['mean_actions']:.1f})",
                 f"{ours['step_s']:.2f}", f"{ref['step_s']:.2f}" if ref else "-",
                 f"{r['speedup']:.1f}x" if ref else "-", f"{ours['peak_memory_mb']:.0f}",
                 f"{ref['peak_memory_mb']:.0f}" if ref else "-", f"{r['memory_ratio']:.2f}" if ref else "-",
                 f"{ours['sampling_tokens_per_s']:.0f}", f"{ours['reward_prefixes_per_s']:.0f}", f"{100 * share:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_section(readme: Path, section: str, content: str) -> None:
    text = readme.read_text()
    start, end = f"<!-- results:{section} -->", f"<!-- /results:{section} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no {start} ... {end} block")
    readme.write_text(pattern.sub(lambda _: f"{start}\n{content}\n{end}", text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run directories holding eval.json")
    parser.add_argument("--arithmetic", type=Path, help="output folder of scripts/arithmetic_runs.py")
    parser.add_argument("--bench", nargs="*", type=Path, help="JSON files of gfnlm bench --output")
    parser.add_argument("--subjectivity", type=Path, help="output folder of scripts/subjectivity_runs.py")
    parser.add_argument("--metric", choices=["accuracy", "auc"], default="accuracy",
                        help="with --subjectivity: accuracy, or the ROC AUC of the log-odds (ranking, whatever the threshold)")
    parser.add_argument("--arithmetic-curve", nargs="+", type=Path, metavar="RUN",
                        help="GFlowNet runs of scripts/arithmetic_runs.py --curve (one table, one figure panel each)")
    parser.add_argument("--figure", type=Path, help="with --arithmetic-curve: also draw the curves into this PNG")
    parser.add_argument("--subjectivity-log-odds", nargs="+", type=Path, metavar="RUN",
                        help="subjectivity runs or evaluations holding predictions.jsonl")
    parser.add_argument("--readme", type=Path)
    parser.add_argument("--section", default="random-number")
    args = parser.parse_args()
    if args.arithmetic:
        content = arithmetic_table(args.arithmetic)
    elif args.arithmetic_curve:
        curves = {run.name: arithmetic_curve(run) for run in args.arithmetic_curve}
        content = arithmetic_curve_table(curves)
        if args.figure:
            from gfnlm.plots import accuracy_curves

            print(f"figure: {accuracy_curves(curves, args.figure)}")
    elif args.subjectivity:
        content = subjectivity_table(args.subjectivity, args.metric)
    elif args.subjectivity_log_odds:
        content = subjectivity_log_odds_table(args.subjectivity_log_odds)
    elif args.bench:
        content = bench_table(args.bench)
    else:
        content = table(args.runs)
    print(content)
    if args.readme:
        replace_section(args.readme, args.section, content)


if __name__ == "__main__":
    main()

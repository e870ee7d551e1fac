"""The infilling task's report: its row of the README's results table, Table 2 and Table C.7's samples."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from gfnlm.reports.base import TaskReport
from gfnlm.reports.tables import Headline, Pick, ResultsTable, markdown_table, mean_std, read_eval, training_budget
from gfnlm.tasks.infilling import InfillingTask

EXAMPLE_STORIES = (0, 1, 2)
"""Validation stories of the Table C.7-like list."""


class InfillingReport(TaskReport):
    task = InfillingTask.name

    headline = Headline(
        experiment="Story infilling (§4.2)", page="infilling.md", metric="BERTScore / BLEU-4 / GLEU-4",
        columns=("BERTScore", "BLEU-4", "GLEU-4"),
        gfn=Pick("infilling", {"method": "GFlowNet fine-tuning"}),
        baseline=Pick("infilling", {"method": "GRPO (TRL)"}), baseline_name="GRPO (TRL)",
        paper="0.184 / 2.1 / 4.2; SFT 0.094 / 1.6 / 3.7 (GPT-2 Large; BERTScore with DeBERTa, ours with MPNet)",
        setting="SmolLM2-135M, 2 CPU cores", budget="{training}, {n seeds} seeds")

    @classmethod
    def results_tables(cls) -> dict[str, ResultsTable]:
        return {
            "": ResultsTable(metrics_table, "Table 2: one row per method (its seeds' runs averaged)"),
            "samples": ResultsTable(samples_table, "Table C.7: three validation stories, each evaluation's infills"),
        }


def metrics_table(runs: list[Path]) -> str:
    """Table 2: one row per method (evaluations with one label: a trained method's seeds, or a baseline). Each
    cell is "mean ± std": over the seeds' means where a method has several runs, else over the run's draws."""
    header = ["method", "BERTScore", "BLEU-4", "GLEU-4", "sacreBLEU", "log p(Y | X Z)", "distinct of K", "words",
              "stories", "n seeds", "training"]
    by_label: dict[str, dict[Path, dict]] = {}  # label -> {run: its eval.json}
    for run in runs:
        result = read_eval(run)
        by_label.setdefault(result["label"], {})[run] = result
    return markdown_table(header, [method_row(members) for members in by_label.values()])


def method_row(evaluated: dict[Path, dict]) -> list[str]:
    """One method's row of Table 2 from its runs and their results (see ``metrics_table``), which must share
    their evaluation."""
    runs, results = list(evaluated), list(evaluated.values())
    first = results[0]
    if any((r["n_stories"], r["eval_samples"]) != (first["n_stories"], first["eval_samples"]) for r in results):
        raise SystemExit(f"{', '.join(map(str, runs))}: one label ({first['label']}), different evaluations "
                         "(stories or infills per story): not seeds of one method")

    def cell(key: str, digits: int) -> str:
        values = [r[key] for r in results]
        if len(values) > 1:
            return mean_std(values, scale=1, digits=digits)
        return f"{values[0]:.{digits}f} ± {first[key + '_std']:.{digits}f}"

    budgets = "; ".join(dict.fromkeys(training_budget(run) for run in runs))  # one entry per distinct budget
    return [first["label"], cell("bertscore", 3), cell("bleu4", 2), cell("gleu4", 2), cell("sacrebleu", 2),
            cell("log_p_ending", 2), f"{statistics.mean(r['distinct'] for r in results):.1f} / {first['eval_samples']}",
            f"{statistics.mean(r['mean_words'] for r in results):.1f}", str(first["n_stories"]), str(len(runs)), budgets]


def samples_table(runs: list[Path]) -> str:
    """Paper Table C.7: for three validation stories, the reference and three infills of each evaluation."""
    rows = []
    for index in EXAMPLE_STORIES:
        entries = [(run, entry) for run in runs if (entry := story_samples(run, index)) is not None]
        if entries:
            story = entries[0][1]
            rows.append([f"{story['beginning']} [...] {story['ending']}", "reference", story["reference"]])
            rows += [["", read_eval(run)["label"], " / ".join(entry["infills"][:3])] for run, entry in entries]
    return markdown_table(["story (beginning [...] end)", "method", "fourth sentence"], rows)


def story_samples(run: Path, index: int) -> dict | None:
    """The infills of validation story ``index`` in a run's samples.jsonl; None if it evaluated fewer stories."""
    lines = (run / "samples.jsonl").read_text().splitlines()
    return json.loads(lines[index]) if index < len(lines) else None

"""Results tables in Markdown, built from run outputs and written into the docs' generated blocks.

A page holds each generated table between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``;
``scripts/results_table.py`` fills the block from run folders, so no figure in a table is typed by
hand. A task's report (``gfnlm.reports``) declares the task's tables (``TaskReport.results_tables``) and
its row of the README's results table (``TaskReport.headline``), built with the helpers here.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from gfnlm.runlog import logged_training_minutes, read_logged_metrics


@dataclass(frozen=True)
class ResultsTable:
    """One of a task's results tables: ``build(paths)`` makes it in Markdown from run folders (or files);
    ``draw(paths, png)``, if given, its figure."""

    build: Callable[[list[Path]], str]
    help: str
    draw: Callable[[list[Path], Path], Path] | None = None


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table; a "|" inside a cell is escaped, so that it stays one cell."""
    line = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


def mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``values`` (e.g. accuracies in [0, 1]) as "mean ± sample std" in ``scale`` units; the mean alone for one."""
    mean = statistics.mean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def format_number(value) -> str:
    """A metric as a table cell: 4 significant digits, '-' when absent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def read_eval(run: Path) -> dict:
    """A run's (or an evaluation's) eval.json."""
    path = Path(run) / "eval.json"
    if not path.is_file():
        raise SystemExit(f"{run} has no eval.json")
    return json.loads(path.read_text())


def runs_table(runs: list[Path], keys: Sequence[str]) -> str:
    """One row per run: its label, the metrics ``keys`` of its eval.json, its steps and training minutes."""
    rows = []
    for run in runs:
        result, logged = read_eval(run), read_logged_metrics(run)
        budget = [str(logged[-1]["step"]), f"{logged_training_minutes(logged):.1f}"] if logged else ["-", "-"]
        rows.append([str(result.get("label", run.name)), *(format_number(result.get(k)) for k in keys), *budget])
    return markdown_table(["model", *keys, "steps", "train min"], rows)


def training_budget(run: Path) -> str:
    """A run's training as "steps x samples / minutes", from its metrics.jsonl ("-" for an evaluation)."""
    logged = read_logged_metrics(run)
    if not logged:
        return "-"
    samples = round(statistics.median(r["samples_per_s"] * r["step_time_s"] for r in logged))
    return f"{logged[-1]['step']} x {samples} / {logged_training_minutes(logged):.0f} min"


def one_folder(paths: list[Path], made_by: str) -> Path:
    """The one output folder a table reads (of the script ``made_by``)."""
    if len(paths) != 1:
        raise SystemExit(f"this table reads one output folder of {made_by}, got {len(paths)} paths")
    return paths[0]


def _block(section: str) -> re.Pattern:
    start, end = f"<!-- results:{section} -->", f"<!-- /results:{section} -->"
    return re.compile(re.escape(start) + r"\n(.*?)\n?" + re.escape(end), re.S)


def replace_section(page: Path, section: str, content: str) -> None:
    """Put ``content`` between the page's markers of ``section`` (which must exist)."""
    text = page.read_text()
    pattern = _block(section)
    if not pattern.search(text):
        raise SystemExit(f"{page} has no <!-- results:{section} --> ... <!-- /results:{section} --> block")
    start, end = f"<!-- results:{section} -->", f"<!-- /results:{section} -->"
    page.write_text(pattern.sub(lambda _: f"{start}\n{content}\n{end}", text))


def read_section_table(page: Path, section: str) -> list[dict[str, str]]:
    """The rows of the Markdown table in a page's generated block, as {column: cell}."""
    found = _block(section).search(page.read_text())
    if not found:
        raise SystemExit(f"{page} has no <!-- results:{section} --> block")
    lines = [line for line in found.group(1).splitlines() if line.startswith("|")]
    split = lambda line: [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\) \| ", line.strip()[1:-1])]  # noqa: E731
    header = split(lines[0])
    return [dict(zip(header, split(line))) for line in lines[2:]]


@dataclass(frozen=True)
class Pick:
    """One row of a generated table: the page's ``section`` block, the row whose cells match ``row``."""

    section: str
    row: dict[str, str]


@dataclass(frozen=True)
class Headline:
    """A task's row in the README's results table, read from generated tables in its docs page.

    The figures are the cells of ``columns`` in the GFlowNet's row and in the strongest baseline's
    row, joined with " / "; ``budget`` is a format string over the GFlowNet row's cells (a cell that
    lists several runs, "a; b; c", gives its first). ``paper`` is the paper's own figure, quoted.
    """

    experiment: str
    page: str  # under docs/experiments/
    metric: str
    columns: tuple[str, ...]
    gfn: Pick
    baseline: Pick
    baseline_name: str
    paper: str
    setting: str  # model and machine of our figures
    budget: str = ""
    baseline_columns: tuple[str, ...] | None = None  # where the baseline's table names them otherwise


def _pick(page: Path, pick: Pick) -> dict[str, str]:
    rows = [r for r in read_section_table(page, pick.section) if all(r.get(k) == v for k, v in pick.row.items())]
    if len(rows) != 1:
        raise SystemExit(f"{page}, block {pick.section}: {len(rows)} rows match {pick.row}, expected 1")
    return rows[0]


def summary_table(headlines: Sequence[Headline], docs: Path) -> str:
    """The README's results table: one row per paper experiment, ours beside the paper's."""
    rows = []
    for h in headlines:
        page = docs / "experiments" / h.page
        gfn, base = _pick(page, h.gfn), _pick(page, h.baseline)
        ours = " / ".join(gfn[c] for c in h.columns)
        baseline = " / ".join(base[c] for c in (h.baseline_columns or h.columns))
        budget = h.budget.format(**{k: v.split(";")[0].strip() for k, v in gfn.items()})
        link = f"[{h.experiment}](docs/experiments/{h.page})"
        rows.append([link, h.metric, ours, f"{h.baseline_name}: {baseline}", h.paper, f"{h.setting}; {budget}" if budget else h.setting])
    header = ["experiment", "metric", "GFlowNet (ours)", "strongest baseline (ours)", "paper (GFlowNet; baseline)",
              "our model, budget"]
    return markdown_table(header, rows)

#!/usr/bin/env python3
"""Build a README results table from runs' eval.json files (never typed by hand).

    python scripts/results_table.py runs/rn/base runs/rn/gfn runs/rn/ppo runs/rn/sft \
        --readme README.md --section random-number

prints a Markdown table (one row per run: its label, the task's metrics, training steps and
wall time from metrics.jsonl) and, with --readme, replaces the lines between
``<!-- results:SECTION -->`` and ``<!-- /results:SECTION -->`` in that file.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

METRICS = ("valid_mass", "kl", "tv", "js")


def run_row(run: Path) -> list[str]:
    result = json.loads((run / "eval.json").read_text())
    steps, seconds = "-", "-"
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if rows:
            steps = str(rows[-1]["step"])
            seconds = f"{sum(r.get('step_time_s', 0.0) for r in rows) / 60:.1f}"
    cells = [f"{result[k]:.4g}" if isinstance(result.get(k), float) else "-" for k in METRICS]
    return [result.get("label", run.name), *cells, steps, seconds]


def table(runs: list[Path]) -> str:
    header = ["model", *METRICS, "steps", "train min"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(run_row(run)) + " |" for run in runs]
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
    parser.add_argument("runs", nargs="+", type=Path, help="run directories holding eval.json")
    parser.add_argument("--readme", type=Path)
    parser.add_argument("--section", default="random-number")
    args = parser.parse_args()
    content = table(args.runs)
    print(content)
    if args.readme:
        replace_section(args.readme, args.section, content)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Build a results table from run outputs (never typed by hand) and write it into a docs page.

    python scripts/results_table.py TABLE PATH... [--doc PAGE --section NAME] [--figure PNG]

prints a Markdown table and, with --doc, replaces the lines between ``<!-- results:NAME -->`` and
``<!-- /results:NAME -->`` in PAGE. TABLE is one of

    TASK          a task's default table (e.g. ``random-number RUN...``: one row per run folder;
                  ``arithmetic OUT``, ``subjectivity OUT``: the paper's tables from the experiment scripts' output)
    TASK:NAME     another of the task's tables (``--list`` shows them all, with what they read)
    bench FILE... ``gfnlm bench --output`` files, one row each
    bench:processes FILE...  ``gfnlm bench --processes N --output`` files: data-parallel scaling
    bench:engine FILE...     ``gfnlm bench --reference_repeats 0 --output`` files: our step by precision and decoding
    bench:peer FILE...       ``gfnlm bench --peer trl-grpo --output`` files: ours against TRL's GRPO step
    summary       the README's results table: each task's headline row, read from the generated tables
                  of docs/experiments/ (``summary --doc README.md --section summary``; no PATH)

A task's report declares its tables in ``TaskReport.results_tables`` and its headline in
``TaskReport.headline`` (``gfnlm/reports/NAME.py``, registered in ``gfnlm.reports.REPORTS``), so a new
task needs no change here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gfnlm.bench import engine_table, peer_table, scaling_table
from gfnlm.bench import results_table as bench_table
from gfnlm.reports import REPORTS, get_report
from gfnlm.reports.tables import ResultsTable, replace_section, summary_table

DOCS = Path(__file__).resolve().parents[1] / "docs"


def task_table(name: str) -> ResultsTable:
    task, _, kind = name.partition(":")
    tables = get_report(task).results_tables()
    if kind not in tables:
        known = ", ".join(f"{task}:{k}" if k else task for k in tables)
        raise SystemExit(f"task {task!r} has no table {kind!r}; its tables: {known}")
    return tables[kind]


def list_tables() -> str:
    lines = ["bench: gfnlm bench --output files, one row each", "bench:processes: gfnlm bench --processes N files",
             "bench:engine: gfnlm bench --reference_repeats 0 files: our step by precision and decoding",
             "bench:peer: gfnlm bench --peer trl-grpo files: ours against TRL's GRPO step",
             "summary: the README's results table"]
    for task_name, report in REPORTS.items():
        lines += [f"{task_name}{':' + k if k else ''}: {t.help}" for k, t in report.results_tables().items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", nargs="?", help="TASK, TASK:NAME, bench or summary")
    parser.add_argument("paths", nargs="*", type=Path, help="run folders, output folders or files the table reads")
    parser.add_argument("--doc", type=Path, help="page whose generated block --section receives the table")
    parser.add_argument("--section", help="name of the generated block (default: the table's name)")
    parser.add_argument("--figure", type=Path, help="also draw the table's figure into this PNG (tables that have one)")
    parser.add_argument("--list", action="store_true", help="list every table")
    args = parser.parse_args()
    if args.list or not args.table:
        print(list_tables())
        return
    figure = None
    if args.table == "summary":
        content = summary_table([r.headline for r in REPORTS.values() if r.headline is not None], DOCS)
    elif args.table == "bench":
        content = bench_table(args.paths)
    elif args.table == "bench:processes":
        content = scaling_table(args.paths)
    elif args.table == "bench:engine":
        content = engine_table(args.paths)
    elif args.table == "bench:peer":
        content = peer_table(args.paths)
    else:
        table = task_table(args.table)
        content = table.build(args.paths)
        if args.figure:
            if table.draw is None:
                raise SystemExit(f"table {args.table!r} has no figure")
            figure = table.draw(args.paths, args.figure)
    print(content)
    if figure is not None:
        print(f"figure: {figure}")
    if args.doc:
        replace_section(args.doc, args.section or args.table.replace(":", "-"), content)


if __name__ == "__main__":
    main()

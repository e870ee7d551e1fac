"""What a task's report declares: its figures, its results tables and its row of the README's results table.

Reporting lives apart from the task (``gfnlm.tasks``), so that the engine and the task contract import
no tables or plotting code: a report may import its task, a task never imports its report. A task
with a report of its own has a ``TaskReport`` subclass in ``reports/NAME.py``, registered in
``reports/__init__.py``; every other task gets the defaults here.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from gfnlm.reports.tables import Headline, ResultsTable, runs_table
from gfnlm.tasks import get_task


class TaskReport:
    task: ClassVar[str]
    """The name of the task reported (a key of ``gfnlm.tasks.TASKS``)."""
    headline: ClassVar[Headline | None] = None
    """The task's row in the README's results table (``scripts/results_table.py summary``)."""

    @classmethod
    def summary_keys(cls) -> tuple[str, ...]:
        """The task's ``summary_keys``: the metrics of its ``evaluate`` that the command line's tables show."""
        return get_task(cls.task).summary_keys

    @classmethod
    def figures(cls, results: list[dict], output_dir: Path) -> list[Path]:
        """Write the task's figures for one or more evaluated models (from their eval.json); returns paths."""
        return []

    @classmethod
    def results_tables(cls) -> dict[str, ResultsTable]:
        """The task's results tables by name, for ``scripts/results_table.py TASK[:NAME]``; "" is the default:
        one row per run folder with the task's ``summary_keys``."""
        return {"": ResultsTable(lambda runs: runs_table(runs, cls.summary_keys()),
                                 "one row per run folder: its label, the task's metrics, steps and training minutes")}

"""Reports by task name: each task's figures, results tables and row of the README's results table.

A report may import its task (``gfnlm.tasks``); no task, nor the engine, imports a report. Every
registered task has one: a task without a report of its own gets ``TaskReport``'s defaults (no
figure, one table of its ``summary_keys``).
"""

from __future__ import annotations

from gfnlm.reports.arithmetic import ArithmeticReport
from gfnlm.reports.base import TaskReport
from gfnlm.reports.continuation import ContinuationReport
from gfnlm.reports.infilling import InfillingReport
from gfnlm.reports.random_number import RandomNumberReport
from gfnlm.reports.subjectivity import SubjectivityReport
from gfnlm.tasks import TASKS

_OWN: dict[str, type[TaskReport]] = {report.task: report for report in (
    RandomNumberReport, ContinuationReport, InfillingReport, SubjectivityReport, ArithmeticReport)}


def _default_report(name: str) -> type[TaskReport]:
    """A plain ``TaskReport`` for the task ``name`` (e.g. ``PromptsReport`` for ``PromptsTask``)."""
    class_name = TASKS[name].__name__.removesuffix("Task") + "Report"
    return type(class_name, (TaskReport,), {"task": name, "__module__": __name__})


REPORTS: dict[str, type[TaskReport]] = {name: _OWN.get(name) or _default_report(name) for name in TASKS}
"""Every task's report, keyed and ordered like ``gfnlm.tasks.TASKS`` (the README's rows follow this order)."""


def get_report(name: str) -> type[TaskReport]:
    if name not in REPORTS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(sorted(REPORTS))}")
    return REPORTS[name]


__all__ = ["REPORTS", "TaskReport", "get_report"]

"""The layout of the package: the engine and the task contract import no reporting code, and every task has a report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gfnlm.reports import REPORTS, TaskReport, get_report
from gfnlm.reports.tables import ResultsTable
from gfnlm.tasks import TASKS

ENGINE = ("gfnlm.tasks", "gfnlm.gflownet", "gfnlm.trainer", "gfnlm.policy", "gfnlm.rewards")
REPORTING = ("gfnlm.reports", "gfnlm.cli", "gfnlm.bench")


def test_the_engine_and_the_tasks_import_no_reporting_code():
    code = (f"import json, sys\nimport {', '.join(ENGINE)}\n"
            "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout.splitlines()[-1])
    assert [m for m in loaded if m.startswith(REPORTING)] == []
    assert [m for m in loaded if m == "matplotlib" or m.startswith("matplotlib.")] == []


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_has_a_report_with_results_tables(name):
    report = REPORTS[name]
    assert issubclass(report, TaskReport) and report.task == name and get_report(name) is report
    tables = report.results_tables()
    assert isinstance(tables, dict) and tables
    assert all(isinstance(table, ResultsTable) for table in tables.values())


def test_reports_follow_the_tasks_and_refuse_an_unknown_name():
    assert list(REPORTS) == list(TASKS)
    with pytest.raises(ValueError, match="unknown task"):
        get_report("no-such-task")

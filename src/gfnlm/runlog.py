"""A run's metrics log (``metrics.jsonl`` in its output folder): what the trainers write and the reports read.

One JSON line per logged step, appended across resumes; a resumed run first drops the lines past its
checkpoint, so the log never holds a step twice.
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
"""A run's log in its output folder: one JSON line per logged step, appended across resumes."""

TIMING_KEYS = ("samples_per_s", "step_time_s", "peak_memory_mb")
"""Metrics that measure the machine rather than the run; they differ between identical runs."""



def append_logged_metrics(output_dir: Path, row: dict) -> None:
    """Add one step's row to the run's log."""
    with open(Path(output_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")


def scalars(values: dict) -> dict:
    """The numbers (and flags, as 0 / 1) of a metrics row or a config, what trackers accept."""
    return {k: int(v) if isinstance(v, bool) else v for k, v in values.items() if isinstance(v, (int, float, str))}


def truncate_logged_metrics(output_dir: Path, step: int) -> None:
    """Drop the metrics a run logged after ``step``, where it (re)starts, so that a resumed log has no duplicates."""
    if not (output_dir / METRICS_FILE).exists():
        return
    kept = [row for row in read_logged_metrics(output_dir) if row["step"] <= step]
    (output_dir / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in kept))


def read_logged_metrics(output_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, one per logged step (none without a log)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def logged_training_minutes(rows: list[dict]) -> float:
    """A run's training time across all its resumes, from ``read_logged_metrics``: the sum of the
    step times (exact with ``log_every=1``; setup, checkpoints and evaluation excluded)."""
    return sum(r.get("step_time_s", 0.0) for r in rows) / 60

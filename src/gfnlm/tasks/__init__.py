"""Tasks by name. Each supplies data, prompt format, reward and metrics to the one engine."""

from gfnlm.tasks.base import Task, TaskOptions
from gfnlm.tasks.arithmetic import ArithmeticTask
from gfnlm.tasks.continuation import ContinuationTask
from gfnlm.tasks.infilling import InfillingTask
from gfnlm.tasks.prompts import PromptsTask
from gfnlm.tasks.random_number import RandomNumberTask
from gfnlm.tasks.subjectivity import SubjectivityTask

TASKS: dict[str, type[Task]] = {task.name: task for task in (RandomNumberTask, ContinuationTask, InfillingTask,
                                                            SubjectivityTask, ArithmeticTask, PromptsTask)}


def get_task(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


__all__ = ["TASKS", "Task", "TaskOptions", "get_task"]

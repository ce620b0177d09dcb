"""Tasks: one module (or package) each (prompt template, loader, answer extraction, metric).

Each module registers its task classes in :data:`tunelab.registry.TASKS` next to their definition;
importing this package imports them all, by name.
"""

from __future__ import annotations

from tunelab.registry import TASKS
from tunelab.tasks.base import Example, Scored, Task

from tunelab.tasks import gsm8k, jsonl, sft, summarization  # noqa: E402,F401  (registers them)

get_task = TASKS.get
known_tasks = TASKS.known

__all__ = ["TASKS", "Example", "Scored", "Task", "get_task", "known_tasks"]

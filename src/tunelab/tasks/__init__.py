"""Tasks: one file each (prompt template, loader, answer extraction, metric)."""

from __future__ import annotations

import difflib
import importlib

from tunelab.config import register_task_config
from tunelab.tasks.base import Example, Scored, Task

_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    _TASKS[cls.name] = cls
    register_task_config(cls.name, cls.config_cls)
    return cls


def known_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> type[Task]:
    if name not in _TASKS:
        close = difflib.get_close_matches(name, list(_TASKS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"unknown task '{name}'{hint} (known: {', '.join(known_tasks())})")
    return _TASKS[name]


for _module in ("gsm8k", "jsonl", "summarization"):
    try:
        _mod = importlib.import_module(f"tunelab.tasks.{_module}")
    except ModuleNotFoundError as exc:  # a task that has not landed yet
        if exc.name != f"tunelab.tasks.{_module}":
            raise
        continue
    for _cls in getattr(_mod, "TASKS", [getattr(_mod, "TASK", None)]):
        if _cls is not None:
            register_task(_cls)

__all__ = ["Example", "Scored", "Task", "get_task", "known_tasks", "register_task"]

"""The one registry type, and the two registries of tunelab: methods and tasks.

A leaf module (it imports nothing of tunelab), so config, the trainer and the CLI can all look a
name up without import cycles. Each method or task class registers itself next to its definition::

    @METHODS.register
    class LoraMethod(Method):
        name = "lora"
        config_cls = LoraConfig

The first lookup imports the package that holds the built-in entries (``tunelab.methods`` or
``tunelab.tasks``), whose ``__init__`` imports each module by name: a broken module is an error,
never a silently missing entry. ``import tunelab.config`` therefore loads no method or task; building
a config does, when it resolves ``method=`` and ``task=``.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Generic, Iterator, TypeVar

T = TypeVar("T", bound=type)


class UnknownName(KeyError):
    """A name that is not registered; the message lists the known names and the closest one."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Classes by their ``name`` attribute, filled by :meth:`register` as their modules import."""

    def __init__(self, kind: str, package: str):
        self.kind = kind  # "method" or "task": used in messages
        self.package = package  # imported on first lookup: its modules register the built-ins
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, cls: T) -> T:
        """Class decorator: add ``cls`` under ``cls.name`` (a second class under one name is a bug)."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__qualname__} needs a class attribute 'name' to be a registered {self.kind}")
        existing = self._entries.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"{self.kind} '{name}' is registered twice: {existing.__qualname__} and {cls.__qualname__}")
        self._entries[name] = cls
        return cls

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self.package)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), list(self._entries), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UnknownName(f"unknown {self.kind} '{name}'{hint} (known: {', '.join(self.known())})")
        return self._entries[name]

    def known(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.known())


#: fine-tuning methods (``method=NAME``): subclasses of :class:`tunelab.methods.base.Method`
METHODS: Registry = Registry("method", "tunelab.methods")
#: tasks (``task=NAME``): subclasses of :class:`tunelab.tasks.base.Task`
TASKS: Registry = Registry("task", "tunelab.tasks")

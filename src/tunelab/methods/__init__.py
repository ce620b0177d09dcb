"""Fine-tuning methods behind one contract (see :mod:`tunelab.methods.base`)."""

from __future__ import annotations

import difflib

from tunelab.config import register_method_config
from tunelab.methods.base import Callback, Method, TrainState

_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    _METHODS[cls.name] = cls
    register_method_config(cls.name, cls.config_cls)
    return cls


def known_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> type[Method]:
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"unknown method '{name}'{hint} (known: {', '.join(known_methods())})")
    return _METHODS[name]


def _register_builtin() -> None:
    from tunelab.methods import full, lora

    for module in (lora, full):
        register_method(module.METHOD)
    # Methods that land later register here too (each is one module with METHOD = its class).
    import importlib

    for optional in ("rosa", "galore"):
        try:
            module = importlib.import_module(f"tunelab.methods.{optional}")
        except ModuleNotFoundError as exc:
            if exc.name != f"tunelab.methods.{optional}":
                raise
            continue
        register_method(module.METHOD)


_register_builtin()

__all__ = ["Callback", "Method", "TrainState", "get_method", "known_methods", "register_method"]

"""Building a :class:`RunConfig`: dotted overrides, YAML files, type coercion, every problem at once.

Priority, lowest to highest: the dataclass defaults, a ``base`` mapping, a YAML file (``--config``)
and ``key=value`` overrides. ``method`` and ``task`` are polymorphic: their ``name`` selects the
registered dataclass (:mod:`tunelab.registry`) that holds the rest of their keys. Problems are
collected, never raised one by one, so the user fixes them all in one go.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from tunelab.config.schema import ConfigError, RunConfig
from tunelab.config.validate import validate


# --------------------------------------------------------------------------------------------
# The polymorphic sections: their classes come from the registries (a leaf module)
# --------------------------------------------------------------------------------------------


def method_config_classes() -> dict[str, type]:
    """``method=NAME`` -> its config dataclass, for every registered method."""
    from tunelab.registry import METHODS

    return {name: cls.config_cls for name, cls in METHODS.items()}


def task_config_classes() -> dict[str, type]:
    """``task=NAME`` -> its config dataclass, for every registered task."""
    from tunelab.registry import TASKS

    return {name: cls.config_cls for name, cls in TASKS.items()}


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

SHORTHANDS = {"method": "method.name", "task": "task.name", "model": "model.name", "harness": "harness.tasks"}


def parse_value(text: str) -> Any:
    """Parse a command-line value the way YAML would (8 -> int, true -> bool, [a,b] -> list)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def parse_overrides(items: list[str]) -> tuple[dict, list[str]]:
    """Turn ``["a.b=1", "method=lora"]`` into a nested dict; returns (dict, problems)."""
    nested: dict = {}
    problems: list[str] = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            problems.append(f"override '{item}' is not of the form key=value (e.g. train.max_steps=10)")
            continue
        key = SHORTHANDS.get(key, key)
        _set_dotted(nested, key, parse_value(value))
    return nested, problems


def _set_dotted(nested: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = nested
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _closest(name: str, choices: list[str]) -> str:
    short = {c.rsplit(".", 1)[-1]: c for c in choices}
    match = difflib.get_close_matches(name, list(short), n=1, cutoff=0.5)
    if match:
        return f"; did you mean '{short[match[0]]}'?"
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_NO = object()


def _coerce(value: Any, tp: Any) -> Any:
    """Return value converted to tp, or _NO when it does not fit."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        return value if value in typing.get_args(tp) else _NO
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            out = _coerce(value, arg)
            if out is not _NO:
                return out
        return _NO
    if tp is type(None):
        return None if value is None else _NO
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        if isinstance(value, bool):
            return _NO
        try:  # YAML reads "7e-4" as a string
            number = float(value) if isinstance(value, (int, float, str)) else None
        except ValueError:
            return _NO
        # nan and inf are never a setting: lr=inf or epochs=inf would only fail later, deep in training
        return number if number is not None and math.isfinite(number) else _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected
        if not isinstance(value, (list, tuple)):
            return _NO
        items = [_coerce(v, item_tp) for v in value]
        return _NO if any(i is _NO for i in items) else items
    if origin is dict:
        return dict(value) if isinstance(value, dict) else _NO
    return value


def _is_non_finite(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def build_dataclass(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from ``raw`` (a dict), appending every problem found."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"'{path}' must be a mapping of keys, got {raw!r}")
        raw = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            problems.append(
                f"unknown key '{full}'{_closest(str(key), [f'{path}.{f}' if path else f for f in fields])} "
                f"(known keys of '{path or 'the run'}': {', '.join(fields)})"
            )
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value, full, problems)
            continue
        coerced = _coerce(value, tp)
        if coerced is _NO:
            finite = " (a finite number: nan and inf are not settings)" if _is_non_finite(value) else ""
            problems.append(f"'{full}' must be {_type_name(tp)}{finite}, got {value!r}")
            continue
        kwargs[key] = coerced
    return cls(**kwargs)


def _build_polymorphic(
    raw: Any, path: str, registry: dict[str, type], default_name: str, problems: list[str]
) -> Any:
    if raw is None:
        raw = {}
    raw = dict(raw) if isinstance(raw, dict) else {"name": raw}
    name = raw.get("name", default_name)
    if name not in registry:
        problems.append(
            f"unknown {path} '{name}'{_closest(str(name), list(registry))} "
            f"(known: {', '.join(sorted(registry))})"
        )
        return None
    return build_dataclass(registry[name], raw, path, problems)


def build_config(raw: dict, check_env: bool = True) -> RunConfig:
    """Build and validate a RunConfig from a nested dict; raises ConfigError with every problem."""
    methods, tasks = method_config_classes(), task_config_classes()
    problems: list[str] = []
    raw = dict(raw or {})
    method_raw, task_raw = raw.pop("method", None), raw.pop("task", None)
    cfg = build_dataclass(RunConfig, raw, "", problems)
    method = _build_polymorphic(method_raw, "method", methods, "lora", problems)
    task = _build_polymorphic(task_raw, "task", tasks, "gsm8k", problems)
    if method is not None:
        cfg.method = method
    if task is not None:
        cfg.task = task
    if not problems:
        problems.extend(validate(cfg, check_env))
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None,
    check_env: bool = True,
) -> RunConfig:
    """Defaults ← ``base`` dict ← YAML file ← overrides; raises ConfigError listing every problem."""
    problems: list[str] = []
    raw: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file '{path}' does not exist (pass an existing YAML with --config)"])
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"config file '{path}' is not valid YAML: {exc}"]) from exc
        if not isinstance(loaded, dict):
            raise ConfigError([f"config file '{path}' must hold a mapping at top level"])
        raw = deep_merge(raw, _normalise_shorthands(loaded))
    over, over_problems = parse_overrides(overrides or [])
    problems.extend(over_problems)
    # A new method/task name on the command line starts that section afresh: keys of the
    # previous method (e.g. lora's rank when switching to full) would otherwise be reported.
    for section in ("method", "task"):
        new_name = over.get(section, {}).get("name") if isinstance(over.get(section), dict) else None
        old = raw.get(section)
        if new_name is not None and isinstance(old, dict) and old.get("name", new_name) != new_name:
            raw[section] = {}
    raw = deep_merge(raw, over)
    try:
        cfg = build_config(raw, check_env)
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems) from None
    if problems:
        raise ConfigError(problems)
    return cfg


def _normalise_shorthands(raw: dict) -> dict:
    out = dict(raw)
    for key in ("method", "task", "model"):
        if isinstance(out.get(key), str):
            out[key] = {"name": out[key]}
    if isinstance(out.get("harness"), (str, list)):  # harness: gsm8k / harness: [gsm8k, arc_easy]
        out["harness"] = {"tasks": out["harness"]}
    return out


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from tunelab.utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_from_dict(raw: dict) -> RunConfig:
    return build_config(raw)


def field_help(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type/default, help) rows for documentation and ``--help``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        rows.append((key, f"{_type_name(tp)} = {default!r}", f.metadata.get("help", "")))
    return rows

"""From a sweep file's overrides to the resolved config of every point.

Overrides are ``{dotted key: value}`` mappings (``method.rank: 8``), as on the command line. The
grid's axes are multiplied out (first axis outermost), the explicit points added, every point runs
once per seed (innermost), and each point's config is built and validated with
:func:`tunelab.config.load_config`; problems are returned with where they come from (grid key,
base, eval) and which points they concern, so the caller reports them all at once.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from tunelab.config import ConfigError, RunConfig, config_to_dict, load_config
from tunelab.config.build import SHORTHANDS
from tunelab.experiments.state import SECTIONS

# --------------------------------------------------------------------------------------------
# Overrides as dotted keys
# --------------------------------------------------------------------------------------------


def flatten(mapping: Any, where: str, problems: list[str]) -> dict[str, Any]:
    """Overrides as {dotted key: value} with at most one dot (section.field).

    Accepts nested sections (``method: {name: lora, rank: 8}``), dotted keys (``method.rank: 8``)
    and the shorthands ``method: lora`` / ``task: gsm8k`` / ``model: NAME``. Values of dict-typed
    fields (e.g. ``method.rank_pattern``) stay whole.
    """
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        problems.append(f"{where} must be a mapping of config keys, got {mapping!r}")
        return {}
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        key = str(key)
        if "." not in key and key in SECTIONS and isinstance(value, dict):
            for sub, sub_value in value.items():
                out[f"{key}.{sub}"] = sub_value
        elif "." not in key and key in SHORTHANDS:
            out[SHORTHANDS[key]] = value
        else:
            out[key] = value
    return out


def _nest(flat: dict[str, Any]) -> dict:
    nested: dict = {}
    for key, value in flat.items():
        section, dot, sub = key.partition(".")
        if dot:
            nested.setdefault(section, {})
            if not isinstance(nested[section], dict):
                nested[section] = {}
            nested[section][sub] = value
        else:
            nested[key] = value
    return nested


def _apply(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """base ← over, where a different method/task name starts that section afresh (as on the CLI)."""
    merged = dict(base)
    defaults = RunConfig()
    for section, default in (("method", defaults.method.name), ("task", defaults.task.name)):
        new = over.get(f"{section}.name")
        if new is not None and merged.get(f"{section}.name", default) != new:
            merged = {k: v for k, v in merged.items() if not k.startswith(f"{section}.")}
    merged.update(over)
    return merged


def describe_overrides(over: dict) -> str:
    return "{" + ", ".join(f"{k}: {v!r}" for k, v in over.items()) + "}"

# --------------------------------------------------------------------------------------------
# Expansion: grid (first axis outermost) ∪ explicit points, × seeds (innermost)
# --------------------------------------------------------------------------------------------


def combinations(axes, explicit: list[dict[str, Any]], problems: list[str]) -> list[dict[str, Any]]:
    """The grid's cartesian product, then the explicit points; the base config alone when both are empty."""
    combos: list[dict[str, Any]] = []
    for choice in itertools.product(*[opts for _, opts in axes]) if axes else []:
        over: dict[str, Any] = {}
        for (key, _), part in zip(axes, choice):
            for k, v in part.items():
                if k in over and over[k] != v:
                    problems.append(f"grid key '{key}' sets '{k}', which another grid key also sets: keep each key in one axis")
                over[k] = v
        combos.append(over)
    combos.extend(explicit)
    return combos or [{}]


def resolve_points(combos: list[dict[str, Any]], seeds: list[int], base: dict[str, Any], eval_over: dict[str, Any],
                   axes) -> tuple[list[tuple[dict, dict]], list[str]]:
    """((overrides with seed, resolved config) per point, problems): every config problem of every point."""
    specs: list[tuple[dict[str, Any], dict]] = []
    errors: dict[str, list[str]] = {}
    for over in combos:
        for seed in seeds:
            point_over = {**over, "seed": seed}
            # base <- the sweep's eval settings <- the point's own keys (a bundle may set eval.preset)
            raw = _nest({**_apply({**base, **eval_over}, over), "seed": seed})
            try:
                # no environment checks: a GPU sweep can be listed on a login node
                cfg = load_config(base=raw, check_env=False)
            except ConfigError as exc:
                for problem in exc.problems:
                    errors.setdefault(problem, []).append(describe_overrides(point_over))
                continue
            resolved = config_to_dict(cfg)
            resolved.pop("out", None)
            specs.append((point_over, resolved))
    total = len(combos) * len(seeds)
    return specs, [_locate(p, where, total, axes, base, eval_over) for p, where in errors.items()]


def _locate(problem: str, where: list[str], total: int, axes, base: dict, eval_over: dict) -> str:
    """A config problem with where it comes from (grid key, base, eval, which points)."""
    quoted = re.search(r"'([^']+)'", problem)
    token = quoted.group(1) if quoted else ""
    origin = ""
    for key, options in axes:
        if token == key or token in {k for option in options for k in option}:
            origin = f"grid key '{key}': "
            break
    else:
        if token in base:
            origin = "base: "
        elif token in eval_over:
            origin = "eval: "
    hint = ""
    if re.match(r"unknown (method|task) '", problem):
        hint = (" — a method or task exists only once its module is installed; drop it from this sweep "
                "or keep it in a sweep file of its own until it lands")
    scope = f"all {total} points" if len(where) == total else (
        f"{len(where)} of {total} points, e.g. {where[0]}" if len(where) > 1 else f"point {where[0]}"
    )
    return f"{origin}{problem}{hint} ({scope})"

"""Run-directory names of sweep points, such as ``gsm8k-lora-rank8-frac0.5-seed1``.

A name is the task, the method, a fragment per key that varies between points of the same task
and method (``rank8``, ``frac0.5``, ``no_4bit``) and the seed. A baseline is named by its task and
the values of its keys that differ from the defaults, so sweeps sharing an ``out_dir`` share their
baseline. Names that still collide get a hash suffix.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from tunelab.experiments.state import digest

#: Short labels for run names (everything else uses the last part of the dotted key).
NAME_ALIASES = {
    "data.train_fraction": "frac",
    "model.load_in_4bit": "4bit",
    "train.epochs": "ep",
    "train.max_steps": "steps",
    "data.limit": "n",
    "model.name": "model",
}
_MISSING = object()


def _format_value(value: Any) -> str:
    if value is None:
        text = "none"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "+".join(_format_value(v) for v in value)
    elif isinstance(value, dict):
        text = digest(value)[:6]
    elif isinstance(value, str) and ("/" in value or os.sep in value):
        text = Path(value.rstrip("/")).name or value
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)


def _fragment(label: str, value: Any) -> str:
    if isinstance(value, bool):
        return label if value else f"no_{label}"
    text = _format_value(value)
    if label[-1:].isalpha() and (text[:1].isdigit() or (text[:1] in "-." and text[1:2].isdigit())):
        return f"{label}{text}"
    return f"{label}_{text}"


def _labels(keys: list[str]) -> dict[str, str]:
    short = {k: NAME_ALIASES.get(k, k.rsplit(".", 1)[-1]) for k in keys}
    counts: dict[str, int] = {}
    for label in short.values():
        counts[label] = counts.get(label, 0) + 1
    return {k: (label if counts[label] == 1 else k.replace(".", "_")) for k, label in short.items()}


def _naming_keys(overs: list[dict[str, Any]], groups: list[tuple]) -> list[str]:
    """Keys worth a name fragment: they vary between points that share task and method."""
    order: list[str] = []
    for over in overs:
        for k in over:
            if k not in order and k not in ("seed", "task.name", "method.name"):
                order.append(k)
    keep = []
    for key in order:
        by_group: dict[tuple, set] = {}
        for over, group in zip(overs, groups):
            by_group.setdefault(group, set()).add(json.dumps(over.get(key, "<unset>"), sort_keys=True, default=str))
        if any(len(vals) > 1 for vals in by_group.values()):
            keep.append(key)
    return keep


def train_names(specs: list[tuple[dict[str, Any], dict]]) -> list[str]:
    """Names of training points from (overrides with seed, resolved config)."""
    groups = [(cfg["task"]["name"], cfg["method"]["name"]) for _, cfg in specs]
    keys = _naming_keys([o for o, _ in specs], groups)
    labels = _labels(keys)
    names = []
    for (over, _), (task, method) in zip(specs, groups):
        parts = [task, method] + [_fragment(labels[k], over[k]) for k in keys if k in over]
        names.append("-".join(parts + [f"seed{over['seed']}"]))
    return names


def baseline_names(specs: list[tuple[dict[str, Any], dict]], defaults: dict[str, Any]) -> list[str]:
    """Names of baseline points from (their relevant overrides, resolved config); ``defaults`` flat."""
    keys = _naming_keys([o for o, _ in specs], [(c["task"]["name"],) for _, c in specs])
    labels = _labels(keys)
    names = []
    for over, cfg in specs:
        # Only non-default values name a baseline, so sweeps sharing an out_dir share its baseline.
        parts = [cfg["task"]["name"], "base"] + [
            _fragment(labels[k], over[k]) for k in keys if k in over and over[k] != defaults.get(k, _MISSING)
        ]
        names.append("-".join(parts))
    return names


def unique_names(names: list[str], hashes: list[str]) -> list[str]:
    """Names with a hash suffix where two points would share one."""
    dupes = {n for n in names if names.count(n) > 1}
    return [f"{n}-{h[:6]}" if n in dupes else n for n, h in zip(names, hashes)]

"""Rows of a report: runs that differ only in their seed, their settings, statistics and table cells.

Runs that differ only in their seed form one :class:`Row`; quality is the mean ± sample standard
deviation over seeds. Each task gets its own rows: metrics of different tasks are never averaged
together. A row's *settings* are the config keys that vary between the rows of its task (method
keys: between the rows of its method). Rows are ordered by the methods' ``display_order``.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from tunelab.experiments.report.runs import RunRecord
from tunelab.experiments.state import result_keys
from tunelab.registry import METHODS

GIB = 1024 ** 3
#: where methods that are not registered (runs of a method since removed) sort: after every registered one
_UNREGISTERED_ORDER = math.inf


# --------------------------------------------------------------------------------------------
# Methods, as the method classes describe themselves
# --------------------------------------------------------------------------------------------


def is_baseline(method: str) -> bool:
    """A method that trains nothing (the untrained base model); unknown names count as trained."""
    return method in METHODS and not METHODS.get(method).trains


def method_rank(method: str) -> tuple[float, str]:
    """Sort key of a method in tables and legends: its ``display_order``, then its name."""
    order = METHODS.get(method).display_order if method in METHODS else _UNREGISTERED_ORDER
    return (order, method)


def rank_key(method: str) -> Optional[str]:
    """The dotted config key of the method's size knob ("method.rank"), or None."""
    key = METHODS.get(method).rank_key if method in METHODS else None
    return f"method.{key}" if key else None


def rank_methods() -> list[str]:
    """The registered methods with a size knob (``rank_key``), in display order."""
    return sorted((name for name, cls in METHODS.items() if cls.rank_key), key=method_rank)


# --------------------------------------------------------------------------------------------
# Rows: runs that differ only in their seed
# --------------------------------------------------------------------------------------------


def _identity_keys(rec: RunRecord) -> dict[str, Any]:
    """Config keys that make a run a different experiment (seed, out, eval settings left out)."""
    return {k: v for k, v in result_keys(rec.config, "base" if rec.is_base else "train").items() if k != "seed"}


def _jsonish(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


@dataclass
class Row:
    task: str
    method: str
    runs: list[RunRecord]
    #: the keys that vary between the rows of this task (method keys: between rows of this method)
    settings: dict[str, Any] = field(default_factory=dict)
    #: settings minus the task's common values of shared keys (figure labels; see ``common_settings``)
    shown: dict[str, Any] = field(default_factory=dict)

    @property
    def is_baseline(self) -> bool:
        return is_baseline(self.method)

    def values(self, get: Callable[[RunRecord], Any]) -> list[float]:
        out = []
        for r in self.runs:
            v = get(r)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.append(float(v))
        return out

    def stat(self, get: Callable[[RunRecord], Any]) -> tuple[Optional[float], Optional[float], int]:
        """(mean, sample std or None for one value, count)."""
        vals = self.values(get)
        if not vals:
            return None, None, 0
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)

    def quality(self, metric: str) -> tuple[Optional[float], Optional[float], int]:
        return self.stat(lambda r: r.metrics.get(metric))

    def setting(self, key: str) -> Any:
        return self.runs[0].config.get(key)

    def label(self, skip: tuple[str, ...] = (), pretty: bool = False) -> str:
        """Method and settings; ``pretty`` (figures) leaves out the task's common values."""
        chosen = self.shown if pretty else self.settings
        text = settings_text({k: v for k, v in chosen.items() if k not in skip}, pretty)
        return f"{self.method} ({text})" if text else self.method

    @property
    def seeds(self) -> list[Any]:
        numeric_first = lambda s: (not isinstance(s, int), s if isinstance(s, int) else 0, str(s))  # noqa: E731
        return sorted({r.seed for r in self.runs}, key=numeric_first)


def _short_keys(keys: list[str]) -> dict[str, str]:
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    dup = {s for s in short.values() if list(short.values()).count(s) > 1}
    return {k: (k if s in dup else s) for k, s in short.items()}


def settings_text(settings: dict[str, Any], pretty: bool = False) -> str:
    names = _short_keys(list(settings))
    parts = []
    for k, v in settings.items():
        if pretty and k == "model.load_in_4bit":
            parts.append("4-bit base" if v else "no 4-bit")
        elif k == "eval":
            parts.append(f"eval n={v}")
        else:
            parts.append(f"{names[k]}={_fmt_setting(v)}")
    return ", ".join(parts)


def _fmt_setting(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str) and "/" in v:
        return Path(v.rstrip("/")).name or v
    return str(v) if not isinstance(v, (list, dict)) else json.dumps(v)


def sort_value(v: Any) -> tuple:
    if isinstance(v, bool):
        return (0, float(v), "")
    if isinstance(v, (int, float)):
        return (0, float(v), "")
    return (1, 0.0, _jsonish(v))


def _varying(group: list[Row], keep: Callable[[str], bool]) -> list[str]:
    """The identity keys (those ``keep`` accepts) whose value differs between the rows of ``group``."""
    keys: list[str] = []
    for r in group:
        for k in _identity_keys(r.runs[0]):
            if keep(k) and k not in keys:
                keys.append(k)
    return [k for k in keys if len({_jsonish(r.setting(k)) for r in group}) > 1]


def _set_settings(rows: list[Row]) -> None:
    """Each row's settings (what varies) and shown settings (minus the task's common values)."""
    trained = [r for r in rows if not r.is_baseline]
    bases = [r for r in rows if r.is_baseline]
    shared = _varying(trained, lambda k: not k.startswith("method."))
    for r in trained:
        same_method = [x for x in trained if x.method == r.method]
        keys = _varying(same_method, lambda k: k.startswith("method.") and k != "method.name") + shared
        r.settings = {k: r.setting(k) for k in keys if k in r.runs[0].config}
    for r in bases:
        r.settings = {k: r.setting(k) for k in _varying(bases, lambda k: True)}
    if len({r.runs[0].eval_signature for r in rows}) > 1:  # evaluated differently: say so per row
        for r in rows:
            r.settings["eval"] = r.runs[0].eval_n
    common = common_settings(trained, shared)
    for r in rows:
        r.shown = {k: v for k, v in r.settings.items()
                   if r.is_baseline or k not in common or _jsonish(v) != _jsonish(common[k])}


def build_rows(runs: list[RunRecord]) -> dict[str, list[Row]]:
    """Rows per task: runs grouped by everything but the seed; settings = the keys that vary."""
    by_task: dict[str, dict[str, Row]] = {}
    for rec in runs:
        key = _jsonish([rec.method, _identity_keys(rec), rec.eval_signature])
        rows = by_task.setdefault(rec.task, {})
        if key not in rows:
            rows[key] = Row(rec.task, rec.method, [])
        rows[key].runs.append(rec)
    out: dict[str, list[Row]] = {}
    for task, rowmap in by_task.items():
        rows = list(rowmap.values())
        _set_settings(rows)
        rows.sort(key=lambda r: (method_rank(r.method), [sort_value(v) for v in r.settings.values()]))
        out[task] = rows
    return dict(sorted(out.items()))


def common_settings(rows: list[Row], keys: list[str]) -> dict[str, Any]:
    """The most frequent value of each shared (non-method) key: figure labels leave it out."""
    common = {}
    for k in keys:
        counts: dict[str, tuple[int, Any]] = {}
        for r in rows:
            if k in r.settings:
                j = _jsonish(r.settings[k])
                counts[j] = (counts.get(j, (0, None))[0] + 1, r.settings[k])
        if counts:
            # most frequent; a tie goes to the smallest value, so the choice is deterministic
            common[k] = min(counts.values(), key=lambda cv: (-cv[0], sort_value(cv[1])))[1]
    return common


def task_common(rows: list[Row]) -> dict[str, Any]:
    """The shared settings left out of this task's figure labels (for the caption)."""
    out: dict[str, Any] = {}
    for r in rows:
        if r.is_baseline:
            continue
        for k, v in r.settings.items():
            if k not in r.shown and not k.startswith("method."):
                out.setdefault(k, v)
    return out


def primary_metric(rows: list[Row], override: Optional[str] = None) -> Optional[str]:
    if override:
        return override
    counts: dict[str, int] = {}
    for r in rows:
        for rec in r.runs:
            if rec.primary_metric:
                counts[rec.primary_metric] = counts.get(rec.primary_metric, 0) + 1
    return max(counts, key=counts.get) if counts else None


def other_metrics(rows: list[Row], primary: Optional[str]) -> list[str]:
    names: list[str] = []
    for r in rows:
        for rec in r.runs:
            for k in rec.metrics:
                if k != primary and k not in names:
                    names.append(k)
    return names


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def fmt_mean_std(mean: Optional[float], std: Optional[float], digits: int) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def fmt_params(trainable: Optional[float], total: Optional[float]) -> str:
    if trainable is None:
        return "—"
    text = f"{int(round(trainable)):,}"
    if total:
        text += f" ({100.0 * trainable / total:.2f}%)"
    return text


def _row_cells(r: Row, primary: Optional[str], extra: list[str]) -> list[str]:
    line = [r.method, settings_text({k: v for k, v in r.settings.items() if k != "eval"}) or "—",
            ", ".join(str(s) for s in r.seeds)]
    if primary:
        line.append(fmt_mean_std(*r.quality(primary)[:2], 4))
    line += [fmt_mean_std(*r.quality(m)[:2], 4) for m in extra]
    trainable = r.stat(lambda x: x.train.get("trainable_params"))[0]
    total = r.stat(lambda x: x.train.get("total_params"))[0]
    mem = r.stat(lambda x: (x.train.get("peak_mem_bytes") or math.nan) / GIB)
    return line + [
        fmt_params(trainable, total),
        fmt_mean_std(mem[0], None, 2),
        fmt_mean_std(*r.stat(lambda x: x.train.get("train_time_s"))[:2], 1),
        fmt_mean_std(r.stat(lambda x: x.train.get("train_tokens_per_s"))[0], None, 0),
        fmt_mean_std(*r.stat(lambda x: x.train.get("final_loss"))[:2], 4),
        ", ".join(sorted({str(x.eval_n) for x in r.runs if x.eval_n is not None})) or "—",
    ]


def table(rows: list[Row], primary: Optional[str]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of one task's table (the same cells go to markdown and HTML)."""
    extra = other_metrics(rows, primary)
    header = ["method", "settings", "seeds"]
    header += [f"{primary} (mean ± std)"] if primary else []
    header += extra
    header += ["trainable params", "peak memory (GiB)", "train time (s)", "train tokens/s", "final loss", "eval n"]
    return header, [_row_cells(r, primary, extra) for r in rows]

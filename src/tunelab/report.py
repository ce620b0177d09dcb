"""Reports from run directories: a table per task, the study's figures, and a CSV of every run.

``tunelab report RUNS_DIR... --out REPORT`` reads run directories only (nothing is recomputed):

- ``RUN/config.yaml``: the run's settings (method, rank, data fraction, epochs, 4-bit, ...);
- ``RUN/results.json``: training numbers (trainable/total params, peak memory, train time,
  tokens/s, final loss, seed); schema version 1, older files are read as far as they go;
- ``RUN/eval/results.json``: the task's metrics and which one is primary;
- a ``BASE`` marker makes a directory an untrained-baseline evaluation (method ``base``).

and writes ``REPORT/report.md``, ``REPORT/report.html`` (same content, figures embedded by relative
path), ``REPORT/figures/<task>-<figure>.png`` and ``REPORT/results.csv`` (one row per run).

Runs that differ only in their seed form one row; quality is the mean ± sample standard deviation
over seeds. Each task gets its own table and figures: metrics of different tasks are never
averaged together. A figure whose data is not there (e.g. no run at two or more ranks) is left
out, and report.md says why.
"""

from __future__ import annotations

import csv
import html
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from tunelab.sweep import NON_RESULT_KEYS, flat_config

__all__ = ["RunRecord", "Row", "collect_runs", "build_rows", "write_report", "compare_evals", "add_cli"]

SCHEMA_VERSION = 1
#: Fields of a train results.json the report reads (schema 1 names).
TRAIN_FIELDS = (
    "trainable_params", "total_params", "peak_mem_bytes", "peak_mem_kind", "train_time_s", "wall_time_s",
    "train_tokens_per_s", "final_loss", "seed", "steps", "epochs_completed", "method_results", "device",
    "git_sha", "versions",
)
#: Names older writers used (the HF Trainer's among them) -> schema 1 names.
LEGACY_TRAIN_NAMES = {
    "train_runtime": "train_time_s",
    "train_loss": "final_loss",
    "peak_memory_bytes": "peak_mem_bytes",
    "peak_mem": "peak_mem_bytes",
    "tokens_per_s": "train_tokens_per_s",
    "train_tokens_per_second": "train_tokens_per_s",
    "global_step": "steps",
}
METHOD_ORDER = ("base", "full", "lora", "rosa", "galore")
RANK_METHODS = ("lora", "rosa")
GIB = 1024 ** 3


# --------------------------------------------------------------------------------------------
# Reading run directories
# --------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """What the report knows about one run directory."""

    path: Path
    name: str
    task: str
    method: str
    is_base: bool
    config: dict  # flattened config.yaml ({section.key: value})
    train: dict = field(default_factory=dict)  # schema-1 fields from results.json ({} for a baseline)
    metrics: dict = field(default_factory=dict)  # numeric eval metrics
    primary_metric: Optional[str] = None
    eval_signature: str = "no-eval"  # split, generation settings and n: rows never mix these
    eval_n: Optional[int] = None
    schema: Optional[int] = SCHEMA_VERSION

    @property
    def seed(self) -> Any:
        return self.train.get("seed", self.config.get("seed"))


def find_run_dirs(roots: list[Path]) -> list[Path]:
    """Folders holding config.yaml under the roots (a run's own subfolders and dot-folders skipped)."""
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"'{root}' does not exist: pass folders that hold run directories (e.g. runs/)")
        stack = [root]
        while stack:
            d = stack.pop()
            if (d / "config.yaml").is_file():
                found.append(d)
                continue
            stack.extend(sorted((c for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")), reverse=True))
    return sorted(dict.fromkeys(found))


def _read_json(path: Path, notes: list[str]) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        notes.append(f"{path}: cannot be read ({exc}); left out")
        return None
    except ValueError as exc:
        notes.append(f"{path}: not valid JSON ({exc}); left out")
        return None
    if not isinstance(data, dict):
        notes.append(f"{path}: expected a JSON object, got {type(data).__name__}; left out")
        return None
    return data


def _schema_note(path: Path, version: Any, read: list[str], missing: list[str]) -> Optional[str]:
    if version == SCHEMA_VERSION:
        return None
    got = f"read {', '.join(read) or 'nothing'}" + (f"; not found: {', '.join(missing)}" if missing else "")
    if version is None:
        return f"{path}: no schema_version (written before results.json was versioned): {got}"
    if isinstance(version, int) and version > SCHEMA_VERSION:
        return (f"{path}: schema_version {version} is newer than this tunelab reads ({SCHEMA_VERSION}); "
                f"upgrade tunelab for every field: {got}")
    return f"{path}: unknown schema_version {version!r} (this tunelab reads {SCHEMA_VERSION}): {got}"


def read_train_results(path: Path, notes: list[str]) -> Optional[dict]:
    """Schema-1 training fields of RUN/results.json; older names are mapped, gaps noted."""
    raw = _read_json(path, notes)
    if raw is None:
        return None
    version = raw.get("schema_version")
    out = {k: raw[k] for k in TRAIN_FIELDS if k in raw}
    if version != SCHEMA_VERSION:
        for old, new in LEGACY_TRAIN_NAMES.items():
            if old in raw and new not in out:
                out[new] = raw[old]
    essential = ["trainable_params", "total_params", "peak_mem_bytes", "train_time_s", "train_tokens_per_s", "final_loss"]
    note = _schema_note(path, version, [k for k in essential if k in out], [k for k in essential if k not in out])
    if note:
        notes.append(note)
    return out


def _metric_value(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):  # {"mean": ..., "ci95": [...]} style
        for key in ("mean", "value", "score"):
            if key in value:
                return _metric_value(value[key])
    return None


def read_eval_results(path: Path, notes: list[str]) -> Optional[dict]:
    raw = _read_json(path, notes)
    if raw is None:
        return None
    version = raw.get("schema_version")
    metrics_raw = raw.get("metrics")
    if not isinstance(metrics_raw, dict):
        notes.append(f"{path}: no 'metrics' mapping (schema_version {version!r}); its quality is left out")
        return None
    metrics = {k: v for k, v in ((k, _metric_value(v)) for k, v in metrics_raw.items() if k != "n") if v is not None}
    n = metrics_raw.get("n")
    primary = raw.get("primary_metric")
    if primary not in metrics:
        if metrics:
            notes.append(f"{path}: primary_metric {primary!r} is not among its metrics; using '{next(iter(metrics))}'")
            primary = next(iter(metrics))
        else:
            primary = None
    note = _schema_note(path, version, ["metrics"] + (["primary_metric"] if raw.get("primary_metric") else []),
                        [] if raw.get("primary_metric") else ["primary_metric"])
    if note:
        notes.append(note)
    signature = json.dumps({"split": raw.get("split"), "generation": raw.get("generation"), "n": n}, sort_keys=True, default=str)
    return {"metrics": metrics, "primary": primary, "n": n if isinstance(n, int) else None,
            "signature": signature, "task": raw.get("task")}


def load_run(path: Path, notes: list[str]) -> Optional[RunRecord]:
    """One run directory, or None (with a note saying why) when it has nothing to report."""
    try:
        cfg = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        notes.append(f"{path}: config.yaml unreadable ({exc}); run left out")
        return None
    if not isinstance(cfg, dict):
        notes.append(f"{path}: config.yaml is not a mapping; run left out")
        return None
    flat = flat_config(cfg)
    is_base = (path / "BASE").is_file()
    failed = path / "FAILED"
    finished = (path / "eval" / "results.json").is_file() if is_base else (path / "results.json").is_file()
    if not finished:
        if failed.is_file():
            lines = failed.read_text().splitlines()
            error = next((ln[6:].strip() for ln in lines if ln.startswith("error:")), lines[0] if lines else "")
            notes.append(f"{path}: failed ({error}); left out")
        elif is_base:
            notes.append(f"{path}: baseline without eval/results.json (evaluation unfinished or still running); left out")
        else:
            notes.append(f"{path}: no results.json (training unfinished or still running); left out")
        return None
    train: dict = {}
    if not is_base:
        got = read_train_results(path / "results.json", notes)
        if got is None:
            return None
        train = got
    ev = None
    if (path / "eval" / "results.json").is_file():
        ev = read_eval_results(path / "eval" / "results.json", notes)
        if ev is None and is_base:
            return None
    else:
        notes.append(f"{path}: no eval/results.json: quality missing (evaluate it with `tunelab eval {path}`)")
    task = (ev or {}).get("task") or flat.get("task.name") or "unknown"
    method = "base" if is_base else str(flat.get("method.name", "unknown"))
    rec = RunRecord(path=path, name=path.name, task=str(task), method=method, is_base=is_base, config=flat, train=train)
    if ev is not None:
        rec.metrics, rec.primary_metric = ev["metrics"], ev["primary"]
        rec.eval_signature, rec.eval_n = ev["signature"], ev["n"]
    return rec


def collect_runs(roots: list[Path]) -> tuple[list[RunRecord], list[str]]:
    notes: list[str] = []
    dirs = find_run_dirs([Path(r) for r in roots])
    if not dirs:
        raise FileNotFoundError(
            f"no run directories (folders with config.yaml) under {', '.join(map(str, roots))}: "
            "point tunelab report at the folder of a sweep (e.g. runs/<sweep>) or at run directories"
        )
    runs = [r for r in (load_run(d, notes) for d in dirs) if r is not None]
    return runs, notes


# --------------------------------------------------------------------------------------------
# Rows: runs that differ only in their seed
# --------------------------------------------------------------------------------------------


def _identity_keys(rec: RunRecord) -> dict[str, Any]:
    """Config keys that make a run a different experiment (seed, out, eval settings left out)."""
    if rec.is_base:
        return {k: v for k, v in rec.config.items() if k.startswith(("model.", "task.")) or k == "data.max_length"}
    return {k: v for k, v in rec.config.items()
            if k not in NON_RESULT_KEYS and k != "seed" and not k.startswith("eval.")}


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


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _sort_value(v: Any) -> tuple:
    if isinstance(v, bool):
        return (0, float(v), "")
    if isinstance(v, (int, float)):
        return (0, float(v), "")
    return (1, 0.0, _jsonish(v))


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
        trained = [r for r in rows if r.method != "base"]
        bases = [r for r in rows if r.method == "base"]

        def varying(group: list[Row], keep: Callable[[str], bool]) -> list[str]:
            keys: list[str] = []
            for r in group:
                for k in _identity_keys(r.runs[0]):
                    if keep(k) and k not in keys:
                        keys.append(k)
            return [k for k in keys if len({_jsonish(r.setting(k)) for r in group}) > 1]

        shared = varying(trained, lambda k: not k.startswith("method."))
        for r in trained:
            same_method = [x for x in trained if x.method == r.method]
            keys = varying(same_method, lambda k: k.startswith("method.") and k != "method.name") + shared
            r.settings = {k: r.setting(k) for k in keys if k in r.runs[0].config}
        for r in bases:
            r.settings = {k: r.setting(k) for k in varying(bases, lambda k: True)}
        if len({r.runs[0].eval_signature for r in rows}) > 1:  # evaluated differently: say so per row
            for r in rows:
                r.settings["eval"] = r.runs[0].eval_n
        common = common_settings(trained, shared)
        for r in rows:
            r.shown = {k: v for k, v in r.settings.items()
                       if r.method == "base" or k not in common or _jsonish(v) != _jsonish(common[k])}
        rows.sort(key=lambda r: (_method_rank(r.method), [_sort_value(v) for v in r.settings.values()]))
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
            common[k] = min(counts.values(), key=lambda cv: (-cv[0], _sort_value(cv[1])))[1]
    return common


def task_common(rows: list[Row]) -> dict[str, Any]:
    """The shared settings left out of this task's figure labels (for the caption)."""
    out: dict[str, Any] = {}
    for r in rows:
        if r.method == "base":
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


def table(rows: list[Row], primary: Optional[str]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of one task's table (the same cells go to markdown and HTML)."""
    extra = other_metrics(rows, primary)
    header = ["method", "settings", "seeds"]
    header += [f"{primary} (mean ± std)"] if primary else []
    header += extra
    header += ["trainable params", "peak memory (GiB)", "train time (s)", "train tokens/s", "final loss", "eval n"]
    cells = []
    for r in rows:
        line = [r.method, settings_text({k: v for k, v in r.settings.items() if k != "eval"}) or "—",
                ", ".join(str(s) for s in r.seeds)]
        if primary:
            line.append(fmt_mean_std(*r.quality(primary)[:2], 4))
        line += [fmt_mean_std(*r.quality(m)[:2], 4) for m in extra]
        trainable = r.stat(lambda x: x.train.get("trainable_params"))[0]
        total = r.stat(lambda x: x.train.get("total_params"))[0]
        mem = r.stat(lambda x: (x.train.get("peak_mem_bytes") or math.nan) / GIB)
        line += [
            fmt_params(trainable, total),
            fmt_mean_std(mem[0], None, 2),
            fmt_mean_std(*r.stat(lambda x: x.train.get("train_time_s"))[:2], 1),
            fmt_mean_std(r.stat(lambda x: x.train.get("train_tokens_per_s"))[0], None, 0),
            fmt_mean_std(*r.stat(lambda x: x.train.get("final_loss"))[:2], 4),
            ", ".join(sorted({str(x.eval_n) for x in r.runs if x.eval_n is not None})) or "—",
        ]
        cells.append(line)
    return header, cells


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells]
    return "\n".join(lines)


def html_table(header: list[str], cells: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in cells)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody>\n</table>"


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


class Omit(Exception):
    """A figure whose data is missing: left out, with the reason in report.md."""


@dataclass
class Figure:
    key: str
    title: str
    path: Optional[Path] = None
    caption: str = ""
    omitted: Optional[str] = None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _method_colors(methods: list[str]) -> dict[str, Any]:
    plt = _pyplot()
    palette = plt.get_cmap("tab10").colors
    ordered = sorted(set(methods), key=_method_rank)
    colors, i = {}, 0
    for m in ordered:
        if m == "base":
            colors[m] = "0.55"
        else:
            colors[m] = palette[i % len(palette)]
            i += 1
    return colors


def _quality_label(metric: str, rows: list[Row]) -> str:
    vals = [v for r in rows for v in r.values(lambda x: x.metrics.get(metric))]
    scale = " (0–1)" if vals and all(0.0 <= v <= 1.0 for v in vals) else ""
    return f"{metric}{scale}, mean ± std over seeds"


def _memory_label(rows: list[Row]) -> str:
    kinds = {x.train.get("peak_mem_kind") for r in rows for x in r.runs if x.train.get("peak_mem_bytes")}
    if kinds == {"cuda_max_allocated"}:
        return "peak GPU memory (GiB, max allocated)"
    if kinds == {"cpu_peak_rss"}:
        return "peak process memory (GiB, CPU RSS)"
    return "peak memory (GiB; GPU allocated or CPU RSS)"


def _time_unit(seconds: list[float]) -> tuple[float, str]:
    top = max(seconds) if seconds else 0.0
    if top >= 2 * 3600:
        return 3600.0, "h"
    if top >= 120:
        return 60.0, "min"
    return 1.0, "s"


def _baselines(rows: list[Row], metric: str) -> list[tuple[str, float]]:
    out = []
    for r in rows:
        if r.method == "base":
            mean = r.quality(metric)[0]
            if mean is not None:
                out.append((r.label(pretty=True).replace("base", "untrained base", 1), mean))
    return out


def _draw_baselines(ax, bases: list[tuple[str, float]], horizontal: bool = True) -> None:
    styles = ["--", ":", "-.", (0, (5, 1))]
    for i, (label, value) in enumerate(bases):
        kw = dict(color="0.35", linestyle=styles[i % len(styles)], linewidth=1.2, label=label)
        ax.axhline(value, **kw) if horizontal else ax.axvline(value, **kw)


def _unit_interval(ax, values: list[float], axis: str) -> None:
    """Start a 0–1 metric's axis at 0 (bars and lines of small scores stay readable)."""
    if values and all(0.0 <= v <= 1.0 for v in values):
        top = min(1.0, max(0.05, max(values) * 1.15))
        (ax.set_xlim if axis == "x" else ax.set_ylim)(0.0, top)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def _lines(rows: list[Row], metric_get: Callable[[RunRecord], Any], x_key: str, x_of: Callable[[Row], Any],
           methods: Optional[tuple[str, ...]] = None) -> dict[str, list[tuple[float, Row]]]:
    """Series for 'y vs x': one line per (method, other settings), kept when it has 2+ x values."""
    lines: dict[str, list[tuple[float, Row]]] = {}
    for r in rows:
        if r.method == "base" or (methods and r.method not in methods):
            continue
        x = x_of(r)
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not r.values(metric_get):
            continue
        lines.setdefault(r.label(skip=(x_key,), pretty=True), []).append((float(x), r))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in lines.items() if len({x for x, _ in v}) >= 2}


def _plot_lines(ax, lines, get, colors, scale: float = 1.0) -> None:
    markers = "osD^vP*X"
    for i, (label, pts) in enumerate(sorted(lines.items())):
        xs = [x for x, _ in pts]
        stats = [row.stat(get) for _, row in pts]
        ys = [m / scale for m, _, _ in stats]
        es = [(s or 0.0) / scale for _, s, _ in stats]
        method = pts[0][1].method
        ax.errorbar(xs, ys, yerr=es, marker=markers[i % len(markers)], capsize=3, label=label,
                    color=colors.get(method), linestyle="-" if i % 2 == 0 else "--")


def fig_quality_per_method(task, rows, metric, path, colors) -> str:
    shown = [r for r in rows if r.quality(metric)[0] is not None]
    if not any(r.method != "base" for r in shown):
        raise Omit(f"no trained run of {task} has {metric} (evaluate the runs first)")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, max(2.8, 0.38 * len(shown) + 1.4)))
    labels = [r.label(pretty=True) for r in shown]
    means = [r.quality(metric)[0] for r in shown]
    errs = [r.quality(metric)[1] or 0.0 for r in shown]
    ys = range(len(shown))
    ax.barh(list(ys), means, xerr=errs if any(errs) else None, capsize=3, color=[colors[r.method] for r in shown])
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    for y, m, e in zip(ys, means, errs):
        ax.text(m + e, y, f" {m:.3f}", va="center", fontsize=7)
    _draw_baselines(ax, _baselines(rows, metric), horizontal=False)
    _unit_interval(ax, [m + e for m, e in zip(means, errs)] + [v for _, v in _baselines(rows, metric)], "x")
    ax.set_xlabel(_quality_label(metric, shown))
    ax.set_title(f"{task}: quality per method and setting")
    if _baselines(rows, metric):
        ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)
    return "One bar per method and setting (grey: the untrained base model; dashed line: its score)."


def _rank_x(r: Row) -> Any:
    return r.setting("method.rank")


def fig_quality_vs_rank(task, rows, metric, path, colors) -> str:
    get = lambda x: x.metrics.get(metric)  # noqa: E731
    lines = _lines(rows, get, "method.rank", _rank_x, RANK_METHODS)
    if not lines:
        ranks = {m: sorted({r.setting("method.rank") for r in rows if r.method == m}, key=str) for m in RANK_METHODS}
        found = "; ".join(f"{m}: {', '.join(map(str, v)) or 'none'}" for m, v in ranks.items())
        raise Omit(f"needs LoRA or RoSA runs of {task} at 2+ ranks with the other settings equal (ranks found: {found})")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _plot_lines(ax, lines, get, colors)
    _draw_baselines(ax, _baselines(rows, metric))
    ax.set_xscale("log", base=2)
    ranks = sorted({x for pts in lines.values() for x, _ in pts})
    ax.set_xticks(ranks, [f"{r:g}" for r in ranks])
    ax.set_xlabel("adapter rank r (log scale)")
    ax.set_ylabel(_quality_label(metric, rows))
    ax.set_title(f"{task}: quality vs rank")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return "LoRA and RoSA at each rank; other settings fixed per line."


def _fraction_x(r: Row) -> Any:
    return r.setting("data.train_fraction")


def _quality_line_figure(lines, get, rows, metric, colors, path, xlabel: str, title: str) -> None:
    """Quality (y) against one setting (x), a line per method/setting, baselines as horizontal lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _plot_lines(ax, lines, get, colors)
    _draw_baselines(ax, _baselines(rows, metric))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(_quality_label(metric, rows))
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def fig_quality_vs_fraction(task, rows, metric, path, colors) -> str:
    get = lambda x: x.metrics.get(metric)  # noqa: E731
    lines = _lines(rows, get, "data.train_fraction", _fraction_x)
    if not lines:
        found = sorted({r.setting("data.train_fraction") for r in rows if r.method != "base"}, key=str)
        raise Omit(f"needs runs of one method on {task} at 2+ values of data.train_fraction with the other settings "
                   f"equal (found: {', '.join(map(str, found)) or 'none'})")
    _quality_line_figure(lines, get, rows, metric, colors, path,
                         "fraction of the training split used (data.train_fraction)",
                         f"{task}: quality vs training-data fraction")
    return "Quality as the share of training data grows; one line per method and setting."


def _epochs_x(r: Row) -> Any:
    if r.setting("train.max_steps") in (-1, None):
        return r.setting("train.epochs")
    return None  # step-limited runs: their epochs setting was not what they trained


def fig_quality_vs_epochs(task, rows, metric, path, colors) -> str:
    get = lambda x: x.metrics.get(metric)  # noqa: E731
    lines = _lines(rows, get, "train.epochs", _epochs_x)
    if not lines:
        found = sorted({_epochs_x(r) for r in rows if r.method != "base" and _epochs_x(r) is not None}, key=str)
        raise Omit(f"needs epoch-based runs (train.max_steps=-1) of one method on {task} at 2+ values of "
                   f"train.epochs with the other settings equal (found: {', '.join(map(str, found)) or 'none'})")
    _quality_line_figure(lines, get, rows, metric, colors, path, "training epochs", f"{task}: quality vs epochs")
    return "Quality after each number of epochs; one line per method and setting."


def fig_memory_vs_rank(task, rows, metric, path, colors) -> str:
    get = lambda x: x.train.get("peak_mem_bytes")  # noqa: E731
    lines = _lines(rows, get, "method.rank", _rank_x, RANK_METHODS)
    if not lines:
        raise Omit(f"needs LoRA or RoSA runs of {task} with peak memory at 2+ ranks")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _plot_lines(ax, lines, get, colors, scale=GIB)
    ax.set_xscale("log", base=2)
    ranks = sorted({x for pts in lines.values() for x, _ in pts})
    ax.set_xticks(ranks, [f"{r:g}" for r in ranks])
    ax.set_xlabel("adapter rank r (log scale)")
    ax.set_ylabel(_memory_label([r for pts in lines.values() for _, r in pts]))
    ax.set_title(f"{task}: peak training memory vs rank")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return "Peak memory of training at each rank, with and without a 4-bit base where both were run."


def fig_time_memory_per_method(task, rows, metric, path, colors) -> str:
    shown = [r for r in rows if r.method != "base" and (r.values(lambda x: x.train.get("train_time_s"))
                                                         or r.values(lambda x: x.train.get("peak_mem_bytes")))]
    if not shown:
        raise Omit(f"no trained run of {task} records train time or peak memory")
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, max(2.8, 0.38 * len(shown) + 1.4)), sharey=True)
    ys = list(range(len(shown)))
    times = [r.stat(lambda x: x.train.get("train_time_s")) for r in shown]
    div, unit = _time_unit([m for m, _, _ in times if m is not None])
    errs = [(s or 0.0) / div for _, s, _ in times]
    a1.barh(ys, [(m or 0.0) / div for m, _, _ in times], xerr=errs if any(errs) else None,
            capsize=3, color=[colors[r.method] for r in shown])
    a1.set_yticks(ys, [r.label(pretty=True) for r in shown], fontsize=8)
    a1.invert_yaxis()
    a1.set_xlabel(f"training time ({unit}, optimizer steps only)")
    mems = [r.stat(lambda x: x.train.get("peak_mem_bytes")) for r in shown]
    a2.barh(ys, [(m or 0.0) / GIB for m, _, _ in mems], color=[colors[r.method] for r in shown])
    a2.set_xlabel(_memory_label(shown))
    fig.suptitle(f"{task}: training time and peak memory per method")
    _save(fig, path)
    return "Time of the optimizer steps and peak memory of each training run (mean over seeds)."


def fig_quality_vs_params(task, rows, metric, path, colors) -> str:
    pts = [r for r in rows if r.method != "base" and r.quality(metric)[0] is not None
           and (r.stat(lambda x: x.train.get("trainable_params"))[0] or 0) > 0]
    if len(pts) < 2:
        raise Omit(f"needs 2+ trained runs of {task} with {metric} and trainable-parameter counts")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for method in sorted({r.method for r in pts}, key=_method_rank):
        mine = [r for r in pts if r.method == method]
        xs = [r.stat(lambda x: x.train.get("trainable_params"))[0] for r in mine]
        ys = [r.quality(metric)[0] for r in mine]
        es = [r.quality(metric)[1] or 0.0 for r in mine]
        ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=3, color=colors[method], label=method)
        for x, y, r in zip(xs, ys, mine):
            text = settings_text({k: v for k, v in r.shown.items() if k != "eval"}, pretty=True)
            if text:
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6)
    _draw_baselines(ax, _baselines(rows, metric))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (count, log scale)")
    ax.set_ylabel(_quality_label(metric, rows))
    ax.set_title(f"{task}: quality vs trainable parameters")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)
    return "Each method and setting at its trainable-parameter count: what quality each parameter budget buys."


FIGURES: list[tuple[str, str, Callable]] = [
    ("quality_per_method", "Quality per method (with the untrained baseline)", fig_quality_per_method),
    ("quality_vs_rank", "Quality vs rank (LoRA and RoSA)", fig_quality_vs_rank),
    ("quality_vs_fraction", "Quality vs training-data fraction", fig_quality_vs_fraction),
    ("quality_vs_epochs", "Quality vs epochs", fig_quality_vs_epochs),
    ("memory_vs_rank", "Peak memory vs rank (with/without 4-bit)", fig_memory_vs_rank),
    ("time_memory_per_method", "Training time and peak memory per method", fig_time_memory_per_method),
    ("quality_vs_trainable_params", "Quality vs trainable parameters", fig_quality_vs_params),
]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def make_figures(task: str, rows: list[Row], metric: Optional[str], fig_dir: Path) -> list[Figure]:
    colors = _method_colors([r.method for r in rows])
    out = []
    for key, title, draw in FIGURES:
        fig = Figure(key, title)
        path = fig_dir / f"{_safe(task)}-{key}.png"
        path.unlink(missing_ok=True)  # never leave a stale figure from an earlier report
        if metric is None and key.startswith("quality"):
            fig.omitted = f"no evaluation results for {task}"
        else:
            try:
                fig.caption = draw(task, rows, metric, path, colors)
                fig.path = path
                common = task_common(rows)
                if common:
                    fig.caption += f" Settings a label does not show: {settings_text(common)}."
            except Omit as exc:
                fig.omitted = str(exc)
        out.append(fig)
    return out


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

CSV_FIRST = [
    "run", "path", "task", "method", "is_base", "seed", "primary_metric", "quality", "eval_n",
    "trainable_params", "total_params", "trainable_pct", "peak_mem_bytes", "peak_mem_gib", "peak_mem_kind",
    "train_time_s", "wall_time_s", "train_tokens_per_s", "final_loss", "steps", "epochs_completed",
]


def csv_rows(runs: list[RunRecord]) -> tuple[list[str], list[dict]]:
    out = []
    metric_names: list[str] = []
    config_keys: list[str] = []
    for rec in sorted(runs, key=lambda r: (r.task, _method_rank(r.method), r.name)):
        t = rec.train
        row = {
            "run": rec.name, "path": str(rec.path), "task": rec.task, "method": rec.method, "is_base": rec.is_base,
            "seed": rec.seed, "primary_metric": rec.primary_metric,
            "quality": rec.metrics.get(rec.primary_metric) if rec.primary_metric else None, "eval_n": rec.eval_n,
            "trainable_params": t.get("trainable_params"), "total_params": t.get("total_params"),
            "trainable_pct": (100.0 * t["trainable_params"] / t["total_params"]
                              if t.get("trainable_params") is not None and t.get("total_params") else None),
            "peak_mem_bytes": t.get("peak_mem_bytes"),
            "peak_mem_gib": t["peak_mem_bytes"] / GIB if isinstance(t.get("peak_mem_bytes"), (int, float)) else None,
            "peak_mem_kind": t.get("peak_mem_kind"), "train_time_s": t.get("train_time_s"),
            "wall_time_s": t.get("wall_time_s"), "train_tokens_per_s": t.get("train_tokens_per_s"),
            "final_loss": t.get("final_loss"), "steps": t.get("steps"), "epochs_completed": t.get("epochs_completed"),
        }
        for k, v in rec.metrics.items():
            row[f"metric.{k}"] = v
            if f"metric.{k}" not in metric_names:
                metric_names.append(f"metric.{k}")
        for k, v in rec.config.items():
            row[f"config.{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
            if f"config.{k}" not in config_keys:
                config_keys.append(f"config.{k}")
        out.append(row)
    return CSV_FIRST + sorted(metric_names) + sorted(config_keys), out


def write_report(roots: list[Path], out_dir: Path, metric_overrides: Optional[dict[str, str]] = None,
                 title: str = "tunelab report") -> dict[str, Any]:
    """Write report.md, report.html, figures/*.png and results.csv; returns what was written."""
    runs, notes = collect_runs(roots)
    if not runs:
        raise ValueError("no run has anything to report:\n" + "\n".join(f"  - {n}" for n in notes))
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    metric_overrides = dict(metric_overrides or {})
    tasks = build_rows(runs)
    for task in metric_overrides:
        if task not in tasks:
            raise ValueError(f"--metric {task}=...: no runs of task '{task}' (tasks found: {', '.join(tasks)})")

    sections = []
    for task, rows in tasks.items():
        metric = primary_metric(rows, metric_overrides.get(task))
        if metric and not any(r.quality(metric)[0] is not None for r in rows):
            known = sorted({m for r in rows for x in r.runs for m in x.metrics})
            raise ValueError(f"--metric {task}={metric}: no run of {task} has that metric (known: {', '.join(known)})")
        header, cells = table(rows, metric)
        figures = make_figures(task, rows, metric, fig_dir)
        sections.append({"task": task, "metric": metric, "rows": rows, "header": header, "cells": cells, "figures": figures})

    n_base = sum(r.is_base for r in runs)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    sources = ", ".join(str(r) for r in roots)
    intro = (
        f"Generated {stamp} from {sources}: {len(runs)} runs ({len(runs) - n_base} trained, {n_base} baseline) "
        f"in {len(tasks)} task(s). Quality is each task's primary metric on its evaluation split, the mean ± "
        "sample standard deviation over seeds (one value when a setting ran with one seed). Tasks are never "
        "averaged together. Peak memory: GPU max allocated for CUDA runs, peak process RSS for CPU runs. "
        "Train time counts the optimizer steps only (no loading or saving)."
    )
    md = [f"# {title}", "", intro, ""]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
    for sec in sections:
        task, metric = sec["task"], sec["metric"]
        md += [f"## {task}", "", f"Primary metric: `{metric}`." if metric else "No evaluation results yet.", ""]
        md += [markdown_table(sec["header"], sec["cells"]), ""]
        body += [f"<h2>{html.escape(task)}</h2>",
                 f"<p>Primary metric: <code>{html.escape(metric)}</code>.</p>" if metric else "<p>No evaluation results yet.</p>",
                 html_table(sec["header"], sec["cells"])]
        drawn = [f for f in sec["figures"] if f.path]
        left = [f for f in sec["figures"] if f.omitted]
        if drawn:
            md += ["### Figures", ""]
            body.append("<h3>Figures</h3>")
        for f in drawn:
            rel = f"figures/{f.path.name}"
            md += [f"#### {f.title}", "", f"![{f.title}]({rel})", "", f.caption, ""]
            body.append(f"<figure><img src=\"{html.escape(rel)}\" alt=\"{html.escape(f.title)}\">"
                        f"<figcaption><b>{html.escape(f.title)}.</b> {html.escape(f.caption)}</figcaption></figure>")
        if left:
            md += ["Figures left out (their data is not in these runs):", ""]
            md += [f"- {f.title}: {f.omitted}" for f in left] + [""]
            body.append("<p>Figures left out (their data is not in these runs):</p><ul>"
                        + "".join(f"<li>{html.escape(f.title)}: {html.escape(f.omitted)}</li>" for f in left) + "</ul>")
    if notes:
        md += ["## Notes on the runs", ""] + [f"- {n}" for n in notes] + [""]
        body.append("<h2>Notes on the runs</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")

    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
             "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f2f2f2}"
             "tbody tr:nth-child(even){background:#fafafa}figure{margin:1.5em 0}img{max-width:100%}"
             "figcaption{font-size:0.9em;color:#444}code{background:#f4f4f4;padding:0 3px}")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{style}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    (out_dir / "report.html").write_text(page)
    fields, rows = csv_rows(runs)
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return {
        "runs": len(runs), "tasks": list(tasks), "notes": notes,
        "figures": [str(f.path) for s in sections for f in s["figures"] if f.path],
        "omitted": {f"{s['task']}:{f.key}": f.omitted for s in sections for f in s["figures"] if f.omitted},
        "report_md": str(out_dir / "report.md"), "report_html": str(out_dir / "report.html"),
        "results_csv": str(out_dir / "results.csv"),
    }


# --------------------------------------------------------------------------------------------
# Paired comparison of two evaluations
# --------------------------------------------------------------------------------------------


#: metrics where a smaller value is the better one
LOWER_IS_BETTER = ("ref_nll",)


def _eval_dir(path: Path) -> Path:
    """A run directory's eval/ folder, or the eval folder itself."""
    for cand in (path / "eval", path):
        if (cand / "predictions.jsonl").is_file() and (cand / "results.json").is_file():
            return cand
    raise ValueError(f"{path} holds no evaluation (eval/predictions.jsonl + eval/results.json): "
                     f"run `tunelab eval {path}` first")


def compare_evals(a: Path, b: Path, metrics: Optional[list[str]] = None, n_resamples: int = 1000,
                  seed: int = 0) -> dict[str, Any]:
    """B − A per metric on the examples both evaluated, with a paired bootstrap CI.

    Pairing (the same resampled examples for both) removes the between-question variance that
    dominates small eval sets, so a difference can be significant even where the two unpaired
    intervals overlap. ``p_b_not_better`` is the share of resamples where B does not beat A.
    """
    from tunelab.metrics import paired_bootstrap
    from tunelab.tasks import get_task
    from tunelab.utils import read_jsonl

    dirs = [_eval_dir(Path(a)), _eval_dir(Path(b))]
    results = [json.loads((d / "results.json").read_text()) for d in dirs]
    tasks = [r.get("task") for r in results]
    if tasks[0] != tasks[1]:
        raise ValueError(f"{dirs[0]} evaluated task {tasks[0]!r} and {dirs[1]} task {tasks[1]!r}: "
                         f"only evaluations of one task compare")
    if results[0].get("split") != results[1].get("split"):
        raise ValueError(f"the two evaluations used different splits ({results[0].get('split')} vs {results[1].get('split')})")
    fields: dict[str, Any] = dict(get_task(tasks[0]).example_metrics)
    # eval's pooled reference loss: summed NLL over summed tokens, per example (numerator, denominator)
    fields["ref_nll"] = ("ref_nll_sum", "ref_tokens")
    wanted = metrics or list(fields)
    unknown = [m for m in wanted if m not in fields]
    if unknown:
        raise ValueError(f"no per-example values of {', '.join(unknown)} for task {tasks[0]} "
                         f"(comparable: {', '.join(fields)})")
    preds = [{str(row["id"]): row for row in read_jsonl(d / "predictions.jsonl")} for d in dirs]
    common = [i for i in preds[0] if i in preds[1]]
    if not common:
        raise ValueError(f"{dirs[0]} and {dirs[1]} share no example ids: they evaluated different examples")
    out: dict[str, Any] = {"task": tasks[0], "a": str(dirs[0].parent if dirs[0].name == "eval" else dirs[0]),
                           "b": str(dirs[1].parent if dirs[1].name == "eval" else dirs[1]),
                           "examples": len(common), "only_in_a": len(preds[0]) - len(common),
                           "only_in_b": len(preds[1]) - len(common), "n_resamples": n_resamples, "seed": seed,
                           "metrics": {}, "skipped": {}}
    for metric in wanted:
        names = fields[metric] if isinstance(fields[metric], tuple) else (fields[metric],)
        missing = sum(1 for i in common for p in preds for n in names if not isinstance(p[i].get(n), (int, float)))
        if missing:
            hint = " (evaluated before tunelab stored it; re-run tunelab eval)" if metric == "ref_nll" else ""
            out["skipped"][metric] = f"'{', '.join(names)}' is missing from {missing} predictions{hint}"
            continue
        if len(names) == 2:
            # a pooled ratio (sum of numerators / sum of denominators): with the same denominators in A
            # and B (the same references, tokenized alike), it is the mean of numerator_i / mean denominator
            num, den = names
            if any(preds[0][i][den] != preds[1][i][den] for i in common):
                out["skipped"][metric] = f"the two runs tokenized the references differently ('{den}' differs)"
                continue
            scale = len(common) / max(sum(preds[0][i][den] for i in common), 1)
            va = [float(preds[0][i][num]) * scale for i in common]
            vb = [float(preds[1][i][num]) * scale for i in common]
        else:
            va = [float(preds[0][i][names[0]]) for i in common]
            vb = [float(preds[1][i][names[0]]) for i in common]
        lower_is_better = metric in LOWER_IS_BETTER
        sign = -1.0 if lower_is_better else 1.0  # "B not better" counts resamples where B's loss is not lower
        diff = paired_bootstrap([sign * v for v in va], [sign * v for v in vb], n_resamples=n_resamples, seed=seed)
        lo, hi = sorted(sign * c for c in diff["ci"])
        out["metrics"][metric] = {"a": sum(va) / len(va), "b": sum(vb) / len(vb), "b_minus_a": sign * diff["mean_diff"],
                                  "ci95": [lo, hi], "p_b_not_better": diff["p_not_better"],
                                  "lower_is_better": lower_is_better}
    return out


def format_comparison(cmp: dict[str, Any]) -> str:
    lines = [f"{cmp['task']}: B = {cmp['b']}  vs  A = {cmp['a']}",
             f"{cmp['examples']} examples evaluated by both (paired bootstrap, {cmp['n_resamples']} resamples, seed {cmp['seed']})"]
    if cmp["only_in_a"] or cmp["only_in_b"]:
        lines.append(f"left out: {cmp['only_in_a']} examples only in A, {cmp['only_in_b']} only in B")
    header = ["metric", "A", "B", "B − A", "95% CI", "P(B not better)"]
    cells = [[m + (" (lower is better)" if v["lower_is_better"] else ""), f"{v['a']:.4f}", f"{v['b']:.4f}", f"{v['b_minus_a']:+.4f}",
              f"[{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]", f"{v['p_b_not_better']:.3f}"]
             for m, v in cmp["metrics"].items()]
    lines.append(markdown_table(header, cells))
    lines += [f"{m}: not compared, {why}" for m, why in cmp["skipped"].items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def cmd_report(args) -> int:
    from tunelab.utils import log

    overrides = {}
    for item in args.metric or []:
        task, sep, metric = item.partition("=")
        if not sep or not task or not metric:
            raise ValueError(f"--metric '{item}' must be TASK=METRIC (e.g. --metric gsm8k=accuracy_flexible)")
        overrides[task] = metric
    done = write_report([Path(p) for p in args.runs], Path(args.out), overrides, args.title)
    log.info(f"{done['runs']} runs, tasks: {', '.join(done['tasks'])}; {len(done['figures'])} figures, "
             f"{len(done['omitted'])} left out (see report.md)")
    for note in done["notes"]:
        log.info(f"note: {note}")
    log.info(f"-> {done['report_md']}, {done['report_html']}, {done['results_csv']}")
    return 0


def cmd_compare(args) -> int:
    cmp = compare_evals(Path(args.a), Path(args.b), args.metric, args.resamples, args.seed)
    print(format_comparison(cmp))
    if args.json:
        from tunelab.utils import atomic_write_json

        atomic_write_json(Path(args.json), cmp)
    return 0


def add_cli(sub) -> None:
    c = sub.add_parser(
        "compare", help="B vs A example by example: each metric's difference with a paired bootstrap CI",
        description="Compare two evaluations of the same task (run directories with eval/, or eval folders) on "
        "the examples both evaluated: per metric, the means, B − A, its 95%% paired-bootstrap interval and the "
        "share of resamples where B does not beat A.",
    )
    c.add_argument("a", metavar="A", help="the reference run (e.g. the base model or LoRA)")
    c.add_argument("b", metavar="B", help="the run compared with it")
    c.add_argument("--metric", action="append", help="compare only this metric (repeatable); default: all")
    c.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    c.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    c.add_argument("--json", metavar="FILE", help="also write the comparison as JSON")
    c.set_defaults(handler=cmd_compare)
    p = sub.add_parser(
        "report", help="tables and figures from run directories -> REPORT/report.md, report.html, results.csv",
        description="Read run directories (config.yaml, results.json, eval/results.json; BASE marks a baseline) "
        "under RUNS_DIR and write a table per task (quality mean ± std over seeds, trainable params, peak memory, "
        "time, tokens/s), the study's figures as PNGs, report.md, report.html and results.csv (one row per run).",
    )
    p.add_argument("runs", nargs="+", metavar="RUNS_DIR", help="folders holding run directories (searched recursively)")
    p.add_argument("--out", required=True, metavar="REPORT", help="output folder (created)")
    p.add_argument("--metric", action="append", metavar="TASK=METRIC",
                   help="quality metric of a task instead of its primary one (repeatable)")
    p.add_argument("--title", default="tunelab report", help="report title")
    p.set_defaults(handler=cmd_report)

"""The report's figures: one PNG per (task, figure), drawn with matplotlib; missing data leaves a figure out.

Each figure function draws into ``path`` and returns its caption, or raises :class:`Omit` with the
reason its data is not in these runs (report.md lists it). Methods are coloured and ordered by
their classes (``display_order``; a method that trains nothing, the untrained base model, is grey
and drawn as a reference line); "vs rank" figures use each method's ``rank_key``. The loss curves (train loss and held-out ref_nll vs
step, per run and overlaid) are drawn by :mod:`.curves`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from tunelab.experiments.report.rows import (
    GIB,
    Row,
    is_baseline,
    method_rank,
    rank_key,
    rank_methods,
    settings_text,
    task_common,
)
from tunelab.experiments.report.runs import RunRecord


class Omit(Exception):
    """A figure whose data is missing: left out, with the reason in report.md."""


@dataclass
class Figure:
    key: str
    title: str
    path: Optional[Path] = None
    caption: str = ""
    omitted: Optional[str] = None
    #: its file name in REPORT/figures/ (whether drawn or left out: a left-out figure's old file is removed)
    file: str = ""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _method_colors(methods: list[str]) -> dict[str, Any]:
    plt = _pyplot()
    palette = plt.get_cmap("tab10").colors
    ordered = sorted(set(methods), key=method_rank)
    colors, i = {}, 0
    for m in ordered:
        if is_baseline(m):
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
        if r.is_baseline:
            mean = r.quality(metric)[0]
            if mean is not None:
                out.append((r.label(pretty=True).replace(r.method, f"untrained {r.method}", 1), mean))
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


def _lines(rows: list[Row], metric_get: Callable[[RunRecord], Any],
           x_key_of: Callable[[Row], Optional[str]]) -> dict[str, list[tuple[float, Row]]]:
    """Series for 'y vs x': one line per (method, other settings), kept when it has 2+ x values.

    ``x_key_of`` names the row's setting on the x axis (None: the row is not on this figure).
    """
    lines: dict[str, list[tuple[float, Row]]] = {}
    for r in rows:
        x_key = None if r.is_baseline else x_key_of(r)
        if x_key is None:
            continue
        x = r.setting(x_key)
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
    if not any(not r.is_baseline for r in shown):
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


def _rank_setting(r: Row) -> Optional[str]:
    return rank_key(r.method)


def fig_quality_vs_rank(task, rows, metric, path, colors) -> str:
    get = lambda x: x.metrics.get(metric)  # noqa: E731
    lines = _lines(rows, get, _rank_setting)
    if not lines:
        ranks = {m: sorted({r.setting(rank_key(m)) for r in rows if r.method == m}, key=str) for m in rank_methods()}
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


def _fraction_setting(r: Row) -> Optional[str]:
    return "data.train_fraction"


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
    lines = _lines(rows, get, _fraction_setting)
    if not lines:
        found = sorted({r.setting("data.train_fraction") for r in rows if not r.is_baseline}, key=str)
        raise Omit(f"needs runs of one method on {task} at 2+ values of data.train_fraction with the other settings "
                   f"equal (found: {', '.join(map(str, found)) or 'none'})")
    _quality_line_figure(lines, get, rows, metric, colors, path,
                         "fraction of the training split used (data.train_fraction)",
                         f"{task}: quality vs training-data fraction")
    return "Quality as the share of training data grows; one line per method and setting."


def _epochs_setting(r: Row) -> Optional[str]:
    if r.setting("train.max_steps") in (-1, None):
        return "train.epochs"
    return None  # step-limited runs: their epochs setting was not what they trained


def fig_quality_vs_epochs(task, rows, metric, path, colors) -> str:
    get = lambda x: x.metrics.get(metric)  # noqa: E731
    lines = _lines(rows, get, _epochs_setting)
    if not lines:
        epoch_based = [r for r in rows if not r.is_baseline and _epochs_setting(r)]
        found = sorted({r.setting("train.epochs") for r in epoch_based} - {None}, key=str)
        raise Omit(f"needs epoch-based runs (train.max_steps=-1) of one method on {task} at 2+ values of "
                   f"train.epochs with the other settings equal (found: {', '.join(map(str, found)) or 'none'})")
    _quality_line_figure(lines, get, rows, metric, colors, path, "training epochs", f"{task}: quality vs epochs")
    return "Quality after each number of epochs; one line per method and setting."


def fig_memory_vs_rank(task, rows, metric, path, colors) -> str:
    get = lambda x: x.train.get("peak_mem_bytes")  # noqa: E731
    lines = _lines(rows, get, _rank_setting)
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
    shown = [r for r in rows if not r.is_baseline and (r.values(lambda x: x.train.get("train_time_s"))
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
    # the part of it the training state holds (optimizer state + trainable weights), where runs record it
    state = [r.stat(lambda x: (x.train.get("optimizer_state_bytes") or 0) + (x.train.get("trainable_param_bytes") or 0)
                    if x.train.get("optimizer_state_bytes") is not None else None)[0] for r in shown]
    if any(s for s in state):
        a2.barh(ys, [(s or 0.0) / GIB for s in state], color="none", edgecolor="black", hatch="//",
                label="optimizer state + trainable weights")
        a2.legend(fontsize=7, loc="lower right")
    a2.set_xlabel(_memory_label(shown))
    fig.suptitle(f"{task}: training time and peak memory per method")
    _save(fig, path)
    return ("Time of the optimizer steps and peak memory of each training run (mean over seeds); the hatched part "
            "is what the training state itself holds (optimizer state and trainable weights), where runs record it.")


def fig_quality_vs_params(task, rows, metric, path, colors) -> str:
    pts = [r for r in rows if not r.is_baseline and r.quality(metric)[0] is not None
           and (r.stat(lambda x: x.train.get("trainable_params"))[0] or 0) > 0]
    if len(pts) < 2:
        raise Omit(f"needs 2+ trained runs of {task} with {metric} and trainable-parameter counts")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for method in sorted({r.method for r in pts}, key=method_rank):
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
        fig = Figure(key, title, file=f"{_safe(task)}-{key}.png")
        path = fig_dir / fig.file
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
    from tunelab.experiments.report.curves import loss_curve_figures  # it draws with this module's helpers

    return out + loss_curve_figures(task, rows, fig_dir)



"""Loss curves for the report: train loss and held-out ``ref_nll`` against the optimizer step.

Read from each run's ``metrics.jsonl`` (through :class:`~tunelab.rundir.RunDir`): training lines
carry ``loss``, evaluation lines (``train.eval_steps``, :mod:`tunelab.train.evaluator`) carry
``eval/ref_nll``; results.json's ``eval`` block gives the best step. One figure per trained run,
plus one overlaying every run of the task (a sweep's points side by side).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from tunelab.experiments.report.figures import Figure, Omit, _pyplot, _safe, _save
from tunelab.experiments.report.rows import Row, method_rank
from tunelab.experiments.report.runs import RunRecord
from tunelab.rundir import RunDir


@dataclass
class Curves:
    """One run's logged curves: (step, value) pairs from its metrics.jsonl, and its results.json eval block."""

    name: str
    train: list[tuple[int, float]]
    held_out: list[tuple[int, float]]
    eval_summary: dict

    @property
    def drawable(self) -> bool:
        return bool(self.train or self.held_out)


def read_curves(rec: RunRecord) -> Curves:
    """Train loss (training lines) and held-out ref_nll (``eval/ref_nll`` lines) of a run; bad lines are skipped."""
    run = RunDir(rec.path)
    train, held = [], []
    if run.metrics_file.is_file():
        for line in run.metrics_file.read_text().splitlines():
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a killed run
            for key, out in (("loss", train), ("eval/ref_nll", held)):
                v = row.get(key)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    out.append((step, float(v)))
    summary = (run.results() or {}).get("eval") or {}
    return Curves(rec.name, train, held, summary if isinstance(summary, dict) else {})


def _draw_curves(ax, curves: Curves, color=None, label: str = "", faint: bool = False) -> None:
    if curves.train:
        ax.plot(*zip(*curves.train), color=color or "tab:blue", linewidth=0.9, alpha=0.45 if faint else 0.8,
                label=f"{label}train loss".strip())
    if curves.held_out:
        ax.plot(*zip(*curves.held_out), color=color or "tab:orange", marker="o", markersize=3, linewidth=1.6,
                label=f"{label}held-out ref_nll".strip())


def fig_loss_curve(rec: RunRecord, curves: Curves, path: Path) -> str:
    """One run: train loss and held-out ref_nll vs optimizer step, its best step marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    _draw_curves(ax, curves)
    best, artifact = curves.eval_summary.get("best_step"), curves.eval_summary.get("artifact_step")
    if isinstance(best, int):
        ax.axvline(best, color="0.4", linestyle=":", linewidth=1.2,
                   label=f"best held-out step {best}" + (" (the artifact)" if artifact == best else ""))
    ax.set_xlabel("optimizer step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("loss (nats per target token)")
    ax.set_title(f"{rec.task}: {rec.name} ({rec.method})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    what = "train loss (per logged window)" + (" and held-out ref_nll (train.eval_steps)" if curves.held_out else
                                               "; no held-out loss was logged (train the run with train.eval_steps=N)")
    return f"{rec.name}: {what} against the optimizer step."


def fig_loss_curves_overlay(task: str, runs: list[tuple[RunRecord, Curves]], path: Path) -> str:
    """Every run of the task: train loss (left) and held-out ref_nll (right) vs step, one colour per run."""
    shown = [(r, c) for r, c in runs if c.drawable]
    if len(shown) < 2:
        raise Omit(f"needs 2+ trained runs of {task} with a metrics.jsonl (found {len(shown)})")
    plt = _pyplot()
    with_held = any(c.held_out for _, c in shown)
    fig, axes = plt.subplots(1, 2 if with_held else 1, figsize=(12 if with_held else 7, 4.5), squeeze=False)
    palette = plt.get_cmap("tab10" if len(shown) <= 10 else "tab20").colors
    for i, (rec, c) in enumerate(sorted(shown, key=lambda rc: (method_rank(rc[0].method), rc[0].name))):
        color = palette[i % len(palette)]
        if c.train:
            axes[0][0].plot(*zip(*c.train), color=color, linewidth=1.0, label=rec.name)
        if with_held and c.held_out:
            axes[0][1].plot(*zip(*c.held_out), color=color, marker="o", markersize=3, linewidth=1.4, label=rec.name)
    for ax, what in zip(axes[0], ("train loss", "held-out ref_nll")):
        ax.set_xlabel("optimizer step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(f"{what} (nats per target token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7 if len(shown) <= 10 else 5)
    fig.suptitle(f"{task}: loss curves of {len(shown)} runs")
    _save(fig, path)
    return ("Train loss" + (" and held-out ref_nll" if with_held else "") + " of every run against the optimizer "
            "step, one colour per run (the same in both panels).")


def loss_curve_figures(task: str, rows: list[Row], fig_dir: Path) -> list[Figure]:
    """The overlay of the task's runs, then one figure per trained run (baselines have no curves)."""
    runs = [(rec, read_curves(rec)) for r in rows if not r.is_baseline for rec in r.runs]
    overlay = Figure("loss_curves", "Loss curves of the runs overlaid", file=f"{_safe(task)}-loss_curves.png")
    out = [overlay]
    try:
        overlay.caption = fig_loss_curves_overlay(task, runs, fig_dir / overlay.file)
        overlay.path = fig_dir / overlay.file
    except Omit as exc:
        overlay.omitted = str(exc)
    used: set[str] = set()
    for rec, curves in runs:
        if not curves.drawable:
            continue
        name = _safe(rec.name)
        while name in used:  # runs of the same name under different roots
            name += "_"
        used.add(name)
        fig = Figure(f"loss_curve:{rec.name}", f"Loss curve of {rec.name}", file=f"{_safe(task)}-loss-{name}.png")
        fig.caption = fig_loss_curve(rec, curves, fig_dir / fig.file)
        fig.path = fig_dir / fig.file
        out.append(fig)
    return out

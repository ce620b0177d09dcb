"""Writing a report: ``REPORT/report.md``, ``report.html`` (same content, figures embedded by relative
path), ``figures/<task>-<figure>.png`` and ``results.csv`` (one row per run).

The markdown and HTML are put together by hand: a page of tables and images needs no templating
library, and the same cells go to both.

REPORT is claimed as a report folder (:func:`tunelab.rundir.claim_folder`): it is new or empty, a
report tunelab wrote, or the user passed ``--overwrite``. The report is written into a staging
folder inside it and its files moved into place at the end, so a failed report leaves the previous
one as it was (and no temp folder behind); only the report's own files are replaced.
"""

from __future__ import annotations

import csv
import html
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from tunelab.experiments.report.figures import make_figures
from tunelab.experiments.report.rows import GIB, build_rows, method_rank, primary_metric, table
from tunelab.experiments.report.runs import RunRecord, collect_runs
from tunelab.rundir import MARKER_FILE, RunDir, claim_folder
from tunelab.utils import make_temp_dir

#: the files a report writes in REPORT (and its figures in REPORT/figures/)
REPORT_FILES = ("report.md", "report.html", "results.csv")
FIGURES_DIR = "figures"

CSV_FIRST = [
    "run", "path", "task", "method", "is_base", "seed", "primary_metric", "quality", "eval_n",
    "trainable_params", "total_params", "trainable_pct", "peak_mem_bytes", "peak_mem_gib", "peak_mem_kind",
    "train_time_s", "wall_time_s", "train_tokens_per_s", "final_loss", "steps", "epochs_completed",
    "stopped", "heldout_best_step", "heldout_best_ref_nll", "artifact_step",
]
_STYLE = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
          "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
          "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f2f2f2}"
          "tbody tr:nth-child(even){background:#fafafa}figure{margin:1.5em 0}img{max-width:100%}"
          "figcaption{font-size:0.9em;color:#444}code{background:#f4f4f4;padding:0 3px}")


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
# CSV
# --------------------------------------------------------------------------------------------


def _held_out(rec: RunRecord) -> dict[str, Any]:
    """The held-out evaluation during training (results.json's ``eval`` block; train.eval_steps), if any."""
    results = {} if rec.is_base else (RunDir(rec.path).results() or {})
    ev = results.get("eval") if isinstance(results.get("eval"), dict) else {}
    return {"stopped": results.get("stopped"), "heldout_best_step": ev.get("best_step"),
            "heldout_best_ref_nll": ev.get("best_ref_nll"), "artifact_step": ev.get("artifact_step")}


def _csv_row(rec: RunRecord) -> dict[str, Any]:
    t = rec.train
    return {**_held_out(rec), 
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


def csv_rows(runs: list[RunRecord]) -> tuple[list[str], list[dict]]:
    """(columns, one mapping per run): the fixed columns, then every metric and every config key."""
    out = []
    metric_names: list[str] = []
    config_keys: list[str] = []
    for rec in sorted(runs, key=lambda r: (r.task, method_rank(r.method), r.name)):
        row = _csv_row(rec)
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


def _write_csv(runs: list[RunRecord], path: Path) -> None:
    fields, rows = csv_rows(runs)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# --------------------------------------------------------------------------------------------
# report.md and report.html
# --------------------------------------------------------------------------------------------


def _sections(runs: list[RunRecord], metric_overrides: dict[str, str], fig_dir: Path) -> list[dict[str, Any]]:
    """Per task: its metric, rows, table and figures (a --metric for a task or metric not there is an error)."""
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
    return sections


def _intro(runs: list[RunRecord], roots: list[Path], n_tasks: int) -> str:
    n_base = sum(r.is_base for r in runs)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    sources = ", ".join(str(r) for r in roots)
    return (
        f"Generated {stamp} from {sources}: {len(runs)} runs ({len(runs) - n_base} trained, {n_base} baseline) "
        f"in {n_tasks} task(s). Quality is each task's primary metric on its evaluation split, the mean ± "
        "sample standard deviation over seeds (one value when a setting ran with one seed). Tasks are never "
        "averaged together. Peak memory: GPU max allocated for CUDA runs, peak process RSS for CPU runs. "
        "Train time counts the optimizer steps only (no loading or saving)."
    )


def _section_text(sec: dict[str, Any]) -> tuple[list[str], list[str]]:
    """One task's markdown lines and HTML parts."""
    task, metric = sec["task"], sec["metric"]
    md = [f"## {task}", "", f"Primary metric: `{metric}`." if metric else "No evaluation results yet.", ""]
    md += [markdown_table(sec["header"], sec["cells"]), ""]
    body = [f"<h2>{html.escape(task)}</h2>",
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
    return md, body


def _write_pages(out_dir: Path, title: str, intro: str, sections: list[dict[str, Any]], notes: list[str]) -> None:
    md = [f"# {title}", "", intro, ""]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
    for sec in sections:
        sec_md, sec_body = _section_text(sec)
        md += sec_md
        body += sec_body
    if notes:
        md += ["## Notes on the runs", ""] + [f"- {n}" for n in notes] + [""]
        body.append("<h2>Notes on the runs</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    (out_dir / "report.html").write_text(page)


# --------------------------------------------------------------------------------------------
# The report folder: claimed, written in a staging folder, published file by file
# --------------------------------------------------------------------------------------------


def _is_unmarked_report(out_dir: Path) -> bool:
    """A report an older tunelab wrote (before the marker): report.md and only the report's files."""
    if not (out_dir / "report.md").is_file() or (out_dir / MARKER_FILE).exists():
        return False
    for p in out_dir.iterdir():
        figures = p.name == FIGURES_DIR and p.is_dir() and all(f.suffix == ".png" and f.is_file() for f in p.iterdir())
        if not (figures or (p.name in REPORT_FILES and p.is_file())):
            return False
    return True


def claim_report_folder(out_dir: Path, overwrite: bool = False) -> None:
    """Make ``out_dir`` a report folder or refuse (NotOurs, a FileExistsError naming the fix)."""
    claim_folder(out_dir, "report", overwrite=overwrite or _is_unmarked_report(out_dir))


def _publish(stage: Path, out_dir: Path, sections: list[dict[str, Any]]) -> None:
    """Move the staged figures, then the CSV and the pages, into ``out_dir``; a figure left out loses its old file."""
    fig_dir = out_dir / FIGURES_DIR
    fig_dir.mkdir(exist_ok=True)
    published = set()
    for sec in sections:
        for f in sec["figures"]:
            final = fig_dir / f.file
            published.add(f.file)
            if f.path:
                os.replace(f.path, final)
                f.path = final
            else:
                final.unlink(missing_ok=True)  # never leave a stale figure from an earlier report
    for old in fig_dir.glob("*-loss-*.png"):  # per-run loss curves of runs no longer in the report
        if old.name not in published:
            old.unlink(missing_ok=True)
    for name in reversed(REPORT_FILES):
        os.replace(stage / name, out_dir / name)


def _unclaim(out_dir: Path) -> None:
    """Remove a report folder this call created, when a failure left nothing in it but the marker."""
    (out_dir / MARKER_FILE).unlink(missing_ok=True)
    try:
        out_dir.rmdir()
    except OSError:
        pass


def write_report(roots: list[Path], out_dir: Path, metric_overrides: Optional[dict[str, str]] = None,
                 title: str = "tunelab report", overwrite: bool = False) -> dict[str, Any]:
    """Write report.md, report.html, figures/*.png and results.csv; returns what was written.

    ``out_dir`` must be new or empty, a report tunelab wrote, or ``overwrite`` (see the module docstring).
    """
    runs, notes = collect_runs(roots)
    if not runs:
        raise ValueError("no run has anything to report:\n" + "\n".join(f"  - {n}" for n in notes))
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    claim_report_folder(out_dir, overwrite)
    stage = make_temp_dir(out_dir, ".report-")
    try:
        sections = _sections(runs, dict(metric_overrides or {}), stage / FIGURES_DIR)
        _write_pages(stage, title, _intro(runs, roots, len(sections)), sections, notes)
        _write_csv(runs, stage / "results.csv")
        _publish(stage, out_dir, sections)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            _unclaim(out_dir)
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return {
        "runs": len(runs), "tasks": [s["task"] for s in sections], "notes": notes,
        "figures": [str(f.path) for s in sections for f in s["figures"] if f.path],
        "omitted": {f"{s['task']}:{f.key}": f.omitted for s in sections for f in s["figures"] if f.omitted},
        "report_md": str(out_dir / "report.md"), "report_html": str(out_dir / "report.html"),
        "results_csv": str(out_dir / "results.csv"),
    }

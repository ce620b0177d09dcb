"""``tunelab report RUNS_DIR... --out REPORT``: tables, figures and a CSV from run directories."""

from __future__ import annotations

from pathlib import Path

from tunelab.experiments.report import write_report
from tunelab.utils import log


def _metric_overrides(items: list[str]) -> dict[str, str]:
    """``--metric TASK=METRIC`` options as {task: metric}."""
    overrides = {}
    for item in items:
        task, sep, metric = item.partition("=")
        if not sep or not task or not metric:
            raise ValueError(f"--metric '{item}' must be TASK=METRIC (e.g. --metric gsm8k=accuracy_flexible)")
        overrides[task] = metric
    return overrides


def cmd_report(args) -> int:
    done = write_report([Path(p) for p in args.runs], Path(args.out), _metric_overrides(args.metric or []), args.title,
                        overwrite=args.overwrite)
    log.info(f"{done['runs']} runs, tasks: {', '.join(done['tasks'])}; {len(done['figures'])} figures, "
             f"{len(done['omitted'])} left out (see report.md)")
    for note in done["notes"]:
        log.info(f"note: {note}")
    log.info(f"-> {done['report_md']}, {done['report_html']}, {done['results_csv']}")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser(
        "report", help="tables and figures from run directories -> REPORT/report.md, report.html, results.csv",
        description="Read run directories (config.yaml, results.json, eval/results.json; BASE marks a baseline) "
        "under RUNS_DIR and write a table per task (quality mean ± std over seeds, trainable params, peak memory, "
        "time, tokens/s), the study's figures as PNGs, report.md, report.html and results.csv (one row per run).",
    )
    p.add_argument("runs", nargs="+", metavar="RUNS_DIR", help="folders holding run directories (searched recursively)")
    p.add_argument("--out", required=True, metavar="REPORT",
                   help="output folder: new, empty, or a report tunelab wrote (its report files are replaced)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into REPORT although it holds other files (only the report's own files are replaced)")
    p.add_argument("--metric", action="append", metavar="TASK=METRIC",
                   help="quality metric of a task instead of its primary one (repeatable)")
    p.add_argument("--title", default="tunelab report", help="report title")
    p.set_defaults(handler=cmd_report)

"""Reports from run directories: a table per task, the study's figures, and a CSV of every run; and
paired comparisons of two evaluations.

``tunelab report RUNS_DIR... --out REPORT`` reads run directories only (nothing is recomputed):
:mod:`.runs` reads them into records, :mod:`.rows` groups the runs that differ only in their seed
into table rows, :mod:`.figures` draws the figures whose data is there, :mod:`.write` writes
``REPORT/report.md``, ``report.html`` and ``results.csv``. ``tunelab compare A B`` is
:mod:`.compare`.
"""

from tunelab.experiments.report.compare import compare_evals, format_comparison
from tunelab.experiments.report.figures import FIGURES, Figure, make_figures
from tunelab.experiments.report.rows import (
    GIB,
    Row,
    build_rows,
    fmt_mean_std,
    fmt_params,
    is_baseline,
    method_rank,
    settings_text,
    table,
)
from tunelab.experiments.report.runs import SCHEMA_VERSION, RunRecord, collect_runs, find_run_dirs, load_run
from tunelab.experiments.report.write import csv_rows, markdown_table, write_report

__all__ = [
    "SCHEMA_VERSION", "GIB", "RunRecord", "Row", "Figure", "FIGURES", "find_run_dirs", "load_run", "collect_runs",
    "build_rows", "is_baseline", "method_rank", "settings_text", "fmt_mean_std", "fmt_params", "table",
    "make_figures", "csv_rows", "markdown_table", "write_report", "compare_evals", "format_comparison",
]

"""Experiments: sweeps of many runs (spec → naming → state → runner), and reports and paired
comparisons read from run directories (:mod:`tunelab.experiments.report`).

The sweep API a launcher or a test needs is re-exported here::

    from tunelab.experiments import load_sweep, pending_indices, point_command, run_sweep
"""

from tunelab.experiments.runner import Interrupted, SweepSummary, point_command, run_point, run_sweep, stage_commands
from tunelab.experiments.spec import Sweep, SweepError, SweepFile, SweepPoint, load_sweep
from tunelab.experiments.state import PointStatus, pending_indices, point_rows, point_status

__all__ = [
    "SweepError", "SweepFile", "Sweep", "SweepPoint", "PointStatus", "SweepSummary", "Interrupted",
    "load_sweep", "point_status", "point_rows", "pending_indices", "point_command", "stage_commands",
    "run_point", "run_sweep",
]

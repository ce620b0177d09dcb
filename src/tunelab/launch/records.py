"""The job records of a run directory (or a sweep's out_dir): ``slurm.json`` and the ``slurm/`` folder.

``submit`` appends one record per job it queues; ``status`` reads them back. Kept apart from
both so that neither imports the other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

#: every job submitted for the folder: id, kind, dependency, log, script text
RECORD_FILE = "slurm.json"
#: the rendered scripts (``<kind>.sbatch``) and, by default, the job logs
JOBS_DIR = "slurm"


def read_records(record_dir: Path) -> dict:
    path = record_dir / RECORD_FILE
    if not path.is_file():
        return {"jobs": []}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); move it away to submit again") from None
    data.setdefault("jobs", [])
    return data


def log_path(pattern: Path, job_id: str, task: Optional[str] = None) -> str:
    """A job's log file from sbatch's ``--output`` pattern (``%j``, ``%A``; ``%a``: the array task or ``*``).

    Only the file name is tunelab's pattern: a ``%`` in the folder is the folder's own (the script
    writes it as ``%%``, which SLURM reads as a plain ``%``).
    """
    pattern = Path(pattern)
    name = pattern.name.replace("%A", job_id).replace("%j", job_id)
    return str(pattern.with_name(name.replace("%a", task if task is not None else "*")))

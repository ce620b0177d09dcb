"""``tunelab status``: a run's progress and the SLURM state of the jobs recorded in its ``slurm.json``.

SLURM has no Python API on a login node, so its command-line tools are parsed: ``scontrol -o show
job`` while SLURM remembers the job, then ``sacct`` (or the job-completion log, ``sacct -c``, on a
cluster without accounting).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tunelab.launch.records import RECORD_FILE, log_path, read_records
from tunelab.rundir import RunDir

#: Job states after which SLURM will not run the job again by itself.
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED",
})


@dataclass
class JobState:
    """SLURM's view of one job or array task."""

    job_id: str  # "123" or "123_4"
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, ... or UNKNOWN
    exit_code: Optional[str] = None  # "rc:signal"
    reason: Optional[str] = None
    array_task: Optional[str] = None
    log: Optional[str] = None
    restarts: Optional[int] = None
    source: str = ""  # which command said so

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES


_KV = re.compile(r"(\S+?)=(.*?)(?= \S+?=|$)")


def _scontrol_jobs(job_id: str) -> Optional[list[dict]]:
    if shutil.which("scontrol") is None:
        return None
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        return None  # "Invalid job id specified": SLURM forgot it (MinJobAge); ask sacct
    return [dict(_KV.findall(line.strip())) for line in proc.stdout.splitlines() if line.strip()]


def _sacct_jobs(job_id: str) -> list[JobState]:
    if shutil.which("sacct") is None:
        return []
    fields = "JobID,State,ExitCode"
    proc = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", fields], capture_output=True, text=True)
    source = "sacct"
    if proc.returncode != 0 or "accounting storage is disabled" in (proc.stderr + proc.stdout).lower():
        # No accounting database: the job-completion log (sacct -c) still knows finished plain jobs.
        proc = subprocess.run(["sacct", "-c", "-n", "-P", "-j", job_id, "-o", fields], capture_output=True, text=True)
        source = "sacct -c"
    rows: dict[str, JobState] = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 3 or not parts[0]:
            continue
        jid, state, code = parts[0], parts[1].split()[0], parts[2]
        task = jid.split("_", 1)[1] if "_" in jid else None
        rows[jid] = JobState(jid, state, code, None, task, None, None, source)  # later lines win (requeues)
    return list(rows.values())


def job_states(job_id: str) -> list[JobState]:
    """Current state of a job (every task of an array), from scontrol, else sacct; [] when SLURM is absent."""
    recs = _scontrol_jobs(job_id)
    if recs:
        out = []
        for r in recs:
            task = r.get("ArrayTaskId")
            jid = f"{r.get('ArrayJobId')}_{task}" if task and r.get("ArrayJobId") else r.get("JobId", job_id)
            restarts = r.get("Restarts")
            out.append(JobState(jid, r.get("JobState", "UNKNOWN"), r.get("ExitCode"), r.get("Reason"), task,
                                r.get("StdOut"), int(restarts) if restarts and restarts.isdigit() else None, "scontrol"))
        return sorted(out, key=lambda j: (len(j.job_id), j.job_id))
    rows = _sacct_jobs(job_id)
    if rows:
        return rows
    if shutil.which("scontrol") is None and shutil.which("sacct") is None:
        return []
    return [JobState(job_id, "UNKNOWN", reason="neither scontrol nor sacct knows this job (accounting off and "
                     "the job finished a while ago)", source="none")]


def _tail_lines(path: str | None, n: int = 12) -> list[str]:
    if not path:
        return []
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-n:]


def run_status(target: Path) -> dict:
    """A run's (or a sweep folder's) progress and the SLURM state of its recorded jobs."""
    target = target.absolute()
    info: dict[str, Any] = {"path": str(target), "jobs": []}
    if RunDir(target).is_run:
        info["run"] = _run_progress(RunDir(target))
    for job in read_records(target)["jobs"]:
        info["jobs"].append(_job_status(job))
    return info


def _job_status(job: dict) -> dict:
    """One recorded job with its SLURM state, its tasks and the end of the logs of its failed tasks."""
    states = job_states(job["job_id"])
    tasks = []
    for st in states:
        task = dataclasses.asdict(st)
        if not task["log"] and job.get("log"):  # sacct does not know the log: use the recorded pattern
            task["log"] = log_path(Path(job["log"]), job["job_id"], st.array_task)
        tasks.append(task)
    finished = bool(states) and all(st.finished for st in states)
    failed = [t for t, st in zip(tasks, states) if st.finished and st.state != "COMPLETED"]
    if not states:
        state = "UNKNOWN"
    elif len(states) == 1:
        state = states[0].state
    elif finished:
        state = "FAILED" if failed else "COMPLETED"
    else:
        state = "RUNNING" if any(st.state == "RUNNING" for st in states) else "PENDING"
    entry = {k: job.get(k) for k in ("job_id", "kind", "dependency", "array", "log", "submitted_at", "script_path")}
    entry.update(
        state=state, finished=finished, tasks=tasks, points=job.get("points"),
        failed_tasks=[{"job_id": t["job_id"], "state": t["state"], "exit_code": t["exit_code"], "log": t["log"],
                       "log_tail": _tail_lines(t["log"])} for t in failed],
    )
    return entry


def _run_progress(run: RunDir) -> dict:
    out: dict[str, Any] = {"trained": run.is_trained, "evaluated": run.is_evaluated}
    if run.metrics_file.is_file():
        lines = [ln for ln in run.metrics_file.read_text().splitlines() if ln.strip()]
        if lines:
            try:
                last = json.loads(lines[-1])
                out["step"], out["loss"] = last.get("step"), last.get("loss")
            except ValueError:
                pass
    ckpts = run.checkpoints()
    if ckpts:
        out["checkpoint"] = ckpts[-1].name
    if out["trained"]:
        try:
            res = run.results()
            out["steps"], out["final_loss"] = res.get("steps"), res.get("final_loss")
        except ValueError:
            pass
    if out["evaluated"]:
        try:
            ev = run.eval_results()
            out["eval_metrics"] = ev.get("metrics")
        except ValueError:
            pass
    return out


def format_status(info: dict) -> str:
    """``run_status``'s answer as the lines ``tunelab status`` prints."""
    lines = [f"{info['path']}"]
    run = info.get("run")
    if run:
        bits = []
        if run.get("step") is not None:
            bits.append(f"step {run['step']}" + (f", loss {run['loss']:.4f}" if isinstance(run.get("loss"), float) else ""))
        if run.get("checkpoint"):
            bits.append(f"checkpoint {run['checkpoint']}")
        bits.append("trained" if run["trained"] else "not trained yet")
        bits.append("evaluated" if run["evaluated"] else "not evaluated")
        lines.append("  run: " + "; ".join(bits))
        if run.get("eval_metrics"):
            lines.append("  eval: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in run["eval_metrics"].items()))
    if not info["jobs"]:
        lines.append(f"  no SLURM jobs recorded ({RECORD_FILE} is absent): not submitted with `tunelab submit`")
    for job in info["jobs"]:
        lines.extend(_job_lines(job))
    return "\n".join(lines)


def _job_lines(job: dict) -> list[str]:
    head = f"  job {job['job_id']} {job['kind']}: {job['state']}"
    if job.get("dependency"):
        head += f" (after {job['dependency']})"
    lines = [head]
    tasks = job["tasks"]
    if not tasks:
        lines.append("    state unknown: no SLURM commands (scontrol/sacct) on this machine")
    for t in tasks:
        label = t["job_id"]
        if job.get("points") and t.get("array_task") in job["points"]:
            label += f" point {t['array_task']} {job['points'][t['array_task']]}"
        detail = t["state"]
        if t.get("exit_code") and t["state"] not in ("PENDING", "RUNNING"):
            detail += f" exit {t['exit_code']}"
        if t.get("reason") and t["reason"] not in ("None", "(null)") and t["state"] in ("PENDING", "FAILED", "REQUEUED"):
            detail += f" ({t['reason']})"
        if t.get("restarts"):
            detail += f", restarted {t['restarts']}x"
        lines.append(f"    {label}: {detail}   log {t.get('log') or job.get('log')}")
    for f in job["failed_tasks"]:
        lines.append(f"    {f['job_id']} {f['state']}: last lines of {f['log']}:")
        if f["log_tail"]:
            lines.extend(f"      | {ln}" for ln in f["log_tail"])
        else:
            lines.append("      (log is empty or missing)")
    return lines

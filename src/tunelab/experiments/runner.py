"""Running sweep points: bring each to done, record failures, summarise the sweep.

A point's run directory is prepared (a superseded run or evaluation moved aside, the folder
claimed, the bookkeeping of :mod:`tunelab.experiments.state` written), then the stages it still
needs run in order (:mod:`tunelab.experiments.stages`): training (resumed from its latest
checkpoint when it left one), then evaluation. A folder holding files tunelab did not write is
never touched: the point is reported as a conflict with the fix. A stage that fails writes
``RUN/FAILED`` and the other points still run; the next run of the sweep retries the point. A
preempted stage (:class:`Interrupted`) stops the sweep; the point stays pending.

Launchers run one point per job with ``tunelab sweep FILE --point I`` (:func:`point_command`, one
SLURM array task per index from :func:`~tunelab.experiments.state.pending_indices`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tunelab.experiments.spec import Sweep, SweepPoint
from tunelab.experiments.stages import Interrupted, Stage, failure_line, resume_stage, run_stage, stage_commands, tail
from tunelab.experiments.state import (
    CONFIG_FILE,
    FAILED_FILE,
    LOG_FILE,
    STATE_FILE,
    SUPERSEDED_DIR,
    checkpoint_steps,
    folder_kind_for,
    lock_path,
    now,
    partial_run_outputs,
    point_lock,
    point_status,
    read_json,
    train_part,
    write_json,
)
from tunelab.rundir import NotOurs, RunDir, claim_folder
from tunelab.utils import atomic_write_text


class StageFailed(Exception):
    def __init__(self, stage: str, rc: int, error: str, command: list[str], tail: str):
        super().__init__(error)
        self.stage, self.rc, self.error, self.command, self.tail = stage, rc, error, command, tail


def point_command(sweep: Sweep, index: int) -> list[str]:
    """The command that runs one point (what a job-array task executes)."""
    sweep.point(index)
    cmd = ["tunelab", "sweep", str(sweep.path), "--point", str(index)]
    return cmd + ["--out-dir", str(sweep.out_dir)]


# --------------------------------------------------------------------------------------------
# Running a point
# --------------------------------------------------------------------------------------------


def free_name(path: Path) -> Path:
    """``path``, or ``path-<time>[-N]`` when that is taken: a superseded folder never lands in (or on) another."""
    if not path.exists():
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = path.with_name(f"{path.name}-{stamp}"), 2
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}-{stamp}-{n}"), n + 1
    return candidate


def _move_aside(src: Path, dest_dir: Path, tag: str) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = free_name(dest_dir / f"{src.name}-{tag}")
    os.rename(src, dest)  # one file system (both under out_dir); never merges into an existing folder
    return dest


def _set_aside_stale(sweep: Sweep, point: SweepPoint, stale_train: bool, stale_eval: bool, say) -> dict:
    """Move a superseded run (or only its eval/) out of the way; returns the state the new attempt builds on."""
    run = RunDir(point.run_dir)
    meta = read_json(run.path / STATE_FILE) or {}
    if stale_train:
        moved = _move_aside(run.path, sweep.out_dir / SUPERSEDED_DIR, str(meta.get("train_hash", "old"))[:8])
        say(f"  [{point.index}] {point.name}: config changed; previous run kept at {moved}")
        return {}
    if stale_eval:
        tag = str(meta.get("eval_hash", "old"))[:8]
        run.eval_dir.rename(free_name(run.path / f"{RunDir.EVAL_DIR}.superseded-{tag}"))
    return meta


def _claim(point: SweepPoint) -> None:
    """Claim the point's folder as the run its commands make; raises NotOurs for a folder that is not the sweep's.

    A folder holding this sweep's bookkeeping (point_status checked it is this sweep's) is claimed
    even when an older tunelab made it without the marker.
    """
    ours = (point.run_dir / STATE_FILE).is_file()
    claim_folder(point.run_dir, folder_kind_for(point), overwrite=ours)


def _start_attempt(sweep: Sweep, point: SweepPoint, meta: dict, in_process: bool) -> tuple[dict, dict]:
    """Write sweep_config.yaml and sweep_point.json with a new attempt; returns (state, attempt)."""
    run = point.run_dir
    (run / FAILED_FILE).unlink(missing_ok=True)
    atomic_write_text(run / CONFIG_FILE, yaml.safe_dump(point.config, sort_keys=False))
    attempts = list(meta.get("attempts", []))
    attempt: dict[str, Any] = {"started": now(), "executor": "in-process" if in_process else "subprocess", "stages": {}}
    attempts.append(attempt)
    state = {
        "sweep": sweep.name, "sweep_file": str(sweep.path), "index": point.index, "name": point.name,
        "kind": point.kind, "overrides": point.overrides, "train_hash": point.train_hash,
        "eval_hash": point.eval_hash, "train_part": train_part(point.config, point.kind),
        "config": point.config, "attempts": attempts[-20:],
    }
    write_json(run / STATE_FILE, state)
    return state, attempt


def _stages_to_run(point: SweepPoint) -> list[Stage]:
    """What is left: training (resumed from a checkpoint, or started over) unless trained, then evaluation."""
    run = RunDir(point.run_dir)
    fresh = stage_commands(point)
    stages: list[Stage] = []
    if point.kind == "train" and not run.is_trained:
        if checkpoint_steps(run.path):
            stages.append(resume_stage(run.path))
        else:
            # started before but left no checkpoint: remove what that attempt wrote (only that) and start over
            for child in partial_run_outputs(run.path, point.method):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            stages.append(fresh[0])
    if stages or not run.is_evaluated:
        stages.append(fresh[-1])
    return stages


def _run_stages(point: SweepPoint, stages: list[Stage], state: dict, attempt: dict, *, in_process: bool,
                echo: bool, say) -> None:
    """Run the stages in order, recording each one's exit code and time; raises StageFailed at the first failure."""
    run = point.run_dir
    with open(run / LOG_FILE, "ab") as log_fh:
        for stage in stages:
            header = f"\n=== {now()} {stage.name}: {shlex.join(['tunelab', *stage.argv])}\n"
            log_fh.write(header.encode())
            log_fh.flush()
            say(f"  [{point.index}] {point.name}: {stage.name} ...")
            t0 = time.time()
            rc, text = run_stage(stage, log_fh, in_process=in_process, echo=echo)
            attempt["stages"][stage.name] = {"rc": rc, "seconds": round(time.time() - t0, 2)}
            write_json(run / STATE_FILE, state)
            if rc != 0:
                raise StageFailed(stage.name, rc, failure_line(rc, text), ["tunelab", *stage.argv], tail(text))


def _write_failed(run: Path, exc: StageFailed) -> None:
    atomic_write_text(
        run / FAILED_FILE,
        f"stage: {exc.stage}\nerror: {exc.error}\nexit code: {exc.rc}\ncommand: {shlex.join(exc.command)}\n"
        f"log: {run / LOG_FILE}\ntime: {now()}\n--- last lines of the log ---\n{exc.tail}\n"
    )


def _quality_summary(run: Path) -> str:
    res = read_json(RunDir(run).eval_results_file) or {}
    metric = res.get("primary_metric")
    value = (res.get("metrics") or {}).get(metric)
    return f" ({metric}={value:.4g})" if isinstance(value, (int, float)) else ""


def run_point(sweep: Sweep, point: SweepPoint, *, in_process: bool = False, echo: bool = False,
              say=print) -> str:
    """Bring one point to done. Returns done / skipped / failed / busy / conflict."""
    with point_lock(lock_path(sweep, point)) as got:
        if not got:
            say(f"  [{point.index}] {point.name}: running in another process, skipped")
            return "busy"
        status = point_status(sweep, point, check_lock=False)
        if status.state == "done":
            return "skipped"
        if status.state == "conflict":
            say(f"  [{point.index}] {point.name}: not run: {status.detail}")
            return "conflict"
        meta = _set_aside_stale(sweep, point, status.stale_train, status.stale_eval, say)
        try:
            _claim(point)
        except NotOurs as exc:
            say(f"  [{point.index}] {point.name}: not run: {exc}")
            return "conflict"
        state, attempt = _start_attempt(sweep, point, meta, in_process)
        try:
            _run_stages(point, _stages_to_run(point), state, attempt, in_process=in_process, echo=echo, say=say)
        except StageFailed as exc:
            attempt["outcome"] = "failed"
            write_json(point.run_dir / STATE_FILE, state)
            _write_failed(point.run_dir, exc)
            say(f"  [{point.index}] {point.name}: FAILED in {exc.stage}: {exc.error}")
            return "failed"
        except Interrupted as exc:
            attempt["outcome"] = f"interrupted: {exc}"
            write_json(point.run_dir / STATE_FILE, state)
            raise
        attempt["outcome"] = "done"
        write_json(point.run_dir / STATE_FILE, state)
        say(f"  [{point.index}] {point.name}: done{_quality_summary(point.run_dir)}")
        return "done"


# --------------------------------------------------------------------------------------------
# Running a sweep
# --------------------------------------------------------------------------------------------


@dataclass
class SweepSummary:
    counts: dict[str, int]
    failed: list[SweepPoint]

    @property
    def ok(self) -> bool:
        return not self.failed


def run_sweep(sweep: Sweep, indices: list[int] | None = None, *, in_process: bool = False,
              echo: bool = False, say=print) -> SweepSummary:
    """Run the selected points (default: all) one after another; a failure does not stop the rest."""
    selected = [sweep.point(i) for i in indices] if indices else list(sweep.points)
    counts = {"done": 0, "skipped": 0, "failed": 0, "busy": 0, "conflict": 0}
    failed: list[SweepPoint] = []
    say(f"sweep '{sweep.name}': {len(selected)} point(s) -> {sweep.out_dir}")
    for point in selected:
        outcome = run_point(sweep, point, in_process=in_process, echo=echo, say=say)
        counts[outcome] += 1
        if outcome in ("failed", "conflict"):
            failed.append(point)
    parts = [f"{n} {k}" for k, n in counts.items() if n]
    say(f"sweep '{sweep.name}': " + ", ".join(parts))
    for point in failed:
        where = point.run_dir / FAILED_FILE
        say(f"  failed: [{point.index}] {point.name}: {where if where.is_file() else point_status(sweep, point).detail}")
    return SweepSummary(counts, failed)

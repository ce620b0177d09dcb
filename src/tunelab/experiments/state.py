"""A sweep point's state on disk: its hashes, its bookkeeping files, its lock and its status.

Bookkeeping inside each run directory (next to what ``tunelab train`` / ``eval`` write there):

- ``sweep_point.json``: sweep name, point index and overrides, the resolved config and two hashes:
  the *train hash* (every config key that changes training results) and the *eval hash* (the eval
  section). A point whose run holds ``results.json`` and ``eval/results.json`` with matching hashes
  is done and skipped. A changed train hash moves the old run to ``<out_dir>/.superseded/`` and
  reruns it; a changed eval hash only re-evaluates (the old ``eval/`` is kept as
  ``eval.superseded-<hash>``). Keys that do not change results (progress bar, loggers, checkpoint
  cadence) are left out of the hash.
- ``sweep_config.yaml``: the resolved config the commands read (reproduce a point by hand with
  ``tunelab train --config RUN/sweep_config.yaml out=RUN``).
- ``sweep.log``: the output of every command run for the point.
- ``FAILED``: written when a stage fails: the stage, the error, the command and the end of the
  log. The next ``tunelab sweep`` retries the point.

Ownership (:func:`tunelab.rundir.claim_folder`): a point's folder is claimed as the kind of run it
holds (``run``, or ``base`` for a baseline), so ``tunelab train`` / ``eval --base`` accept it. The
sweep writes only into a new or empty folder, or one that holds its bookkeeping; a folder with
files tunelab did not write is never wiped or moved: the point is blocked (a ``conflict``) with the
fix. Restarting a point that left no checkpoint removes only what training writes
(:func:`partial_run_outputs`); files a user put beside them stay.

A lock file per point (``<out_dir>/.locks/<name>.lock``, an ``fcntl.flock``: the kernel drops it
when its process dies, so a killed job never leaves a stale lock) keeps two processes (two
job-array tasks, or a task and a user) from running the same point at once.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Optional

from tunelab.rundir import MARKER_FILE, RunDir, folder_kind
from tunelab.utils import atomic_write_text

if TYPE_CHECKING:
    from tunelab.experiments.spec import Sweep, SweepPoint

STATE_FILE = "sweep_point.json"
CONFIG_FILE = "sweep_config.yaml"
LOG_FILE = "sweep.log"
FAILED_FILE = "FAILED"
SUPERSEDED_DIR = ".superseded"
LOCKS_DIR = ".locks"

# --------------------------------------------------------------------------------------------
# Hashes: which config keys decide a point's results
# --------------------------------------------------------------------------------------------

SECTIONS = ("model", "task", "data", "method", "train", "eval")
#: Keys that do not change a run's results: changing them does not make a finished point stale.
NON_RESULT_KEYS = frozenset({
    "out", "train.progress_bar", "train.report_to", "train.logging_steps", "train.save_steps",
    "train.keep_checkpoints",
})
#: Config keys whose value decides what a baseline (untrained) evaluation computes.
BASELINE_PREFIXES = ("model.", "task.")
BASELINE_KEYS = ("data.max_length",)
_MISSING = object()


def flat_config(cfg: dict) -> dict[str, Any]:
    """A resolved config dict as {section.key: value} (top-level keys as they are)."""
    out = {}
    for key, value in cfg.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub, sub_value in value.items():
                out[f"{key}.{sub}"] = sub_value
        else:
            out[key] = value
    return out


def result_keys(flat: dict[str, Any], kind: str = "train") -> dict[str, Any]:
    """The entries of a flat config that decide the results of a training run (or a baseline's)."""
    if kind == "base":
        return {k: v for k, v in flat.items() if k.startswith(BASELINE_PREFIXES) or k in BASELINE_KEYS}
    return {k: v for k, v in flat.items() if not k.startswith("eval.") and k not in NON_RESULT_KEYS}


def train_part(config: dict, kind: str = "train") -> dict[str, Any]:
    """The keys of a resolved config that decide a point's results (what the train hash covers)."""
    return result_keys(flat_config(config), kind)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def read_json(path: Path) -> Optional[dict]:
    """A JSON object, or None when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, obj: dict) -> None:
    """Atomically, with the mode the umask gives (colleagues on a shared file system can read it)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def checkpoint_steps(run: Path) -> list[int]:
    """Steps of the run's complete checkpoints, oldest first."""
    return [int(p.name.split("-", 1)[1]) for p in RunDir(run).checkpoints()]


def failed_error(path: Path) -> str:
    """The ``error:`` line of a FAILED file (its first line when it has none)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("error:"):
                return line[len("error:"):].strip()
        return path.read_text().splitlines()[0]
    except (OSError, IndexError):
        return ""


# --------------------------------------------------------------------------------------------
# Ownership: what the sweep may write into, and what it may remove
# --------------------------------------------------------------------------------------------

#: the files the sweep itself writes into a point's folder
BOOKKEEPING = frozenset({MARKER_FILE, STATE_FILE, CONFIG_FILE, LOG_FILE, FAILED_FILE})
#: what training writes into its run folder besides the method's artifact (removed when a point starts over)
TRAIN_OUTPUTS = frozenset({RunDir.CONFIG_FILE, RunDir.METRICS_FILE, RunDir.RESULTS_FILE, RunDir.TOKENIZER_DIR,
                           RunDir.CHECKPOINTS_DIR, RunDir.EVAL_DIR, "tensorboard", "wandb"})


def folder_kind_for(point: "SweepPoint") -> str:
    """The kind a point's folder is claimed as (:func:`tunelab.rundir.claim_folder`): what its commands make."""
    return "base" if point.kind == "base" else "run"


def partial_run_outputs(run: Path, method: str) -> list[Path]:
    """What an unfinished training attempt wrote in ``run``: removed before it starts over (nothing else is)."""
    from tunelab.registry import METHODS

    names = set(TRAIN_OUTPUTS)
    artifact = METHODS.get(method).artifact_dir if method in METHODS else None
    if artifact:
        names.add(artifact)
    return sorted(p for p in run.iterdir() if p.name in names or p.name.startswith(".artifact-"))


def _is_bookkeeping(name: str) -> bool:
    return name in BOOKKEEPING or (name.startswith(".") and name.endswith(".tmp"))  # an atomic write's temp file


def _not_this_sweeps(sweep: "Sweep", point: "SweepPoint", run: RunDir) -> Optional[PointStatus]:
    """For a folder without readable bookkeeping: why the sweep must not touch it (None: it made it and may)."""
    fix = f"move it away, or give this sweep another out_dir (--out-dir DIR, or out_dir: in {sweep.path})"
    if run.is_run:
        return PointStatus("conflict", f"{run.path} holds a run this sweep did not start (no {STATE_FILE}): {fix}")
    entries = [p.name for p in run.path.iterdir()]
    if folder_kind(run.path) == folder_kind_for(point) and all(_is_bookkeeping(n) for n in entries):
        return None  # claimed by an earlier attempt that stopped before its bookkeeping was written
    return PointStatus("conflict", f"blocked: {run.path} holds files tunelab did not write ({run.describe()}); "
                       f"nothing there is touched: move those files away, or give this sweep another out_dir "
                       f"(--out-dir DIR, or out_dir: in {sweep.path})")


# --------------------------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------------------------


def lock_path(sweep: "Sweep", point: "SweepPoint") -> Path:
    return sweep.out_dir / LOCKS_DIR / f"{point.name}.lock"


def is_locked(path: Path) -> bool:
    if not path.is_file():
        return False
    import fcntl

    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


@contextmanager
def point_lock(path: Path) -> Iterator[bool]:
    """Hold the point's lock for the block; yields False (and holds nothing) when another process has it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------


@dataclass
class PointStatus:
    """What ``--list`` shows, and what running the point will do."""

    state: Literal["done", "failed", "pending", "running", "conflict"]
    detail: str = ""
    #: the stored train hash differs: move the old run aside and start over
    stale_train: bool = False
    #: the stored eval hash differs: move eval/ aside and evaluate again
    stale_eval: bool = False


def _changed_keys(old: dict, new: dict) -> tuple[list[str], bool]:
    """(keys whose values differ, whether only tunelab-side key additions/removals differ)."""
    shared = set(old) & set(new)
    same = lambda k: json.dumps(old[k], sort_keys=True, default=str) == json.dumps(new[k], sort_keys=True, default=str)  # noqa: E731
    differ = sorted(k for k in shared if not same(k))
    return differ, not differ


def _train_change(sweep: "Sweep", point: "SweepPoint", meta: dict) -> Optional[PointStatus]:
    """The status of a point whose stored train hash differs from its config's, or None when it agrees."""
    run = point.run_dir
    old_part, new_part = meta.get("train_part") or {}, train_part(point.config, point.kind)
    same_train = meta.get("train_hash") == point.train_hash
    if not same_train and old_part and meta.get("kind") == point.kind:
        changed, only_schema = _changed_keys(old_part, new_part)
        same_train = only_schema  # tunelab added/removed config keys since; values that exist agree
    else:
        changed = sorted(k for k in set(old_part) | set(new_part) if old_part.get(k, _MISSING) != new_part.get(k, _MISSING))
    if same_train:
        return None
    if meta.get("sweep") != sweep.name:
        return PointStatus(
            "conflict", f"{run} belongs to sweep '{meta.get('sweep')}' with another config: give this sweep its own out_dir"
        )
    shown = ", ".join(f"{k}: {old_part.get(k, '-')!r} -> {new_part.get(k, '-')!r}" for k in changed[:3])
    more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
    return PointStatus("pending", f"config changed ({shown}{more}); the old run moves to .superseded/", stale_train=True)


def point_status(sweep: "Sweep", point: "SweepPoint", check_lock: bool = True) -> PointStatus:
    """done / failed / pending / running / conflict, with a one-line detail."""
    run = RunDir(point.run_dir)
    if run.path.exists() and not run.path.is_dir():
        return PointStatus("conflict", f"blocked: {run.path} is a file, not a folder: move it away, or give this "
                           f"sweep another out_dir (--out-dir DIR, or out_dir: in {sweep.path})")
    if check_lock and is_locked(lock_path(sweep, point)):
        return PointStatus("running", "another process holds this point's lock")
    if not run.path.is_dir() or not any(run.path.iterdir()):
        return PointStatus("pending", "not started")
    meta = read_json(run.path / STATE_FILE)
    if meta is None:
        return _not_this_sweeps(sweep, point, run) or PointStatus("pending", "not started")
    changed = _train_change(sweep, point, meta)
    if changed is not None:
        return changed
    if (run.path / FAILED_FILE).is_file():
        return PointStatus("failed", failed_error(run.path / FAILED_FILE))
    trained = point.kind == "base" or run.is_trained
    same_eval = meta.get("eval_hash") == point.eval_hash
    if trained and run.is_evaluated and same_eval:
        return PointStatus("done", "")
    if trained and run.is_evaluated:
        return PointStatus("pending", "eval settings changed: will evaluate again", stale_eval=True)
    if trained:
        return PointStatus("pending", "trained; evaluation pending" if point.kind == "train" else "evaluation pending")
    steps = checkpoint_steps(run.path)
    if steps:
        return PointStatus("pending", f"unfinished: resumes from the checkpoint at step {steps[-1]}")
    return PointStatus("pending", "unfinished, no checkpoint: starts over")


def pending_indices(sweep: "Sweep") -> list[int]:
    """Indices of the points that running the sweep would run (for a launcher's job array)."""
    return [p.index for p in sweep.points if point_status(sweep, p).state in ("pending", "failed")]


def point_rows(sweep: "Sweep", indices: list[int] | None = None) -> list[dict[str, Any]]:
    """One mapping per selected point (default: all): what ``tunelab sweep --list`` shows."""
    selected = [sweep.point(i) for i in indices] if indices else sweep.points
    rows = []
    for p in selected:
        st = point_status(sweep, p)
        rows.append({"index": p.index, "name": p.name, "kind": p.kind, "status": st.state, "detail": st.detail,
                     "run_dir": str(p.run_dir), "overrides": p.overrides})
    return rows

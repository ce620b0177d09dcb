"""Reading run directories into :class:`RunRecord` s (nothing is recomputed).

- ``RUN/config.yaml``: the run's settings (method, rank, data fraction, epochs, 4-bit, ...);
- ``RUN/results.json``: training numbers (trainable/total params, peak memory, train time,
  tokens/s, final loss, seed); schema version 1, older files are read as far as they go;
- ``RUN/eval/results.json``: the task's metrics and which one is primary;
- a ``BASE`` marker makes a directory an untrained-baseline evaluation (method ``base``);
- ``RUN/eval/harness/<task>/results.json``: lm-evaluation-harness results, one record per task
  (task ``harness:<task>``, so they get their own table), rows split by their protocol.

A run that cannot be reported (unfinished, failed, unreadable) is left out with a note saying why.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from tunelab.experiments.state import FAILED_FILE, flat_config
from tunelab.rundir import RunDir

SCHEMA_VERSION = 1
#: Fields of a train results.json the report reads (schema 1 names).
TRAIN_FIELDS = (
    "trainable_params", "total_params", "peak_mem_bytes", "peak_mem_kind", "train_time_s", "wall_time_s",
    "train_tokens_per_s", "final_loss", "seed", "steps", "epochs_completed", "method_results", "device",
    "git_sha", "versions", "precision", "optimizer_state_bytes", "trainable_param_bytes", "master_weight_bytes",
    "peak_reserved_bytes",
)
#: Names older writers used (the HF Trainer's among them) -> schema 1 names.
LEGACY_TRAIN_NAMES = {
    "train_runtime": "train_time_s",
    "train_loss": "final_loss",
    "peak_memory_bytes": "peak_mem_bytes",
    "peak_mem": "peak_mem_bytes",
    "tokens_per_s": "train_tokens_per_s",
    "train_tokens_per_second": "train_tokens_per_s",
    "global_step": "steps",
}
#: What `tunelab eval --base` records as the method of an untrained-baseline run.
BASELINE_METHOD = "base"


@dataclass
class RunRecord:
    """What the report knows about one run directory."""

    path: Path
    name: str
    task: str
    method: str
    is_base: bool
    config: dict  # flattened config.yaml ({section.key: value})
    train: dict = field(default_factory=dict)  # schema-1 fields from results.json ({} for a baseline)
    metrics: dict = field(default_factory=dict)  # numeric eval metrics
    primary_metric: Optional[str] = None
    eval_signature: str = "no-eval"  # split, generation settings and n: rows never mix these
    eval_n: Optional[int] = None
    schema: Optional[int] = SCHEMA_VERSION

    @property
    def seed(self) -> Any:
        return self.train.get("seed", self.config.get("seed"))


def find_run_dirs(roots: list[Path]) -> list[Path]:
    """Folders holding config.yaml under the roots (a run's own subfolders and dot-folders skipped)."""
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"'{root}' does not exist: pass folders that hold run directories (e.g. runs/)")
        stack = [root]
        while stack:
            d = stack.pop()
            if RunDir(d).is_run:
                found.append(d)
                continue
            stack.extend(sorted((c for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")), reverse=True))
    return sorted(dict.fromkeys(found))


def _read_json(path: Path, notes: list[str]) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        notes.append(f"{path}: cannot be read ({exc}); left out")
        return None
    except ValueError as exc:
        notes.append(f"{path}: not valid JSON ({exc}); left out")
        return None
    if not isinstance(data, dict):
        notes.append(f"{path}: expected a JSON object, got {type(data).__name__}; left out")
        return None
    return data


def _schema_note(path: Path, version: Any, read: list[str], missing: list[str]) -> Optional[str]:
    if version == SCHEMA_VERSION:
        return None
    got = f"read {', '.join(read) or 'nothing'}" + (f"; not found: {', '.join(missing)}" if missing else "")
    if version is None:
        return f"{path}: no schema_version (written before results.json was versioned): {got}"
    if isinstance(version, int) and version > SCHEMA_VERSION:
        return (f"{path}: schema_version {version} is newer than this tunelab reads ({SCHEMA_VERSION}); "
                f"upgrade tunelab for every field: {got}")
    return f"{path}: unknown schema_version {version!r} (this tunelab reads {SCHEMA_VERSION}): {got}"


def read_train_results(path: Path, notes: list[str]) -> Optional[dict]:
    """Schema-1 training fields of RUN/results.json; older names are mapped, gaps noted."""
    raw = _read_json(path, notes)
    if raw is None:
        return None
    version = raw.get("schema_version")
    out = {k: raw[k] for k in TRAIN_FIELDS if k in raw}
    if version != SCHEMA_VERSION:
        for old, new in LEGACY_TRAIN_NAMES.items():
            if old in raw and new not in out:
                out[new] = raw[old]
    essential = ["trainable_params", "total_params", "peak_mem_bytes", "train_time_s", "train_tokens_per_s", "final_loss"]
    note = _schema_note(path, version, [k for k in essential if k in out], [k for k in essential if k not in out])
    if note:
        notes.append(note)
    return out


def _metric_value(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):  # {"mean": ..., "ci95": [...]} style
        for key in ("mean", "value", "score"):
            if key in value:
                return _metric_value(value[key])
    return None


def read_eval_results(path: Path, notes: list[str]) -> Optional[dict]:
    raw = _read_json(path, notes)
    if raw is None:
        return None
    version = raw.get("schema_version")
    metrics_raw = raw.get("metrics")
    if not isinstance(metrics_raw, dict):
        notes.append(f"{path}: no 'metrics' mapping (schema_version {version!r}); its quality is left out")
        return None
    metrics = {k: v for k, v in ((k, _metric_value(v)) for k, v in metrics_raw.items() if k != "n") if v is not None}
    n = metrics_raw.get("n")
    primary = raw.get("primary_metric")
    if primary not in metrics:
        if metrics:
            notes.append(f"{path}: primary_metric {primary!r} is not among its metrics; using '{next(iter(metrics))}'")
            primary = next(iter(metrics))
        else:
            primary = None
    note = _schema_note(path, version, ["metrics"] + (["primary_metric"] if raw.get("primary_metric") else []),
                        [] if raw.get("primary_metric") else ["primary_metric"])
    if note:
        notes.append(note)
    signature = json.dumps({"split": raw.get("split"), "generation": raw.get("generation"), "n": n}, sort_keys=True, default=str)
    return {"metrics": metrics, "primary": primary, "n": n if isinstance(n, int) else None,
            "signature": signature, "task": raw.get("task")}


def _read_config(run: RunDir, notes: list[str]) -> Optional[dict]:
    try:
        cfg = yaml.safe_load(run.config_file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        notes.append(f"{run.path}: config.yaml unreadable ({exc}); run left out")
        return None
    if not isinstance(cfg, dict):
        notes.append(f"{run.path}: config.yaml is not a mapping; run left out")
        return None
    return cfg


def _unfinished_note(run: RunDir) -> str:
    """Why a run without its results is left out (a sweep's FAILED file says best)."""
    failed = run.path / FAILED_FILE
    if failed.is_file():
        lines = failed.read_text().splitlines()
        error = next((ln[6:].strip() for ln in lines if ln.startswith("error:")), lines[0] if lines else "")
        return f"{run.path}: failed ({error}); left out"
    if run.is_base:
        return f"{run.path}: baseline without eval/results.json (evaluation unfinished or still running); left out"
    return f"{run.path}: no results.json (training unfinished or still running); left out"


def load_run(path: Path, notes: list[str]) -> Optional[RunRecord]:
    """One run directory, or None (with a note saying why) when it has nothing to report."""
    run = RunDir(path)
    cfg = _read_config(run, notes)
    if cfg is None:
        return None
    # the harness.* settings never change tunelab's own evaluation (its records: load_harness_runs)
    flat = {k: v for k, v in flat_config(cfg).items() if not k.startswith("harness.")}
    is_base = run.is_base
    if not (run.is_evaluated if is_base else run.is_trained):
        if not (is_base and run.harness_results()):  # a harness-only baseline: see load_harness_runs
            notes.append(_unfinished_note(run))
        return None
    train: dict = {}
    if not is_base:
        got = read_train_results(run.results_file, notes)
        if got is None:
            return None
        train = got
    ev = None
    if run.is_evaluated:
        ev = read_eval_results(run.eval_results_file, notes)
        if ev is None and is_base:
            return None
    else:
        notes.append(f"{path}: no eval/results.json: quality missing (evaluate it with `tunelab eval {path}`)")
    task = (ev or {}).get("task") or flat.get("task.name") or "unknown"
    method = BASELINE_METHOD if is_base else str(flat.get("method.name", "unknown"))
    rec = RunRecord(path=path, name=path.name, task=str(task), method=method, is_base=is_base, config=flat, train=train)
    if ev is not None:
        rec.metrics, rec.primary_metric = ev["metrics"], ev["primary"]
        rec.eval_signature, rec.eval_n = ev["signature"], ev["n"]
    return rec


def load_harness_runs(path: Path, notes: list[str]) -> list[RunRecord]:
    """One record per lm-evaluation-harness task evaluated in the run directory (a trained run or a baseline)."""
    run = RunDir(path)
    folders = run.harness_results()
    if not folders or not (run.is_base or run.is_trained):
        return []
    cfg = _read_config(run, [])  # load_run already noted an unreadable config
    if cfg is None:
        return []
    flat = {k: v for k, v in flat_config(cfg).items() if not k.startswith("harness.")}
    train = {} if run.is_base else (read_train_results(run.results_file, []) or {})
    method = BASELINE_METHOD if run.is_base else str(flat.get("method.name", "unknown"))
    records = []
    for name, folder in folders.items():
        ev = read_eval_results(folder / RunDir.RESULTS_FILE, notes)
        if ev is None:
            continue
        raw = _read_json(folder / RunDir.RESULTS_FILE, []) or {}
        proto = raw.get("protocol") or {}
        # the settings the harness ran with (an eval override is not in the run's config.yaml)
        config = {**flat, **{f"harness.{k}": proto.get(k) for k in ("num_fewshot", "max_new_tokens", "limit")}}
        rec = RunRecord(path=path, name=path.name, task=ev["task"] or f"harness:{name}", method=method,
                        is_base=run.is_base, config=config, train=train)
        rec.metrics, rec.primary_metric = ev["metrics"], ev["primary"]
        rec.eval_signature, rec.eval_n = ev["signature"], ev["n"]
        records.append(rec)
    return records


def collect_runs(roots: list[Path]) -> tuple[list[RunRecord], list[str]]:
    notes: list[str] = []
    dirs = find_run_dirs([Path(r) for r in roots])
    if not dirs:
        raise FileNotFoundError(
            f"no run directories (folders with config.yaml) under {', '.join(map(str, roots))}: "
            "point tunelab report at the folder of a sweep (e.g. runs/<sweep>) or at run directories"
        )
    runs = [r for r in (load_run(d, notes) for d in dirs) if r is not None]
    runs += [r for d in dirs for r in load_harness_runs(d, notes)]
    return runs, notes

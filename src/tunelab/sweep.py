"""Sweeps: declare a grid of runs once, run it anywhere, resume it after failures.

A sweep file is YAML::

    name: lora-rank                 # optional; default: the file name without .yaml
    out_dir: runs/lora-rank         # where the run directories go; default runs/<name>
    base:                           # a run config: the same keys as `tunelab train --config FILE`
      task: gsm8k
      method: {name: lora, alpha: 16}
      train: {max_steps: 32}
    grid:                           # cartesian product over dotted config keys
      method.rank: [4, 8, 16]
      data.train_fraction: [0.5, 1.0]
    points:                         # optional explicit points, added to the grid's
      - {method: full}
      - {method: galore, method.rank: 8}
    seeds: [1, 2]                   # every point runs once per seed (default: base's seed)
    eval: {limit: 100}              # evaluation settings (the eval section) for every point
    baseline: true                  # also evaluate the untrained base model, once per task

Without ``grid:`` and ``points:`` the sweep is the base config alone (once per seed, plus the
baseline). A grid axis whose values are mappings is a *bundle* axis: each value is a set of
overrides that go together (``task: [{task: gsm8k, data.max_length: 720}, {task: news_summary,
data.max_length: 3500}]``).
A point that switches ``method`` (or ``task``) starts that section afresh, exactly like
``method=full`` on the command line: the base's method keys do not leak into another method.

Every point is validated with :func:`tunelab.config.load_config` when the file is read, so a
typo, an unknown key or a method/task that is not installed stops the sweep before anything runs.

Each point is a run directory ``<out_dir>/<name>`` (names such as ``gsm8k-lora-rank8-seed1`` are
built from the task, the method and the keys that vary between points). A point is trained with
``tunelab train`` and then evaluated with ``tunelab eval RUN``; a baseline point is
``tunelab eval --base``. By default each command runs in its own Python process (exactly the CLI
a user would type): a crash, an out-of-memory kill or leaked GPU memory stays inside one point, and
peak memory is measured per point (on CPU it is the process's peak RSS, which only a fresh
process measures correctly). ``--in-process`` runs the same commands inside the sweep's process
(faster start, no isolation).

Bookkeeping inside each run directory:

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
  log. The other points still run; the next ``tunelab sweep`` retries the point (a training run
  that left a checkpoint resumes from it).

Launchers run one point per job with ``tunelab sweep FILE --point I`` (a SLURM array task per
index from :func:`pending_indices`); points write only their own run directory, and a lock file
per point (``<out_dir>/.locks/``) keeps two jobs from running the same point at once.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import yaml

from tunelab.config import SHORTHANDS, ConfigError, RunConfig, config_to_dict, load_config

__all__ = [
    "SweepError",
    "Sweep",
    "SweepPoint",
    "PointStatus",
    "load_sweep",
    "point_status",
    "pending_indices",
    "point_command",
    "run_sweep",
    "add_cli",
]

#: Top-level keys of a sweep file, with what they mean (shown in errors).
SWEEP_KEYS = {
    "name": "sweep name (default: the file name)",
    "description": "free text",
    "base": "run config mapping shared by every point",
    "grid": "mapping {dotted key: [values]} expanded as a cartesian product",
    "points": "list of override mappings, each one more point",
    "seeds": "list of seeds; every point runs once per seed",
    "eval": "eval settings (keys of the eval section) for every point's evaluation",
    "baseline": "true: evaluate the untrained base model once per task",
    "out_dir": "folder of the run directories (default runs/<name>)",
}
SECTIONS = ("model", "task", "data", "method", "train", "eval")
#: Keys that do not change a run's results: changing them does not make a finished point stale.
NON_RESULT_KEYS = frozenset({
    "out", "train.progress_bar", "train.report_to", "train.logging_steps", "train.save_steps",
    "train.keep_checkpoints",
})
#: Config keys whose value decides what a baseline (untrained) evaluation computes.
BASELINE_PREFIXES = ("model.", "task.")
BASELINE_KEYS = ("data.max_length",)
#: Short labels for run names (everything else uses the last part of the dotted key).
NAME_ALIASES = {
    "data.train_fraction": "frac",
    "model.load_in_4bit": "4bit",
    "train.epochs": "ep",
    "train.max_steps": "steps",
    "data.limit": "n",
    "model.name": "model",
}
PREEMPT_EXIT_CODE = 143  # tunelab.train's exit code after a checkpoint on SIGTERM/SIGUSR1
_MISSING = object()
STATE_FILE = "sweep_point.json"
CONFIG_FILE = "sweep_config.yaml"
LOG_FILE = "sweep.log"
FAILED_FILE = "FAILED"


class SweepError(ConfigError):
    """Every problem of a sweep file at once, each naming its fix."""

    def __init__(self, path: Path | str, problems: list[str]):
        super().__init__(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        self.args = (f"{len(self.problems)} problem(s) in sweep file {path}:\n{lines}",)


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep: a training point (train, then eval) or a baseline (eval of the base)."""

    index: int
    name: str
    kind: Literal["train", "base"]
    run_dir: Path
    #: the overrides that define this point (dotted keys, as declared), seed included
    overrides: dict
    #: the resolved, validated run config (``config_to_dict`` form, ``out`` left out)
    config: dict
    train_hash: str
    eval_hash: str

    @property
    def task(self) -> str:
        return self.config["task"]["name"]

    @property
    def method(self) -> str:
        return "base" if self.kind == "base" else self.config["method"]["name"]

    def eval_overrides(self) -> list[str]:
        """The point's whole eval section as ``eval.key=value`` command-line overrides."""
        return [f"eval.{k}={json.dumps(v)}" for k, v in self.config["eval"].items()]


@dataclass
class Sweep:
    path: Path
    name: str
    out_dir: Path
    points: list[SweepPoint]
    seeds: list[int]
    notes: list[str] = field(default_factory=list)

    def point(self, index: int) -> SweepPoint:
        if not 0 <= index < len(self.points):
            raise ValueError(
                f"sweep {self.path} has points 0..{len(self.points) - 1}; there is no point {index} "
                f"(see `tunelab sweep {self.path} --list`)"
            )
        return self.points[index]


@dataclass
class PointStatus:
    """What ``--list`` shows, and what running the point will do."""

    state: Literal["done", "failed", "pending", "running", "conflict"]
    detail: str = ""
    #: the stored train hash differs: move the old run aside and start over
    stale_train: bool = False
    #: the stored eval hash differs: move eval/ aside and evaluate again
    stale_eval: bool = False


# --------------------------------------------------------------------------------------------
# Reading and expanding a sweep file
# --------------------------------------------------------------------------------------------


def _closest(name: str, choices) -> str:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def _flatten(mapping: Any, where: str, problems: list[str]) -> dict[str, Any]:
    """Overrides as {dotted key: value} with at most one dot (section.field).

    Accepts nested sections (``method: {name: lora, rank: 8}``), dotted keys (``method.rank: 8``)
    and the shorthands ``method: lora`` / ``task: gsm8k`` / ``model: NAME``. Values of dict-typed
    fields (e.g. ``method.rank_pattern``) stay whole.
    """
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        problems.append(f"{where} must be a mapping of config keys, got {mapping!r}")
        return {}
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        key = str(key)
        if "." not in key and key in SECTIONS and isinstance(value, dict):
            for sub, sub_value in value.items():
                out[f"{key}.{sub}"] = sub_value
        elif "." not in key and key in SHORTHANDS:
            out[SHORTHANDS[key]] = value
        else:
            out[key] = value
    return out


def _nest(flat: dict[str, Any]) -> dict:
    nested: dict = {}
    for key, value in flat.items():
        section, dot, sub = key.partition(".")
        if dot:
            nested.setdefault(section, {})
            if not isinstance(nested[section], dict):
                nested[section] = {}
            nested[section][sub] = value
        else:
            nested[key] = value
    return nested


def _apply(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """base ← over, where a different method/task name starts that section afresh (as on the CLI)."""
    merged = dict(base)
    defaults = RunConfig()
    for section, default in (("method", defaults.method.name), ("task", defaults.task.name)):
        new = over.get(f"{section}.name")
        if new is not None and merged.get(f"{section}.name", default) != new:
            merged = {k: v for k, v in merged.items() if not k.startswith(f"{section}.")}
    merged.update(over)
    return merged


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


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def train_part(config: dict, kind: str = "train") -> dict[str, Any]:
    """The keys of a resolved config that decide a point's results (what the train hash covers)."""
    flat = flat_config(config)
    if kind == "base":
        return {k: v for k, v in flat.items() if k.startswith(BASELINE_PREFIXES) or k in BASELINE_KEYS}
    return {k: v for k, v in flat.items() if not k.startswith("eval.") and k not in NON_RESULT_KEYS}


def _validate_point(raw: dict) -> RunConfig:
    """load_config without environment checks (a GPU sweep can be listed on a login node)."""
    return load_config(base=raw, check_env=False)


def _describe(over: dict) -> str:
    return "{" + ", ".join(f"{k}: {v!r}" for k, v in over.items()) + "}"


def load_sweep(path: str | Path, out_dir: str | Path | None = None) -> Sweep:
    """Read, expand and validate a sweep file; raises :class:`SweepError` listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(path, [f"sweep file '{path}' does not exist (see configs/sweeps/ for examples)"])
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(path, [f"not valid YAML: {exc}"]) from None
    if not isinstance(doc, dict):
        raise SweepError(path, ["a sweep file must be a mapping with base:, grid: and/or points: (see 'Experiments' in README.md)"])
    problems: list[str] = []
    for key in doc:
        if key not in SWEEP_KEYS:
            problems.append(
                f"unknown sweep key '{key}'{_closest(str(key), SWEEP_KEYS)} "
                f"(known: {', '.join(SWEEP_KEYS)}; run settings go under base:)"
            )
    name = str(doc.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        problems.append(f"name '{name}' may only hold letters, digits and . _ + - (it names a folder)")

    base = _flatten(doc.get("base"), "base", problems)
    if "out" in base:
        problems.append(
            "base.out is set: every point gets its own run directory under out_dir; remove out (set out_dir: instead)"
        )
        base.pop("out")

    # ---- seeds
    seeds_raw = doc.get("seeds")
    if seeds_raw is None:
        base_seed = base.get("seed", RunConfig().seed)
        seeds = [base_seed] if isinstance(base_seed, int) and not isinstance(base_seed, bool) else []
        if not seeds:
            problems.append(f"base.seed must be an integer, got {base_seed!r}")
    else:
        if not isinstance(seeds_raw, list):
            seeds_raw = [seeds_raw]
        seeds = [s for s in seeds_raw if isinstance(s, int) and not isinstance(s, bool)]
        if not seeds_raw or len(seeds) != len(seeds_raw):
            problems.append(f"seeds must be a non-empty list of integers, got {doc.get('seeds')!r}")
        elif len(set(seeds)) != len(seeds):
            problems.append(f"seeds lists a seed twice: {seeds_raw}")
    base.pop("seed", None)

    # ---- eval settings for every point
    eval_over: dict[str, Any] = {}
    if doc.get("eval") is not None:
        if not isinstance(doc["eval"], dict):
            problems.append(f"eval must be a mapping of eval settings (e.g. {{limit: 100}}), got {doc['eval']!r}")
        else:
            for key, value in doc["eval"].items():
                key = str(key)
                sub = key[5:] if key.startswith("eval.") else key
                if "." in sub:
                    problems.append(
                        f"eval: '{key}' is not an eval setting (only keys of the eval section, e.g. limit, max_new_tokens)"
                    )
                    continue
                eval_over[f"eval.{sub}"] = value

    # ---- grid axes
    axes: list[tuple[str, list[dict[str, Any]]]] = []
    if "grid" in doc:
        grid = doc["grid"]
        if not isinstance(grid, dict) or not grid:
            problems.append(
                "grid is empty: give at least one key with a list of values (e.g. grid: {method.rank: [4, 8]}), "
                "or remove grid: and list points:"
            )
        else:
            for key, values in grid.items():
                key = str(key)
                label = f"grid key '{key}'"
                if key in ("seed", "seeds"):
                    problems.append(f"{label}: list seeds with the top-level seeds: [..] key, not in the grid")
                    continue
                if key == "out":
                    problems.append(f"{label}: the run directory is set per point; use out_dir: for the folder")
                    continue
                if not isinstance(values, list):
                    problems.append(f"{label} must list its values, e.g. {key}: [{values!r}], got {values!r}")
                    continue
                if not values:
                    problems.append(f"{label} has no values: list at least one, or remove the key")
                    continue
                bundles = [isinstance(v, dict) for v in values]
                if any(bundles) and not all(bundles):
                    problems.append(f"{label} mixes mappings and plain values: use all mappings (a bundle axis) or all values")
                    continue
                if all(bundles):
                    options = [_flatten(v, f"{label} value {i}", problems) for i, v in enumerate(values)]
                else:
                    options = [{SHORTHANDS.get(key, key): v} for v in values]
                seen: list[str] = []
                for opt in options:
                    sig = json.dumps(opt, sort_keys=True, default=str)
                    if sig in seen:
                        problems.append(f"{label} lists {_describe(opt)} twice")
                    seen.append(sig)
                axes.append((key, options))

    # ---- explicit points
    explicit: list[dict[str, Any]] = []
    if doc.get("points") is not None:
        if not isinstance(doc["points"], list) or not doc["points"]:
            problems.append("points must be a non-empty list of override mappings (e.g. - {method: full})")
        else:
            for i, entry in enumerate(doc["points"]):
                over = _flatten(entry, f"points[{i}]", problems)
                for bad in ("seed", "out"):
                    if bad in over:
                        fix = "use the top-level seeds: list" if bad == "seed" else "run directories are named by the sweep"
                        problems.append(f"points[{i}] sets '{bad}': {fix}")
                        over.pop(bad)
                explicit.append(over)
    baseline = doc.get("baseline", False)
    if not isinstance(baseline, bool):
        problems.append(f"baseline must be true or false, got {baseline!r}")
        baseline = False
    if problems:
        raise SweepError(path, problems)

    # ---- expand: grid (first axis outermost) ∪ explicit points, × seeds (innermost)
    combos: list[dict[str, Any]] = []
    for choice in itertools.product(*[opts for _, opts in axes]) if axes else []:
        over: dict[str, Any] = {}
        for (key, _), part in zip(axes, choice):
            for k, v in part.items():
                if k in over and over[k] != v:
                    problems.append(f"grid key '{key}' sets '{k}', which another grid key also sets: keep each key in one axis")
                over[k] = v
        combos.append(over)
    combos.extend(explicit)
    if not combos:
        combos = [{}]
    problems = list(dict.fromkeys(problems))
    if problems:
        raise SweepError(path, problems)

    specs: list[tuple[dict[str, Any], dict]] = []  # (overrides with seed, resolved config)
    errors: dict[str, list[str]] = {}
    for over in combos:
        for seed in seeds:
            point_over = {**over, "seed": seed}
            # base <- the sweep's eval settings <- the point's own keys (a bundle may set eval.preset)
            raw = _nest({**_apply({**base, **eval_over}, over), "seed": seed})
            try:
                cfg = _validate_point(raw)
            except ConfigError as exc:
                for problem in exc.problems:
                    errors.setdefault(problem, []).append(_describe(point_over))
                continue
            resolved = config_to_dict(cfg)
            resolved.pop("out", None)
            specs.append((point_over, resolved))
    if errors:
        total = len(combos) * len(seeds)
        raise SweepError(path, [_locate(p, where, total, axes, base, eval_over) for p, where in errors.items()])

    out = Path(out_dir) if out_dir is not None else Path(doc.get("out_dir") or Path("runs") / name)
    points = _name_points(path, out, specs, baseline)
    return Sweep(path=path, name=name, out_dir=out, points=points, seeds=seeds)


def _locate(problem: str, where: list[str], total: int, axes, base: dict, eval_over: dict) -> str:
    """A config problem with where it comes from (grid key, base, eval, which points)."""
    quoted = re.search(r"'([^']+)'", problem)
    token = quoted.group(1) if quoted else ""
    origin = ""
    for key, options in axes:
        if token == key or token in {k for opt in options for k in opt}:
            origin = f"grid key '{key}': "
            break
    else:
        if token in base:
            origin = "base: "
        elif token in eval_over:
            origin = "eval: "
    hint = ""
    if re.match(r"unknown (method|task) '", problem):
        hint = (" — a method or task exists only once its module is installed; drop it from this sweep "
                "or keep it in a sweep file of its own until it lands")
    scope = f"all {total} points" if len(where) == total else (
        f"{len(where)} of {total} points, e.g. {where[0]}" if len(where) > 1 else f"point {where[0]}"
    )
    return f"{origin}{problem}{hint} ({scope})"


# --------------------------------------------------------------------------------------------
# Naming
# --------------------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    if value is None:
        text = "none"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "+".join(_format_value(v) for v in value)
    elif isinstance(value, dict):
        text = _digest(value)[:6]
    elif isinstance(value, str) and ("/" in value or os.sep in value):
        text = Path(value.rstrip("/")).name or value
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text)


def _fragment(label: str, value: Any) -> str:
    if isinstance(value, bool):
        return label if value else f"no_{label}"
    text = _format_value(value)
    if label[-1:].isalpha() and (text[:1].isdigit() or (text[:1] in "-." and text[1:2].isdigit())):
        return f"{label}{text}"
    return f"{label}_{text}"


def _labels(keys: list[str]) -> dict[str, str]:
    short = {k: NAME_ALIASES.get(k, k.rsplit(".", 1)[-1]) for k in keys}
    counts: dict[str, int] = {}
    for label in short.values():
        counts[label] = counts.get(label, 0) + 1
    return {k: (label if counts[label] == 1 else k.replace(".", "_")) for k, label in short.items()}


def _naming_keys(overs: list[dict[str, Any]], groups: list[tuple]) -> list[str]:
    """Keys worth a name fragment: they vary between points that share task and method."""
    order: list[str] = []
    for over in overs:
        for k in over:
            if k not in order and k not in ("seed", "task.name", "method.name"):
                order.append(k)
    keep = []
    for key in order:
        by_group: dict[tuple, set] = {}
        for over, group in zip(overs, groups):
            by_group.setdefault(group, set()).add(json.dumps(over.get(key, "<unset>"), sort_keys=True, default=str))
        if any(len(vals) > 1 for vals in by_group.values()):
            keep.append(key)
    return keep


def _name_points(path: Path, out: Path, specs: list[tuple[dict, dict]], baseline: bool) -> list[SweepPoint]:
    problems = []
    hashes: dict[str, str] = {}
    train_specs = []
    for over, cfg in specs:
        th = _digest(train_part(cfg))
        key = th + _digest(cfg["eval"])
        if key in hashes:
            problems.append(f"points {hashes[key]} and {_describe(over)} resolve to the same config: remove one")
            continue
        hashes[key] = _describe(over)
        train_specs.append((over, cfg, th))
    if problems:
        raise SweepError(path, problems)

    groups = [(cfg["task"]["name"], cfg["method"]["name"]) for _, cfg, _ in train_specs]
    keys = _naming_keys([o for o, _, _ in train_specs], groups)
    labels = _labels(keys)
    names = []
    for (over, _, _), (task, method) in zip(train_specs, groups):
        parts = [task, method] + [_fragment(labels[k], over[k]) for k in keys if k in over]
        names.append("-".join(parts + [f"seed{over['seed']}"]))

    base_specs: list[tuple[dict, dict, str]] = []
    if baseline:
        seen: dict[str, int] = {}
        for over, cfg, _ in train_specs:
            bh = _digest(train_part(cfg, "base"))
            identity = bh + _digest(cfg["eval"])
            if identity in seen:
                continue
            seen[identity] = len(base_specs)
            relevant = {k: v for k, v in over.items() if k.startswith(BASELINE_PREFIXES + ("eval.",)) or k in BASELINE_KEYS}
            base_specs.append((relevant, cfg, bh))
    base_names = []
    if base_specs:
        defaults = flat_config(config_to_dict(RunConfig()))
        bkeys = _naming_keys([o for o, _, _ in base_specs], [(c["task"]["name"],) for _, c, _ in base_specs])
        blabels = _labels(bkeys)
        for over, cfg, _ in base_specs:
            # Only non-default values name a baseline, so sweeps sharing an out_dir share its baseline.
            parts = [cfg["task"]["name"], "base"] + [
                _fragment(blabels[k], over[k]) for k in bkeys if k in over and over[k] != defaults.get(k, _MISSING)
            ]
            base_names.append("-".join(parts))

    all_names = base_names + names
    dupes = {n for n in all_names if all_names.count(n) > 1}
    hashes_in_order = [h for _, _, h in base_specs] + [h for _, _, h in train_specs]
    all_names = [f"{n}-{h[:6]}" if n in dupes else n for n, h in zip(all_names, hashes_in_order)]

    points = []
    for i, (over, cfg, h) in enumerate(base_specs):
        points.append(SweepPoint(i, all_names[i], "base", out / all_names[i], over, cfg, h, _digest(cfg["eval"])))
    for j, (over, cfg, h) in enumerate(train_specs):
        i = len(base_specs) + j
        points.append(SweepPoint(i, all_names[i], "train", out / all_names[i], over, cfg, h, _digest(cfg["eval"])))
    return points


# --------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _checkpoint_steps(run: Path) -> list[int]:
    steps = []
    for p in (run / "checkpoints").glob("step-*"):
        try:
            steps.append(int(p.name.split("-", 1)[1]))
        except ValueError:
            continue
    return sorted(steps)


def _changed_keys(old: dict, new: dict) -> tuple[list[str], bool]:
    """(keys whose values differ, whether only tunelab-side key additions/removals differ)."""
    shared = set(old) & set(new)
    same = lambda k: json.dumps(old[k], sort_keys=True, default=str) == json.dumps(new[k], sort_keys=True, default=str)  # noqa: E731
    differ = sorted(k for k in shared if not same(k))
    return differ, not differ


def _lock_path(sweep: Sweep, point: SweepPoint) -> Path:
    return sweep.out_dir / ".locks" / f"{point.name}.lock"


def _is_locked(path: Path) -> bool:
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


def _first_line(path: Path) -> str:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("error:"):
                return line[len("error:"):].strip()
        return path.read_text().splitlines()[0]
    except (OSError, IndexError):
        return ""


def point_status(sweep: Sweep, point: SweepPoint, check_lock: bool = True) -> PointStatus:
    """done / failed / pending / running / conflict, with a one-line detail."""
    run = point.run_dir
    if check_lock and _is_locked(_lock_path(sweep, point)):
        return PointStatus("running", "another process holds this point's lock")
    if not run.is_dir() or not any(run.iterdir()):
        return PointStatus("pending", "not started")
    meta = _read_json(run / STATE_FILE)
    if meta is None:
        if (run / "config.yaml").is_file():
            return PointStatus(
                "conflict", f"{run} holds a run this sweep did not start (no {STATE_FILE}): move it away or set another out_dir"
            )
        return PointStatus("pending", "not started")
    old_part, new_part = meta.get("train_part") or {}, train_part(point.config, point.kind)
    same_train = meta.get("train_hash") == point.train_hash
    if not same_train and old_part and meta.get("kind") == point.kind:
        changed, only_schema = _changed_keys(old_part, new_part)
        same_train = only_schema  # tunelab added/removed config keys since; values that exist agree
    else:
        changed = sorted(k for k in set(old_part) | set(new_part) if old_part.get(k, _MISSING) != new_part.get(k, _MISSING))
    if not same_train:
        if meta.get("sweep") != sweep.name:
            return PointStatus(
                "conflict", f"{run} belongs to sweep '{meta.get('sweep')}' with another config: give this sweep its own out_dir"
            )
        shown = ", ".join(f"{k}: {old_part.get(k, '-')!r} -> {new_part.get(k, '-')!r}" for k in changed[:3])
        more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
        return PointStatus("pending", f"config changed ({shown}{more}); the old run moves to .superseded/", stale_train=True)
    if (run / FAILED_FILE).is_file():
        return PointStatus("failed", _first_line(run / FAILED_FILE))
    trained = point.kind == "base" or (run / "results.json").is_file()
    evaluated = (run / "eval" / "results.json").is_file()
    same_eval = meta.get("eval_hash") == point.eval_hash
    if trained and evaluated and same_eval:
        return PointStatus("done", "")
    if trained and evaluated:
        return PointStatus("pending", "eval settings changed: will evaluate again", stale_eval=True)
    if trained:
        return PointStatus("pending", "trained; evaluation pending" if point.kind == "train" else "evaluation pending")
    steps = _checkpoint_steps(run)
    if steps:
        return PointStatus("pending", f"unfinished: resumes from the checkpoint at step {steps[-1]}")
    return PointStatus("pending", "unfinished, no checkpoint: starts over")


def pending_indices(sweep: Sweep) -> list[int]:
    """Indices of the points that running the sweep would run (for a launcher's job array)."""
    return [p.index for p in sweep.points if point_status(sweep, p).state in ("pending", "failed")]


def point_command(sweep: Sweep, index: int) -> list[str]:
    """The command that runs one point (what a job-array task executes)."""
    sweep.point(index)
    cmd = ["tunelab", "sweep", str(sweep.path), "--point", str(index)]
    return cmd + ["--out-dir", str(sweep.out_dir)]


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


class StageFailed(Exception):
    def __init__(self, stage: str, rc: int, error: str, command: list[str], tail: str):
        super().__init__(error)
        self.stage, self.rc, self.error, self.command, self.tail = stage, rc, error, command, tail


class Interrupted(Exception):
    """The stage was stopped by a signal (preemption / Ctrl-C); the point stays pending."""


@contextmanager
def _point_lock(path: Path) -> Iterator[bool]:
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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _stage_commands(point: SweepPoint) -> list[tuple[str, list[str]]]:
    """(stage, tunelab argv) for a point from scratch."""
    run = str(point.run_dir)
    cfg = str(point.run_dir / CONFIG_FILE)
    if point.kind == "base":
        return [("eval", ["eval", "--base", "--config", cfg, f"out={run}", *point.eval_overrides()])]
    return [("train", ["train", "--config", cfg, f"out={run}"]), ("eval", ["eval", run, *point.eval_overrides()])]


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])


def _error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Diverged|Interrupt)\b|tunelab \w+: )", line):
            return line
    return lines[-1] if lines else "(no output)"


def _run_subprocess(argv: list[str], log_fh, echo: bool) -> tuple[int, str]:
    """Run ``python -m tunelab ARGV``; output goes to the log (and the terminal with echo)."""
    cmd = [sys.executable, "-m", "tunelab", *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TUNELAB_DEBUG": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    got_signal: list[int] = []

    def forward(signum, frame):  # noqa: ARG001
        got_signal.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)  # the trainer checkpoints at the end of its step and exits 143

    old = {}
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            old[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread
            pass
    recent = bytearray()
    try:
        assert proc.stdout is not None
        while True:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            log_fh.write(chunk)
            log_fh.flush()
            recent.extend(chunk)
            del recent[:-32768]
            if echo:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
        rc = proc.wait()
    except KeyboardInterrupt:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise Interrupted("interrupted by Ctrl-C") from None
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if got_signal or rc == PREEMPT_EXIT_CODE:
        raise Interrupted(f"stopped by signal {got_signal[0] if got_signal else 'SIGTERM'} (exit {rc})")
    return rc, recent.decode("utf-8", "replace")


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()

    def isatty(self):
        return False

    @property
    def encoding(self):
        return "utf-8"


def _run_in_process(argv: list[str], log_fh) -> tuple[int, str]:
    """Run the same ``tunelab ARGV`` inside this process (exceptions are caught, not isolated)."""
    import io

    from tunelab.cli import main

    buf = io.StringIO()
    old_debug = os.environ.get("TUNELAB_DEBUG")
    os.environ["TUNELAB_DEBUG"] = "1"  # let exceptions reach us with their traceback
    try:
        with redirect_stderr(_Tee(sys.stderr, buf)):
            try:
                rc = int(main(argv) or 0)
            except KeyboardInterrupt:
                raise Interrupted("interrupted by Ctrl-C") from None
            except SystemExit as exc:  # the trainer's preemption exit, or argparse
                if exc.code == PREEMPT_EXIT_CODE:
                    raise Interrupted("stopped by a signal after a checkpoint") from None
                rc = exc.code if isinstance(exc.code, int) else 1
            except Exception:  # a failing point must not stop the others
                traceback.print_exc(file=buf)
                rc = 1
    finally:
        if old_debug is None:
            os.environ.pop("TUNELAB_DEBUG", None)
        else:
            os.environ["TUNELAB_DEBUG"] = old_debug
    text = buf.getvalue()
    log_fh.write(text.encode())
    log_fh.flush()
    return rc, text


def _move_aside(src: Path, dest_dir: Path, tag: str) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{src.name}-{tag}"
    if dest.exists():
        dest = dest_dir / f"{src.name}-{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.move(str(src), str(dest))
    return dest


def run_point(sweep: Sweep, point: SweepPoint, *, in_process: bool = False, echo: bool = False,
              say=print) -> str:
    """Bring one point to done. Returns done / skipped / failed / busy / conflict."""
    with _point_lock(_lock_path(sweep, point)) as got:
        if not got:
            say(f"  [{point.index}] {point.name}: running in another process, skipped")
            return "busy"
        status = point_status(sweep, point, check_lock=False)
        if status.state == "done":
            return "skipped"
        if status.state == "conflict":
            say(f"  [{point.index}] {point.name}: not run: {status.detail}")
            return "conflict"
        run = point.run_dir
        meta = _read_json(run / STATE_FILE) or {}
        if status.stale_train:
            moved = _move_aside(run, sweep.out_dir / ".superseded", str(meta.get("train_hash", "old"))[:8])
            say(f"  [{point.index}] {point.name}: config changed; previous run kept at {moved}")
            meta = {}
        elif status.stale_eval:
            old_eval = run / f"eval.superseded-{str(meta.get('eval_hash', 'old'))[:8]}"
            if old_eval.exists():
                old_eval = old_eval.with_name(f"{old_eval.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            (run / "eval").rename(old_eval)
        run.mkdir(parents=True, exist_ok=True)
        (run / FAILED_FILE).unlink(missing_ok=True)
        with open(run / CONFIG_FILE, "w") as fh:
            yaml.safe_dump(point.config, fh, sort_keys=False)
        attempts = list(meta.get("attempts", []))
        attempt: dict[str, Any] = {"started": _now(), "executor": "in-process" if in_process else "subprocess", "stages": {}}
        attempts.append(attempt)
        state = {
            "sweep": sweep.name, "sweep_file": str(sweep.path), "index": point.index, "name": point.name,
            "kind": point.kind, "overrides": point.overrides, "train_hash": point.train_hash,
            "eval_hash": point.eval_hash, "train_part": train_part(point.config, point.kind),
            "config": point.config, "attempts": attempts[-20:],
        }
        _write_json(run / STATE_FILE, state)

        fresh = _stage_commands(point)
        stages: list[tuple[str, list[str]]] = []
        if point.kind == "train" and not (run / "results.json").is_file():
            if _checkpoint_steps(run):
                stages.append(("train", ["train", "--resume", str(run)]))
            else:
                # started before but left no checkpoint: clear the partial run and start over
                for child in run.iterdir():
                    if child.name not in (STATE_FILE, CONFIG_FILE, LOG_FILE):
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
                stages.append(fresh[0])
        if stages or not (run / "eval" / "results.json").is_file():
            stages.append(fresh[-1])
        try:
            with open(run / LOG_FILE, "ab") as log_fh:
                for stage, argv in stages:
                    header = f"\n=== {_now()} {stage}: {shlex.join(['tunelab', *argv])}\n"
                    log_fh.write(header.encode())
                    log_fh.flush()
                    say(f"  [{point.index}] {point.name}: {stage} ...")
                    t0 = time.time()
                    if in_process:
                        rc, text = _run_in_process(argv, log_fh)
                    else:
                        rc, text = _run_subprocess(argv, log_fh, echo)
                    attempt["stages"][stage] = {"rc": rc, "seconds": round(time.time() - t0, 2)}
                    _write_json(run / STATE_FILE, state)
                    if rc != 0:
                        raise StageFailed(stage, rc, _error_line(text), ["tunelab", *argv], _tail(text))
        except StageFailed as exc:
            attempt["outcome"] = "failed"
            _write_json(run / STATE_FILE, state)
            (run / FAILED_FILE).write_text(
                f"stage: {exc.stage}\nerror: {exc.error}\nexit code: {exc.rc}\ncommand: {shlex.join(exc.command)}\n"
                f"log: {run / LOG_FILE}\ntime: {_now()}\n--- last lines of the log ---\n{exc.tail}\n"
            )
            say(f"  [{point.index}] {point.name}: FAILED in {exc.stage}: {exc.error}")
            return "failed"
        except Interrupted as exc:
            attempt["outcome"] = f"interrupted: {exc}"
            _write_json(run / STATE_FILE, state)
            raise
        attempt["outcome"] = "done"
        _write_json(run / STATE_FILE, state)
        summary = _quality_summary(run)
        say(f"  [{point.index}] {point.name}: done{summary}")
        return "done"


def _quality_summary(run: Path) -> str:
    res = _read_json(run / "eval" / "results.json") or {}
    metric = res.get("primary_metric")
    value = (res.get("metrics") or {}).get(metric)
    return f" ({metric}={value:.4g})" if isinstance(value, (int, float)) else ""


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


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _print_list(sweep: Sweep, indices: list[int] | None, as_json: bool) -> None:
    selected = [sweep.point(i) for i in indices] if indices else sweep.points
    rows = []
    for p in selected:
        st = point_status(sweep, p)
        rows.append({"index": p.index, "name": p.name, "kind": p.kind, "status": st.state, "detail": st.detail,
                     "run_dir": str(p.run_dir), "overrides": p.overrides})
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    width = max([len(r["name"]) for r in rows] + [4])
    print(f"sweep '{sweep.name}' ({sweep.path}): {len(sweep.points)} points in {sweep.out_dir}")
    print(f"{'#':>4}  {'name':<{width}}  {'status':<8}  detail")
    for r in rows:
        print(f"{r['index']:>4}  {r['name']:<{width}}  {r['status']:<8}  {r['detail']}")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print("  " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))


def _print_dry_run(sweep: Sweep, indices: list[int] | None) -> None:
    selected = [sweep.point(i) for i in indices] if indices else sweep.points
    print(f"sweep '{sweep.name}': would run in {sweep.out_dir} (nothing is written by --dry-run)")
    for p in selected:
        st = point_status(sweep, p)
        if st.state == "done":
            print(f"[{p.index}] {p.name}: done, skipped")
            continue
        print(f"[{p.index}] {p.name}: {st.state}{': ' + st.detail if st.detail else ''}")
        print(f"    overrides: {_describe(p.overrides)}")
        for stage, argv in _stage_commands(p):
            print(f"    {stage}: {shlex.join(['tunelab', *argv])}")


def cmd_sweep(args) -> int:
    from tunelab.utils import log

    sweep = load_sweep(args.file, out_dir=args.out_dir)
    indices = sorted(set(args.point)) if args.point else None
    if indices:
        for i in indices:
            sweep.point(i)  # range check with a clear message
    if args.list:
        _print_list(sweep, indices, args.json)
        return 0
    if args.dry_run:
        _print_dry_run(sweep, indices)
        return 0
    try:
        summary = run_sweep(sweep, indices, in_process=args.in_process, echo=args.verbose, say=log.info)
    except Interrupted as exc:
        log.warning(f"sweep stopped: {exc}; run the same command again to resume")
        return PREEMPT_EXIT_CODE
    if summary.counts["done"] or summary.counts["skipped"]:
        log.info(f"report: tunelab report {sweep.out_dir} --out {sweep.out_dir}/report")
    return 0 if summary.ok else 1


def add_cli(sub) -> None:
    import argparse

    p = sub.add_parser(
        "sweep", help="run a grid of runs (train + eval each point), resumable",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every point of a sweep file that is not finished yet, one after another: train, then "
        "evaluate (baseline points evaluate the untrained model). Finished points are skipped; failed points "
        "are recorded in RUN/FAILED and retried next time. See 'Experiments' in README.md for the file format.",
        epilog="examples:\n"
        "  tunelab sweep configs/sweeps/cpu-smollm2-gsm8k.yaml --list\n"
        "  tunelab sweep configs/sweeps/cpu-smollm2-gsm8k.yaml\n"
        "  tunelab sweep configs/sweeps/cpu-smollm2-gsm8k.yaml --point 3     # one point (a job-array task)\n"
        "  tunelab report runs/cpu-smollm2-gsm8k --out runs/cpu-smollm2-gsm8k/report\n",
    )
    p.add_argument("file", help="sweep YAML file")
    p.add_argument("--list", action="store_true", help="show the points: index, run name, status (done/failed/pending)")
    p.add_argument("--json", action="store_true", help="with --list: machine-readable output")
    p.add_argument("--dry-run", action="store_true", help="print what would run (commands per point) and exit")
    p.add_argument("--point", type=int, action="append", metavar="I",
                   help="only point I (repeatable); for job arrays: --point $SLURM_ARRAY_TASK_ID")
    p.add_argument("--out-dir", help="folder of the run directories (overrides the file's out_dir)")
    p.add_argument("--in-process", action="store_true",
                   help="run each point inside this process instead of a fresh `python -m tunelab` (no isolation; "
                   "CPU peak memory then accumulates across points)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also stream each command's output here (it always goes to RUN/sweep.log)")
    p.set_defaults(handler=cmd_sweep)

"""The sweep file: its typed top level, its sections read and checked, and its named points.

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

Every point is validated with :func:`tunelab.config.load_config` when the file is read
(:mod:`tunelab.experiments.expand`), so a typo, an unknown key or a method/task that is not
installed stops the sweep before anything runs; every problem of the file is reported at once
(:class:`SweepError`), each with where it comes from and its fix. Point names come from
:mod:`tunelab.experiments.naming`. The checks of the grid, points and seeds are written here rather than left to
the config builder because their messages name the sweep-file fix (``use the top-level seeds:``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from tunelab.config import ConfigError, RunConfig, build_dataclass, config_to_dict, opt
from tunelab.config.build import SHORTHANDS
from tunelab.experiments.expand import combinations, describe_overrides, flatten, resolve_points
from tunelab.experiments.naming import baseline_names, train_names, unique_names
from tunelab.experiments.state import BASELINE_KEYS, BASELINE_PREFIXES, digest, flat_config, train_part


class SweepError(ConfigError):
    """Every problem of a sweep file at once, each naming its fix."""

    def __init__(self, path: Path | str, problems: list[str]):
        super().__init__(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        self.args = (f"{len(self.problems)} problem(s) in sweep file {path}:\n{lines}",)


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


@dataclass
class SweepFile:
    """The top level of a sweep file (run settings go under ``base:``).

    Fields typed ``Any`` are checked by this module's readers, whose messages name the fix.
    """

    name: Any = opt(None, "sweep name (default: the file name); it names a folder: letters, digits and . _ + -")
    description: Any = opt(None, "free text (not read; any YAML value is accepted)")
    base: Any = opt(None, "run config mapping shared by every point")
    grid: Any = opt(None, "mapping {dotted key: [values]} expanded as a cartesian product")
    points: Any = opt(None, "list of override mappings, each one more point")
    seeds: Any = opt(None, "list of seeds; every point runs once per seed")
    eval: Any = opt(None, "eval settings (keys of the eval section) for every point's evaluation")
    baseline: bool = opt(False, "true: evaluate the untrained base model once per task")
    out_dir: Optional[str] = opt(None, "folder of the run directories (default runs/<name>)")


#: Top-level keys of a sweep file (shown in errors).
SWEEP_KEYS = tuple(f.name for f in dataclasses.fields(SweepFile))


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


# --------------------------------------------------------------------------------------------
# Reading the file's sections
# --------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise SweepError(path, [f"sweep file '{path}' does not exist (see configs/sweeps/ for examples)"])
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(path, [f"not valid YAML: {exc}"]) from None
    if not isinstance(doc, dict):
        raise SweepError(path, ["a sweep file must be a mapping with base:, grid: and/or points: (see 'Experiments' in README.md)"])
    return doc


def _read_top_level(doc: dict, problems: list[str]) -> SweepFile:
    """The known top-level keys as a :class:`SweepFile`; unknown ones are problems (with the closest key)."""
    for key in doc:
        if key not in SWEEP_KEYS:
            match = difflib.get_close_matches(str(key), list(SWEEP_KEYS), n=1, cutoff=0.5)
            hint = f"; did you mean '{match[0]}'?" if match else ""
            problems.append(
                f"unknown sweep key '{key}'{hint} (known: {', '.join(SWEEP_KEYS)}; run settings go under base:)"
            )
    return build_dataclass(SweepFile, {k: v for k, v in doc.items() if k in SWEEP_KEYS}, "", problems)


def _sweep_name(raw: Any, path: Path, problems: list[str]) -> str:
    name = str(raw or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        problems.append(f"name '{name}' may only hold letters, digits and . _ + - (it names a folder)")
    return name


def _base_overrides(raw: Any, problems: list[str]) -> dict[str, Any]:
    base = flatten(raw, "base", problems)
    if "out" in base:
        problems.append(
            "base.out is set: every point gets its own run directory under out_dir; remove out (set out_dir: instead)"
        )
        base.pop("out")
    return base


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _seeds(raw: Any, base: dict[str, Any], problems: list[str]) -> list[int]:
    """The sweep's seeds: ``seeds:`` (a list, or one seed), else the base config's seed."""
    if raw is None:
        base_seed = base.get("seed", RunConfig().seed)
        if _is_int(base_seed):
            return [base_seed]
        problems.append(f"base.seed must be an integer, got {base_seed!r}")
        return []
    listed = raw if isinstance(raw, list) else [raw]
    seeds = [s for s in listed if _is_int(s)]
    if not listed or len(seeds) != len(listed):
        problems.append(f"seeds must be a non-empty list of integers, got {raw!r}")
    elif len(set(seeds)) != len(seeds):
        problems.append(f"seeds lists a seed twice: {listed}")
    return seeds


def _eval_overrides(raw: Any, problems: list[str]) -> dict[str, Any]:
    """The sweep's eval settings as ``eval.KEY`` overrides (``limit`` and ``eval.limit`` both accepted)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"eval must be a mapping of eval settings (e.g. {{limit: 100}}), got {raw!r}")
        return {}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        sub = key[5:] if key.startswith("eval.") else key
        if "." in sub:
            problems.append(
                f"eval: '{key}' is not an eval setting (only keys of the eval section, e.g. limit, max_new_tokens)"
            )
            continue
        out[f"eval.{sub}"] = value
    return out


def _axis_options(key: str, values: Any, problems: list[str]) -> Optional[list[dict[str, Any]]]:
    """One grid axis as a list of override mappings, or None (with the problem) when it is unusable."""
    label = f"grid key '{key}'"
    if key in ("seed", "seeds"):
        problems.append(f"{label}: list seeds with the top-level seeds: [..] key, not in the grid")
        return None
    if key == "out":
        problems.append(f"{label}: the run directory is set per point; use out_dir: for the folder")
        return None
    if not isinstance(values, list):
        problems.append(f"{label} must list its values, e.g. {key}: [{values!r}], got {values!r}")
        return None
    if not values:
        problems.append(f"{label} has no values: list at least one, or remove the key")
        return None
    bundles = [isinstance(v, dict) for v in values]
    if any(bundles) and not all(bundles):
        problems.append(f"{label} mixes mappings and plain values: use all mappings (a bundle axis) or all values")
        return None
    if all(bundles):
        options = [flatten(v, f"{label} value {i}", problems) for i, v in enumerate(values)]
    else:
        options = [{SHORTHANDS.get(key, key): v} for v in values]
    seen: list[str] = []
    for option in options:
        sig = json.dumps(option, sort_keys=True, default=str)
        if sig in seen:
            problems.append(f"{label} lists {describe_overrides(option)} twice")
        seen.append(sig)
    return options


def _grid_axes(raw: Any, problems: list[str]) -> list[tuple[str, list[dict[str, Any]]]]:
    if not isinstance(raw, dict) or not raw:
        problems.append(
            "grid is empty: give at least one key with a list of values (e.g. grid: {method.rank: [4, 8]}), "
            "or remove grid: and list points:"
        )
        return []
    axes = []
    for key, values in raw.items():
        options = _axis_options(str(key), values, problems)
        if options is not None:
            axes.append((str(key), options))
    return axes


def _explicit_points(raw: Any, problems: list[str]) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        problems.append("points must be a non-empty list of override mappings (e.g. - {method: full})")
        return []
    explicit = []
    for i, entry in enumerate(raw):
        over = flatten(entry, f"points[{i}]", problems)
        for bad in ("seed", "out"):
            if bad in over:
                fix = "use the top-level seeds: list" if bad == "seed" else "run directories are named by the sweep"
                problems.append(f"points[{i}] sets '{bad}': {fix}")
                over.pop(bad)
        explicit.append(over)
    return explicit


# --------------------------------------------------------------------------------------------
# Points
# --------------------------------------------------------------------------------------------


def _train_specs(path: Path, specs: list[tuple[dict, dict]]) -> list[tuple[dict, dict, str]]:
    """(overrides, config, train hash) per training point; two points with one config are a problem."""
    problems = []
    seen: dict[str, str] = {}
    out = []
    for over, cfg in specs:
        th = digest(train_part(cfg))
        key = th + digest(cfg["eval"])
        if key in seen:
            problems.append(f"points {seen[key]} and {describe_overrides(over)} resolve to the same config: remove one")
            continue
        seen[key] = describe_overrides(over)
        out.append((over, cfg, th))
    if problems:
        raise SweepError(path, problems)
    return out


def _baseline_specs(train_specs: list[tuple[dict, dict, str]]) -> list[tuple[dict, dict, str]]:
    """One baseline per distinct (model, task, max_length, eval settings) among the training points."""
    seen: set[str] = set()
    out = []
    for over, cfg, _ in train_specs:
        bh = digest(train_part(cfg, "base"))
        identity = bh + digest(cfg["eval"])
        if identity in seen:
            continue
        seen.add(identity)
        relevant = {k: v for k, v in over.items() if k.startswith(BASELINE_PREFIXES + ("eval.",)) or k in BASELINE_KEYS}
        out.append((relevant, cfg, bh))
    return out


def _build_points(path: Path, out: Path, specs: list[tuple[dict, dict]], baseline: bool) -> list[SweepPoint]:
    """Baselines first, then the training points, each with its name, run directory and hashes."""
    trained = _train_specs(path, specs)
    bases = _baseline_specs(trained) if baseline else []
    names = train_names([(o, c) for o, c, _ in trained])
    if bases:
        defaults = flat_config(config_to_dict(RunConfig()))
        names = baseline_names([(o, c) for o, c, _ in bases], defaults) + names
    ordered = [("base", *b) for b in bases] + [("train", *t) for t in trained]
    names = unique_names(names, [h for _, _, _, h in ordered])
    return [SweepPoint(i, name, kind, out / name, over, cfg, h, digest(cfg["eval"]))
            for i, (name, (kind, over, cfg, h)) in enumerate(zip(names, ordered))]


def load_sweep(path: str | Path, out_dir: str | Path | None = None) -> Sweep:
    """Read, expand and validate a sweep file; raises :class:`SweepError` listing every problem."""
    path = Path(path)
    doc = _read_yaml(path)
    problems: list[str] = []
    spec = _read_top_level(doc, problems)
    name = _sweep_name(spec.name, path, problems)
    base = _base_overrides(spec.base, problems)
    seeds = _seeds(spec.seeds, base, problems)
    base.pop("seed", None)
    eval_over = _eval_overrides(spec.eval, problems)
    axes = _grid_axes(spec.grid, problems) if "grid" in doc else []
    explicit = _explicit_points(spec.points, problems)
    if problems:
        raise SweepError(path, problems)
    combos = combinations(axes, explicit, problems)
    if problems:
        raise SweepError(path, list(dict.fromkeys(problems)))
    specs, problems = resolve_points(combos, seeds, base, eval_over, axes)
    if problems:
        raise SweepError(path, problems)
    out = Path(out_dir) if out_dir is not None else Path(spec.out_dir or Path("runs") / name)
    return Sweep(path=path, name=name, out_dir=out, points=_build_points(path, out, specs, spec.baseline), seeds=seeds)

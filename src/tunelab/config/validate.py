"""Range checks and cross-field rules of a whole :class:`RunConfig`; each problem names its fix.

The method and the task add their own rules through their ``validate`` classmethods, looked up in
the registries (so this module imports no method or task).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.config.schema import RunConfig, TrainConfig


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
    if e.lookup_tokens < 0:
        p.append(f"eval.lookup_tokens must be >= 0 (0 = no prompt lookup), got {e.lookup_tokens}")
    p.extend(quantization_problems(cfg, check_env))
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
    p.extend(precision_problems(cfg, check_env))
    p.extend(train_eval_problems(cfg))
    p.extend(packing_problems(cfg))
    p.extend(prompt_format_problems(cfg))
    p.extend(user_data_problems(cfg))
    p.extend(METHODS.get(cfg.method.name).validate(cfg))
    p.extend(TASKS.get(cfg.task.name).validate(cfg))
    p.extend(harness_problems(cfg))
    return p


#: below this many tokens a packed row holds hardly more than one example (GSM8K's are ~150 tokens)
MIN_PACKED_ROW_TOKENS = 64


def packing_problems(cfg: RunConfig) -> list[str]:
    """data.packing: attention that keeps packed examples apart, rows long enough to pack into."""
    if not cfg.data.packing:
        return []
    from tunelab.data.packing import MASK_ATTENTION, VARLEN_ATTENTION

    p = []
    impl = cfg.model.attn_implementation
    if impl not in MASK_ATTENTION + VARLEN_ATTENTION:
        p.append(f"data.packing=true with model.attn_implementation={impl}: packed examples are kept apart only under "
                 f"{', '.join(MASK_ATTENTION)} (per-example sdpa, a 4D block-diagonal mask) or flash-attention's varlen "
                 f"path ({', '.join(VARLEN_ATTENTION)}); set model.attn_implementation=sdpa, or data.packing=false")
    if cfg.data.max_length < MIN_PACKED_ROW_TOKENS:
        p.append(f"data.packing=true with data.max_length={cfg.data.max_length}: a packed row holds at most max_length "
                 f"tokens, too few to pack examples into; raise data.max_length to {MIN_PACKED_ROW_TOKENS} or more "
                 f"(the default 720 suits GSM8K), or set data.packing=false")
    return p


def train_eval_problems(cfg: RunConfig) -> list[str]:
    """Evaluation during training (train.eval_*, early stopping) and its held-out set (data.eval_fraction).

    Whether the task's eval split exists is known only once the task loads it: the trainer says so then,
    before the model loads (tunelab.train.evaluator.load_held_out)."""
    p: list[str] = []
    t, d = cfg.train, cfg.data
    if not 0.0 <= d.eval_fraction < 1.0:
        p.append(f"data.eval_fraction must be in [0, 1) (the share of the training data held out), got {d.eval_fraction}")
    if t.eval_steps < 0:
        p.append(f"train.eval_steps must be >= 0 (evaluate every N optimizer steps; 0 = never), got {t.eval_steps}")
    if t.eval_limit is not None and t.eval_limit <= 0:
        p.append(f"train.eval_limit must be a positive number of held-out examples or null (all), got {t.eval_limit}")
    if t.early_stopping_patience < 0:
        p.append(f"train.early_stopping_patience must be >= 0 (0 = never stop early), got {t.early_stopping_patience}")
    if t.eval_steps <= 0:
        if t.early_stopping_patience > 0:
            p.append(f"train.early_stopping_patience={t.early_stopping_patience} watches the held-out loss, which "
                     f"needs train.eval_steps > 0: set train.eval_steps=N (e.g. 20), or drop early_stopping_patience")
        if t.eval_generate:
            p.append("train.eval_generate=true generates at each eval step, which needs train.eval_steps > 0: "
                     "set train.eval_steps=N, or drop train.eval_generate")
    elif d.eval_fraction == 0 and d.eval_split is None:
        p.append(f"train.eval_steps={t.eval_steps} needs a held-out set, and data.eval_split is null with "
                 f"data.eval_fraction=0: set data.eval_fraction=0.05 (5% of the training data held out) or "
                 f"data.eval_split=SPLIT, or set train.eval_steps=0")
    return p


def prompt_format_problems(cfg: RunConfig) -> list[str]:
    """task.chat_template must name a readable file (a tokenizer without a template is found at load time)."""
    from pathlib import Path

    path = cfg.task.chat_template
    if path and not Path(path).expanduser().is_file():
        return [f"task.chat_template={path}: no such file; give a Jinja chat-template file, or unset it to "
                f"use the tokenizer's own template"]
    return []


def user_data_problems(cfg: RunConfig) -> list[str]:
    """data.source and its companions (format, columns, subset, split, eval_split, revision) are read
    only by task=sft: set with another task they would be silently ignored."""
    if cfg.task.name == "sft":
        return []
    from tunelab.config.schema import DataConfig

    default = DataConfig()
    changed = [k for k in ("source", "format", "columns", "subset", "split", "eval_split", "revision")
               if getattr(cfg.data, k) != getattr(default, k)]
    if not changed:
        return []
    keys = ", ".join(f"data.{k}" for k in changed)
    return [f"{keys} {'is' if len(changed) == 1 else 'are'} read only by task=sft (this run has task={cfg.task.name}, "
            f"which reads its own data): set task=sft to train on data.source, or drop {keys}"]


def precision_problems(cfg: RunConfig, check_env: bool = True) -> list[str]:
    """train.precision against the model's dtype, the method and the machine (see tunelab.train.precision)."""
    from tunelab.registry import METHODS

    p: list[str] = []
    precision, dtype = cfg.train.precision, cfg.model.dtype
    if precision.endswith("-mixed") and dtype not in ("auto", "float32"):
        p.append(f"train.precision={precision} keeps fp32 master weights, but model.dtype={dtype}: leave "
                 f"model.dtype=auto (or float32), or use train.precision=bf16-true to train {dtype} weights")
    if precision == "fp32" and dtype not in ("auto", "float32"):
        p.append(f"train.precision=fp32 with model.dtype={dtype}: set model.dtype=auto, or train.precision=bf16-mixed")
    if precision == "bf16-true" and dtype not in ("auto", "bfloat16"):
        p.append(f"train.precision=bf16-true loads bfloat16 weights, but model.dtype={dtype}: set model.dtype=auto")
    if precision == "bf16-true" and METHODS.get(cfg.method.name).updates_base_weights:
        p.append(f"train.precision=bf16-true would update method={cfg.method.name}'s bf16 weights directly, where "
                 "small updates round to nothing: use train.precision=bf16-mixed (fp32 master weights)")
    if precision == "fp16-mixed":
        import torch

        if check_env and not torch.cuda.is_available():
            p.append("train.precision=fp16-mixed needs a CUDA GPU (fp16 autocast with a gradient scaler): "
                     "use train.precision=bf16-mixed or fp32 on this machine")
    return p


def _run_device(cfg: RunConfig):
    """The device this run will use, or None where that is not this machine's to say (an unavailable
    ``model.device=cuda`` is reported when the run starts)."""
    from tunelab.models import resolve_device

    try:
        return resolve_device(cfg.model.device)
    except (RuntimeError, ValueError):
        return None


def quantization_problems(cfg: RunConfig, check_env: bool = True) -> list[str]:
    """``model.load_in_4bit`` and ``train.optim``: bitsandbytes is probed on the run's device (4-bit
    forward and backward, an 8-bit AdamW step), so a machine that cannot is told before anything loads."""
    p: list[str] = []
    t = cfg.train
    device = _run_device(cfg) if check_env else None
    if cfg.model.load_in_4bit and device is not None:
        from tunelab.models import probe_4bit

        why = probe_4bit(device)
        if why:
            p.append(f"model.load_in_4bit=true: {why}. Install a bitsandbytes with 4-bit kernels for this device "
                     f"(pip install 'bitsandbytes>=0.48'; CPU support needs 0.48 or later), run on a CUDA GPU, "
                     f"or set model.load_in_4bit=false")
    if t.optim == "adamw":
        return p
    why_not = {  # both measured with bitsandbytes 0.50
        "fsdp": "bitsandbytes' 8-bit kernels refuse FSDP2's sharded (DTensor) parameters",
        "deepspeed": "ZeRO hands the optimizer one flat buffer, so the 8-bit blocks straddle tensors and the "
                     "update is not the same optimizer's (an adapter came out 17% off the run without DeepSpeed)",
    }.get(t.parallelism)
    if why_not:
        p.append(f"train.optim={t.optim} cannot run under train.parallelism={t.parallelism}: {why_not}. "
                 f"Use train.parallelism=ddp, or train.optim=adamw")
    on_cpu = cfg.model.device == "cpu" or (device is not None and device.type == "cpu")
    if t.optim.startswith("paged_") and on_cpu:
        p.append(f"train.optim={t.optim} needs a CUDA GPU (its optimizer state pages through CUDA unified "
                 f"memory); this run is on the CPU: use train.optim=adamw_8bit (8-bit state, not paged) or adamw")
    elif device is not None:
        from tunelab.methods.base import probe_8bit_optimizer

        why = probe_8bit_optimizer(t.optim, device)
        if why:
            p.append(f"train.optim={t.optim}: {why}. Install bitsandbytes (pip install 'bitsandbytes>=0.48'), "
                     f"or set train.optim=adamw")
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
    for section, wanted in (("bf16", ("bf16-mixed", "bf16-true")), ("fp16", ("fp16-mixed",))):
        enabled = ds.get(section, {}).get("enabled", "auto") if isinstance(ds.get(section), dict) else "auto"
        if enabled != "auto" and (train_cfg.precision == "auto" or (train_cfg.precision in wanted) != bool(enabled)):
            problems.append(f"{section}.enabled={enabled} but train.precision={train_cfg.precision} (say the precision "
                            f"once: set train.precision and leave {section}.enabled \"auto\" or out of the file)")
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


def harness_problems(cfg: RunConfig) -> list[str]:
    """Range checks of the harness section (task names are checked against the harness when it runs)."""
    h, p = cfg.harness, []
    bad = [t for t in h.tasks if not isinstance(t, str) or not t.strip()]
    if bad:
        p.append(f"harness.tasks must be harness task names (e.g. harness=gsm8k or harness=[gsm8k,arc_easy]), got {bad!r}")
    dup = sorted({t for t in h.tasks if isinstance(t, str) and h.tasks.count(t) > 1})
    if dup:
        p.append(f"harness.tasks names {', '.join(dup)} more than once: list each task once")
    if h.num_fewshot is not None and h.num_fewshot < 0:
        p.append(f"harness.num_fewshot must be >= 0 (0 = zero-shot) or null (the task's default), got {h.num_fewshot}")
    if h.limit is not None and h.limit < 1:
        p.append(f"harness.limit must be >= 1 documents per task or null (all), got {h.limit}")
    if h.batch_size < 1:
        p.append(f"harness.batch_size must be >= 1, got {h.batch_size}")
    if h.max_new_tokens is not None and h.max_new_tokens < 1:
        p.append(f"harness.max_new_tokens must be >= 1 or null (the task's own budget), got {h.max_new_tokens}")
    return p

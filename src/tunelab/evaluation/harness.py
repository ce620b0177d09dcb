"""lm-evaluation-harness on the model tunelab loaded: ``tunelab eval RUN harness=gsm8k``.

The harness (PyPI ``lm_eval``, the ``tunelab[harness]`` extra) is run through its Python API:
:func:`lm_eval.simple_evaluate` on an :class:`lm_eval.models.huggingface.HFLM` wrapped around the
model and tokenizer that :func:`tunelab.evaluation.evaluate.load_model_for_eval` returns, so a run's
adapter is applied (LoRA/RoSA merged in memory unless ``eval.merge_adapter=false``), and a full/GaLore
model, a merged folder or the base model are evaluated exactly as tunelab's own evaluation sees them. Prompts, few-shot sampling,
generation, filters and metrics are all the harness's; tunelab only chooses the task source, runs
it, and files the results. Nothing here re-implements harness logic (why would it: the point is the
published protocol).

Per task, under ``RUN/eval/harness/<task>/`` (:class:`tunelab.rundir.RunDir`)::

    lm_eval_results.json   the harness's own results object (results, configs, versions, n-shot, ...)
    samples.jsonl          the harness's per-sample log (one line per document and filter)
    results.json           tunelab's summary: metrics, primary metric and the "protocol" block

Offline: the harness's ``gsm8k`` task reads ``openai/gsm8k`` from the Hub. tunelab ships that task's
config with only the data files pointed at the local GSM8K folder (``harness_tasks/gsm8k.yaml``), and
uses it when the Hub cannot be reached. Any other task needs the Hub (or the datasets cache).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from tunelab.config import ConfigError, RunConfig
from tunelab.rundir import RunDir
from tunelab.utils import atomic_write_json, atomic_write_text, git_info, log, package_versions

SHIPPED_TASKS_DIR = Path(__file__).with_name("harness_tasks")
#: harness task -> tunelab task whose local data folder its shipped config reads
SHIPPED_TASKS = {"gsm8k": "gsm8k"}
INSTALL_HINT = "install the harness extra: pip install 'tunelab[harness]' (make setup does)"
#: protocol fields two harness evaluations must share to be compared example by example
PROTOCOL_KEYS = ("harness_version", "harness_task", "task_version", "task_config_sha256", "num_fewshot",
                 "fewshot_seed", "decoding", "max_new_tokens", "stop", "prompt_format", "chat_template_sha256",
                 "system_prompt")
#: task config keys that say where the data comes from (left out of the task hash), or that tunelab records apart
_DATA_KEYS = ("dataset_path", "dataset_name", "dataset_kwargs")


def require_lm_eval():
    """The imported ``lm_eval`` package, or a ConfigError naming the extra to install."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError([f"harness.tasks needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}"]) from None
    return lm_eval


def hub_unreachable(timeout_s: float = 3.0) -> Optional[str]:
    """Why the Hugging Face Hub cannot be used (offline flags, no connection), or None when it can."""
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(flag, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{flag}={os.environ[flag]} is set"
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError as exc:
        return f"{host} cannot be reached ({exc})"
    return None


@lru_cache(maxsize=1)
def task_manager():
    """The harness's task index (all of its built-in tasks, groups and tags; built once, a few seconds)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager()


def shipped_task_config(name: str, cfg: RunConfig) -> dict:
    """tunelab's shipped config of harness task ``name`` with its data files pointed at the local folder."""
    import yaml

    from tunelab.tasks import get_task

    tunelab_task = SHIPPED_TASKS[name]
    task_cfg = cfg.task if cfg.task.name == tunelab_task else get_task(tunelab_task).config_cls()
    data_dir = get_task(tunelab_task)(task_cfg).local_dir()  # raises, naming the fix, for a wrong data_dir
    if data_dir is None or not all((data_dir / f"{s}.jsonl").is_file() for s in ("train", "test")):
        where = f"{data_dir} lacks train.jsonl/test.jsonl" if data_dir else "no local GSM8K folder is configured"
        raise FileNotFoundError(where)
    config = yaml.safe_load((SHIPPED_TASKS_DIR / f"{name}.yaml").read_text())
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {k: v.format(data_dir=data_dir.resolve()) for k, v in files.items()}
    config.setdefault("metadata", {})["config_source"] = str(SHIPPED_TASKS_DIR / f"{name}.yaml")
    return config


def close_task_names(name: str, known: list[str], n: int = 5) -> list[str]:
    """Harness task names like ``name`` (for 'did you mean')."""
    return difflib.get_close_matches(name, known, n=n, cutoff=0.6)


def resolve_task_specs(cfg: RunConfig, offline: Optional[str]) -> dict[str, tuple[Any, str]]:
    """harness task name -> (what the harness loads: its name or tunelab's shipped config, source description).

    Every unknown name and every task that cannot get its data is reported at once, before any model loads.
    ``offline``: why the Hub cannot be reached (:func:`hub_unreachable`), or None.
    """
    known = set(task_manager().all_tasks)
    specs: dict[str, tuple[Any, str]] = {}
    problems: list[str] = []
    for name in cfg.harness.tasks:
        if name not in known and name not in SHIPPED_TASKS:
            close = close_task_names(name, sorted(known))
            problems.append(f"harness task '{name}' does not exist in lm-evaluation-harness "
                            + (f"(close: {', '.join(close)})" if close else "(list them: lm-eval ls tasks)"))
        elif name in SHIPPED_TASKS and offline:
            try:
                specs[name] = (shipped_task_config(name, cfg), f"tunelab's shipped config (local data; the Hub: {offline})")
            except FileNotFoundError as exc:
                problems.append(f"harness task '{name}' reads the Hub, which is unreachable ({offline}), and {exc}: "
                                f"set TUNELAB_DATA_DIR=ROOT (ROOT/gsm8k/{{train,test}}.jsonl) or task.data_dir=FOLDER")
        else:
            specs[name] = (name, "lm_eval built-in (Hub data)")
    if problems:
        raise ConfigError(problems)
    return specs


def load_tasks(cfg: RunConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """(leaf task name -> harness Task object, leaf name -> source): data loaded, ready to evaluate.

    A group or tag (e.g. ``mmlu``) expands to its tasks. Loading reads the datasets, so a task whose
    data is on the Hub fails here, offline, with what to do, before the model is loaded.
    """
    offline = hub_unreachable()
    specs = resolve_task_specs(cfg, offline)
    tasks, sources, problems = {}, {}, []
    for name, (spec, source) in specs.items():
        try:
            loaded = task_manager().load([spec])["tasks"]
        except (ConnectionError, OSError) as exc:
            shipped = ", ".join(sorted(SHIPPED_TASKS))
            problems.append(
                f"harness task '{name}' could not read its data ({exc})"
                + (f"; the Hub is unreachable ({offline}): connect (and unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE), or run "
                   f"it once online so the datasets cache holds it; offline, tunelab ships local data only for: {shipped}"
                   if offline else "")
            )
            continue
        for leaf, task in loaded.items():
            tasks[leaf], sources[leaf] = task, source
    if problems:
        raise ConfigError(problems)
    return tasks, sources


def task_config_sha256(config: dict) -> str:
    """Hash of what a task asks and how it scores: prompt, targets, filters, metrics, stop strings.

    The data source (Hub or local files), the few-shot count and the token budget are recorded apart
    in the protocol, so the shipped offline gsm8k and the harness's own hash alike.
    """
    kept = {k: v for k, v in config.items() if k not in _DATA_KEYS and k != "num_fewshot"}
    kept["metadata"] = {k: v for k, v in (config.get("metadata") or {}).items() if k != "config_source"}
    kept["generation_kwargs"] = {k: v for k, v in (config.get("generation_kwargs") or {}).items() if k != "max_gen_toks"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def uses_chat_template(cfg: RunConfig) -> bool:
    """harness.apply_chat_template, or (null) the run's own prompt format: a chat-trained run is asked in chat."""
    if cfg.harness.apply_chat_template is not None:
        return cfg.harness.apply_chat_template
    return cfg.task.prompt_format == "chat"


def protocol(name: str, res: dict, lm, tokenizer, cfg: RunConfig, source: str) -> dict[str, Any]:
    """How the numbers of task ``name`` were obtained (results.json's "protocol" block)."""
    h, in_chat = cfg.harness, uses_chat_template(cfg)
    config = res["configs"][name]
    gen = config.get("generation_kwargs") or {}
    generates = config.get("output_type") == "generate_until"
    chat = tokenizer.chat_template if in_chat else None
    return {
        "evaluator": "lm-evaluation-harness",
        "harness_version": res.get("lm_eval_version") or _version("lm_eval"),
        "harness_task": name,
        "task_version": res.get("versions", {}).get(name),
        "task_config_sha256": task_config_sha256(config),
        "task_source": source,
        "data": {k: config.get(k) for k in _DATA_KEYS if config.get(k) is not None},
        "output_type": config.get("output_type"),
        "num_fewshot": res.get("n-shot", {}).get(name),
        "fewshot_seed": res.get("config", {}).get("fewshot_seed"),
        "prompt_format": "chat" if in_chat else "plain",
        "chat_template_sha256": hashlib.sha256(chat.encode()).hexdigest() if chat else None,
        "system_prompt": cfg.task.system_prompt if in_chat else None,
        "doc_to_text": config.get("doc_to_text"),
        "decoding": ("sampling" if gen.get("do_sample") else "greedy") if generates else "loglikelihood",
        "onednn_linear": bool(cfg.eval.onednn_linear),  # CPU fp32 linears on oneDNN, as tunelab's decoder
        "max_new_tokens": int(gen.get("max_gen_toks", lm.max_gen_toks)) if generates else None,
        # the harness cuts a completion at the first stop string; HFLM also stops at the EOS token
        "stop": {"until": list(gen.get("until") or []), "eos_token": tokenizer.eos_token} if generates else None,
        "filters": [f.get("name") for f in config.get("filter_list") or []],
        "metrics": [m.get("metric") for m in config.get("metric_list") or []],
        "limit": h.limit,
        "split": config.get("test_split") or config.get("validation_split"),
    }


def _version(package: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def evaluate_target_with_harness(target, tasks: Optional[tuple[dict, dict]] = None) -> dict[str, dict]:
    """``tunelab eval TARGET harness=...``: the harness on the model the target names (its artifact applied).

    Task names and data are checked before the model is loaded (``tasks``: what :func:`load_tasks`
    returned, when the caller checked them earlier), so a typo costs seconds, not a model load.
    """
    from tunelab.evaluation.evaluate import load_model_for_eval
    from tunelab.models import resolve_device

    cfg = target.cfg
    tasks = tasks or load_tasks(cfg)  # every bad name / missing data reported now, all at once
    run_dir = target.run.path if target.run is not None else None
    model, tokenizer = load_model_for_eval(cfg, run_dir, resolve_device(cfg.model.device))
    if target.kind == "trained":
        method, base_model = cfg.method.name, cfg.model.name
    elif target.kind in ("base", "base-model"):
        method, base_model = "base", cfg.model.name
    else:  # a merged folder records its run's base model, so `compare BASE RUN/merged` pairs
        merged_from = RunDir(target.out).merged_from
        base_model = (merged_from.raw_config().get("model") or {}).get("name") if merged_from else cfg.model.name
        method = target.label or "model-folder"
    return run_harness(cfg, model, tokenizer, Path(target.out), method=method, base_model=base_model, run_dir=run_dir,
                       tasks=tasks)


def run_harness(cfg: RunConfig, model, tokenizer, out_dir: Path, *, method: str, base_model: str,
                run_dir: Optional[Path], tasks: Optional[tuple[dict, dict]] = None) -> dict[str, dict]:
    """Run ``cfg.harness.tasks`` on ``model``; writes RUN/eval/harness/<task>/; returns task -> results.json.

    ``tasks``: what :func:`load_tasks` returned, where the caller checked the tasks before loading the model.
    """
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    h = cfg.harness
    tasks, sources = tasks or load_tasks(cfg)
    t0 = time.time()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=h.batch_size)
    log.info(f"lm-evaluation-harness {_version('lm_eval')}: {', '.join(tasks)} "
             f"(num_fewshot={h.num_fewshot if h.num_fewshot is not None else 'task default'}, limit={h.limit})")
    chat = uses_chat_template(cfg)
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ConfigError([f"harness in chat format (task.prompt_format={cfg.task.prompt_format}, harness.apply_chat_template="
                           f"{h.apply_chat_template}) but the tokenizer of {cfg.model.name} has no chat template: set "
                           f"task.chat_template=FILE, or harness.apply_chat_template=false"])
    from tunelab.cpu_kernels import packed_linears

    # the same linear kernels as tunelab's own decoder (eval.onednn_linear), so both see the same logits
    with packed_linears(model, enabled=cfg.eval.onednn_linear):
        res = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks.values()), num_fewshot=h.num_fewshot, limit=h.limit, log_samples=h.log_samples,
            apply_chat_template=chat, fewshot_as_multiturn=chat, system_instruction=cfg.task.system_prompt if chat else None,
            gen_kwargs={"max_gen_toks": h.max_new_tokens} if h.max_new_tokens else None, task_manager=task_manager(),
        )
    wall = time.time() - t0
    out: dict[str, dict] = {}
    for name in tasks:
        if name not in res.get("results", {}):
            continue
        info = {"method": method, "model": base_model, "model_name": cfg.model.name,
                "run_dir": str(run_dir) if run_dir else None, "wall_time_s": wall}
        out[name] = write_task_results(RunDir(out_dir), name, res, protocol(name, res, lm, tokenizer, cfg, sources[name]), info)
    return out


def _task_metrics(task_results: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(metric -> value, metric -> stderr) of one task's harness results ('exact_match,strict-match' keys)."""
    metrics, stderr = {}, {}
    for key, value in task_results.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, _, flt = key.partition(",")
        if metric.endswith("_stderr"):
            stderr[f"{metric[: -len('_stderr')]},{flt}"] = float(value)
        else:
            metrics[key] = float(value)
    return metrics, stderr


def write_task_results(run: RunDir, name: str, res: dict, proto: dict, info: dict) -> dict:
    """Write the harness's results JSON, its samples log and tunelab's results.json of task ``name``."""
    from lm_eval.utils import handle_non_serializable

    folder = run.harness_task_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    # results.json goes last (its presence means "finished"); a samples log of an earlier run must not linger
    for old in (RunDir.RESULTS_FILE, RunDir.HARNESS_SAMPLES_FILE):
        (folder / old).unlink(missing_ok=True)
    own = {k: ({name: v[name]} if isinstance(v, dict) and name in v and k != "config" else v)
           for k, v in res.items() if k not in ("samples", "pretty_env_info")}
    atomic_write_text(folder / RunDir.HARNESS_RESULTS_FILE,
                      json.dumps(own, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    samples = (res.get("samples") or {}).get(name)
    if samples is not None:
        lines = [json.dumps(s, default=handle_non_serializable, ensure_ascii=False) for s in samples]
        atomic_write_text(folder / RunDir.HARNESS_SAMPLES_FILE, "\n".join(lines) + "\n")
    metrics, stderr = _task_metrics(res["results"][name])
    n = res.get("n-samples", {}).get(name, {}).get("effective")
    summary = {
        "schema_version": 1,
        "kind": "harness",
        "task": f"harness:{name}",
        "harness_task": name,
        **info,
        "split": proto["split"],
        "metrics": {**metrics, "n": n},
        "stderr": stderr,
        "primary_metric": next(iter(metrics), None),
        # what report rows must share (like tunelab's own "generation" block)
        "generation": {k: proto[k] for k in ("num_fewshot", "max_new_tokens", "prompt_format", "task_config_sha256")},
        "protocol": proto,
        "files": {"harness_results": RunDir.HARNESS_RESULTS_FILE,
                  "samples": RunDir.HARNESS_SAMPLES_FILE if samples is not None else None},
        **git_info(),
        "versions": {**package_versions(), "lm_eval": _version("lm_eval")},
    }
    atomic_write_json(folder / RunDir.RESULTS_FILE, summary)
    shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    log.info(f"harness {name}: {shown} (n={n}) -> {folder}")
    return summary


# --------------------------------------------------------------------------------------------
# Reading harness results back (report, compare)
# --------------------------------------------------------------------------------------------


def read_samples(path: Path) -> dict[str, dict[str, Any]]:
    """doc_id -> {"metric,filter": value, ..., "doc_hash": ...} from a harness samples.jsonl."""
    from tunelab.utils import iter_jsonl

    out: dict[str, dict[str, Any]] = {}
    for lineno, row in iter_jsonl(path):
        if "doc_id" not in row:
            raise ValueError(f"{path}:{lineno}: no 'doc_id' (not a harness per-sample log); re-run the harness evaluation")
        per = out.setdefault(str(row["doc_id"]), {"doc_hash": row.get("doc_hash")})
        for metric in row.get("metrics") or []:
            value = row.get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                per[f"{metric},{row.get('filter', 'none')}"] = float(value)
    return out


def protocol_differences(a: dict, b: dict) -> list[str]:
    """Why two harness results.json cannot be paired (task, base model, protocol); [] when they can."""
    why = []
    if a.get("harness_task") != b.get("harness_task"):
        why.append(f"different harness tasks ({a.get('harness_task')} vs {b.get('harness_task')})")
    if a.get("model") != b.get("model"):
        why.append(f"different base models ({a.get('model')} vs {b.get('model')}): a paired interval measures what "
                   f"tuning one model did; compare evaluations of the same base model (run `tunelab eval --base "
                   f"model={b.get('model')} harness={b.get('harness_task')}` for B's baseline)")
    pa, pb = a.get("protocol") or {}, b.get("protocol") or {}
    for key in PROTOCOL_KEYS:
        if key != "harness_task" and pa.get(key) != pb.get(key):
            why.append(f"different protocol: {key} {pa.get(key)!r} vs {pb.get(key)!r} (re-run one with the other's settings)")
    return why

"""Evaluation: score a model on the task's eval split; writes ``<out>/eval/results.json`` and ``predictions.jsonl``.

Works on a run directory (the method's artifact applied, unmerged), a merged/plain HF folder, or
the untrained base model; :func:`evaluate_target` takes a resolved RUN argument
(:func:`tunelab.rundir.resolve_target`) and is the library side of ``tunelab eval``. Completions
come from the shared engine (:func:`tunelab.evaluation.engine.generate`: the task's template in
``task.prompt_format`` rendered by :mod:`tunelab.data.render`, as ``tunelab generate`` renders it,
the stopping rule and trim; results.json's ``protocol`` says how); with ``eval.reference_loss`` the
references are also scored
teacher-forced with the trainer's loss (:mod:`tunelab.loss`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from tunelab.config import RunConfig
from tunelab.data import IGNORE_INDEX, collate, tokenize_references
from tunelab.data.render import describe_format, generation_prompt, prepare_tokenizer
from tunelab.evaluation.engine import generate, generation_settings
from tunelab.loss import TargetPositionSelector, target_loss
from tunelab.methods import get_method
from tunelab.models import load_model, load_tokenizer, materialize, resolve_device
from tunelab.rundir import RunDir, Target
from tunelab.tasks import Example, get_task
from tunelab.utils import atomic_write_json, atomic_write_text, git_info, log, package_versions, peak_memory, reset_peak_memory


def load_model_for_eval(cfg: RunConfig, run_dir: str | Path | RunDir | None, device: torch.device | None = None,
                        merge: Optional[bool] = None):
    """(model, tokenizer) for a run directory (its method's artifact applied) or the configured model as it is.

    ``merge`` (default ``eval.merge_adapter``): fold the artifact into the weights (the method's own
    merge), so generation runs one matmul per adapted layer; never on a 4-bit base.
    """
    source = materialize(cfg.model.name)
    device = device or resolve_device(cfg.model.device)
    model = load_model(cfg.model, source, device)
    tokenizer = load_tokenizer(cfg.model, source)
    if run_dir is not None:
        run = RunDir(run_dir)
        method = get_method(cfg.method.name)(cfg.method)
        artifact = run.artifact_dir(method)
        if artifact is not None:  # None: the method trains nothing (method=base)
            if not artifact.is_dir():
                raise FileNotFoundError(
                    f"{run.path} holds no trained {method.artifact_dir}/ (it has: {run.describe()}); "
                    f"train it first, or resume an unfinished run with `tunelab train --resume {run.path}`"
                )
            model = method.load_for_inference(model, artifact)
            if (cfg.eval.merge_adapter if merge is None else merge) and not cfg.model.load_in_4bit:
                model = method.merge(model)
            if run.tokenizer_dir.is_dir():
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(run.tokenizer_dir))
                if tokenizer.pad_token is None:
                    tokenizer.pad_token = tokenizer.eos_token
    prepare_tokenizer(tokenizer, cfg.task)  # a chat format without a template fails before any generation
    if not cfg.model.load_in_4bit:
        model.to(device)
    model.eval()
    return model, tokenizer


def evaluate(cfg: RunConfig, run_dir: Path | None, out_dir: Path, method_label: str | None = None) -> dict[str, Any]:
    """Evaluate on the task's eval split; writes out_dir/eval/{results.json, predictions.jsonl}.

    ``run_dir`` None evaluates ``cfg.model`` as it is (base model or a merged folder).
    """
    t0 = time.time()
    task = get_task(cfg.task.name)(cfg.task)
    eval_cfg = generation_settings(task, cfg.eval)
    device = resolve_device(cfg.model.device)
    reset_peak_memory(device)
    model, tokenizer = load_model_for_eval(cfg, run_dir, device)
    examples: list[Example] = task.examples(
        eval_cfg.split, tokenizer=tokenizer, max_prompt_tokens=max(8, cfg.data.max_length - eval_cfg.max_new_tokens)
    )
    if eval_cfg.limit is not None:
        examples = examples[: eval_cfg.limit]
    untrained = run_dir is None or not get_method(cfg.method.name).trains
    log.info(f"evaluating {len(examples)} {task.name}/{eval_cfg.split} examples with {'the base model' if untrained else run_dir}")
    t_gen = time.perf_counter()
    prompts = [generation_prompt(e, tokenizer, cfg.task) for e in examples]  # what `tunelab generate` gives
    raw, n_generated = generate(model, tokenizer, prompts, eval_cfg, task.stop_checker())
    gen_time = time.perf_counter() - t_gen
    completions = [task.trim_completion(c) for c in raw]
    scored = task.score(examples, completions)
    ref_loss = None
    if eval_cfg.reference_loss:
        ref_loss = reference_loss(model, tokenizer, examples, cfg.data.max_length, eval_cfg.batch_size,
                                  chunk_tokens=cfg.train.loss_chunk_tokens, task_cfg=cfg.task,
                                  train_on=cfg.data.train_on)
        scored.metrics["ref_nll"] = ref_loss["nll_per_token"]
        per_ref = ref_loss.pop("per_example")
        for ex, per in zip(examples, scored.per_example):
            if ex.id in per_ref:
                per["ref_nll_sum"], per["ref_tokens"] = per_ref[ex.id]
    out = RunDir(out_dir)
    out.eval_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for ex, prompt, comp, per in zip(examples, prompts, completions, scored.per_example):
        lines.append(json.dumps({"id": ex.id, "prompt": prompt, "completion": comp, **per}, ensure_ascii=False, default=str))
    atomic_write_text(out.predictions_file, "\n".join(lines) + "\n")
    results = {
        "schema_version": 1,
        "kind": "eval",
        "task": cfg.task.name,
        # no run applied: the model as it is, "base" even where an older base run's config names a method
        "method": method_label or (cfg.method.name if run_dir is not None else "base"),
        "model": cfg.model.name,
        "run_dir": str(run_dir) if run_dir else None,
        "split": eval_cfg.split,
        "metrics": scored.metrics,
        "primary_metric": task.primary_metric,
        "generation": {k: getattr(eval_cfg, k) for k in ("batch_size", "max_new_tokens", "num_beams", "no_repeat_ngram_size", "preset")},
        "protocol": eval_protocol(task, tokenizer, cfg, eval_cfg),
        "reference_loss": ref_loss,
        "generated_tokens": n_generated,
        "generation_time_s": gen_time,
        "generated_tokens_per_s": n_generated / max(gen_time, 1e-9),
        "examples_per_s": len(examples) / max(gen_time, 1e-9),
        "wall_time_s": time.time() - t0,
        **peak_memory(device),
        **git_info(),
        "versions": package_versions(),
    }
    atomic_write_json(out.eval_results_file, results)
    shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in scored.metrics.items())
    log.info(f"{shown} -> {out.eval_dir}")
    return results


def eval_protocol(task, tokenizer, cfg: RunConfig, eval_cfg) -> dict[str, Any]:
    """How the completions were obtained (issue 13: results that say how they were obtained)."""
    stop_rule = getattr(task, "stop_rule", None) or (
        "EOS" if task.stop_checker() is None else f"EOS or {type(task).__name__}.stop_checker")
    decoding = "greedy" if eval_cfg.num_beams == 1 else f"beam search ({eval_cfg.num_beams} beams)"
    return {
        **describe_format(tokenizer, cfg.task),
        "num_fewshot": 0,
        "decoding": decoding,
        "max_new_tokens": eval_cfg.max_new_tokens,
        "no_repeat_ngram_size": eval_cfg.no_repeat_ngram_size,
        "stop_rule": stop_rule,
        "decoder": getattr(cfg.eval, "decoder", "hf"),
        "lookup_tokens": cfg.eval.lookup_tokens if cfg.eval.decoder == "continuous" and eval_cfg.num_beams == 1 else 0,
        "onednn_linear": bool(cfg.eval.onednn_linear and cfg.eval.decoder == "continuous" and eval_cfg.num_beams == 1),
        # a run's adapter folded into the weights in memory (same function up to float rounding)
        "adapter_merged": bool(cfg.eval.merge_adapter and not cfg.model.load_in_4bit),
    }


@torch.no_grad()
def reference_loss(model, tokenizer, examples: list[Example], max_length: int, batch_size: int,
                   chunk_tokens: int = 1024, task_cfg=None, train_on: str = "auto") -> dict[str, Any]:
    """Teacher-forced loss of the reference responses: the training objective on held-out data.

    Each example is tokenized exactly as in training (``task_cfg``'s prompt format, None = plain;
    loss on the ``train_on`` targets, the end of an over-long example cut at ``max_length`` and counted), batched by
    length, and the summed NLL is divided by the number of reference tokens (a per-token mean over
    the whole set, as in training, not a mean of per-example means). ``per_example`` maps each
    example id to (summed NLL, reference tokens), for paired comparisons (`tunelab compare`).
    """

    tokenized, truncated, dropped = tokenize_references(examples, tokenizer, max_length, task_cfg, train_on)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    selector = TargetPositionSelector(model)
    per_example: dict[str, tuple[float, int]] = {}
    try:
        for start in range(0, len(tokenized), max(1, batch_size)):
            chunk = tokenized[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            losses = target_loss(model, selector, batch, reduction="none", chunk_tokens=chunk_tokens)  # per target token
            counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
            for t, row_losses, count in zip(chunk, torch.split(losses, counts), counts):
                per_example[t.id] = (float(row_losses.sum()), int(count))
    finally:
        selector.remove()
    nll_sum = sum(v[0] for v in per_example.values())
    n_tokens = sum(v[1] for v in per_example.values())
    nll = nll_sum / max(n_tokens, 1)
    if truncated or dropped:
        log.warning(f"reference loss: {truncated} references cut at data.max_length={max_length}, "
                    f"{dropped} examples left out (prompt too long); raise data.max_length to score them whole")
    return {"nll_per_token": nll, "perplexity": math.exp(min(nll, 50.0)), "reference_tokens": n_tokens,
            "examples": len(tokenized), "truncated": truncated, "dropped": dropped, "per_example": per_example}


def evaluate_target(target: Target, overwrite: bool = False) -> dict[str, Any]:
    """Evaluate a resolved RUN argument (:func:`tunelab.rundir.resolve_target`); the library side of `tunelab eval`.

    ``--base`` (kind ``base-model``) first makes its run directory (config.yaml with method=base,
    and the BASE marker), so the evaluation is a run like any other; see :func:`claim_base_dir`.
    With ``harness.tasks`` set, only lm-evaluation-harness runs (:mod:`tunelab.evaluation.harness`).
    """
    harness_tasks = None
    if target.cfg.harness.tasks:  # a misspelt task or missing data is reported before anything is written
        from tunelab.evaluation.harness import load_tasks

        harness_tasks = load_tasks(target.cfg)
    if target.kind == "base-model":
        claim_base_dir(Path(target.out), overwrite)
        target.cfg.out = str(target.out)
        run = RunDir(target.out)
        run.write_config(target.cfg)
        run.mark_base()
    if target.kind == "model":  # a model folder tunelab did not make: its eval/ may hold the user's files
        from tunelab.rundir import claim_eval_dir

        claim_eval_dir(Path(target.out), overwrite=overwrite)
    if target.cfg.harness.tasks:  # harness only: tunelab's own evaluation is `tunelab eval` without harness=
        from tunelab.evaluation.harness import evaluate_target_with_harness

        return evaluate_target_with_harness(target, harness_tasks)
    if target.run is not None:
        return evaluate(target.cfg, target.run.path, target.run.path)
    return evaluate(target.cfg, None, Path(target.out), method_label=target.label)


def claim_base_dir(out: Path, overwrite: bool = False) -> None:
    """Check, before anything is written, that ``eval --base`` may make ``out`` a base-model evaluation.

    Allowed: a new or empty folder, an earlier base evaluation, a sweep point (the sweep made it),
    or, with ``overwrite``, any other folder that is not a training run. A training run is always
    refused: its config.yaml is what makes its artifact usable.
    """
    from tunelab.rundir import NotOurs, claim_folder, folder_kind

    kind = folder_kind(out) if out.is_dir() else None
    if kind == "run":
        raise NotOurs(
            f"{out} is a training run: `eval --base` would replace its config.yaml; evaluate the run with "
            f"`tunelab eval {out}`, or choose another out= for the base-model evaluation"
        )
    if kind != "sweep-point":  # a sweep point keeps its own marker
        claim_folder(out, "base", overwrite=overwrite)

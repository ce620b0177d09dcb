"""Evaluation: batched generation with the task's own template, stopping rule and metric.

Works on a run directory (the method's artifact applied, unmerged), a merged/plain HF folder,
or the untrained base model. Prompts are sorted by length and generated in batches with left
padding; each row stops at EOS or as soon as the task says its answer is complete (GSM8K: once the
``#### <number>`` line ends), so no compute is spent on text after the answer.
Writes ``<out>/eval/results.json`` and ``<out>/eval/predictions.jsonl``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from tunelab.config import ConfigError, EvalConfig, RunConfig, build_config, deep_merge, load_config, parse_overrides, save_config
from tunelab.methods import get_method
from tunelab.models import load_model, load_tokenizer, materialize, resolve_device
from tunelab.tasks import Example, get_task
from tunelab.data import IGNORE_INDEX, collate, pad_rows, tokenize_example
from tunelab.utils import atomic_write_json, atomic_write_text, git_info, log, package_versions, peak_memory, reset_peak_memory


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file()


def run_config(run_dir: Path, overrides: list[str] | None = None, check_env: bool = True) -> RunConfig:
    """A run's saved config with command-line overrides applied on top.

    ``check_env=False`` skips the checks that depend on this machine (see ``config.validate``).
    """
    raw = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    over, problems = parse_overrides(overrides or [])
    if problems:
        raise ConfigError(problems)
    raw = deep_merge(raw, over)
    raw["out"] = str(run_dir)
    method_raw = raw.get("method") if isinstance(raw.get("method"), dict) else {}
    if (run_dir / "results.json").is_file() and method_raw.get("name"):
        from tunelab.methods import get_method

        try:
            training_only = get_method(method_raw["name"]).training_only_keys
        except KeyError:
            training_only = ()
        for key in training_only:
            value = method_raw.get(key)
            if isinstance(value, str) and not Path(value).exists():
                log.info(f"{run_dir}: method.{key}={value} is gone; not needed for a finished run")
                method_raw[key] = None
    return build_config(raw, check_env=check_env)


def describe_dir(path: Path) -> str:
    items = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else []
    return ", ".join(items) or "nothing"


def load_model_for_eval(cfg: RunConfig, run_dir: Path | None, device: torch.device | None = None):
    """(model, tokenizer) for a run directory (artifact applied) or the configured base model."""
    source = materialize(cfg.model.name)
    device = device or resolve_device(cfg.model.device)
    model = load_model(cfg.model, source, device)
    tokenizer = load_tokenizer(cfg.model, source)
    if run_dir is not None and cfg.method.name != "base":
        method = get_method(cfg.method.name)(cfg.method)
        artifact = run_dir / method.artifact_dir
        if not artifact.is_dir():
            raise FileNotFoundError(
                f"{run_dir} holds no trained {method.artifact_dir}/ (it has: {describe_dir(run_dir)}); "
                f"train it first, or resume an unfinished run with `tunelab train --resume {run_dir}`"
            )
        model = method.load_for_inference(model, artifact)
        if (run_dir / "tokenizer").is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
    if not cfg.model.load_in_4bit:
        model.to(device)
    model.eval()
    return model, tokenizer


class _RowStopper:
    """StoppingCriteria: per row, stop once the task says the completion is finished."""

    def __init__(self, tokenizer, prompt_width: int, check: Callable[[str], bool], num_rows: int):
        self.tokenizer, self.prompt_width, self.check = tokenizer, prompt_width, check
        self.done = torch.zeros(num_rows, dtype=torch.bool)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.done.shape[0] != input_ids.shape[0]:  # beam search expands rows
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        gen = input_ids[:, self.prompt_width:]
        for row in range(gen.shape[0]):
            if not self.done[row]:
                text = self.tokenizer.decode(gen[row], skip_special_tokens=True)
                self.done[row] = bool(self.check(text))
        return self.done.to(input_ids.device).clone()


def generation_settings(task, eval_cfg: EvalConfig) -> EvalConfig:
    if eval_cfg.preset:
        presets = task.generation_presets()
        if eval_cfg.preset not in presets:
            raise ConfigError([f"eval.preset '{eval_cfg.preset}' is unknown for task '{task.name}' (known: {', '.join(presets) or 'none'})"])
        defaults = EvalConfig()
        # a key the user set explicitly (differs from the default) wins over the preset
        chosen = {k: v for k, v in presets[eval_cfg.preset].items() if getattr(eval_cfg, k) == getattr(defaults, k)}
        return replace(eval_cfg, **chosen)
    return eval_cfg


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], eval_cfg: EvalConfig, stop_check=None,
             progress: bool = True, sampling: dict | None = None, on_batch=None) -> tuple[list[str], int]:
    """Completions for prompts (in input order) and the number of generated tokens.

    Batches are length-sorted (longest first, so memory problems surface at once); left padding.
    ``on_batch(indices, completions)`` is called after each batch (used by resumable batch mode).
    """
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(enc[i]))
    out: list[str | None] = [None] * len(prompts)
    n_generated = 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="generate", unit="ex", dynamic_ncols=True)
    for start in range(0, len(order), eval_cfg.batch_size):
        idx = order[start:start + eval_cfg.batch_size]
        ids, mask = pad_rows([enc[i] for i in idx], pad_id, side="left")
        width = ids.shape[1]
        kwargs: dict[str, Any] = dict(
            max_new_tokens=eval_cfg.max_new_tokens,
            num_beams=eval_cfg.num_beams,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            do_sample=False,
        )
        if eval_cfg.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = eval_cfg.no_repeat_ngram_size
        if sampling:
            kwargs.update(sampling)
        if stop_check is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_RowStopper(tokenizer, width, stop_check, len(idx))])
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        new = gen[:, width:].cpu()
        texts = []
        for r, i in enumerate(idx):
            row = new[r]
            # count tokens up to and including the first EOS (the rest is padding of finished rows)
            n_generated += _generated_length(row, tokenizer.eos_token_id, pad_id)
            text = tokenizer.decode(row, skip_special_tokens=True)
            out[i] = text
            texts.append(text)
        if on_batch is not None:
            on_batch(idx, texts)
        if bar:
            bar.update(len(idx))
    if bar:
        bar.close()
    return [o or "" for o in out], n_generated


def _generated_length(row: torch.Tensor, eos_id: int, pad_id: int) -> int:
    """Tokens really generated in a row: up to and including the first EOS; finished rows are padded."""
    eos = (row == eos_id).nonzero()
    if len(eos):
        return int(eos[0, 0]) + 1
    return int((row != pad_id).sum())


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
    log.info(f"evaluating {len(examples)} {task.name}/{eval_cfg.split} examples with {'the base model' if run_dir is None or cfg.method.name == 'base' else run_dir}")
    t_gen = time.perf_counter()
    raw, n_generated = generate(model, tokenizer, [e.prompt for e in examples], eval_cfg, task.stop_checker())
    gen_time = time.perf_counter() - t_gen
    completions = [task.trim_completion(c) for c in raw]
    scored = task.score(examples, completions)
    ref_loss = None
    if eval_cfg.reference_loss:
        ref_loss = reference_loss(model, tokenizer, examples, cfg.data.max_length, eval_cfg.batch_size)
        scored.metrics["ref_nll"] = ref_loss["nll_per_token"]
        per_ref = ref_loss.pop("per_example")
        for ex, per in zip(examples, scored.per_example):
            if ex.id in per_ref:
                per["ref_nll_sum"], per["ref_tokens"] = per_ref[ex.id]
    eval_dir = out_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for ex, comp, per in zip(examples, completions, scored.per_example):
        lines.append(json.dumps({"id": ex.id, "prompt": ex.prompt, "completion": comp, **per}, ensure_ascii=False, default=str))
    atomic_write_text(eval_dir / "predictions.jsonl", "\n".join(lines) + "\n")
    results = {
        "schema_version": 1,
        "kind": "eval",
        "task": cfg.task.name,
        "method": method_label or (cfg.method.name if run_dir is not None else "base"),
        "model": cfg.model.name,
        "run_dir": str(run_dir) if run_dir else None,
        "split": eval_cfg.split,
        "metrics": scored.metrics,
        "primary_metric": task.primary_metric,
        "generation": {k: getattr(eval_cfg, k) for k in ("batch_size", "max_new_tokens", "num_beams", "no_repeat_ngram_size", "preset")},
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
    atomic_write_json(eval_dir / "results.json", results)
    shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in scored.metrics.items())
    log.info(f"{shown} -> {eval_dir}")
    return results


@torch.no_grad()
def reference_loss(model, tokenizer, examples: list[Example], max_length: int, batch_size: int) -> dict[str, Any]:
    """Teacher-forced loss of the reference responses: the training objective on held-out data.

    Each example is tokenized exactly as in training (prompt + response + EOS, loss on the response
    tokens only, the end of an over-long response cut at ``max_length`` and counted), batched by
    length, and the summed NLL is divided by the number of reference tokens (a per-token mean over
    the whole set, as in training, not a mean of per-example means). ``per_example`` maps each
    example id to (summed NLL, reference tokens), for paired comparisons (`tunelab compare`).
    """
    from tunelab.train import TargetPositionSelector, target_loss  # train imports the trainer stack

    tokenized, truncated, dropped = [], 0, 0
    for ex in examples:
        t, status = tokenize_example(ex, tokenizer, max_length, "truncate")
        if t is None:
            dropped += 1
            continue
        truncated += status == "truncated"
        tokenized.append(t)
    tokenized.sort(key=len)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    selector = TargetPositionSelector(model)
    per_example: dict[str, tuple[float, int]] = {}
    try:
        for start in range(0, len(tokenized), max(1, batch_size)):
            chunk = tokenized[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
            losses = target_loss(model, selector, batch, reduction="none")  # one per target token, row after row
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


def base_run_config(overrides: list[str]) -> RunConfig:
    """Config of an untrained-base evaluation (method recorded as 'base')."""
    cfg = load_config(overrides=overrides)
    return cfg


def write_base_run(cfg: RunConfig, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    (out_dir / "BASE").write_text("untrained base model evaluation; method settings in config.yaml are unused\n")

"""Merge a trained run into a plain Hugging Face checkpoint (safetensors + tokenizer).

Before writing, the merged model's logits are compared with the unmerged (adapter) model's on a
few fixed inputs; the merge is refused when they differ by more than the tolerance (fp32: 1e-3
absolute on logits of magnitude ~10, i.e. float round-off of the folded weights; bf16/fp16: 5e-2).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from tunelab.config import RunConfig
from tunelab.evaluation.evaluate import load_model_for_eval
from tunelab.methods import get_method
from tunelab.models import resolve_device
from tunelab.rundir import RunDir
from tunelab.utils import atomic_replace_dir, atomic_write_json, log

CHECK_TEXTS = [
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.\nAnswer:",
    "Article: The city council approved the new budget on Monday.\nSummary:",
    "Hello",
]


def tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 5e-2


@torch.inference_mode()
def _logits(model, tokenizer, device) -> list[torch.Tensor]:
    out = []
    for text in CHECK_TEXTS:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        out.append(model(input_ids=ids, use_cache=False).logits.float().cpu())
    return out


def merge_run(cfg: RunConfig, run_dir: Path, out_dir: Path | None = None) -> dict:
    """Check and write the merge of the run's artifact into its base model (default RUN/merged); returns the check."""
    run = RunDir(run_dir)
    out_dir = out_dir or run.merged_dir
    method = get_method(cfg.method.name)(cfg.method)
    artifact = run.artifact_dir(method)
    if artifact is None:
        raise ValueError(
            f"{run.path} has no trained artifact to merge (method={method.name} trains nothing): "
            f"`tunelab eval` and `tunelab generate` use its model as it is"
        )
    if cfg.model.load_in_4bit:
        log.warning(
            "the run was trained on a 4-bit base: merging into the unquantized base weights "
            "(the 4-bit rounding the adapter saw is not reproduced; evaluate the merged model to check)"
        )
        cfg.model.load_in_4bit = False
    device = resolve_device(cfg.model.device)
    model, tokenizer = load_model_for_eval(cfg, run_dir, device)
    dtype = next(model.parameters()).dtype
    before = _logits(model, tokenizer, device)
    merged = method.merge(model)
    after = _logits(merged, tokenizer, device)
    max_diff = max(float((a - b).abs().max()) for a, b in zip(before, after))
    tol = tolerance(dtype)
    if not max_diff <= tol:
        raise RuntimeError(
            f"refusing to write the merge: merged logits differ from the adapter model's by {max_diff:.3g} "
            f"(tolerance {tol:g} for {dtype}); the artifact in {artifact} may be corrupt"
        )
    log.info(f"merge check passed: max |logit difference| = {max_diff:.2e} (tolerance {tol:g})")
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".merged-"))
    merged.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    report = {"max_abs_logit_diff": max_diff, "tolerance": tol, "dtype": str(dtype), "method": method.name}
    atomic_write_json(tmp / "merge_check.json", report)
    atomic_replace_dir(tmp, out_dir)
    log.info(f"merged model written to {out_dir}")
    return report

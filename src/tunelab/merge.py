"""Merge a trained run into a plain Hugging Face checkpoint (safetensors + tokenizer).

Before writing, the merged model's logits are compared with the unmerged (adapter) model's on a
few fixed inputs; the merge is refused when they differ by more than the tolerance (fp32: 1e-3
absolute on logits of magnitude ~10, i.e. float round-off of the folded weights; bf16/fp16: 5e-2).
A run trained on a 4-bit base is merged into that base dequantized (the weights the adapter saw),
checked against the 4-bit model with its adapter, and its report says the merge is lossy against
the original base (``quantized_base``, ``lossy``).

Where it goes (checked before the model is loaded): ``--out`` is new or empty, a merged folder
tunelab made, or ``overwrite``; never the run itself, a folder holding it, one of its own folders
(``adapter/``, ``model/``, ``checkpoints/``, ``eval/``, ``tokenizer/``; ``RUN/merged`` or another new
name inside the run is fine) or the run's base model. The merge is staged in a ``.merged-*``
folder beside ``--out`` (removed on failure too) and moved in file by file: only files a merge
writes are replaced or removed; ``merge_check.json`` (written last) lists them.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

import torch

from tunelab.config import RunConfig
from tunelab.evaluation.evaluate import load_model_for_eval
from tunelab.methods import get_method
from tunelab.models import dequantize_4bit, load_model, materialize, resolve_device
from tunelab.rundir import MARKER_FILE, NotOurs, RunDir, claim_folder, folder_kind
from tunelab.utils import atomic_write_json, log, make_temp_dir

CHECK_FILE = "merge_check.json"
#: model weight files: in a folder a merge made, any of these is the merge's (old shards are removed)
WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                   "pytorch_model*.bin", "pytorch_model.bin.index.json")

CHECK_TEXTS = [
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.\nAnswer:",
    "Article: The city council approved the new budget on Monday.\nSummary:",
    "Hello",
]


#: what a merge of a run trained on a 4-bit base is (results: merge_check.json "lossy")
QUANTIZED_MERGE_NOTE = (
    "merged into the dequantized NF4 base, the weights the adapter was trained on: the merged model computes "
    "what the 4-bit run computed (max_abs_logit_diff), but its base weights carry the 4-bit rounding, so it "
    "is lossy against the original base model and is not that base plus the adapter"
)


def tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 5e-2


@torch.inference_mode()
def _logits(model, tokenizer, device) -> list[torch.Tensor]:
    out = []
    for text in CHECK_TEXTS:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        out.append(model(input_ids=ids, use_cache=False).logits.float().cpu())
    return out


def merge_run(cfg: RunConfig, run_dir: Path, out_dir: Path | None = None, overwrite: bool = False) -> dict:
    """Check and write the merge of the run's artifact into its base model (default RUN/merged); returns the check.

    ``overwrite`` lets ``out_dir`` be a folder tunelab did not make; even then only the merge's own
    files are written there (see the module docstring for what is always refused).
    """
    run = RunDir(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run.merged_dir
    method = get_method(cfg.method.name)(cfg.method)
    artifact = run.artifact_dir(method)
    if artifact is None:
        raise ValueError(
            f"{run.path} has no trained artifact to merge (method={method.name} trains nothing): "
            f"`tunelab eval` and `tunelab generate` use its model as it is"
        )
    check_out_dir(run, out_dir, cfg, overwrite)
    device = resolve_device(cfg.model.device)
    model, tokenizer = load_model_for_eval(cfg, run_dir, device, merge=False)
    dtype = next(model.parameters()).dtype
    before = _logits(model, tokenizer, device)  # the model that was trained and evaluated
    if cfg.model.load_in_4bit:
        # fold the deltas into the weights they were trained on: the 4-bit base, dequantized
        del model
        base = dequantize_4bit(load_model(cfg.model, materialize(cfg.model.name), device))
        model = method.load_for_inference(base, artifact)
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
    report = {"max_abs_logit_diff": max_diff, "tolerance": tol, "dtype": str(dtype), "method": method.name}
    if cfg.model.load_in_4bit:
        report["quantized_base"] = "nf4"
        report["lossy"] = QUANTIZED_MERGE_NOTE
        log.warning(f"4-bit run: {QUANTIZED_MERGE_NOTE}")
    tmp = make_temp_dir(out_dir.parent, ".merged-")
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        report["files"] = sorted(p.name for p in tmp.iterdir() if p.is_file())
        check_out_dir(run, out_dir, cfg, overwrite)  # again: it may have changed while the model loaded
        _move_in(tmp, out_dir, report)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(f"merged model written to {out_dir}")
    return report


def _protected_names() -> set[str]:
    """A run's own folders: a merge never goes there."""
    from tunelab.registry import METHODS

    names = {RunDir.TOKENIZER_DIR, RunDir.CHECKPOINTS_DIR, RunDir.EVAL_DIR}
    names.update(cls.artifact_dir for _, cls in METHODS.items() if cls.artifact_dir)
    return names


def _made_by_merge(path: Path) -> bool:
    """A merged folder tunelab made: its marker says so, or (before the marker) it holds merge_check.json."""
    kind = folder_kind(path)
    return kind == "merged" or (kind is None and not (path / MARKER_FILE).exists()
                                and (path / CHECK_FILE).is_file() and (path / RunDir.HF_CONFIG_FILE).is_file())


def _weight_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, w) for w in WEIGHT_PATTERNS))


def check_out_dir(run: RunDir, out: Path, cfg: RunConfig, overwrite: bool = False) -> None:
    """Refuse, before anything is loaded or written, an output folder a merge must not write into."""
    out_r, run_r = out.resolve(), run.path.resolve()
    fix = f"pass --out {run.merged_dir} (the default) or a new folder"
    if out_r == run_r or out_r in run_r.parents:
        raise NotOurs(f"--out {out} {'is' if out_r == run_r else 'holds'} the run {run.path} itself: "
                      f"a merge there would replace the run's files; {fix}")
    for folder in (out_r, *out_r.parents):
        if folder == run_r or RunDir(folder).is_run:
            inside = out_r.relative_to(folder).parts
            if not inside or inside[0] in _protected_names():
                what = "is a run directory" if not inside else f"is inside {folder / inside[0]}, a run's own files"
                raise NotOurs(f"--out {out} {what}: a merge never writes there; {fix}")
            break
    base = Path(str(cfg.model.name)).expanduser()
    if base.is_dir() and base.resolve() == out_r:
        raise NotOurs(f"--out {out} is the run's base model ({cfg.model.name}): the run needs it as it is; {fix}")
    if not out.exists():
        return
    ours = out.is_dir() and _made_by_merge(out)
    if not ours:
        claim_ok = out.is_dir() and (overwrite or not any(out.iterdir()))
        if not claim_ok:
            claim_folder(out, "merged", overwrite=overwrite)  # refuses with what the folder holds and the fix
        foreign = _weight_files(out)
        if foreign:
            raise NotOurs(
                f"--out {out} holds model weights a merge did not write ({', '.join(foreign[:4])}): "
                f"they would be loaded instead of (or mixed with) the merge, and tunelab deletes only its own "
                f"files; choose another --out, or remove them first"
            )


def _move_in(tmp: Path, out: Path, report: dict) -> None:
    """Move the staged merge into ``out``: its old files go (a merge made them), any other file stays."""
    old: set[str] = set()
    if out.is_dir() and _made_by_merge(out):
        old.update(_weight_files(out))
        try:
            old.update(json.loads((out / CHECK_FILE).read_text()).get("files", []))
        except (OSError, ValueError, AttributeError):
            pass
    claim_folder(out, "merged", overwrite=True)  # checked by check_out_dir; writes the marker
    (out / CHECK_FILE).unlink(missing_ok=True)  # written last: a crash in between leaves no complete-looking folder
    for name in sorted(old - set(report["files"]) - {CHECK_FILE, MARKER_FILE}):
        if "/" not in name and (out / name).is_file():
            (out / name).unlink()
    for name in report["files"]:
        os.replace(tmp / name, out / name)
    atomic_write_json(out / CHECK_FILE, report)
    if (out / RunDir.EVAL_DIR).is_dir():
        log.warning(f"{out / RunDir.EVAL_DIR} evaluated the previous merge: run `tunelab eval {out}` again")

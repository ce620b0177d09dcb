"""The method contract, checked for every registered method: prepare → train → save → load → eval → merge → resume.

A new method adds one row to ``METHOD_CASES`` (the overrides of a tiny run) and inherits the whole
suite; ``test_every_registered_method_has_a_row`` fails until it does. Rows are tiny runs of the
random 2-layer model (seconds each).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import ConfigError, load_config
from tunelab.registry import METHODS, TASKS
from tunelab.rundir import RunDir

#: method -> overrides of a 4-step run on the tiny model (None: the method trains nothing)
METHOD_CASES: dict[str, list[str] | None] = {
    "base": None,
    "full": [],
    "lora": ["method.rank=4", "method.dropout=0.1"],
    "rosa": ["method.rank=4", "method.schedule=wl1", "method.density=0.02", "method.dropout=0.0"],
    "galore": ["method.rank=4", "method.update_proj_gap=3"],
}
TRAINED = [name for name, case in METHOD_CASES.items() if case is not None]
STEPS = 4


def _cfg(model_dir, out, method, *extra):
    return load_config(overrides=[
        f"model={model_dir}", "task=gsm8k", "data.limit=8", "data.max_length=64", "train.batch_size=2",
        f"train.max_steps={STEPS}", "train.lr=5e-3", "train.warmup_steps=1", "train.report_to=[]",
        "train.progress_bar=false", f"out={out}", f"method={method}", *METHOD_CASES[method], *extra,
    ])


def _artifact_tensors(run: RunDir, method: str) -> dict[str, torch.Tensor]:
    folder = run.artifact_dir(METHODS.get(method))
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    assert out, f"{folder} holds no safetensors"
    return out


def test_every_registered_method_has_a_row():
    assert sorted(METHOD_CASES) == METHODS.known()


def test_display_attributes_are_declared():
    orders = [METHODS.get(m).display_order for m in METHODS.known()]
    assert len(set(orders)) == len(orders)  # a total order for tables and legends
    for name in METHODS.known():
        rank_key = METHODS.get(name).rank_key
        assert rank_key is None or rank_key in {f.name for f in __import__("dataclasses").fields(METHODS.get(name).config_cls)}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """method -> (its uninterrupted run, its results.json), trained once for the module."""
    from tunelab.train import train

    runs = {}
    for method in TRAINED:
        out = tmp_path_factory.mktemp(f"contract-{method}") / "run"
        runs[method] = (RunDir(out), train(_cfg(tiny_model_dir, out, method)))
    return runs


@pytest.mark.parametrize("method", TRAINED)
def test_train_writes_a_complete_run(trained, method):
    run, res = trained[method]
    assert res["steps"] == STEPS and res["stopped"] == "completed" and res["method"] == method
    assert 0 < res["trainable_params"] <= res["total_params"]
    assert run.is_run and run.is_trained and run.kind == "trained"
    assert run.artifact_dir(METHODS.get(method)).is_dir() and run.tokenizer_dir.is_dir()
    assert run.results()["final_loss"] == res["final_loss"]
    assert run.config().method.name == method


@pytest.mark.parametrize("method", TRAINED)
def test_load_for_inference_applies_what_was_trained(trained, tiny_model_dir, method):
    from tunelab.evaluation.evaluate import load_model_for_eval

    run, _ = trained[method]
    cfg = run.config()
    tuned, tok = load_model_for_eval(cfg, run.path)
    base, _ = load_model_for_eval(load_config(overrides=[f"model={tiny_model_dir}"]), None)
    ids = tok("Question: 2 + 3 = ?\nAnswer:", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(tuned(ids).logits, base(ids).logits)


@pytest.mark.parametrize("method", TRAINED)
def test_merge_equals_the_unmerged_model(trained, method, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunelab.evaluation.evaluate import load_model_for_eval
    from tunelab.merge import merge_run

    run, _ = trained[method]
    out = tmp_path / "merged"
    report = merge_run(run.config(), run.path, out)
    assert report["max_abs_logit_diff"] <= report["tolerance"]
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    unmerged, tok = load_model_for_eval(run.config(), run.path, merge=False)
    ids = tok("Question: 7 - 4 = ?\nAnswer:", return_tensors="pt").input_ids
    in_memory, _ = load_model_for_eval(run.config(), run.path)  # eval.merge_adapter=true: merged on load
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(in_memory(ids).logits, unmerged(ids).logits, rtol=1e-4, atol=1e-4)
    assert not any("lora_" in name or "rosa_" in name for name, _ in in_memory.named_parameters())
    assert RunDir(out).kind == "model"  # a plain HF folder (outside the run: not "merged")


@pytest.mark.parametrize("method", TRAINED)
def test_eval_scores_the_run(trained, method):
    from tunelab.evaluation.evaluate import evaluate

    run, _ = trained[method]
    res = evaluate(run.config(["eval.limit=2", "eval.max_new_tokens=4"]), run.path, run.path)
    assert res["method"] == method and run.is_evaluated
    assert TASKS.get("gsm8k").primary_metric in res["metrics"] and "ref_nll" in res["metrics"]
    assert len(run.predictions_file.read_text().splitlines()) == 2


@pytest.mark.parametrize("method", TRAINED)
def test_resume_after_a_crash_equals_uninterrupted(trained, tiny_model_dir, method, tmp_path):
    from tunelab.train import train

    full, _ = trained[method]
    part = RunDir(tmp_path / "part")
    train(_cfg(tiny_model_dir, part.path, method, "train.save_steps=2"))
    artifact = part.artifact_dir(METHODS.get(method))
    # a crash after the step-2 checkpoint: nothing written after it survives (the end checkpoint neither)
    for p in (artifact, part.results_file, part.tokenizer_dir, part.checkpoint_path(STEPS)):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert [c.name for c in part.checkpoints()] == ["step-000002"]
    res = train(part.config(), resume=True)
    assert res["steps"] == STEPS
    a, b = _artifact_tensors(full, method), _artifact_tensors(part, method)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_a_method_that_trains_nothing_is_refused_by_train(tiny_model_dir, tmp_path):
    from tunelab.train import train

    for method in (m for m, case in METHOD_CASES.items() if case is None):
        cfg = load_config(overrides=[f"model={tiny_model_dir}", f"method={method}", f"out={tmp_path / method}"])
        with pytest.raises(ConfigError, match="trains nothing"):
            train(cfg)
        assert not (tmp_path / method).exists()  # refused before the run directory is written

"""End to end with the real embedded default model (SmolLM2-135M-Instruct from the GGUF wheel)."""

import json

import pytest
import torch

from tunelab.config import load_config
from tunelab.evaluation.evaluate import evaluate
from tunelab.rundir import RunDir
from tunelab.merge import merge_run
from tunelab.models import builtin_gguf_path, load_model, materialize
from tunelab.train import train

pytestmark = pytest.mark.slow


def test_default_model_loads_as_plain_fp32_without_quantization_flags():
    cfg = load_config()
    assert builtin_gguf_path("smollm2-135m").suffix == ".gguf"
    model = load_model(cfg.model, materialize(cfg.model.name), torch.device("cpu"))
    assert next(model.parameters()).dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_train_eval_merge_on_default_model(tmp_path):
    run = tmp_path / "run"
    res = train(load_config(overrides=[
        "task=gsm8k", "method=lora", "data.limit=8", "data.max_length=256", "train.batch_size=4",
        "train.max_steps=2", "train.report_to=[]", "train.progress_bar=false", f"out={run}",
    ]))
    assert res["steps"] == 2 and 0 < res["final_loss"] < 5  # an instruct model already predicts GSM8K text well
    out = evaluate(RunDir(run).config(["eval.limit=3", "eval.max_new_tokens=32"]), run, run)
    assert out["metrics"]["n"] == 3 and out["generated_tokens"] > 0
    preds = [json.loads(l) for l in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert any(p["completion"].strip() for p in preds)  # the model writes answers, not nothing
    assert all(p["expected"] for p in preds)
    report = merge_run(RunDir(run).config(), run)
    assert report["max_abs_logit_diff"] < 1e-3

"""train.precision on the tiny model: bf16-mixed keeps fp32 master weights and the updates bf16 would lose,
bf16-true keeps adapters fp32 and refuses to train bf16 base weights, and every run accounts its state memory."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import ConfigError, load_config
from tunelab.rundir import RunDir
from tunelab.train import train


def _cfg(model_dir, out, *extra):
    return load_config(overrides=[
        f"model={model_dir}", "task=gsm8k", "data.limit=8", "data.max_length=64", "train.batch_size=2",
        "train.lr=5e-3", "train.report_to=[]", "train.progress_bar=false", f"out={out}", *extra,
    ])


def test_bf16_mixed_tracks_fp32_and_keeps_fp32_master_weights(tiny_model_dir, tmp_path):
    common = ["method=full", "train.max_steps=3", "method.freeze_embeddings=true"]
    fp32 = train(_cfg(tiny_model_dir, tmp_path / "fp32", *common, "train.precision=fp32"))
    mixed = train(_cfg(tiny_model_dir, tmp_path / "mixed", *common, "train.precision=bf16-mixed"))
    assert fp32["precision"] == "fp32" and mixed["precision"] == "bf16-mixed"
    assert mixed["final_loss"] == pytest.approx(fp32["final_loss"], rel=0.05)
    assert mixed["final_loss"] != fp32["final_loss"]  # the matmuls really ran in bf16
    weights = load_file(str(tmp_path / "mixed" / "model" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float32}
    assert mixed["master_weight_bytes"] == mixed["trainable_param_bytes"] > 0


def test_bf16_mixed_keeps_an_update_that_bf16_weights_round_away(tiny_model_dir, tmp_path):
    """One small step of full fine-tuning: the fp32 masters move; the same update added to bf16 weights
    (what bf16-true would do) leaves almost every weight where it was."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "mixed"
    train(_cfg(tiny_model_dir, run, "method=full", "train.max_steps=1", "train.lr=1e-5", "train.precision=bf16-mixed"))
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    after = load_file(str(run / "model" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    w0, w1 = before[name], after[name]
    kept = (w1 != w0).float().mean().item()
    in_bf16 = (w0.bfloat16() + (w1 - w0).bfloat16() != w0.bfloat16()).float().mean().item()
    assert kept > 0.9 and in_bf16 < 0.2, (kept, in_bf16)


def test_bf16_true_keeps_lora_adapters_in_fp32(tiny_model_dir, tmp_path):
    res = train(_cfg(tiny_model_dir, tmp_path / "run", "method=lora", "train.max_steps=2", "train.precision=bf16-true"))
    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert res["precision"] == "bf16-true" and {v.dtype for v in adapter.values()} == {torch.float32}
    assert res["master_weight_bytes"] == 0


@pytest.mark.parametrize("method", ["full", "galore"])
def test_bf16_true_refuses_methods_that_update_base_weights(method):
    with pytest.raises(ConfigError, match=f"bf16-true.*method={method}.*bf16-mixed"):
        load_config(overrides=[f"method={method}", "train.precision=bf16-true"])


def test_precision_conflicts_are_reported_with_the_fix():
    with pytest.raises(ConfigError, match="fp32 master weights.*model.dtype"):
        load_config(overrides=["train.precision=bf16-mixed", "model.dtype=bfloat16"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16-mixed needs a CUDA GPU"):
            load_config(overrides=["train.precision=fp16-mixed"])


@pytest.mark.parametrize("method", ["lora", "full", "rosa"])
def test_every_method_accounts_its_optimizer_state(tiny_model_dir, tmp_path, method):
    res = train(_cfg(tiny_model_dir, tmp_path / method, f"method={method}", "train.max_steps=2"))
    trainable = res["trainable_param_bytes"]
    # AdamW: two fp32 moments per trainable value (+ a step counter per tensor)
    assert 2 * trainable <= res["optimizer_state_bytes"] <= 2 * trainable + 64 * 1024
    assert trainable == 4 * res["trainable_params"]


def test_bf16_mixed_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    common = ["method=lora", "train.max_steps=4", "train.precision=bf16-mixed", "method.dropout=0.1"]
    train(_cfg(tiny_model_dir, tmp_path / "full", *common))
    part = RunDir(tmp_path / "part")
    train(_cfg(tiny_model_dir, part.path, *common, "train.save_steps=2"))
    for p in (part.path / "adapter", part.results_file, part.checkpoint_path(4)):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    train(part.config(), resume=True)
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part.path / "adapter" / "adapter_model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k

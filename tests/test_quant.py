"""Quantized bases on the CPU and 8-bit optimizers, for real (bitsandbytes' CPU kernels).

QLoRA train -> eval -> merge, QRoSA mask collection and training, 8-bit GaLore, ``train.optim``
(adamw_8bit over every method's groups, paged refused off CUDA, GaLore refused), an 8-bit resume
that is bit-exact, the 4-bit probe at validation, and one QLoRA run on the default model (slow).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

bnb = pytest.importorskip("bitsandbytes", reason="the dev extras install bitsandbytes")

from tunelab.config import ConfigError, load_config  # noqa: E402
from tunelab.methods import get_method  # noqa: E402
from tunelab.rundir import RunDir  # noqa: E402
from tunelab.train import train  # noqa: E402

CPU = torch.device("cpu")


def _cfg(model_dir, out, *extra, check_env=True):
    return load_config(overrides=[
        f"model={model_dir}", "task=gsm8k", "data.limit=8", "train.batch_size=2", "data.max_length=96",
        "train.report_to=[]", "train.progress_bar=false", f"out={out}", *extra,
    ], check_env=check_env)


def _linear4bit(model) -> list:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _dequantized_twin(model_dir, model4):
    """An fp32 model holding exactly the 4-bit model's (dequantized) weights: the reference."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    mods = dict(ref.named_modules())
    for name, m in model4.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            mods[name].weight.data.copy_(bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state))
    return ref


def _embedding_grad(model, ids) -> torch.Tensor | None:
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)
    emb.grad = None
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return emb.grad


# ------------------------------------------------------------------------------------------
# loading and validation
# ------------------------------------------------------------------------------------------


def test_4bit_loads_on_cpu_fp32_compute_and_gradients_survive_an_eval_pass(tiny_model_dir):
    """NF4 on the CPU computes in fp32 and matches its dequantized twin, even after a no-grad eval pass
    (which, left alone, makes bitsandbytes repack the weights and drop every input gradient)."""
    from tunelab.config import ModelConfig
    from tunelab.models import keep_4bit_layout, load_model

    model = load_model(ModelConfig(name=str(tiny_model_dir), load_in_4bit=True), device=CPU)
    layers = _linear4bit(model)
    assert len(layers) == 14 and all(m.compute_dtype == torch.float32 for m in layers)
    assert model.lm_head.weight.dtype == torch.float32  # the head stays a plain (tied) float weight
    ids = torch.arange(200, 216).view(2, 8)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # a generation / merge check / ref_nll pass
    ref = _dequantized_twin(tiny_model_dir, model)
    with torch.no_grad():
        torch.testing.assert_close(logits, ref(input_ids=ids).logits, rtol=0, atol=1e-5)
    got, want = _embedding_grad(model, ids), _embedding_grad(ref, ids)
    assert got is not None and want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)

    if bnb.functional.has_avx512bf16():  # the control: what keep_4bit_layout prevents, on this CPU
        fresh = load_model(ModelConfig(name=str(tiny_model_dir), load_in_4bit=True), device=CPU)
        for m in _linear4bit(fresh):
            m.support_avx512bf16_for_cpu = True
        fresh.eval()
        with torch.no_grad():
            fresh(input_ids=ids)
        with pytest.warns(UserWarning, match="autograd kernel was not registered"):
            broken = _embedding_grad(fresh, ids)
        assert broken is None or not torch.allclose(broken, want, rtol=1e-2, atol=1e-6)
        assert keep_4bit_layout(fresh) == 14


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_4bit_load_does_not_keep_the_checkpoint_mapped(tiny_model_dir, tmp_path, monkeypatch):
    """The float weights a 4-bit model keeps are its own: the safetensors map (all of it resident after
    quantizing) is released, so peak RSS counts the 4-bit model, not the checkpoint file."""
    import gc

    from tunelab import models
    from tunelab.config import ModelConfig

    def mapped(folder) -> bool:
        gc.collect()
        return str(folder / "model.safetensors") in Path("/proc/self/maps").read_text()

    for name, own in (("owned", True), ("control", False)):
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir, folder)
        with monkeypatch.context() as mp:
            if not own:
                mp.setattr(models, "own_float_weights", lambda model: 0)
            model = models.load_model(ModelConfig(name=str(folder), load_in_4bit=True), device=CPU)
        assert mapped(folder) is not own, name
        assert model.get_input_embeddings().weight.abs().sum() > 0  # the weights are there, just not the map
        del model


def test_4bit_validation_probes_bitsandbytes(tiny_model_dir, tmp_path, monkeypatch):
    from tunelab import models

    cfg = _cfg(tiny_model_dir, tmp_path / "a", "model.load_in_4bit=true", "model.device=cpu")  # allowed on CPU
    assert cfg.model.load_in_4bit
    monkeypatch.setattr(models, "_probe_4bit", lambda device: f"bitsandbytes 4-bit does not run on {device} (test)")
    with pytest.raises(ConfigError) as err:
        _cfg(tiny_model_dir, tmp_path / "b", "model.load_in_4bit=true", "model.device=cpu")
    text = "\n".join(err.value.problems)
    assert "does not run on cpu (test)" in text and "pip install 'bitsandbytes>=0.48'" in text
    assert "model.load_in_4bit=false" in text
    # check_env=False (a login node, `sweep --list`) does not probe this machine
    assert _cfg(tiny_model_dir, tmp_path / "c", "model.load_in_4bit=true", check_env=False).model.load_in_4bit


def test_probe_rejects_a_machine_without_bitsandbytes(monkeypatch):
    import sys

    from tunelab import models
    from tunelab.methods import base

    models._probe_4bit.cache_clear(), base._probe_8bit_optimizer.cache_clear()
    try:
        with monkeypatch.context() as mp:
            mp.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
            assert "bitsandbytes does not import" in models.probe_4bit(CPU)
            assert "bitsandbytes does not import" in base.probe_8bit_optimizer("adamw_8bit", CPU)
    finally:
        models._probe_4bit.cache_clear(), base._probe_8bit_optimizer.cache_clear()
    assert models.probe_4bit(CPU) is None and base.probe_8bit_optimizer("adamw_8bit", CPU) is None


# ------------------------------------------------------------------------------------------
# train.optim
# ------------------------------------------------------------------------------------------


def test_train_optim_is_refused_where_it_cannot_run(tiny_model_dir, tmp_path):
    cases = [
        (["train.optim=paged_adamw_8bit", "model.device=cpu"], "paged_adamw_8bit needs a CUDA GPU"),
        (["method=galore", "train.optim=adamw_8bit"], "method.optim_8bit=true"),
        (["method=full", "train.optim=adamw_8bit", "train.parallelism=fsdp"], "DTensor"),
        (["method=full", "train.optim=adamw_8bit", "train.parallelism=deepspeed"], "flat buffer"),
    ]
    for extra, needle in cases:
        with pytest.raises(ConfigError) as err:
            _cfg(tiny_model_dir, tmp_path / "x", *extra)
        text = "\n".join(err.value.problems)
        assert needle in text and ("train.optim=adamw" in text or "optim_8bit" in text), text
    # paged is a CUDA matter: a config prepared elsewhere (check_env=False, device auto) is not refused here
    assert _cfg(tiny_model_dir, tmp_path / "y", "train.optim=paged_adamw_8bit", check_env=False).train.optim


@pytest.mark.parametrize("method, extra, n_groups", [
    ("lora", [], 1), ("full", [], 1), ("rosa", ["method.lora_lr=3e-3", "method.sparse_lr=5e-4"], 2),
])
def test_adamw_8bit_takes_every_methods_groups(tiny_model, tiny_model_dir, tmp_path, method, extra, n_groups):
    cfg = _cfg(tiny_model_dir, tmp_path / "r", f"method={method}", "train.optim=adamw_8bit", "train.lr=1e-3", *extra)
    m = get_method(method)(cfg.method)
    model = m.prepare(tiny_model, cfg)
    opt = m.build_optimizer(model, cfg.train)
    assert isinstance(opt, bnb.optim.AdamW8bit) and len(opt.param_groups) == n_groups
    if method == "rosa":
        assert [g["lr"] for g in opt.param_groups] == [3e-3, 5e-4]  # RoSA's two learning rates survive
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
    cfg.train.optim = "adamw"
    assert type(m.build_optimizer(model, cfg.train)) is torch.optim.AdamW


def test_adamw_8bit_resume_is_bit_exact(tiny_model_dir, tmp_path):
    """Full fine-tuning with 8-bit AdamW: 4 steps = 2 steps, a crash after the step-2 checkpoint, a resume."""
    common = ["method=full", "train.max_steps=4", "train.lr=5e-3", "train.warmup_steps=1", "train.optim=adamw_8bit"]
    full, part = tmp_path / "full", tmp_path / "part"
    res = train(_cfg(tiny_model_dir, full, *common))
    train(_cfg(tiny_model_dir, part, *common, "train.save_steps=2"))
    state = torch.load(part / "checkpoints" / "step-000002" / "optimizer.pt", weights_only=True)["state"]
    codes = [t for s in state.values() for t in _tensors(s) if t.dtype == torch.uint8]
    assert codes, "no 8-bit optimizer state in the checkpoint"
    for name in ("model", "results.json", "tokenizer", "checkpoints/step-000004"):  # the crash
        p = part / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert [c.name for c in (part / "checkpoints").iterdir()] == ["step-000002"]
    train(RunDir(part).config(), resume=True)
    a, b = load_file(str(full / "model" / "model.safetensors")), load_file(str(part / "model" / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert a.keys() == b.keys() and max(float((a[k] - base[k]).abs().max()) for k in a) > 1e-3  # it trained
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert res["steps"] == 4


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


# ------------------------------------------------------------------------------------------
# QLoRA, QRoSA, 8-bit GaLore through the trainer
# ------------------------------------------------------------------------------------------


def test_qlora_train_eval_merge(tiny_model_dir, tmp_path):
    """QLoRA on the CPU: train, eval with the 4-bit base, merge into the dequantized base (the logit gap)."""
    from tunelab.config import ModelConfig
    from tunelab.evaluation.evaluate import evaluate, load_model_for_eval
    from tunelab.merge import merge_run
    from tunelab.models import load_model

    run = tmp_path / "qlora"
    res = train(_cfg(tiny_model_dir, run, "method=lora", "model.load_in_4bit=true", "train.max_steps=3",
                     "train.lr=2e-2", "method.dropout=0", "eval.limit=2", "eval.max_new_tokens=8"))
    assert res["steps"] == 3 and res["trainable_params"] == 16384
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    cfg = RunDir(run).config()
    metrics = evaluate(cfg, run, run)["metrics"]
    assert metrics["n"] == 2 and metrics["ref_nll"] > 0

    ids = torch.arange(300, 320).view(2, 10)
    trained, _ = load_model_for_eval(RunDir(run).config(), run, CPU)  # 4-bit base + adapter
    assert len(_linear4bit(trained)) == 14
    report = merge_run(RunDir(run).config(), run)
    assert report["quantized_base"] == "nf4" and "lossy" in report["lossy"]
    assert json.loads((run / "merged" / "merge_check.json").read_text())["lossy"] == report["lossy"]
    merged = load_model(ModelConfig(name=str(run / "merged")), device=CPU)
    assert not _linear4bit(merged) and "quantization_config" not in json.loads((run / "merged" / "config.json").read_text())
    # the adapter on the original float base: what merging into the unquantized weights would give
    import peft

    plain_cfg = RunDir(run).config()
    plain_cfg.model.load_in_4bit = False
    on_float = peft.PeftModel.from_pretrained(load_model(plain_cfg.model, device=CPU), str(run / "adapter"))
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        gap_merged = float((merged(input_ids=ids).logits - want).abs().max())
        gap_float = float((on_float(input_ids=ids).logits - want).abs().max())
    assert report["max_abs_logit_diff"] <= 1e-3 and gap_merged <= 1e-3  # the merged model is the 4-bit run
    assert gap_float > 10 * max(gap_merged, 1e-4)  # the 4-bit rounding is real: the float base is another model
    print(f"QLoRA logit gap vs the trained 4-bit model: merged {gap_merged:.2e}, adapter on float base {gap_float:.3f}")


def test_qrosa_collects_masks_and_trains_on_a_4bit_base(tiny_model_dir, tmp_path):
    from tunelab.evaluation.evaluate import load_model_for_eval
    from tunelab.methods.rosa.adapters import rosa_layers
    from tunelab.methods.rosa.sparse_ops import is_4bit

    run = tmp_path / "qrosa"
    res = train(_cfg(tiny_model_dir, run, "method=rosa", "model.load_in_4bit=true", "method.density=0.02",
                     "train.max_steps=3", "train.lr=1e-2", "method.sparse_lr=1e-2", "train.optim=adamw_8bit"))
    mr = res["method_results"]
    assert mr["rosa_mask_ready"] and mr["rosa_mask_source"] == "collected" and mr["rosa_nnz_total"] > 0
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    sparse = [v for k, v in adapter.items() if "rosa_values" in k]
    assert sparse and all(v.abs().sum() > 0 for v in sparse)  # the sparse part trained after the mask
    model, _ = load_model_for_eval(RunDir(run).config(), run, CPU)
    layers = rosa_layers(model)
    assert len(layers) == 14 and all(is_4bit(m.base_layer) and m.mask_ready for m in layers)


def test_galore_8bit_moments_on_cpu(tiny_model_dir, tmp_path):
    common = ["method=galore", "train.max_steps=2", "train.lr=5e-3", "method.rank=4"]
    r32 = train(_cfg(tiny_model_dir, tmp_path / "g32", *common))["method_results"]
    r8 = train(_cfg(tiny_model_dir, tmp_path / "g8", *common, "method.optim_8bit=true"))["method_results"]
    assert r8["tensors_projected"] == r32["tensors_projected"] == 14
    # moments of tensors >= 4096 elements in 8-bit (codes + absmax): the embedding's state shrinks ~4x
    assert r8["optimizer_state_bytes_plain"] < 0.3 * r32["optimizer_state_bytes_plain"]
    a = load_file(str(tmp_path / "g8" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "g32" / "model" / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    k = "model.layers.0.self_attn.q_proj.weight"
    step8, step32 = a[k] - base[k], b[k] - base[k]
    assert step8.abs().sum() > 0 and float(torch.nn.functional.cosine_similarity(step8.flatten(), step32.flatten(), 0)) > 0.9


# ------------------------------------------------------------------------------------------
# the default model (slow)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_qlora_default_model_end_to_end(default_model_dir, tmp_path):
    from tunelab.evaluation.evaluate import evaluate

    run = tmp_path / "qlora-smollm2"
    res = train(_cfg(default_model_dir, run, "method=lora", "model.load_in_4bit=true", "train.max_steps=2",
                     "data.limit=4", "train.lr=1e-3", "data.max_length=128", "train.optim=adamw_8bit",
                     "eval.limit=1", "eval.max_new_tokens=8"))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert res["steps"] == 2 and all(0 < x < 10 for x in losses)  # a pretrained model, not random noise
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert len([k for k in adapter if "lora_B" in k]) == 30 * 7 and all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    metrics = evaluate(RunDir(run).config(), run, run)["metrics"]
    assert metrics["n"] == 1 and 0 < metrics["ref_nll"] < 10

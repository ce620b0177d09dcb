"""RoSA: layer math against dense references, mask selection, schedule, save/load/merge, DDP, validation.

Every test runs on the tiny 2-layer Llama (or a single layer) in a few seconds. The manual loop in
``_run`` calls the callbacks in the trainer's order: on_step_begin → grad_accum × (forward,
backward) → on_before_optimizer_step → optimizer.step / zero_grad → state.step += 1 → on_step_end.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunelab.config import ConfigError, RunConfig, TrainConfig, load_config
from tunelab.methods import get_method
from tunelab.methods.base import TrainState
from tunelab.methods.rosa import MASKS_FILE, RosaConfig, RosaMethod, rosa_layers
from tunelab.methods.rosa.layer import RosaLinear
from tunelab.methods.rosa.sparse_ops import dense_weight, is_4bit

VOCAB = 1000  # token ids drawn below this (the tiny model has the full SmolLM2 vocabulary)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _run_cfg(**method) -> RunConfig:
    method.setdefault("dropout", 0.0)
    return RunConfig(method=RosaConfig(**method), train=TrainConfig(lr=1e-2, max_steps=100))


def _prepare(model, seed=0, **method):
    cfg = _run_cfg(**method)
    meth = RosaMethod(cfg.method)
    torch.manual_seed(seed)
    model = meth.prepare(model, cfg)
    opt = meth.build_optimizer(model, cfg.train)
    return meth, model, opt


def _batches(n, seed=0, bsz=2, length=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (bsz, length), generator=g) for _ in range(n)]


def _run(meth, model, opt, n_steps, grad_accum=1, seed=0, state=None, record=None, on_micro=None):
    """A tiny trainer loop with the real callback order; returns the TrainState."""
    cbs = meth.callbacks()
    state = state or TrainState(grad_accum=grad_accum, max_steps=1000)
    if state.step == 0 or record is not None:
        for cb in cbs:
            cb.on_train_begin(state, model, opt)
    data = _batches(1000, seed)
    for _ in range(n_steps):
        for cb in cbs:
            cb.on_step_begin(state, model)
        for k in range(grad_accum):
            state.micro_step = k
            ids = data[state.step * grad_accum + k]
            loss = model(input_ids=ids, labels=ids).loss / grad_accum
            loss.backward()
            if on_micro is not None:
                on_micro(model)
        for cb in cbs:
            cb.on_before_optimizer_step(state, model, opt)
        if record is not None:
            layers = rosa_layers(model)
            record.append({
                "step": state.step,
                "collecting": layers[0].collecting,
                "spa_active": layers[0].spa_active,
                "acc_count": layers[0]._acc_count,
                "values_grad": any(m.rosa_values.grad is not None for m in layers),
                "lora_grad": all(m.lora_B.grad is not None for m in layers if m.r),
            })
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        for cb in cbs:
            cb.on_step_end(state, model, opt)
        if any(cb.should_stop(state) for cb in cbs):
            break
    return state


def _single_layer(m=40, n=48, r=4, nnz=60, bias=True, dtype=torch.float32, sddmm="auto", seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(n, m, bias=bias).to(dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    layer = RosaLinear(base, name="layer", r=r, alpha=8.0, dropout=0.0, nnz=nnz, sddmm_impl=sddmm)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
        layer.set_mask(torch.randperm(m * n)[:nnz])
        layer.rosa_values.normal_(0, 0.1)
    layer.spa_active = True
    return layer


def _dense_reference_weight(layer):
    return dense_weight(layer.base_layer, torch.float64) + layer.lora_delta(torch.float64) + layer.sparse_delta(torch.float64)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------------------------------
# layer math
# ------------------------------------------------------------------------------------------


def test_forward_equals_dense_weight_plus_lora_plus_sparse():
    layer = _single_layer()
    x = torch.randn(3, 5, 48)
    w = _dense_reference_weight(layer)
    ref = F.linear(x.double(), w, layer.base_layer.bias.double())
    # training path (autograd Function, W + S materialised per call)
    out = layer(x.requires_grad_())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # inference paths: few tokens (gather + index_add on top of base(x)) and many tokens (W + S)
    with torch.no_grad():
        torch.testing.assert_close(layer(x[:1, :2]).double(), ref[:1, :2], rtol=1e-5, atol=1e-5)
        big = torch.randn(400, 48)
        torch.testing.assert_close(
            layer(big).double(), F.linear(big.double(), w, layer.base_layer.bias.double()), rtol=1e-5, atol=1e-5
        )
    # W itself is never modified
    torch.manual_seed(0)
    assert torch.equal(layer.base_layer.weight, nn.Linear(48, 40).weight.detach())


@pytest.mark.parametrize("impl", ["sampled", "gather", "dense"])
def test_sparse_gradient_equals_dense_gradient_on_mask(impl):
    layer = _single_layer(sddmm=impl, dtype=torch.float64)
    layer.base_layer.bias.requires_grad_(True)  # a bias the user trains keeps its gradient
    x = torch.randn(2, 7, 48, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 7, 40, dtype=torch.float64)
    (layer(x) * r).sum().backward()

    w_ref = _dense_reference_weight(layer).requires_grad_(True)
    b_ref = layer.base_layer.bias.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    (F.linear(x_ref, w_ref, b_ref) * r).sum().backward()

    idx = layer.rosa_indices.long()
    torch.testing.assert_close(layer.rosa_values.grad.double(), w_ref.grad.reshape(-1)[idx], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer.base_layer.bias.grad, b_ref.grad)
    assert layer.base_layer.weight.grad is None
    # LoRA factors: dL/dB = s·(dOᵀ·X)·Aᵀ, dL/dA = s·Bᵀ·(dOᵀ·X)
    g = w_ref.grad
    torch.testing.assert_close(layer.lora_B.grad.double(), layer.scaling * g @ layer.lora_A.double().T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_A.grad.double(), layer.scaling * layer.lora_B.double().T @ g, rtol=1e-5, atol=1e-6)


def test_sparse_gradient_fp32_and_first_layer_without_input_grad():
    """fp32 math; a layer whose input needs no grad (the first q/k/v) still trains its values."""
    layer = _single_layer(bias=False)
    x = torch.randn(64, 48)  # no requires_grad
    r = torch.randn(64, 40)
    (layer(x) * r).sum().backward()
    w_ref = _dense_reference_weight(layer).float().requires_grad_(True)
    (F.linear(x, w_ref) * r).sum().backward()
    torch.testing.assert_close(layer.rosa_values.grad, w_ref.grad.reshape(-1)[layer.rosa_indices.long()], rtol=1e-4, atol=1e-5)


def test_bf16_base_trains_with_fp32_adapters(tiny_model):
    """The CUDA configuration (bf16 weights) on CPU: adapters and sparse math stay fp32."""
    model = tiny_model.to(torch.bfloat16)
    meth, model, opt = _prepare(model, density=0.02)
    _run(meth, model, opt, n_steps=2)
    layer = rosa_layers(model)[0]
    assert layer.lora_A.dtype == layer.rosa_values.dtype == torch.float32
    assert layer.mask_ready and torch.isfinite(layer.rosa_values).all() and layer.rosa_values.abs().sum() > 0
    x = torch.randn(4, layer.in_features, dtype=torch.bfloat16)
    ref = x.double() @ _dense_reference_weight(layer).T
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out = layer(x)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    merged = meth.merge(model)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------
# mask selection
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["mean", "mean_squared"])
def test_mask_is_topk_of_accumulated_dense_gradients(tiny_model, mode):
    """Hooks-free collection (dOᵀ·X in backward) == a reference that lets W.requires_grad and sums W.grad."""
    model = tiny_model.double()
    meth, model, opt = _prepare(model, schedule="default", spa_num_grads=2, grad_acc_mode=mode, density=0.01)
    ref_model = copy.deepcopy(model)  # same LoRA init, same everything
    ref_opt = meth.build_optimizer(ref_model, TrainConfig(lr=1e-2))  # before W requires grad: W stays out
    ref_layers = {m.rosa_name: m for m in rosa_layers(ref_model)}
    for m in ref_layers.values():
        m.base_layer.weight.requires_grad_(True)
    acc = {n: torch.zeros_like(m.base_layer.weight) for n, m in ref_layers.items()}

    def collect():
        for n, m in ref_layers.items():
            g = m.base_layer.weight.grad
            acc[n] += g if mode == "mean" else g * g
            m.base_layer.weight.grad = None

    state = _run(meth, model, opt, n_steps=2, grad_accum=2, seed=3)
    # reference: same batches, same optimizer steps on the LoRA factors
    data = _batches(4, 3)
    for step in range(2):
        for k in range(2):
            ids = data[step * 2 + k]
            (ref_model(input_ids=ids, labels=ids).loss / 2).backward()
            collect()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    assert state.step == 2
    cb = meth.callbacks()[0]
    assert cb.mask_ready and cb.mask_built_at_step == 2
    assert set(cb.collected_micro_batches.values()) == {4}  # 2 steps x 2 micro-batches
    for layer in rosa_layers(model):
        score = acc[layer.rosa_name] / 4
        score = score.abs() if mode == "mean" else score
        k = layer.nnz
        assert k == int(0.01 * layer.out_features * layer.in_features)
        expected = torch.topk(score.reshape(-1), k).indices.sort().values
        got = layer.rosa_indices.long()
        if not torch.equal(got, expected):  # only exact ties at the k-th value may differ
            kth = score.reshape(-1)[expected].min()
            diff = set(got.tolist()) ^ set(expected.tolist())
            assert all(torch.isclose(score.reshape(-1)[i], kth, rtol=1e-9) for i in diff), layer.rosa_name


def test_schedule_transitions_at_optimizer_steps_with_grad_accum(tiny_model):
    """wl2 + spa_num_grads 2 + grad_accum 3: LoRA [0,2), collect [2,4), mask after step 3, sparse from 4."""
    meth, model, opt = _prepare(tiny_model, schedule="wl2", spa_num_grads=2, density=0.02)
    w0 = {m.rosa_name: m.base_layer.weight.detach().clone() for m in rosa_layers(model)}
    values = [m.rosa_values for m in rosa_layers(model)]
    rec: list[dict] = []
    _run(meth, model, opt, n_steps=6, grad_accum=3, record=rec)
    assert [r["collecting"] for r in rec] == [False, False, True, True, False, False]
    assert [r["spa_active"] for r in rec] == [False, False, False, False, True, True]
    assert [r["acc_count"] for r in rec[:4]] == [0, 0, 3, 6]  # every micro-batch of the window
    assert [r["values_grad"] for r in rec] == [False, False, False, False, True, True]
    assert all(r["lora_grad"] for r in rec)
    cb = meth.callbacks()[0]
    assert cb.mask_built_at_step == 4 and cb.state_dict()["mask_ready"]
    # AdamW skipped the values until they had gradients: no state, one Adam step each after
    assert all(int(opt.state[v]["step"]) == 2 for v in values)
    for layer in rosa_layers(model):
        assert torch.equal(layer.base_layer.weight, w0[layer.rosa_name])  # base frozen
        assert layer._acc is None  # accumulators freed
        dense_s = layer.sparse_delta()
        on = torch.zeros(dense_s.numel(), dtype=torch.bool)
        on[layer.rosa_indices.long()] = True
        assert dense_s.reshape(-1)[~on].abs().max() == 0  # S is zero off the mask
        assert (dense_s.reshape(-1)[on] != 0).float().mean() > 0.9  # and trained on it


def test_spa_only_trains_sparse_part_alone(tiny_model):
    meth, model, opt = _prepare(tiny_model, schedule="spa_only", rank=0, density=0.02)
    assert all(m.lora_A is None for m in rosa_layers(model))
    rec: list[dict] = []
    _run(meth, model, opt, n_steps=3, grad_accum=2, record=rec)
    assert [r["collecting"] for r in rec] == [True, False, False]
    assert [r["values_grad"] for r in rec] == [False, True, True]
    assert all(m.rosa_values.abs().sum() > 0 for m in rosa_layers(model))


def test_lora_only_has_no_sparse_part(tiny_model):
    meth, model, opt = _prepare(tiny_model, schedule="lora_only", density=0.0)
    assert all(m.rosa_values is None and m.nnz == 0 for m in rosa_layers(model))
    assert len(opt.param_groups) == 1
    _run(meth, model, opt, n_steps=1)


def test_mask_only_stops_once_masks_exist(tiny_model, tmp_path):
    meth, model, opt = _prepare(tiny_model, schedule="wl1", mask_only=True)
    state = _run(meth, model, opt, n_steps=10)
    assert state.step == 2  # one LoRA step, one collection step, then stop
    meth.save_artifact(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / MASKS_FILE).is_file()


# ------------------------------------------------------------------------------------------
# optimizer groups, results
# ------------------------------------------------------------------------------------------


def test_param_groups_two_learning_rates_and_frozen_base(tiny_model):
    cfg = _run_cfg(lora_lr=7e-4, sparse_lr=2e-4, bias="none")
    meth = RosaMethod(cfg.method)
    model = meth.prepare(tiny_model, cfg)
    groups = meth.param_groups(model, TrainConfig(lr=1e-3))
    assert [(g["name"], g["lr"]) for g in groups] == [("rosa_lora", 7e-4), ("rosa_sparse", 2e-4)]
    ids = {id(p) for g in groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in ids}
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("lora_A", "lora_B", "rosa_values")) for n in names)
    assert RosaMethod(RosaConfig()).param_groups(model, TrainConfig(lr=1e-3))[0]["lr"] == 1e-3  # lora_lr null
    res = meth.extra_results(model, None)
    layers = rosa_layers(model)
    assert len(layers) == 14  # 2 layers x q k v o gate up down; lm_head excluded
    assert res["rosa_nnz_total"] == res["rosa_trainable_sparse"] == sum(res["rosa_nnz_per_layer"].values())
    assert res["rosa_trainable_lora"] == sum(8 * (m.in_features + m.out_features) for m in layers)
    assert res["rosa_nnz_per_layer"]["model.layers.0.mlp.up_proj"] == int(0.006 * 128 * 64)


def test_patterns_and_bias_option(tiny_model):
    meth, model, _ = _prepare(
        tiny_model, bias="rosa_only", target_modules=["q_proj", "down_proj"],
        rank_pattern={r"model\.layers\.1\..*": 2}, density_pattern={"down_proj": 0.05},
    )
    layers = {m.rosa_name: m for m in rosa_layers(model)}
    assert sorted(layers) == sorted(
        f"model.layers.{i}.{s}" for i in (0, 1) for s in ("self_attn.q_proj", "mlp.down_proj")
    )
    assert layers["model.layers.0.self_attn.q_proj"].r == 8 and layers["model.layers.1.self_attn.q_proj"].r == 2
    assert layers["model.layers.0.mlp.down_proj"].nnz == int(0.05 * 64 * 128)


# ------------------------------------------------------------------------------------------
# merge, save / load, masks, resume
# ------------------------------------------------------------------------------------------


def _trained(model, steps=3, **kw):
    kw.setdefault("density", 0.02)
    meth, model, opt = _prepare(model, **kw)
    _run(meth, model, opt, n_steps=steps)
    return meth, model


def test_merge_equals_unmerged(tiny_model):
    meth, model = _trained(tiny_model)
    model.eval()
    ids = _batches(1, 9, bsz=2, length=20)[0]
    unmerged = _logits(model, ids)
    with torch.enable_grad():  # the training path of the layer gives the same logits
        torch.testing.assert_close(model(input_ids=ids).logits.detach(), unmerged, rtol=1e-5, atol=1e-5)
    merged = meth.merge(model)
    assert not rosa_layers(merged)
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(_logits(merged, ids), unmerged, rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip(tiny_model, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    meth, model = _trained(tiny_model)
    model.eval()
    out = tmp_path / "adapter"
    meth.save_artifact(model, out)
    assert {p.name for p in out.iterdir()} == {"rosa_config.json", "adapter_model.safetensors", MASKS_FILE}
    text = (out / "rosa_config.json").read_text()
    info = json.loads(text)
    assert str(tmp_path) not in text and str(tiny_model_dir) not in text and info["mask_ready"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.rosa_indices"].dtype == torch.int32
    assert {k.rsplit(".", 1)[1] for k in tensors} == {"lora_A", "lora_B", "rosa_values", "rosa_indices"}

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    loaded = RosaMethod(RosaConfig()).load_for_inference(base, out)
    ids = _batches(1, 5)[0]
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-6)
    for a, b in zip(rosa_layers(loaded), rosa_layers(model)):
        assert torch.equal(a.rosa_indices, b.rosa_indices) and a.spa_active


def test_mask_from_reuses_masks_and_skips_collection(tiny_model, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    meth, model = _trained(tiny_model, steps=1, mask_only=True)
    meth.save_artifact(model, tmp_path / "adapter")
    masks = {m.rosa_name: m.rosa_indices.clone() for m in rosa_layers(model)}

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # a folder works as well as the file
    meth2, model2, opt2 = _prepare(fresh, density=0.02, mask_from=str(tmp_path / "adapter"))
    rec: list[dict] = []
    _run(meth2, model2, opt2, n_steps=1, record=rec)
    assert rec == [dict(rec[0], collecting=False, spa_active=True, values_grad=True)]
    assert meth2.extra_results(model2, opt2)["rosa_mask_source"] == "mask_from"
    for m in rosa_layers(model2):
        assert torch.equal(m.rosa_indices, masks[m.rosa_name]) and m._acc is None


def test_mask_file_from_another_model_names_the_layer(tiny_model, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    meth, model = _trained(tiny_model, steps=1, mask_only=True)
    meth.save_artifact(model, tmp_path / "adapter")
    mask_file = str(tmp_path / "adapter" / MASKS_FILE)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*64x64.*32x32"):
        _prepare(other, density=0.02, mask_from=mask_file)
    same_arch = lambda: LlamaForCausalLM(model.config)  # noqa: E731
    with pytest.raises(ValueError, match=r"q_proj.*density"):  # same model, another density
        _prepare(same_arch(), density=0.05, mask_from=mask_file)
    with pytest.raises(ValueError, match="does not adapt"):  # other target modules
        _prepare(same_arch(), density=0.02, target_modules=["q_proj"], mask_from=mask_file)


def test_resume_restores_mask_without_rebuilding(tiny_model, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    meth, model, opt = _prepare(tiny_model, density=0.02)
    state = _run(meth, model, opt, n_steps=2)
    sd = meth.trainable_state_dict(model)
    cb_state = meth.callbacks()[0].state_dict()
    assert any(k.endswith(".rosa_indices") for k in sd)
    json.dumps(cb_state)  # small and JSON-friendly

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    meth2, model2, opt2 = _prepare(fresh, seed=123, density=0.02)
    meth2.load_trainable_state_dict(model2, {k: v.clone() for k, v in sd.items()})
    meth2.callbacks()[0].load_state_dict(cb_state)
    rec: list[dict] = []
    _run(meth2, model2, opt2, n_steps=1, state=TrainState(step=state.step), record=rec)
    assert rec[0]["collecting"] is False and rec[0]["spa_active"] is True
    for a, b in zip(rosa_layers(model2), rosa_layers(model)):
        assert torch.equal(a.rosa_indices, b.rosa_indices)

    # a checkpoint that claims masks but lacks them is refused, not silently rebuilt
    meth3, model3, opt3 = _prepare(AutoModelForCausalLM.from_pretrained(tiny_model_dir), density=0.02)
    meth3.callbacks()[0].load_state_dict(cb_state)
    with pytest.raises(RuntimeError, match="masks"):
        meth3.callbacks()[0].on_train_begin(TrainState(step=2), model3, opt3)


# ------------------------------------------------------------------------------------------
# 4-bit base (bitsandbytes CPU kernels)
# ------------------------------------------------------------------------------------------


def _quantize_linears(model):
    bnb = pytest.importorskip("bitsandbytes")
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and "lm_head" not in name:
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(mod.weight.data.clone(), requires_grad=False, quant_type="nf4")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to("cpu"))
    return model


def test_4bit_base_collect_train_merge(tiny_model):
    try:
        model = _quantize_linears(tiny_model)
        model(input_ids=torch.zeros(1, 2, dtype=torch.long))
    except (RuntimeError, NotImplementedError) as exc:  # pragma: no cover - no CPU 4-bit kernels
        pytest.skip(f"bitsandbytes 4-bit does not run on this CPU: {exc}")
    meth, model, opt = _prepare(model, density=0.02)
    _run(meth, model, opt, n_steps=2)
    layers = rosa_layers(model)
    assert all(is_4bit(m.base_layer) and m.mask_ready and m.rosa_values.abs().sum() > 0 for m in layers)
    layer = layers[0]
    x = torch.randn(3, layer.in_features)
    w = _dense_reference_weight(layer)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), x.double() @ w.T, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="lossy"):
        merged = meth.merge(model)
    assert is_4bit(merged.model.layers[0].self_attn.q_proj)


# ------------------------------------------------------------------------------------------
# DDP: every rank builds the same mask from all ranks' gradients
# ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, model_dir, out_dir, port):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
        meth, model, opt = _prepare(model, density=0.02)  # same seed: same LoRA init on every rank
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=meth.ddp_find_unused_parameters)
        cbs = meth.callbacks()
        state = TrainState(world_size=world, rank=rank)
        for cb in cbs:
            cb.on_train_begin(state, model, opt)
        data = _batches(2, seed=100 + rank)  # each rank sees different data
        for step in range(2):
            for cb in cbs:
                cb.on_step_begin(state, model)
            ids = data[step]
            ddp(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            state.step += 1
            for cb in cbs:
                cb.on_step_end(state, model, opt)
        torch.save(
            {
                "masks": {m.rosa_name: m.rosa_indices.clone() for m in rosa_layers(model)},
                "values": {m.rosa_name: m.rosa_values.detach().clone() for m in rosa_layers(model)},
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_build_identical_masks_from_all_data(tiny_model_dir, tmp_path):
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    # spawn, not fork: a child forked from this multi-threaded test process can deadlock on a lock
    # another thread held at the fork (seen: rank 0 hung at exit after writing its result)
    mp.start_processes(_ddp_worker, args=(2, str(tiny_model_dir), str(tmp_path), _free_port()), nprocs=2,
                       join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        torch.testing.assert_close(r0["values"][name], r1["values"][name])  # sparse grads all-reduced too
    # the mask is the one a single process gets from both ranks' batches (mean of G² over them)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    meth, model, opt = _prepare(model, density=0.02)
    cbs = meth.callbacks()
    state = TrainState()
    for cb in cbs:
        cb.on_train_begin(state, model, opt)
        cb.on_step_begin(state, model)
    for rank in (0, 1):
        ids = _batches(1, seed=100 + rank)[0]
        model(input_ids=ids, labels=ids).loss.backward()
    state.step = 1
    for cb in cbs:
        cb.on_step_end(state, model, opt)
    for m in rosa_layers(model):
        assert torch.equal(m.rosa_indices, r0["masks"][m.rosa_name]), m.rosa_name


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, message",
    [
        (dict(density=0.0), "density must be in (0, 1)"),
        (dict(density=1.5), "density must be in (0, 1)"),
        (dict(schedule="lora_only"), "set method.density=0"),
        (dict(rank=0), "method.rank=0 leaves no LoRA part"),
        (dict(rank=0, schedule="wl8"), "method.rank=0 leaves no LoRA part"),
        (dict(schedule="spa_only"), "set method.rank=0"),
        (dict(schedule="warmup5"), "wlN"),
        (dict(mask_from="/nonexistent/masks.safetensors"), "does not exist"),
        (dict(mask_only=True, schedule="wl64"), "raise train.max_steps"),
        (dict(mask_only=True, mask_from="/nonexistent"), "set only one"),
        (dict(spa_num_grads=0), "spa_num_grads"),
        (dict(density_pattern={"q_proj": 2.0}), "density_pattern"),
        (dict(rank_pattern={"(": 4}), "regular expression"),
    ],
)
def test_validate_rejects_bad_settings(method, message):
    cfg = _run_cfg(**method)
    cfg.train.max_steps = 10
    problems = RosaMethod.validate(cfg)
    assert any(message in p for p in problems), problems


@pytest.mark.parametrize(
    "method",
    [dict(), dict(schedule="lora_only", density=0.0), dict(schedule="spa_only", rank=0), dict(schedule="wl64", mask_only=True)],
)
def test_validate_accepts_good_settings(method):
    cfg = _run_cfg(**method)
    assert RosaMethod.validate(cfg) == []


def test_config_errors_through_the_parser():
    assert get_method("rosa") is RosaMethod
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["method=rosa", "method.schedule=wl", "method.grad_acc_mode=sum"])
    text = str(err.value)
    assert "grad_acc_mode" in text and "'mean' | 'mean_squared'" in text
    cfg = load_config(overrides=["method=rosa", "method.density=0.01", "method.schedule=wl64"])
    assert cfg.method.density == 0.01 and cfg.method.schedule == "wl64"


# ------------------------------------------------------------------------------------------
# end to end through the trainer and the CLI: the paper's two-phase recipe
# ------------------------------------------------------------------------------------------


def _train_args(tiny_model_dir, out, *extra):
    return [
        f"model={tiny_model_dir}", "task=gsm8k", "data.limit=16", "data.max_length=64", "train.batch_size=4",
        "train.report_to=[]", "train.progress_bar=false", f"out={out}", "method=rosa", *extra,
    ]


def test_two_phase_recipe_end_to_end(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from tunelab.train import train

    phase1 = tmp_path / "masks-run"
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", "train",
         *_train_args(tiny_model_dir, phase1, "method.schedule=wl1", "method.mask_only=true", "train.max_steps=50",
                      "train.grad_accum=2")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res1 = json.loads((phase1 / "results.json").read_text())
    assert res1["steps"] == 2 and res1["stopped"] == "method_requested_stop"
    assert res1["method_results"]["rosa_mask_source"] == "collected"
    mask_file = phase1 / "adapter" / MASKS_FILE
    assert mask_file.is_file()

    phase2 = tmp_path / "train-run"
    res2 = train(load_config(overrides=_train_args(
        tiny_model_dir, phase2, f"method.mask_from={mask_file}", "train.max_steps=2", "train.lr=1e-2"
    )))
    assert res2["steps"] == 2 and res2["method_results"]["rosa_mask_source"] == "mask_from"
    a = load_file(str(phase2 / "adapter" / "adapter_model.safetensors"))
    m = load_file(str(mask_file))
    for name, idx in m.items():
        assert torch.equal(a[f"{name}.rosa_indices"], idx)
        assert a[f"{name}.rosa_values"].abs().sum() > 0

    # evaluation (unmerged, with generation) and merge of the trained run
    from tunelab.evaluation.evaluate import evaluate
    from tunelab.rundir import RunDir
    from tunelab.merge import merge_run

    res = evaluate(RunDir(phase2).config(["eval.limit=2", "eval.max_new_tokens=4"]), phase2, tmp_path / "eval")
    assert res
    report = merge_run(RunDir(phase2).config(), phase2)
    assert report["max_abs_logit_diff"] < 1e-4
    assert (phase2 / "merged" / "config.json").is_file()


def test_trainer_resume_after_mask_equals_uninterrupted(tiny_model_dir, tmp_path):
    """wl1: mask built at the end of step 1; the step-2 checkpoint carries it; resuming reuses it."""
    import shutil

    from safetensors.torch import load_file

    from tunelab.rundir import RunDir
    from tunelab.train import train

    common = ["method.schedule=wl1", "method.density=0.02", "method.dropout=0.0", "train.max_steps=4",
              "train.lr=5e-3", "data.limit=8", "train.batch_size=2"]
    full, part = tmp_path / "full", tmp_path / "part"
    train(load_config(overrides=_train_args(tiny_model_dir, full, *common)))
    train(load_config(overrides=_train_args(tiny_model_dir, part, *common, "train.save_steps=2")))
    for name in ("adapter", "results.json", "tokenizer", "checkpoints/step-000004"):  # a crash after the step-2 checkpoint
        p = part / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    ckpt = load_file(str(part / "checkpoints" / "step-000002" / "trainable.safetensors"))
    assert any(k.endswith(".rosa_indices") for k in ckpt)
    res = train(RunDir(part).config(), resume=True)
    assert res["method_results"]["rosa_mask_source"] == "collected"  # restored, not rebuilt
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)

"""train.lean_mlp (tunelab.train.lean_mlp): gated MLPs save gate and up only, with the stock module's numbers bitwise."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tunelab.train.lean_mlp import is_gated_mlp, lean_mlps
from tunelab.utils import heap_in_use_bytes

# model types whose MLP is down(act(gate) * up): (config class, activation)
GATED = [("LlamaConfig", "silu"), ("MistralConfig", "silu"), ("Qwen2Config", "silu"), ("Qwen3Config", "silu"),
         ("GemmaConfig", "gelu_pytorch_tanh"), ("Olmo2Config", "silu")]


def _tiny(config_name: str, act: str):
    import transformers

    cfg = getattr(transformers, config_name)(
        vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, hidden_act=act, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).float()


def _loss_and_grads(model, ids, lean: bool, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    with lean_mlps(model, lean) as switched, torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return switched, loss.detach(), grads


@pytest.mark.parametrize("config_name,act", GATED)
def test_lean_mlp_gives_the_stock_loss_and_gradients_bitwise(config_name, act):
    model = _tiny(config_name, act)
    ids = torch.randint(0, 96, (2, 17))
    n0, ref_loss, ref = _loss_and_grads(model, ids, False)
    n1, loss, got = _loss_and_grads(model, ids, True)
    assert (n0, n1) == (0, 2)
    assert torch.equal(loss, ref_loss)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), config_name
    assert not any("forward" in vars(m) for m in model.modules())  # the switch is undone on exit


def test_lean_mlp_under_bf16_autocast_and_with_lora_adapters():
    import peft

    base = _tiny("LlamaConfig", "silu")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      init_lora_weights=False, lora_dropout=0.0))
    ids = torch.randint(0, 96, (2, 17))
    for autocast in (False, True):
        _, ref_loss, ref = _loss_and_grads(model, ids, False, autocast)
        n, loss, got = _loss_and_grads(model, ids, True, autocast)
        assert n == 2 and torch.equal(loss, ref_loss)
        assert ref and all("lora_" in k for k in ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def _forward_heap_bytes(model, ids, lean: bool) -> int:
    """Heap bytes the forward leaves allocated (what autograd keeps for backward), by glibc's statistics."""
    with lean_mlps(model, lean):
        start = heap_in_use_bytes()
        loss = model(input_ids=ids).logits.float().pow(2).mean()
        kept = heap_in_use_bytes() - start
        loss.backward()  # through the rebuilt products too
    return kept


@pytest.mark.parametrize("onednn", [False, True], ids=["torch-linear", "onednn-linear"])
@pytest.mark.parametrize("adapter", ["full", "lora", "lora-dropout"])
def test_lean_mlp_keeps_two_intermediate_tensors_less_per_block(adapter, onednn):
    """act(gate) is recomputed, and the product down_proj saves (its weight's or LoRA A's input) is rebuilt."""
    import peft

    from tunelab import cpu_kernels
    from tunelab.methods import lora_dropout

    if heap_in_use_bytes() is None:
        pytest.skip("needs glibc's mallinfo2")
    model = _tiny("LlamaConfig", "silu")
    model.model.embed_tokens.weight.requires_grad_(False)  # only what the blocks keep
    if adapter != "full":
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                              lora_dropout=0.1 if adapter == "lora-dropout" else 0.0)
        lora_dropout.register(cfg)  # tunelab's LoRA layers (1-bit dropout mask)
        model = peft.get_peft_model(model, cfg)
    ids = torch.randint(0, 96, (4, 512))
    one_intermediate = 4 * 512 * 80 * 4  # [batch, tokens, intermediate] fp32
    with cpu_kernels.onednn_linears(model, onednn):
        _forward_heap_bytes(model, ids, False)  # first-call allocations (kernel caches, buffers) out of the way
        stock, lean = _forward_heap_bytes(model, ids, False), _forward_heap_bytes(model, ids, True)
    saved = (stock - lean) / (2 * 2 * one_intermediate)  # 2 blocks x (act(gate), the product)
    assert 0.9 < saved < 1.1, (stock, lean, one_intermediate)


def test_only_mlps_that_compute_the_gated_expression_are_switched():
    import transformers

    class ScaledMLP(nn.Module):  # same parts, another computation: keeps its own forward
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 2)

    class LearnedActMLP(ScaledMLP):  # a parametrized activation cannot be recomputed as a plain function
        forward = transformers.models.llama.modeling_llama.LlamaMLP.forward

        def __init__(self):
            super().__init__()
            self.act_fn = nn.PReLU()

    phi3 = transformers.AutoModelForCausalLM.from_config(transformers.Phi3Config(
        vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0))
    assert not is_gated_mlp(ScaledMLP()) and not is_gated_mlp(LearnedActMLP())
    assert not any(is_gated_mlp(m) for m in phi3.modules())  # gate_up_proj fused: another expression
    assert is_gated_mlp(_tiny("LlamaConfig", "silu").model.layers[0].mlp)
    with lean_mlps(phi3) as n:
        assert n == 0


def _train(tiny_model_dir, out, method: str, lean: bool) -> tuple[dict, list]:
    from tunelab.config import load_config
    from tunelab.train import train

    extra = {"lora": ["method.dropout=0.1"], "full": [], "rosa": ["method.rank=4", "method.density=0.02"]}[method]
    res = train(load_config(overrides=[
        f"model={tiny_model_dir}", "task=gsm8k", "data.limit=8", "data.max_length=96", "train.batch_size=4",
        f"method={method}", *extra, "train.max_steps=3", "train.lr=1e-3", "train.report_to=[]",
        "train.progress_bar=false", f"train.lean_mlp={str(lean).lower()}", "model.gradient_checkpointing=true"
        if method == "full" else "model.gradient_checkpointing=false", f"out={out}"]))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return res, losses


@pytest.mark.parametrize("method", ["lora", "full", "rosa"])
def test_training_with_lean_mlps_is_bitwise_the_stock_run(tiny_model_dir, tmp_path, method):
    """Through the Trainer (oneDNN linears, dropout, gradient checkpointing for full): results.json says
    how many MLPs were switched, and every logged loss is the stock run's exactly."""
    on, losses_on = _train(tiny_model_dir, tmp_path / "on", method, True)
    off, losses_off = _train(tiny_model_dir, tmp_path / "off", method, False)
    assert (on["lean_mlp_layers"], off["lean_mlp_layers"]) == (2, 0)
    assert len(losses_on) == 3 and losses_on == losses_off

"""The chunked target loss (tunelab.loss): equal to the unchunked one in value and gradients, never holding
a [targets x vocabulary] tensor, and falling back to the logits where the head is not a plain Linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tunelab.loss import TargetPositionSelector, chunked_cross_entropy, target_loss, why_not_chunked

CHUNK = 7  # target tokens per chunk in these tests: several chunks, the last one short


def _batch(vocab: int, seed: int = 0, rows: int = 3, length: int = 24) -> dict[str, torch.Tensor]:
    """Right-padded rows whose first tokens are prompt (-100) and the rest targets: ~40 targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    attn = torch.ones_like(ids)
    labels = ids.clone()
    for r, (prompt, pad) in enumerate([(5, 0), (9, 6), (3, 2)][:rows]):
        labels[r, :prompt] = -100
        if pad:
            labels[r, -pad:], attn[r, -pad:] = -100, 0
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def _loss_and_grads(model, batch, reduction, chunk_tokens, autocast=False):
    selector = TargetPositionSelector(model)
    model.zero_grad(set_to_none=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = target_loss(model, selector, batch, reduction=reduction, chunk_tokens=chunk_tokens)
    finally:
        selector.remove()
    weights = torch.linspace(0.5, 1.5, loss.numel()) if reduction == "none" else torch.ones(())
    (loss.float() * weights).sum().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float(), grads, selector.last_path


def _untied_model(vocab: int = 320):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-autocast"])
def test_chunked_cross_entropy_equals_cross_entropy_with_gradients(precision):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    h = torch.randn(37, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(50, 16, dtype=dtype, requires_grad=True)
    b = torch.randn(50, dtype=dtype, requires_grad=True)
    t, upstream = torch.randint(0, 50, (37,)), torch.rand(37)
    results = []
    for chunked in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            losses = chunked_cross_entropy(h, w, b, t, 5) if chunked else \
                F.cross_entropy(F.linear(h, w, b).float(), t, reduction="none")
        assert losses.dtype == torch.float32
        results.append((losses, torch.autograd.grad((losses * upstream).sum(), (h, w, b))))
    (ref, ref_grads), (got, got_grads) = results
    tol = 1e-6 if precision == "fp32" else 1e-2
    assert _rel(got, ref) < tol
    for g_ref, g_got in zip(ref_grads, got_grads):
        assert g_got.dtype == g_ref.dtype and _rel(g_got.float(), g_ref.float()) < tol


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-autocast"])
@pytest.mark.parametrize("head", ["tied", "untied"])
def test_target_loss_chunked_equals_unchunked(tiny_model, head, precision, reduction):
    """Loss and the gradient of every parameter (full fine-tuning: embeddings, blocks, head) agree."""
    model = tiny_model if head == "tied" else _untied_model()
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == (head == "tied")
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    batch = _batch(model.config.vocab_size)
    autocast = precision == "bf16-autocast"
    ref_loss, ref_grads, ref_path = _loss_and_grads(model, batch, reduction, 0, autocast)
    loss, grads, path = _loss_and_grads(model, batch, reduction, CHUNK, autocast)
    assert (ref_path, path) == ("logits", "chunked")
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    assert n_targets > 4 * CHUNK and loss.shape == ((n_targets,) if reduction == "none" else ())
    tol = 1e-5 if precision == "fp32" else 1e-2
    assert _rel(loss, ref_loss) < tol
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert _rel(grads[name], ref_grads[name]) < tol, name


def test_lora_adapter_gradients_equal_and_lora_on_the_head_falls_back(tiny_model_dir):
    """LoRA on the blocks: chunked, same adapter gradients. LoRA on lm_head: the logits path, same loss."""
    import peft
    from transformers import AutoModelForCausalLM

    for targets, want in ((["q_proj", "v_proj"], "chunked"), (["q_proj", "lm_head"], "logits")):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                                          init_lora_weights=False))
        batch = _batch(model.config.vocab_size, seed=2)
        ref_loss, ref_grads, _ = _loss_and_grads(model, batch, "sum", 0)
        loss, grads, path = _loss_and_grads(model, batch, "sum", CHUNK)
        assert path == want
        assert any("lora_" in n for n in grads) and all("lora_" in n for n in grads)
        assert _rel(loss, ref_loss) < 1e-5
        for name in ref_grads:
            assert _rel(grads[name], ref_grads[name]) < 1e-5, name


class _VocabTensors(TorchDispatchMode):
    """Largest tensor with a vocabulary-wide last dimension that any op (forward or backward) produces,
    the head's weight [vocab, hidden] (its transpose, its gradient) left out."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.vocab, self.hidden, self.largest_rows = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab \
                    and t.numel() != self.vocab * self.hidden:
                self.largest_rows = max(self.largest_rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("chunk_tokens", [0, CHUNK])
def test_no_targets_by_vocab_tensor_in_forward_or_backward(tiny_model, chunk_tokens):
    """Chunked, no op makes a tensor of more than CHUNK vocabulary rows and backward keeps none; the
    unchunked path (0) makes and saves one of n_targets rows (so this test sees what it guards)."""
    vocab, hidden = tiny_model.config.vocab_size, tiny_model.config.hidden_size
    batch = _batch(vocab, length=96)
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    assert n_targets > hidden  # a [targets, vocab] tensor is not mistaken for the weight
    saved_vocab_rows = []

    def pack(t):
        if t.dim() >= 1 and t.shape[-1] == vocab and t.numel() != vocab * hidden:
            saved_vocab_rows.append(t.numel() // vocab)
        return t

    selector, mode = TargetPositionSelector(tiny_model), _VocabTensors(vocab, hidden)
    try:
        with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = target_loss(tiny_model, selector, batch, chunk_tokens=chunk_tokens)
            loss.backward()
    finally:
        selector.remove()
    if chunk_tokens:
        assert 0 < mode.largest_rows <= CHUNK < n_targets and not saved_vocab_rows
    else:
        assert mode.largest_rows >= n_targets and max(saved_vocab_rows) >= n_targets


def test_a_4bit_base_keeps_a_plain_head_and_chunks(tmp_path):
    """bitsandbytes quantizes the blocks, not lm_head: the chunked loss runs and equals the logits path."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _untied_model().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map={"": "cpu"}, dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.bfloat16))
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    batch = _batch(model.config.vocab_size)
    selector = TargetPositionSelector(model)
    with torch.no_grad():
        ref = target_loss(model, selector, batch, reduction="none", chunk_tokens=0)
        got = target_loss(model, selector, batch, reduction="none", chunk_tokens=CHUNK)
    assert selector.last_path == "chunked" and _rel(got, ref) < 1e-5


def test_heads_the_chunked_loss_cannot_run_in():
    bnb = pytest.importorskip("bitsandbytes")

    assert why_not_chunked(nn.Linear(8, 16)) is None
    assert "Linear4bit" in why_not_chunked(bnb.nn.Linear4bit(8, 16))
    zero3 = nn.Linear(8, 16)
    zero3.weight.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    assert "ZeRO-3" in why_not_chunked(zero3)
    watched = nn.Linear(8, 16)
    watched.register_forward_hook(lambda *a: None)
    assert "hooks" in why_not_chunked(watched)
    replaced = nn.Linear(8, 16)
    replaced.forward = lambda x: x  # what accelerate's add_hook_to_module does
    assert "forward" in why_not_chunked(replaced)


def test_a_softcapping_model_takes_the_logits_path():
    """Gemma 2 softcaps its logits after the head: the loss must be on the capped logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           final_logit_softcapping=3.0))
    batch = _batch(256)
    selector = TargetPositionSelector(model)
    with torch.no_grad():
        got = target_loss(model, selector, batch, chunk_tokens=CHUNK)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert "final_logit_softcapping" in selector.why_not_chunked() and selector.last_path == "logits"
    shifted = batch["labels"][:, 1:]
    want = F.cross_entropy(logits[:, :-1][shifted != -100].float(), shifted[shifted != -100], reduction="sum")
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_a_model_that_changes_its_logits_unannounced_is_refused_with_the_fix(tiny_model_dir):
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    model = Scaled.from_pretrained(tiny_model_dir, dtype=torch.float32)
    selector = TargetPositionSelector(model)
    with pytest.raises(RuntimeError, match="train.loss_chunk_tokens=0"):
        target_loss(model, selector, _batch(model.config.vocab_size), chunk_tokens=CHUNK)
    assert float(target_loss(model, selector, _batch(model.config.vocab_size), chunk_tokens=0)) > 0


def test_a_right_padded_batch_runs_sdpa_causal_and_unmasked_with_the_masked_forwards_losses(tiny_model, monkeypatch):
    """No mask for a right-padded batch under sdpa (causal path, key/value at their GQA heads): every
    target's loss and every gradient are the masked forward's; a left-padded batch keeps its mask."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask") is None, kwargs.get("is_causal"), kwargs.get("enable_gqa", False)))
        return sdpa(*args, **kwargs)

    batch = _batch(tiny_model.config.vocab_size)
    assert tiny_model.config._attn_implementation == "sdpa" and not batch["attention_mask"].all()
    tiny_model.zero_grad(set_to_none=True)
    out = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # HF's masked forward
    shifted = batch["labels"][:, 1:]
    reference = F.cross_entropy(out.logits[:, :-1][shifted != -100], shifted[shifted != -100], reduction="none")
    weights = torch.linspace(0.5, 1.5, reference.numel())
    (reference * weights).sum().backward()
    masked_grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    losses, grads, _ = _loss_and_grads(tiny_model, batch, "none", CHUNK)
    assert calls and all(c == (True, True, True) for c in calls), calls
    assert _rel(losses, reference.detach()) < 1e-6
    assert grads.keys() == masked_grads.keys() and all(_rel(grads[n], masked_grads[n]) < 1e-5 for n in grads)
    calls.clear()
    left = {k: v.flip(1) for k, v in batch.items()}  # padding first: the mask matters, and is kept
    _loss_and_grads(tiny_model, left, "sum", CHUNK)
    assert calls and not any(unmasked for unmasked, _, _ in calls)

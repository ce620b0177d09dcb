"""LoRA's dropout keeps a 1-bit mask, not a dropped-out input copy: PEFT's numbers and adapter format.

`tunelab.methods.lora_dropout.BitMaskDropoutLinear` is PEFT's ``lora.Linear`` whose training forward
computes ``dropout(x) @ A^T`` in one autograd function that saves ``x``, ``A`` and the mask as bits.
These tests pin what that promises: the same logits, gradients and RNG stream as PEFT's stock layers
(dropout 0 and dropout > 0, also under bf16 autocast and gradient checkpointing), a correct dropout
whose one mask serves forward and backward (both of torch's dropout code paths), the same for a 4-bit
(QLoRA) base and under FSDP2, the adapter plain PEFT loads, and (measured by the profiler's allocation
records, not timed) no dropped-out copy held for backward.
"""

from __future__ import annotations

import contextlib
import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tunelab.config import load_config
from tunelab.methods.lora import LoraMethod
from tunelab.methods import lora_dropout
from tunelab.methods.dropout import FastDropout, keep_mask, rounded_p
from tunelab.methods.lora_dropout import (
    MASK_KINDS, BitMaskDropoutLinear, PlainLinear, _DropoutDownProjection, apply_mask, bnb_layers, dropout_with_mask,
    pack_bits, unpack_bits, use_fast_dropout,
)

ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lora(tiny_model_dir, dropout: float, bit_mask: bool, monkeypatch, fast_dropout: bool = True, methods=None):
    """The tiny model with tunelab's LoRA (r 4), B initialised non-zero so A gets gradients too;
    ``fast_dropout=False`` keeps PEFT's own nn.Dropout modules; the method goes into ``methods``."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(LoraMethod, "bit_mask_dropout", bit_mask)
    monkeypatch.setattr(lora_dropout, "use_fast_dropout", use_fast_dropout if fast_dropout else (lambda model: 0))
    cfg = load_config(overrides=[f"model={tiny_model_dir}", "method=lora", "method.rank=4",
                                 f"method.dropout={dropout}"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)  # lora_A's init
    method = LoraMethod(cfg.method)
    model = method.prepare(base, cfg)
    if methods is not None:
        methods.append(method)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.train()


def _step(model, seed: int = 3, context=contextlib.nullcontext):
    """Logits, gradients and the RNG state after one forward + backward from a fixed RNG state."""
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(11))
    torch.manual_seed(seed)
    with context():
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads, torch.get_rng_state()


def _assert_same_step(a, b):
    assert torch.equal(a[0], b[0]), "logits differ"
    assert a[1].keys() == b[1].keys() and len(a[1]) > 0
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k
    assert torch.equal(a[2], b[2]), "the RNG stream advanced differently"


def test_training_layers_are_pefts_lora_linear_with_a_bit_mask_dropout(tiny_model_dir, monkeypatch):
    model = _lora(tiny_model_dir, 0.1, True, monkeypatch)
    layers = {n: m for n, m in model.named_modules() if n.endswith(ADAPTED)}
    assert len(layers) == 2 * len(ADAPTED)
    assert all(type(m) is BitMaskDropoutLinear for m in layers.values())
    assert all(isinstance(m, peft.tuners.lora.Linear) for m in layers.values())  # PEFT's merge, state names
    assert all(type(m.lora_dropout["default"]) is FastDropout for m in layers.values())
    stock = _lora(tiny_model_dir, 0.1, False, monkeypatch)
    assert all(type(m) is peft.tuners.lora.Linear for n, m in stock.named_modules() if n.endswith(ADAPTED))
    assert model.state_dict().keys() == stock.state_dict().keys()


@pytest.mark.parametrize("fast_dropout", [True, False], ids=["fast-dropout", "nn-dropout"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_logits_gradients_and_rng_equal_pefts(tiny_model_dir, monkeypatch, dropout, fast_dropout):
    """Bit for bit: with dropout 0, and with dropout 0.1 (the same mask as PEFT's layer with the same
    dropout module draws: tunelab's FastDropout, or PEFT's own nn.Dropout)."""
    ours = _step(_lora(tiny_model_dir, dropout, True, monkeypatch, fast_dropout))
    stock = _step(_lora(tiny_model_dir, dropout, False, monkeypatch, fast_dropout))
    _assert_same_step(ours, stock)
    if dropout:  # the dropout is really applied: another RNG state gives other logits
        assert not torch.equal(ours[0], _step(_lora(tiny_model_dir, dropout, True, monkeypatch), seed=4)[0])


def test_equal_to_peft_under_bf16_autocast_and_gradient_checkpointing(tiny_model_dir, monkeypatch):
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    _assert_same_step(_step(_lora(tiny_model_dir, 0.1, True, monkeypatch), context=autocast),
                      _step(_lora(tiny_model_dir, 0.1, False, monkeypatch), context=autocast))
    models = []
    for bit_mask in (True, False):
        m = _lora(tiny_model_dir, 0.1, bit_mask, monkeypatch)
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
        models.append(m)
    _assert_same_step(_step(models[0]), _step(models[1]))


@pytest.mark.parametrize("onednn", [False, True], ids=["torch-linears", "onednn-linears"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_update_is_added_into_the_base_layers_output(tiny_model_dir, monkeypatch, dropout, onednn):
    """In training the scaled update goes into the base layer's output in place (no output-sized
    temporaries: oneDNN's 3D products, views of its 2D result, included), bit for bit PEFT's sum."""
    from tunelab.cpu_kernels import available, onednn_linears

    if onednn and not available():
        pytest.skip("this torch has no oneDNN")
    runs = []
    for bit_mask in (True, False):
        model = _lora(tiny_model_dir, dropout, bit_mask, monkeypatch)
        layer = next(m for n, m in model.named_modules() if n.endswith("q_proj"))
        storage = {}

        def record(key):
            def hook(module, args, out):
                storage.setdefault(key, out.untyped_storage().data_ptr())  # the first forward's
            return hook

        hooks = [m.register_forward_hook(record(key)) for key, m in (("base", layer.base_layer), ("layer", layer))]
        with onednn_linears(model, onednn) as switched:
            assert (switched > 0) == onednn
            runs.append(_step(model))
        for h in hooks:
            h.remove()
        assert (storage["base"] == storage["layer"]) == bit_mask, "the sum is in place only in tunelab's layer"
    _assert_same_step(*runs)


def test_the_dropout_temporaries_reuse_one_scratch_freed_when_training_ends(tiny_model_dir, monkeypatch):
    """Every adapted layer's dropout writes its temporaries into the model's one DropoutScratch (the
    same memory step after step, the same bits as fresh tensors); LoRA's on_train_end frees it."""
    from tunelab.methods.base import TrainState
    from tunelab.methods.lora_dropout import DropoutScratch

    x = torch.randn(3, 7, 16, requires_grad=True)
    weight = torch.randn(4, 16, requires_grad=True)
    scratch = DropoutScratch()
    results = []
    for use in (scratch, None, scratch):
        torch.manual_seed(2)
        h = _DropoutDownProjection.apply(x, weight, 0.3, torch.float32, "uniform15", use)
        h.backward(torch.ones_like(h))
        results.append((h.detach(), x.grad.clone(), weight.grad.clone()))
        x.grad = weight.grad = None
        if use is not None:
            results[-1] += ({k: b.data_ptr() for k, b in scratch._buffers.items()},)
    assert all(torch.equal(a, b) for a, b in zip(results[0][:3], results[1]))
    assert all(torch.equal(a, b) for a, b in zip(results[0][:3], results[2][:3]))
    assert results[0][3] == results[2][3] and len(results[0][3]) == 4  # words, mask, dropped, gathered
    assert DropoutScratch().take_for(torch.device("cpu")) is not None

    methods = []
    model = _lora(tiny_model_dir, 0.1, True, monkeypatch, methods=methods)
    (method,) = methods
    shared = {id(m.dropout_scratch) for m in model.modules() if hasattr(m, "dropout_scratch")}
    assert shared == {id(method._scratch)} and method._scratch.nbytes == 0
    _step(model)
    assert method._scratch.nbytes > 0
    for cb in method.callbacks():
        cb.on_train_end(TrainState(), model)
    assert method._scratch.nbytes == 0


def test_eval_and_no_grad_apply_no_dropout(tiny_model_dir, monkeypatch):
    ours, stock = _lora(tiny_model_dir, 0.3, True, monkeypatch), _lora(tiny_model_dir, 0.3, False, monkeypatch)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.manual_seed(0)
        train_nograd = ours(input_ids=ids).logits  # train mode without autograd: PEFT's own forward
        torch.manual_seed(0)
        assert torch.equal(train_nograd, stock(input_ids=ids).logits)
        ours.eval(), stock.eval()
        evaluated = ours(input_ids=ids).logits
        assert torch.equal(evaluated, stock(input_ids=ids).logits)
        assert torch.equal(evaluated, ours(input_ids=ids).logits)  # no mask in eval


def _one_layer(p: float, n_in: int = 64, r: int = 8) -> BitMaskDropoutLinear:
    """A single adapted Linear(n_in -> r), base weight 0, A = 1, B = I, scaling 1: the output is the
    base's bias + dropout(x) summed over features, once per output."""
    cfg = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=p, target_modules=["proj"])
    layer = BitMaskDropoutLinear(nn.Linear(n_in, r), "default", config=cfg, r=r, lora_alpha=r)
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.lora_A["default"].weight.fill_(1.0)
        layer.lora_B["default"].weight.copy_(torch.eye(r))
    return layer.train()


@pytest.mark.parametrize("fast", [False, True], ids=["nn-dropout", "fast-dropout"])
def test_dropout_is_unbiased_and_backward_reuses_the_forward_mask(fast):
    p, tokens = 0.3, 4096
    layer = _one_layer(p)
    if fast:
        layer.lora_dropout["default"] = FastDropout(p)
    p_real = rounded_p(p) if fast else p
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    torch.manual_seed(123)
    out = layer(x)
    torch.rand(10_000)  # backward must not depend on the global RNG's state at backward time
    out.sum().backward()
    # d(sum(out))/dx = mask / (1 - p) * (the r rows of A summed) = mask / (1 - p) * r
    scaled_mask = x.grad / 8
    kept = scaled_mask != 0
    assert torch.allclose(scaled_mask[kept], torch.full_like(scaled_mask[kept], 1 / (1 - p_real)))
    frac_dropped = 1 - kept.float().mean().item()
    sigma = (p * (1 - p) / kept.numel()) ** 0.5
    assert abs(frac_dropped - p) < 5 * sigma  # E[mask / (1 - p)] = 1: an unbiased dropout
    # the forward used that same mask: out - base(x) == (x * mask / (1 - p)) @ A^T
    with torch.no_grad():
        expected = (x * scaled_mask).sum(1, keepdim=True).expand(-1, 8)
        torch.testing.assert_close(out - layer.base_layer(x), expected, rtol=1e-5, atol=1e-5)
    # and it is the mask the layer's dropout module draws from the same RNG state
    torch.manual_seed(123)
    assert torch.equal(layer.lora_dropout["default"](torch.ones_like(x)), scaled_mask)


def test_fast_dropout_masks_are_independent_bernoulli_draws():
    """FastDropout on CPU: each of the four 15-bit quarters of a random word keeps with 1 - p (5 sigma),
    p is realised to 1/32768, draws follow the seed, two calls differ, and eval / p=0 are identities."""
    p, n = 0.05, 1 << 22
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([n]), p, torch.device("cpu"))
    sigma = (p * (1 - p) / (n // 4)) ** 0.5
    for quarter in mask.view(-1, 4).float().mean(0):
        assert abs((1 - quarter.item()) - p) < 5 * sigma
    pairs = mask.view(-1, 2).float()  # neighbours are independent: P(both dropped) = p^2
    both = ((1 - pairs[:, 0]) * (1 - pairs[:, 1])).mean().item()
    assert abs(both - p * p) < 5 * (p * p / (n // 2)) ** 0.5
    assert abs(rounded_p(p) - p) <= 1 / (1 << 16) and rounded_p(0.25) == 0.25
    torch.manual_seed(0)
    assert torch.equal(keep_mask(torch.Size([n]), p, torch.device("cpu")), mask)
    assert not torch.equal(keep_mask(torch.Size([n]), p, torch.device("cpu")), mask)
    x = torch.randn(64, 32)
    assert torch.equal(FastDropout(0.0).train()(x), x) and torch.equal(FastDropout(0.5).eval()(x), x)
    dropped = FastDropout(0.5).train()(x)
    assert torch.equal(dropped[dropped != 0], (x * 2)[dropped != 0])


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_gradients_equal_a_reference_with_the_same_mask(kind):
    """Every way a mask is drawn (CPU's noise tensor as F.dropout does; CUDA's fused native_dropout,
    run here on CPU; FastDropout's 15-bit uniforms): outputs and gradients of x and A equal plain
    autograd through x * mask / (1 - p) @ A^T."""
    p = 0.25 if kind != "uniform15" else 0.3  # 0.3 is not a multiple of 1/32768: p' is what is used
    p_real = rounded_p(p) if kind == "uniform15" else p
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50, 37, generator=gen).requires_grad_()  # 3-D like a batch; 5550 bits pad to 694 bytes
    a = torch.randn(6, 37, generator=gen).requires_grad_()
    g = torch.randn(3, 50, 6, generator=gen)
    torch.manual_seed(9)
    h = _DropoutDownProjection.apply(x, a, p, torch.float32, kind)
    torch.rand(100)
    (h * g).sum().backward()
    torch.manual_seed(9)
    _, mask = dropout_with_mask(x.detach(), p, kind)
    x_ref, a_ref = x.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    h_ref = (x_ref * mask / (1 - p_real)) @ a_ref.t()
    (h_ref * g).sum().backward()
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.grad, a_ref.grad, rtol=1e-5, atol=1e-5)
    # the forward's dropped values are the dropout's own, and re-applying the saved mask to x in
    # backward gives exactly those values
    torch.manual_seed(9)
    dropped, mask = dropout_with_mask(x.detach(), p, kind)
    torch.manual_seed(9)
    if kind == "fused":
        reference = torch.native_dropout(x.detach(), p, True)[0]
    elif kind == "bernoulli":
        reference = nn.functional.dropout(x.detach(), p, True)
    else:
        reference = FastDropout(p).train()(x.detach())
    assert torch.equal(dropped, reference)
    assert torch.equal(apply_mask(x.detach(), mask, p, kind), dropped)


@pytest.mark.parametrize("shape", [(8,), (3, 5), (2, 7, 9), (1,), (0, 4)])
def test_bit_packing_round_trips(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(bits, mask.shape), mask)


def _held_after_forward(model) -> int:
    """Bytes allocated and not freed during one training forward (what backward will read), measured
    by the profiler's allocation records: deterministic, no timing."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, 1000, (4, 96), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = model(input_ids=ids, labels=ids).loss
    held = sum(e.self_cpu_memory_usage for e in prof.key_averages())
    loss.backward()
    return held


def test_no_dropped_out_input_copy_is_held_for_backward(tiny_model_dir, monkeypatch):
    stock = _lora(tiny_model_dir, 0.1, False, monkeypatch, fast_dropout=False)  # PEFT as it ships
    inputs = []  # numel of every adapted layer's input: PEFT keeps a float copy of each + its mask (>= 1 byte)
    hooks = [m.register_forward_hook(lambda m, a, o: inputs.append(a[0].numel()))
             for n, m in stock.named_modules() if n.endswith(ADAPTED)]
    stock_held = _held_after_forward(stock)
    for h in hooks:
        h.remove()
    copies = sum(inputs) * (4 + 1)
    ours = _lora(tiny_model_dir, 0.1, True, monkeypatch)
    ours_held = _held_after_forward(ours)
    floor = _held_after_forward(_lora(tiny_model_dir, 0.0, False, monkeypatch, fast_dropout=False))  # no dropout
    assert stock_held - floor >= 0.95 * copies  # what PEFT pays for its dropout
    # the dropout's temporaries reuse one scratch memory, sized by the largest layer alone: random
    # words 2 bytes, mask 1, dropped copy 4 and bit-gathering product 1 per element of its input
    (scratch,) = {id(m.dropout_scratch): m.dropout_scratch
                  for m in ours.modules() if hasattr(m, "dropout_scratch")}.values()
    assert 0 < scratch.nbytes <= 8 * max(inputs)
    bits = sum(-(-n // 8) for n in inputs)  # ours: the packed masks, one bit per element
    assert ours_held - scratch.nbytes - floor <= bits, (ours_held - floor, scratch.nbytes, bits, copies)


def test_dispatch_keys_match_only_their_exact_layer_types():
    import bitsandbytes as bnb

    (key_4bit,) = bnb_layers()
    assert isinstance(nn.Linear(4, 4), PlainLinear) and not isinstance(nn.Linear(4, 4), key_4bit)
    assert isinstance(bnb.nn.Linear4bit(64, 64), key_4bit) and not isinstance(bnb.nn.Linear4bit(64, 64), PlainLinear)
    assert not isinstance(bnb.nn.Linear8bitLt(64, 64), PlainLinear)  # 8-bit keeps PEFT's own layer
    assert not isinstance(bnb.nn.Linear8bitLt(64, 64), key_4bit)
    assert not isinstance(nn.Embedding(4, 4), PlainLinear)


def _qlora(tiny_model_dir, bit_mask: bool, monkeypatch):
    """The tiny model with a 4-bit NF4 base (bitsandbytes on CPU) and LoRA r 4, dropout 0.1."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    monkeypatch.setattr(LoraMethod, "bit_mask_dropout", bit_mask)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant, device_map={"": "cpu"})
    cfg = load_config(overrides=["method=lora", "method.rank=4", "method.dropout=0.1"])
    torch.manual_seed(0)
    model = peft.get_peft_model(base, LoraMethod(cfg.method).peft_config())
    use_fast_dropout(model)  # as LoraMethod.prepare does
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.train()


def test_qlora_layers_use_the_bit_mask_and_equal_pefts(tiny_model_dir, monkeypatch):
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    ours, stock = _qlora(tiny_model_dir, True, monkeypatch), _qlora(tiny_model_dir, False, monkeypatch)
    layers = [m for n, m in ours.named_modules() if n.endswith(ADAPTED)]
    assert len(layers) == 2 * len(ADAPTED)
    assert all(type(m) is next(iter(bnb_layers().values())) and isinstance(m, PeftLinear4bit) for m in layers)
    assert all(type(m) is PeftLinear4bit for n, m in stock.named_modules() if n.endswith(ADAPTED))
    _assert_same_step(_step(ours), _step(stock))


def test_trained_adapter_is_pefts_format_and_equals_a_stock_peft_run(tiny_model_dir, tmp_path, monkeypatch):
    """Through tunelab's trainer with dropout 0.1: the same adapter bytes as with PEFT's stock layers,
    the same adapter_config.json, and plain PeftModel.from_pretrained loads it."""
    from transformers import AutoModelForCausalLM

    from tunelab.train import train

    def run(out, bit_mask):
        monkeypatch.setattr(LoraMethod, "bit_mask_dropout", bit_mask)
        train(load_config(overrides=[
            f"model={tiny_model_dir}", "task=gsm8k", "data.limit=8", "data.max_length=96", "train.batch_size=4",
            "method=lora", "method.rank=4", "method.dropout=0.1", "train.max_steps=2", "train.lr=1e-2",
            "train.report_to=[]", "train.progress_bar=false", f"out={out}"]))
        return out / "adapter"

    ours, stock = run(tmp_path / "ours", True), run(tmp_path / "stock", False)
    a, b = load_file(str(ours / "adapter_model.safetensors")), load_file(str(stock / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    cfg = json.loads((ours / "adapter_config.json").read_text())
    assert cfg == json.loads((stock / "adapter_config.json").read_text())
    assert not any("custom" in k for k in cfg)
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(ours))
    assert all(type(m) is peft.tuners.lora.Linear for n, m in loaded.named_modules() if n.endswith(ADAPTED))


LAYER_HOOK = '''
import os
from tunelab.methods.lora import LoraMethod

LoraMethod.bit_mask_dropout = os.environ["TEST_BIT_MASK_DROPOUT"] == "1"
_prepare = LoraMethod.prepare


def _logged_prepare(self, model, run_cfg):
    model = _prepare(self, model, run_cfg)
    names = sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith("q_proj")})
    with open(os.path.join(os.environ["TEST_LAYER_LOG"], f"{os.getpid()}.txt"), "w") as fh:
        fh.write(",".join(names))
    return model


LoraMethod.prepare = _logged_prepare
'''


def test_fsdp_two_ranks_with_dropout_train_the_adapter_pefts_layers_train(tiny_model_dir, tmp_path, monkeypatch):
    """FSDP2 (2 gloo ranks, parameters sharded per decoder layer and unsharded around each block's
    forward and backward), dropout 0.1: the bit-mask layers give PEFT's stock layers' adapter."""
    import os
    import signal
    import subprocess
    import sys

    for k, v in {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1",
                 "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(k, v)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(LAYER_HOOK)

    def run(name: str, bit_mask: bool):
        out, layers = tmp_path / name, tmp_path / f"{name}-layers"
        layers.mkdir()
        env = dict(os.environ, TEST_BIT_MASK_DROPOUT="1" if bit_mask else "0", TEST_LAYER_LOG=str(layers),
                   PYTHONPATH=os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p))
        cmd = [sys.executable, "-m", "tunelab", "train", "--nproc", "2", f"model={tiny_model_dir}", "task=gsm8k",
               "method=lora", "method.rank=4", "method.dropout=0.1", "data.limit=16", "data.max_length=96",
               "train.batch_size=2", "train.max_steps=3", "train.lr=1e-2", "model.device=cpu",
               "train.parallelism=fsdp", "train.report_to=[]", "train.progress_bar=false", f"out={out}"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 0, log[-3000:]
        return load_file(str(out / "adapter" / "adapter_model.safetensors")), {
            f.read_text() for f in layers.iterdir()}

    ours, ours_layers = run("ours", True)
    stock, stock_layers = run("stock", False)
    assert ours_layers == {"BitMaskDropoutLinear"} and stock_layers == {"Linear"}  # each rank, each run
    assert ours.keys() == stock.keys() and all(torch.equal(ours[k], stock[k]) for k in ours)
    assert any(float(v.abs().max()) > 1e-3 for k, v in ours.items() if "lora_B" in k)  # it trained

"""oneDNN kernels for CPU training (train.onednn_linear): the same numbers as torch's own path to float
tolerance, the same tensors saved for backward, and the layers given back untouched afterwards."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from tunelab import cpu_kernels
from tunelab.cpu_kernels import OneDnnLinear, onednn_linears, packed_linears

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="this torch build has no oneDNN linear ops")


def _grads(layer: nn.Linear, x: torch.Tensor, g: torch.Tensor):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = layer(x)
    (y * g).sum().backward()
    params = [p.grad for p in (layer.weight, layer.bias) if p.requires_grad]
    return y.detach(), x.grad, params


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
@pytest.mark.parametrize("shape", [(300, 96), (2, 150, 96)], ids=["2d", "3d"])
def test_onednn_linear_equals_torch_linear_with_gradients(frozen, shape):
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(96, 160)
    layer.weight.requires_grad_(not frozen)
    layer.bias.requires_grad_(not frozen)
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    g = torch.randn(*shape[:-1], 160, generator=gen)
    want = _grads(layer, x, g)
    with onednn_linears(layer) as n:
        assert n == 1 and cpu_kernels.active()
        got = _grads(layer, x, g)
        assert layer(x).grad_fn.name() == "OneDnnLinearBackward"
    assert "forward" not in vars(layer) and not cpu_kernels.active()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert len(got[2]) == len(want[2]) == (0 if frozen else 2)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_saves_what_torch_linear_saves(frozen):
    """A frozen layer keeps no activation for backward (only the weight, alive anyway), as F.linear."""
    layer = nn.Linear(64, 128)
    layer.weight.requires_grad_(not frozen)
    x = torch.randn(40, 64, requires_grad=True)

    def saved_bytes(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.data_ptr()) or t, lambda t: t):
            fn()
        return {p for p in sizes if p != layer.weight.data_ptr()}

    torch_saves = saved_bytes(lambda: nn.functional.linear(x, layer.weight, layer.bias))
    ours = saved_bytes(lambda: OneDnnLinear.apply(x, layer.weight, layer.bias))
    assert ours == torch_saves == (set() if frozen else {x.data_ptr()})


def test_only_plain_fp32_linears_switch_and_all_are_given_back():
    """Subclasses, bf16 layers, the skipped head and layers whose forward someone replaced stay as they
    are; every layer is restored even when the block raises."""

    class MyLinear(nn.Linear):
        pass

    hooked = nn.Linear(8, 8)
    hooked.forward = lambda x: x  # an accelerate-style hook on the instance
    head = nn.Linear(8, 8)
    model = nn.Sequential(nn.Linear(8, 8), MyLinear(8, 8), nn.Linear(8, 8).to(torch.bfloat16), hooked, head)
    with pytest.raises(RuntimeError, match="boom"):
        with onednn_linears(model, skip=(head,)) as n:
            assert n == 1 and "forward" in vars(model[0])
            assert all("forward" not in vars(m) for m in (model[1], model[2], head))
            raise RuntimeError("boom")
    assert "forward" not in vars(model[0]) and vars(hooked)["forward"] is not None
    with onednn_linears(model, enabled=False) as n:
        assert n == 0 and not cpu_kernels.active()


def test_autocast_and_bf16_inputs_take_torchs_path():
    layer = nn.Linear(16, 16)
    with onednn_linears(layer):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(torch.randn(4, 16)).dtype == torch.bfloat16
        assert layer(torch.randn(4, 16)).dtype == torch.float32


def test_generation_inside_training_packs_and_then_restores_the_training_kernels():
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16))
    x = torch.randn(5, 16)
    with onednn_linears(model):
        training = [vars(m)["forward"] for m in model]
        with torch.no_grad(), packed_linears(model) as packed:
            assert packed == 2 and all(vars(m)["forward"] is not f for m, f in zip(model, training))
            torch.testing.assert_close(model(x), nn.functional.linear(
                nn.functional.linear(x, model[0].weight, model[0].bias), model[1].weight, model[1].bias))
        assert [vars(m)["forward"] for m in model] == training
    assert all("forward" not in vars(m) for m in model)


def test_the_chunked_loss_follows_the_switch(monkeypatch):
    """The hand-written chunked loss computes its products on oneDNN inside the block only, with the
    same losses and gradients."""
    from tunelab.loss import chunked_cross_entropy

    calls = []
    onednn = cpu_kernels.ONEDNN
    counted = {name: (lambda *a, _k=getattr(onednn, name), _n=name: calls.append(_n) or _k(*a))
               for name in ("linear", "input_grad", "weight_grad")}
    monkeypatch.setattr(cpu_kernels, "ONEDNN", dataclasses.replace(onednn, **counted))

    gen = torch.Generator().manual_seed(3)
    h = torch.randn(50, 64, generator=gen, requires_grad=True)
    w = torch.randn(300, 64, generator=gen, requires_grad=True)
    t = torch.randint(0, 300, (50,), generator=gen)

    def run():
        h.grad = w.grad = None
        loss = chunked_cross_entropy(h, w, None, t, 16)
        loss.sum().backward()
        return loss.detach(), h.grad.clone(), w.grad.clone()

    want = run()
    assert calls == []
    with onednn_linears(nn.Linear(2, 2)):
        got = run()
    assert calls.count("linear") == 2 * 4 and calls.count("input_grad") == 4  # 4 chunks: forward, recompute
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _train(tiny_model_dir, out, method: str, onednn: bool) -> dict:
    from tunelab.config import load_config
    from tunelab.train import train

    extra = {"lora": ["method.dropout=0.1"], "rosa": ["method.rank=4", "method.schedule=wl1", "method.density=0.02"],
             "full": [], "galore": ["method.rank=8", "method.update_proj_gap=2"]}[method]
    return train(load_config(overrides=[
        f"model={tiny_model_dir}", "task=gsm8k", "data.limit=8", "data.max_length=96", "train.batch_size=4",
        f"method={method}", *extra, "train.max_steps=3", "train.lr=1e-3", "train.report_to=[]",
        "train.progress_bar=false", f"train.onednn_linear={str(onednn).lower()}", f"out={out}"]))


@pytest.mark.parametrize("method", ["lora", "full", "rosa", "galore"])
def test_training_with_and_without_onednn_gives_the_same_run(tiny_model_dir, tmp_path, method):
    """Every method trains through the kernels (results.json says how many layers) to the same losses
    as torch's own matmuls, within float rounding."""
    on = _train(tiny_model_dir, tmp_path / "on", method, True)
    off = _train(tiny_model_dir, tmp_path / "off", method, False)
    assert on["onednn_linear_layers"] > 0 and off["onednn_linear_layers"] == 0
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for d in ("on", "off")]
    assert len(losses[0]) == 3
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-4, atol=1e-5)


_CACHE_GROWTH = """
import torch
from torch import nn
from tunelab import cpu_kernels
from tunelab.utils import heap_in_use_bytes as heap
model = nn.Sequential(nn.Linear(256, 1024), nn.Linear(1024, 256))
with cpu_kernels.onednn_linears(model):
    for i, rows in enumerate(range(100, 280, 3)):  # a new row count every step, as length-grouped batches are
        model(torch.randn(rows, 256, requires_grad=True)).sum().backward()
        if i == 9:
            start = heap()
print(heap() - start)
"""


def test_onednn_caches_stay_bounded_when_every_step_has_a_new_shape():
    """oneDNN's primitive cache and ideep's keep 1,024 shapes' worth (~0.4 MB each) by default, which training
    meets as heap growing at every new batch length; tunelab caps both (glibc's allocator statistics)."""
    import os
    import subprocess
    import sys

    from tunelab.utils import heap_in_use_bytes

    if heap_in_use_bytes() is None:
        pytest.skip("needs glibc's mallinfo2")

    def growth_mib(**env) -> float:
        clean = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
        out = subprocess.run([sys.executable, "-c", _CACHE_GROWTH], env={**clean, **env},
                             capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1]) / 2**20

    capped, libraries_default = growth_mib(), growth_mib(ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024", LRU_CACHE_CAPACITY="1024")
    assert libraries_default > 50 and capped < 8, (capped, libraries_default)

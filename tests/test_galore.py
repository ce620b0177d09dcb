"""GaLore: optimizer equivalence with galore-torch, projections, accumulation, layer-wise, DDP, resume."""

from __future__ import annotations

import copy
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunelab.config import ConfigError, load_config
from tunelab.methods import get_method
from tunelab.methods.base import TrainState
from tunelab.methods.galore.optim import GaLoreAdamW
from tunelab.methods.galore.projection import projection_sides, top_singular_basis

LR = 1e-2  # large enough that every step visibly moves the weights


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def make_batches(n: int, batch: int = 4, seq: int = 12, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 2000, (batch, seq), generator=g) for _ in range(n)]


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def run_cfg(tiny_model_dir, *overrides: str):
    return load_config(overrides=[f"model={tiny_model_dir}", "method=galore", *overrides])


def galore_setup(model, cfg):
    method = get_method("galore")(cfg.method)
    model = method.prepare(model, cfg)
    opt = method.build_optimizer(model, cfg.train)
    cbs = method.callbacks()
    state = TrainState(max_steps=100, grad_accum=cfg.train.grad_accum)
    for cb in cbs:
        cb.on_train_begin(state, model, opt)
    return method, model, opt, cbs, state


def train_steps(model, opt, cbs, state, windows, max_grad_norm: float = 0.0) -> list[float]:
    """The trainer's loop: each window is the list of micro-batches of one optimizer step."""
    norms = []
    for micro in windows:
        for cb in cbs:
            cb.on_step_begin(state, model)
        for i, ids in enumerate(micro):
            state.micro_step = i
            (loss_of(model, ids) / len(micro)).backward()
        for cb in cbs:
            cb.on_before_optimizer_step(state, model, opt)
        if max_grad_norm > 0:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        for cb in cbs:
            cb.on_step_end(state, model, opt)
    return norms


def assert_same_weights(a, b, exact: bool = False, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        if exact:
            assert torch.equal(pa, pb), f"{na} differs"
        else:
            torch.testing.assert_close(pa, pb, atol=atol, rtol=rtol, msg=lambda m: f"{na}: {m}")


# ------------------------------------------------------------------------------------------------
# 1. update-for-update equivalence with the reference galore-torch
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_matches_galore_torch(tiny_model, tiny_model_dir, proj_type):
    galore_torch = pytest.importorskip(
        "galore_torch", reason="galore-torch is not installed (pip install galore-torch==1.0): no reference to compare"
    )
    cfg = run_cfg(tiny_model_dir, "method.svd=exact", "method.update_proj_gap=2", f"method.proj_type={proj_type}",
                  f"train.lr={LR}", "train.weight_decay=0.01", "train.adam_eps=1e-6")
    ref_model = copy.deepcopy(tiny_model)
    _, model, opt, _, _ = galore_setup(tiny_model, cfg)
    assert [len(g["params"]) for g in opt.param_groups] == [14, 6]  # 2 layers × 7 linears | embed (tied lm_head) + 5 norms
    # the reference, with the same two groups (projected linears / everything else)
    names = {id(p): n for n, p in model.named_parameters()}
    ref_params = dict(ref_model.named_parameters())
    groups = [
        {"params": [ref_params[names[id(p)]] for p in opt.param_groups[0]["params"]], "rank": 8,
         "update_proj_gap": 2, "scale": 0.25, "proj_type": proj_type},
        {"params": [ref_params[names[id(p)]] for p in opt.param_groups[1]["params"]]},
    ]
    ref = galore_torch.GaLoreAdamW(groups, lr=LR, weight_decay=0.01, eps=1e-6, no_deprecation_warning=True)
    for step, ids in enumerate(make_batches(5)):  # projections at steps 0, 2, 4
        loss_of(model, ids).backward()
        for p in model.parameters():  # identical gradients for both
            ref_params[names[id(p)]].grad = p.grad.clone()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        ref.step()
        opt.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            ours, theirs = opt.state[p], ref.state[ref_params[n]]
            # identical gradients and SVD inputs: moments and projections are bit-identical ...
            assert torch.equal(ours["exp_avg"], theirs["exp_avg"]), f"step {step} {n}: exp_avg"
            assert torch.equal(ours["exp_avg_sq"], theirs["exp_avg_sq"]), f"step {step} {n}: exp_avg_sq"
            if "projector" in theirs:
                ortho = theirs["projector"].ortho_matrix
                mine = [ours[k] for k in ("proj_left", "proj_right") if k in ours]
                assert all(torch.equal(a, b) for a, b in zip(mine, ortho if isinstance(ortho, list) else [ortho]))
            # ... and the weights agree to the last bit or two (ours fuses back-projection and add)
            assert (p - before[n]).abs().max() > 0, f"step {step}: {n} did not move"
            torch.testing.assert_close(p, ref_params[n], atol=1e-9, rtol=3e-7, msg=lambda m: f"step {step} {n}: {m}")
        with torch.no_grad():  # re-align the weights so the next gradient is the same for both
            for n, p in model.named_parameters():
                ref_params[n].copy_(p)


# ------------------------------------------------------------------------------------------------
# 2. projection sides come from the projection, not from shapes (square tensors)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(24, 24), (12, 24), (24, 12)])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_back_projection_side_square_and_rank_equal_dim(shape, proj_type):
    torch.manual_seed(0)
    for rank in (4, min(shape)):  # rank == min(shape) makes the low-rank tensor square
        w = torch.nn.Parameter(torch.randn(shape))
        w0 = w.detach().clone()
        g = torch.randn(shape)
        opt = GaLoreAdamW([{"params": [w], "galore": True}], lr=0.1, rank=rank, proj_type=proj_type,
                          svd="exact", scale=0.5, eps=1e-6)
        w.grad = g.clone()
        opt.step()
        # hand-computed first Adam step in the subspace
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        left, right = projection_sides(shape, proj_type)
        P, Q = u[:, :rank], vh[:rank]
        r = (P.T @ g if left else g) @ (Q.T if right else torch.eye(shape[1]))
        m, v = 0.1 * r, 0.001 * r * r
        n = m / (v.sqrt() + 1e-6)
        back = (P @ n if left else n) @ (Q if right else torch.eye(r.shape[1]))
        step_size = 0.1 * (1 - 0.999) ** 0.5 / (1 - 0.9)
        expected = w0 - step_size * 0.5 * back
        st = opt.state[w]
        assert ("proj_left" in st) == left and ("proj_right" in st) == right
        torch.testing.assert_close(w.detach(), expected, atol=1e-5, rtol=1e-5)


def test_reference_guesses_side_from_shape():
    """Documents the reference bug we avoid: reverse_std on a wide weight at rank = rows."""
    galore_torch = pytest.importorskip("galore_torch", reason="galore-torch is not installed")
    from galore_torch.galore_projector import GaLoreProjector

    g = torch.randn(12, 24)
    proj = GaLoreProjector(12, proj_type="reverse_std")
    low = proj.project(g, 0)  # right projection -> 12×12, square
    with pytest.raises(RuntimeError):  # back-projection guesses 'left' from the square shape
        proj.project_back(low)
    assert galore_torch  # ours handles the same case in the test above


def test_randomized_svd_is_seeded_and_accurate():
    torch.manual_seed(0)
    a = torch.randn(96, 8) @ torch.randn(8, 64) + 1e-3 * torch.randn(96, 64)  # ~rank 8
    u1, v1 = top_singular_basis(a, 8, True, True, "randomized", 8, 2, seed=123)
    u2, v2 = top_singular_basis(a, 8, True, True, "randomized", 8, 2, seed=123)
    assert torch.equal(u1, u2) and torch.equal(v1, v2)
    ue, _, vhe = torch.linalg.svd(a, full_matrices=False)
    # same subspaces as the exact SVD: projectors agree
    torch.testing.assert_close(u1 @ u1.T, ue[:, :8] @ ue[:, :8].T, atol=1e-4, rtol=0)
    torch.testing.assert_close(v1.T @ v1, vhe[:8].T @ vhe[:8], atol=1e-4, rtol=0)
    state = torch.random.get_rng_state()
    top_singular_basis(a, 8, True, False, "randomized", 8, 2, seed=5)
    assert torch.equal(state, torch.random.get_rng_state()), "randomized SVD must not touch the global RNG"


# ------------------------------------------------------------------------------------------------
# 3. gradient accumulation + clipping; layer-wise mode
# ------------------------------------------------------------------------------------------------


def test_grad_accum_and_clipping_match_one_big_batch(tiny_model, tiny_model_dir):
    one = run_cfg(tiny_model_dir, "method.update_proj_gap=2", f"train.lr={LR}", "train.max_grad_norm=0.5")
    acc = run_cfg(tiny_model_dir, "method.update_proj_gap=2", f"train.lr={LR}", "train.max_grad_norm=0.5",
                  "train.grad_accum=2")
    tiny_model.double()  # Adam amplifies rounding where |grad| ~ eps: compare in fp64
    model_b = copy.deepcopy(tiny_model)
    _, model_a, opt_a, cbs_a, st_a = galore_setup(tiny_model, one)
    _, model_b, opt_b, cbs_b, st_b = galore_setup(model_b, acc)
    data = make_batches(3, batch=4)
    norms_a = train_steps(model_a, opt_a, cbs_a, st_a, [[b] for b in data], max_grad_norm=0.5)
    norms_b = train_steps(model_b, opt_b, cbs_b, st_b, [[b[:2], b[2:]] for b in data], max_grad_norm=0.5)
    assert min(norms_a) > 0.5, "clipping must be active in this test"
    assert norms_a == pytest.approx(norms_b, rel=1e-4)
    assert_same_weights(model_a, model_b, atol=1e-9, rtol=1e-7)


def test_layerwise_matches_standard_and_frees_grads(tiny_model, tiny_model_dir):
    common = ("method.update_proj_gap=2", f"train.lr={LR}", "train.max_grad_norm=0", "train.grad_accum=2",
              "train.weight_decay=0.01")
    model_b = copy.deepcopy(tiny_model)
    _, model_a, opt_a, cbs_a, st_a = galore_setup(tiny_model, run_cfg(tiny_model_dir, *common))
    _, model_b, opt_b, cbs_b, st_b = galore_setup(model_b, run_cfg(tiny_model_dir, *common, "method.layerwise=true"))
    assert opt_b.layerwise and not opt_a.layerwise
    data = make_batches(6, batch=2)
    # three full windows of 2 micro-batches, then a short window of 1 (end of an epoch)
    windows = [data[0:2], data[2:4], data[4:6], data[0:1]]
    train_steps(model_a, opt_a, cbs_a, st_a, windows)
    # layer-wise: after the last micro-batch of a window every gradient is already gone
    for cb in cbs_b:
        cb.on_step_begin(st_b, model_b)
    (loss_of(model_b, data[0]) / 2).backward()
    assert all(p.grad is not None for p in model_b.parameters())  # kept while accumulating
    (loss_of(model_b, data[1]) / 2).backward()
    assert all(p.grad is None for p in model_b.parameters()), "layer-wise mode must free gradients in backward"
    opt_b.step()
    st_b.step = 1
    train_steps(model_b, opt_b, cbs_b, st_b, windows[1:])
    assert_same_weights(model_a, model_b, exact=True)


# ------------------------------------------------------------------------------------------------
# 4. DDP: two gloo processes end with identical weights (= one process on both batches)
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
        cfg = run_cfg(model_dir, "method.update_proj_gap=2", f"train.lr={LR}")
        method = get_method("galore")(cfg.method)
        model = method.prepare(model, cfg)
        opt = method.build_optimizer(model, cfg.train)
        ddp = DDP(model)
        for ids in make_batches(3, batch=4):  # different data per rank
            loss_of(ddp, ids[2 * rank: 2 * rank + 2]).backward()
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.save({n: p.detach() for n, p in model.named_parameters()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_identical(tiny_model, tiny_model_dir, tmp_path):
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tiny_model_dir), str(tmp_path)), nprocs=2, join=True)
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for n in w0:
        assert torch.equal(w0[n], w1[n]), f"ranks disagree on {n}"
    # and the same as one process seeing both halves (DDP averages the two half-batch gradients)
    cfg = run_cfg(tiny_model_dir, "method.update_proj_gap=2", f"train.lr={LR}")
    _, model, opt, cbs, st = galore_setup(tiny_model.double(), cfg)
    train_steps(model, opt, cbs, st, [[b] for b in make_batches(3, batch=4)], max_grad_norm=1.0)
    initial = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).named_parameters())
    for n, p in model.named_parameters():
        assert not torch.equal(initial[n], w0[n]), f"{n} did not train"
        torch.testing.assert_close(w0[n], p.detach(), atol=1e-9, rtol=1e-7)


# ------------------------------------------------------------------------------------------------
# 5. resume: bit-exact across a projection refresh, weights_only=True
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optim_8bit", [False, True])
def test_resume_bit_exact_weights_only(tiny_model_dir, optim_8bit):
    from transformers import AutoModelForCausalLM

    if optim_8bit:
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    over = ("method.update_proj_gap=3", f"train.lr={LR}", "train.max_grad_norm=1.0")
    cfg = run_cfg(tiny_model_dir, *over)
    cfg.method.optim_8bit = optim_8bit  # the optimizer runs 8-bit on CPU too; the config refuses CPU runs
    data = make_batches(4, batch=2)
    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)  # noqa: E731

    _, full, opt, cbs, st = galore_setup(load(), cfg)
    train_steps(full, opt, cbs, st, [[b] for b in data], max_grad_norm=1.0)

    _, part, opt, cbs, st = galore_setup(load(), cfg)
    train_steps(part, opt, cbs, st, [[b] for b in data[:2]], max_grad_norm=1.0)
    buf_opt, buf_model = io.BytesIO(), io.BytesIO()
    torch.save(opt.state_dict(), buf_opt)
    torch.save({n: p.detach().clone() for n, p in part.named_parameters()}, buf_model)
    if optim_8bit:
        assert any(k.endswith("_q") for s in opt.state.values() for k in s)
    del part, opt
    buf_opt.seek(0), buf_model.seek(0)

    method, resumed, opt, cbs, st = galore_setup(load(), cfg)
    method.load_trainable_state_dict(resumed, torch.load(buf_model, weights_only=True))
    opt.load_state_dict(torch.load(buf_opt, weights_only=True))
    st.step = 2
    train_steps(resumed, opt, cbs, st, [[b] for b in data[2:]], max_grad_norm=1.0)  # refresh at step 3
    assert_same_weights(full, resumed, exact=True)


# ------------------------------------------------------------------------------------------------
# 6. validation, targets, accounting
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["method.rank=0"], "method.rank must be >= 1"),
        (["method.proj_type=diag"], "known: std, reverse_std, left, right, full"),
        (["method.svd=lanczos"], "known: randomized, exact"),
        (["method.update_proj_gap=0"], "update_proj_gap"),
        (["method.scale=0"], "method.scale must be > 0"),
        (["method.target_modules=[]"], "target_modules is empty"),
        (["method.layerwise=true", "train.max_grad_norm=1.0"], "set train.max_grad_norm=0"),
    ],
)
def test_validation_errors(tiny_model_dir, overrides, needle):
    with pytest.raises(ConfigError) as exc:
        run_cfg(tiny_model_dir, *overrides)
    assert needle in str(exc.value)


def test_validation_8bit_on_cpu_and_layerwise_ddp(tiny_model_dir, monkeypatch):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_cfg(tiny_model_dir, "method.optim_8bit=true").method.optim_8bit  # 8-bit moments run on the CPU
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "bitsandbytes", None)  # a machine without bitsandbytes
        with pytest.raises(ConfigError, match="optim_8bit=true: bitsandbytes blockwise 8-bit does not run.*optim_8bit=false"):
            run_cfg(tiny_model_dir, "method.optim_8bit=true")
    with pytest.raises(ConfigError, match="train.optim=adamw_8bit cannot apply.*method.optim_8bit=true"):
        run_cfg(tiny_model_dir, "train.optim=adamw_8bit")  # GaLore builds its own optimizer
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="layerwise=true cannot run under DDP"):
        run_cfg(tiny_model_dir, "method.layerwise=true", "train.max_grad_norm=0")
    monkeypatch.delenv("WORLD_SIZE")
    # layer-wise with gradient accumulation is fine
    cfg = run_cfg(tiny_model_dir, "method.layerwise=true", "train.max_grad_norm=0", "train.grad_accum=4")
    assert get_method("galore").validate(cfg) == []


def test_prepare_errors_name_the_layer(tiny_model, tiny_model_dir):
    cfg = run_cfg(tiny_model_dir, "method.rank=48")
    method = get_method("galore")(cfg.method)
    with pytest.raises(ValueError, match=r"k_proj\.weight \(32, 64\).*method\.rank <= 32.*clamp_rank=true"):
        method.prepare(tiny_model, cfg)
    cfg = run_cfg(tiny_model_dir, "method.rank=48", "method.clamp_rank=true")
    _, model, opt, cbs, st = galore_setup(tiny_model, cfg)
    train_steps(model, opt, cbs, st, [make_batches(1, batch=2)])
    k = model.model.layers[0].self_attn.k_proj.weight
    assert opt.state[k]["proj_left"].shape == (32, 32)  # std on a 32×64 weight: left, rank clamped to 32
    cfg = run_cfg(tiny_model_dir, "method.target_modules=[qkv]")
    with pytest.raises(ValueError, match="matched no linear layer.*q_proj"):
        get_method("galore")(cfg.method).prepare(tiny_model, cfg)


def test_targets_and_extra_results(tiny_model, tiny_model_dir):
    cfg = run_cfg(tiny_model_dir, "method.target_modules=[q_proj, v_proj]")
    method, model, opt, cbs, st = galore_setup(tiny_model, cfg)
    projected = opt.param_groups[0]["params"]
    assert len(projected) == 4
    train_steps(model, opt, cbs, st, [make_batches(1, batch=2)])
    res = method.extra_results(model, opt)
    assert res["tensors_projected"] == 4 and res["params_projected"] == 2 * (64 * 64 + 32 * 64)
    assert res["params_projected"] + res["params_plain"] == sum(p.numel() for p in model.parameters())
    assert res["optimizer_state_bytes"] == res["optimizer_state_bytes_projected"] + res["optimizer_state_bytes_plain"]
    # per layer, fp32 + an int64 step each: q_proj 64×64 (std -> right): moments 2 × 64×8, projection 8×64;
    # v_proj 32×64 (rows < cols -> left): moments 2 × 8×64, projection 32×8
    per_layer = (4 * (2 * 64 * 8 + 8 * 64) + 8) + (4 * (2 * 8 * 64 + 32 * 8) + 8)
    assert res["optimizer_state_bytes_projected"] == 2 * per_layer
    assert res["optimizer_state_ratio_vs_adamw_projected"] < 0.4
    assert res["svd_calls"] == 4 and res["svd_time_s"] >= 0
    # optimizer state is plain tensors: loads with weights_only
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


# ------------------------------------------------------------------------------------------------
# 7. end to end through the trainer and the CLI (when they exist)
# ------------------------------------------------------------------------------------------------


def _trainer_ready() -> bool:
    try:
        import tunelab.cli  # noqa: F401
        import tunelab.train  # noqa: F401
    except Exception:
        return False
    return True


needs_trainer = pytest.mark.skipif(not _trainer_ready(), reason="tunelab.train / tunelab.cli are not there yet")


def _train_cfg(tiny_model_dir, out, *extra):
    return load_config(overrides=[
        f"model={tiny_model_dir}", "task=gsm8k", "method=galore", "data.limit=16", "train.batch_size=4",
        "train.report_to=[]", "train.progress_bar=false", "data.max_length=96", f"out={out}", *extra,
    ])


@needs_trainer
def test_trainer_resume_across_refresh_is_bit_exact(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from tunelab.rundir import RunDir
    from tunelab.train import train

    common = ["train.max_steps=4", "train.lr=5e-3", "method.update_proj_gap=3", "train.warmup_steps=1"]
    full, part = tmp_path / "full", tmp_path / "part"
    res = train(_train_cfg(tiny_model_dir, full, *common))
    mr = res["method_results"]
    assert mr["svd_calls"] == 2 * 14 and mr["tensors_projected"] == 14
    assert mr["optimizer_state_bytes"] == mr["optimizer_state_bytes_projected"] + mr["optimizer_state_bytes_plain"]
    train(_train_cfg(tiny_model_dir, part, *common, "train.save_steps=2"))
    for name in ("model", "results.json", "tokenizer", "checkpoints/step-000004"):  # a crash after the step-2 checkpoint
        p = part / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    train(RunDir(part).config(), resume=True)  # steps 2, 3; the projection refresh happens at step 3
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(part / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@needs_trainer
def test_trainer_layerwise_equals_standard(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from tunelab.train import train

    common = ["train.max_steps=2", "train.lr=5e-3", "method.update_proj_gap=1", "train.grad_accum=2",
              "train.max_grad_norm=0", "train.batch_size=2"]
    train(_train_cfg(tiny_model_dir, tmp_path / "std", *common))
    train(_train_cfg(tiny_model_dir, tmp_path / "lw", *common, "method.layerwise=true"))
    a = load_file(str(tmp_path / "std" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "lw" / "model" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a diverging layer-wise run stops loudly instead of applying non-finite gradients, and the
    # trainer reports it as divergence naming the last good checkpoint
    from tunelab.train import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="non-finite gradient.*last good checkpoint"):
        train(_train_cfg(tiny_model_dir, tmp_path / "nan", "train.max_steps=6", "train.lr=1e12",
                         "train.max_grad_norm=0", "method.layerwise=true"))


@needs_trainer
def test_end_to_end_cli(tiny_model_dir, tmp_path):
    import json

    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "tunelab"]
    out = subprocess.run(
        [*cmd, "train", "task=gsm8k", "method=galore", "train.max_steps=3", "data.limit=16",
         f"model={tiny_model_dir}", f"out={run}", "train.report_to=[]", "train.progress_bar=false",
         "train.batch_size=4", "data.max_length=96"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "14 weights (73,728 parameters) projected at rank 8" in out.stderr
    assert list((run / "model").glob("*.safetensors"))
    results = json.loads((run / "results.json").read_text())
    assert results["method_results"]["svd_calls"] == 14 and results["method_results"]["optimizer_state_bytes"] > 0
    out = subprocess.run([*cmd, "eval", str(run), "eval.limit=4", "eval.max_new_tokens=16"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run / "eval" / "results.json").read_text())["metrics"]["n"] == 4

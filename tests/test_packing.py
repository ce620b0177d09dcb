"""Padding-free packing: rows fit, attention never crosses examples (packed loss and gradients equal the
unpacked ones), it trains through the CLI, resumes bit-exactly, works with DDP streams, RoSA and GaLore."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import ConfigError, load_config
from tunelab.data import IGNORE_INDEX, MicroBatchStream, TokenizedExample, collate, real_tokens
from tunelab.data.packing import SEGMENT_SDPA, block_causal_mask, collate_packed, pack_rows
from tunelab.loss import TargetPositionSelector, model_inputs, target_loss
from tunelab.train import train


def _cfg(tiny_model_dir, out, *extra):
    return load_config(overrides=[
        f"model={tiny_model_dir}", "task=gsm8k", "data.limit=16", "train.batch_size=2", "data.packing=true",
        "data.max_length=400", "train.report_to=[]", "train.progress_bar=false", f"out={out}", *extra,
    ])


def _examples(tiny_model_dir, n: int = 7, max_length: int = 720) -> list[TokenizedExample]:
    """Real GSM8K examples tokenized by the real SmolLM2 tokenizer (prompt labels -100)."""
    from tunelab.data import build_train_dataset
    from tunelab.models import load_tokenizer, materialize
    from tunelab.registry import TASKS

    cfg = load_config(overrides=[f"model={tiny_model_dir}", "task=gsm8k", f"data.limit={n}",
                                 f"data.max_length={max_length}"])
    tok = load_tokenizer(cfg.model, materialize(cfg.model.name))
    data, _ = build_train_dataset(TASKS.get("gsm8k")(cfg.task), tok, cfg.data, cfg.seed)
    return data


def _loss_and_grads(model, selector, batch, chunk_tokens):
    model.zero_grad(set_to_none=True)
    loss = target_loss(model, selector, batch, chunk_tokens=chunk_tokens)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


# ---- packing itself ------------------------------------------------------------------------------


def test_pack_rows_fit_hold_every_example_once_and_are_seeded():
    lengths = [int(x) for x in torch.randint(1, 300, (500,), generator=torch.Generator().manual_seed(0))]
    rows = pack_rows(lengths, 512, seed=3)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    used = sum(lengths) / (512 * len(rows))
    assert used > 0.97  # best-fit decreasing leaves little room unused
    assert rows == pack_rows(lengths, 512, seed=3)
    with pytest.raises(ValueError, match="longer than data.max_length=100"):
        pack_rows([50, 101], 100, seed=0)


def test_collate_packed_positions_labels_and_block_causal_mask():
    a = TokenizedExample([1, 2, 3], [IGNORE_INDEX, 2, 3], "a")
    b = TokenizedExample([4, 5], [4, 5], "b")  # train_on=all: its first token is a label of its own
    c = TokenizedExample([6, 7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 8, 9], "c")
    batch = collate([[a, b], [c]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    # b's first token is never a target of a's last position
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, -100, 8, 9, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert "attention_mask" not in batch  # a 2D mask would let a row's examples see each other
    mask = block_causal_mask(batch["position_ids"])
    allowed = (mask[:, 0] == 0).int().tolist()
    assert allowed[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert allowed[1][4] == [0, 0, 0, 0, 1]  # the padding tail sees only itself
    assert mask.dtype == torch.float32 and mask.min() == torch.finfo(torch.float32).min
    assert block_causal_mask(batch["position_ids"], torch.bfloat16).min() == torch.finfo(torch.bfloat16).min
    assert real_tokens(batch) == 9


# ---- packed == unpacked --------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager", "sdpa+4d-mask"])
@pytest.mark.parametrize("chunk_tokens", [0, 16])
def test_packed_loss_and_gradients_equal_unpacked(tiny_model_dir, attn, chunk_tokens):
    """sdpa: per-example sdpa; eager: the 4D block-diagonal mask; sdpa+4d-mask: that mask under sdpa."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation=attn.split("+")[0])
    selector = TargetPositionSelector(model)
    if attn == "sdpa+4d-mask":
        selector.attn_implementation = None  # unknown: the 4D mask
    data = _examples(tiny_model_dir)
    rows = pack_rows([len(t) for t in data], 400, seed=0)
    assert len(rows) < len(data) and any(len(r) > 1 for r in rows)  # some rows really hold several examples
    packed = collate([[data[i] for i in row] for row in rows], pad_token_id=0)
    plain = collate(data, pad_token_id=0)
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == int((plain["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss_p, grads_p = _loss_and_grads(model, selector, packed, chunk_tokens)
    loss_u, grads_u = _loss_and_grads(model, selector, plain, chunk_tokens)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-4)
    assert grads_p.keys() == grads_u.keys() and len(grads_p) > 10
    for k in grads_p:
        torch.testing.assert_close(grads_p[k], grads_u[k], rtol=1e-4, atol=1e-5, msg=k)
    if attn == "sdpa":
        assert model.config._attn_implementation == SEGMENT_SDPA
    # and attention really is what isolates them: the same rows as one sequence each (a 2D mask) differ
    leaky = {"input_ids": packed["input_ids"], "labels": packed["labels"], "attention_mask": packed["token_mask"]}
    with torch.no_grad():
        assert abs(float(target_loss(model, selector, leaky)) - float(loss_p)) > 1e-2


def test_flash_attention_gets_position_ids_only_and_unknown_attention_an_error(tiny_model):
    selector = TargetPositionSelector(tiny_model)
    batch = collate_packed([[TokenizedExample([1, 2, 3], [-100, 2, 3], "a"), TokenizedExample([4, 5], [4, 5], "b")]], 0)
    selector.attn_implementation = "flash_attention_2"
    inputs = model_inputs(selector, batch)
    assert inputs["attention_mask"] is None and inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert "cu_seq_lens_q" not in inputs  # transformers derives them from the position ids
    selector.attn_implementation = "eager"
    selector.mask_dtype = torch.bfloat16
    mask = model_inputs(selector, batch)["attention_mask"]
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bfloat16
    selector.attn_implementation = "sdpa"
    inputs = model_inputs(selector, batch)
    assert inputs["attention_mask"] is None and inputs["cu_seq_lens_q"].tolist() == [0, 3, 5]
    selector.attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="supports none of them: set model.attn_implementation=sdpa"):
        model_inputs(selector, batch)


def test_a_switched_model_still_attends_as_sdpa_to_padded_batches(tiny_model):
    """After a packed step the model runs the segment attention; unpacked (padded) batches, as in
    evaluation, then get exactly sdpa's result."""
    ids = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        before = tiny_model(input_ids=ids, attention_mask=mask).logits
        selector = TargetPositionSelector(tiny_model)
        model_inputs(selector, collate_packed([[TokenizedExample([1, 2], [1, 2], "a")]], 0))
        assert tiny_model.config._attn_implementation == SEGMENT_SDPA
        after = tiny_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after[mask.bool()], before[mask.bool()], rtol=0, atol=0)


# ---- streams, over-long examples, config -----------------------------------------------------------


def test_stream_ranks_take_disjoint_rows_and_epochs_are_seeded():
    data = [TokenizedExample([1] * n, [1] * n, str(i)) for i, n in enumerate([30, 50, 20, 70, 10, 60, 40, 25, 35, 45])]
    one = MicroBatchStream(data, 1, seed=5, shuffle=True, group_by_length=False, packing=True, max_length=100)
    ranks = [MicroBatchStream(data, 1, seed=5, shuffle=True, group_by_length=False, rank=r, world_size=2,
                              packing=True, max_length=100) for r in range(2)]
    n_rows = len(one.rows)
    assert one.per_epoch == n_rows and ranks[0].per_epoch == n_rows // 2
    for epoch in range(2):
        seen = [tuple(t.id for t in ranks[r].get(epoch * ranks[r].per_epoch + i)[1][0])
                for r in range(2) for i in range(ranks[r].per_epoch)]
        assert len(set(seen)) == len(seen) == 2 * (n_rows // 2)  # no row on both ranks
    epoch0 = [one.get(i)[1] for i in range(n_rows)]
    epoch1 = [one.get(n_rows + i)[1] for i in range(n_rows)]
    assert all(sum(len(t) for t in b[0]) <= 100 for b in epoch0)
    assert epoch0 != epoch1  # rows reshuffled per epoch
    fresh = MicroBatchStream(data, 1, seed=5, shuffle=True, group_by_length=False, packing=True, max_length=100)
    assert [fresh.get(n_rows + i)[1] for i in range(n_rows)] == epoch1  # a resumed run sees the same rows


def test_overlong_examples_are_counted_and_rows_never_exceed_max_length(tiny_model_dir):
    from tunelab.data import build_train_dataset
    from tunelab.models import load_tokenizer, materialize
    from tunelab.registry import TASKS

    for policy in ("truncate", "drop"):
        cfg = load_config(overrides=[f"model={tiny_model_dir}", "task=gsm8k", "data.limit=24", "data.max_length=128",
                                     "data.packing=true", f"data.overlong={policy}"])
        tok = load_tokenizer(cfg.model, materialize(cfg.model.name))
        data, stats = build_train_dataset(TASKS.get("gsm8k")(cfg.task), tok, cfg.data, cfg.seed)
        assert (stats.truncated if policy == "truncate" else stats.dropped_overlong) > 0
        assert stats.notes and "data.max_length=128" in stats.notes[0]
        stream = MicroBatchStream(data, 2, cfg.seed, True, True, packing=True, max_length=128)
        for i in range(stream.per_epoch):
            batch = collate(stream.get(i)[1], tok.pad_token_id)
            assert batch["input_ids"].shape[1] <= 128


@pytest.mark.parametrize("overrides, needle", [
    (["data.max_length=32"], "data.packing=true with data.max_length=32"),
    (["model.attn_implementation=flex_attention"], "set model.attn_implementation=sdpa, or data.packing=false"),
])
def test_config_rejects_packing_that_cannot_work(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=["data.packing=true", *overrides])


# ---- through the trainer ---------------------------------------------------------------------------


def test_packed_train_through_the_cli(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", "task=gsm8k", "method=lora", "data.packing=true", "data.limit=12",
         "data.max_length=400", "train.batch_size=2", "train.max_steps=2", f"model={tiny_model_dir}", f"out={run}",
         "train.report_to=[]", "train.progress_bar=false"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == 2
    # 2 rows per step hold more than 2 examples' worth of tokens, and no padding is counted
    assert res["train_tokens"] > 4 * 100
    assert all(torch.isfinite(torch.tensor(json.loads(l)["loss"])) for l in (run / "metrics.jsonl").read_text().splitlines())


def test_packed_resume_is_bit_exact(tiny_model_dir, tmp_path):
    common = ["method=lora", "train.max_steps=4", "train.lr=5e-3", "method.dropout=0.1", "train.warmup_steps=1",
              "data.limit=24", "train.batch_size=1"]
    full, part = tmp_path / "full", tmp_path / "part"
    train(_cfg(tiny_model_dir, full, *common))
    train(_cfg(tiny_model_dir, part, *common, "train.save_steps=2"))
    for name in ("adapter", "results.json", "tokenizer", "checkpoints/step-000004"):  # a crash after step 2
        p = part / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    from tunelab.rundir import RunDir

    train(RunDir(part).config(), resume=True)
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    logged = [json.loads(line)["loss"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line)["loss"] for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert logged == reference


def test_galore_step_on_packed_rows_equals_unpacked(tiny_model_dir, tmp_path):
    """One optimizer step over the same 8 examples, packed or not: the same GaLore update. (A large
    adam_eps makes the first Adam step linear in the gradient instead of its sign, whose float noise
    would flip the update of near-zero gradients.)"""
    common = ["method=galore", "train.max_steps=1", "train.lr=1.0", "train.adam_eps=1.0", "data.limit=8", "train.batch_size=8",
              "data.shuffle=false", "train.max_grad_norm=0"]
    res = train(_cfg(tiny_model_dir, tmp_path / "packed", *common))
    train(_cfg(tiny_model_dir, tmp_path / "plain", *common, "data.packing=false"))
    assert res["method_results"]["svd_calls"] > 0
    a = load_file(str(tmp_path / "packed" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "model" / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    moved = [k for k in a if k in base and not torch.equal(a[k], base[k])]
    assert moved
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_rosa_collects_the_same_gradients_from_packed_rows(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tunelab.config import RunConfig, TrainConfig
    from tunelab.methods.base import TrainState
    from tunelab.methods.rosa import RosaConfig, RosaMethod, rosa_layers

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    data = _examples(tiny_model_dir)
    rows = pack_rows([len(t) for t in data], 400, seed=0)
    batches = {"packed": collate([[data[i] for i in row] for row in rows], 0), "plain": collate(data, 0)}
    collected = {}
    for name, batch in batches.items():
        cfg = RunConfig(method=RosaConfig(schedule="default", spa_num_grads=1, density=0.01, dropout=0.0),
                        train=TrainConfig(lr=1e-2, max_steps=10))
        method = RosaMethod(cfg.method)
        torch.manual_seed(0)
        model = method.prepare(copy.deepcopy(base), cfg)
        opt = method.build_optimizer(model, cfg.train)
        state = TrainState(max_steps=10)
        callbacks = method.callbacks()
        for cb in callbacks:
            cb.on_train_begin(state, model, opt)
            cb.on_step_begin(state, model)
        assert rosa_layers(model)[0].collecting
        target_loss(model, TargetPositionSelector(model), batch).backward()
        collected[name] = {m.rosa_name: m._acc.clone() for m in rosa_layers(model)}
        opt.step()
        state.step += 1
        for cb in callbacks:
            cb.on_step_end(state, model, opt)
        assert callbacks[0].mask_ready  # the mask was built from the packed (or plain) batch
    assert collected["packed"].keys() == collected["plain"].keys() and collected["plain"]
    for k in collected["plain"]:
        torch.testing.assert_close(collected["packed"][k], collected["plain"][k], rtol=1e-6, atol=1e-9, msg=k)


def test_rosa_trains_on_packed_rows(tiny_model_dir, tmp_path):
    res = train(_cfg(tiny_model_dir, tmp_path / "run", "method=rosa", "method.schedule=wl1", "method.density=0.02",
                     "train.max_steps=3", "train.lr=5e-3"))
    assert res["steps"] == 3 and res["method_results"]["rosa_mask_source"] == "collected"

"""Trainer behaviour on the tiny model: LoRA trains only the adapter, resume is exact, merge is exact."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import load_config
from tunelab.train import TrainingDiverged, train


def _cfg(tiny_model_dir, out, *extra):
    return load_config(overrides=[
        f"model={tiny_model_dir}", "task=gsm8k", "data.limit=16", "train.batch_size=4",
        "train.report_to=[]", "train.progress_bar=false", f"out={out}", *extra,
    ])


def test_lora_two_steps_change_adapter_and_leave_base_frozen(tiny_model_dir, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    res = train(_cfg(tiny_model_dir, run, "method=lora", "train.max_steps=2", "train.lr=1e-2"))
    assert res["steps"] == 2 and res["trainable_params"] < res["total_params"] / 10
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it trained
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    # plain PEFT loads the adapter; the base weights inside are untouched
    model = peft.PeftModel.from_pretrained(base, str(run / "adapter"))
    for name, p in model.get_base_model().named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, ref[key]), name
    for key in ("trainable_params", "total_params", "peak_mem_bytes", "wall_time_s", "train_tokens_per_s",
                "final_loss", "git_sha", "git_dirty", "versions", "seed"):
        assert key in res
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2]


def test_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    common = ["method=lora", "train.max_steps=4", "train.lr=5e-3", "method.dropout=0.1", "train.warmup_steps=1"]
    full = tmp_path / "full"
    train(_cfg(tiny_model_dir, full, *common))
    part = tmp_path / "part"
    train(_cfg(tiny_model_dir, part, *common, "train.save_steps=2"))
    # simulate a crash after step 2: drop everything written after that checkpoint
    import shutil

    for name in ("adapter", "results.json", "tokenizer", "checkpoints/step-000004"):
        p = part / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert [c.name for c in (part / "checkpoints").iterdir()] == ["step-000002"]
    from tunelab.rundir import RunDir

    train(RunDir(part).config(), resume=True)
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # the crashed run had logged steps 3-4 after its checkpoint: the resumed log holds each step once
    logged = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in reference], rel=1e-6)


def test_grad_accum_matches_big_batch(tiny_model_dir, tmp_path):
    """Loss is a mean over all target tokens of the step, so 2x4 accumulation == one batch of 8."""
    common = ["method=full", "train.max_steps=1", "train.lr=1e-3", "data.group_by_length=false", "data.shuffle=false", "data.limit=8"]
    a, b = tmp_path / "a", tmp_path / "b"
    train(_cfg(tiny_model_dir, a, *common, "train.batch_size=8", "train.grad_accum=1"))
    train(_cfg(tiny_model_dir, b, *common, "train.batch_size=4", "train.grad_accum=2"))
    wa = load_file(str(a / "model" / "model.safetensors"))
    wb = load_file(str(b / "model" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="last good state"):
        train(_cfg(tiny_model_dir, run, "method=full", "train.max_steps=20", "train.lr=1e12", "train.max_grad_norm=0"))
    ckpts = list((run / "checkpoints").iterdir())
    assert len(ckpts) == 1
    weights = load_file(str(ckpts[0] / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (run / "results.json").exists()


def test_merge_equivalence(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunelab.evaluation.evaluate import load_model_for_eval
    from tunelab.rundir import RunDir
    from tunelab.merge import merge_run

    run = tmp_path / "run"
    train(_cfg(tiny_model_dir, run, "method=lora", "train.max_steps=2", "train.lr=5e-2"))
    report = merge_run(RunDir(run).config(), run)
    assert report["max_abs_logit_diff"] <= 1e-3
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    adapter_model, _ = load_model_for_eval(RunDir(run).config(), run, merge=False)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter_model(ids).logits, rtol=1e-4, atol=1e-4)
    assert not (run / "merged" / "adapter_config.json").exists()


def test_reference_loss_equals_hf_loss_on_the_same_tokens(tiny_model_dir, tiny_model):
    """Eval's teacher-forced loss is HF's causal-LM loss over all reference tokens, pooled."""
    from transformers import AutoTokenizer

    from tunelab.data import tokenize_example
    from tunelab.evaluation.evaluate import reference_loss
    from tunelab.tasks import get_task

    cfg = load_config(overrides=[f"model={tiny_model_dir}", "task=gsm8k"])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = get_task("gsm8k")(cfg.task).examples("test")[:5]
    got = reference_loss(tiny_model.eval(), tok, examples, max_length=120, batch_size=2)
    nll, n = 0.0, 0
    for ex in examples:
        t, _ = tokenize_example(ex, tok, 120, "truncate")
        labels = torch.tensor([t.labels])
        n_ex = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            out = tiny_model(input_ids=torch.tensor([t.input_ids]), labels=labels)
        nll += float(out.loss) * n_ex
        n += n_ex
    assert got["reference_tokens"] == n and got["examples"] == 5
    assert got["truncated"] > 0  # GSM8K answers do not fit in 120 tokens with their question
    assert got["nll_per_token"] == pytest.approx(nll / n, rel=1e-5)
    per = got["per_example"]  # id -> (summed NLL, tokens): what predictions.jsonl stores for `compare`
    assert set(per) == {ex.id for ex in examples} and sum(v[1] for v in per.values()) == n
    assert sum(v[0] for v in per.values()) == pytest.approx(nll, rel=1e-5)
    t0, _ = tokenize_example(examples[0], tok, 120, "truncate")
    with torch.no_grad():
        labels0 = torch.tensor([t0.labels])
        loss0 = float(tiny_model(input_ids=torch.tensor([t0.input_ids]), labels=labels0).loss)
    assert per[examples[0].id][0] == pytest.approx(loss0 * per[examples[0].id][1], rel=1e-5)

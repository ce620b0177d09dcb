"""Evaluation during training (train.eval_steps): held-out ref_nll lines, the eval_fraction hold-out, early
stopping keeping the best model, exact resume, DDP (2 gloo ranks), the report's loss curves, bad input."""

import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from procs import run_group
from tunelab.config import ConfigError, load_config
from tunelab.rundir import RunDir
from tunelab.train import train


def _cfg(tiny_model_dir, out, *extra):
    return load_config(overrides=[
        f"model={tiny_model_dir}", "task=gsm8k", "data.limit=8", "train.batch_size=4", "train.report_to=[]",
        "train.progress_bar=false", f"out={out}", *extra,
    ])


def _lines(run: Path) -> tuple[list[dict], list[dict]]:
    """(training lines, evaluation lines) of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval/ref_nll" in r]


def _reference_nll(cfg, run: Path, n: int) -> tuple[float, list[str]]:
    """ref_nll of the run's artifact on the first n test examples, as `tunelab eval` computes it."""
    from tunelab.evaluation.evaluate import load_model_for_eval, reference_loss
    from tunelab.tasks import get_task

    model, tok = load_model_for_eval(cfg, run)
    task = get_task(cfg.task.name)(cfg.task)
    examples = task.examples(cfg.eval.split, tokenizer=tok,
                             max_prompt_tokens=max(8, cfg.data.max_length - cfg.eval.max_new_tokens))[:n]
    ref = reference_loss(model, tok, examples, cfg.data.max_length, cfg.eval.batch_size,
                         chunk_tokens=cfg.train.loss_chunk_tokens, task_cfg=cfg.task, train_on=cfg.data.train_on)
    return ref["nll_per_token"], [e.id for e in examples]


@pytest.fixture(scope="module")
def eval_run(tiny_model_dir, tmp_path_factory):
    """LoRA, 5 steps, held-out loss every 2 steps on the first 6 test questions (also TensorBoard)."""
    run = tmp_path_factory.mktemp("eval") / "run"
    cfg = _cfg(tiny_model_dir, run, "method=lora", "train.max_steps=5", "train.lr=1e-2", "train.eval_steps=2",
               "train.eval_limit=6", "train.report_to=[tensorboard]")
    return cfg, run, train(cfg)


def test_eval_lines_every_eval_steps_and_at_the_end_equal_reference_loss(eval_run):
    cfg, run, res = eval_run
    train_lines, evals = _lines(run)
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in evals] == [2, 4, 5]  # every 2 steps, and the last step
    assert all(r["eval/examples"] == 6 and r["eval/reference_tokens"] > 0 for r in evals)
    # the last evaluation scored the final weights: a separate reference_loss on the artifact agrees
    nll, _ = _reference_nll(cfg, run, 6)
    assert evals[-1]["eval/ref_nll"] == pytest.approx(nll, rel=1e-6)
    assert evals[0]["eval/ref_nll"] != evals[-1]["eval/ref_nll"]  # the adapter trained in between
    summary = res["eval"]
    assert [p["step"] for p in summary["curve"]] == [2, 4, 5]
    assert summary["best_ref_nll"] == min(r["eval/ref_nll"] for r in evals)
    assert summary["best_step"] == min(evals, key=lambda r: r["eval/ref_nll"])["step"]
    assert summary["artifact_step"] == 5 and res["stopped"] == "completed"  # no early stopping: the last model
    assert json.loads((run / "results.json").read_text())["eval"] == summary


def test_held_out_loss_uses_the_runs_prompt_format(tiny_model_dir, tmp_path):
    """task.prompt_format=chat: the held-out examples are rendered with the chat template, as in training
    and in `tunelab eval`'s reference loss (which differs from the plain rendering's)."""
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, run, "method=lora", "train.max_steps=1", "train.eval_steps=1", "train.eval_limit=3",
               "task.prompt_format=chat")
    train(cfg)
    nll = _lines(run)[1][0]["eval/ref_nll"]
    assert nll == pytest.approx(_reference_nll(cfg, run, 3)[0], rel=1e-6)
    plain = _cfg(tiny_model_dir, run, "method=lora", "train.eval_limit=3")
    assert nll != pytest.approx(_reference_nll(plain, run, 3)[0], rel=1e-4)


def test_eval_scalars_reach_tensorboard_under_eval(eval_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run, _ = eval_run
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "eval/ref_nll" in tags and "train/loss" in tags
    assert [e.step for e in acc.Scalars("eval/ref_nll")] == [2, 4, 5]


def test_eval_fraction_rows_are_never_trained_on(tiny_model_dir, tmp_path):
    from tunelab.data.examples import held_out_examples, select_examples, split_held_out, training_indices
    from tunelab.train import Trainer

    cfg = _cfg(tiny_model_dir, tmp_path / "run", "method=lora", "data.limit=null", "data.train_fraction=0.02",
               "data.eval_fraction=0.05", "train.eval_steps=1", "train.eval_limit=null")
    trainer = Trainer(cfg)
    trainer.setup()
    held = {e.id for e in trainer.evaluator.examples}
    trained = {t.id for t in trainer.data}
    rows = len(trainer.task.examples("train", tokenizer=trainer.tokenizer, max_prompt_tokens=cfg.data.max_length - 8))
    assert len(held) == round(rows * 0.05) and trained and not held & trained
    assert "data.eval_fraction=0.05 of the training split" in trainer.evaluator.source
    trainer.selector.remove()
    # whatever train_fraction / limit keep, the held-out rows are the same and never among them
    data = cfg.data
    for fraction, limit in ((1.0, None), (0.5, None), (1.0, 7)):
        data.train_fraction, data.limit = fraction, limit
        kept = training_indices(100, data, seed=3)
        assert not set(kept) & set(split_held_out(100, 0.05, seed=3)[1])
    data.train_fraction, data.limit = 1.0, None
    assert sorted(training_indices(100, data, 3) + split_held_out(100, 0.05, 3)[1]) == list(range(100))
    # eval_fraction=0 keeps today's selection exactly
    data.eval_fraction, data.limit = 0.0, 5
    items, order = list(range(40)), list(range(40))
    random.Random(1).shuffle(order)
    assert select_examples(items, data, 1) == order[:5]
    assert held_out_examples(items, data, 1) == []


def test_early_stopping_stops_at_patience_and_the_artifact_is_the_best_model(tiny_model_dir, tmp_path):
    """A high lr on full fine-tuning: the held-out loss falls, then rises; 2 evaluations later training stops."""
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, run, "method=full", "train.lr=0.05", "train.max_steps=12", "train.eval_steps=1",
               "train.eval_limit=6", "train.early_stopping_patience=2", "train.keep_checkpoints=1")
    res = train(cfg)
    _, evals = _lines(run)
    nll = [r["eval/ref_nll"] for r in evals]
    best = min(range(len(nll)), key=nll.__getitem__)
    best_step = evals[best]["step"]
    assert res["stopped"] == "early_stopped"
    assert best_step < res["steps"] < 12, nll  # it rose before the end: a real stop
    assert res["steps"] == best_step + 2 and len(nll) == best + 3 and all(v >= nll[best] for v in nll[best:])
    assert res["eval"]["best_step"] == res["eval"]["artifact_step"] == best_step
    # the best step's checkpoint survives rotation (keep_checkpoints=1), next to the end state
    ckpts = [c.name for c in RunDir(run).checkpoints()]
    assert ckpts == [f"step-{best_step:06d}", f"step-{res['steps']:06d}"]
    artifact = load_file(str(run / "model" / "model.safetensors"))
    best_weights = load_file(str(run / "checkpoints" / ckpts[0] / "trainable.safetensors"))
    last_weights = load_file(str(run / "checkpoints" / ckpts[1] / "trainable.safetensors"))
    assert all(torch.equal(artifact[k], best_weights[k]) for k in best_weights)
    assert not all(torch.equal(artifact[k], last_weights[k]) for k in last_weights)
    assert _reference_nll(cfg, run, 6)[0] == pytest.approx(nll[best], rel=1e-6)


def test_early_stopping_resumed_after_a_crash_stops_at_the_same_step(tiny_model_dir, tmp_path):
    """The best loss and the count of evaluations without improvement come back from the checkpoint."""
    common = ["method=full", "train.lr=0.05", "train.max_steps=12", "train.eval_steps=1", "train.eval_limit=6",
              "train.early_stopping_patience=2"]
    full, part = tmp_path / "full", tmp_path / "part"
    ref = train(_cfg(tiny_model_dir, full, *common))
    stop = ref["steps"]
    train(_cfg(tiny_model_dir, part, *common, "train.save_steps=1", f"train.keep_checkpoints={stop}"))
    # a crash right after the step before the stop: its checkpoint is the newest left
    for name in ("model", "results.json", "tokenizer", f"checkpoints/step-{stop:06d}"):
        p = part / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    res = train(RunDir(part).config(), resume=True)
    assert res["stopped"] == "early_stopped" and res["steps"] == stop
    assert res["eval"]["curve"] == ref["eval"]["curve"] and res["eval"]["best_step"] == ref["eval"]["best_step"]
    a, b = (load_file(str(r / "model" / "model.safetensors")) for r in (full, part))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_eval_is_exact_and_eval_changes_no_training_number(tiny_model_dir, tmp_path):
    """Dropout 0.1: evaluation draws no random number, so the adapter equals a run without evaluation,
    and a run cut after its step-2 checkpoint resumes to the same adapter and the same eval lines."""
    common = ["method=lora", "train.max_steps=4", "train.lr=5e-3", "method.dropout=0.1", "train.eval_steps=1",
              "train.eval_limit=4"]
    plain, full, part = tmp_path / "plain", tmp_path / "full", tmp_path / "part"
    train(_cfg(tiny_model_dir, plain, *common[:-2]))
    train(_cfg(tiny_model_dir, full, *common))
    train(_cfg(tiny_model_dir, part, *common, "train.save_steps=2"))
    for name in ("adapter", "results.json", "tokenizer", "checkpoints/step-000004"):
        p = part / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    train(RunDir(part).config(), resume=True)
    adapters = [load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (plain, full, part)]
    for k in adapters[0]:
        assert torch.equal(adapters[0][k], adapters[1][k]), f"{k}: evaluation changed training"
        assert torch.equal(adapters[1][k], adapters[2][k]), f"{k}: resume is not exact"
    assert [r["loss"] for r in _lines(plain)[0]] == [r["loss"] for r in _lines(full)[0]]
    full_evals, part_evals = _lines(full)[1], _lines(part)[1]
    assert [r["step"] for r in part_evals] == [1, 2, 3, 4]
    assert [r["eval/ref_nll"] for r in part_evals] == [r["eval/ref_nll"] for r in full_evals]


def test_eval_generate_logs_the_task_metric(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    res = train(_cfg(tiny_model_dir, run, "method=lora", "train.max_steps=2", "train.eval_steps=2",
                     "train.eval_limit=2", "train.eval_generate=true", "eval.max_new_tokens=4"))
    _, evals = _lines(run)
    assert [r["step"] for r in evals] == [2]
    for key in ("eval/ref_nll", "eval/accuracy_strict", "eval/accuracy_flexible"):
        assert key in evals[0], evals[0]
    assert 0.0 <= evals[0]["eval/accuracy_strict"] <= 1.0 and "accuracy_strict" in res["eval"]["curve"][0]


def test_report_draws_loss_curves_per_run_and_overlaid(eval_run, tmp_path):
    from tunelab.experiments.report import write_report

    _, run, _ = eval_run
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    shutil.copytree(run, sweep / "a")
    shutil.copytree(run, sweep / "b")
    # the second point: its own curves (a real run's lines, shifted), so the overlay has two different lines
    lines = [json.loads(line) for line in (sweep / "b" / "metrics.jsonl").read_text().splitlines()]
    for r in lines:
        for k in ("loss", "eval/ref_nll"):
            if k in r:
                r[k] += 0.5
    (sweep / "b" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 9, "lo')
    out = write_report([sweep], tmp_path / "report")
    figs = {Path(f).name for f in out["figures"]}
    assert {"gsm8k-loss_curves.png", "gsm8k-loss-a.png", "gsm8k-loss-b.png"} <= figs, figs
    for name in ("gsm8k-loss_curves.png", "gsm8k-loss-a.png"):
        png = tmp_path / "report" / "figures" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    md = (tmp_path / "report" / "report.md").read_text()
    assert "figures/gsm8k-loss_curves.png" in md and "held-out ref_nll" in md
    from tunelab.experiments.report.curves import read_curves
    from tunelab.experiments.report.runs import load_run

    curves = read_curves(load_run(sweep / "b", []))  # the cut last line is skipped
    assert [s for s, _ in curves.held_out] == [2, 4, 5] and len(curves.train) == 5
    import csv

    with open(tmp_path / "report" / "results.csv") as fh:
        row = next(r for r in csv.DictReader(fh) if r["run"] == "a")
    best = json.loads((run / "results.json").read_text())["eval"]
    assert int(row["heldout_best_step"]) == best["best_step"] and row["stopped"] == "completed"
    assert float(row["heldout_best_ref_nll"]) == pytest.approx(best["best_ref_nll"])
    # a later report without run b drops b's figure
    shutil.rmtree(sweep / "b")
    write_report([sweep], tmp_path / "report")
    assert not (tmp_path / "report" / "figures" / "gsm8k-loss-b.png").exists()
    assert (tmp_path / "report" / "figures" / "gsm8k-loss-a.png").is_file()


def test_report_of_one_run_says_why_the_overlay_is_left_out(eval_run, tmp_path):
    from tunelab.experiments.report import write_report

    out = write_report([eval_run[1]], tmp_path / "report")
    assert any(Path(f).name == "gsm8k-loss-run.png" for f in out["figures"])
    assert "needs 2+ trained runs" in out["omitted"]["gsm8k:loss_curves"]


# ---- bad input ---------------------------------------------------------------------------------


def test_validation_names_every_eval_problem_and_its_fix(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError) as err:
        _cfg(tiny_model_dir, tmp_path / "r", "train.eval_steps=-1", "data.eval_fraction=1.0", "train.eval_limit=0",
             "train.early_stopping_patience=3", "train.eval_generate=true")
    text = str(err.value)
    assert "train.eval_steps must be >= 0" in text
    assert "data.eval_fraction must be in [0, 1)" in text
    assert "train.eval_limit must be a positive number" in text
    assert "train.early_stopping_patience=3 watches the held-out loss, which needs train.eval_steps > 0" in text
    assert "train.eval_generate=true generates at each eval step, which needs train.eval_steps > 0" in text
    with pytest.raises(ConfigError, match="data.eval_split is null with data.eval_fraction=0: set data.eval_fraction"):
        _cfg(tiny_model_dir, tmp_path / "r", "train.eval_steps=5", "data.eval_split=null")
    _cfg(tiny_model_dir, tmp_path / "r", "train.eval_steps=5", "train.early_stopping_patience=2")  # fine


def _jsonl_task(tmp_path, n_test: int | None):
    rows = [{"prompt": f"say {i}", "response": str(i)} for i in range(12)]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = [f"task.train_file={train_file}"]
    if n_test is not None:
        test_file = tmp_path / "test.jsonl"
        test_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:n_test]))
        extra.append(f"task.test_file={test_file}")
    return extra


def test_eval_steps_on_a_task_without_eval_split_names_eval_fraction(tiny_model_dir, tmp_path):
    from tunelab.train import Trainer

    cfg = _cfg(tiny_model_dir, tmp_path / "run", "task=jsonl", *_jsonl_task(tmp_path, None), "train.eval_steps=2")
    with pytest.raises(ConfigError, match=r"has no usable eval split 'test'.*data.eval_fraction=0.05"):
        Trainer(cfg).setup()
    # with a held-out fraction it trains and evaluates
    ok = _cfg(tiny_model_dir, tmp_path / "ok", "task=jsonl", *_jsonl_task(tmp_path, None), "train.eval_steps=2",
              "data.eval_fraction=0.25", "train.max_steps=2", "method=lora")
    res = train(ok)
    assert res["eval"]["examples"] == 3 and [p["step"] for p in res["eval"]["curve"]] == [2]


def test_eval_limit_above_the_split_uses_all_and_says_so(tiny_model_dir, tmp_path, caplog):
    from tunelab.models import load_tokenizer, materialize
    from tunelab.tasks import get_task
    from tunelab.train.evaluator import load_held_out

    cfg = _cfg(tiny_model_dir, tmp_path / "run", "task=jsonl", *_jsonl_task(tmp_path, 3), "train.eval_steps=2",
               "train.eval_limit=64")
    tok = load_tokenizer(cfg.model, materialize(cfg.model.name))
    with caplog.at_level("WARNING", logger="tunelab"):
        examples, _ = load_held_out(cfg, get_task("jsonl")(cfg.task), tok)
    assert len(examples) == 3
    assert "train.eval_limit=64 is more than the 3 held-out examples" in caplog.text


# ---- DDP and FSDP: 2 gloo ranks (real processes, as in tests/test_launch.py) ------------------------------


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_eval_equals_one_process(tiny_model_dir, tmp_path, monkeypatch, mode):
    """Each rank scores its shard of 5 held-out examples (3 and 2, batches of 2: rank 1 runs a filler
    batch) and the sums are all-reduced: the eval lines equal one process with the same global batch.
    Both generate (eval_generate): DDP each rank its share of the prompts, gathered; FSDP (full
    fine-tuning) all of them in lockstep on both ranks; the task metric equals one process's. FSDP's
    end checkpoint follows an evaluation with no backward after it (FSDP2 must reshard the root first)."""
    for k, v in {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1",
                 "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(k, v)
    method = ["method=lora", "method.dropout=0"] if mode == "ddp" else ["method=full"]
    method += ["train.eval_generate=true", "eval.max_new_tokens=4"]
    common = [f"model={tiny_model_dir}", "task=gsm8k", *method, "data.limit=8", "data.shuffle=false",
              "data.group_by_length=false", "train.max_steps=3", "model.device=cpu", "train.lr=1e-2",
              "train.eval_steps=2", "train.eval_limit=5", "eval.batch_size=2", "train.report_to=[]",
              "train.progress_bar=false"]
    two, one = tmp_path / mode, tmp_path / "one"
    log = tmp_path / f"{mode}.log"
    cmd = [sys.executable, "-m", "tunelab", "train", "--nproc", "2", *common, f"out={two}",
           f"train.parallelism={mode}", "train.batch_size=1", "train.grad_accum=2"]
    assert run_group(cmd, log, timeout=400, marker=str(two)) == 0, log.read_text()[-3000:]
    train(load_config(overrides=[*common, f"out={one}", "train.batch_size=4"]))
    d, o = _lines(two)[1], _lines(one)[1]
    assert [r["step"] for r in d] == [r["step"] for r in o] == [2, 3]
    assert [r["eval/reference_tokens"] for r in d] == [r["eval/reference_tokens"] for r in o]
    assert [r["eval/ref_nll"] for r in d] == pytest.approx([r["eval/ref_nll"] for r in o], rel=1e-5)
    assert o[0]["eval/ref_nll"] != o[1]["eval/ref_nll"]  # it trained between the two evaluations
    for key in ("eval/accuracy_strict", "eval/answer_format_rate"):
        assert [r[key] for r in d] == [r[key] for r in o]
    assert json.loads((two / "results.json").read_text())["eval"]["examples"] == 5

"""The acceptance commands end to end on the tiny model, and bad input with clear errors."""

import json
import os
import subprocess
import sys

import pytest


def tunelab(*args, cwd=None, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"tunelab {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_acceptance_commands(tiny_model_dir, tmp_path):
    run, base = tmp_path / "RUN", tmp_path / "BASE"
    tunelab("train", "task=gsm8k", "method=lora", "train.max_steps=2", "data.limit=16", f"out={run}", f"model={tiny_model_dir}")
    for name in ("config.yaml", "metrics.jsonl", "results.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "tokenizer/tokenizer.json"):
        assert (run / name).is_file(), name
    tunelab("eval", str(run), "eval.limit=8", "eval.max_new_tokens=24")
    res = json.loads((run / "eval" / "results.json").read_text())
    assert res["metrics"]["n"] == 8 and 0.0 <= res["metrics"]["accuracy_strict"] <= 1.0
    preds = [json.loads(l) for l in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and {"prompt", "completion", "extracted", "expected", "correct"} <= preds[0].keys()
    tunelab("eval", "--base", "task=gsm8k", "eval.limit=8", f"out={base}", f"model={tiny_model_dir}", "eval.max_new_tokens=8")
    assert json.loads((base / "eval" / "results.json").read_text())["method"] == "base"
    tunelab("merge", str(run))
    assert (run / "merged" / "model.safetensors").is_file() and (run / "merged" / "tokenizer.json").is_file()
    # the merged folder evaluates like any model folder
    tunelab("eval", str(run / "merged"), "eval.limit=2", "eval.max_new_tokens=8")
    assert (run / "merged" / "eval" / "results.json").is_file()


def test_help_lists_commands_and_documents_keys():
    out = tunelab("--help").stdout
    for cmd in ("train", "eval", "merge"):
        assert cmd in out
    train_help = tunelab("train", "--help").stdout
    assert "train.max_steps" in train_help and "method=lora" in train_help and "data.max_length" in train_help


@pytest.mark.parametrize(
    "args, message",
    [
        (["method=lorra"], "unknown method 'lorra'; did you mean 'lora'?"),
        (["task=gsm9k"], "unknown task 'gsm9k'; did you mean 'gsm8k'?"),
        (["model=smollm2-136m"], "unknown model 'smollm2-136m'; did you mean 'smollm2-135m'?"),
        (["model=/nonexistent/model.gguf"], "does not exist"),
        (["task.data_dir=/nonexistent/gsm8k"], "task.data_dir '/nonexistent/gsm8k' does not exist"),
    ],
)
def test_bad_input_clear_errors(args, message, tmp_path):
    proc = tunelab("train", "train.max_steps=1", f"out={tmp_path / 'r'}", *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_malformed_jsonl_names_file_and_line(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "resp\n')
    proc = tunelab("train", "task=jsonl", f"task.data_dir={data}", f"model={tiny_model_dir}", "train.max_steps=1",
                   f"out={tmp_path / 'r'}", check=False)
    assert proc.returncode == 1
    assert f"{data / 'train.jsonl'}:2: malformed JSON line" in proc.stderr


def test_jsonl_missing_field_lists_fields(tiny_model_dir, tmp_path):
    (tmp_path / "train.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    proc = tunelab("train", "task=jsonl", f"task.train_file={tmp_path / 'train.jsonl'}", f"model={tiny_model_dir}",
                   "train.max_steps=1", f"out={tmp_path / 'r'}", check=False)
    assert proc.returncode == 1 and "fields present: ['answer', 'question']" in proc.stderr


def test_empty_dataset_after_filtering(tiny_model_dir, tmp_path):
    proc = tunelab("train", "data.limit=4", "data.max_length=20", "data.overlong=drop", f"model={tiny_model_dir}",
                   "train.max_steps=1", f"out={tmp_path / 'r'}", check=False)
    assert proc.returncode == 1 and "no training examples left" in proc.stderr and "data.max_length" in proc.stderr


def test_jsonl_task_trains_and_evaluates(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"Say {w}", "response": w} for w in ["cat", "dog", "sun", "sea"] * 4]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    tunelab("train", "task=jsonl", f"task.data_dir={tmp_path}", f"model={tiny_model_dir}", "train.max_steps=2", f"out={run}")
    tunelab("eval", str(run), "eval.limit=4", "eval.max_new_tokens=4")
    assert json.loads((run / "eval" / "results.json").read_text())["metrics"]["n"] == 4


def test_refuses_to_overwrite_finished_run(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    tunelab("train", f"model={tiny_model_dir}", "train.max_steps=1", "data.limit=4", f"out={run}")
    proc = tunelab("train", f"model={tiny_model_dir}", "train.max_steps=1", "data.limit=4", f"out={run}", check=False)
    assert proc.returncode == 1 and "already holds a finished run" in proc.stderr


def test_eval_of_dir_without_model_says_what_it_holds(tmp_path):
    (tmp_path / "config.yaml").write_text("method: {name: lora}\n")
    proc = tunelab("eval", str(tmp_path), check=False)
    assert proc.returncode == 1 and "holds no trained adapter/" in proc.stderr

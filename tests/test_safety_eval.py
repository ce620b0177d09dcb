"""Issue 14 for eval / merge / generate / data: nothing a user owns is destroyed, every fault is a message.

Each test names the Why item of issue 14 it covers. The writers are checked by a snapshot of every
file (bytes included) of the folders they must not touch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tunelab.cli import main
from tunelab.config import ConfigError, load_config
from tunelab.rundir import RunDir
from tunelab.tasks import get_task
from tunelab.utils import read_jsonl


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def staging_left(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((".merged-", ".tmp")) or p.name.endswith(".old"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished LoRA run (1 step) on the tiny model."""
    from tunelab.train import train

    out = tmp_path_factory.mktemp("safety") / "RUN"
    train(load_config(overrides=[
        f"model={tiny_model_dir}", "task=gsm8k", "method=lora", "data.limit=4", "train.batch_size=4",
        "train.max_steps=1", "train.report_to=[]", "train.progress_bar=false", f"out={out}",
    ]))
    return out


def _cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(list(args))
    return rc, capsys.readouterr().err


# ---- merge --out (Why 2: data destroyed; Why 4: temp folders left behind) -------------------


def test_merge_out_is_never_the_run_or_its_own_folders(run, capsys):
    """Why 2: `merge --out RUN` hid the whole run as .RUN.old; its own folders are refused, --overwrite or not."""
    before = snapshot(run)
    for out in (run, run.parent, run / "adapter", run / "adapter" / "x", run / "tokenizer", run / "checkpoints" / "m",
                run / "eval"):
        for flags in ([], ["--overwrite"]):
            rc, err = _cli(capsys, "merge", str(run), "--out", str(out), *flags)
            assert rc == 1 and "tunelab merge: error: --out" in err and "a merge" in err, (out, flags, err)
    assert snapshot(run) == before
    assert staging_left(run.parent) == [] and staging_left(run) == []


def test_merge_out_keeps_what_it_did_not_write(run, tmp_path, capsys):
    """Why 2: `merge --out DIR` deleted whatever DIR held; now it refuses, and --overwrite replaces only its files."""
    from transformers import AutoModelForCausalLM

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    rc, err = _cli(capsys, "merge", str(run), "--out", str(mine))
    assert rc == 1 and "files tunelab did not write (notes.txt)" in err and "--overwrite" in err
    assert snapshot(mine) == {"notes.txt": b"my notes"}

    assert _cli(capsys, "merge", str(run), "--out", str(mine), "--overwrite")[0] == 0
    assert (mine / "notes.txt").read_text() == "my notes" and (mine / "model.safetensors").is_file()
    check = json.loads((mine / "merge_check.json").read_text())
    assert "model.safetensors" in check["files"] and "notes.txt" not in check["files"]
    AutoModelForCausalLM.from_pretrained(mine)
    # now a merged folder tunelab made: merging again needs no flag; an old shard of a merge goes, notes stay
    (mine / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    assert _cli(capsys, "merge", str(run), "--out", str(mine))[0] == 0
    assert not (mine / "model-00001-of-00002.safetensors").exists() and (mine / "notes.txt").is_file()
    assert staging_left(tmp_path) == []

    # weights a merge did not write would shadow the merge: refused even with --overwrite, nothing removed
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "pytorch_model.bin").write_bytes(b"someone's weights")
    rc, err = _cli(capsys, "merge", str(run), "--out", str(other), "--overwrite")
    assert rc == 1 and "holds model weights a merge did not write (pytorch_model.bin)" in err
    assert snapshot(other) == {"pytorch_model.bin": b"someone's weights"}


def test_merge_default_folder_twice_and_a_run_subfolder(run, capsys):
    """Why 2: RUN/merged (and a new name inside the run) stay allowed; a second merge replaces the first."""
    assert _cli(capsys, "merge", str(run))[0] == 0
    (run / "merged" / "keep.txt").write_text("x")
    assert _cli(capsys, "merge", str(run))[0] == 0
    assert (run / "merged" / "keep.txt").is_file() and (run / "merged" / "merge_check.json").is_file()
    assert RunDir(run / "merged").kind == "merged"
    assert _cli(capsys, "merge", str(run), "--out", str(run / "merged-fp32"))[0] == 0
    assert RunDir(run / "merged-fp32").kind == "merged"
    assert staging_left(run) == [] and (run / "adapter").is_dir()


def test_merge_failure_while_saving_leaves_no_temp_folder(run, tmp_path, monkeypatch, capsys):
    """Why 4: a failed save (disk full) left a .merged-* folder behind; now it is removed and --out untouched."""
    import errno

    from transformers import PreTrainedModel

    def full_disk(self, save_directory, **kwargs):
        (Path(save_directory) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    out = tmp_path / "merged"
    with pytest.raises(OSError, match="No space left"):
        from tunelab.merge import merge_run

        merge_run(RunDir(run).config(), run, out)
    assert not out.exists() and staging_left(tmp_path) == []


# ---- eval --base out=DIR (Why 2) -------------------------------------------------------------


def test_eval_base_refuses_a_trained_run_before_writing(run, tiny_model_dir, capsys):
    """Why 2: `eval --base out=RUN` replaced a trained run's config.yaml and wrote BASE before any check."""
    before = snapshot(run)
    for flags in ([], ["--overwrite"]):
        rc, err = _cli(capsys, "eval", "--base", *flags, "task=gsm8k", f"model={tiny_model_dir}", f"out={run}",
                       "eval.limit=1", "eval.max_new_tokens=2")
        assert rc == 1 and f"{run} is a training run" in err and f"tunelab eval {run}" in err
    assert snapshot(run) == before and not (run / "BASE").exists()


def test_eval_base_into_a_user_folder_needs_overwrite(tiny_model_dir, tmp_path, capsys):
    """Why 2: a folder holding a user's files is refused untouched; --overwrite keeps those files."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    args = ["eval", "--base", "task=gsm8k", f"model={tiny_model_dir}", f"out={out}", "eval.limit=1", "eval.max_new_tokens=2"]
    rc, err = _cli(capsys, *args)
    assert rc == 1 and "files tunelab did not write (notes.txt)" in err and "--overwrite" in err
    assert snapshot(out) == {"notes.txt": b"my notes"}
    assert _cli(capsys, *args[:2], "--overwrite", *args[2:])[0] == 0
    assert (out / "notes.txt").read_text() == "my notes" and RunDir(out).is_base and RunDir(out).is_evaluated
    assert _cli(capsys, *args)[0] == 0  # now a base evaluation tunelab made: evaluated again without the flag
    rc, err = _cli(capsys, "eval", str(out), "--overwrite")
    assert rc == 2 and "--overwrite only applies with --base or a model folder" in err


def test_eval_of_a_model_folder_keeps_the_users_eval_folder(tiny_model_dir, tmp_path, capsys):
    """A plain HF folder's eval/ holding the user's files is refused untouched; --overwrite keeps them."""
    import shutil

    folder = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "eval").mkdir()
    (folder / "eval" / "results.json").write_text('{"mine": true}')
    args = ["eval", str(folder), "task=gsm8k", "eval.limit=1", "eval.max_new_tokens=2"]
    before = snapshot(folder)
    rc, err = _cli(capsys, *args)
    assert rc == 1 and "holds files tunelab did not write (results.json)" in err and "--overwrite" in err
    assert snapshot(folder) == before
    (folder / "eval" / "results.json").unlink()
    (folder / "eval" / "notes.txt").write_text("my notes")
    assert _cli(capsys, *args[:2], "--overwrite", *args[2:])[0] == 0
    assert (folder / "eval" / "notes.txt").read_text() == "my notes"
    assert json.loads((folder / "eval" / "results.json").read_text())["kind"] == "eval"
    (folder / "eval" / "notes.txt").unlink()
    assert _cli(capsys, *args)[0] == 0  # only tunelab's own evaluation there now: evaluated again without the flag


# ---- generate --output FILE (Why 2) ----------------------------------------------------------


def test_generate_output_that_tunelab_did_not_write_is_left_untouched(run, tmp_path, capsys):
    """Why 2: `generate --output FILE` cut an unrelated file's last line before refusing it."""
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "question": "What is 2 + 3?"}) + "\n")
    notes = tmp_path / "notes.jsonl"
    for content in (b"my notes\nthe last line has no newline", b'{"id": "a", "completion": "mine"}\n{"id": "b", "comp'):
        notes.write_bytes(content)
        rc, err = _cli(capsys, "generate", str(run), "--input", str(inp), "--output", str(notes), "--no-progress")
        assert rc == 1 and "is not a tunelab generate output" in err and "left untouched" in err and "--overwrite" in err
        assert notes.read_bytes() == content
    folder = tmp_path / "a-folder"
    folder.mkdir()
    rc, err = _cli(capsys, "generate", str(run), "--input", str(inp), "--output", str(folder), "--no-progress")
    assert rc == 1 and "is a folder" in err
    rc, _ = _cli(capsys, "generate", str(run), "--input", str(inp), "--output", str(notes), "--overwrite",
                 "--max-new-tokens", "2", "--no-progress")
    assert rc == 0 and [r["id"] for r in read_jsonl(notes)] == ["a"]


# ---- JSONL data (Why 3: silently wrong; Why 4: no file or line) ----------------------------


def _jsonl_task(*overrides: str):
    cfg = load_config(overrides=["task=jsonl", *overrides])
    return get_task("jsonl")(cfg.task)


def test_jsonl_null_or_non_string_fields_are_rejected_with_file_and_line(tmp_path):
    """Why 3: a JSONL `"response": null` trained on the string 'None'; now every such row names file:line."""
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "Say cat", "response": "cat"}\n\n{"prompt": "Say dog", "response": null}\n'
                    '{"prompt": 7, "response": "seven"}\n{"prompt": "x", "response": ["a"]}\n')
    with pytest.raises(ValueError) as err:
        _jsonl_task(f"task.train_file={path}").examples("train")
    msg = str(err.value)
    assert "3 row(s)" in msg
    assert f"{path}:3: field 'response' is null, not a string" in msg
    assert f"{path}:4: field 'prompt' is a number, not a string" in msg
    assert f"{path}:5: field 'response' is an array, not a string" in msg


@pytest.mark.parametrize("task, overrides, row, message", [
    ("gsm8k", [], {"question": "How many?", "answer": 72}, "field 'answer' is int, not a string"),
    ("summarization", ["task.bertscore=false"], {"id": "1", "article": {"text": "a"}, "summary": "s"},
     "field 'article' (task.article_field) is dict, not a string"),
])
def test_other_tasks_reject_a_field_of_the_wrong_type_with_file_and_line(tmp_path, task, overrides, row, message):
    """Why 4: a number where GSM8K expects text was a TypeError traceback; now a message with file:line."""
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    cfg = load_config(overrides=[f"task={task}", f"task.data_dir={tmp_path}", *overrides])
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'train.jsonl'}:1: {message}")):
        get_task(task)(cfg.task).examples("train")


def test_non_utf8_jsonl_names_file_and_line(tmp_path, capsys):
    """Why 4: a non-UTF-8 JSONL named no file or line."""
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(ValueError, match=f"{path}:2: not UTF-8 text \\(byte 0xe9 at byte 16 of the line\\)"):
        read_jsonl(path)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\n')
    assert read_jsonl(bom) == [{"prompt": "a", "response": "b"}]
    rc, err = _cli(capsys, "train", "task=jsonl", f"task.train_file={path}", "train.max_steps=1", f"out={tmp_path / 'r'}")
    assert rc == 1 and f"{path}:2: not UTF-8 text" in err


def test_jsonl_prompt_field_is_used(tmp_path):
    """Why 3: `task.prompt_field` of task=jsonl was never read (the prompt was always the 'prompt' field)."""
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"q": "What is 2 + 2?", "a": "4"}) + "\n")
    task = _jsonl_task(f"task.train_file={path}", "task.prompt_field=q", "task.response_field=a")
    (ex,) = task.examples("train")
    assert (ex.prompt, ex.response) == ("What is 2 + 2?\n", "4")
    assert task.input_fields == ("q",) and task.format_input("Hi?") == "Hi?\n"
    # an explicit template wins, and one that leaves the prompt field out is refused with the fix
    assert _jsonl_task(f"task.train_file={path}", 'task.template="Q: {q}\\nA:"', "task.response_field=a") \
        .examples("train")[0].prompt == "Q: What is 2 + 2?\nA:"
    with pytest.raises(ConfigError, match="task.prompt_field=q is not a placeholder of task.template"):
        _jsonl_task(f"task.train_file={path}", "task.prompt_field=q", 'task.template="{prompt}\\n"')


# ---- compare and the Hub (Why 4: faults without a message) -----------------------------------


def _fake_eval(folder: Path, task: str = "gsm8k", rows=None) -> Path:
    (folder / "eval").mkdir(parents=True)
    (folder / "eval" / "results.json").write_text(json.dumps({"task": task, "split": "test"}))
    rows = rows if rows is not None else [{"id": str(i), "correct": i % 2 == 0, "correct_flexible": True} for i in range(6)]
    (folder / "eval" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_compare_bad_arguments_end_in_a_message(tmp_path, capsys):
    """Why 4: `compare --resamples 0` ended in an IndexError traceback."""
    from tunelab.evaluation.metrics import paired_bootstrap
    from tunelab.experiments.report import compare_evals

    a, b = _fake_eval(tmp_path / "A"), _fake_eval(tmp_path / "B")
    for flags, message in ((["--resamples", "0"], "--resamples must be >= 1"),
                           (["--resamples", "-3"], "--resamples must be >= 1"),
                           (["--seed", "-1"], "--seed must be >= 0"),
                           (["--json", str(tmp_path)], "is a folder: give a file name")):
        rc, err = _cli(capsys, "compare", str(a), str(b), *flags)
        assert rc == 2 and message in err, (flags, err)
    with pytest.raises(ValueError, match="resamples must be a whole number >= 1, got 0"):
        compare_evals(a, b, n_resamples=0)
    with pytest.raises(ValueError, match="n_resamples must be >= 1"):
        paired_bootstrap([1.0, 2.0], [2.0, 3.0], n_resamples=0)
    assert _cli(capsys, "compare", str(a), str(b), "--resamples", "10")[0] == 0
    # a broken evaluation names its file
    (b / "eval" / "results.json").write_text("{not json")
    rc, err = _cli(capsys, "compare", str(a), str(b))
    assert rc == 1 and f"{b / 'eval' / 'results.json'} is not valid JSON" in err
    c = _fake_eval(tmp_path / "C", rows=[{"id": "0", "correct": True}, {"correct": False}])
    rc, err = _cli(capsys, "compare", str(a), str(c))
    assert rc == 1 and f"{c / 'eval' / 'predictions.jsonl'}:2: no 'id' field" in err


@pytest.mark.parametrize("task, overrides", [("gsm8k", []), ("summarization", ["task.bertscore=false"]),
                                             ("news_summary", ["task.bertscore=false"])])
@pytest.mark.parametrize("hub_id", ["nobody/no-such-dataset", "a/b/c", ""])
def test_unknown_hub_dataset_offline_names_what_to_set(task, overrides, hub_id, monkeypatch):
    """Why 4: an unknown Hub id offline ended in a traceback (IndexError for '') or named no fix ('a/b/c')."""
    monkeypatch.delenv("TUNELAB_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    over = [f"task={task}", f"task.hub_id={hub_id}", *overrides]
    if task == "summarization" and not hub_id:  # no source at all: caught when the config is read
        with pytest.raises(ConfigError, match="task.data_dir=FOLDER"):
            load_config(overrides=over)
        return
    cfg = load_config(overrides=over)
    with pytest.raises(FileNotFoundError) as err:
        get_task(task)(cfg.task).load_rows("train")
    msg = str(err.value)
    assert "task.data_dir" in msg, msg
    if task != "summarization":  # the generic task has no folder of its own under $TUNELAB_DATA_DIR
        assert "TUNELAB_DATA_DIR" in msg, msg
    if hub_id:
        assert f"'{hub_id}'" in msg, msg

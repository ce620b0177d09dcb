"""Training never destroys what a user owns, never saves a broken state as good, and ends every fault in a message.

Each test names the Why item of issue 14 it covers.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import ConfigError, load_config
from tunelab.methods.base import Callback
from tunelab.registry import METHODS
from tunelab.rundir import RunDir
from tunelab.train import TrainingDiverged, train


def _cfg(model_dir, out, *extra):
    return load_config(overrides=[
        f"model={model_dir}", "task=gsm8k", "method=lora", "data.limit=8", "data.max_length=64", "train.batch_size=2",
        "train.lr=5e-3", "train.report_to=[]", "train.progress_bar=false", f"out={out}", *extra,
    ])


def _adapter(run) -> dict[str, torch.Tensor]:
    return load_file(str(RunDir(run).path / "adapter" / "adapter_model.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- 2. nothing a user owns is overwritten -------------------------------------------------------


def test_train_refuses_a_folder_with_the_users_files(tiny_model_dir, tmp_path):
    out = tmp_path / "mine"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "notes.txt").write_text("my notes")
    (out / "config.yaml").write_text("my: own file\n")  # not a tunelab config: no marker, no run layout
    (out / "results.json").unlink(missing_ok=True)
    with pytest.raises(FileExistsError, match="--overwrite"):
        train(_cfg(tiny_model_dir, out, "train.max_steps=1"))
    assert (out / "config.yaml").read_text() == "my: own file\n"
    assert (out / "adapter" / "notes.txt").read_text() == "my notes"


def test_train_with_overwrite_keeps_the_users_unrelated_files(tiny_model_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    res = train(_cfg(tiny_model_dir, out, "train.max_steps=1"), overwrite=True)
    assert res["steps"] == 1 and (out / "notes.txt").read_text() == "my notes"


def test_train_refuses_a_base_evaluation_folder(tiny_model_dir, tmp_path):
    base = RunDir(tmp_path / "BASE")
    base.write_config(load_config(overrides=[f"model={tiny_model_dir}"]))
    base.mark_base()
    with pytest.raises(FileExistsError, match="base-model evaluation"):
        train(_cfg(tiny_model_dir, base.path, "train.max_steps=1"))
    assert not base.is_trained


# ---- 3. silently wrong: divergence, resume, parse-time numbers -----------------------------------


class _PoisonGradients(Callback):
    """Turns one gradient into NaN before the optimizer step of ``at_step`` (0-based): a bad update."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_before_optimizer_step(self, state, model, optimizer):
        if state.step == self.at_step:
            p = next(p for g in optimizer.param_groups for p in g["params"] if p.grad is not None)
            p.grad[0].fill_(float("nan"))


@pytest.fixture()
def poisoned_lora(monkeypatch):
    lora = METHODS.get("lora")

    class Poisoned(lora):
        def callbacks(self):
            return [*super().callbacks(), _PoisonGradients(at_step=2)]

    real_get = METHODS.get
    monkeypatch.setattr(METHODS, "get", lambda name: Poisoned if name == "lora" else real_get(name))


def test_divergence_saves_the_state_before_the_bad_update(tiny_model_dir, tmp_path, poisoned_lora):
    run = RunDir(tmp_path / "run")
    with pytest.raises(TrainingDiverged, match=r"gradient norm became nan at optimizer step 3.*last good state \(step 2\)"):
        train(_cfg(tiny_model_dir, run.path, "train.max_steps=6", "train.save_steps=1", "train.keep_checkpoints=5"))
    saved = load_file(str(run.checkpoint_path(2) / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert not run.checkpoint_path(3).exists() and not run.is_trained


def test_finished_run_resumes_only_with_more_steps_and_then_equals_one_longer_run(tiny_model_dir, tmp_path):
    common = ["train.lr_scheduler=constant", "method.dropout=0"]
    longer = tmp_path / "longer"
    train(_cfg(tiny_model_dir, longer, "train.max_steps=6", *common))
    run = RunDir(tmp_path / "run")
    first = train(_cfg(tiny_model_dir, run.path, "train.max_steps=4", *common))
    with pytest.raises(FileExistsError, match="finished run of 4 steps.*train.max_steps=8"):
        train(run.config(), resume=True)
    assert run.results() == first  # untouched
    res = train(run.config(["train.max_steps=6"]), resume=True)
    assert res["steps"] == 6
    _assert_same(_adapter(longer), _adapter(run.path))
    assert [json.loads(line)["step"] for line in run.metrics_file.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_resume_without_a_checkpoint_starts_over_with_a_clean_metrics_log(tiny_model_dir, tmp_path):
    run = RunDir(tmp_path / "run")
    cfg = _cfg(tiny_model_dir, run.path, "train.max_steps=2")
    run.write_config(cfg)
    run.metrics_file.write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n{"step": 3, "loss": 7.0}\n')
    res = train(run.config(), resume=True)
    assert res["steps"] == 2
    lines = [json.loads(line) for line in run.metrics_file.read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and all(r["loss"] != 9.0 for r in lines)


def test_non_finite_numbers_are_refused_at_parse_time():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.lr=nan", "train.epochs=inf", "train.max_grad_norm=-inf"])
    assert len(err.value.problems) == 3 and all("finite" in p for p in err.value.problems)


def test_resumed_run_counts_the_tokens_of_the_whole_run(tiny_model_dir, tmp_path):
    full = train(_cfg(tiny_model_dir, tmp_path / "full", "train.max_steps=4"))
    part = RunDir(tmp_path / "part")
    train(_cfg(tiny_model_dir, part.path, "train.max_steps=4", "train.save_steps=2"))
    for p in (part.path / "adapter", part.results_file, part.checkpoint_path(4)):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    res = train(part.config(), resume=True)
    assert res["train_tokens"] == full["train_tokens"] and res["train_time_s"] > 0


# ---- 4. faults end in a message, nothing trained is lost -----------------------------------------


def test_save_steps_0_still_leaves_a_resumable_checkpoint_at_the_end(tiny_model_dir, tmp_path):
    run = RunDir(tmp_path / "run")
    train(_cfg(tiny_model_dir, run.path, "train.max_steps=3", "train.save_steps=0"))
    assert [c.name for c in run.checkpoints()] == ["step-000003"]


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(tiny_model_dir, tmp_path, caplog):
    full = tmp_path / "full"
    train(_cfg(tiny_model_dir, full, "train.max_steps=4"))
    run = RunDir(tmp_path / "run")
    train(_cfg(tiny_model_dir, run.path, "train.max_steps=4", "train.save_steps=2"))
    for p in (run.path / "adapter", run.results_file):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    damaged = run.checkpoint_path(4) / "trainable.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated mid-write by a crash
    res = train(run.config(), resume=True)
    assert res["steps"] == 4
    assert str(damaged) in caplog.text and "falling back" in caplog.text
    _assert_same(_adapter(full), _adapter(run.path))


def test_disk_full_during_a_checkpoint_is_one_message_and_keeps_the_previous(tiny_model_dir, tmp_path, monkeypatch):
    import tunelab.train.checkpoint as checkpoint

    real_save, calls = checkpoint.Checkpointer._write, []

    def full_disk_on_second(self, staging, *args):
        calls.append(staging)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(staging / "trainable.safetensors"))
        return real_save(self, staging, *args)

    monkeypatch.setattr(checkpoint.Checkpointer, "_write", full_disk_on_second)
    run = RunDir(tmp_path / "run")
    with pytest.raises(checkpoint.SaveFailed, match=r"no space left on .*step-000002 is intact"):
        train(_cfg(tiny_model_dir, run.path, "train.max_steps=6", "train.save_steps=2"))
    assert [c.name for c in run.checkpoints()] == ["step-000002"]
    assert not list(run.checkpoints_root.glob(".tmp-*"))  # the failed staging folder is gone


def test_disk_full_at_the_final_save_names_the_intact_checkpoint(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from tunelab.cli import main

    lora = METHODS.get("lora")

    def no_space(self, model, out_dir):
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "adapter_model.safetensors"))

    monkeypatch.setattr(lora, "save_artifact", no_space)
    run = tmp_path / "run"
    rc = main(["train", *[o for o in _overrides(tiny_model_dir, run)], "train.max_steps=2"])
    err = capsys.readouterr().err
    assert rc == 1 and "no space left on" in err and "step-000002 is intact" in err and "Traceback" not in err
    assert not list(run.glob(".artifact-*"))
    assert [c.name for c in RunDir(run).checkpoints()] == ["step-000002"]


def _overrides(model_dir, out):
    return [f"model={model_dir}", "task=gsm8k", "method=lora", "data.limit=8", "data.max_length=64",
            "train.batch_size=2", "train.report_to=[]", "train.progress_bar=false", f"out={out}"]


def test_staging_folders_of_a_killed_process_are_removed_on_resume(tiny_model_dir, tmp_path):
    run = RunDir(tmp_path / "run")
    train(_cfg(tiny_model_dir, run.path, "train.max_steps=2", "train.save_steps=1"))
    (run.checkpoints_root / ".tmp-abc123").mkdir()  # what kill -9 during a checkpoint leaves
    (run.path / ".artifact-xyz").mkdir()
    run.results_file.unlink()
    train(run.config(["train.max_steps=3"]), resume=True)
    assert not list(run.checkpoints_root.glob(".tmp-*")) and not list(run.path.glob(".artifact-*"))


def test_unknown_hub_model_offline_is_a_message(tmp_path, capsys, monkeypatch):
    from tunelab.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["train", "model=nobody/no-such-model-xyz", "data.limit=2", "train.max_steps=1", f"out={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert rc == 1 and "HF_HUB_OFFLINE=1" in err and "model=/path/to/model" in err and "Traceback" not in err


def test_an_unexpected_error_prints_a_line_and_where_the_traceback_is(tmp_path, capsys, monkeypatch):
    import tunelab.cli.train as train_cli
    from tunelab.cli import main

    def broken(args):
        return 1 / 0

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(train_cli, "cmd_train", broken)
    assert main(["train"]) == 1
    err = capsys.readouterr().err
    assert "unexpected error: ZeroDivisionError" in err and "Traceback" not in err
    written = list((tmp_path / "cache" / "errors").glob("tunelab-train-*.txt"))
    assert len(written) == 1 and "ZeroDivisionError" in written[0].read_text()
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "train"])


# ---- 6. files respect the umask ------------------------------------------------------------------


def test_run_files_respect_the_umask(tiny_model_dir, tmp_path):
    old = os.umask(0o022)
    try:
        run = RunDir(tmp_path / "run")
        train(_cfg(tiny_model_dir, run.path, "train.max_steps=1"))
    finally:
        os.umask(old)
    for path in (run.config_file, run.results_file, run.path / "adapter" / "adapter_model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    for path in (run.path / "adapter", run.checkpoint_path(1)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path


def test_gguf_cache_is_keyed_by_content(tmp_path, monkeypatch):
    from tunelab.models import content_hash

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for path, byte in ((a, b"\x01"), (b, b"\x02")):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + byte * 1000)  # same name, same size, different content
    assert content_hash(a) != content_hash(b)
    a.write_bytes(b"GGUF" + b"\x02" * 1000)  # rewritten in place: the remembered hash must not be reused
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 1_000_000))
    assert content_hash(a) == content_hash(b)

"""Sweeps and reports never destroy what a user owns, and their faults end in a message that names the fix.

Issue 14: Why 2 (a sweep wiped a point folder holding the user's files; a report wrote into any
folder), Why 4 (faults without a message, temp folders left behind), Why 6 (files respect the umask).
"""

from __future__ import annotations

import io
import json
import os
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tunelab.cli import main
from tunelab.config import ConfigError, RunConfig, config_to_dict
from tunelab.experiments import load_sweep, pending_indices, point_status, run_sweep
from tunelab.experiments.report import write_report
from tunelab.experiments.runner import _move_aside
from tunelab.experiments.stages import Stage, failure_line, run_stage
from tunelab.rundir import MARKER_FILE, NotOurs


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes): what must not change."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def sweep_file(tmp_path: Path, model: Path, point: str = "{method.rank: 4}") -> Path:
    f = tmp_path / "s.yaml"
    f.write_text(textwrap.dedent(f"""
        name: safety
        out_dir: {tmp_path / 'runs'}
        base:
          model: {model}
          task: gsm8k
          method: {{name: lora}}
          data: {{limit: 8}}
          train: {{max_steps: 1, progress_bar: false, report_to: []}}
        eval: {{limit: 2, max_new_tokens: 4}}
        points:
          - {point}
    """))
    return f


# --------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------


def test_a_point_folder_holding_user_files_is_blocked_and_left_untouched(tmp_path, tiny_model_dir):
    """Why 2: a folder without config.yaml was called "pending" and wiped; now the point is blocked with the fix."""
    sweep = load_sweep(sweep_file(tmp_path, tiny_model_dir))
    (point,) = sweep.points
    (point.run_dir / "data").mkdir(parents=True)
    (point.run_dir / "notes.txt").write_text("my notes\n")
    (point.run_dir / "data" / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    before = snapshot(point.run_dir)

    st = point_status(sweep, point)
    assert st.state == "conflict"
    assert "files tunelab did not write (data, notes.txt)" in st.detail and "--out-dir DIR" in st.detail
    assert pending_indices(sweep) == []  # a job array does not get it either
    said: list[str] = []
    summary = run_sweep(sweep, in_process=True, say=said.append)
    assert summary.counts["conflict"] == 1 and summary.failed == [point]
    assert any("not run: blocked:" in line and "move those files away" in line for line in said), said
    assert snapshot(point.run_dir) == before  # nothing written (no marker, no bookkeeping), nothing removed

    # a file where the point's folder would go: blocked too, not an OSError
    point.run_dir.joinpath("notes.txt").unlink()
    point.run_dir.joinpath("data", "train.jsonl").unlink()
    point.run_dir.joinpath("data").rmdir()
    point.run_dir.rmdir()
    point.run_dir.write_text("a file\n")
    st = point_status(sweep, point)
    assert st.state == "conflict" and "is a file, not a folder" in st.detail
    assert run_sweep(sweep, in_process=True, say=said.append).counts["conflict"] == 1
    assert point.run_dir.read_text() == "a file\n"


def test_a_point_started_over_removes_only_what_training_wrote(tmp_path, tiny_model_dir):
    """Why 2 (a restarted point deleted every file but the sweep's own) and Why 6 (bookkeeping respects the umask)."""
    f = sweep_file(tmp_path, tiny_model_dir, "{method.rank: 4, task.data_dir: /nonexistent/gsm8k}")
    sweep = load_sweep(f)
    (point,) = sweep.points
    with umask(0o002):
        assert run_sweep(sweep, in_process=True, say=lambda *_: None).counts["failed"] == 1
    run = point.run_dir
    assert json.loads((run / MARKER_FILE).read_text())["kind"] == "run"  # claimed as the run `tunelab train` makes
    for name in ("sweep_point.json", "sweep_config.yaml", "FAILED", MARKER_FILE):
        assert mode(run / name) == 0o664, name

    # what the user put there, and what an attempt that left no checkpoint wrote
    (run / "notes.txt").write_text("mine\n")
    (run / "analysis").mkdir()
    (run / "analysis" / "plot.py").write_text("print(1)\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "tokenizer.json").write_text("{}")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_text("partial")
    (run / "checkpoints" / "step-000001").mkdir(parents=True)  # incomplete: no state.json
    (run / ".artifact-x1").mkdir()
    assert point_status(sweep, point).state == "failed"
    assert run_sweep(sweep, in_process=True, say=lambda *_: None).counts["failed"] == 1
    left = {p.name for p in run.iterdir()}
    assert {"notes.txt", "analysis"} <= left and (run / "analysis" / "plot.py").read_text() == "print(1)\n"
    assert not left & {"metrics.jsonl", "tokenizer", "adapter", "checkpoints", ".artifact-x1"}, left


def test_superseded_folders_never_land_inside_one_another(tmp_path, monkeypatch):
    """Why 2: a third superseded run within the same second was moved *into* the second one."""
    monkeypatch.setattr(time, "strftime", lambda *_a, **_k: "20260101-000000")
    dest = tmp_path / ".superseded"
    moved = []
    for i in range(3):
        src = tmp_path / "point"
        src.mkdir()
        (src / "which").write_text(str(i))
        moved.append(_move_aside(src, dest, "abcd1234"))
    assert len(set(moved)) == 3 and sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in moved)
    assert [(p / "which").read_text() for p in moved] == ["0", "1", "2"]
    assert all(sorted(c.name for c in p.iterdir()) == ["which"] for p in moved)


def test_sweep_os_errors_end_in_a_message(tmp_path, tiny_model_dir, capsys):
    """Why 4: an out_dir that cannot be written gave a raw OSError traceback."""
    f = sweep_file(tmp_path, tiny_model_dir)
    blocker = tmp_path / "a-file"
    blocker.write_text("x\n")
    assert main(["sweep", str(f), "--in-process", "--out-dir", str(blocker / "runs")]) == 1
    err = capsys.readouterr().err
    assert "tunelab sweep: error: cannot write" in err and "--out-dir DIR" in err and "Traceback" not in err
    assert blocker.read_text() == "x\n"


# --------------------------------------------------------------------------------------------
# Stage faults: one line that names the fix, in either executor
# --------------------------------------------------------------------------------------------


def _raise(exc: Exception):
    def call():
        raise exc
    return call


def test_stage_faults_end_in_one_line_that_names_the_fix(tmp_path):
    """Why 4: a config error's FAILED line said only "1 problem(s) in the configuration:" (not the problem);
    a killed stage said nothing."""
    log = io.BytesIO()
    problem = "train.lr must be > 0: set train.lr=1e-4"
    rc, text = run_stage(Stage("train", ["train"], _raise(ConfigError([problem]))), log, in_process=True, echo=False)
    assert rc == 2 and problem in failure_line(rc, text)
    fix = f"{tmp_path} already holds files tunelab did not write: choose another folder"
    rc, text = run_stage(Stage("train", ["train"], _raise(NotOurs(fix))), log, in_process=True, echo=False)
    assert rc == 1 and failure_line(rc, text) == f"NotOurs: {fix}"
    # the same config error from a fresh `python -m tunelab` process
    rc, text = run_stage(Stage("train", ["train", "train.lr=-1", f"out={tmp_path / 'r'}"], lambda: None), log,
                         in_process=False, echo=False)
    line = failure_line(rc, text)
    assert rc == 2 and line.startswith("tunelab train: 1 problem(s)") and "train.lr must be > 0" in line, line
    assert not (tmp_path / "r").exists()
    killed = failure_line(-9, "[tunelab] step 3/10\n")
    assert "killed by SIGKILL" in killed and "out-of-memory" in killed and "run the sweep again" in killed


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def make_run(root: Path, name: str, quality: float = 0.3) -> Path:
    """A minimal trained and evaluated run directory."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    cfg = config_to_dict(RunConfig())
    cfg.update(out=str(run), seed=1)
    cfg["method"] = {"name": "lora", "rank": 8, "alpha": 16.0}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (run / "results.json").write_text(json.dumps({"schema_version": 1, "kind": "train", "trainable_params": 10,
                                                  "total_params": 100, "train_time_s": 1.0, "steps": 1}))
    (run / "eval" / "results.json").write_text(json.dumps({
        "schema_version": 1, "kind": "eval", "task": "gsm8k", "method": "lora", "split": "test",
        "metrics": {"accuracy_strict": quality, "n": 4}, "primary_metric": "accuracy_strict"}))
    return run


def test_report_writes_only_into_its_own_folder(tmp_path, capsys):
    """Why 2: `report --out DIR` wrote into any folder; now only a new/empty or report folder, or --overwrite.
    Why 6: the report's files respect the umask."""
    runs = tmp_path / "runs"
    make_run(runs, "a")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    (out / "report.md").write_text("my own report.md\n")
    before = snapshot(out)
    assert main(["report", str(runs), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "holds files tunelab did not write (notes.txt, report.md)" in err and "--overwrite" in err
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["notes.txt", "report.md"]

    with umask(0o002):
        assert main(["report", str(runs), "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine\n"  # only the report's own files are replaced
    assert "# tunelab report" in (out / "report.md").read_text()
    assert mode(out / "report.md") == mode(out / "results.csv") == mode(out / MARKER_FILE) == 0o664
    assert mode(out / "figures") == 0o775 and mode(next((out / "figures").iterdir())) == 0o664
    assert main(["report", str(runs), "--out", str(out)]) == 0  # now a report folder tunelab made
    assert not list(out.glob(".report-*"))

    # a run directory is not a report folder; a report written before the marker existed is one
    assert main(["report", str(runs), "--out", str(runs / "a")]) == 1
    assert "already holds a training run" in capsys.readouterr().err
    assert not (runs / "a" / "report.md").exists() and not (runs / "a" / MARKER_FILE).exists()
    legacy = tmp_path / "legacy"
    write_report([runs], legacy)
    (legacy / MARKER_FILE).unlink()
    assert main(["report", str(runs), "--out", str(legacy)]) == 0


def test_a_failed_report_leaves_no_folder_and_keeps_the_previous_report(tmp_path, capsys):
    """Why 4: a failing report left its folder (and half its figures) behind; temp folders are removed."""
    runs = tmp_path / "runs"
    make_run(runs, "a")
    new = tmp_path / "new"
    assert main(["report", str(runs), "--out", str(new), "--metric", "gsm8k=nonesuch"]) == 1
    assert "no run of gsm8k has that metric" in capsys.readouterr().err
    assert not new.exists()

    out = tmp_path / "rep"
    write_report([runs], out)
    before = snapshot(out)
    with pytest.raises(ValueError, match="no run of gsm8k has that metric"):
        write_report([runs], out, {"gsm8k": "nonesuch"})
    assert snapshot(out) == before and not list(out.glob(".report-*"))

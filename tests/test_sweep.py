"""Sweeps: expansion and naming, bad sweep files, skip / resume / failure handling, end to end."""

from __future__ import annotations

import fcntl
import json
import textwrap
from pathlib import Path

import pytest

from tunelab.cli import main
from tunelab.experiments import (
    SweepError,
    load_sweep,
    pending_indices,
    point_command,
    point_status,
    run_sweep,
)

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def quiet(*_args, **_kw) -> None:
    pass


# --------------------------------------------------------------------------------------------
# Expansion and naming (no training)
# --------------------------------------------------------------------------------------------


def test_grid_points_seeds_and_baseline_expand_to_named_validated_points(tmp_path):
    f = write(tmp_path / "study.yaml", """
        base:
          task: gsm8k
          method: {name: lora, alpha: 32, dropout: 0.1}
          train: {max_steps: 2, lr: 1.0e-3}
        grid:
          method.rank: [4, 16]
          data.train_fraction: [0.5, 1]
        points:
          - {method: full}
          - {method: galore, method.rank: 8}
        seeds: [1, 2]
        eval: {limit: 4, eval.max_new_tokens: 8}
        baseline: true
    """)
    sweep = load_sweep(f)
    names = [p.name for p in sweep.points]
    assert names == [
        "gsm8k-base",
        "gsm8k-lora-rank4-frac0.5-seed1", "gsm8k-lora-rank4-frac0.5-seed2",
        "gsm8k-lora-rank4-frac1-seed1", "gsm8k-lora-rank4-frac1-seed2",
        "gsm8k-lora-rank16-frac0.5-seed1", "gsm8k-lora-rank16-frac0.5-seed2",
        "gsm8k-lora-rank16-frac1-seed1", "gsm8k-lora-rank16-frac1-seed2",
        "gsm8k-full-seed1", "gsm8k-full-seed2",
        "gsm8k-galore-rank8-seed1", "gsm8k-galore-rank8-seed2",
    ]
    assert [p.index for p in sweep.points] == list(range(13))
    assert sweep.out_dir == Path("runs/study") and sweep.points[3].run_dir == Path("runs/study/gsm8k-lora-rank4-frac1-seed1")
    lora = sweep.points[5].config
    assert (lora["method"]["rank"], lora["method"]["alpha"], lora["method"]["dropout"]) == (16, 32.0, 0.1)
    assert lora["data"]["train_fraction"] == 0.5 and lora["seed"] == 1 and lora["train"]["lr"] == 1e-3
    assert lora["eval"]["limit"] == 4 and lora["eval"]["max_new_tokens"] == 8
    # switching method starts the method section afresh: lora's alpha does not leak into full
    assert sweep.points[9].config["method"] == {"name": "full", "freeze_embeddings": False}
    assert sweep.points[11].config["method"]["rank"] == 8
    assert sweep.points[0].kind == "base" and sweep.points[0].method == "base"
    # the train hash ignores the eval section; the eval hash is the eval section
    again = load_sweep(write(tmp_path / "study2.yaml", f.read_text().replace("limit: 4", "limit: 5")))
    assert [p.train_hash for p in again.points] == [p.train_hash for p in sweep.points]
    assert all(a.eval_hash != b.eval_hash for a, b in zip(again.points, sweep.points))
    assert pending_indices(sweep) == list(range(13))
    assert point_command(sweep, 4) == ["tunelab", "sweep", str(f), "--point", "4", "--out-dir", "runs/study"]


def test_bundle_axis_and_baselines_per_model_setting(tmp_path):
    f = write(tmp_path / "b.yaml", """
        name: bundles
        out_dir: OUT
        base: {method: lora, train: {max_steps: 1}}
        grid:
          setting:
            - {model.dtype: float32, train.batch_size: 4}
            - {model.dtype: bfloat16, train.batch_size: 2}
          method.rank: [8]
        baseline: true
    """)
    sweep = load_sweep(f)
    assert [p.name for p in sweep.points] == [
        "gsm8k-base-dtype_float32", "gsm8k-base-dtype_bfloat16",
        "gsm8k-lora-dtype_float32-batch_size4-seed42", "gsm8k-lora-dtype_bfloat16-batch_size2-seed42",
    ]
    assert sweep.points[3].config["train"]["batch_size"] == 2 and sweep.points[3].config["model"]["dtype"] == "bfloat16"
    assert sweep.points[1].config["model"]["dtype"] == "bfloat16"
    assert sweep.out_dir == Path("OUT")


@pytest.mark.parametrize("body, expected", [
    ("grid: {method.rnak: [4, 8]}", ["grid key 'method.rnak': unknown key 'method.rnak'; did you mean 'method.rank'?", "(all 2 points)"]),
    ("grid: {}", ["grid is empty"]),
    ("grid: {method.rank: []}", ["grid key 'method.rank' has no values"]),
    ("grid: {method.rank: 8}", ["grid key 'method.rank' must list its values, e.g. method.rank: [8]"]),
    ("grid: {method: [lora, nosuchmethod]}", ["unknown method 'nosuchmethod'", "exists only once its module is installed", "(point {method.name: 'nosuchmethod', seed: 42})"]),
    ("grid: {seed: [1, 2]}", ["list seeds with the top-level seeds: [..] key"]),
    ("seed: [1, 2]\ngrid: {method.rank: [4]}", ["unknown sweep key 'seed'; did you mean 'seeds'?"]),
    ("base: {out: x}\ngrid: {method.rank: [4]}", ["base.out is set"]),
    ("points: [{method.rank: 4}, {method.rank: 4}]", ["resolve to the same config"]),
    ("grid: {method.rank: [4, 4]}", ["lists {method.rank: 4} twice"]),
    ("eval: {limt: 3}\ngrid: {method.rank: [4]}", ["eval: unknown key 'eval.limt'; did you mean 'eval.limit'?"]),
    ("base: {train: {lr: -1}}\ngrid: {method.rank: [4]}", ["train.lr must be > 0"]),
    ("seeds: [1, x]\ngrid: {method.rank: [4]}", ["seeds must be a non-empty list of integers"]),
    ("grid: {method.rank: [4]}\npoints: []", ["points must be a non-empty list"]),
])
def test_bad_sweep_files_say_what_and_how_to_fix(tmp_path, body, expected):
    f = write(tmp_path / "bad.yaml", body + "\n")
    with pytest.raises(SweepError) as err:
        load_sweep(f)
    text = str(err.value)
    assert f"in sweep file {f}" in text
    for piece in expected:
        assert piece in text, text


def test_cli_reports_a_bad_sweep_and_a_bad_point_index(tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", "grid: {method.rnak: [4]}\n")
    assert main(["sweep", str(bad), "--list"]) == 2
    assert "did you mean 'method.rank'" in capsys.readouterr().err
    good = write(tmp_path / "good.yaml", "grid: {method.rank: [4, 8]}\n")
    assert main(["sweep", str(good), "--point", "7"]) == 1
    assert "has points 0..1; there is no point 7" in capsys.readouterr().err
    assert main(["sweep", str(good), "--list", "--json", "--out-dir", str(tmp_path / "o")]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["index"], r["name"], r["status"]) for r in listed] == [
        (0, "gsm8k-lora-rank4-seed42", "pending"), (1, "gsm8k-lora-rank8-seed42", "pending")]
    assert main(["sweep", str(good), "--dry-run", "--point", "1", "--out-dir", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "train: tunelab train --config" in out and "eval: tunelab eval" in out
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


# --------------------------------------------------------------------------------------------
# Running: failures, skipping, resuming (tiny model, in-process for speed)
# --------------------------------------------------------------------------------------------


def tiny_sweep(tmp_path: Path, model: Path, extra: str = "", limit: int = 4, lr: str = "7.0e-4") -> Path:
    """A sweep on the tiny model: 2 steps, 4 test examples, 8 new tokens."""
    return write(tmp_path / "tiny.yaml", textwrap.dedent(f"""
        name: tiny
        out_dir: {tmp_path / 'runs'}
        base:
          model: {model}
          task: gsm8k
          method: {{name: lora}}
          data: {{limit: 16}}
          train: {{max_steps: 2, lr: {lr}, progress_bar: false, report_to: []}}
        eval: {{limit: {limit}, max_new_tokens: 8}}
    """) + textwrap.dedent(extra))


def test_failed_point_is_recorded_others_run_and_rerun_skips_done(tmp_path, tiny_model_dir):
    f = tiny_sweep(tmp_path, tiny_model_dir, """
        points:
          - {method.rank: 4}
          - {method.rank: 8, task.data_dir: /nonexistent/gsm8k}
    """)
    sweep = load_sweep(f)
    good, bad = sweep.points
    summary = run_sweep(sweep, in_process=True, say=quiet)
    assert summary.counts["done"] == 1 and summary.counts["failed"] == 1 and summary.failed == [bad]
    assert (good.run_dir / "results.json").is_file() and (good.run_dir / "eval" / "results.json").is_file()
    failed = (bad.run_dir / "FAILED").read_text()
    assert "stage: train" in failed and "error: FileNotFoundError: task.data_dir '/nonexistent/gsm8k' does not exist" in failed
    assert "Traceback" in failed and "command: tunelab train --config" in failed
    assert point_status(sweep, good).state == "done"
    st = point_status(sweep, bad)
    assert st.state == "failed" and "does not exist" in st.detail
    assert pending_indices(sweep) == [bad.index]
    state = json.loads((good.run_dir / "sweep_point.json").read_text())
    assert state["train_hash"] == good.train_hash and state["attempts"][-1]["outcome"] == "done"

    # rerun: the done point is skipped (its results untouched), the failed one is retried
    stamp = (good.run_dir / "results.json").stat().st_mtime_ns
    log_size = (good.run_dir / "sweep.log").stat().st_size
    summary = run_sweep(load_sweep(f), in_process=True, say=quiet)
    assert summary.counts == {"done": 0, "skipped": 1, "failed": 1, "busy": 0, "conflict": 0}
    assert (good.run_dir / "results.json").stat().st_mtime_ns == stamp
    assert (good.run_dir / "sweep.log").stat().st_size == log_size
    assert len(json.loads((bad.run_dir / "sweep_point.json").read_text())["attempts"]) == 2

    # a point being run by another process is left alone and shown as running
    lock = tmp_path / "runs" / ".locks" / f"{bad.name}.lock"
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert point_status(sweep, bad).state == "running"
        assert run_sweep(sweep, [bad.index], in_process=True, say=quiet).counts["busy"] == 1


def test_eval_change_reevaluates_and_train_change_reruns(tmp_path, tiny_model_dir):
    extra = "points:\n  - {method.rank: 4}\nbaseline: true\n"
    f = tiny_sweep(tmp_path, tiny_model_dir, extra)
    sweep = load_sweep(f)
    base, point = sweep.points
    assert run_sweep(sweep, in_process=True, say=quiet).counts["done"] == 2
    assert (base.run_dir / "BASE").is_file() and not (base.run_dir / "results.json").exists()
    base_eval = json.loads((base.run_dir / "eval" / "results.json").read_text())
    assert base_eval["method"] == "base" and base_eval["metrics"]["n"] == 4
    trained = (point.run_dir / "results.json").stat().st_mtime_ns

    # evaluation unfinished (e.g. killed): only the evaluation runs again
    (point.run_dir / "eval" / "results.json").unlink()
    st = point_status(sweep, point)
    assert (st.state, st.detail) == ("pending", "trained; evaluation pending")
    assert run_sweep(sweep, [point.index], in_process=True, say=quiet).counts["done"] == 1
    assert (point.run_dir / "results.json").stat().st_mtime_ns == trained

    # other eval settings: evaluate again (old eval kept), no retraining
    f = tiny_sweep(tmp_path, tiny_model_dir, extra, limit=6)
    sweep = load_sweep(f)
    assert point_status(sweep, sweep.points[1]).detail == "eval settings changed: will evaluate again"
    assert run_sweep(sweep, in_process=True, say=quiet).counts["done"] == 2
    assert json.loads((point.run_dir / "eval" / "results.json").read_text())["metrics"]["n"] == 6
    assert (point.run_dir / "results.json").stat().st_mtime_ns == trained
    assert list(point.run_dir.glob("eval.superseded-*/results.json"))

    # a training setting changed: the old run is moved aside and the point trains again
    f = tiny_sweep(tmp_path, tiny_model_dir, extra, limit=6, lr="1.0e-3")
    sweep = load_sweep(f)
    st = point_status(sweep, sweep.points[1])
    assert st.state == "pending" and "train.lr: 0.0007 -> 0.001" in st.detail
    assert point_status(sweep, sweep.points[0]).state == "done"  # the baseline does not depend on lr
    assert run_sweep(sweep, in_process=True, say=quiet).counts == {"done": 1, "skipped": 1, "failed": 0, "busy": 0, "conflict": 0}
    assert json.loads((point.run_dir / "sweep_point.json").read_text())["config"]["train"]["lr"] == 1e-3
    moved = list((tmp_path / "runs" / ".superseded").iterdir())
    assert len(moved) == 1 and (moved[0] / "results.json").is_file()


def test_foreign_run_directory_is_not_touched(tmp_path, tiny_model_dir):
    f = tiny_sweep(tmp_path, tiny_model_dir, "points:\n  - {method.rank: 4}\n")
    sweep = load_sweep(f)
    (point,) = sweep.points
    point.run_dir.mkdir(parents=True)
    (point.run_dir / "config.yaml").write_text("seed: 1\n")
    st = point_status(sweep, point)
    assert st.state == "conflict" and "did not start" in st.detail
    assert run_sweep(sweep, in_process=True, say=quiet).counts["conflict"] == 1
    assert sorted(p.name for p in point.run_dir.iterdir()) == ["config.yaml"]


# --------------------------------------------------------------------------------------------
# End to end: `tunelab sweep` (a fresh process per command) and `tunelab report`
# --------------------------------------------------------------------------------------------


def test_tiny_sweep_end_to_end_with_report(tmp_path, tiny_model_dir, capsys):
    f = tiny_sweep(tmp_path, tiny_model_dir, """
        grid:
          method.rank: [4, 8]
        baseline: true
    """)
    assert main(["sweep", str(f)]) == 0
    sweep = load_sweep(f)
    assert [p.name for p in sweep.points] == ["gsm8k-base", "gsm8k-lora-rank4-seed42", "gsm8k-lora-rank8-seed42"]
    for p in sweep.points:
        assert point_status(sweep, p).state == "done"
        ev = json.loads((p.run_dir / "eval" / "results.json").read_text())
        assert ev["metrics"]["n"] == 4 and ev["generation"]["max_new_tokens"] == 8
        log = (p.run_dir / "sweep.log").read_text()
        assert "tunelab eval" in log
    res = json.loads((sweep.points[2].run_dir / "results.json").read_text())
    assert res["steps"] == 2 and res["seed"] == 42 and res["trainable_params"] > 0
    capsys.readouterr()
    assert main(["sweep", str(f), "--list"]) == 0
    listing = capsys.readouterr().out
    assert "gsm8k-lora-rank8-seed42" in listing and "3 done" in listing

    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "runs"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| base |" in md and "| lora | rank=4 |" in md and "| lora | rank=8 |" in md
    assert (out / "figures" / "gsm8k-quality_vs_rank.png").stat().st_size > 5000
    assert '<img src="figures/gsm8k-quality_per_method.png"' in (out / "report.html").read_text()
    assert len((out / "results.csv").read_text().strip().splitlines()) == 4


def test_shipped_sweep_files_parse_or_fail_only_for_missing_pieces():
    """Every file in configs/sweeps/ is valid, except where a method/task has not landed (or CUDA is needed)."""
    files = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
    assert files
    for f in files:
        try:
            sweep = load_sweep(f)
        except SweepError as exc:
            for problem in exc.problems:
                assert ("exists only once its module is installed" in problem
                        or "needs a CUDA GPU" in problem), f"{f.name}: {problem}"
            continue
        assert sweep.points, f.name
        assert len({p.name for p in sweep.points}) == len(sweep.points)

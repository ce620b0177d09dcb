"""Data pipeline: label masking, over-long policy, dynamic padding, deterministic length grouping."""

import pytest
from transformers import AutoTokenizer

from tunelab.config import DataConfig
from tunelab.data import IGNORE_INDEX, MicroBatchStream, collate, epoch_batches, select_examples, tokenize_example
from tunelab.tasks.base import Example


@pytest.fixture(scope="module")
def tok(default_model_dir):
    t = AutoTokenizer.from_pretrained(default_model_dir)
    t.pad_token = t.pad_token or t.eos_token
    return t


def test_labels_masked_on_prompt_and_eos_appended(tok):
    ex = Example("0", "Question: 2+2?\nAnswer:", " 4\n#### 4")
    t, status = tokenize_example(ex, tok, 100, "truncate")
    prompt_len = len(tok(ex.prompt, add_special_tokens=False)["input_ids"])
    assert status == "ok"
    assert t.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert t.labels[prompt_len:] == t.input_ids[prompt_len:]
    assert t.input_ids[-1] == tok.eos_token_id
    assert tok.decode(t.input_ids[prompt_len:-1]) == ex.response


def test_overlong_truncate_keeps_prompt_and_drop_policy(tok):
    ex = Example("0", "Question: count\nAnswer:", " one two three four five six seven eight nine ten " * 5)
    prompt_len = len(tok(ex.prompt, add_special_tokens=False)["input_ids"])
    t, status = tokenize_example(ex, tok, prompt_len + 10, "truncate")
    assert status == "truncated" and len(t) == prompt_len + 10
    assert sum(l != IGNORE_INDEX for l in t.labels) == 10
    t, status = tokenize_example(ex, tok, prompt_len + 10, "drop")
    assert t is None and status == "dropped"
    # prompt alone too long: cannot teach anything -> dropped even under truncate
    t, status = tokenize_example(ex, tok, prompt_len + 2, "truncate")
    assert t is None and status == "dropped"


def test_build_counts_truncations(tok, caplog):
    from tunelab.config import load_config
    from tunelab.data import build_train_dataset
    from tunelab.tasks import get_task

    cfg = load_config(overrides=["data.limit=32", "data.max_length=120"])
    task = get_task("gsm8k")(cfg.task)
    data, stats = build_train_dataset(task, tok, cfg.data, seed=0)
    assert stats.used == len(data) and stats.used + stats.dropped_overlong == 32
    assert stats.truncated > 0 and all(len(t) <= 120 for t in data)
    assert "truncated" in stats.notes[0]


def test_selection_is_deterministic_fraction_then_limit():
    exs = [Example(str(i), "p", "r") for i in range(100)]
    a = select_examples(exs, DataConfig(train_fraction=0.5), seed=1)
    b = select_examples(exs, DataConfig(train_fraction=0.5), seed=1)
    c = select_examples(exs, DataConfig(train_fraction=0.5), seed=2)
    assert [e.id for e in a] == [e.id for e in b] != [e.id for e in c]
    assert len(a) == 50
    assert len(select_examples(exs, DataConfig(train_fraction=0.5, limit=7), seed=1)) == 7


def test_dynamic_padding_to_batch_max():
    from tunelab.data import TokenizedExample

    batch = [TokenizedExample([5, 6, 7], [-100, 6, 7], "a"), TokenizedExample([8], [8], "b")]
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].shape == (2, 3)
    assert out["input_ids"][1].tolist() == [8, 0, 0]
    assert out["labels"][1].tolist() == [8, -100, -100]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_length_grouping_reduces_padding_and_is_deterministic():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(20, 400) for _ in range(2000)]
    grouped = epoch_batches(lengths, 8, seed=3, epoch=0, shuffle=True, group_by_length=True)
    plain = epoch_batches(lengths, 8, seed=3, epoch=0, shuffle=True, group_by_length=False)
    pad = lambda bs: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)
    assert pad(grouped) < 0.2 * pad(plain)
    assert grouped == epoch_batches(lengths, 8, seed=3, epoch=0, shuffle=True, group_by_length=True)
    assert grouped != epoch_batches(lengths, 8, seed=3, epoch=1, shuffle=True, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(2000))


def test_ranks_get_disjoint_batches():
    from tunelab.data import TokenizedExample

    data = [TokenizedExample([1] * (i + 1), [1] * (i + 1), str(i)) for i in range(40)]
    r0 = MicroBatchStream(data, 4, 0, True, True, rank=0, world_size=2)
    r1 = MicroBatchStream(data, 4, 0, True, True, rank=1, world_size=2)
    ids0 = {t.id for k in range(r0.per_epoch) for t in r0.get(k)[1]}
    ids1 = {t.id for k in range(r1.per_epoch) for t in r1.get(k)[1]}
    assert not ids0 & ids1 and len(ids0 | ids1) == 40

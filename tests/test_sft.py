"""task=sft: the user's data from any source and format, its bad input, metrics, train + eval end to end."""

import json
import os
from pathlib import Path
import subprocess
import sys

import pytest

from tunelab.config import ConfigError, load_config
from tunelab.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
from tunelab.data.sources import DataSourceError
from tunelab.tasks import get_task

PAIRS = [{"prompt": f"What is {i} plus {i}?", "response": str(2 * i)} for i in range(6)]
CHATS = [
    {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2 plus 2?"},
                  {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]},
    {"messages": [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}]},
    {"messages": [{"role": "user", "content": "Say no"}, {"role": "assistant", "content": "no"}]},
]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft(*overrides):
    cfg = load_config(overrides=["task=sft", *overrides])
    return get_task("sft")(cfg.task), cfg


def pairs_of(examples):
    return [(e.prompt, e.response) for e in examples]


EXPECTED = [(p["prompt"] + "\n", p["response"]) for p in PAIRS]


# ------------------------------------------------------------------------------------ sources


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same six pairs as jsonl, json, csv, parquet, arrow, a glob of two jsonl halves, and folders."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("sources")
    ds = Dataset.from_list(PAIRS)
    write_jsonl(root / "pairs.jsonl", PAIRS)
    (root / "pairs.json").write_text(json.dumps(PAIRS))
    ds.to_csv(str(root / "pairs.csv"), index=False)
    ds.to_parquet(str(root / "pairs.parquet"))
    ds.save_to_disk(str(root / "saved"))
    (root / "arrow").mkdir()
    (root / "saved" / "data-00000-of-00001.arrow").rename(root / "arrow" / "pairs.arrow")
    ds.save_to_disk(str(root / "saved"))
    write_jsonl(root / "parts" / "a.jsonl", PAIRS[:3])
    write_jsonl(root / "parts" / "b.jsonl", PAIRS[3:])
    # a folder in the Hub's layout: data/<split>-NNNNN-of-NNNNN.parquet
    (root / "hub" / "data").mkdir(parents=True)
    ds.to_parquet(str(root / "hub" / "data" / "train-00000-of-00001.parquet"))
    Dataset.from_list(PAIRS[:2]).to_parquet(str(root / "hub" / "data" / "test-00000-of-00001.parquet"))
    return root


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.json", "pairs.csv", "pairs.parquet", "arrow/pairs.arrow",
                                  "parts/*.jsonl", "hub", "saved"])
def test_every_source_kind_gives_the_same_examples(files, name):
    task, _ = sft(f"data.source={files / name}")
    examples = task.examples("train")
    assert pairs_of(examples) == EXPECTED
    assert [e.id for e in examples] == [str(i) for i in range(6)]
    assert [e.reference for e in examples] == [p["response"] for p in PAIRS]


def test_a_hub_folder_has_its_splits_and_a_hub_id_takes_the_same_code_path(files, monkeypatch):
    task, _ = sft(f"data.source={files / 'hub'}")
    assert pairs_of(task.examples("test")) == EXPECTED[:2]  # eval.split=test -> data.eval_split=test
    import datasets

    real, calls = datasets.load_dataset, []

    def hub(path, name=None, **kwargs):  # the Hub answers with the folder's dataset
        calls.append((path, name, kwargs))
        return real(str(files / "hub"))

    monkeypatch.setattr(datasets, "load_dataset", hub)
    task, _ = sft("data.source=someone/pairs", "data.subset=main", "data.revision=v1")
    assert pairs_of(task.examples("train")) == EXPECTED and pairs_of(task.examples("test")) == EXPECTED[:2]
    assert calls == [("someone/pairs", "main", {"revision": "v1"})]  # loaded once for both splits


def test_columns_map_the_users_names(tmp_path, monkeypatch):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer,extra\nWhat is 1 plus 1?,2,x\n\"Is a, b one field?\",yes,y\n")
    monkeypatch.chdir(tmp_path)
    task, cfg = sft("data.source=qa.csv", "data.columns={prompt: question, response: answer}")
    assert cfg.data.source == str(path)  # made absolute: the run's config.yaml finds it from anywhere
    assert pairs_of(task.examples("train")) == [("What is 1 plus 1?\n", "2"), ("Is a, b one field?\n", "yes")]


def test_alpaca_uses_the_standard_prompt_with_and_without_input(tmp_path):
    rows = [{"instruction": "Translate to French.", "input": "cheese", "output": "fromage"},
            {"instruction": "Name a colour.", "input": "", "output": "blue"},
            {"instruction": "Say hi.", "output": "hi"}]
    task, _ = sft(f"data.source={write_jsonl(tmp_path / 'a.jsonl', rows)}", "data.format=alpaca")
    a, b, c = task.examples("train")
    assert a.prompt == ALPACA_PROMPT.format(instruction="Translate to French.", input="cheese")
    assert a.prompt.endswith("### Input:\ncheese\n\n### Response:\n") and a.response == "fromage"
    assert b.prompt == ALPACA_PROMPT_NO_INPUT.format(instruction="Name a colour.") and "### Input" not in b.prompt
    assert c.prompt == ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.") and c.reference == "hi"
    task, _ = sft(f"data.source={tmp_path / 'a.jsonl'}")  # auto finds alpaca too
    assert task.examples("train")[0].prompt == a.prompt


def test_messages_and_sharegpt_become_conversations(tmp_path):
    share = [{"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                                {"from": "gpt", "value": "Hello"}]}]
    task, _ = sft(f"data.source={write_jsonl(tmp_path / 'share.jsonl', share)}", "data.format=messages")
    (ex,) = task.examples("train")
    assert ex.messages == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"}]
    assert ex.prompt == "System: Be kind.\n\nUser: Hi\n\nAssistant:" and ex.response == " Hello" and ex.reference == "Hello"
    task, _ = sft(f"data.source={write_jsonl(tmp_path / 'chats.jsonl', CHATS)}")  # auto: messages
    first = task.examples("train")[0]
    assert first.messages == CHATS[0]["messages"] and first.reference == "4"
    assert first.prompt.endswith("User: What is 2 plus 2?\n\nAssistant:") and "Assistant: Hello!" in first.prompt


def test_format_detection_says_when_it_cannot_tell(tmp_path):
    task, _ = sft(f"data.source={write_jsonl(tmp_path / 'x.jsonl', [{'q': 'a', 'a': 'b'}])}")
    with pytest.raises(DataSourceError, match=r"cannot tell the data's format.*columns \(a, q\).*data.columns"):
        task.examples("train")
    both = [{"prompt": "a", "response": "b", "instruction": "c", "output": "d"}]
    task, _ = sft(f"data.source={write_jsonl(tmp_path / 'y.jsonl', both)}")
    with pytest.raises(DataSourceError, match=r"several formats \(prompt_response, alpaca\): set data.format"):
        task.examples("train")


# ------------------------------------------------------------------------------------ splits


def test_eval_fraction_holds_out_rows_training_never_sees(tmp_path, tiny_model_dir):
    from tunelab.data import build_train_dataset
    from tunelab.data.examples import split_held_out
    from tunelab.models import load_tokenizer, materialize

    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(20)]
    task, cfg = sft(f"data.source={write_jsonl(tmp_path / 't.jsonl', rows)}", "data.eval_fraction=0.25", "seed=3")
    held = task.examples("test")
    assert [e.id for e in held] == [str(i) for i in split_held_out(20, 0.25, 3)[1]] and len(held) == 5
    tok = load_tokenizer(cfg.model, materialize(str(tiny_model_dir)))
    data, stats = build_train_dataset(task, tok, cfg.data, cfg.seed)
    assert stats.used == 15 and not {t.id for t in data} & {e.id for e in held}


def test_a_missing_split_lists_the_splits_and_the_settings(files, tmp_path):
    task, _ = sft(f"data.source={files / 'pairs.jsonl'}")
    with pytest.raises(FileNotFoundError, match=r"its splits: train; data.eval_split='test' is not a split.*"
                                                r"data.eval_split.*data.eval_fraction=0.1"):
        task.examples("test")
    task, _ = sft(f"data.source={files / 'hub'}", "data.split=validation")
    with pytest.raises(DataSourceError, match=r"data.split='validation' is not a split.*its splits: train, test"):
        task.examples("train")


# ------------------------------------------------------------------------------------ bad input


def test_bad_conversations_are_named_all_at_once(tmp_path):
    bad = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "wizard", "content": "Boo"}]},
        {"messages": []},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                      {"role": "user", "content": "And?"}]},
        {"messages": [{"role": "user", "content": ["a", "b"]}, {"role": "assistant", "content": "c"}]},
        CHATS[1],
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    task, _ = sft(f"data.source={path}", "data.train_on=last")
    with pytest.raises(DataSourceError) as err:
        task.examples("train")
    msg = str(err.value)
    assert f"{path} (split train): 4 of 5 row(s)" in msg
    assert "row 0: turn 1 has the unknown role 'wizard' (known: system, user, assistant)" in msg
    assert "row 1: the conversation is empty" in msg
    assert "row 2: the conversation ends on a user turn" in msg and "data.train_on=last" in msg
    assert "row 3: turn 0 (user): 'content' is a list, not a string" in msg
    # training on every assistant turn keeps a trailing user turn; evaluation refuses it
    task, _ = sft(f"data.source={write_jsonl(tmp_path / 'trail.jsonl', [bad[2], CHATS[1]])}",
                  "data.train_on=assistant", "data.eval_split=train")
    assert task.examples("train")[0].reference == "Yo"
    with pytest.raises(DataSourceError, match="row 0: the conversation ends on a user turn"):
        task.examples("test")


def test_bad_pairs_and_a_sharegpt_role(tmp_path):
    rows = [{"prompt": "a", "response": 3}, {"prompt": "", "response": "b"}, {"prompt": "c", "response": "d"}]
    task, _ = sft(f"data.source={write_jsonl(tmp_path / 'p.jsonl', rows)}", "data.format=prompt_response")
    with pytest.raises(DataSourceError, match=r"2 of 3 row\(s\)[\s\S]*row 0: field 'response' is a number, not a "
                                              r"string[\s\S]*row 1: field 'prompt' is empty"):
        task.examples("train")
    share = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bard", "value": "Yo"}]}]
    task, _ = sft(f"data.source={write_jsonl(tmp_path / 's.jsonl', share)}")
    with pytest.raises(DataSourceError, match=r"row 0: turn 1 has the unknown role 'bard' \(known: human, gpt, system"):
        task.examples("train")


def test_a_ragged_csv_row_names_the_file_and_line(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("prompt,response\na,b\nc,d,e\nf\ng,h\n")
    task, _ = sft(f"data.source={path}")
    with pytest.raises(DataSourceError, match=rf"2 CSV row\(s\)[\s\S]*{path}:3: 3 fields, but the header has 2 "
                                              rf"\(prompt, response\)[\s\S]*{path}:4: 1 fields"):
        task.examples("train")


def test_a_missing_mapped_column_names_the_column_the_row_and_the_columns(tmp_path):
    rows = [{"question": "a", "answer": "b"}, {"question": "c"}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    task, _ = sft(f"data.source={path}", "data.columns={prompt: question, response: reply}")
    with pytest.raises(DataSourceError, match=r"data.columns.response='reply' is not a column.*columns present: "
                                              r"answer, question"):
        task.examples("train")
    task, _ = sft(f"data.source={path}", "data.columns={prompt: question, response: answer}")
    with pytest.raises(DataSourceError, match=r"row 1: column 'answer' \(data.columns.response\) is missing or null"):
        task.examples("train")


def test_an_offline_hub_id_names_what_to_set(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task, _ = sft("data.source=nobody/no-such-dataset-here")
    with pytest.raises(DataSourceError, match=r"read as a Hub dataset id[\s\S]*offline mode is on[\s\S]*set "
                                              r"data.source to a file"):
        task.examples("train")


def test_config_problems_are_reported_together(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["task=sft", "task.metrics=[exact_match,bleu]", "data.columns={answer: x}"])
    msg = str(err.value)
    assert "task=sft needs data.source" in msg
    assert "task.metrics: unknown metric(s) 'bleu' (known: exact_match, rouge, bertscore, ref_nll)" in msg
    assert "data.columns.answer: not a field" in msg
    with pytest.raises(ConfigError, match=r"data.source '.*nowhere.jsonl' does not exist"):
        load_config(overrides=["task=sft", f"data.source={tmp_path / 'nowhere.jsonl'}"])
    with pytest.raises(ConfigError, match=r"data.source, data.format are read only by task=sft \(this run has "
                                          r"task=gsm8k"):
        load_config(overrides=["data.source=x.jsonl", "data.format=alpaca"])
    with pytest.raises(ConfigError, match="ref_nll, which eval computes only with eval.reference_loss=true"):
        load_config(overrides=["task=sft", f"data.source={tmp_path}", "task.metrics=[ref_nll]",
                               "eval.reference_loss=false"])


# ------------------------------------------------------------------------------------ metrics


def test_metrics_are_the_ones_selected(tmp_path):
    from tunelab.tasks.base import Example

    path = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    exs = [Example("0", "p", " The  Cat sat", reference="the cat sat"), Example("1", "p", " x", reference="a dog")]
    comps = ["the cat   SAT\n", "a cat"]
    task, _ = sft(f"data.source={path}", "task.metrics=[exact_match]", "task.bootstrap_resamples=0")
    scored = task.score(exs, comps)
    assert scored.metrics == {"exact_match": 0.5, "n": 2, "empty_predictions": 0}
    assert [r["correct"] for r in scored.per_example] == [True, False]
    task, _ = sft(f"data.source={path}", "task.metrics=[rouge,bertscore,ref_nll]")
    assert task.primary_metric == "rougeL"
    m = task.score(exs, comps).metrics
    assert "exact_match" not in m and m["rougeL"] == pytest.approx((1.0 + 0.5) / 2)
    assert 0 < m["bertscore_f1"] <= 1 and m["bertscore_layer"] == 6 and len(m["rougeL_ci95"]) == 2
    task, _ = sft(f"data.source={path}", "task.metrics=[ref_nll]")
    assert task.primary_metric == "ref_nll"


# ------------------------------------------------------------------------------------ selection


def test_data_limit_builds_only_the_selected_examples(tiny_model_dir, tmp_path, monkeypatch):
    """The examples trained on are those of selecting over every usable example (today's rule), and
    summarization fits (tokenizes) only the selected rows' articles: also where some rows are too
    long to use (data.max_length=140), which a selection must skip exactly as before."""
    from tunelab.data import build_train_dataset, select_examples
    from tunelab.models import load_tokenizer, materialize
    from tunelab.tasks.base import DATA_DIR_ENV
    from tunelab.tasks.summarization.truncation import ArticleFitter

    news = tmp_path / "news"  # the first 600 real articles (the whole set costs a minute to fit twice)
    news.mkdir()
    lines = (Path(os.environ[DATA_DIR_ENV]) / "news_summary" / "train.jsonl").read_text().splitlines(keepends=True)
    (news / "train.jsonl").write_text("".join(lines[:600]))
    fitted = []
    real_fit = ArticleFitter.fit
    monkeypatch.setattr(ArticleFitter, "fit", lambda self, articles, *a: fitted.extend(articles) or real_fit(self, articles, *a))
    short = ["data.max_length=140", "eval.max_new_tokens=16"]
    for task_name, extra in [("news_summary", [f"task.data_dir={news}"]),
                             ("news_summary", [f"task.data_dir={news}", *short]), ("gsm8k", ["data.max_length=120"])]:
        for seed, select in [(0, "data.limit=12"), (5, "data.train_fraction=0.02")]:
            cfg = load_config(overrides=[f"task={task_name}", f"seed={seed}", select, *extra])
            tok = load_tokenizer(cfg.model, materialize(str(tiny_model_dir)))
            task = get_task(task_name)(cfg.task)
            before = select_examples(task.examples("train", tokenizer=tok, max_prompt_tokens=cfg.data.max_length - 8),
                                     cfg.data, cfg.seed)
            fitted.clear()
            lazy, chosen = get_task(task_name)(cfg.task), []
            examples = lazy.examples
            lazy.examples = lambda *a, **k: chosen.extend(examples(*a, **k)) or chosen
            data, stats = build_train_dataset(lazy, tok, cfg.data, cfg.seed)
            assert [(e.id, e.prompt, e.response) for e in chosen] == [(e.id, e.prompt, e.response) for e in before]
            assert stats.used + stats.dropped_overlong == len(before) and {t.id for t in data} <= {e.id for e in before}
            if task_name == "news_summary":
                if extra == [f"task.data_dir={news}"]:
                    assert len(fitted) == len(before) <= 12  # of 600 articles
                else:  # rows are skipped as too long: only fitting tells which, and the selection is still today's
                    assert task.stats["train"]["skipped_too_long"] > 0


def test_conversations_train_on_their_assistant_turns_in_the_chat_format(tmp_path, tiny_model_dir):
    from tunelab.data import IGNORE_INDEX, build_train_dataset
    from tunelab.models import load_tokenizer, materialize

    path = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    for train_on, targets in [("assistant", ["Hello!", "4"]), ("last", ["4"])]:
        task, cfg = sft(f"data.source={path}", "task.prompt_format=chat", f"data.train_on={train_on}")
        tok = load_tokenizer(cfg.model, materialize(str(tiny_model_dir)))
        data, stats = build_train_dataset(task, tok, cfg.data, cfg.seed)
        first = next(t for t in data if t.id == "0")
        trained = tok.decode([i for i, lab in zip(first.input_ids, first.labels) if lab != IGNORE_INDEX])
        assert all(text in trained for text in targets) and "Hi" not in trained and "Answer briefly" not in trained
        assert ("Hello!" in trained) == (train_on == "assistant") and stats.used == len(CHATS)


# ------------------------------------------------------------------------------------ end to end


def tunelab(*args):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-m", "tunelab", *args], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"tunelab {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_train_and_eval_on_a_messages_file(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", CHATS * 3)
    run = tmp_path / "RUN"
    tunelab("train", "task=sft", f"data.source={path}", "data.format=messages", "data.train_on=assistant",
            "data.eval_fraction=0.25", "train.max_steps=2", "train.batch_size=4", f"out={run}",
            f"model={tiny_model_dir}", "train.report_to=[]")
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    tunelab("eval", str(run), "task.metrics=[exact_match,rouge,bertscore]", "eval.max_new_tokens=8")
    res = json.loads((run / "eval" / "results.json").read_text())
    m = res["metrics"]
    assert res["task"] == "sft" and res["primary_metric"] == "exact_match" and m["n"] == 3  # 25% of 12 held out
    assert {"exact_match", "rougeL", "bertscore_f1", "ref_nll"} <= m.keys()
    preds = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert {"id", "prompt", "completion", "prediction", "expected", "correct", "rougeL", "bertscore_f1",
            "ref_nll_sum"} <= preds[0].keys()
    assert all(p["prompt"].endswith("Assistant:") for p in preds)

"""``tunelab generate`` on a tiny model: every mode, resume, equality with eval's completions, bad input.

The shared tiny fixture model (initializer range 0.02) answers every prompt with the same token,
which would make equality checks vacuous; these tests use the same architecture with an
initializer range of 0.3, whose greedy completions differ from prompt to prompt.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunelab.cli import main
from tunelab.config import load_config
from tunelab.evaluation.engine import DecodeOptions, Generator, TaskStreamer
from tunelab.evaluation.generate import prepare_batch, read_prompts, run_batch
from tunelab.rundir import RunDir, resolve_target

GSM8K_TEST = Path(os.environ["TUNELAB_DATA_DIR"]) / "gsm8k" / "test.jsonl"
N_NEW = 24


@pytest.fixture(scope="module")
def run(tmp_path_factory, varied_model_dir) -> Path:
    """A LoRA run (2 steps) evaluated on the first 4 GSM8K test questions."""
    from tunelab.evaluation.evaluate import evaluate
    from tunelab.train import train

    out = tmp_path_factory.mktemp("gen") / "RUN"
    train(load_config(overrides=[
        f"model={varied_model_dir}", "task=gsm8k", "method=lora", "data.limit=16", "train.batch_size=8",
        "train.max_steps=2", "train.lr=1e-2", "train.report_to=[]", "train.progress_bar=false", f"out={out}",
    ]))
    evaluate(RunDir(out).config(["eval.limit=4", f"eval.max_new_tokens={N_NEW}"]), out, out)
    return out


def _questions(n: int = 4) -> list[dict]:
    return [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()[:n]]


def _predictions(run: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (run / "eval" / "predictions.jsonl").read_text().splitlines())}


def _generator(target: str | None, *overrides: str, base: bool = False, raw: bool = False, chat: bool = False,
               **opts) -> Generator:
    return Generator(resolve_target(target, base=base, overrides=list(overrides), command="generate"), DecodeOptions(**opts),
                     raw=raw, chat=chat).load()


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["generate", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ---- equality with eval --------------------------------------------------------------------


def test_batch_mode_equals_eval_predictions(run, tmp_path, capsys):
    inp, out = tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    inp.write_text("".join(json.dumps(q) + "\n" for q in _questions()))
    rc, _, _ = _cli(capsys, str(run), f"eval.max_new_tokens={N_NEW}", "--input", str(inp), "--output", str(out), "--no-progress")
    assert rc == 0
    got = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    preds = _predictions(run)
    assert sorted(got) == sorted(preds) == ["0", "1", "2", "3"]
    completions = {p["completion"] for p in preds.values()}
    assert len(completions) == 4, "the fixture model must give distinct completions for the test to mean anything"
    # eval also scored each reference teacher-forced; the pooled ref_nll is its per-example sums over tokens
    results = json.loads((run / "eval" / "results.json").read_text())
    pooled = sum(p["ref_nll_sum"] for p in preds.values()) / sum(p["ref_tokens"] for p in preds.values())
    assert results["metrics"]["ref_nll"] == pytest.approx(pooled, rel=1e-9) and pooled > 0
    for i, p in preds.items():
        assert got[i]["prompt"] == p["prompt"]
        assert got[i]["completion"] == p["completion"]  # exactly eval's string
        assert got[i]["extracted"] == {"strict": p["extracted"], "flexible": p["extracted_flexible"]}
    # a user file holding only the question under another name, formatted by the task template
    inp2, out2 = tmp_path / "mine.jsonl", tmp_path / "mine.out.jsonl"
    inp2.write_text("".join(json.dumps({"id": f"q{i}", "text": q["question"]}) + "\n" for i, q in enumerate(_questions())))
    rc, _, _ = _cli(capsys, str(run), f"eval.max_new_tokens={N_NEW}", "--input", str(inp2), "--output", str(out2),
                    "--field", "text", "--no-progress")
    assert rc == 0
    got2 = {r["id"]: r["completion"] for r in map(json.loads, out2.read_text().splitlines())}
    assert got2 == {f"q{i}": preds[str(i)]["completion"] for i in range(4)}


def test_single_prompt_streams_eval_completion(run, capsys, monkeypatch):
    """--prompt applies the task template and streams, token by token, exactly eval's completion."""
    preds = _predictions(run)
    q = _questions(1)[0]["question"]
    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, s):
            writes.append(s)
            return super().write(s)

    rec = Recorder()
    monkeypatch.setattr(sys, "stdout", rec)
    rc = main(["generate", str(run), "--prompt", q, "--max-new-tokens", str(N_NEW)])
    assert rc == 0
    assert rec.getvalue() == preds["0"]["completion"] + "\n"
    assert len([w for w in writes if w.strip()]) >= 5, f"not streamed: {writes}"


# ---- each mode -----------------------------------------------------------------------------


def test_base_and_raw_match_plain_transformers(varied_model_dir, capsys):
    """--base applies the task template; --raw does not; both decode only the new tokens, greedily."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(varied_model_dir)
    model = AutoModelForCausalLM.from_pretrained(varied_model_dir, dtype=torch.float32).eval()

    def reference(prompt: str) -> str:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    q = "Tom has 3 apples and buys 5 more. How many apples does he have?"
    rc, out, _ = _cli(capsys, "--base", "task=gsm8k", f"model={varied_model_dir}", "--prompt", q, "--max-new-tokens", "12")
    assert rc == 0 and out == reference(f"Question: {q}\nAnswer:").rstrip() + "\n"
    rc, out, _ = _cli(capsys, "--base", "task=gsm8k", f"model={varied_model_dir}", "--raw", "--prompt", "Once upon a time",
                      "--max-new-tokens", "12")
    assert rc == 0 and out == reference("Once upon a time") + "\n"


def test_run_adapter_is_applied_and_merged_folder_agrees(run, varied_model_dir, capsys):
    q = _questions(2)[1]["question"]
    rc, with_adapter, _ = _cli(capsys, str(run), "--prompt", q, "--max-new-tokens", "16")
    rc2, base, _ = _cli(capsys, "--base", "task=gsm8k", f"model={varied_model_dir}", "--prompt", q, "--max-new-tokens", "16")
    assert rc == rc2 == 0 and with_adapter != base  # the trained adapter changes the answer
    assert main(["merge", str(run)]) == 0
    rc, merged, _ = _cli(capsys, str(run / "merged"), "--prompt", q, "--max-new-tokens", "16")
    assert rc == 0 and merged == with_adapter  # the merged folder keeps the run's task template


def test_stop_strings_and_seeded_sampling(run):
    gen = _generator(str(run), max_new_tokens=16)

    def variant(**opts) -> Generator:  # other decoding options, the same loaded model
        other = Generator(gen.target, DecodeOptions(max_new_tokens=16, **opts))
        other.model, other.tokenizer = gen.model, gen.tokenizer
        return other

    prompt = gen.prompt_for_text("What is 6 times 7?")
    greedy = gen.complete(prompt)
    words = greedy.split()
    assert len(words) >= 4
    stop = words[2][:3]
    cut = gen.task.trim_completion(greedy[: greedy.index(stop)])  # cut at the stop string, then the task's trim
    buf = io.StringIO()
    assert variant(stop=[stop]).complete(prompt, stream=buf) == cut == buf.getvalue()  # the stop string is never shown

    def sample(seed: int) -> str:
        return variant(temperature=1.0, top_k=50, seed=seed).complete(prompt)

    assert sample(1) == sample(1)
    assert len({sample(1), sample(2), sample(3)}) > 1
    assert gen.complete(prompt) == greedy  # greedy ignores the seed and the RNG state


def test_interactive_mode_through_stdin(run):
    """Multi-line prompts end with an empty line; EOF submits the last one and exits cleanly."""
    q1, q2 = "Sara has 4 pens.\nShe buys 2 more. How many?", "What is 9 minus 5?"
    gen = _generator(str(run), max_new_tokens=10)
    expected = [gen.complete(gen.prompt_for_text(q)) for q in (q1, q2)]
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", "generate", str(run), "--interactive", "--max-new-tokens", "10"],
        input=f"{q1}\n\n\n{q2}\n", capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "ready" in proc.stderr
    assert proc.stdout == f"{expected[0]}\n\n{expected[1]}\n\n"


def _is_ready_line(line: str) -> bool:
    return line.startswith("tunelab generate:") and " ready (" in line


def test_interactive_exits_cleanly_on_ctrl_c(run):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "generate", str(run), "--interactive"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    # wait for the REPL's own ready line (a library's warning may contain the word "ready" too); the
    # signal may land before or after input() blocks: Ctrl-C at any point must end it cleanly
    err = ""
    for line in iter(proc.stderr.readline, ""):
        err += line
        if _is_ready_line(line):
            break
    assert "tunelab generate:" in err and " ready (" in err, err
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in rest, rest


def test_interactive_ctrl_c_during_start_up_exits_cleanly(run):
    """SIGINT as soon as the process writes anything (the model is still loading): no traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "generate", str(run), "--interactive"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    first = proc.stderr.readline()
    assert first, "the process wrote nothing before exiting"
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130) and "Traceback" not in first + rest, first + rest


def test_read_prompts_multiline_and_eof():
    lines = iter(["", "first line", "second line", "", "", "   ", "", "last"])

    def next_line():
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    assert list(read_prompts(next_line, lambda s: None)) == ["first line\nsecond line", "last"]


# ---- resume --------------------------------------------------------------------------------


def test_batch_resume_after_crash_skips_done_ids_and_drops_partial_line(run, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [{"id": f"r{i}", "question": q["question"]} for i, q in enumerate(_questions(4))]
    rows.append({"id": "r4", "question": "What is 12 divided by 4?"})
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [str(run), "--input", str(inp), "--output", str(out), "--max-new-tokens", "12", "--batch-size", "2", "--no-progress"]
    assert _cli(capsys, *args)[0] == 0
    full = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(full) == [r["id"] for r in rows]

    # a crash after two lines, in the middle of the third: the two lines carry a marker, so a
    # regenerated line would show
    lines = out.read_text().splitlines()
    kept = [json.loads(l) for l in lines[:2]]
    for rec in kept:
        rec["completion"] = "<kept from the first run>"
    partial = lines[2][: len(lines[2]) // 2]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + partial)
    assert _cli(capsys, *args)[0] == 0
    after = [json.loads(l) for l in out.read_text().splitlines()]  # every line parses: the partial one is gone
    ids = [r["id"] for r in after]
    assert sorted(ids) == sorted(full) and len(ids) == len(set(ids))
    assert after[:2] == kept  # not regenerated
    for rec in after[2:]:
        assert rec["completion"] == full[rec["id"]]["completion"]
    # all done: a rerun writes nothing
    before = out.read_bytes()
    assert _cli(capsys, *args)[0] == 0 and out.read_bytes() == before
    # resuming with other decoding settings would mix outputs: refused
    rc, _, err = _cli(capsys, *args[:-5], "--max-new-tokens", "20", "--no-progress")
    assert rc == 1 and "written with other settings (max_new_tokens: 12 -> 20)" in err


def test_prepare_batch_happens_before_model_load(run, tmp_path):
    """Bad input and foreign outputs are caught without loading the model."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"question": "a?"}) + "\n")
    out.write_text(json.dumps({"id": "zzz", "completion": "x"}) + "\n")
    gen = Generator(resolve_target(str(run), command="generate"), DecodeOptions())
    with pytest.raises(ValueError, match="is not a tunelab generate output .*: it was left untouched"):
        prepare_batch(gen, inp, out)  # no OUT.meta.json beside it: not ours
    # an output tunelab wrote (its meta file beside it) for another input
    (tmp_path / "out.jsonl.meta.json").write_text(json.dumps({"settings": {}, "input": "other.jsonl"}))
    with pytest.raises(ValueError, match="1 id\\(s\\) that are not in .* \\(e.g. 'zzz'\\): it belongs to another input"):
        prepare_batch(gen, inp, out)
    assert gen.model is None
    job = prepare_batch(gen, inp, out, overwrite=True)
    assert job.todo == [0] and not out.exists()
    assert run_batch(gen, job, progress=False) == 1 and gen.model is not None


# ---- streaming ----------------------------------------------------------------------------


def test_streamer_never_shows_what_the_task_trims(tiny_model_dir):
    from transformers import AutoTokenizer

    from tunelab.tasks import get_task

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    task = get_task("gsm8k")(load_config().task)
    text = " She sold 48/2 = 24 clips.\n#### 72\nQuestion: What is next?"
    ids = tok(text, add_special_tokens=False).input_ids
    buf = io.StringIO()
    streamer = TaskStreamer(tok, task.trim_completion, [], buf)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt comes first and is not shown
    seen = []
    for i in ids:
        streamer.put(torch.tensor([i]))
        seen.append(buf.getvalue())
    streamer.end()
    assert buf.getvalue() == task.trim_completion(text) == " She sold 48/2 = 24 clips.\n#### 72"
    assert all("Question" not in s for s in seen)
    assert len(set(seen)) > 5  # it grew step by step


def test_prompt_formatting_follows_each_task():
    from tunelab.evaluation.generate import task_input_fields
    from tunelab.tasks import Example, Task, get_task

    gsm8k = get_task("gsm8k")(load_config().task)
    row = _questions(1)[0]
    assert gsm8k.format_prompt({"question": row["question"]}) == gsm8k.to_example(row, 0).prompt
    assert gsm8k.format_input("What is 2+2?") == "Question: What is 2+2?\nAnswer:"
    from tunelab.tasks.jsonl import JsonlConfig

    cfg = JsonlConfig(template="Q ({lang}): {prompt}\nA:")
    jsonl = get_task("jsonl")(cfg)
    assert task_input_fields(jsonl) == ["lang", "prompt"]
    assert jsonl.format_prompt({"lang": "fr", "prompt": "fromage?"}) == "Q (fr): fromage?\nA:"
    with pytest.raises(ValueError, match=r"several fields \['lang', 'prompt'\]"):
        jsonl.format_input("fromage?")

    class Echo(Task):  # a task generate has no table entry for: prompts come from to_example
        name = "echo"

        def to_example(self, row, idx, tokenizer=None, max_prompt_tokens=None):
            return Example(str(idx), f"<<{row['text']}>>", "") if row.get("text") else None

    echo = Echo(cfg)
    assert task_input_fields(echo) is None
    assert echo.format_prompt({"text": "hi"}) == "<<hi>>"
    with pytest.raises(ValueError, match=r"could not build a prompt from this row \(fields present: \['x'\]\)"):
        echo.format_prompt({"x": 1})
    with pytest.raises(ValueError, match="does not say which field a single prompt fills: use --raw"):
        echo.format_input("hi")


def test_summarization_prompts_equal_eval_prompts_with_truncation(tiny_model_dir, tmp_path):
    """Long articles are cut to eval's token budget exactly as eval cuts them (also with dotted field paths)."""
    from transformers import AutoTokenizer

    from tunelab.evaluation.generate import task_input_fields
    from tunelab.tasks import get_task, known_tasks

    if "summarization" not in known_tasks():
        pytest.skip("the summarization task is not installed")
    src = Path(os.environ["TUNELAB_DATA_DIR"]) / "news_summary" / "test.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines()[:6]]
    (tmp_path / "test.jsonl").write_text("".join(
        json.dumps({"doc": {"text": r["article"]}, "refs": [{"text": r["summary"]}]}) + "\n" for r in rows))
    cfg = load_config(overrides=["task=summarization", f"task.data_dir={tmp_path}", "task.article_field=doc.text",
                                 "task.summary_field=refs.0.text", "task.bertscore=false", "data.max_length=300",
                                 "eval.max_new_tokens=100"])
    task = get_task("summarization")(cfg.task)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    budget = max(8, cfg.data.max_length - cfg.eval.max_new_tokens)  # as eval computes it
    examples = task.examples("test", tokenizer=tok, max_prompt_tokens=budget)
    assert len(examples) == 6 and any(e.meta.get("article_truncated") for e in examples)
    assert task_input_fields(task) == ["doc.text"]
    for i, (row, ex) in enumerate(zip(rows, examples)):
        user_row = {"doc": {"text": row["article"]}}  # no summary: generate's input
        assert task.format_prompt(user_row, tok, budget) == ex.prompt
        assert task.format_input(row["article"], tok, budget) == ex.prompt


# ---- bad input ----------------------------------------------------------------------------


def test_bad_input_clear_errors(run, tmp_path, capsys):
    r = str(run)
    missing = tmp_path / "nope.jsonl"
    rc, _, err = _cli(capsys, r, "--input", str(missing), "--output", str(tmp_path / "o.jsonl"))
    assert rc == 1 and f"--input {missing} does not exist" in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a"}\n\n{"question": "b",\n')
    rc, _, err = _cli(capsys, r, "--input", str(bad), "--output", str(tmp_path / "o.jsonl"))
    assert rc == 1 and f"{bad}:3: malformed JSON line" in err

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": "a", "text": "x", "lang": "en"}\n{"id": "b", "question": "  "}\n')
    rc, _, err = _cli(capsys, r, "--input", str(rows), "--output", str(tmp_path / "o.jsonl"))
    assert rc == 1
    assert f"{rows}:1: no field 'question'; fields present: ['id', 'lang', 'text']" in err
    assert f"{rows}:2: empty prompt (field 'question' is blank)" in err
    rc, _, err = _cli(capsys, r, "--input", str(rows), "--output", str(tmp_path / "o.jsonl"), "--field", "txt")
    assert rc == 1 and "no field 'txt'; fields present: ['id', 'lang', 'text']" in err

    rc, _, err = _cli(capsys, r, "--prompt", "   ")
    assert rc == 2 and "--prompt is empty" in err
    rc, _, err = _cli(capsys, r, "--input", str(rows))
    assert rc == 2 and "--input needs --output" in err

    # a folder without a model, and a run directory without its trained adapter
    (tmp_path / "notes.txt").write_text("x")
    rc, _, err = _cli(capsys, str(tmp_path), "--prompt", "hi")
    assert rc == 1 and "holds no model" in err and "it has: " in err and "notes.txt" in err
    empty_run = tmp_path / "EMPTY"
    empty_run.mkdir()
    (empty_run / "config.yaml").write_text((run / "config.yaml").read_text())
    rc, _, err = _cli(capsys, str(empty_run), "--prompt", "hi")
    assert rc == 1 and "holds no trained adapter/ (it has: config.yaml)" in err

    rc, _, err = _cli(capsys, r, "--prompt", "hi", "--top-p", "0.9")
    assert rc == 2 and "--top-p/--top-k only apply when sampling" in err


# ---- the real default model ---------------------------------------------------------------


@pytest.mark.slow
def test_default_model_prompt_and_chat(capsys):
    q = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
         "How many clips did Natalia sell altogether in April and May?")
    rc, out, _ = _cli(capsys, "--base", "task=gsm8k", "--prompt", q, "--max-new-tokens", "48")
    assert rc == 0 and len(out.strip()) > 10
    gen = _generator(None, "task=gsm8k", base=True, max_new_tokens=48)
    assert gen.complete(gen.prompt_for_text(q)) + "\n" == out  # streamed = returned, deterministic
    rc, out, _ = _cli(capsys, "--base", "--raw", "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "24")
    assert rc == 0 and "Paris" in out

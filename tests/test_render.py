"""Prompt formats (plain / chat), multi-turn loss masking, special tokens, and eval = generate under chat.

Uses the real SmolLM2 tokenizer (ChatML template, ``<|im_end|>`` = EOS, no BOS added) and a
Llama-3-style tokenizer built offline from it (``<|begin_of_text|>`` added by the post-processor and
written by the template too: the double-BOS trap).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tunelab.config import ConfigError, TaskConfig, load_config
from tunelab.data import IGNORE_INDEX, tokenize_example
from tunelab.data.render import end_of_turn_ids as render_end_of_turn
from tunelab.data.render import (
    PLAIN_TRANSCRIPT_TEMPLATE,
    RenderError,
    encode_prompt,
    generation_prompt,
    prepare_tokenizer,
    render_example,
)
from tunelab.tasks.base import Example

CHAT = TaskConfig(prompt_format="chat")
PLAIN = TaskConfig()

LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

THREE_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]

# The real SmolLM2 ChatML rendering of THREE_TURNS, token by token, and which tokens carry a label:
# (~ = a leading space.) A = data.train_on=assistant (every assistant turn: its content and its <|im_end|>), L = train_on=last.
# The newline the template writes after <|im_end|> is context: the model stops at <|im_end|> (its EOS).
SMOL_TABLE = """\
<|im_start|> . ; system . ; \\n . ; Be . ; ~brief . ; . . ; <|im_end|> . ; \\n . ;
<|im_start|> . ; user . ; \\n . ; Hi . ; <|im_end|> . ; \\n . ;
<|im_start|> . ; ass . ; istant . ; \\n . ; Hello A ; ! A ; <|im_end|> A ; \\n . ;
<|im_start|> . ; user . ; \\n . ; 2 . ; + . ; 2 . ; ? . ; <|im_end|> . ; \\n . ;
<|im_start|> . ; ass . ; istant . ; \\n . ; 4 A ; <|im_end|> A ; \\n . ;
<|im_start|> . ; user . ; \\n . ; Capital . ; ~of . ; ~France . ; ? . ; <|im_end|> . ; \\n . ;
<|im_start|> . ; ass . ; istant . ; \\n . ; Paris AL ; . AL ; <|im_end|> AL ; \\n . ;"""


def _table() -> list[tuple[str, str]]:
    cells = [c.strip() for c in SMOL_TABLE.replace("\n", " ").rstrip(" ;").split(" ; ")]
    out = []
    for cell in cells:
        tok, mark = cell.rsplit(" ", 1)
        out.append((tok.replace("\\n", "\n").replace("~", " "), mark))
    return out


@pytest.fixture(scope="module")
def smol(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def llama3(smol):
    """A Llama-3-style tokenizer: the post-processor adds <|begin_of_text|>, the template writes it too."""
    from tokenizers import AddedToken, Tokenizer, processors

    tk = Tokenizer.from_str(smol.backend_tokenizer.to_str())
    tk.add_special_tokens([AddedToken(s, special=True) for s in
                           ("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")])
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|eot_id|>")
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def _labelled(r, tok) -> str:
    return tok.decode([i for i, l in zip(r.input_ids, r.labels) if l != IGNORE_INDEX])


# ---- masking, token by token ----------------------------------------------------------------


def test_three_turn_masking_token_by_token_with_the_real_smollm2_template(smol):
    ex = Example("c", "", "", messages=THREE_TURNS)
    rendered = {on: render_example(ex, smol, CHAT, on) for on in ("assistant", "last", "all", "auto")}
    ids = rendered["assistant"].input_ids
    assert ids == smol(smol.apply_chat_template(THREE_TURNS, tokenize=False), add_special_tokens=False)["input_ids"]
    table = _table()
    assert [smol.decode([i]) for i in ids] == [tok for tok, _ in table]
    for on, letter in (("assistant", "A"), ("last", "L")):
        labels = rendered[on].labels
        expected = [i if letter in mark else IGNORE_INDEX for i, (_, mark) in zip(ids, table)]
        assert labels == expected, on
    assert rendered["all"].labels == ids  # every token
    assert rendered["auto"].labels == rendered["assistant"].labels  # auto = assistant
    assert _labelled(rendered["assistant"], smol) == "Hello!<|im_end|>4<|im_end|>Paris.<|im_end|>"
    prompt_ids = encode_prompt(generation_prompt(ex, smol, CHAT), smol)  # what eval/generate feed for the last turn
    assert ids[: len(prompt_ids)] == prompt_ids and smol.decode(ids[len(prompt_ids)]) == "Paris"


def test_single_turn_chat_labels_the_response_and_its_end_of_turn_only(smol):
    ex = Example("0", "Question: 2+2?\nAnswer:", " 4\n#### 4")
    r = render_example(ex, smol, CHAT)
    assert _labelled(r, smol) == "4\n#### 4<|im_end|>"  # the plain template's leading space is not part of the turn
    prompt = generation_prompt(ex, smol, CHAT)
    assert prompt == smol.apply_chat_template([{"role": "user", "content": ex.prompt}], tokenize=False,
                                              add_generation_prompt=True)
    n = len(encode_prompt(prompt, smol))  # generation sees exactly training's prompt tokens, all unlabelled
    assert r.input_ids[:n] == encode_prompt(prompt, smol) and set(r.labels[:n]) == {IGNORE_INDEX}
    assert r.labels[n] != IGNORE_INDEX


def test_system_prompt_is_added_unless_the_conversation_has_one(smol):
    cfg = TaskConfig(prompt_format="chat", system_prompt="You solve math.")
    p = generation_prompt("Question: 1+1?\nAnswer:", smol, cfg)
    assert p.startswith("<|im_start|>system\nYou solve math.<|im_end|>\n<|im_start|>user\nQuestion: 1+1?")
    assert "SmolLM" not in p  # the template's default system turn is replaced
    own = generation_prompt(Example("c", "", "", messages=THREE_TURNS), smol, cfg)
    assert "Be brief." in own and "You solve math." not in own
    assert own.endswith("Capital of France?<|im_end|>\n<|im_start|>assistant\n")  # the final assistant turn removed


# ---- plain ------------------------------------------------------------------------------------


def test_plain_single_turn_is_todays_tokenization_bit_for_bit(smol):
    ex = Example("0", "Question: 2+2?\nAnswer:", " 4\n#### 4")
    prompt_ids = smol(ex.prompt, add_special_tokens=False)["input_ids"]
    response_ids = smol(ex.response, add_special_tokens=False)["input_ids"] + [smol.eos_token_id]
    for cfg in (None, PLAIN):
        t, status = tokenize_example(ex, smol, 100, "truncate", cfg)
        assert status == "ok" and t.input_ids == prompt_ids + response_ids
        assert t.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert generation_prompt(ex, smol, PLAIN) == ex.prompt and encode_prompt(ex.prompt, smol) == prompt_ids
    everything, _ = tokenize_example(ex, smol, 100, "truncate", PLAIN, "all")
    assert everything.labels == everything.input_ids


def test_plain_multi_turn_is_a_documented_transcript(smol):
    from tunelab.data.formats import plain_transcript

    ex = Example("c", "", "", messages=THREE_TURNS[:5])
    r = render_example(ex, smol, PLAIN)
    assert smol.decode(r.input_ids) == ("System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!<|im_end|>\n\n"
                                        "User: 2+2?\n\nAssistant: 4<|im_end|>")
    assert _labelled(r, smol) == " Hello!<|im_end|> 4<|im_end|>"
    assert _labelled(render_example(ex, smol, PLAIN, "last"), smol) == " 4<|im_end|>"
    prompt = generation_prompt(ex, smol, PLAIN)
    assert prompt == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!<|im_end|>\n\nUser: 2+2?\n\nAssistant:"
    assert prompt.endswith(plain_transcript(THREE_TURNS[3:4]))  # the sft task's plain prompt, same transcript
    n = len(encode_prompt(prompt, smol))
    assert r.input_ids[:n] == encode_prompt(prompt, smol) and smol.decode(r.input_ids[n:]) == " 4<|im_end|>"
    assert "Assistant:" in PLAIN_TRANSCRIPT_TEMPLATE


# ---- special tokens: no doubled BOS / EOS ------------------------------------------------------------


def test_no_double_bos_or_eos_with_smollm2(smol):
    ex = Example("c", "", "", messages=THREE_TURNS)
    r = render_example(ex, smol, CHAT)
    turn_starts = sum(1 for i in r.input_ids if i == smol.convert_tokens_to_ids("<|im_start|>"))
    assert turn_starts == len(THREE_TURNS)  # <|im_start|> (SmolLM2's bos_token) only where the template puts it
    assert r.input_ids.count(smol.eos_token_id) == len(THREE_TURNS)  # one <|im_end|> per turn, none appended
    assert r.input_ids[-2:] == [smol.eos_token_id] + smol("\n", add_special_tokens=False)["input_ids"]
    single = render_example(Example("0", "Q?", " A"), smol, CHAT)
    assert single.input_ids.count(smol.eos_token_id) == 3  # system, user, assistant


def test_llama3_style_tokenizer_double_bos_trap_is_avoided(llama3):
    bos, eot = llama3.bos_token_id, llama3.convert_tokens_to_ids("<|eot_id|>")
    ex = Example("0", "What is 2+2?", " 4")
    text = llama3.apply_chat_template([{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": "4"}],
                                      tokenize=False)
    assert llama3(text)["input_ids"][:2] == [bos, bos]  # the trap: the template's BOS plus the tokenizer's
    r = render_example(ex, llama3, CHAT)
    assert r.input_ids[0] == bos and r.input_ids.count(bos) == 1
    assert r.input_ids[-1] == eot and r.input_ids.count(eot) == 2  # user and assistant turns, no EOS appended
    assert _labelled(r, llama3) == "4<|eot_id|>"
    prompt_ids = encode_prompt(generation_prompt(ex, llama3, CHAT), llama3)
    assert prompt_ids.count(bos) == 1 and r.input_ids[: len(prompt_ids)] == prompt_ids
    # plain: the tokenizer's one BOS (added by its post-processor, not add_bos_token), in training and generation
    plain = render_example(ex, llama3, PLAIN)
    assert plain.input_ids[0] == bos and plain.input_ids.count(bos) == 1 and plain.input_ids[-1] == eot
    assert encode_prompt(ex.prompt, llama3) == plain.input_ids[: len(encode_prompt(ex.prompt, llama3))]
    multi = render_example(Example("c", "", "", messages=THREE_TURNS), llama3, CHAT)
    assert multi.input_ids.count(bos) == 1
    assert _labelled(multi, llama3) == "Hello!<|eot_id|>4<|eot_id|>Paris.<|eot_id|>"


def test_a_template_without_end_of_turn_token_gets_one_eos(smol):
    tok = AutoTokenizer.from_pretrained(smol.name_or_path)
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}" \
                        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    r = render_example(Example("0", "hi", " yo"), tok, CHAT)
    assert r.input_ids[-1] == tok.eos_token_id and r.input_ids.count(tok.eos_token_id) == 1
    assert _labelled(r, tok) == "yo\n<|im_end|>"


# ---- templates and bad input -------------------------------------------------------------------


def test_missing_chat_template_is_a_setup_error_naming_the_fix(smol, tmp_path):
    tok = AutoTokenizer.from_pretrained(smol.name_or_path)
    tok.chat_template = None
    with pytest.raises(ConfigError, match=r"task.chat_template=FILE .*task.prompt_format=plain"):
        prepare_tokenizer(tok, CHAT)
    prepare_tokenizer(tok, PLAIN)  # plain needs no template
    path = tmp_path / "chatml.jinja"
    path.write_text(smol.chat_template)
    prepare_tokenizer(tok, replace(CHAT, chat_template=str(path)))
    assert tok.chat_template == smol.chat_template  # the file's template, so a saved tokenizer carries it
    with pytest.raises(ConfigError, match="task.chat_template=.*no such file"):
        load_config(overrides=["task.prompt_format=chat", f"task.chat_template={tmp_path / 'nope.jinja'}"])


@pytest.mark.parametrize("turns, train_on, message", [
    ([], "assistant", "conversation is empty"),
    ([{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}], "assistant", "role 'human'"),
    ([{"role": "user", "content": "hi"}], "assistant", "no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}],
     "last", "ends on a user turn.*data.train_on=assistant"),
])
def test_bad_conversations_name_the_example_and_the_fix(smol, turns, train_on, message):
    with pytest.raises(RenderError, match=f"example x7: .*{message}"):
        render_example(Example("x7", "", "", messages=turns), smol, CHAT, train_on)


def test_a_template_that_is_not_prefix_stable_is_refused_with_the_fix(smol):
    tok = AutoTokenizer.from_pretrained(smol.name_or_path)
    # like templates that drop earlier turns' reasoning: only the final assistant turn is written in full
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ 'A: ...\n' }}"
                         "{% else %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    ex = Example("c", "", "", messages=THREE_TURNS)
    with pytest.raises(RenderError, match="not prefix-stable.*data.train_on=all.*task.chat_template=FILE"):
        render_example(ex, tok, CHAT)
    assert render_example(ex, tok, CHAT, "all").labels == render_example(ex, tok, CHAT, "all").input_ids


def test_overlong_chat_examples_are_truncated_or_dropped(smol):
    ex = Example("c", "", "", messages=THREE_TURNS)
    full = render_example(ex, smol, CHAT)
    first_target = next(i for i, l in enumerate(full.labels) if l != IGNORE_INDEX)
    t, status = tokenize_example(ex, smol, len(full.input_ids) - 5, "truncate", CHAT)
    assert status == "truncated" and t.input_ids == full.input_ids[:-5] and t.labels == full.labels[:-5]
    assert tokenize_example(ex, smol, len(full.input_ids) - 5, "drop", CHAT) == (None, "dropped")
    assert tokenize_example(ex, smol, first_target + 2, "truncate", CHAT) == (None, "dropped")  # < 4 target tokens


# ---- training, eval and generate in chat format ------------------------------------------------------


def test_chat_train_eval_and_generate_share_one_prompt(tiny_model_dir, tmp_path):
    from tunelab.evaluation.engine import DecodeOptions, Generator
    from tunelab.evaluation.evaluate import evaluate
    from tunelab.rundir import RunDir, resolve_target
    from tunelab.train import train

    run = tmp_path / "RUN"
    res = train(load_config(overrides=[
        f"model={tiny_model_dir}", "task=gsm8k", "task.prompt_format=chat", "task.system_prompt=Solve it.",
        "method=lora", "data.limit=8", "train.batch_size=4", "train.max_steps=2", "train.report_to=[]",
        "train.progress_bar=false", f"out={run}",
    ]))
    assert res["steps"] == 2
    results = evaluate(RunDir(run).config(["eval.limit=2", "eval.max_new_tokens=8"]), run, run)
    protocol = results["protocol"]
    assert protocol["prompt_format"] == "chat" and protocol["system_prompt"] == "Solve it."
    assert protocol["chat_template"] == "tokenizer" and protocol["num_fewshot"] == 0
    assert protocol["decoding"] == "greedy" and protocol["max_new_tokens"] == 8 and protocol["stop_rule"]
    assert json.loads((run / "eval" / "results.json").read_text())["protocol"] == protocol
    preds = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    rows = _gsm8k_test_rows(2)
    gen = Generator(resolve_target(str(run), command="generate"), DecodeOptions(max_new_tokens=8)).load()
    assert gen.settings()["prompt_format"] == "chat"
    for pred, row in zip(preds, rows):
        prompt = gen.prompt_for_row(row)  # no --chat flag: the run was trained in chat format
        assert pred["prompt"] == prompt
        assert prompt.startswith("<|im_start|>system\nSolve it.<|im_end|>\n<|im_start|>user\nQuestion: ")
        assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert gen.complete(prompt) == pred["completion"]  # a completion evaluated is what generate prints
    chat_flag = Generator(resolve_target(str(run), command="generate"), DecodeOptions(), chat=True)
    chat_flag.model, chat_flag.tokenizer = gen.model, gen.tokenizer
    assert chat_flag.prompt_for_row(rows[0]) == preds[0]["prompt"]  # --chat on a chat run changes nothing


def _gsm8k_test_rows(n: int) -> list[dict]:
    import os
    from pathlib import Path

    path = Path(os.environ["TUNELAB_DATA_DIR"]) / "gsm8k" / "test.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def test_chat_without_a_template_fails_before_training(tiny_model_dir, tmp_path):
    from tunelab.train import train

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    assert AutoTokenizer.from_pretrained(bare).chat_template is None
    with pytest.raises(ConfigError, match="has no chat template.*task.chat_template=FILE"):
        train(load_config(overrides=[
            f"model={bare}", "task=gsm8k", "task.prompt_format=chat", "method=lora", "data.limit=4",
            "train.max_steps=1", "train.report_to=[]", "train.progress_bar=false", f"out={tmp_path / 'RUN'}",
        ]))
    assert not (tmp_path / "RUN" / "metrics.jsonl").exists()


def test_end_of_turn_ids_name_the_token_a_chat_reply_stops_at(smol, llama3):
    assert render_end_of_turn(smol, CHAT) == [smol.eos_token_id]  # <|im_end|> is EOS
    eot = llama3.convert_tokens_to_ids("<|eot_id|>")
    other = PreTrainedTokenizerFast(tokenizer_object=llama3.backend_tokenizer, bos_token="<|begin_of_text|>",
                                    eos_token="<|im_end|>", pad_token="<|im_end|>")
    other.chat_template = LLAMA3_TEMPLATE
    assert render_end_of_turn(other, CHAT) == [other.eos_token_id, eot]
    assert render_end_of_turn(other, PLAIN) == [other.eos_token_id]


def test_a_run_keeps_its_chat_template_file(tiny_model_dir, tmp_path):
    """A run trained with task.chat_template=FILE keeps a copy: after the file is edited or deleted,
    `tunelab eval RUN` still renders with the template the run was trained with."""
    from tunelab.cli import main
    from tunelab.rundir import RunDir
    from tunelab.train import train

    custom = tmp_path / "custom.jinja"
    custom.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\nCUSTOM {{ m['content'] }}<|im_end|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    run = tmp_path / "RUN"
    train(load_config(overrides=[
        f"model={tiny_model_dir}", "task=gsm8k", "task.prompt_format=chat", f"task.chat_template={custom}",
        "method=lora", "data.limit=4", "train.max_steps=1", "train.report_to=[]", "train.progress_bar=false",
        f"out={run}",
    ]))
    assert (run / RunDir.CHAT_TEMPLATE_FILE).read_text() == custom.read_text()
    custom.write_text("{{ 'edited since' }}")
    assert main(["eval", str(run), "eval.limit=2", "eval.max_new_tokens=2", "eval.reference_loss=false"]) == 0
    custom.unlink()
    assert main(["eval", str(run), "eval.limit=2", "eval.max_new_tokens=2", "eval.reference_loss=false"]) == 0
    prompts = [json.loads(line)["prompt"] for line in RunDir(run).predictions_file.read_text().splitlines()]
    assert len(prompts) == 2 and all(p.startswith("<|im_start|>user\nCUSTOM Question: ") for p in prompts)

"""Row layouts of the user's data (task=sft): a row → :class:`~tunelab.tasks.base.Example`.

``data.format``:

- ``prompt_response``: fields ``prompt`` and ``response`` (strings). The plain prompt is the prompt and a
  line break (as task=jsonl's), the target the response.
- ``alpaca``: ``instruction``, ``input`` (optional, may be empty) and ``output``, with the standard
  Stanford Alpaca prompt (:data:`ALPACA_PROMPT` / :data:`ALPACA_PROMPT_NO_INPUT`); the target is the output.
- ``messages``: ``messages``, a list of turns ``{"role": system|user|assistant, "content": str}``
  (OpenAI style) or ShareGPT's ``{"from": human|gpt|system, "value": str}`` (mapped to
  user/assistant/system). ``Example.messages`` holds the whole conversation; ``prompt`` is the plain
  transcript of the turns before the final assistant turn (:func:`plain_transcript`), ``response``
  and ``reference`` that turn's content — what eval and generation use.
- ``auto``: chosen from the columns present (:func:`detect_format`); ShareGPT's ``conversations``
  column counts as ``messages``.

The user's column names are mapped onto these field names by ``data.columns`` (see
:mod:`tunelab.data.sources`). Every row is checked before anything is trained: all problems come
back at once (up to 5 shown), each naming the row — never a crash mid-run. Hand-written because the
layouts are a few lines each and no library offers them with row-level errors.
"""

from __future__ import annotations

from typing import Any

from tunelab.data.sources import DataSourceError, shown
from tunelab.tasks.base import Example

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
#: the fields of each format (optional ones included); ``id`` is optional everywhere
FIELDS: dict[str, tuple[str, ...]] = {
    "prompt_response": ("prompt", "response"),
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages",),
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "prompt_response": ("prompt", "response"),
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
}
ALL_FIELDS = ("id", *sorted({f for fs in FIELDS.values() for f in fs}))
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
#: the speaker names of the plain transcript (prompt_format=plain)
PLAIN_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def detect_format(columns: list[str], where: str) -> str:
    """The format whose required fields the columns hold; an error when none or several do."""
    have = set(columns)
    if "conversations" in have and "messages" not in have:
        have.add("messages")
    matches = [f for f, needed in REQUIRED.items() if set(needed) <= have]
    if len(matches) == 1:
        return matches[0]
    needs = "; ".join(f"{f}: {', '.join(REQUIRED[f])}" for f in REQUIRED)
    if not matches:
        raise DataSourceError(
            f"{where}: cannot tell the data's format from its columns ({', '.join(sorted(columns))}). "
            f"The formats need these columns ({needs}): set data.format and map your columns with data.columns, "
            f"e.g. data.columns={{prompt: question, response: answer}}"
        )
    raise DataSourceError(f"{where}: the columns fit several formats ({', '.join(matches)}): set data.format "
                          f"to the one meant")


def plain_transcript(turns: list[dict]) -> str:
    """Turns as plain text ('User: ...' blocks, a blank line apart), ending with the assistant's cue
    'Assistant:' — the prompt of a conversation under prompt_format=plain (the response follows after a space)."""
    blocks = [f"{PLAIN_NAMES[t['role']]}: {t['content']}" for t in turns]
    return "\n\n".join([*blocks, PLAIN_NAMES["assistant"] + ":"])


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _type_name(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _strings(row: dict, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> tuple[dict, str | None]:
    """The named fields as strings, or the first problem (a missing, null or non-string field)."""
    out = {}
    for name in names:
        value = row.get(name)
        if value is None and name in optional:
            value = ""
        if not isinstance(value, str):
            what = "missing" if name not in row else f"{_type_name(value)}, not a string"
            return out, f"field '{name}' is {what} (fields present: {', '.join(sorted(row))})"
        out[name] = value
    empty = [n for n in names if n not in optional and not out[n].strip()]
    if empty:
        return out, f"field '{empty[0]}' is empty"
    return out, None


def normalize_turns(raw: Any) -> tuple[list[dict], str | None]:
    """A conversation as [{role, content}] with roles system/user/assistant, or the problem with it."""
    if not isinstance(raw, list):
        return [], f"'messages' is {_type_name(raw)}, not a list of turns"
    if not raw:
        return [], "the conversation is empty"
    turns = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            return [], f"turn {i} is {_type_name(turn)}, not an object with role and content"
        # (datasets gives every turn of a column all the keys its rows use, the absent ones None)
        sharegpt = turn.get("role") is None and turn.get("from") is not None
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        role = turn.get(role_key)
        role = SHAREGPT_ROLES.get(role) if sharegpt else role
        if role not in ROLES:
            known = ", ".join(SHAREGPT_ROLES if sharegpt else ROLES)
            return [], f"turn {i} has the unknown role {turn.get(role_key)!r} (known: {known})"
        content = turn.get(content_key)
        if not isinstance(content, str):
            return [], (f"turn {i} ({role}): '{content_key}' is {_type_name(content)}, not a string "
                        f"(multi-part content is not supported: give the text)")
        turns.append({"role": role, "content": content})
    return turns, None


def messages_example(row: dict, idx: int, ex_id: str, need_final_assistant: bool) -> tuple[Example | None, str | None]:
    raw = row.get("messages")
    raw = row.get("conversations") if raw is None and "conversations" in row else raw
    turns, problem = normalize_turns(raw)
    if problem:
        return None, problem
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        return None, "the conversation has no assistant turn (nothing to learn or to score)"
    if need_final_assistant and last != len(turns) - 1:
        return None, (f"the conversation ends on a {turns[-1]['role']} turn, after its last assistant turn: with "
                      f"data.train_on=last and for evaluation it must end on the assistant turn (drop the trailing turns)")
    if not turns[last]["content"].strip():
        return None, f"turn {last} (the final assistant turn) is empty"
    context = turns[:last]
    response = turns[last]["content"]
    return Example(id=ex_id, prompt=plain_transcript(context), response=" " + response.strip(),
                   reference=response.strip(), messages=turns), None


def to_example(row: dict, idx: int, fmt: str, need_final_assistant: bool = False) -> tuple[Example | None, str | None]:
    """(Example, None) for a usable row of format ``fmt``, else (None, the problem)."""
    ex_id = row.get("id")
    ex_id = str(ex_id) if isinstance(ex_id, (str, int)) and not isinstance(ex_id, bool) and str(ex_id) else str(idx)
    if fmt == "messages":
        return messages_example(row, idx, ex_id, need_final_assistant)
    if fmt == "alpaca":
        got, problem = _strings(row, ("instruction", "input", "output"), optional=("input",))
        if problem:
            return None, problem
        prompt, response = alpaca_prompt(got["instruction"], got["input"]), got["output"]
    elif fmt == "prompt_response":
        got, problem = _strings(row, ("prompt", "response"))
        if problem:
            return None, problem
        prompt, response = got["prompt"] + "\n", got["response"]
    else:
        raise ValueError(f"unknown data.format '{fmt}' (known: {', '.join(FIELDS)}, auto)")
    return Example(id=ex_id, prompt=prompt, response=response, reference=response.strip()), None


def rows_to_examples(rows: list[dict], fmt: str, where: str, need_final_assistant: bool = False) -> list[Example]:
    """Every row → Example; any bad row is an error naming it (all problems at once, up to 5 shown)."""
    out, problems = [], []
    for idx, row in enumerate(rows):
        ex, problem = to_example(row, idx, fmt, need_final_assistant)
        if problem:
            problems.append(f"row {idx}: {problem}")
        else:
            out.append(ex)
    if problems:
        raise DataSourceError(f"{where}: {len(problems)} of {len(rows)} row(s) cannot be used as data.format={fmt} "
                              f"(fix or remove them):{shown(problems)}")
    ids = [e.id for e in out]
    if len(set(ids)) != len(ids):  # a user 'id' column with repeats: ids must tell examples apart
        for idx, ex in enumerate(out):
            ex.id = str(idx)
    return out

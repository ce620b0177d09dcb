"""Rendering: an example (or a prompt) → the exact text and token ids the model sees.

The one place where ``task.prompt_format`` is applied, for training (:func:`render_example`,
through ``tokenize_example``), eval's reference loss, eval's generation and ``tunelab generate``
(:func:`generation_prompt`, then :func:`encode_prompt`), so a completion evaluated is exactly what
``generate`` prints and the model is asked the way it was taught.

Formats
  * ``plain``: the task's own template, today's behaviour. A single-turn example is
    ``prompt + response + EOS`` (prompt and response tokenized apart, as the original project
    did), labels on the response and EOS. A multi-turn example (``Example.messages``) is written
    as a transcript, ``User: …\\n\\nAssistant: …<EOS>\\n\\nUser: …\\n\\nAssistant: …<EOS>`` (a system turn
    first as ``System: …``; :data:`PLAIN_TRANSCRIPT_TEMPLATE`), and its generation prompt ends in
    ``Assistant:``, as :func:`tunelab.data.formats.plain_transcript` writes it.
  * ``chat``: ``tokenizer.apply_chat_template`` (or ``task.chat_template``, a Jinja file): an
    optional ``task.system_prompt`` turn, the task's prompt as the user turn, the response
    (stripped of the leading space plain templates put before it) as the assistant turn; the
    generation prompt is rendered with ``add_generation_prompt=True``. ``Example.messages`` is
    rendered as the whole conversation; ``task.system_prompt`` is added only to conversations
    without a system turn of their own.

Special tokens. Rendered text is tokenized with ``add_special_tokens=False`` (a chat template
already writes BOS and end-of-turn tokens: tokenizing its text with special tokens on gives
Llama-3's double ``<|begin_of_text|>``), and one BOS is put first only where the tokenizer uses
one and the text does not already start with it (:func:`encode_text`). No EOS is appended to a
chat conversation whose final assistant turn already closes with a special token (``<|im_end|>``,
``<|eot_id|>``).

Loss masking (``data.train_on``): ``assistant`` (= ``auto``) labels every assistant turn's content
and its end-of-turn token(s) (up to and including the turn's last special token; a newline the
template writes after it is context), ``last`` only the final assistant turn, ``all`` every token.
Turn boundaries come from rendering prefixes of the conversation (up to the assistant header of
turn k, and through turn k) and checking that each is the start of the whole rendering; a template
that is not prefix-stable (one that rewrites earlier turns) gets an error naming the fix
(``train_on=all`` needs no boundaries). The text is tokenized piece by piece at those boundaries,
as plain tokenizes prompt and response apart: a single-turn prompt is then exactly
``encode_prompt(generation_prompt(...))`` even where a header's trailing whitespace would merge with
the turn's first token (GPT-2-style pre-tokenizers and ``\n\n`` headers); in a multi-turn prompt
only such a template's earlier boundaries can tokenize differently (ChatML's never do: they fall
on special tokens).
Hand-written because transformers' ``return_assistant_tokens_mask`` needs ``{% generation %}``
markers that few shipped templates (SmolLM2's and Llama-3's included) have.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Union

from tunelab.config import ConfigError

if TYPE_CHECKING:
    from tunelab.config import TaskConfig
    from tunelab.tasks.base import Example

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")

#: ``prompt_format=plain`` for multi-turn examples: 'Role: text' blocks a blank line apart, each
#: assistant turn closed by EOS; the generation prompt ends with the cue 'Assistant:' (the reply
#: follows after a space). The same transcript as :func:`tunelab.data.formats.plain_transcript`.
PLAIN_TRANSCRIPT_TEMPLATE = (
    "{% set names = {'system': 'System', 'user': 'User', 'assistant': 'Assistant'} %}"
    "{% for m in messages %}{% if not loop.first %}{{ '\n\n' }}{% endif %}"
    "{{ names[m['role']] + ': ' + m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\n\n' }}{% endif %}{{ 'Assistant:' }}{% endif %}"
)


class RenderError(ValueError):
    """An example (or a tokenizer's template) that cannot be rendered; the message names the fix."""


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------


#: tokenizer -> (bos id, add_bos_token, its post-processor adds BOS): probed once per tokenizer
_BOS_PROBES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS first: ``add_bos_token`` (Llama-2) or its post-processor (Llama-3)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    flag = bool(getattr(tokenizer, "add_bos_token", False))
    cached = _BOS_PROBES.get(tokenizer)
    if cached is None or cached[:2] != (bos, flag):
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        by_post_processor = bool(probe) and probe[0] == bos and \
            tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]
        cached = (bos, flag, by_post_processor)
        _BOS_PROBES[tokenizer] = cached
    return flag or cached[2]


def encode_text(text: str, tokenizer) -> list[int]:
    """Token ids of rendered text: no special tokens added, except one BOS where the tokenizer uses one
    and the text does not already begin with it (a chat template that writes ``bos_token`` itself)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_prompt(text: str, tokenizer) -> list[int]:
    """Token ids of a fully rendered prompt (:func:`generation_prompt`), as generation feeds them to the model:
    the same ids training gives that prompt (one BOS where the tokenizer uses one, never two)."""
    return encode_text(text, tokenizer)


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    for idx, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            ids.add(int(idx))
    return ids


# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _read_template(path: str, mtime_ns: int) -> str:
    return Path(path).read_text()


def template_file(task_cfg: "TaskConfig") -> str | None:
    """The text of ``task.chat_template`` (None when unset)."""
    path = getattr(task_cfg, "chat_template", None)
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError([f"task.chat_template={path}: no such file (give a Jinja chat-template file, "
                           f"or unset it to use the tokenizer's own template)"])
    return _read_template(str(p.resolve()), p.stat().st_mtime_ns)


def chat_template(tokenizer, task_cfg: "TaskConfig") -> str:
    """The Jinja template chat rendering uses: ``task.chat_template``'s file, else the tokenizer's own."""
    text = template_file(task_cfg) or getattr(tokenizer, "chat_template", None)
    if not text:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError([
            f"task.prompt_format=chat: the tokenizer of {name} has no chat template; give one with "
            f"task.chat_template=FILE (a Jinja chat-template file), or use task.prompt_format=plain"
        ])
    if isinstance(text, dict):  # named templates (tokenizer_config.json "chat_template": [{name, template}])
        text = text.get("default") or next(iter(text.values()))
    return text


def prepare_tokenizer(tokenizer, task_cfg: "TaskConfig") -> None:
    """Check at load time that ``task_cfg``'s format can be rendered with this tokenizer; with
    ``task.chat_template`` the tokenizer takes that template (so a saved tokenizer carries it)."""
    if task_cfg.prompt_format != "chat":
        return
    custom = template_file(task_cfg)
    if custom:
        tokenizer.chat_template = custom
    chat_template(tokenizer, task_cfg)


def describe_format(tokenizer, task_cfg: "TaskConfig") -> dict:
    """How prompts were rendered (results.json's protocol, generate's settings)."""
    out = {"prompt_format": task_cfg.prompt_format, "system_prompt": task_cfg.system_prompt,
           "chat_template": None, "chat_template_sha256": None}
    if task_cfg.prompt_format == "chat":
        text = chat_template(tokenizer, task_cfg)
        out["chat_template"] = f"file:{task_cfg.chat_template}" if task_cfg.chat_template else "tokenizer"
        out["chat_template_sha256"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


def _apply(tokenizer, template: str, messages: list[dict], generation: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation)
    except Exception as exc:  # jinja2 errors, a template's raise_exception("roles must alternate ...")
        raise RenderError(f"the chat template cannot render this conversation ({exc}); roles: "
                          f"{[m['role'] for m in messages]}") from exc


def end_of_turn_ids(tokenizer, task_cfg: "TaskConfig") -> list[int]:
    """Token ids that end a generated reply: EOS, plus (chat) the special token closing the template's
    assistant turn where it is not EOS (Llama-3's ``<|eot_id|>`` under an ``<|end_of_text|>`` EOS)."""
    ids = [tokenizer.eos_token_id]
    if task_cfg.prompt_format == "chat":
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        try:
            closing = render_example(_probe_example(probe), tokenizer, task_cfg, "last")
        except (RenderError, ConfigError):
            return ids
        labelled = [i for i, l in zip(closing.input_ids, closing.labels) if l != IGNORE_INDEX]
        if labelled and labelled[-1] in _special_ids(tokenizer) and labelled[-1] not in ids:
            ids.append(labelled[-1])
    return ids


def _probe_example(turns: list[dict]) -> "Example":
    from tunelab.tasks.base import Example

    return Example(id="probe", prompt="", response="", messages=turns)


# --------------------------------------------------------------------------------------------
# Conversations
# --------------------------------------------------------------------------------------------


def conversation(item: Union["Example", str], task_cfg: "TaskConfig") -> list[dict]:
    """The turns an example (or a task-formatted prompt) is rendered from, with the configured system turn."""
    if isinstance(item, str):
        turns = [{"role": "user", "content": item}]
    elif item.messages is not None:
        turns = [{"role": m["role"], "content": m["content"]} for m in item.messages]
    else:
        turns = [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": item.response.strip()}]
    system = getattr(task_cfg, "system_prompt", None)
    if system and task_cfg.prompt_format == "chat" and not (turns and turns[0]["role"] == "system"):
        turns = [{"role": "system", "content": system}] + turns
    return turns


def check_conversation(turns: list[dict], train_on: str, where: str) -> None:
    """Bad conversations get an error naming the example and the fix."""
    if not turns:
        raise RenderError(f"{where}: the conversation is empty: give it at least a user and an assistant turn")
    for i, t in enumerate(turns):
        if t.get("role") not in ROLES:
            raise RenderError(f"{where}: turn {i} has role {t.get('role')!r}; roles are {', '.join(ROLES)} "
                              f"(map other names with data.columns or fix the data)")
        if not isinstance(t.get("content"), str):
            raise RenderError(f"{where}: turn {i} ({t['role']}) has no text content")
    if not any(t["role"] == "assistant" for t in turns):
        raise RenderError(f"{where}: the conversation has no assistant turn, so there is nothing to train on")
    if train_on == "last" and turns[-1]["role"] != "assistant":
        raise RenderError(f"{where}: the conversation ends on a {turns[-1]['role']} turn, so data.train_on=last "
                          f"has no final assistant turn to train; drop the trailing turn or use data.train_on=assistant")


def _template_for(tokenizer, task_cfg) -> str:
    if task_cfg.prompt_format == "chat":
        return chat_template(tokenizer, task_cfg)
    return PLAIN_TRANSCRIPT_TEMPLATE


def generation_prompt(item: Union["Example", str], tokenizer, task_cfg: "TaskConfig") -> str:
    """The text the model is asked to complete: for a task-formatted prompt (str) or an example.

    ``plain``: the prompt itself (a multi-turn example: its transcript up to the final assistant
    turn, ending in ``Assistant:``). ``chat``: the conversation up to the final assistant turn with
    the template's generation prompt.
    """
    single = isinstance(item, str) or item.messages is None
    if task_cfg.prompt_format != "chat" and single:
        return item if isinstance(item, str) else item.prompt
    turns = conversation(item, task_cfg)
    if turns and turns[-1]["role"] == "assistant":
        turns = turns[:-1]
    return _apply(tokenizer, _template_for(tokenizer, task_cfg), turns, generation=True)


# --------------------------------------------------------------------------------------------
# Training sequences
# --------------------------------------------------------------------------------------------


def render_example(ex: "Example", tokenizer, task_cfg: "TaskConfig | None" = None, train_on: str = "auto") -> Rendered:
    """Token ids and labels (-100 where no loss) of a training/reference example, untruncated."""
    train_on = "assistant" if train_on == "auto" else train_on
    fmt = task_cfg.prompt_format if task_cfg is not None else "plain"
    if fmt != "chat" and ex.messages is None:
        return _plain_single(ex, tokenizer, train_on)
    turns = conversation(ex, task_cfg)
    check_conversation(turns, train_on, f"example {ex.id}")
    template = _template_for(tokenizer, task_cfg)
    return _render_turns(turns, tokenizer, template, train_on, ex.id)


def _plain_single(ex: "Example", tokenizer, train_on: str) -> Rendered:
    """Today's plain example, bit for bit: [BOS] prompt, then response + EOS, tokenized apart."""
    prompt_ids = encode_text(ex.prompt, tokenizer)
    response_ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_labels = list(prompt_ids) if train_on == "all" else [IGNORE_INDEX] * len(prompt_ids)
    return Rendered(prompt_ids + response_ids, prompt_labels + response_ids)


def _render_turns(turns: list[dict], tokenizer, template: str, train_on: str, ex_id: str) -> Rendered:
    full = _apply(tokenizer, template, turns, generation=False)
    assistant_turns = [k for k, t in enumerate(turns) if t["role"] == "assistant"]
    try:
        spans = _assistant_spans(tokenizer, template, turns, full, assistant_turns, ex_id)
    except RenderError:
        if train_on != "all":
            raise
        ids = encode_text(full, tokenizer)  # every token trained: no turn boundaries needed
        return Rendered(ids, list(ids))
    trained = set(assistant_turns[-1:] if train_on == "last" else assistant_turns)
    special = _special_ids(tokenizer)
    # Tokenized piece by piece at the turn boundaries, so the tokens before each assistant turn are
    # exactly encode_prompt(generation prompt): a boundary token never merges with the turn's text.
    pos = spans[0][1] if spans else len(full)
    ids = encode_text(full[:pos], tokenizer)
    labels = list(ids) if train_on == "all" else [IGNORE_INDEX] * len(ids)
    ends_closed = True  # whether the final assistant turn closes with a special token
    for k, start, end in spans:
        if start > pos:  # context between the previous turn's end and this turn's assistant header
            ctx = tokenizer(full[pos:start], add_special_tokens=False)["input_ids"]
            ids += ctx
            labels += list(ctx) if train_on == "all" else [IGNORE_INDEX] * len(ctx)
        span = tokenizer(full[start:end], add_special_tokens=False)["input_ids"]
        # label up to the turn's last special token (its end-of-turn); what follows is the template's separator
        closing = [i for i, tok in enumerate(span) if tok in special]
        stop = closing[-1] + 1 if closing else len(span)
        if train_on == "all":
            labels += list(span)
        elif k in trained:
            labels += span[:stop] + [IGNORE_INDEX] * (len(span) - stop)
        else:
            labels += [IGNORE_INDEX] * len(span)
        ids += span
        pos = end
        ends_closed = bool(closing)
    if pos < len(full):
        tail = tokenizer(full[pos:], add_special_tokens=False)["input_ids"]
        ids += tail
        labels += list(tail) if train_on == "all" else [IGNORE_INDEX] * len(tail)
    if trained and max(trained) == len(turns) - 1 and not ends_closed:
        # a template without an end-of-turn token: teach the model to stop with EOS
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    return Rendered(ids, labels)


def _assistant_spans(tokenizer, template: str, turns: list[dict], full: str, assistant_turns: list[int],
                     ex_id: str) -> list[tuple[int, int, int]]:
    """(turn, start, end) character spans of the assistant turns in ``full``: from the end of the conversation
    rendered up to the turn's assistant header to the end of it rendered through the turn."""
    spans, pos = [], 0
    for k in assistant_turns:
        head = _apply(tokenizer, template, turns[:k], generation=True)
        upto = _apply(tokenizer, template, turns[: k + 1], generation=False)
        if not (full.startswith(head) and full.startswith(upto) and pos <= len(head) <= len(upto)):
            raise RenderError(
                f"example {ex_id}: the chat template is not prefix-stable: the conversation rendered up to "
                f"turn {k} is not the start of the whole conversation's rendering (a template that rewrites "
                f"earlier turns), so the assistant turns cannot be located: use data.train_on=all, or "
                f"task.chat_template=FILE with a prefix-stable template"
            )
        spans.append((k, len(head), len(upto)))
        pos = len(upto)
    return spans

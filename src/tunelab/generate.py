"""``tunelab generate``: use a trained run (or the base model) on one prompt, a JSONL file, or interactively.

Everything that decides *what the model sees and what counts as its answer* is shared with
evaluation, so a generated completion is the completion ``tunelab eval`` would score:

* the model is loaded by :func:`tunelab.evaluate.load_model_for_eval` (a run's adapter or full
  checkpoint applied unmerged, a merged/plain HF folder, or the base model of a ``BASE`` run);
* the prompt is built by the run's task template (GSM8K: ``Question: ...\\nAnswer:``) unless
  ``--raw``; ``--chat`` additionally wraps it in the tokenizer's chat template;
* decoding goes through :func:`tunelab.evaluate.generate` (length-sorted, left-padded batches, the
  task's stopping rule checked per row) and :meth:`Task.trim_completion`.

Modes: ``--prompt TEXT`` (streams the answer to stdout), ``--input IN.jsonl --output OUT.jsonl``
(batched, resumable: ids already in OUT are skipped, a half-written last line is dropped), and
``--interactive`` (keeps the model loaded; a prompt ends with an empty line; Ctrl-C stops the
current answer, Ctrl-D or Ctrl-C at the prompt quits).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import string
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TextIO

import torch

from tunelab.config import ConfigError, EvalConfig, RunConfig, load_config, opt
from tunelab.tasks import Task, get_task
from tunelab.utils import iter_jsonl, append_jsonl, atomic_write_json, log, seed_everything

__all__ = [
    "DecodeOptions",
    "Generator",
    "InputItem",
    "add_cli",
    "cmd_generate",
    "format_input",
    "prepare_batch",
    "read_input",
    "resolve_target",
    "run_batch",
]

#: ``--input`` rows are generated in chunks of this many rows (length-sorted within a chunk).
#: Inputs of at most this many rows are batched exactly like ``tunelab eval`` batches its test set.
CHUNK_ROWS = 4096


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@dataclass
class DecodeOptions:
    """Decoding settings of ``tunelab generate`` (the CLI flags); greedy unless a temperature is set."""

    max_new_tokens: Optional[int] = opt(None, "Maximum generated tokens (default: the run's eval.max_new_tokens).")
    temperature: float = opt(0.0, "Sampling temperature; 0 = greedy decoding (the default, as in eval).")
    top_p: Optional[float] = opt(None, "Nucleus sampling: keep the smallest token set with this probability mass (needs --temperature > 0).")
    top_k: Optional[int] = opt(None, "Sample only among the k most likely tokens (needs --temperature > 0).")
    stop: list[str] = opt(factory=list, help="Stop when the completion contains this string (repeatable; the string is cut off; \\n and \\t are understood).")
    seed: Optional[int] = opt(None, "Seed of the sampling RNG, set before each prompt (interactive) or batch chunk (default: the run's seed). Greedy decoding ignores it.")
    task_stop: Optional[bool] = opt(None, "Apply the task's stopping rule and trim (GSM8K: stop after the '#### <answer>' line). Default: on, off with --raw.")
    batch_size: Optional[int] = opt(None, "Prompts per batch in --input mode (default: the run's eval.batch_size).")

    def problems(self) -> list[str]:
        p = []
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            p.append(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            p.append(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            p.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            p.append(f"--top-k must be >= 1, got {self.top_k}")
        if self.temperature == 0 and (self.top_p is not None or self.top_k is not None):
            p.append("--top-p/--top-k only apply when sampling: add --temperature (e.g. --temperature 0.7)")
        if any(s == "" for s in self.stop):
            p.append("--stop needs a non-empty string")
        if self.batch_size is not None and self.batch_size < 1:
            p.append(f"--batch-size must be >= 1, got {self.batch_size}")
        return p

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def sampling_kwargs(self) -> dict[str, Any]:
        """Extra ``model.generate`` kwargs (on top of eval's greedy settings)."""
        if not self.sampling:
            return {}
        kw: dict[str, Any] = {"do_sample": True, "temperature": self.temperature}
        if self.top_p is not None:
            kw["top_p"] = self.top_p
        if self.top_k is not None:
            kw["top_k"] = self.top_k
        return kw


def _unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` in a --stop string (a newline is awkward to type in a shell)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# --------------------------------------------------------------------------------------------
# What RUN is
# --------------------------------------------------------------------------------------------


@dataclass
class Target:
    """The resolved RUN argument: its config, the run directory whose artifact applies (None = plain model)."""

    cfg: RunConfig
    run_dir: Optional[Path]
    description: str
    #: what a resumed batch output must have been generated with (absolute paths)
    key: str = ""


def resolve_target(target: str | None, base: bool, config: str | None, overrides: list[str]) -> Target:
    """RUN (run directory, BASE run, merged/plain HF folder) or ``--base``, resolved the way ``tunelab eval`` does."""
    from tunelab.evaluate import describe_dir, is_run_dir, run_config

    if base:
        if target is not None:
            raise ConfigError([f"--base uses the untrained model: drop '{target}' or drop --base"])
        cfg = load_config(config, overrides)
        return Target(cfg, None, f"the base model {cfg.model.name}", f"base:{cfg.model.name}")
    if target is None:
        raise ConfigError(["tunelab generate needs a run directory (tunelab generate RUN ...) or --base task=NAME"])
    path = Path(target)
    if not path.exists():
        raise ConfigError([f"'{target}' does not exist: pass a run directory, a model folder, or --base"])
    if config is not None:
        raise ConfigError(["--config only applies with --base (a run directory carries its own config.yaml)"])
    if is_run_dir(path):
        cfg = run_config(path, overrides)
        if (path / "BASE").is_file():
            return Target(cfg, None, f"the base model {cfg.model.name} (base run {path})", f"base:{cfg.model.name}")
        return Target(cfg, path, f"run {path} ({cfg.method.name})", f"run:{path.resolve()}")
    if (path / "config.json").is_file():  # a merged or plain HF folder
        merged_of = path.parent if is_run_dir(path.parent) else None
        raw_over = [f"model={path}", *overrides]
        if merged_of:
            run_cfg = run_config(merged_of, [])
            cfg = load_config(overrides=[f"task={run_cfg.task.name}", *raw_over])
            cfg.task = run_cfg.task
        else:
            cfg = load_config(overrides=raw_over)
        return Target(cfg, None, f"model folder {path}" + (f" (merged from {merged_of})" if merged_of else ""),
                      f"model:{path.resolve()}")
    raise FileNotFoundError(
        f"'{target}' holds no model: it is neither a run directory (config.yaml) nor a model folder "
        f"(config.json); it has: {describe_dir(path)}"
    )


# --------------------------------------------------------------------------------------------
# Prompt formatting: the run's task template
# --------------------------------------------------------------------------------------------
#
# The task contract builds prompts inside ``to_example(row)``, which also needs the response (GSM8K
# skips rows without an answer). Until tasks expose prompt-only hooks (``input_fields`` and
# ``format_prompt(row, tokenizer, max_prompt_tokens)``, used here as soon as a task defines them),
# this table says, per task, which row fields the prompt is built from and how; the first field is
# the one a single user input (--prompt, --interactive, --field) fills. A task in neither still
# works on --input rows that hold its full fields (via to_example, as eval builds prompts).


def _get(row: dict, path: str) -> Any:
    """``row[path]``, where a dotted path walks nested objects (``prediction.0.text``); None when missing."""
    if path in row:
        return row[path]
    node: Any = row
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _nested(path: str, value: Any) -> dict:
    """A row holding ``value`` at a (dotted) field path: {"a": {"b": value}} for "a.b"."""
    out: Any = value
    for part in reversed(path.split(".")):
        out = {part: out}
    return out


@dataclass(frozen=True)
class _TaskInput:
    """How generate builds a task's prompt from a row of its input fields (no response needed)."""

    fields: Callable[[Task], list[str]]
    #: (task, row, tokenizer, max_prompt_tokens) -> prompt, exactly as the task builds eval prompts
    build: Callable[[Task, dict, Any, Optional[int]], str]


def _template_fields(template: str) -> list[str]:
    return list(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(template) if f))


def _summary_prompt(task: Task, row: dict, tokenizer, max_prompt_tokens: int | None) -> str:
    """The summarization tasks' eval prompt (article cut to the token budget) for a row without a summary.

    ``to_example`` skips rows without a summary, so one is filled in; with ``for_training=False``
    (how eval builds prompts) the summary does not affect the prompt.
    """
    article_f, summary_f, _ = task.fields()
    article = str(_get(row, article_f))
    filled = _merge(_nested(article_f, article), _nested(summary_f, "-"))
    ex = task.to_example(filled, 0, tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens, for_training=False)
    if ex is None:
        raise ValueError(
            f"the article leaves fewer than task.min_article_tokens={task.config.min_article_tokens} tokens in the "
            f"prompt budget of {max_prompt_tokens} tokens: raise data.max_length or lower --max-new-tokens"
        )
    return ex.prompt


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


_SUMMARY_INPUT = _TaskInput(lambda task: [task.fields()[0]], _summary_prompt)

_TASK_INPUTS: dict[str, _TaskInput] = {
    "gsm8k": _TaskInput(lambda task: ["question"], lambda task, row, tok, n: task.build_prompt(str(row["question"]))),
    "jsonl": _TaskInput(
        lambda task: _template_fields(task.config.template),
        lambda task, row, tok, n: task.config.template.format(**row),
    ),
    "summarization": _SUMMARY_INPUT,
    "news_summary": _SUMMARY_INPUT,
}


def _task_defines(task: Task, hook: str) -> bool:
    """True when the task's class provides ``hook`` itself (not just a base-class default)."""
    own = getattr(type(task), hook, None)
    return own is not None and own is not getattr(Task, hook, None)


def task_input_fields(task: Task) -> list[str] | None:
    """The row fields the task's prompt is built from (None: the task does not say)."""
    if _task_defines(task, "input_fields") and task.input_fields:
        return list(task.input_fields)
    spec = _TASK_INPUTS.get(task.name)
    return spec.fields(task) if spec else None


def format_row(task: Task, row: dict, idx: int = 0, tokenizer=None, max_prompt_tokens: int | None = None) -> str:
    """The task's prompt for a row of its own fields (a response is not needed)."""
    if _task_defines(task, "format_prompt"):
        return task.format_prompt(row, tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens)
    spec = _TASK_INPUTS.get(task.name)
    if spec is not None:
        return spec.build(task, row, tokenizer, max_prompt_tokens)
    ex = task.to_example(row, idx, tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens)
    if ex is None:
        raise ValueError(
            f"task '{task.name}' could not build a prompt from this row (fields present: {sorted(row)}); "
            f"give the row all of the task's fields, or use --field NAME --raw"
        )
    return ex.prompt


def format_input(task: Task, text: str, tokenizer=None, max_prompt_tokens: int | None = None) -> str:
    """The task's prompt for one user input (GSM8K: the question)."""
    if _task_defines(task, "format_input"):
        return task.format_input(text)
    fields = task_input_fields(task)
    if not fields:
        raise ValueError(
            f"task '{task.name}' does not say which field a single prompt fills: use --raw (the text is the "
            f"whole prompt), or --input with rows that hold the task's fields"
        )
    if len(fields) > 1:
        raise ValueError(
            f"task '{task.name}' builds its prompt from several fields {fields}: a single prompt fills only one; "
            f"use --input with rows holding {fields}, or --raw"
        )
    return format_row(task, _nested(fields[0], text), 0, tokenizer, max_prompt_tokens)


# --------------------------------------------------------------------------------------------
# Input file
# --------------------------------------------------------------------------------------------


@dataclass
class InputItem:
    """One row of --input: its id, line number and the text the prompt is made of."""

    id: str
    line: int
    row: dict


def read_input(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a JSONL file; a malformed line raises naming the file and line."""
    if not path.is_file():
        where = path.parent if path.parent.is_dir() else None
        have = sorted(p.name for p in where.glob("*.jsonl"))[:8] if where else []
        raise FileNotFoundError(
            f"--input {path} does not exist"
            + (f" ({where} has: {', '.join(have)})" if have else "")
        )
    rows = list(iter_jsonl(path))
    if not rows:
        raise ValueError(f"--input {path} holds no rows")
    return rows


def input_items(path: Path, rows: list[tuple[int, dict]], fields: list[str] | None, id_field: str) -> list[InputItem]:
    """Check the rows (fields present, not empty, unique ids); every problem is reported, up to 5 lines each."""
    missing, empty, seen, dups = [], [], {}, []
    items = []
    for idx, (lineno, row) in enumerate(rows):
        has_id = row.get(id_field) is not None
        item_id = str(row[id_field]) if has_id else str(idx)  # the row index, as eval numbers rows
        if item_id in seen:
            how = "" if has_id else f" (its row index: the row has no '{id_field}')"
            dups.append(f"{path}:{lineno}: id '{item_id}'{how} already used on line {seen[item_id]}")
        else:
            seen[item_id] = lineno
        if fields:
            absent = [f for f in fields if _get(row, f) is None]
            if absent:
                missing.append(f"{path}:{lineno}: no field {absent if len(absent) > 1 else repr(absent[0])}; fields present: {sorted(row)}")
                continue
            blank = [f for f in fields if not str(_get(row, f)).strip()]
            if blank:
                empty.append(f"{path}:{lineno}: empty prompt (field {blank[0]!r} is blank)")
                continue
        items.append(InputItem(item_id, lineno, row))
    problems = []
    for kind, lines, fix in (
        ("row(s) lack the prompt field", missing, "choose the field with --field NAME"),
        ("row(s) have an empty prompt", empty, "fill or remove those lines"),
        ("id(s) are repeated (resuming needs unique ids)", dups, f"make the '{id_field}' field unique or pick another with --id-field"),
    ):
        if lines:
            shown = "\n  ".join(lines[:5]) + (f"\n  ... and {len(lines) - 5} more" if len(lines) > 5 else "")
            problems.append(f"{len(lines)} {kind}; {fix}:\n  {shown}")
    if problems:
        raise ValueError("\n".join(problems))
    return items


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


class TaskStreamer:
    """A ``model.generate`` streamer that writes the completion as it grows, exactly as it will be returned.

    Text is held back while it could still change: a partial word or character, a tail that may be
    the start of a --stop string, or text the task's trim would cut (GSM8K: trailing whitespace,
    ``\\nQuestion:``). What has been written is always a prefix of the final completion.
    """

    def __init__(self, tokenizer, finalize: Callable[[str], str], stops: list[str], out: TextIO | None = None):
        self.tokenizer, self.finalize, self.stops = tokenizer, finalize, stops
        self.out = out
        self.ids: list[int] = []
        self.written = ""
        self._prompt_seen = False

    def _write(self, text: str) -> None:
        if text:
            out = self.out or sys.stdout
            out.write(text)
            out.flush()
            self.written += text

    def _stable(self, text: str) -> int:
        """Length of the prefix of ``text`` that no later token or trim can change."""
        n = len(text)
        if not text.endswith("\n"):
            space = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
            n = space + 1 if space >= 0 else 0
        for s in self.stops:  # a tail that may grow into a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    n = min(n, len(text) - k)
                    break
        final = self.finalize(text)
        common = len(os.path.commonprefix([text, final]))
        return min(n, common)

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt
            self._prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character
            return
        stable = text[: self._stable(text)]
        if stable.startswith(self.written):
            self._write(stable[len(self.written):])

    def end(self) -> None:
        text = self.finalize(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        if text.startswith(self.written):
            self._write(text[len(self.written):])


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------


class Generator:
    """The run's task, generation settings and decoding options, and (after :meth:`load`) its model."""

    def __init__(self, target: Target, options: DecodeOptions, raw: bool = False, chat: bool = False,
                 device: torch.device | None = None):
        from tunelab.evaluate import generation_settings

        cfg = target.cfg
        self.target, self.options, self.raw, self.chat = target, options, raw, chat
        self.task: Task = get_task(cfg.task.name)(cfg.task)
        eval_cfg: EvalConfig = generation_settings(self.task, cfg.eval)
        if options.max_new_tokens is not None:
            eval_cfg = replace(eval_cfg, max_new_tokens=options.max_new_tokens)
        if options.batch_size is not None:
            eval_cfg = replace(eval_cfg, batch_size=options.batch_size)
        self.eval_cfg = eval_cfg
        self.task_stop = (not raw) if options.task_stop is None else options.task_stop
        self.stops = [_unescape(s) for s in options.stop]
        self.seed = cfg.seed if options.seed is None else options.seed
        # the same prompt budget eval gives to_example (tasks that truncate long inputs use it)
        self.max_prompt_tokens = max(8, cfg.data.max_length - eval_cfg.max_new_tokens)
        self.device = device
        self.model = self.tokenizer = None

    def load(self) -> "Generator":
        """Load the model and tokenizer (once); everything before this is cheap checking."""
        from tunelab.evaluate import load_model_for_eval

        if self.model is None:
            cfg = self.target.cfg
            log.info(f"loading {self.target.description}")
            self.model, self.tokenizer = load_model_for_eval(cfg, self.target.run_dir, self.device)
            if self.chat and not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"--chat: the tokenizer of {cfg.model.name} has no chat template; drop --chat")
        return self

    def _seed(self) -> None:
        # seeded per call: a prompt with the same seed gets the same sample, whatever was asked before
        if self.options.sampling:
            seed_everything(self.seed)

    # ---- prompts -------------------------------------------------------------------------------
    def _wrap(self, prompt: str) -> str:
        self.load()
        if not self.chat:
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def prompt_for_text(self, text: str) -> str:
        """The model's prompt for one user input: the task template (unless raw), the chat template (if chat)."""
        if not text.strip():
            raise ValueError("the prompt is empty: pass the text to complete (e.g. --prompt \"What is 7*6?\")")
        if self.raw:
            return self._wrap(text)
        self.load()  # format_input may need the tokenizer (tasks that truncate long inputs)
        return self._wrap(format_input(self.task, text, self.tokenizer, self.max_prompt_tokens))

    def prompt_for_item(self, item: InputItem, field: str | None, index: int) -> str:
        self.load()
        if field is not None:
            return self.prompt_for_text(str(_get(item.row, field)))
        return self._wrap(format_row(self.task, item.row, index, self.tokenizer, self.max_prompt_tokens))

    # ---- completions ----------------------------------------------------------------------------
    def stop_check(self) -> Callable[[str], bool] | None:
        task_check = self.task.stop_checker() if self.task_stop else None
        stops = self.stops
        if not stops:
            return task_check
        if task_check is None:
            return lambda text: any(s in text for s in stops)
        return lambda text: any(s in text for s in stops) or bool(task_check(text))

    def finalize(self, raw: str) -> str:
        """The completion as returned: cut at the first --stop string, then the task's trim."""
        cut = min((i for i in (raw.find(s) for s in self.stops) if i >= 0), default=-1)
        text = raw[:cut] if cut >= 0 else raw
        return self.task.trim_completion(text) if self.task_stop else text

    @property
    def defines_extract(self) -> bool:
        return type(self.task).extract is not Task.extract

    def complete(self, prompt: str, stream: TextIO | None | bool = None) -> str:
        """One completion; with ``stream`` (True = stdout, or a text stream) it is written as it is generated."""
        from tunelab.evaluate import generate

        self.load()
        self._seed()
        sampling = self.options.sampling_kwargs()
        if stream is not None and stream is not False:
            sampling["streamer"] = TaskStreamer(
                self.tokenizer, self.finalize, self.stops, None if stream is True else stream
            )
        raw, _ = generate(self.model, self.tokenizer, [prompt], self.eval_cfg, self.stop_check(),
                          progress=False, sampling=sampling)
        return self.finalize(raw[0])

    def complete_batch(self, prompts: list[str], on_done: Callable[[list[int], list[str]], None] | None = None,
                       ) -> list[str]:
        """Completions of many prompts, batched and length-sorted exactly as eval does."""
        from tunelab.evaluate import generate

        self.load()
        self._seed()

        def on_batch(indices: list[int], raws: list[str]) -> None:
            if on_done is not None:
                on_done(indices, [self.finalize(r) for r in raws])

        raw, _ = generate(self.model, self.tokenizer, prompts, self.eval_cfg, self.stop_check(),
                          progress=False, sampling=self.options.sampling_kwargs(), on_batch=on_batch)
        return [self.finalize(r) for r in raw]

    def settings(self) -> dict[str, Any]:
        """What decides the completions (stored beside a batch output; a resume must match it)."""
        return {
            "target": self.target.key or self.target.description,
            "task": self.task.name,
            "raw": self.raw,
            "chat": self.chat,
            "task_stop": self.task_stop,
            "stop": self.stops,
            "max_new_tokens": self.eval_cfg.max_new_tokens,
            "num_beams": self.eval_cfg.num_beams,
            "no_repeat_ngram_size": self.eval_cfg.no_repeat_ngram_size,
            "temperature": self.options.temperature,
            "top_p": self.options.top_p,
            "top_k": self.options.top_k,
            "seed": self.seed if self.options.sampling else None,
        }


# --------------------------------------------------------------------------------------------
# Batch mode
# --------------------------------------------------------------------------------------------


def _meta_path(output: Path) -> Path:
    return output.with_name(output.name + ".meta.json")


def read_done_ids(output: Path) -> set[str]:
    """Ids already written to ``output``; a half-written last line (a crash) is removed from the file."""
    if not output.is_file():
        return set()
    data = output.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning(f"{output}: dropping a half-written last line ({len(data) - end} bytes) left by an interrupted run")
        with open(output, "r+b") as fh:
            fh.truncate(end)
    done: set[str] = set()
    for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            done.add(str(rec["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(
                f"{output}:{lineno}: not a line tunelab generate wrote; pass another --output, or --overwrite"
            ) from None
    return done


@dataclass
class BatchJob:
    """A checked --input file and its --output: what is left to generate."""

    input_path: Path
    output: Path
    items: list[InputItem]
    field: Optional[str]
    todo: list[int]  # indices into items not yet in the output
    settings: dict[str, Any]


def prepare_batch(gen: Generator, input_path: Path, output: Path, field: str | None = None,
                  id_field: str | None = None, overwrite: bool = False) -> BatchJob:
    """Read and check the input and any earlier output (before the model is loaded)."""
    rows = read_input(input_path)
    id_field = id_field or getattr(gen.task.config, "id_field", None) or "id"
    if field is None and gen.raw:
        field = "prompt"
    fields = [field] if field is not None else task_input_fields(gen.task)
    items = input_items(input_path, rows, fields, id_field)
    settings = {**gen.settings(), "field": field}
    meta = _meta_path(output)
    if overwrite:
        output.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
    done = read_done_ids(output)
    if done:
        foreign = sorted(done - {it.id for it in items})
        if foreign:
            raise ValueError(
                f"{output} holds {len(foreign)} id(s) that are not in {input_path} (e.g. '{foreign[0]}'): "
                f"it belongs to another input; pass another --output, or --overwrite"
            )
        if meta.is_file():
            before = json.loads(meta.read_text()).get("settings", {})
            changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
            if changed:
                shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                raise ValueError(
                    f"{output} was written with other settings ({shown}); resuming would mix them: "
                    f"use the same options, another --output, or --overwrite"
                )
        log.info(f"resuming {output}: {len(done)} of {len(items)} rows already done")
    todo = [i for i, it in enumerate(items) if it.id not in done]
    return BatchJob(input_path, output, items, field, todo, settings)


def run_batch(gen: Generator, job: BatchJob, progress: bool = True) -> int:
    """Generate the rows of ``job`` not yet in its output, appending one whole line per row; returns lines written."""
    output, items = job.output, job.items
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(_meta_path(output), {"settings": job.settings, "input": str(job.input_path)})
    if not job.todo:
        log.info(f"{output}: all {len(items)} rows already done")
        return 0
    gen.load()
    extract = gen.defines_extract
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=len(items) - len(job.todo), desc="generate", unit="ex", dynamic_ncols=True)
    written = 0
    try:
        for start in range(0, len(job.todo), CHUNK_ROWS):
            chunk = [items[i] for i in job.todo[start:start + CHUNK_ROWS]]
            prompts = [gen.prompt_for_item(it, job.field, i) for i, it in zip(job.todo[start:], chunk)]

            def on_done(indices: list[int], completions: list[str], chunk=chunk, prompts=prompts) -> None:
                nonlocal written
                for i, completion in zip(indices, completions):
                    record: dict[str, Any] = {"id": chunk[i].id, "prompt": prompts[i], "completion": completion}
                    if extract:
                        record["extracted"] = gen.task.extract(completion)
                    append_jsonl(output, record)  # one whole line per write, flushed
                    written += 1
                if bar is not None:
                    bar.update(len(indices))

            gen.complete_batch(prompts, on_done)
    finally:
        if bar is not None:
            bar.close()
    log.info(f"wrote {written} completion(s) to {output} ({len(items) - len(job.todo)} were already there)")
    return written


# --------------------------------------------------------------------------------------------
# Interactive mode
# --------------------------------------------------------------------------------------------


def read_prompts(lines: Callable[[], str], show: Callable[[str], None]) -> Iterable[str]:
    """Prompts from a line source: a prompt ends with an empty line, or at end of input."""
    buf: list[str] = []
    while True:
        show("> " if not buf else ". ")
        try:
            line = lines()
        except EOFError:
            if any(s.strip() for s in buf):
                yield "\n".join(buf)
            return
        if line.strip() == "" and buf:
            if any(s.strip() for s in buf):
                yield "\n".join(buf)
            buf = []
        elif line.strip() or buf:
            buf.append(line)


def interactive(gen: Generator, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """The prompt loop: type a prompt, end it with an empty line; Ctrl-C stops an answer; Ctrl-D quits."""
    stdin = stdin or sys.stdin
    tty = stdin.isatty()
    if tty and stdin is sys.stdin:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    prompt_marks = (lambda s: (sys.stderr.write(s), sys.stderr.flush())) if tty else (lambda s: None)

    def next_line() -> str:
        line = input() if stdin is sys.stdin else stdin.readline()
        if stdin is not sys.stdin and line == "":
            raise EOFError
        return line.rstrip("\n")

    print(
        f"tunelab generate: {gen.target.description} ready "
        f"({'raw prompts' if gen.raw else f'{gen.task.name} template'}). "
        "End a prompt with an empty line; Ctrl-C stops an answer; Ctrl-D quits.",
        file=sys.stderr, flush=True,
    )
    stream = out or sys.stdout
    try:
        for text in read_prompts(next_line, prompt_marks):
            try:
                gen.complete(gen.prompt_for_text(text), stream=stream)
            except KeyboardInterrupt:
                print("\n[stopped]", file=sys.stderr, flush=True)
            stream.write("\n\n")
            stream.flush()
    except KeyboardInterrupt:
        pass
    print("", file=sys.stderr, flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

_FIELD_HELP = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(DecodeOptions)}


def add_cli(sub) -> None:
    """Register ``tunelab generate``."""
    p = sub.add_parser(
        "generate",
        help="use a run (or the base model): one prompt, a JSONL file, or interactively",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate with a run directory (adapter or full checkpoint applied as eval applies it), a "
        "merged/plain HF folder, or --base. The prompt is formatted with the run's task template unless --raw; "
        "decoding is greedy with the task's stopping rule unless told otherwise, so completions equal eval's.",
        epilog="examples:\n"
        "  tunelab generate RUN --prompt \"Natalia sold clips to 48 of her friends in April, ...\"\n"
        "  tunelab generate RUN --input questions.jsonl --output answers.jsonl\n"
        "  tunelab generate RUN --interactive\n"
        "  tunelab generate --base task=gsm8k --prompt \"...\"\n"
        "key=value overrides (eval.batch_size=8, model.device=cpu) go right after RUN.",
    )
    p.add_argument("target", nargs="?", metavar="RUN", help="run directory, merged/HF model folder (omit with --base)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", "-p", help="one prompt; the answer is streamed to stdout ('-' reads it from stdin)")
    mode.add_argument("--input", "-i", type=Path, metavar="IN.jsonl", help="JSONL file of inputs (batch mode, resumable)")
    mode.add_argument("--interactive", action="store_true", help="prompt loop: end a prompt with an empty line, Ctrl-D quits")
    p.add_argument("--output", "-o", type=Path, metavar="OUT.jsonl", help="batch mode output (lines: id, prompt, completion, extracted)")
    p.add_argument("--field", help="--input field holding the user's text (formatted with the task template); "
                   "default: the task's own fields (gsm8k: question; with --raw: prompt)")
    p.add_argument("--id-field", help="--input field holding the row id (default: the task's task.id_field, else 'id'; "
                   "rows without it are numbered by row index, as eval numbers them)")
    p.add_argument("--overwrite", action="store_true", help="start --output afresh instead of resuming it")
    p.add_argument("--base", action="store_true", help="the untrained base model of the config (task=NAME model=...)")
    p.add_argument("--config", "-c", help="YAML experiment file (with --base)")
    p.add_argument("--raw", action="store_true", help="use the text as the whole prompt (no task template, no task stopping rule)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template (instruct models)")
    p.add_argument("--max-new-tokens", type=int, help=_FIELD_HELP["max_new_tokens"])
    p.add_argument("--temperature", "-t", type=float, default=0.0, help=_FIELD_HELP["temperature"])
    p.add_argument("--top-p", type=float, help=_FIELD_HELP["top_p"])
    p.add_argument("--top-k", type=int, help=_FIELD_HELP["top_k"])
    p.add_argument("--stop", action="append", default=[], metavar="STR", help=_FIELD_HELP["stop"])
    p.add_argument("--seed", type=int, help=_FIELD_HELP["seed"])
    p.add_argument("--task-stop", action=argparse.BooleanOptionalAction, default=None, help=_FIELD_HELP["task_stop"])
    p.add_argument("--batch-size", type=int, help=_FIELD_HELP["batch_size"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar in batch mode")
    p.add_argument("overrides", nargs="*", help="key=value overrides (eval.batch_size=8, model.device=cpu, ...)")
    p.set_defaults(handler=cmd_generate)


def cmd_generate(args) -> int:
    from tunelab.cli import _split_target

    target, overrides = _split_target(args.target, args.overrides)
    options = DecodeOptions(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        stop=list(args.stop), seed=args.seed, task_stop=args.task_stop, batch_size=args.batch_size,
    )
    problems = options.problems()
    if args.input is not None and args.output is None:
        problems.append("--input needs --output OUT.jsonl (where the completions go; rerunning resumes it)")
    if args.input is None and (args.output is not None or args.field or args.overwrite):
        problems.append("--output/--field/--overwrite only apply with --input")
    if args.input is not None and args.output is not None and args.input.resolve() == args.output.resolve():
        problems.append("--output must differ from --input")
    prompt = args.prompt
    if prompt == "-":
        prompt = sys.stdin.read()
    if prompt is not None and not prompt.strip():
        problems.append("--prompt is empty: pass the text to complete (e.g. --prompt \"What is 7*6?\")")
    if problems:
        raise ConfigError(problems)
    resolved = resolve_target(target, args.base, args.config, overrides)
    gen = Generator(resolved, options, raw=args.raw, chat=args.chat)
    if args.input is not None:
        # input and earlier output are checked before the (slow) model load
        job = prepare_batch(gen, args.input, args.output, field=args.field, id_field=args.id_field,
                            overwrite=args.overwrite)
        try:
            run_batch(gen, job, progress=not args.no_progress)
        except KeyboardInterrupt:
            print(f"\ninterrupted: completed lines are in {args.output}; run the same command again to resume",
                  file=sys.stderr)
            return 130
        return 0
    gen.load()
    if args.interactive:
        return interactive(gen)
    try:
        gen.complete(gen.prompt_for_text(prompt), stream=True)
    except KeyboardInterrupt:
        print("\n[stopped]", file=sys.stderr)
        return 130
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0

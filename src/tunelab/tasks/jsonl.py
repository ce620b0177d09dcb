"""Bring your own data: any prompt/response JSONL, scored by exact match.

Files: ``task.train_file`` and ``task.test_file`` (or ``task.data_dir`` with ``train.jsonl`` /
``test.jsonl``), one JSON object per line. The prompt is the ``task.prompt_field`` field followed
by a line break, or ``task.template`` formatted from any fields of the row; the target is the
``task.response_field`` field. A real example with the defaults::

    {"prompt": "Translate to French: cheese", "response": "fromage"}

becomes the prompt ``Translate to French: cheese\\n`` and the target ``fromage`` (+ EOS). The
metric is exact match after stripping whitespace (and case-folding when ``task.ignore_case``).
Every field the prompt or target is made of must be a JSON string: a missing field, ``null`` or a
number is an error naming the file and line.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tunelab.config import TaskConfig, opt
from tunelab.tasks.base import Example, Scored, Task
from tunelab.registry import TASKS


#: JSON's names of the Python types a JSON value loads as (for messages about a field's type)
JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}


@dataclass
class JsonlConfig(TaskConfig):
    """Prompt/response pairs from JSONL files."""

    name: str = opt("jsonl", "Generic prompt/response JSONL (exact-match metric).")
    train_file: Optional[str] = opt(None, "Training JSONL (default: <data_dir>/train.jsonl).")
    test_file: Optional[str] = opt(None, "Evaluation JSONL (default: <data_dir>/test.jsonl).")
    data_dir: Optional[str] = opt(None, "Folder with train.jsonl/test.jsonl (used when a file is not given).")
    prompt_field: str = opt("prompt", "Field holding the prompt (the default template is this field, then a line break).")
    response_field: str = opt("response", "Field holding the target response.")
    id_field: Optional[str] = opt(None, "Field holding an example id (default: the line index).")
    template: Optional[str] = opt(
        None, "Prompt template; {field} placeholders name row fields (null = '{<prompt_field>}\\n', e.g. '{prompt}\\n')."
    )
    ignore_case: bool = opt(False, "Case-insensitive exact match.")


def prompt_template(c: JsonlConfig) -> str:
    """The template the prompt is made with: task.template, else the prompt field and a line break."""
    return c.template if c.template is not None else "{" + c.prompt_field + "}\n"


def template_fields(template: str) -> list[str]:
    """The {field} placeholders of a template (raises ValueError for a malformed one)."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


@TASKS.register
class JsonlTask(Task):
    name = "jsonl"
    config_cls = JsonlConfig

    @classmethod
    def validate(cls, run_cfg):
        c = run_cfg.task
        p = []
        if not (c.train_file or c.test_file or c.data_dir):
            p.append("task=jsonl needs task.train_file / task.test_file or task.data_dir (a folder with train.jsonl, test.jsonl)")
        for key in ("train_file", "test_file"):
            path = getattr(c, key)
            if path and not Path(path).expanduser().is_file():
                p.append(f"task.{key} '{path}' does not exist")
        if not c.prompt_field or not c.response_field:
            p.append("task.prompt_field and task.response_field must name fields of the rows (e.g. prompt, response)")
        try:
            fields = template_fields(prompt_template(c))
        except ValueError as exc:
            p.append(f"task.template is not a valid format string: {exc}")
        else:
            if not fields:
                p.append("task.template has no {field} placeholder: include at least {" + c.prompt_field + "}")
            elif c.template is not None and c.prompt_field != JsonlConfig.prompt_field and c.prompt_field not in fields:
                p.append(
                    f"task.prompt_field={c.prompt_field} is not a placeholder of task.template {c.template!r}: "
                    f"put {{{c.prompt_field}}} in the template, or drop task.template (the prompt is then the "
                    f"'{c.prompt_field}' field and a line break)"
                )
        return p

    def load_rows(self, split):
        explicit = {"train": self.config.train_file, "test": self.config.test_file}.get(split)
        if explicit:
            return self.read_rows(Path(explicit).expanduser())
        if self.config.data_dir:
            return self.read_local_split(Path(self.config.data_dir).expanduser(), split)
        raise FileNotFoundError(f"task=jsonl has no file for split '{split}': set task.{split}_file")

    @property
    def template(self) -> str:
        return prompt_template(self.config)

    @property
    def input_fields(self) -> tuple[str, ...]:  # the template's placeholders
        return tuple(template_fields(self.template))

    def _problem(self, row: dict) -> str | None:
        c = self.config
        needed = [*template_fields(self.template), c.response_field]
        absent = [f for f in needed if f not in row]
        if absent:
            return (f"no field(s) {absent}; fields present: {sorted(row)} "
                    f"(set task.prompt_field / task.response_field / task.template)")
        wrong = [f for f in needed if not isinstance(row[f], str)]
        if wrong:
            f = wrong[0]
            return (f"field '{f}' is {JSON_TYPES.get(type(row[f]), type(row[f]).__name__)}, not a string: give every "
                    f"row a string '{f}' (e.g. \"{f}\": \"...\"), or remove the row")
        if c.id_field and row.get(c.id_field) is None:
            return f"no id field '{c.id_field}' (task.id_field); fields present: {sorted(row)}"
        return None

    def check_row(self, row):
        return self._problem(row)

    def format_prompt(self, row, tokenizer=None, max_prompt_tokens=None):
        return self.template.format(**row)

    def to_example(self, row, idx, tokenizer=None, max_prompt_tokens=None):
        c = self.config
        problem = self._problem(row)
        if problem:  # rows read from a file were checked with file:line already
            raise ValueError(f"row {idx}: {problem}")
        prompt = self.format_prompt(row)
        response = row[c.response_field]
        if not prompt.strip() or not response.strip():
            return None
        return Example(
            id=str(row[c.id_field]) if c.id_field else str(idx),
            prompt=prompt,
            response=response,
            reference=response.strip(),
        )

    def _norm(self, s: str) -> str:
        s = " ".join(s.split())
        return s.casefold() if self.config.ignore_case else s

    def score(self, examples, completions):
        per, ok = [], 0
        for ex, comp in zip(examples, completions):
            got = comp.strip()
            correct = self._norm(got) == self._norm(ex.reference)
            ok += correct
            per.append({"extracted": got, "expected": ex.reference, "correct": correct})
        return Scored({"accuracy": ok / max(len(examples), 1), "n": len(examples)}, per)



"""Bring your own data: any prompt/response JSONL, scored by exact match.

Files: ``task.train_file`` and ``task.test_file`` (or ``task.data_dir`` with ``train.jsonl`` /
``test.jsonl``), one JSON object per line. Field names are configurable, and ``task.template``
formats the prompt from any fields of the row. A real example with the defaults::

    {"prompt": "Translate to French: cheese", "response": "fromage"}

becomes the prompt ``Translate to French: cheese\\n`` and the target ``fromage`` (+ EOS). The
metric is exact match after stripping whitespace (and case-folding when ``task.ignore_case``).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tunelab.config import TaskConfig, opt
from tunelab.tasks.base import Example, Scored, Task
from tunelab.utils import read_jsonl
from tunelab.registry import TASKS


@dataclass
class JsonlConfig(TaskConfig):
    """Prompt/response pairs from JSONL files."""

    name: str = opt("jsonl", "Generic prompt/response JSONL (exact-match metric).")
    train_file: Optional[str] = opt(None, "Training JSONL (default: <data_dir>/train.jsonl).")
    test_file: Optional[str] = opt(None, "Evaluation JSONL (default: <data_dir>/test.jsonl).")
    data_dir: Optional[str] = opt(None, "Folder with train.jsonl/test.jsonl (used when a file is not given).")
    prompt_field: str = opt("prompt", "Field holding the prompt.")
    response_field: str = opt("response", "Field holding the target response.")
    id_field: Optional[str] = opt(None, "Field holding an example id (default: the line index).")
    template: str = opt("{prompt}\n", "Prompt template; {field} placeholders name row fields.")
    ignore_case: bool = opt(False, "Case-insensitive exact match.")


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
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(c.template) if f]
        except ValueError as exc:
            p.append(f"task.template is not a valid format string: {exc}")
        else:
            if not fields:
                p.append("task.template has no {field} placeholder: include at least {" + c.prompt_field + "}")
        return p

    def load_rows(self, split):
        explicit = {"train": self.config.train_file, "test": self.config.test_file}.get(split)
        if explicit:
            return read_jsonl(Path(explicit).expanduser())
        if self.config.data_dir:
            return self.read_local_split(Path(self.config.data_dir).expanduser(), split)
        raise FileNotFoundError(f"task=jsonl has no file for split '{split}': set task.{split}_file")

    @property
    def input_fields(self) -> tuple[str, ...]:  # the template's placeholders
        return tuple(f for _, f, _, _ in string.Formatter().parse(self.config.template) if f)

    def format_prompt(self, row, tokenizer=None, max_prompt_tokens=None):
        return self.config.template.format(**row)

    def to_example(self, row, idx, tokenizer=None, max_prompt_tokens=None):
        c = self.config
        missing = [f for _, f, _, _ in string.Formatter().parse(c.template) if f and f not in row]
        if missing or c.response_field not in row:
            absent = missing + ([c.response_field] if c.response_field not in row else [])
            raise KeyError(
                f"row {idx} has no field(s) {absent}; fields present: {sorted(row)} "
                f"(set task.prompt_field / task.response_field / task.template)"
            )
        prompt = self.format_prompt(row)
        response = str(row[c.response_field])
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



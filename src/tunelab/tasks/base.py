"""The task contract: one file per task holds its prompt template, loader, answer extraction and metric.

A task turns raw rows into :class:`Example` (prompt text, response text, reference) and scores
completions with :meth:`Task.score`. Training, evaluation and ``tunelab generate`` build prompts
with the same hooks (``to_example`` builds on :meth:`Task.format_prompt`; a user's text goes
through :meth:`Task.format_input`), so the model is always asked the way it was taught, and a new
task needs no edit in the generation code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from tunelab.utils import iter_jsonl, log

if TYPE_CHECKING:
    from tunelab.config import RunConfig, TaskConfig

DATA_DIR_ENV = "TUNELAB_DATA_DIR"


def nested_row(path: str, value: Any) -> dict:
    """A row holding ``value`` at a (dotted) field path: {"a": {"b": value}} for "a.b"."""
    out: Any = value
    for part in reversed(path.split(".")):
        out = {part: out}
    return out


@dataclass
class Example:
    """One task example, ready for training (prompt + response) or evaluation (prompt, reference)."""

    id: str
    prompt: str
    response: str
    reference: Any = None
    meta: dict = field(default_factory=dict)
    #: a whole conversation ({"role": system|user|assistant, "content": str} turns) for multi-turn
    #: data; None = the single turn (prompt as the user turn, response as the assistant turn). When
    #: set, ``prompt``/``response`` hold the last user turn's context and the final assistant turn.
    messages: list[dict] | None = None


@dataclass
class Scored:
    """Corpus metrics plus one record of per-example fields for predictions.jsonl."""

    metrics: dict
    per_example: list[dict]


class Task:
    name: ClassVar[str]
    config_cls: ClassVar[type]
    #: subfolder of $TUNELAB_DATA_DIR holding this task's train.jsonl/test.jsonl
    data_subdir: ClassVar[str | None] = None
    #: the metric reported first in tables (a key of score().metrics)
    primary_metric: ClassVar[str] = "accuracy"
    #: corpus metric -> the per-example field of predictions.jsonl whose mean it is (bools count as
    #: 0/1), so two runs can be compared example by example (`tunelab compare`); eval's pooled
    #: ``ref_nll`` (summed NLL / reference tokens) is added to every task's by ``compare``
    example_metrics: ClassVar[dict[str, str]] = {"accuracy": "correct"}

    def __init__(self, config: "TaskConfig"):
        self.config = config

    @classmethod
    def validate(cls, run_cfg: "RunConfig") -> list[str]:
        return []

    # ---- data ------------------------------------------------------------------------------
    def local_dir(self) -> Path | None:
        """The configured local data folder (task.data_dir, else $TUNELAB_DATA_DIR/<subdir>)."""
        explicit = getattr(self.config, "data_dir", None)
        if explicit:
            path = Path(explicit).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(
                    f"task.data_dir '{path}' does not exist: point it at a folder with train.jsonl/test.jsonl, "
                    f"or unset it to read the Hub dataset"
                )
            return path
        root = os.environ.get(DATA_DIR_ENV)
        if root and self.data_subdir:
            path = Path(root).expanduser() / self.data_subdir
            if not path.is_dir():
                raise FileNotFoundError(
                    f"${DATA_DIR_ENV}={root} has no '{self.data_subdir}/' folder: "
                    f"put {self.data_subdir}/train.jsonl and test.jsonl there, or unset {DATA_DIR_ENV}"
                )
            return path
        return None

    def read_local_split(self, folder: Path, split: str) -> list[dict]:
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            have = sorted(p.name for p in folder.glob("*.jsonl"))
            raise FileNotFoundError(f"{path} does not exist (the folder has: {', '.join(have) or 'no .jsonl files'})")
        return self.read_rows(path)

    def read_rows(self, path: Path) -> list[dict]:
        """The rows of a JSONL file, each checked by :meth:`check_row`; problems name file:line (up to 5 shown)."""
        rows, problems = [], []
        for lineno, row in iter_jsonl(path):
            problem = self.check_row(row)
            if problem:
                problems.append(f"{path}:{lineno}: {problem}")
            rows.append(row)
        if problems:
            shown = "\n  ".join(problems[:5]) + (f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise ValueError(f"{len(problems)} row(s) of {path} cannot be used by task '{self.name}':\n  {shown}")
        return rows

    def check_row(self, row: dict) -> str | None:
        """What is wrong with a data row (a field of the wrong type, ...), or None; tasks override it.

        Rows the task merely skips (an empty field) are not problems: :meth:`examples` counts them.
        """
        return None

    def load_rows(self, split: str) -> list[dict]:
        """Raw rows of a split: from the local folder when configured, else from the Hub."""
        folder = self.local_dir()
        if folder is not None:
            return self.read_local_split(folder, split)
        try:
            return self.load_hub_rows(split)
        except ConnectionError as exc:  # a task's own Hub loader (the built-in ones use hub_dataset)
            raise FileNotFoundError(
                f"task '{self.name}': the Hub dataset could not be reached ({exc}); work offline by "
                f"setting ${DATA_DIR_ENV} (a folder with {self.data_subdir or '<task>'}/train.jsonl, test.jsonl) "
                f"or task.data_dir"
            ) from exc

    def load_hub_rows(self, split: str) -> list[dict]:
        raise FileNotFoundError(
            f"task '{self.name}' has no Hub source: set task.data_dir or ${DATA_DIR_ENV}"
        )

    def hub_dataset(self, hub_id: str | None, hub_config: str | None, split: str) -> list[dict]:
        """The rows of ``split`` of a Hub dataset; any failure (offline, unknown id, no network) names what to set."""
        local = (f"task.data_dir=FOLDER (with {split}.jsonl), or ${DATA_DIR_ENV}=ROOT (with "
                 f"{self.data_subdir}/train.jsonl, test.jsonl)" if self.data_subdir else
                 f"task.data_dir=FOLDER (with {split}.jsonl)")
        if not hub_id:
            raise FileNotFoundError(f"task '{self.name}' has no data: set {local}, or task.hub_id=DATASET")
        try:
            from datasets import load_dataset

            ds = load_dataset(hub_id, hub_config, split=split)
        except Exception as exc:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ValueError, ...)
            offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                          for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
            why = ("offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), so only datasets already in the "
                   "Hugging Face cache load" if offline else "check task.hub_id and the network")
            raise FileNotFoundError(
                f"task '{self.name}': cannot load split '{split}' of the Hub dataset '{hub_id}' "
                f"({exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'}); "
                f"{why}. Use local data: set {local}"
            ) from exc
        return [dict(r) for r in ds]

    def examples(self, split: str, tokenizer=None, max_prompt_tokens: int | None = None,
                 select: Callable[[list[int]], list[int]] | None = None) -> list[Example]:
        """Rows → Examples; rows the task cannot use are skipped and counted in the log.

        ``select`` (training's data.limit / train_fraction) gets the indices of the usable rows and
        returns those to keep: only they become examples. Which rows are usable comes from
        :meth:`usable_rows`; tasks whose examples are costly to build make that check cheap.
        """
        rows = self.load_rows(split)
        usable, built = self.usable_rows(rows, tokenizer, max_prompt_tokens)
        skipped = len(rows) - len(usable)
        if skipped:
            log.info(f"{self.name}/{split}: skipped {skipped} of {len(rows)} rows that {self.skip_reason}")
        if not usable:
            raise ValueError(f"task '{self.name}' split '{split}' has no usable examples ({len(rows)} rows read)")
        chosen = usable if select is None else select(usable)
        out = []
        for idx in chosen:
            ex = built.get(idx) or self.to_example(rows[idx], idx, tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens)
            out.append(ex)
        return out

    def usable_rows(self, rows: list[dict], tokenizer=None, max_prompt_tokens: int | None = None
                    ) -> tuple[list[int], dict[int, Example]]:
        """(indices of the rows :meth:`to_example` keeps, the Examples built on the way).

        The default builds every row: cheap for tasks whose to_example tokenizes nothing (GSM8K,
        JSONL); a task whose examples cost more overrides this with a check that builds less.
        """
        usable, built = [], {}
        for idx, row in enumerate(rows):
            ex = self.to_example(row, idx, tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens)
            if ex is not None:
                usable.append(idx)
                built[idx] = ex
        return usable, built

    skip_reason: ClassVar[str] = "lacked a prompt or a response"

    # ---- prompts without a response (``tunelab generate``) ------------------------------------
    #: fields of a data row the prompt is built from (dotted paths reach nested fields); a single
    #: user input (--prompt, --interactive, --field) fills the first. () = the task does not say.
    input_fields: ClassVar[tuple[str, ...]] = ()

    def format_prompt(self, row: dict, tokenizer=None, max_prompt_tokens: int | None = None) -> str:
        """The prompt for a row holding only the input fields (no response needed), as eval builds it.

        Tasks override it (and build to_example on it); this default asks to_example, so a task
        whose rows need nothing but the prompt's fields works in ``tunelab generate`` as it is.
        """
        ex = self.to_example(row, 0, tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens)
        if ex is None:
            raise ValueError(
                f"task '{self.name}' could not build a prompt from this row (fields present: {sorted(row)}); "
                f"give the row all of the task's fields, or use --field NAME --raw"
            )
        return ex.prompt

    def format_input(self, text: str, tokenizer=None, max_prompt_tokens: int | None = None) -> str:
        """The prompt for one user input (GSM8K: the question): it fills the single input field."""
        fields = list(self.input_fields)
        if not fields:
            raise ValueError(
                f"task '{self.name}' does not say which field a single prompt fills: use --raw (the text is the "
                f"whole prompt), or --input with rows that hold the task's fields"
            )
        if len(fields) > 1:
            raise ValueError(
                f"task '{self.name}' builds its prompt from several fields {fields}: a single prompt fills only one; "
                f"use --input with rows holding {fields}, or --raw"
            )
        return self.format_prompt(nested_row(fields[0], text), tokenizer, max_prompt_tokens)

    # ---- per task ------------------------------------------------------------------------------

    def to_example(self, row: dict, idx: int, tokenizer=None, max_prompt_tokens: int | None = None) -> Example | None:
        raise NotImplementedError

    #: :meth:`stop_checker` in words, for results.json's protocol block (None: named after the method)
    stop_rule: ClassVar[str | None] = None

    def stop_checker(self):
        """A callable(text) -> bool telling when a completion is finished (None = EOS only)."""
        return None

    def trim_completion(self, completion: str) -> str:
        """Cut what the model wrote after the task's answer was complete (same cut in eval and generate)."""
        return completion

    def generation_presets(self) -> dict[str, dict]:
        """Named generation settings (e.g. the original project's); applied via eval.preset."""
        return {}

    def extract(self, completion: str) -> Any:
        return completion.strip()

    def score(self, examples: list[Example], completions: list[str]) -> Scored:
        raise NotImplementedError

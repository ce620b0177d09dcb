"""Training examples: select, tokenize (labels -100 on the prompt), handle over-long examples."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tunelab.config import DataConfig, TaskConfig
from tunelab.data.render import prepare_tokenizer, render_example
from tunelab.tasks.base import Example, Task
from tunelab.utils import log

IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    id: str

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataStats:
    """Counts reported in the log and results.json."""

    rows: int = 0
    used: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    longest_tokens: int = 0
    target_tokens: int = 0
    total_tokens: int = 0
    notes: list[str] = field(default_factory=list)


#: mixed into the seed of the held-out draw, so it does not depend on the training order's shuffle
HELD_OUT_SALT = 7_919


def split_held_out(n_rows: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held_out) row indices: ``fraction`` of the rows (at least one when > 0) held out by a
    seeded draw of its own, so the held-out set is the same whatever data.limit or train_fraction
    later keep of the rest (data.eval_fraction). Both lists are in row order."""
    if fraction <= 0.0 or n_rows < 2:
        return list(range(n_rows)), []
    n_held = min(n_rows - 1, max(1, int(round(n_rows * fraction))))
    held = set(random.Random(seed * 1_000_003 + HELD_OUT_SALT).sample(range(n_rows), n_held))
    return [i for i in range(n_rows) if i not in held], sorted(held)


def training_indices(n_rows: int, cfg: DataConfig, seed: int) -> list[int]:
    """Indices (into ``n_rows`` examples) of what is trained on: the data.eval_fraction held out first
    (:func:`split_held_out`), then a seeded shuffle, train_fraction, and at most limit of the rest."""
    order, _ = split_held_out(n_rows, cfg.eval_fraction, seed)
    if cfg.train_fraction < 1.0 or cfg.limit is not None:
        random.Random(seed).shuffle(order)
    keep = len(order)
    if cfg.train_fraction < 1.0:
        keep = max(1, int(round(len(order) * cfg.train_fraction)))
    if cfg.limit is not None:
        keep = min(keep, cfg.limit)
    return order[:keep]


def select_examples(examples: list[Example], cfg: DataConfig, seed: int) -> list[Example]:
    """Deterministic subset: the eval_fraction held out, shuffle by seed, keep train_fraction, then at most limit."""
    return [examples[i] for i in training_indices(len(examples), cfg, seed)]


def held_out_examples(examples: list[Example], cfg: DataConfig, seed: int) -> list[Example]:
    """The data.eval_fraction of the training examples that :func:`select_examples` never returns, in row order."""
    return [examples[i] for i in split_held_out(len(examples), cfg.eval_fraction, seed)[1]]


def tokenize_example(ex: Example, tokenizer, max_length: int, overlong: str, task_cfg: "TaskConfig | None" = None,
                     train_on: str = "auto") -> tuple[TokenizedExample | None, str]:
    """The example rendered in ``task_cfg``'s prompt format (:mod:`tunelab.data.render`; None = plain),
    labels -100 outside the ``train_on`` targets. Returns (example or None, status).

    Over-long examples keep their start and lose their end (status "truncated"); one whose first
    target token leaves fewer than 4 tokens of room cannot teach anything and is dropped, as is
    every over-long example under ``overlong="drop"`` (status "dropped").
    """
    rendered = render_example(ex, tokenizer, task_cfg, train_on)
    ids, labels = rendered.input_ids, rendered.labels
    status = "ok"
    if len(ids) > max_length:
        first_target = next((i for i, l in enumerate(labels) if l != IGNORE_INDEX), len(labels))
        if overlong == "drop" or max_length - first_target < 4:
            return None, "dropped"
        ids, labels = ids[:max_length], labels[:max_length]
        status = "truncated"
    return TokenizedExample(ids, labels, ex.id), status


def tokenize_references(examples: list[Example], tokenizer, max_length: int, task_cfg=None,
                        train_on: str = "auto") -> tuple[list[TokenizedExample], int, int]:
    """Held-out examples tokenized as in training, for a teacher-forced reference loss: the end of an
    over-long example cut at ``max_length`` (counted), one whose prompt leaves no room dropped (counted),
    sorted by length (less padding). Returns (tokenized, truncated, dropped)."""
    tokenized, truncated, dropped = [], 0, 0
    for ex in examples:
        tok, status = tokenize_example(ex, tokenizer, max_length, "truncate", task_cfg, train_on)
        if tok is None:
            dropped += 1
            continue
        truncated += status == "truncated"
        tokenized.append(tok)
    tokenized.sort(key=len)
    return tokenized, truncated, dropped


def build_train_dataset(task: Task, tokenizer, cfg: DataConfig, seed: int) -> tuple[list[TokenizedExample], DataStats]:
    """The training examples, tokenized: data.limit / train_fraction (and the data.eval_fraction hold-out)
    choose among the task's usable rows first, and only the chosen rows become examples and tokens."""
    prepare_tokenizer(tokenizer, task.config)  # a chat format without a template fails here, before any work
    usable_rows: list[int] = []

    def select(usable: list[int]) -> list[int]:
        # the same draw as selecting from the list of usable examples (select_examples is item-agnostic),
        # made before any example is built, so rows data.limit throws away are never tokenized
        usable_rows[:] = usable
        return select_examples(usable, cfg, seed)

    selected = task.examples("train", tokenizer=tokenizer, max_prompt_tokens=cfg.max_length - 8, select=select)
    stats = DataStats(rows=len(usable_rows))
    out = []
    longest = 0
    for ex in selected:
        tok, status = tokenize_example(ex, tokenizer, cfg.max_length, cfg.overlong, task.config, cfg.train_on)
        if status != "ok":
            full_length = len(render_example(ex, tokenizer, task.config, cfg.train_on).input_ids)
            longest = max(longest, full_length)
        if status == "truncated":
            stats.truncated += 1
        elif status == "dropped":
            stats.dropped_overlong += 1
            continue
        out.append(tok)
    stats.used = len(out)
    stats.longest_tokens = max([len(t) for t in out] + [0])
    stats.target_tokens = sum(sum(1 for l in t.labels if l != IGNORE_INDEX) for t in out)
    stats.total_tokens = sum(len(t) for t in out)
    if stats.truncated or stats.dropped_overlong:
        msg = (
            f"{stats.truncated + stats.dropped_overlong} of {len(selected)} examples were longer than "
            f"data.max_length={cfg.max_length} (longest {longest} tokens): "
            f"{stats.truncated} had the end of their response truncated, {stats.dropped_overlong} were dropped "
            f"(data.overlong={cfg.overlong}; raise data.max_length to keep them whole)"
        )
        stats.notes.append(msg)
        log.warning(msg)
    if not out:
        raise ValueError(
            f"no training examples left after selection and length filtering "
            f"({len(usable_rows)} usable rows, train_fraction={cfg.train_fraction}, limit={cfg.limit}, "
            f"max_length={cfg.max_length}, overlong={cfg.overlong}): raise data.limit / data.max_length "
            f"or use data.overlong=truncate"
        )
    return out, stats

"""Training examples: select, tokenize (labels -100 on the prompt), handle over-long examples."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tunelab.config import DataConfig
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


def select_examples(examples: list[Example], cfg: DataConfig, seed: int) -> list[Example]:
    """Deterministic subset: shuffle by seed, keep train_fraction, then at most limit."""
    order = list(range(len(examples)))
    if cfg.train_fraction < 1.0 or cfg.limit is not None:
        random.Random(seed).shuffle(order)
    keep = len(order)
    if cfg.train_fraction < 1.0:
        keep = max(1, int(round(len(order) * cfg.train_fraction)))
    if cfg.limit is not None:
        keep = min(keep, cfg.limit)
    return [examples[i] for i in order[:keep]]


def tokenize_example(ex: Example, tokenizer, max_length: int, overlong: str) -> tuple[TokenizedExample | None, str]:
    """Prompt + response + EOS, labels -100 on the prompt. Returns (example or None, status)."""
    prompt_ids = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    response_ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    total = len(prompt_ids) + len(response_ids)
    status = "ok"
    if total > max_length:
        # Keep the whole prompt; cut the end of the response. If even the prompt does not leave
        # room for a few target tokens, the example cannot teach anything: drop it.
        room = max_length - len(prompt_ids)
        if overlong == "drop" or room < 4:
            return None, "dropped"
        response_ids = response_ids[:room]
        status = "truncated"
    return TokenizedExample(prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids, ex.id), status


def build_train_dataset(task: Task, tokenizer, cfg: DataConfig, seed: int) -> tuple[list[TokenizedExample], DataStats]:
    examples = task.examples("train", tokenizer=tokenizer, max_prompt_tokens=cfg.max_length - 8)
    stats = DataStats(rows=len(examples))
    selected = select_examples(examples, cfg, seed)
    out = []
    longest = 0
    for ex in selected:
        tok, status = tokenize_example(ex, tokenizer, cfg.max_length, cfg.overlong)
        if status != "ok":
            full_length = len(tokenizer(ex.prompt + ex.response, add_special_tokens=False)["input_ids"]) + 1
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
            f"({len(examples)} usable rows, train_fraction={cfg.train_fraction}, limit={cfg.limit}, "
            f"max_length={cfg.max_length}, overlong={cfg.overlong}): raise data.limit / data.max_length "
            f"or use data.overlong=truncate"
        )
    return out, stats

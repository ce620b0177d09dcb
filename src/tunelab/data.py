"""Training data: select, tokenize (labels -100 on the prompt), handle over-long examples, batch.

No padding to a fixed length: batches are padded to their own longest example, and with
``data.group_by_length`` examples of similar length are batched together (shuffled within
mega-batches of 64 batches, then the batch order is shuffled), which removes most padding while
keeping the order random. The order is a pure function of (seed, epoch), so a resumed run sees
exactly the batches it would have seen.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from tunelab.config import DataConfig
from tunelab.tasks.base import Example, Task
from tunelab.utils import log

IGNORE_INDEX = -100
MEGABATCH_FACTOR = 64


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


def epoch_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, shuffle: bool, group_by_length: bool
) -> list[list[int]]:
    """Index batches of one epoch, a pure function of (seed, epoch)."""
    order = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        mega = batch_size * MEGABATCH_FACTOR
        grouped = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
            grouped.extend(chunk)
        order = grouped
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length and shuffle:
        rng.shuffle(batches)
    return batches


class MicroBatchStream:
    """Micro-batches for this rank, indexable by the global micro-batch number (for exact resume).

    Every rank builds the same global batch list for an epoch and takes every world_size-th batch;
    an epoch is cut to a multiple of world_size batches so ranks stay in step.
    """

    def __init__(self, data: list[TokenizedExample], batch_size: int, seed: int, shuffle: bool,
                 group_by_length: bool, rank: int = 0, world_size: int = 1):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.shuffle, self.group_by_length = shuffle, group_by_length
        self.rank, self.world_size = rank, world_size
        self.lengths = [len(t) for t in data]
        n_batches = math.ceil(len(data) / batch_size)
        self.per_epoch = max(1, n_batches // world_size)
        self._cache: tuple[int, list[list[int]]] | None = None

    def _epoch(self, epoch: int) -> list[list[int]]:
        if self._cache is None or self._cache[0] != epoch:
            batches = epoch_batches(self.lengths, self.batch_size, self.seed, epoch, self.shuffle, self.group_by_length)
            if len(batches) < self.world_size:  # tiny data: reuse batches so each rank gets one
                batches = (batches * self.world_size)[: self.world_size]
            mine = batches[self.rank::self.world_size][: self.per_epoch]
            self._cache = (epoch, mine)
        return self._cache[1]

    def get(self, global_index: int) -> tuple[int, list[TokenizedExample]]:
        """(epoch, examples) of this rank's micro-batch number ``global_index``."""
        epoch, pos = divmod(global_index, self.per_epoch)
        return epoch, [self.data[i] for i in self._epoch(epoch)[pos]]


def pad_rows(rows: list[list[int]], pad_value: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids as one [rows, longest] tensor padded with ``pad_value`` on ``side``, and the
    attention mask (1 on the real tokens). Training pads right; generation pads left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def collate(batch: list[TokenizedExample], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest example of this batch (not to a fixed length)."""
    ids, mask = pad_rows([t.input_ids for t in batch], pad_token_id, padding_side)
    labels, _ = pad_rows([t.labels for t in batch], IGNORE_INDEX, padding_side)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

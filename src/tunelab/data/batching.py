"""Batching of tokenized examples: length-grouped, shuffled epochs (a pure function of seed and
epoch, so a resumed run sees exactly the batches it would have seen), per-rank micro-batch streams,
and padding to each batch's own longest example.

No padding to a fixed length: batches are padded to their own longest example, and with
``data.group_by_length`` examples of similar length are batched together (shuffled within
mega-batches of 64 batches, then the batch order is shuffled), which removes most padding while
keeping the order random.

With ``data.packing`` the stream's items are packed rows (:mod:`tunelab.data.packing`) instead of
examples: the rows are packed once, then batched and shuffled per epoch like examples, and
:func:`collate` builds the packed batch (position ids, block-diagonal mask).
"""

from __future__ import annotations

import math
import random

import torch

from tunelab.data.examples import IGNORE_INDEX, TokenizedExample
from tunelab.data.packing import collate_packed, pack_rows
from tunelab.utils import log

MEGABATCH_FACTOR = 64


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
    an epoch is cut to a multiple of world_size batches so ranks stay in step. With ``packing`` a
    micro-batch is ``batch_size`` packed rows of at most ``max_length`` tokens (packed once, from
    ``seed``), each row a list of examples; otherwise ``batch_size`` examples.
    """

    def __init__(self, data: list[TokenizedExample], batch_size: int, seed: int, shuffle: bool,
                 group_by_length: bool, rank: int = 0, world_size: int = 1, packing: bool = False,
                 max_length: int | None = None):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.shuffle, self.group_by_length = shuffle, group_by_length
        self.rank, self.world_size = rank, world_size
        self.packing = packing
        self.rows: list[list[int]] | None = None
        if packing:
            if max_length is None:
                raise ValueError("packing needs max_length (data.max_length): the most tokens a packed row holds")
            self.rows = pack_rows([len(t) for t in data], max_length, seed)
            self.lengths = [sum(len(data[i]) for i in row) for row in self.rows]
            if rank == 0:
                log.info(f"data.packing: {len(data)} examples in {len(self.rows)} rows of at most {max_length} tokens "
                         f"({sum(self.lengths) / (max_length * len(self.rows)):.1%} full); train.batch_size={batch_size} "
                         f"counts rows")
        else:
            self.lengths = [len(t) for t in data]
        n_batches = math.ceil(len(self.lengths) / batch_size)
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

    def get(self, global_index: int) -> tuple[int, list]:
        """(epoch, items) of this rank's micro-batch number ``global_index``: examples, or with
        packing rows (lists of examples)."""
        epoch, pos = divmod(global_index, self.per_epoch)
        items = self._epoch(epoch)[pos]
        if self.rows is not None:
            return epoch, [[self.data[i] for i in self.rows[r]] for r in items]
        return epoch, [self.data[i] for i in items]


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


def collate(batch: list, pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest example of this batch (not to a fixed length); a batch of packed rows
    (lists of examples, from a packing stream) goes to :func:`~tunelab.data.packing.collate_packed`."""
    if batch and isinstance(batch[0], list):
        return collate_packed(batch, pad_token_id)
    ids, mask = pad_rows([t.input_ids for t in batch], pad_token_id, padding_side)
    labels, _ = pad_rows([t.labels for t in batch], IGNORE_INDEX, padding_side)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a collated batch, packed (its ``token_mask``) or padded."""
    return int((batch["token_mask"] if "token_mask" in batch else batch["attention_mask"]).sum())

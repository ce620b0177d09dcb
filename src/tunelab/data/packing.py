"""Padding-free packing: tokenized examples concatenated into rows of at most ``data.max_length`` tokens.

Which examples share a row (:func:`pack_rows`) is best-fit decreasing: examples sorted by length
(longest first, ties in a seeded shuffle), each put into the open row with the least room that still
holds it, else a new row. It leaves little room unused (GSM8K's 7,473 examples at 720 tokens: 1,677
rows, 98.4% full) and is a pure function of (lengths, max_length, seed). The rows are packed **once
per run**, not per epoch, so every epoch has the same number of rows (the step count and a resume's
micro-batch index depend on it); each epoch then shuffles the *rows* by (seed, epoch), exactly as
unpacked training shuffles examples (:func:`tunelab.data.batching.epoch_batches`), so a resumed run
sees the same batches.

Attention must never cross examples. A packed batch (:func:`collate_packed`) carries
``position_ids`` restarting at 0 for every example (a new example starts wherever a position is 0)
and no 2D attention mask (one would let a row's examples see each other);
:func:`tunelab.loss.target_loss` then tells attention where the examples are, per implementation:

- ``sdpa``: :func:`segment_sdpa_attention` (registered with transformers' ``AttentionInterface``)
  runs torch's sdpa once per example, causal: exactly the unpacked computation, and the attention
  cost is the sum of the examples' squared lengths instead of the row's (a dense block-diagonal
  mask would pay for the whole [T, T] square: about +18% of a step's FLOPs at 720-token rows
  on the default model, by a FLOP count). The examples' bounds reach it as the standard varlen
  kwargs ``cu_seq_lens_q/k``.
- ``eager``: a block-diagonal causal 4D additive mask [rows, 1, T, T] (:func:`block_causal_mask`;
  0 where a token may attend, the dtype's minimum elsewhere), which transformers uses as given.
- flash-attention: position ids alone; its varlen path splits rows where they restart.

Position ids alone do *not* isolate examples under sdpa/eager in every setting (measured,
transformers 5.24: HF's DataCollatorWithFlattening lets packed examples attend to each other on CPU).
The first token of every example is never a target (its label is -100), so an example's last
position is not trained to predict the next example. Written by hand because transformers' and
TRL's packing collators rely on position ids (see above), pack only within a batch, and torch's CPU
sdpa has no varlen kernel.
"""

from __future__ import annotations

import random

import torch

from tunelab.data.examples import IGNORE_INDEX, TokenizedExample

#: attention implementations that isolate packed examples, and how (see target_loss)
MASK_ATTENTION = ("sdpa", "eager")
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
#: the name under which segment_sdpa_attention is registered; a packed run's sdpa model switches to it
SEGMENT_SDPA = "tunelab_segment_sdpa"


def pack_rows(lengths: list[int], max_length: int, seed: int) -> list[list[int]]:
    """Example indices per row, every row's total length <= ``max_length`` (best-fit decreasing).

    Rows are listed in the order they were opened (longest example first); each row's examples in
    the order they were placed. Raises if an example is longer than ``max_length`` (over-long
    examples are truncated or dropped before packing, per data.overlong).
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than data.max_length={max_length} "
                         f"(e.g. #{too_long[0]}, {lengths[too_long[0]]} tokens): truncate or drop them first")
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 + 104_729).shuffle(order)  # ties between equal lengths: seeded
    order.sort(key=lambda i: -lengths[i])  # stable: ties keep the shuffled order
    rows: list[list[int]] = []
    # rows_with_room[r] = indices of the open rows with exactly r tokens of room, in opening order
    rows_with_room: list[list[int]] = [[] for _ in range(max_length + 1)]
    room_of: list[int] = []
    for i in order:
        n = lengths[i]
        room = next((r for r in range(n, max_length + 1) if rows_with_room[r]), None)
        if room is None:
            rows.append([i])
            room_of.append(max_length - n)
            rows_with_room[max_length - n].append(len(rows) - 1)
            continue
        row = rows_with_room[room].pop(0)
        rows[row].append(i)
        room_of[row] = room - n
        rows_with_room[room - n].append(row)
    return rows


def collate_packed(rows: list[list[TokenizedExample]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Packed rows as one batch padded to its longest row.

    Keys: ``input_ids``, ``labels`` (-100 on every example's first token and the padding),
    ``position_ids`` (0, 1, ... per example; the padding tail counts on from 0 too, so it is a
    segment of its own that no example sees) and ``token_mask`` [rows, T] (1 on real tokens, for
    counting them). No ``attention_mask``: see the module docstring.
    """
    lengths = [sum(len(t) for t in row) for row in rows]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    token_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for ex in row:
            end = start + len(ex)
            ids[b, start:end] = torch.tensor(ex.input_ids, dtype=torch.long)
            labels[b, start:end] = torch.tensor(ex.labels, dtype=torch.long)
            labels[b, start] = IGNORE_INDEX  # the previous example's last position must not predict it
            positions[b, start:end] = torch.arange(end - start)
            start = end
        positions[b, start:] = torch.arange(width - start)
        token_mask[b, :start] = 1
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "token_mask": token_mask}


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[rows, T] example number within each row: a new example starts wherever the position is 0."""
    return (position_ids == 0).long().cumsum(-1)


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[rows, 1, T, T] additive mask: 0 where query i may see key j (same example, j <= i), else the
    dtype's minimum (not -inf: fp16's softmax of an all -inf row would be NaN; a 4D *bool* mask is
    wrong under transformers' eager attention)."""
    seg = segment_ids(position_ids)
    width = seg.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=seg.device).tril_()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def cu_seq_lens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Examples' bounds in the flattened [rows * T] batch (flash-attention's varlen convention:
    int32 cumulative lengths starting at 0) and the longest example."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    bounds = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def segment_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling=None, cu_seq_lens_q: torch.Tensor | None = None, **kwargs):
    """transformers' sdpa attention, run per example when the batch is packed (``cu_seq_lens_q`` given:
    the examples' bounds over the flattened rows), each causal on its own tokens; otherwise exactly
    ``sdpa_attention_forward``. query [rows, heads, T, d]; returns ([rows, T, heads, d], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    rows, heads, width, dim = query.shape
    flat = [t.transpose(1, 2).reshape(rows * width, t.shape[1], dim) for t in (query, key, value)]
    bounds = cu_seq_lens_q.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        q, k, v = (t[s:e].transpose(0, 1)[None] for t in flat)
        out, _ = sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True)
        outs.append(out[0])  # [length, heads, d]
    return torch.cat(outs).reshape(rows, width, heads, dim), None


def register_segment_sdpa() -> None:
    """Register :func:`segment_sdpa_attention` under :data:`SEGMENT_SDPA`, with sdpa's mask builder
    (so unpacked forwards of a switched model, e.g. evaluation, get sdpa's usual masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if SEGMENT_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(SEGMENT_SDPA, segment_sdpa_attention)
        AttentionMaskInterface.register(SEGMENT_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


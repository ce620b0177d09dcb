"""The key/value cache of the continuous decoder (:mod:`tunelab.evaluation.decode`).

:class:`SlotCache` holds the keys/values of up to ``slots`` rows in buffers allocated once
(``[slots, kv_heads, capacity, head_dim]`` per layer). Rows are left-padded and right-aligned, so
every row writes its next tokens at the same columns, and one 2D attention mask plus per-row
``position_ids`` (as ``generate`` computes them for left padding) describe the batch. A finished
row is evicted by moving the live rows up; a new prompt group is prefilled on its own and its
keys/values are copied into the free rows. Unlike ``DynamicCache`` (used by ``generate``), nothing
is concatenated per step.

A step may write several columns per row (the draft tokens of prompt lookup, :mod:`.lookup`); the
columns of drafts a row rejected stay in the buffers as holes, masked out of attention (``reject``).
When the buffers are full the shared left padding is dropped first, then the holes are squeezed
out (:meth:`SlotCache.compact`): a row's position ids do not depend on its columns (rotary
embeddings are already applied to cached keys), so columns can move freely.

Hand-written for the same reason as the decoder: transformers' caches either concatenate per step
(``DynamicCache``) or assume one sequence length for the whole batch (``StaticCache``).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class _SlotLayer(DynamicLayer):
    """One layer's keys/values in preallocated buffers; ``length`` columns are in use."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys_buf, self.values_buf = keys, values
        self.keys, self.values = keys, values
        self.length = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        rows, width = key_states.shape[0], key_states.shape[-2]
        end = self.length + width
        self.keys_buf[:rows, :, self.length:end] = key_states
        self.values_buf[:rows, :, self.length:end] = value_states
        self.length = end
        return self.keys_buf[:rows, :, :end], self.values_buf[:rows, :, :end]

    def get_seq_length(self) -> int:
        return self.length


class SlotCache:
    """Keys/values and attention mask of the live rows (rows ``0..rows-1``, right-aligned at ``length``).

    The buffers are allocated at the first :meth:`insert`, shaped (and typed) like the model's own
    keys/values there: nothing here needs to know the architecture beyond "full attention layers".
    """

    def __init__(self, slots: int, capacity: int):
        self.slots, self.capacity, self.rows, self.length = slots, capacity, 0, 0
        self.layers: list[_SlotLayer] = []
        self.cache: Cache | None = None
        self.mask: torch.Tensor | None = None

    def _allocate(self, prefilled: DynamicCache) -> None:
        for new in prefilled.layers:
            shape = (self.slots, new.keys.shape[1], self.capacity, new.keys.shape[3])
            # zeros, not empty: masked columns still enter q·k, and garbage could be inf/NaN
            self.layers.append(_SlotLayer(new.keys.new_zeros(shape), new.values.new_zeros(shape)))
        self.cache = Cache(layers=self.layers)
        self.mask = torch.zeros(self.slots, self.capacity, dtype=torch.long, device=prefilled.layers[0].keys.device)

    def _set_length(self, length: int) -> None:
        self.length = length
        for layer in self.layers:
            layer.length = length

    def used_span(self) -> int:
        """Columns from the first one any live row uses to the end (holes included)."""
        if self.rows == 0 or self.length == 0:
            return 0
        used = self.mask[:self.rows, :self.length].any(dim=0).nonzero()
        return self.length - int(used[0, 0]) if len(used) else 0

    def _shift(self, by: int, used: int) -> None:
        """Move the used columns of the live rows by ``by`` (right > 0, left < 0)."""
        n, start = self.rows, self.length - used
        src = slice(start, self.length)
        dst = slice(start + by, self.length + by)
        for layer in self.layers:
            for buf in (layer.keys_buf, layer.values_buf):
                buf[:n, :, dst] = buf[:n, :, src].clone()
        self.mask[:n, dst] = self.mask[:n, src].clone()
        if by > 0:
            self.mask[:n, start:start + by] = 0
        self._set_length(self.length + by)

    def compact(self) -> None:
        """Squeeze out the holes: each live row's used columns, in order, right-aligned at the new length."""
        n, t = self.rows, self.length
        used = self.mask[:n, :t].bool()
        counts = used.sum(dim=1)
        width = int(counts.max()) if n else 0
        # new column c of row r takes old column index[r, c]; the left padding takes column 0 (masked out)
        index = torch.zeros(n, width, dtype=torch.long, device=self.mask.device)
        new_mask = torch.zeros(n, width, dtype=self.mask.dtype, device=self.mask.device)
        for r in range(n):
            cols = used[r].nonzero().squeeze(1)
            index[r, width - len(cols):] = cols
            new_mask[r, width - len(cols):] = 1
        for layer in self.layers:
            for buf in (layer.keys_buf, layer.values_buf):
                gather = index[:, None, :, None].expand(n, buf.shape[1], width, buf.shape[3])
                buf[:n, :, :width] = torch.gather(buf[:n, :, :t], 2, gather)
        self.mask[:n] = 0
        self.mask[:n, :width] = new_mask
        self._set_length(width)

    def keep(self, rows: list[int]) -> None:
        """Keep only these live rows (in this order), moved to the top of the buffers."""
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        t = self.length
        for layer in self.layers:
            for buf in (layer.keys_buf, layer.values_buf):
                buf[:len(rows), :, :t] = buf[index, :, :t]
        self.mask[:len(rows), :t] = self.mask[index, :t]
        self.rows = len(rows)

    def insert(self, prefilled: DynamicCache, mask: torch.Tensor) -> None:
        """Append prefilled rows (their cache and 2D mask, ``width`` columns) below the live rows."""
        if self.cache is None:
            self._allocate(prefilled)
        k, width = mask.shape
        if self.rows == 0:
            self._set_length(width)
        elif width > self.length:  # the new prompts are longer than anything cached: make room on the left
            self._shift(width - self.length, self.used_span())
        if self.length > self.capacity:
            raise RuntimeError("slot cache overflow")  # capacity >= longest prompt + max_new_tokens + 1
        rows, cols = slice(self.rows, self.rows + k), slice(self.length - width, self.length)
        for layer, new in zip(self.layers, prefilled.layers):
            layer.keys_buf[rows, :, cols] = new.keys
            layer.values_buf[rows, :, cols] = new.values
        self.mask[rows] = 0
        self.mask[rows, cols] = mask
        self.rows += k

    def open_columns(self, width: int = 1) -> torch.Tensor:
        """Make room for ``width`` more tokens per row; the attention mask of the next decode step
        (a view: columns a row does not fill are :meth:`reject`-ed before the forward)."""
        if self.length + width > self.capacity:  # drop the columns every live row has as left padding
            used = self.used_span()
            self._shift(-(self.length - used), used)
        if self.length + width > self.capacity:  # then the holes rejected drafts left
            self.compact()
        if self.length + width > self.capacity:
            raise RuntimeError("slot cache overflow")
        self.mask[:self.rows, self.length:self.length + width] = 1
        return self.mask[:self.rows, :self.length + width]

    def reject(self, row: int, first: int, end: int) -> None:
        """Columns ``first..end-1`` of the step just opened (0 = the step's first column) hold no token of ``row``."""
        if end > first:
            self.mask[row, self.length + first:self.length + end] = 0

    def advance(self, width: int = 1) -> None:
        """After a decode step: every layer wrote ``width`` columns."""
        self.length += width
        if any(layer.length != self.length for layer in self.layers):
            raise RuntimeError("slot cache out of step: a layer did not write its keys/values")

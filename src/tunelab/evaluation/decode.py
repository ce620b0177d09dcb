"""Continuous-batching decoding: a finished row's slot is refilled with the next prompt at once.

The default decoder of ``tunelab eval`` and ``tunelab generate`` (``eval.decoder=continuous``);
``eval.decoder=hf`` keeps transformers' ``generate`` as the reference, and beam search,
``no_repeat_ngram_size``, streaming and models this loop does not cover always use it
(:func:`unsupported_reason` says why).

* :class:`~tunelab.evaluation.slot_cache.SlotCache`: the keys/values of up to ``slots`` rows in
  buffers allocated once, rows right-aligned so that one 2D mask and per-row position ids describe
  the batch; a finished row is evicted, a new prompt group is prefilled on its own and copied in.
* Prompt lookup (:mod:`~tunelab.evaluation.lookup`, greedy only, ``eval.lookup_tokens``): a row is
  fed its last token plus draft tokens copied from its own text, and keeps the drafts the model's
  argmax agrees with, so a step can add several tokens to a row for about the price of one.
* :class:`IncrementalText`: a row's text grows by the new token's piece, decoded with the few
  tokens before it as context (the detokenizer of vLLM/TGI), so a token that merges with the
  previous one or completes a multi-byte character is right. The task's stop rule sees exactly
  the text ``tokenizer.decode(row)`` would give (a trailing partial character included) and is
  asked only when that text changed; EOS is checked on token ids.

Why hand-written: transformers 5.24's own continuous batching (``model.generate_batch`` /
``ContinuousBatchingManager``) runs on CPU and gave the same greedy tokens, but (measured on the
default model, 16 GSM8K prompts x 64 tokens, 2 shared cores) took 54 s where batched ``generate``
took 30 s: its paged-attention cache is built for GPUs. It also has no per-row stopping rule (only
EOS; a stop string means streaming every token to another thread and cancelling the request,
which overshoots by a nondeterministic number of tokens) and runs in a background thread.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from transformers.cache_utils import DynamicCache

from tunelab.evaluation.lookup import NgramDrafter
from tunelab.evaluation.slot_cache import SlotCache

#: generation_config fields whose (non-default) value adds a logits processor this loop lacks
_PROCESSOR_FIELDS = {
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
    "min_new_tokens": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "encoder_repetition_penalty": 1.0,
    "sequence_bias": None, "exponential_decay_length_penalty": None,
}


def unsupported_reason(model, num_beams: int = 1, no_repeat_ngram_size: int = 0,
                       sampling: dict | None = None) -> Optional[str]:
    """Why the continuous decoder cannot serve this request (None: it can)."""
    if num_beams > 1:
        return "beam search (num_beams > 1)"
    if no_repeat_ngram_size:
        return "no_repeat_ngram_size"
    if sampling and "streamer" in sampling:
        return "streaming output"
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) or any(t != "full_attention" for t in layer_types):
        return "sliding-window or non-attention layers"
    gen = getattr(model, "generation_config", None)
    for name, neutral in _PROCESSOR_FIELDS.items():
        if gen is not None and getattr(gen, name, neutral) not in (neutral, None):
            return f"generation_config.{name}"
    return None


# --------------------------------------------------------------------------------------------
# Text of a row, grown token by token
# --------------------------------------------------------------------------------------------


class IncrementalText:
    """A row's decoded completion, extended by each new token's piece instead of re-decoding the row."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # the settled text (ends on a whole character)
        self._prefix = 0  # ids[_prefix:_read] = context decoded again to find the next piece
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> Optional[str]:
        """Add a token; the row's text as ``decode(ids)`` gives it now, or None when it did not change."""
        self.ids.append(token_id)
        context = self._decode(self.ids[self._prefix:self._read])
        extended = self._decode(self.ids[self._prefix:])
        if len(extended) <= len(context):  # a special token, or bytes of a character still to come
            return None
        piece = extended[len(context):]
        if extended.endswith("\ufffd"):  # a partial character: shown as decode shows it, not settled
            return self.text + piece
        self.text += piece
        self._prefix, self._read = self._read, len(self.ids)
        return self.text


# --------------------------------------------------------------------------------------------
# The decoding loop
# --------------------------------------------------------------------------------------------


@dataclass
class _Row:
    index: int  # position in the caller's prompt list
    length: int  # real tokens in the cache (prompt + fed tokens): the next position id
    text: Optional[IncrementalText]
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    drafter: Optional[NgramDrafter] = None  # prompt lookup (greedy with eval.lookup_tokens > 0)


def _sampler(model, sampling: dict | None) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """None for greedy; else scores -> sampled ids, with generate's warpers and defaults (e.g. top_k=50)."""
    if not sampling or not sampling.get("do_sample"):
        return None
    from copy import deepcopy

    from transformers import GenerationConfig
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    gen = deepcopy(getattr(model, "generation_config", None) or GenerationConfig())
    gen.update(**sampling)
    warpers = LogitsProcessorList()  # generate's order: temperature, top-k, top-p
    if gen.temperature is not None and gen.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(gen.temperature))
    if gen.top_k is not None and gen.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=gen.top_k, min_tokens_to_keep=1))
    if gen.top_p is not None and gen.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=gen.top_p, min_tokens_to_keep=1))

    def sample(scores: torch.Tensor) -> torch.Tensor:
        scores = warpers(torch.empty(scores.shape[0], 0, dtype=torch.long, device=scores.device), scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)

    return sample


class ContinuousDecoder:
    """Greedy (or sampled) decoding of many prompts over ``slots`` rows that are refilled as rows finish."""

    def __init__(self, model, tokenizer, slots: int, max_new_tokens: int, eos_ids: Sequence[int],
                 stop_check: Callable[[str], bool] | None = None, sampling: dict | None = None,
                 lookup_tokens: int = 0, draft_budget: int = 64):
        self.model, self.tokenizer, self.slots = model, tokenizer, max(1, slots)
        self.max_new_tokens, self.eos_ids = max_new_tokens, set(eos_ids)
        self.stop_check, self.pick_sampled = stop_check, _sampler(model, sampling)
        # prompt lookup keeps exactly the greedy tokens; a sampled token cannot be checked that way
        self.lookup_tokens = lookup_tokens if self.pick_sampled is None else 0
        self.draft_budget = draft_budget  # tokens per forward up to which drafting is nearly free
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        #: where the time went (for bench/bench_eval.py): model seconds, decode steps, row-steps, prefills,
        #: draft tokens fed and accepted
        self.stats = {"model_s": 0.0, "steps": 0, "row_steps": 0, "prefills": 0, "prefill_tokens": 0,
                      "drafted": 0, "accepted": 0}

    def _forward(self, input_ids, mask, positions, cache, keep: int = 1) -> torch.Tensor:
        """Logits of the last ``keep`` positions ([rows, vocab] for 1, else [rows, keep, vocab]), fp32."""
        t0 = time.perf_counter()
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                         use_cache=True, logits_to_keep=keep)
        logits = out.logits[:, -1, :] if keep == 1 else out.logits[:, -keep:, :]
        self.stats["model_s"] += time.perf_counter() - t0
        return logits.float()

    def _pick(self, logits: torch.Tensor) -> list[int]:
        ids = logits.argmax(dim=-1) if self.pick_sampled is None else self.pick_sampled(logits)
        return ids.tolist()

    def _record(self, row: _Row, token: int) -> None:
        """Append a generated token; the row is done at EOS, at the token budget or by the stop rule."""
        row.tokens.append(token)
        if row.drafter is not None:
            row.drafter.push(token)
        if token in self.eos_ids or len(row.tokens) >= self.max_new_tokens:
            row.done = True
        elif row.text is not None:
            text = row.text.push(token)
            row.done = text is not None and bool(self.stop_check(text))

    def _prefill(self, prompts: list[list[int]]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """(cache, 2D mask, last-position logits) of a left-padded prompt group, as generate prefills it."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache)
        self.stats["prefills"] += 1
        self.stats["prefill_tokens"] += ids.numel()
        return cache, mask, logits

    def run(self, prompt_ids: list[list[int]], on_finish: Callable[[list[int], list[list[int]]], None] | None = None,
            ) -> list[list[int]]:
        """Generated token ids per prompt (EOS included when reached), in input order.

        Prompts are taken longest first (as the hf path batches them); ``on_finish(indices, tokens)``
        is called for the rows that finished at each step.
        """
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("an empty prompt cannot be decoded (no token to condition on)")
        queue = deque(sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i])))
        capacity = max((len(p) for p in prompt_ids), default=1) + self.max_new_tokens + max(64, self.max_new_tokens // 2)
        kv = SlotCache(min(self.slots, len(prompt_ids)) or 1, capacity)
        rows: list[_Row] = []
        out: list[list[int]] = [[] for _ in prompt_ids]
        while queue or rows:
            rows = self._retire(rows, kv, out, on_finish)
            if len(rows) < kv.slots and queue:
                group = [queue.popleft() for _ in range(min(kv.slots - len(rows), len(queue)))]
                rows += self._admit(group, prompt_ids, rows, kv)
                continue  # rows finished at their first token are retired before the next step
            if rows:
                self._step(rows, kv)
        return out

    def _retire(self, rows: list[_Row], kv: SlotCache, out, on_finish) -> list[_Row]:
        finished = [r for r in rows if r.done]
        if not finished:
            return rows
        for r in finished:
            out[r.index] = r.tokens
        if on_finish is not None:
            on_finish([r.index for r in finished], [r.tokens for r in finished])
        live = [i for i, r in enumerate(rows) if not r.done]
        kv.keep(live)
        return [rows[i] for i in live]

    def _admit(self, group: list[int], prompt_ids, rows: list[_Row], kv: SlotCache) -> list[_Row]:
        cache, mask, logits = self._prefill([prompt_ids[i] for i in group])
        kv.insert(cache, mask)
        new = [_Row(i, len(prompt_ids[i]), IncrementalText(self.tokenizer) if self.stop_check else None,
                    drafter=NgramDrafter(prompt_ids[i]) if self.lookup_tokens else None)
               for i in group]
        for row, token in zip(new, self._pick(logits)):
            self._record(row, token)
        return new

    def _drafts(self, rows: list[_Row]) -> list[list[int]]:
        """Draft tokens per row (prompt lookup), while the step's tokens stay within the draft budget."""
        if not self.lookup_tokens or len(rows) * (1 + self.lookup_tokens) > self.draft_budget:
            return [[] for _ in rows]
        # a row's drafts never take it past its token budget (the model's own token comes after them)
        return [r.drafter.draft(min(self.lookup_tokens, self.max_new_tokens - len(r.tokens) - 1)) for r in rows]

    def _step(self, rows: list[_Row], kv: SlotCache) -> None:
        """Feed every live row its last token (and its drafts); record the tokens greedy decoding gives."""
        drafts = self._drafts(rows)
        width = 1 + max(len(d) for d in drafts)
        if width == 1:
            return self._step_one(rows, kv)
        mask = kv.open_columns(width)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, (row, d) in enumerate(zip(rows, drafts)):
            ids[i, :1 + len(d)] = torch.tensor([row.tokens[-1], *d], dtype=torch.long)
            kv.reject(i, 1 + len(d), width)  # filler columns: no token of this row
        positions = torch.tensor([r.length for r in rows], dtype=torch.long)[:, None] + torch.arange(width)
        logits = self._forward(ids.to(self.device), mask, positions.to(self.device), kv.cache, keep=width)
        best = logits.argmax(dim=-1).tolist()
        self.stats["steps"] += 1
        self.stats["row_steps"] += len(rows)
        for i, (row, d, picks) in enumerate(zip(rows, drafts, best)):
            accepted = 0
            while accepted < len(d) and picks[accepted] == d[accepted]:
                accepted += 1
            kv.reject(i, 1 + accepted, 1 + len(d))  # the drafts after the first disagreement
            self.stats["drafted"] += len(d)
            self.stats["accepted"] += accepted
            row.length += 1 + accepted
            for token in [*d[:accepted], picks[accepted]]:
                self._record(row, token)
                if row.done:
                    break
        kv.advance(width)

    def _step_one(self, rows: list[_Row], kv: SlotCache) -> None:
        """Feed every live row its last token; record the next one."""
        mask = kv.open_columns(1)
        ids = torch.tensor([[r.tokens[-1]] for r in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[r.length] for r in rows], dtype=torch.long, device=self.device)
        logits = self._forward(ids, mask, positions, kv.cache)
        kv.advance()
        self.stats["steps"] += 1
        self.stats["row_steps"] += len(rows)
        for row, token in zip(rows, self._pick(logits)):
            row.length += 1
            self._record(row, token)

"""The reference decoder: transformers ``generate`` on length-sorted, left-padded batches.

``eval.decoder=hf`` (and always for beam search, n-gram blocking and streaming). What transformers
lacks is added around it: a per-row stopping rule of the task's kind (:class:`RowStopper`: a row
stops as soon as the task says its answer is complete) and an exact count of the tokens each row
really generated (:class:`RowStopper` records where it stopped a row; ``generate`` pads the row
after that, with a pad token that may be the EOS token).

Greedy and sampled rows keep their place in the batch from step to step, so their text grows
token by token (:class:`~tunelab.evaluation.decode.IncrementalText`); beam search reorders rows
between steps, so there each unfinished row is decoded whole.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from tunelab.config import EvalConfig
from tunelab.data import pad_rows


class RowStopper:
    """StoppingCriteria: per row, stop once the task says the completion is finished.

    ``stopped_at[row]``: the number of generated tokens when the row was stopped (None: not by this rule).
    """

    def __init__(self, tokenizer, prompt_width: int, check: Callable[[str], bool], num_rows: int,
                 incremental: bool = True):
        from tunelab.evaluation.decode import IncrementalText

        self.tokenizer, self.prompt_width, self.check = tokenizer, prompt_width, check
        self.done = torch.zeros(num_rows, dtype=torch.bool)
        self.stopped_at: list[int | None] = [None] * num_rows
        self.texts = [IncrementalText(tokenizer) for _ in range(num_rows)] if incremental else None

    def _text(self, row: int, generated: torch.Tensor) -> str | None:
        """The row's text now, or None when it did not change since the last step."""
        if self.texts is None:
            return self.tokenizer.decode(generated, skip_special_tokens=True)
        return self.texts[row].push(int(generated[-1]))

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.done.shape[0] != input_ids.shape[0]:  # beam search expands rows
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            self.stopped_at, self.texts = [None] * input_ids.shape[0], None
        gen = input_ids[:, self.prompt_width:]
        for row in range(gen.shape[0]):
            if not self.done[row]:
                text = self._text(row, gen[row])
                if text is not None and self.check(text):
                    self.done[row] = True
                    self.stopped_at[row] = gen.shape[1]
        return self.done.to(input_ids.device).clone()


def generated_length(row: torch.Tensor, eos_id: int, pad_id: int, stopped_at: int | None = None) -> int:
    """Tokens really generated in a row of ``generate``'s output (finished rows are padded after).

    A row stopped by the task's rule has ``stopped_at`` tokens (what follows is padding, even when
    the pad token is the EOS token); otherwise up to and including the first EOS, or every non-pad
    token.
    """
    eos = (row == eos_id).nonzero()
    first_eos = int(eos[0, 0]) + 1 if len(eos) else None
    if stopped_at is not None:
        return min(stopped_at, first_eos) if first_eos is not None else stopped_at
    if first_eos is not None:
        return first_eos
    return int((row != pad_id).sum())


def generate_hf(model, tokenizer, enc: list[list[int]], eval_cfg: EvalConfig, stop_check, sampling,
                finished: Callable[[list[int], list[str]], None]) -> tuple[list[str], int]:
    """Completions (input order) and generated tokens; ``finished(indices, texts)`` after each batch."""
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    out: list[str | None] = [None] * len(enc)
    n_generated = 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(order), eval_cfg.batch_size):
        idx = order[start:start + eval_cfg.batch_size]
        ids, mask = pad_rows([enc[i] for i in idx], pad_id, side="left")
        width = ids.shape[1]
        kwargs: dict[str, Any] = dict(
            max_new_tokens=eval_cfg.max_new_tokens,
            num_beams=eval_cfg.num_beams,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            do_sample=False,
        )
        if eval_cfg.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = eval_cfg.no_repeat_ngram_size
        if sampling:
            kwargs.update(sampling)
        stopper = None
        if stop_check is not None:
            stopper = RowStopper(tokenizer, width, stop_check, len(idx), incremental=eval_cfg.num_beams == 1)
            kwargs["stopping_criteria"] = StoppingCriteriaList([stopper])
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        new = gen[:, width:].cpu()
        # beam search returns the best beam per row; where it stopped is not the row's own
        stops = stopper.stopped_at if stopper is not None and len(stopper.stopped_at) == len(idx) else [None] * len(idx)
        texts = []
        for r, i in enumerate(idx):
            n_generated += generated_length(new[r], tokenizer.eos_token_id, pad_id, stops[r])
            text = tokenizer.decode(new[r], skip_special_tokens=True)
            out[i] = text
            texts.append(text)
        finished(idx, texts)
    return [o or "" for o in out], n_generated

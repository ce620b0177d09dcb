"""Prompt lookup: draft tokens for greedy decoding copied from the row's own text (no draft model).

The continuous decoder (:mod:`tunelab.evaluation.decode`) feeds a row its last token plus up to
``eval.lookup_tokens`` drafts and keeps the drafts the model itself would have chosen greedily (the
first draft the model's argmax disagrees with, and everything after it, is dropped; the model's own
token there is kept). The completion is then the greedy one; only the number of forwards changes.
This is prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding"; ``prompt_lookup_num_tokens``
in transformers' ``generate``, which supports batch size 1 only; the ``ngram`` speculator of vLLM):
the drafts are the tokens that followed the latest earlier occurrence of the row's last n tokens
(n from ``max_ngram`` down to ``min_ngram``) in the prompt and the completion so far. Answers to
word problems copy the question's numbers and names, and small models repeat themselves.

It pays where a forward's cost hardly grows with its tokens: on a CPU or GPU decoding a few rows,
a step reads every weight once whatever the batch, so checking 4 drafts costs about what 1 token
does. The decoder drafts only while a step's tokens stay under a budget (``draft_budget``).

Written here because transformers' assisted generation is batch-1 and vLLM is not a dependency.
"""

from __future__ import annotations


class NgramDrafter:
    """The token history of one row, indexed by its n-grams so a draft is a dictionary lookup."""

    def __init__(self, context: list[int], max_ngram: int = 3, min_ngram: int = 1):
        self.ids: list[int] = []
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        #: n -> n-gram -> the index of its last token, for the latest occurrence that has a successor
        self.index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_ngram, max_ngram + 1)}
        for token in context:
            self.push(token)

    def push(self, token: int) -> None:
        """Append a token (the n-grams ending just before it now have a successor)."""
        self.ids.append(token)
        end = len(self.ids) - 2  # the n-grams ending here are followed by the new token
        for n in self.index:
            if end - n + 1 >= 0:
                self.index[n][tuple(self.ids[end - n + 1:end + 1])] = end

    def draft(self, k: int) -> list[int]:
        """``k`` tokens that followed the latest earlier occurrence of the longest matching suffix.

        Where that continuation runs into the present (a loop: the match is a period back), it is
        continued periodically, so a row repeating a phrase gets whole drafts, not one token.
        """
        if k <= 0:
            return []
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(self.ids) < n:
                continue
            end = self.index[n].get(tuple(self.ids[-n:]))
            if end is not None:
                period = len(self.ids) - 1 - end
                return [self.ids[end + 1 + j % period] for j in range(k)]
        return []

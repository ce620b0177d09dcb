"""Cutting articles to a token budget: the prompt fits, the article is cut at a token boundary.

Hand-written because the cut is of the *article inside the template* (never the summary), with a
per-row budget (training: what this row's summary leaves), and every cut must be known and counted;
a tokenizer's own ``truncation=True`` cuts the end of the whole text and says nothing.
"""

from __future__ import annotations

from typing import Callable


class ArticleFitter:
    """Fits articles into prompts of at most N tokens, reading the task config's caps when asked."""

    def __init__(self, config, build_prompt: Callable[[str], str]):
        self.config = config  # task.max_article_tokens, task.min_article_tokens
        self.build_prompt = build_prompt
        self._overhead: dict[int, int] = {}  # prompt-template tokens per tokenizer

    def _prompt_overhead(self, tokenizer) -> int:
        key = id(tokenizer)
        if key not in self._overhead:
            self._overhead[key] = len(tokenizer(self.build_prompt(""), add_special_tokens=False)["input_ids"])
        return self._overhead[key]

    @staticmethod
    def _prompt_tokens(tokenizer, prompt: str) -> int:
        return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def fit(self, articles: list[str], tokenizer, budgets: list[int | None]) -> list[tuple[str, dict] | None]:
        """For each article: (prompt, meta) with the article cut at a token boundary so the prompt
        has at most ``budget`` tokens (and the article at most task.max_article_tokens); None when
        fewer than task.min_article_tokens article tokens would be left.

        Articles are tokenized in one batch, and only a prefix of each (8 characters per allowed
        token, far more than English text needs): the long tail of very long articles costs nothing.
        """
        c = self.config
        overhead = self._prompt_overhead(tokenizer)
        allowed = []
        for budget in budgets:
            a = c.max_article_tokens if c.max_article_tokens is not None else None
            if budget is not None:
                a = budget - overhead if a is None else min(a, budget - overhead)
            allowed.append(a)
        prefixes = [art if a is None else art[: max(a, 0) * 8 + 64] for art, a in zip(articles, allowed)]
        enc = tokenizer(prefixes, add_special_tokens=False, return_offsets_mapping=True)
        plans: list[tuple[int, int, bool, list] | None] = []  # (kept, n, whole, offsets) per article
        for i, article in enumerate(articles):
            ids, offsets = enc["input_ids"][i], enc["offset_mapping"][i]
            a = allowed[i]
            whole = len(prefixes[i]) == len(article)  # ids cover the whole article
            if not whole and len(ids) <= a:
                # the prefix fits: tokenize the whole article (rare; text with very long tokens)
                full = tokenizer(article, add_special_tokens=False, return_offsets_mapping=True)
                ids, offsets, whole = full["input_ids"], full["offset_mapping"], True
            n = len(ids)  # the article's tokens (a lower bound when not whole)
            kept = n if a is None else min(n, a)
            ok = kept > 0 and kept >= min(c.min_article_tokens, n)
            plans.append((kept, n, whole, offsets) if ok else None)

        def prompt_of(i: int, kept: int) -> str:
            _, n, whole, offsets = plans[i]
            if kept >= n and whole:
                return self.build_prompt(articles[i])
            return self.build_prompt(articles[i][: offsets[kept - 1][1]].rstrip())

        prompts = {i: prompt_of(i, p[0]) for i, p in enumerate(plans) if p is not None}
        # Token merges at the template boundary can shift the count by a token or two: check the
        # prompts that come within 4 tokens of their budget (one batch), and cut further if needed.
        near = [i for i in prompts if budgets[i] is not None and overhead + plans[i][0] > budgets[i] - 4]
        if near:
            counts = tokenizer([prompts[i] for i in near], add_special_tokens=False)["input_ids"]
            for i, ids in zip(near, counts):
                kept, excess = plans[i][0], len(ids) - budgets[i]
                while excess > 0:
                    kept -= excess
                    if kept <= 0 or kept < min(c.min_article_tokens, plans[i][1]):
                        del prompts[i]
                        break
                    prompts[i] = prompt_of(i, kept)
                    excess = self._prompt_tokens(tokenizer, prompts[i]) - budgets[i]
                plans[i] = (kept, *plans[i][1:]) if i in prompts else None
        out: list[tuple[str, dict] | None] = []
        for i in range(len(articles)):
            if i not in prompts:
                out.append(None)
                continue
            kept, n, whole, _ = plans[i]
            truncated = not (kept >= n and whole)
            out.append((prompts[i], {
                "article_truncated": truncated,
                "article_tokens_kept": min(kept, n),
                "article_tokens": n if whole else None,  # None: longer than the tokenized prefix
            }))
        return out

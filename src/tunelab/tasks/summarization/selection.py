"""Training selection before building: data.limit / train_fraction pick rows, and only they are fitted.

Which rows a summarization task can use depends on fitting the article into its token budget, which
tokenizes it; the selection (:func:`tunelab.data.examples.select_examples`) is drawn over the usable
rows. To draw the same selection without fitting every article, :func:`surely_usable` settles from
the budget alone every row whose article may keep far more than ``task.min_article_tokens`` (a
longer article is then cut to its allowance, never dropped); only the other rows are fitted first.
The chosen rows are then fitted; should one that was called usable not fit, every row is fitted and
the selection drawn again, as before this module existed.
"""

from __future__ import annotations

from tunelab.tasks.base import Example
from tunelab.utils import log

#: a row whose article may keep this many tokens more than task.min_article_tokens is usable without
#: fitting it: a longer article is cut to the allowance, and the re-count at the template's
#: boundary (ArticleFitter.fit) moves it by a token or two, never by this many
SURELY_USABLE_MARGIN_TOKENS = 64


def surely_usable(task, rows: list[dict], tokenizer, max_prompt_tokens: int | None,
                  for_training: bool) -> list[bool | None]:
    """Per row, without tokenizing its article: False (empty article or summary), True (usable: no
    token budget applies, or the budget leaves the article SURELY_USABLE_MARGIN_TOKENS more than
    task.min_article_tokens), None (only fitting the article can tell). Summaries are tokenized:
    a training row's budget is what its summary leaves."""
    from tunelab.tasks.summarization.task import get_field  # (that module imports this one)

    c = task.config
    article_f, summary_f, _ = task.fields()
    texts = [(str(get_field(r, article_f) or "").strip(), str(get_field(r, summary_f) or "").strip()) for r in rows]
    nonempty = [i for i, (a, s) in enumerate(texts) if a and s]
    out: list[bool | None] = [False] * len(rows)
    if tokenizer is None or (max_prompt_tokens is None and c.max_article_tokens is None):
        for i in nonempty:
            out[i] = True
        return out
    overhead = task._fitter._prompt_overhead(tokenizer)
    budgets = [max_prompt_tokens] * len(nonempty)
    if for_training and max_prompt_tokens is not None:
        lens = tokenizer([" " + texts[i][1] for i in nonempty], add_special_tokens=False)["input_ids"]
        budgets = [max_prompt_tokens - len(ids) - 1 for ids in lens]
    for i, budget in zip(nonempty, budgets):
        allowed = c.max_article_tokens if budget is None else budget - overhead
        if budget is not None and c.max_article_tokens is not None:
            allowed = min(allowed, c.max_article_tokens)
        out[i] = True if allowed >= c.min_article_tokens + SURELY_USABLE_MARGIN_TOKENS else None
    return out


def build_selected(task, rows: list[dict], tokenizer, max_prompt_tokens: int | None, for_training: bool,
                   select) -> tuple[list[Example | str], list[int]]:
    """(per row: its Example, why it is skipped, or "unselected"; the chosen rows).

    Like ``task._build``, but only the rows ``select`` keeps of the usable ones are built (fitted,
    tokenized). Usability is decided as ``_build`` decides it, fitting only the rows
    :func:`surely_usable` cannot settle, so the selection is the one ``_build``'s examples give.
    """
    sure = surely_usable(task, rows, tokenizer, max_prompt_tokens, for_training)
    unsure = [i for i, s in enumerate(sure) if s is None]

    def build(indices: list[int]) -> dict[int, Example | str]:
        if not indices:  # (a tokenizer refuses an empty batch)
            return {}
        return dict(zip(indices, task._build([rows[i] for i in indices], tokenizer, max_prompt_tokens,
                                             for_training, row_numbers=indices)))

    built = build(unsure)
    usable = [i for i, s in enumerate(sure) if s or (s is None and isinstance(built[i], Example))]
    chosen = select(usable)
    todo = [i for i in chosen if i not in built]
    built.update(build(todo))
    wrong = [i for i in todo if not isinstance(built[i], Example)]
    if wrong:  # the margin's premise failed: fit every row, as ``_build`` does, so the selection stays the same
        log.warning(f"{task.name}: rows {wrong[:5]} did not fit although their budget left "
                    f"{SURELY_USABLE_MARGIN_TOKENS} tokens to spare; fitting every row")
        every = task._build(rows, tokenizer, max_prompt_tokens, for_training)
        chosen = select([i for i, b in enumerate(every) if isinstance(b, Example)])
        built = dict(enumerate(every))
    keep, status = set(chosen), []
    for i in range(len(rows)):
        if sure[i] is False and i not in built:
            status.append("empty")
        elif i in keep or (i in built and not isinstance(built[i], Example)):
            status.append(built[i])  # a chosen example, or why an unsure row is skipped
        else:
            status.append("unselected")
    return status, chosen

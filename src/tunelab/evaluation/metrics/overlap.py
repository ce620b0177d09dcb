"""ROUGE F-measures with stemming, by the ``rouge-score`` package, on regex-split sentences.

rouge-score is Google's reference implementation (the one behind Hugging Face ``evaluate``); its
own sentence splitter needs nltk's punkt data, so :func:`split_sentences` splits with a regular
expression instead (ROUGE-Lsum needs one sentence per line).
"""

from __future__ import annotations

import re
from typing import Sequence

from tunelab.evaluation.metrics.dependency import MetricDependencyError

ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) followed by
# whitespace and then something that is not a lowercase letter ("e.g. this" is not split).
_SENTENCE_BREAK = re.compile(r"""(?:(?<=[.!?])|(?<=[.!?]["'”’)\]]))\s+(?=[^a-z\s])""")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences with a regex (no nltk data needed); existing newlines also split.

    >>> split_sentences('Prices rose 5%. "It is bad," he said. Next year, e.g. in May, too.')
    ['Prices rose 5%.', '"It is bad," he said.', 'Next year, e.g. in May, too.']
    """
    out: list[str] = []
    for line in text.splitlines():
        out.extend(s.strip() for s in _SENTENCE_BREAK.split(line.strip()) if s.strip())
    return out


def _rouge_scorer(types: Sequence[str], use_stemmer: bool):
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:  # a core dependency, but say how to fix a broken environment
        raise MetricDependencyError(
            f"ROUGE needs the rouge-score package ({exc}): pip install rouge-score"
        ) from exc
    return rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer, split_summaries=False)


def rouge(
    predictions: Sequence[str],
    references: Sequence[str],
    types: Sequence[str] = ROUGE_TYPES,
    use_stemmer: bool = True,
) -> dict[str, list[float]]:
    """Per-example ROUGE F-measures, ``{type: [score per pair]}``.

    Both texts are put one sentence per line (:func:`split_sentences`) first; this only changes
    ROUGE-Lsum (the other types tokenize newlines like spaces).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = _rouge_scorer(types, use_stemmer)
    out: dict[str, list[float]] = {t: [] for t in types}
    for pred, ref in zip(predictions, references):
        scores = scorer.score("\n".join(split_sentences(ref)), "\n".join(split_sentences(pred)))
        for t in types:
            out[t].append(float(scores[t].fmeasure))
    return out

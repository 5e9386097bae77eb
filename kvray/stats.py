"""Intervals for scores: percentile bootstrap over samples (scores in [0, 1], some fractional)."""

from __future__ import annotations

import numpy as np

N_BOOT = 2000


def bootstrap_ci(values, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `values` (nan, nan when empty)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def format_ci(pair) -> str:
    """`[lo, hi]` with two decimals; "" for anything that is not a pair."""
    return f"[{pair[0]:.2f}, {pair[1]:.2f}]" if isinstance(pair, (list, tuple)) and len(pair) == 2 else ""


def paired_bootstrap_ci(a, b, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(a - b) for scores of the same samples (a[i] and b[i] on sample i):
    the samples are resampled together, so what both share cancels."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same samples: {a.shape} vs {b.shape}")
    return bootstrap_ci(a - b, n_boot, seed)

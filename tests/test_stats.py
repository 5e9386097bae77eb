"""Score intervals (kvray.stats) and the main job's "largest ratio within 1 point" verdicts."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kvray.stats import bootstrap_ci, paired_bootstrap_ci


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.integers(0, 2, 10), rng.integers(0, 2, 1000)
    lo, hi = bootstrap_ci(small)
    assert lo <= small.mean() <= hi
    lo2, hi2 = bootstrap_ci(large)
    assert lo2 <= large.mean() <= hi2 and (hi2 - lo2) < (hi - lo) / 3
    assert bootstrap_ci([]) != bootstrap_ci([])  # nan, nan
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)


def test_paired_interval_cancels_what_the_samples_share():
    rng = np.random.default_rng(1)
    base = rng.random(40)  # per-sample difficulty, shared by both methods
    a, b = base + 0.05, base
    lo, hi = paired_bootstrap_ci(a, b)
    assert lo == pytest.approx(0.05) and hi == pytest.approx(0.05)  # exact: the difference is constant
    lo_u, hi_u = bootstrap_ci(a)
    assert hi_u - lo_u > 0.1  # unpaired, the difficulty's spread dominates
    with pytest.raises(ValueError, match="same samples"):
        paired_bootstrap_ci([1, 0], [1])


def _rows(method, ratio, scores):
    return [{"query_aware": False, "method": method, "compression_ratio": ratio, "sample_id": f"s{i}", "score": s,
             "kv_bytes_kept": 100 * (1 - ratio), "kv_bytes_full": 100, "plan_id": "uniform"} for i, s in enumerate(scores)]


def test_largest_safe_ratio_says_when_the_data_cannot_tell():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import calibrate as job

    full = [1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0] * 4  # 48 samples
    same = list(full)  # equal on every sample: holds
    noisy = list(full)  # as good on average, but not sample by sample: each block loses one and wins one
    for k in range(0, 48, 12):
        noisy[k], noisy[k + 4] = 0, 1
    worse = [0] * 48
    df = pd.DataFrame(_rows("full", 0.0, full) + _rows("a", 0.5, same) + _rows("a", 0.75, worse)
                      + _rows("b", 0.5, noisy) + _rows("c", 0.5, worse))
    out = job.largest_safe_ratio(df, 0.01).set_index("method")
    assert out.loc["a", "max_ratio_within_tol"] == 0.5 and out.loc["a", "verdict"] == "holds"
    assert out.loc["a", "diff_ci95"] == "[+0.00, +0.00]" and out.loc["a", "n"] == 48
    assert out.loc["b", "verdict"] == "cannot tell"  # mean within a point, the interval reaches below
    assert out.loc["c", "verdict"] == "no ratio" and np.isnan(out.loc["c", "max_ratio_within_tol"])

"""Held-out validation of policies: which ratio a method holds on one split, and how a policy
scores on another, with paired bootstrap intervals.

Terms (used by the job's summary, the policy JSON and the report):

- **tolerance**: how far below the full cache a policy may score, on the 0-1 score scale
  (0.05 = 5 points). A policy *meets the target* when its mean score on the samples is at least
  the full cache's mean on the same samples minus the tolerance.
- **selection split**: the samples a ratio is chosen on (the job's eval grid).
- **test split**: samples disjoint from every split anything was tuned, fitted or chosen on;
  the `validation` object of a policy is measured there.
- **verdicts** on the test split, from the 95% paired bootstrap interval [lo, hi] of
  (policy - full): `holds` when lo >= -tolerance, `fails` when hi < -tolerance, else
  `cannot tell` (more samples would decide). A tuned plan replaces uniform budgets only when the
  interval of its gain over uniform lies above 0 (`plan wins`); `plan loses` when it lies at or
  below 0, else `cannot tell`.
"""

from __future__ import annotations

import math

import pandas as pd

from .stats import bootstrap_ci, paired_bootstrap_ci

DEFAULT_TOLERANCE = 0.05
HOLDS, FAILS, CANNOT_TELL = "holds", "fails", "cannot tell"
PLAN_WINS, PLAN_LOSES = "plan wins", "plan loses"


def _paired(rows: pd.DataFrame, config_a: str, config_b: str) -> tuple[pd.Series, pd.Series]:
    """Scores of two configs on the samples both were evaluated on (same order)."""
    a = rows[rows["config_id"] == config_a].groupby("sample_id")["score"].mean()
    b = rows[rows["config_id"] == config_b].groupby("sample_id")["score"].mean()
    common = a.index.intersection(b.index).sort_values()
    return a[common], b[common]


def target_verdict(lo: float, hi: float, tolerance: float) -> str:
    if lo >= -tolerance:
        return HOLDS
    if hi < -tolerance:
        return FAILS
    return CANNOT_TELL


def plan_verdict(lo: float, hi: float) -> str:
    if lo > 0:
        return PLAN_WINS
    if hi <= 0:
        return PLAN_LOSES
    return CANNOT_TELL


def validation_record(rows: pd.DataFrame, policy: str, uniform: str, full: str, *, split: str = "test",
                      tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """The policy JSON's `validation` object: config `policy` against `uniform` (the same method
    and ratio with uniform budgets; may equal `policy`) and `full`, on the samples all three were
    evaluated on. Intervals are 95% bootstrap intervals over samples, paired for differences."""
    p, f = _paired(rows, policy, full)
    u, _ = _paired(rows, uniform, full)
    common = p.index.intersection(u.index)
    p, u, f = p[common], u[common], f[common]
    if not len(p):
        raise ValueError(f"no sample has rows for all of {policy}, {uniform}, {full}")
    lo, hi = bootstrap_ci(p.to_numpy())
    g_lo, g_hi = paired_bootstrap_ci(p.to_numpy(), u.to_numpy())
    d_lo, d_hi = paired_bootstrap_ci(p.to_numpy(), f.to_numpy())
    return {"split": split, "n": int(len(p)), "score": float(p.mean()), "score_ci95": [lo, hi],
            "full_score": float(f.mean()), "uniform_score": float(u.mean()),
            "gain_vs_uniform": float((p - u).mean()), "gain_ci95": [g_lo, g_hi],
            "diff_vs_full": float((p - f).mean()), "diff_vs_full_ci95": [d_lo, d_hi],
            "tolerance": float(tolerance), "verdict": target_verdict(d_lo, d_hi, tolerance),
            "meets_target": bool((p - f).mean() >= -tolerance - 1e-12)}


def largest_ratio(part: pd.DataFrame, method: str, tolerance: float = DEFAULT_TOLERANCE) -> dict:
    """On one protocol's rows of the selection split: the largest ratio at which `method`'s mean
    score is within `tolerance` of the full cache's on the same samples. Returns ratio (None when
    no ratio of the grid is), the score there, full's, n and the per-ratio means."""
    full = part[part["method"] == "full"].groupby("sample_id")["score"].mean()
    mine = part[(part["method"] == method) & (part["plan_id"] == "uniform")]
    out = {"method": method, "ratio": None, "score": math.nan, "full_score": float(full.mean()) if len(full) else math.nan,
           "n": 0, "scores": {}}
    for ratio, cell in mine.groupby("compression_ratio"):
        s = cell.groupby("sample_id")["score"].mean()
        common = s.index.intersection(full.index)
        if not len(common):
            continue
        mean, ref = float(s[common].mean()), float(full[common].mean())
        out["scores"][float(ratio)] = mean
        if mean >= ref - tolerance - 1e-12 and (out["ratio"] is None or ratio > out["ratio"]):
            out.update(ratio=float(ratio), score=mean, full_score=ref, n=int(len(common)))
    return out


def recommend(part: pd.DataFrame, tolerance: float = DEFAULT_TOLERANCE, exclude=("full",)) -> dict | None:
    """The method holding the largest ratio within `tolerance` on one protocol's selection rows
    (ties: the higher score there, then the name). None when no method holds any ratio."""
    best = None
    for method in sorted(set(part["method"]) - set(exclude)):
        r = largest_ratio(part, method, tolerance)
        if r["ratio"] is None:
            continue
        if best is None or (r["ratio"], r["score"]) > (best["ratio"], best["score"]):
            best = r
    return best


__all__ = ["DEFAULT_TOLERANCE", "HOLDS", "FAILS", "CANNOT_TELL", "PLAN_WINS", "PLAN_LOSES", "validation_record",
           "largest_ratio", "recommend", "target_verdict", "plan_verdict"]

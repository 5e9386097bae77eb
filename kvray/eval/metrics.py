"""Scoring of predictions against reference strings (RULER's string_match_all / _part)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvray.eval.tasks import Sample


def _references(answers: Sequence[str]) -> list[str]:
    if isinstance(answers, str):  # a bare string is one reference, not a list of characters
        answers = [answers]
    refs = [str(a).strip().lower() for a in answers]
    if not refs or not all(refs):
        # an empty reference would be "found" in every prediction
        raise ValueError(f"cannot score against an empty or blank reference answer: {list(answers)!r}")
    return refs


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of the references that occur in the prediction (case-insensitive substring)."""
    refs = _references(answers)
    pred = (prediction or "").lower()
    return sum(ref in pred for ref in refs) / len(refs)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any reference occurs in the prediction (case-insensitive substring), else 0.0."""
    refs = _references(answers)
    pred = (prediction or "").lower()
    return 1.0 if any(ref in pred for ref in refs) else 0.0


METRIC_FUNCTIONS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "all": string_match_all,
    "part": string_match_part,
}


def score_sample(sample: Sample, prediction: str) -> float:
    """Score `prediction` with the metric the sample names (`sample.metric`)."""
    try:
        metric = METRIC_FUNCTIONS[sample.metric]
    except KeyError:
        raise ValueError(f"unknown metric {sample.metric!r}; known: {', '.join(METRIC_FUNCTIONS)}") from None
    return metric(prediction, sample.answers)

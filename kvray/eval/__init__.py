"""Evaluation inputs and scoring: synthetic RULER-style tasks, dataset loading, metrics."""

from kvray.eval.datasets import DatasetNotFoundError, load_samples
from kvray.eval.metrics import score_sample, string_match_all, string_match_part
from kvray.eval.tasks import TASKS, Sample, make_samples, task_options

__all__ = [
    "DatasetNotFoundError",
    "Sample",
    "TASKS",
    "load_samples",
    "make_samples",
    "score_sample",
    "string_match_all",
    "string_match_part",
    "task_options",
]

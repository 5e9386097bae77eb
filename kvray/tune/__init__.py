"""Budget search with Ray Tune (`search_budgets`) over few-parameter allocation spaces
(`SearchSpace`). Importing this package does not import ray; calling the search does."""

from .search import SearchResult, search_budgets, trials_table, tune_prefill_spec
from .space import ALLOCATION_CHOICES, METHOD_CHOICES, SearchSpace

__all__ = ["ALLOCATION_CHOICES", "METHOD_CHOICES", "SearchResult", "SearchSpace", "search_budgets", "trials_table",
           "tune_prefill_spec"]

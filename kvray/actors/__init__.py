"""Ray actors around the plain `ModelHost`: `ModelWorker` (one model per actor, loaded once),
`start_workers` (the one place `ray.remote` is applied) and `run_eval_distributed`, which
spreads samples over the workers, one prefill per sample, and streams rows into the same
atomic Parquet shards as the single-process runner (resume by run id, actor restarts).

Names are loaded on first use, so `kvray.actors.metrics` imports without ray."""

__all__ = ["EvaluationError", "ModelWorker", "WorkerPool", "measure_curves_distributed", "prefill_distributed",
           "run_eval_distributed",
           "start_workers"]


def __getattr__(name: str):
    if name in __all__:
        from . import pool

        return getattr(pool, name)
    raise AttributeError(f"module 'kvray.actors' has no attribute {name!r}")

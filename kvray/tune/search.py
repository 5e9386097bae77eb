"""Budget search with Ray Tune: a class Trainable that loads the model once per actor
(`reuse_actors=True`, `reset_config`) and keeps each calibration sample's prefill across
trials, so a trial costs only compress + decode per sample; ASHA over growing sample counts
(every trial sees the samples in the same seeded order, so rungs compare like with like);
Optuna's TPE as the model-based searcher, seeded with the uniform allocation.

Why Optuna rather than HyperOpt: TPE on categorical choices either way, but Optuna is
maintained, pure Python, takes `points_to_evaluate` (the uniform baseline) and is already what
Ray's docs use with ASHA; HyperOpt has been unmaintained since 2021.

The uniform baseline is exempt from early stopping, so it always finishes the whole
calibration split and the policy chosen (the best trial that finished) can only match or beat
it there.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..eval.metrics import score_sample
from ..eval.tasks import Sample
from .space import SearchSpace

log = logging.getLogger(__name__)


def _trainable_cls():
    """Built lazily so that importing kvray.tune does not import ray."""
    from ray import tune

    from ..actors.metrics import record
    from ..generate import run_configs
    from ..runtime import build_prompt, capture_window_for, prefill
    from ..models import load_model

    class BudgetTrainable(tune.Trainable):
        """One trial = one allocation config, evaluated sample by sample (`n_samples` is ASHA's
        time axis). The model and the prefills outlive `reset_config`."""

        def setup(self, config, space=None, samples=None, model=None, query_aware=True, threads=1, run="",
                  chunk_ends=(), prefills=None):
            import torch

            if threads:
                torch.set_num_threads(int(threads))
            self.space: SearchSpace = space
            self.samples: list[Sample] = list(samples)
            self.query_aware = bool(query_aware)
            self.run_tag = run
            self.chunk_ends = sorted(int(e) for e in chunk_ends)  # sample counts where ASHA judges (its rungs)
            self.lm = load_model(model)
            self.prefills: dict[str, object] = {}
            self.shared = dict(prefills or {})  # sample_id -> ObjectRef of a Prefill made elsewhere
            self.made = 0  # prefills this actor made itself
            # (config, sample) -> (score, kept): the searcher may propose a config again; a
            # repeat on this actor costs nothing (evaluation is deterministic)
            self.memo: dict[tuple[str, str], tuple[float, float]] = {}
            self._reset(config)

        def _reset(self, config):
            self.press = self.space.press(config, self.lm.plan_layers, self.lm.num_kv_heads)
            self.config_key = json.dumps(config, sort_keys=True, default=str)
            self.window = max(capture_window_for([self.press]), max(self.space.choices.get("window_size", (0,))))
            self.n, self.total, self.kept, self.evaluated = 0, 0.0, 0.0, 0

        def reset_config(self, new_config):
            self._reset(new_config)
            return True

        def _prefill(self, sample: Sample):
            pre = self.prefills.get(sample.sample_id)
            if pre is None and sample.sample_id in self.shared:
                pre = self._shared_prefill(sample)
            if pre is None:
                prompt = build_prompt(self.lm.tokenizer, sample.context, sample.question, sample.answer_prefix)
                pre = prefill(self.lm, prompt, capture_window=self.window, with_question=self.query_aware,
                              capture_hidden=self.space.needs_hidden())
                self.made += 1
                self.prefills[sample.sample_id] = pre
            return pre

        def _shared_prefill(self, sample: Sample):
            """The prefill made elsewhere for `sample`, bound to this actor's model, if it has what
            this trial's press reads (its window of queries, the question, hidden states); else
            None (the trial makes its own)."""
            import ray

            pre = ray.get(self.shared[sample.sample_id]).bind(self.lm)
            window = pre.agnostic_queries[0][0].shape[2] if pre.agnostic_queries[0][0] is not None else 0
            if ((self.space.needs_hidden() and pre.hidden is None)
                    or (self.query_aware and pre.prompt.rest and pre.n_aware == pre.n_context)
                    or window < min(self.window, pre.n_context)):
                log.warning("the shared prefill of %s lacks what %s reads; prefilling it again", sample.sample_id,
                            self.space.method)
                return None
            self.prefills[sample.sample_id] = pre
            return pre

        def step(self):
            sample = self.samples[self.n]
            if (self.config_key, sample.sample_id) not in self.memo:
                # this sample and the next ones up to the next rung: ASHA judges the trial only
                # there, so none of them is decoded in vain, and they decode as one batch
                end = next((e for e in self.chunk_ends if e > self.n), len(self.samples))
                chunk = [s for s in self.samples[self.n:end] if (self.config_key, s.sample_id) not in self.memo]
                outs = run_configs(self.lm, [self._prefill(s) for s in chunk], [self.press] * len(chunk),
                                   self.query_aware, [s.max_new_tokens for s in chunk])
                for s, out in zip(chunk, outs):
                    self.memo[self.config_key, s.sample_id] = (score_sample(s, out.text),
                                                               1.0 - out.stats.compression_ratio)
                self.evaluated += len(chunk)
                record("kvray_tune_sample_evaluations", len(chunk), run=self.run_tag, method=self.space.method)
            score, kept = self.memo[self.config_key, sample.sample_id]
            self.n += 1
            self.total += score
            self.kept += kept
            return {"score": self.total / self.n, "n_samples": self.n, "evaluated": self.evaluated,
                    "kept_fraction": self.kept / self.n, "actor_pid": os.getpid(),
                    "prefills_cached": len(self.prefills), "prefills_made": self.made, "done": self.n >= len(self.samples)}

        def save_checkpoint(self, checkpoint_dir):
            Path(checkpoint_dir, "state.json").write_text(json.dumps({"n": self.n, "total": self.total,
                                                                        "kept": self.kept, "evaluated": self.evaluated}))
            return checkpoint_dir

        def load_checkpoint(self, checkpoint):
            state = json.loads(Path(checkpoint, "state.json").read_text())
            self.n, self.total, self.kept = state["n"], state["total"], state["kept"]
            self.evaluated = state.get("evaluated", 0)

    return BudgetTrainable


def tune_prefill_spec(spaces: Sequence[SearchSpace], query_aware: Sequence[bool], num_layers: int,
                      num_kv_heads: int) -> dict:
    """Arguments of one prefill per sample that every search of `spaces` (each in its protocol)
    can share: the widest window of queries any of their presses reads, the question when any
    search is query-aware, hidden states when any press reads them."""
    from ..runtime import capture_window_for

    window = max(max(capture_window_for([sp.press(cfg, num_layers, num_kv_heads)]) for cfg in sp.grid())
                 for sp in spaces)
    return {"capture_window": window, "with_question": any(query_aware),
            "capture_hidden": any(sp.needs_hidden() for sp in spaces)}


def _scheduler(space: SearchSpace, max_t: int, grace_period: int, reduction_factor: float):
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class ASHAKeepBaseline(ASHAScheduler):
        """ASHA that never stops the uniform baseline (it still counts in the rungs)."""

        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            return TrialScheduler.CONTINUE if space.is_baseline(trial.config) else decision

    return ASHAKeepBaseline(time_attr="n_samples", metric="score", mode="max", max_t=max_t,
                            grace_period=grace_period, reduction_factor=reduction_factor)


def asha_rungs(max_t: int, grace_period: int, reduction_factor: float) -> list[int]:
    """The sample counts at which ASHA (one bracket) compares trials, ascending: grace_period *
    reduction_factor**k below max_t, as Ray's `ASHAScheduler` places its rungs."""
    import math

    if max_t <= grace_period:
        return []
    n = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return sorted({math.ceil(grace_period * reduction_factor ** k) for k in range(n)} - {max_t})


@dataclass
class SearchResult:
    space: SearchSpace
    best_config: dict
    best_score: float
    baseline_score: float
    sample_evaluations: int     # compress + decode runs the trials really made (repeats served from memory)
    sample_steps: int           # sum over trials of the samples each reached (ASHA's time axis)
    trials: "object"            # pandas DataFrame, one row per trial
    elapsed_s: float
    model: str

    @property
    def gain_over_uniform(self) -> float:
        return self.best_score - self.baseline_score


@contextmanager
def _quiet(verbose: int):
    """verbose=0: nothing from Tune on the console. Ray's newer console output prints its
    "Configuration for experiment" box at every verbosity; its legacy reporter is silent at 0
    (the tables stay in the Tune folder and the dashboard). Restored afterwards."""
    if verbose:
        yield
        return
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def search_budgets(space: SearchSpace, samples: Sequence[Sample], *, model: str | None = None,
                   num_trials: int = 32, max_concurrent: int = 2, cpus_per_trial: float = 1,
                   use_gpu: bool | None = None, query_aware: bool = True, grace_period: int = 2,
                   reduction_factor: float = 3, seed: int = 0, storage_path: str | None = None,
                   name: str | None = None, run: str = "", verbose: int = 0,
                   progress: Callable[[str], None] | None = None, prefills: dict | None = None) -> SearchResult:
    """Search `space` on `samples` (the calibration split, evaluated in this order by every
    trial). Needs a running Ray (`ray.init()`); one model per trial actor, reused across trials.
    `prefills`: {sample_id: ObjectRef of the sample's `Prefill`} made once elsewhere (e.g.
    `kvray.actors.prefill_distributed`, with `tune_prefill_spec`), instead of a prefill per
    sample on every trial actor; each must come from the same model."""
    import optuna
    import pandas as pd
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its "new study created" INFO line, once per search
    samples = list(samples)
    if not samples:
        raise ValueError("the calibration split is empty")
    if num_trials < 1:
        raise ValueError(f"num_trials must be >= 1, got {num_trials}")
    num_trials = min(num_trials, len(space.grid()))  # more trials than allocations only repeat them
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    resources = {"cpu": cpus_per_trial, "gpu": 1} if use_gpu else {"cpu": cpus_per_trial}
    param_space = {k: tune.choice(list(v)) for k, v in space.choices.items()}
    # multivariate TPE models the parameters jointly (the window and the kernel interact); a
    # short random start-up since the space is small (bench/bench_ray.py simulates the choice)
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=6)
    searcher = OptunaSearch(metric="score", mode="max", points_to_evaluate=[space.baseline()], sampler=sampler)
    searcher = ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    trainable = tune.with_resources(
        tune.with_parameters(_trainable_cls(), space=space, samples=samples, model=model, query_aware=query_aware,
                             threads=0 if use_gpu else max(1, int(cpus_per_trial)), run=run,
                             chunk_ends=asha_rungs(len(samples), min(grace_period, len(samples)), reduction_factor),
                             prefills=prefills),
        resources)
    t0 = time.perf_counter()
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            num_samples=num_trials, search_alg=searcher, reuse_actors=True,
            scheduler=_scheduler(space, len(samples), min(grace_period, len(samples)), reduction_factor)),
        run_config=tune.RunConfig(name=name or f"kvray-{space.method}-{int(time.time())}",
                                  storage_path=str(Path(storage_path).resolve()) if storage_path else None,
                                  verbose=verbose, stop={"n_samples": len(samples)},
                                  callbacks=[_progress_callback(space, num_trials, len(samples), progress)] if progress else None,
                                  checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)),
    )
    with _quiet(verbose):
        grid = tuner.fit()
    elapsed = time.perf_counter() - t0
    records = []
    for r in grid:  # last reported result of each trial (no file loggers needed)
        m = dict(r.metrics or {})
        records.append({"trial_id": m.get("trial_id", ""), "config": json.dumps({k: _py(v) for k, v in r.config.items()},
                                                                               sort_keys=True),
                        "score": m.get("score", float("nan")), "n_samples": int(m.get("n_samples", 0)),
                        "evaluated": int(m.get("evaluated", 0)), "kept_fraction": m.get("kept_fraction", float("nan")),
                        "actor_pid": m.get("actor_pid"), "prefills_made": int(m.get("prefills_made", 0)),
                        "time_total_s": m.get("time_total_s", float("nan")),
                        "error": str(r.error) if r.error is not None else None})
    df = pd.DataFrame(records)
    if df.empty or df["error"].notna().all():
        raise RuntimeError(f"every Tune trial failed; first error: {df['error'].iloc[0] if len(df) else 'no trials'}")
    df["is_baseline"] = [space.is_baseline(json.loads(c)) for c in df["config"]]
    df["finished"] = df["n_samples"] >= len(samples)
    finished = df[df["finished"]].sort_values(["score", "is_baseline"], ascending=[False, False])
    if finished.empty:
        raise RuntimeError("no Tune trial evaluated the whole calibration split")
    best = finished.iloc[0]
    base = df[df["is_baseline"] & df["finished"]]
    baseline_score = float(base["score"].max()) if not base.empty else float("nan")
    return SearchResult(space=space, best_config=json.loads(best["config"]), best_score=float(best["score"]),
                        baseline_score=baseline_score, sample_evaluations=int(df["evaluated"].sum()),
                        sample_steps=int(df["n_samples"].sum()), trials=df,
                        elapsed_s=elapsed, model=model or "")


def _progress_callback(space: SearchSpace, num_trials: int, n_samples: int, say: Callable[[str], None]):
    """A Tune callback that says one line per ended trial (Tune's own tables stay in its folder
    and the Ray dashboard): trials ended, the best score among those that saw every sample."""
    from ray.tune import Callback

    class Progress(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            ended = [t for t in trials if t is trial or t.status in ("TERMINATED", "ERROR")]  # (this one's status lags)
            whole = [t.last_result.get("score") for t in ended
                     if (t.last_result or {}).get("n_samples", 0) >= n_samples]
            evals = sum((t.last_result or {}).get("evaluated", 0) for t in trials)
            best = f"best {max(whole):.3f} over the whole split" if whole else "none has seen the whole split yet"
            say(f"[tune] {space.method}: {len(ended)}/{num_trials} trials ended ({evals} sample evaluations), {best}")

    return Progress()


def _py(v):
    """numpy scalars -> Python (JSON)."""
    return v.item() if hasattr(v, "item") else v


def trials_table(result: SearchResult, run_id: str, model_name: str):
    """Tune trials as a flat DataFrame for Parquet (one row per trial, expanded layer keep)."""
    import pandas as pd

    df = result.trials
    space = result.space
    rows = []
    for _, r in df.iterrows():
        cfg = json.loads(r["config"])
        rows.append({
            "run_id": run_id, "model": model_name, "method": space.method,
            "target_ratio": space.compression_ratio, "trial_id": str(r.get("trial_id", "")), "config": r["config"],
            "layer_slope": float(cfg.get("layer_slope", 0.0)), "head_alpha": float(cfg.get("head_alpha", 1.0)),
            "score": float(r["score"]), "n_samples": int(r["n_samples"]), "evaluated": int(r["evaluated"]),
            "finished": bool(r["finished"]),
            "is_baseline": bool(r["is_baseline"]), "kept_fraction": float(r.get("kept_fraction", float("nan"))),
            "time_total_s": float(r.get("time_total_s", float("nan"))),
            "is_best": r["config"] == json.dumps(result.best_config, sort_keys=True),
        })
    return pd.DataFrame(rows)

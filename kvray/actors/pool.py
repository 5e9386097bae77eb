"""Model actors and the driver loops that spread work over them.

The unit of work is one sample with every config (docs/architecture.md, section 6: the prefill dominates, so all
(method, ratio, plan) variants of a sample run inside one actor task on one prefill); samples with
few configs go a few to a task, their rows decoded together (`sample_groups`). The
driver writes each sample's rows as one atomic shard as soon as its task returns, so a crash
of the driver or of an actor loses nothing already written, and a rerun of the run id skips
those shards. Actors are restarted by Ray when they die (`max_restarts`) and their in-flight
tasks retried (`max_task_retries`); a restart shows up as a new worker pid and is counted in
`kvray_actor_failures`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import ray
from ray.exceptions import RayActorError, RayTaskError

from ..eval.runner import ModelHost, by_cost, config_pairs, sample_groups, shard_name, start_run
from ..eval.tasks import Sample
from ..presses import Press
from ..results import read_results, run_dir, write_shard
from .metrics import record

log = logging.getLogger(__name__)

MAX_RESTARTS = 4        # per actor; a model that keeps crashing is a bug, not bad luck
MAX_TASK_RETRIES = 3    # a task whose actor died is retried on the restarted actor
# Once one actor is up, how long the others may take to be placed and load before the run goes
# on without them (e.g. a Serve app holds part of a laptop's CPUs); none up at all: an error.
PLACE_GRACE_S = float(os.environ.get("KVRAY_ACTOR_GRACE_S", 120))
START_TIMEOUT_S = float(os.environ.get("KVRAY_ACTOR_START_TIMEOUT_S", 1800))


class EvaluationError(RuntimeError):
    """Some work items failed for good; everything else was written (rerun to resume)."""

    def __init__(self, message: str, failed: dict[str, str]):
        super().__init__(message)
        self.failed = failed


class ModelWorker:
    """Hosts one model (a `ModelHost`) in one process; plain Python, wrapped by `start_workers`.

    model: a name for `kvray.load_model` (None = embedded default, hub id, directory, .gguf).
    threads: torch intra-op threads (the actor's CPU share; 0 leaves torch's default)."""

    def __init__(self, model: str | None = None, *, device: str | None = None, dtype: str | None = None,
                 threads: int = 0, kv_budget: int | None = None, label: str = ""):
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        self.label = label
        t0 = time.perf_counter()
        self.host = ModelHost.load(model, device=device, dtype=dtype)
        self.host.kv_budget = kv_budget
        self.load_s = time.perf_counter() - t0

    def info(self) -> dict:
        import torch

        lm = self.host.lm
        return {"pid": os.getpid(), "model": lm.name, "device": str(lm.device), "threads": torch.get_num_threads(),
                "num_layers": lm.num_layers, "plan_layers": lm.plan_layers, "num_kv_heads": lm.num_kv_heads, "load_s": self.load_s,
                "label": self.label}

    def evaluate(self, sample: Sample, presses: Sequence[Press] | Mapping[bool, Sequence[Press]],
                 protocols: Sequence[bool], run_id: str) -> tuple[int, list[dict]]:
        t0 = time.perf_counter()
        rows = self.host.evaluate_sample(sample, presses, protocols, run_id=run_id)
        self._record([rows], run_id, time.perf_counter() - t0)
        return os.getpid(), rows

    def _record(self, results: list, run_id: str, seconds: float) -> None:
        """The metrics of evaluated samples (`results`: per sample its rows, or its error string)."""
        for rows in results:
            if isinstance(rows, str):
                continue
            record("kvray_samples_evaluated", 1, run=run_id, actor=self.label)
            for row in rows:
                record("kvray_configs_evaluated", 1, run=run_id, method=row["method"])
                record("kvray_score", row["score"], run=run_id, method=row["method"])
                record("kvray_kv_bytes_saved", row["kv_bytes_full"] - row["kv_bytes_kept"], run=run_id,
                       method=row["method"])
        record("kvray_sample_latency_s", seconds / max(1, len(results)), run=run_id)

    def prefill(self, sample: Sample, capture_window: int, with_question: bool, capture_hidden: bool):
        """(pid, one sample's prefill), for another process to use (`Prefill.bind` there): e.g.
        the prefills Tune's trial actors share instead of each making its own."""
        from ..runtime import build_prompt, prefill

        lm = self.host.lm
        prompt = build_prompt(lm.tokenizer, sample.context, sample.question, sample.answer_prefix)
        return os.getpid(), prefill(lm, prompt, capture_window=capture_window, with_question=with_question,
                                    capture_hidden=capture_hidden)

    def evaluate_group(self, samples: Sequence[Sample], presses: Sequence[Press] | Mapping[bool, Sequence[Press]],
                       protocols: Sequence[bool], run_id: str) -> tuple[int, list]:
        """(pid, per sample its rows or, if it failed, its error as a string): the samples decoded
        together (`ModelHost.evaluate_samples`). When the group fails, each sample is evaluated
        alone, so one bad sample fails alone and its neighbours' rows come back."""
        t0 = time.perf_counter()
        try:
            results: list = self.host.evaluate_samples(samples, presses, protocols, run_id=run_id)
        except Exception as exc:  # noqa: BLE001 -- which sample failed is found below
            if len(samples) > 1:  # each alone (each records its own metrics)
                return os.getpid(), [self.evaluate_group([s], presses, protocols, run_id)[1][0] for s in samples]
            results = [f"{type(exc).__name__}: {exc}"]
        self._record(results, run_id, time.perf_counter() - t0)
        return os.getpid(), results

    def measure_curves(self, sample: Sample, methods: dict[str, dict], retentions: Sequence[float],
                       query_aware: bool = False, probe: dict | None = None,
                       score: bool = False) -> tuple[int, list[dict]]:
        from ..calibration import measure_curves

        return os.getpid(), measure_curves(self.host.lm, sample, methods, retentions, query_aware=query_aware,
                                           probe=probe, score=score)


@dataclass
class WorkerPool:
    """Actor handles plus what the driver knows about them (pids, to notice restarts)."""

    actors: list
    infos: list[dict]
    run: str = ""
    restarts: int = 0

    @property
    def model_name(self) -> str:
        return self.infos[0]["model"]

    def note_pid(self, index: int, pid: int) -> None:
        old = self.infos[index]["pid"]
        if pid != old:
            self.restarts += 1
            self.infos[index]["pid"] = pid
            record("kvray_actor_failures", 1, run=self.run)
            log.warning("model actor %d was restarted (pid %s -> %s); its task was retried", index, old, pid)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def start_workers(num_workers: int, model: str | None = None, *, cpus_per_worker: float = 1, use_gpu: bool | None = None,
                  device: str | None = None, dtype: str | None = None, kv_budget: int | None = None,
                  run: str = "") -> WorkerPool:
    """Start `num_workers` model actors and wait until each has loaded its model.

    On a cluster with GPUs each actor asks for one GPU (and the model goes to CUDA); otherwise
    for `cpus_per_worker` CPUs, which is also its torch thread count."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    remote_cls = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)(ModelWorker)
    if use_gpu:
        opts: dict[str, Any] = {"num_gpus": 1, "num_cpus": cpus_per_worker}
        threads = 0
    else:
        opts = {"num_cpus": cpus_per_worker}
        threads = max(1, int(cpus_per_worker))
    actors = [remote_cls.options(**opts).remote(model, device=device, dtype=dtype, threads=threads,
                                                 kv_budget=kv_budget, label=str(i))
              for i in range(num_workers)]
    refs = [a.info.remote() for a in actors]
    try:
        ready = _wait_for_actors(refs, opts, grace_s=PLACE_GRACE_S, timeout_s=START_TIMEOUT_S)
    except BaseException:
        for actor in actors:  # none left pending (they would hold or wait for resources forever)
            ray.kill(actor, no_restart=True)
        raise
    for i, actor in enumerate(actors):
        if i not in ready:
            ray.kill(actor, no_restart=True)
    keep = sorted(ready)
    return WorkerPool([actors[i] for i in keep], [ready[i] for i in keep], run=run)


def _wait_for_actors(refs: list, opts: dict, *, grace_s: float, timeout_s: float) -> dict[int, dict]:
    """{index: info} of the actors that came up: all of them, or those up `grace_s` after the
    first (the rest could not be placed: the cluster's free resources are short, e.g. a Serve
    app holds some). A model that fails to load raises; none placed within `timeout_s` raises
    with what the cluster has free."""
    index = {ref: i for i, ref in enumerate(refs)}
    ready: dict[int, dict] = {}
    pending = list(refs)
    t0 = time.perf_counter()
    first = None
    while pending:
        limit = timeout_s - (time.perf_counter() - t0) if first is None else grace_s - (time.perf_counter() - first)
        if limit <= 0:
            break
        done, pending = ray.wait(pending, num_returns=1, timeout=limit)
        for ref in done:
            ready[index[ref]] = ray.get(ref)  # a model that cannot load raises here, with its error
            first = first or time.perf_counter()
    if not ready:
        raise RuntimeError(f"no model actor could start within {timeout_s:.0f} s (each asks for {opts}); the "
                           f"cluster has free {_free()}. Free resources (e.g. `serve shutdown`), ask for fewer "
                           "CPUs per worker, or raise KVRAY_ACTOR_START_TIMEOUT_S")
    if pending:
        print(f"[kvray] warning: only {len(ready)} of {len(refs)} model actors could be placed within "
              f"{grace_s:.0f} s of the first (each asks for {opts}; free: {_free()}: something else holds the "
              f"rest, e.g. a Serve app); going on with {len(ready)}", file=sys.stderr, flush=True)
    return ready


def _free() -> dict:
    free = ray.available_resources()
    return {"CPU": round(free.get("CPU", 0.0), 2), "GPU": round(free.get("GPU", 0.0), 2)}


def _schedule(pool: WorkerPool, items: Sequence[tuple[str, str, tuple]], on_done: Callable[[str, Any], None],
              *, max_in_flight: int = 2, on_submit: Callable | None = None) -> dict[str, str]:
    """Run `items` = (key, actor method, args) over the pool, at most `max_in_flight` per actor,
    handing each result to `on_done(key, result)` as it arrives. Returns {key: error} of items
    that failed for good (a Python error in the task, or an actor out of restarts: its items go
    to the other actors)."""
    queue = deque(items)
    pending: dict = {}
    alive = list(range(len(pool.actors)))
    failed: dict[str, str] = {}

    def submit(i: int) -> None:
        while queue and sum(1 for v in pending.values() if v[0] == i) < max_in_flight:
            key, method, args = queue.popleft()
            ref = getattr(pool.actors[i], method).remote(*args)
            pending[ref] = (i, key, method, args)
            if on_submit:
                on_submit(i, key, ref)

    for i in alive:
        submit(i)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        ref = ready[0]
        i, key, method, args = pending.pop(ref)
        try:
            pid, result = ray.get(ref)
        except RayTaskError as exc:  # the task itself raised: a bad item, not a dead actor
            failed[key] = f"{type(exc.cause).__name__}: {exc.cause}" if exc.cause else str(exc)
            log.error("item %s failed: %s", key, failed[key])
        except RayActorError as exc:  # out of restarts: give its work to the others
            record("kvray_actor_failures", 1, run=pool.run)
            if i in alive:
                alive.remove(i)
                log.error("model actor %d is gone for good (%s); %d actors left", i, exc, len(alive))
            if not alive:
                failed[key] = f"all model actors died: {exc}"
                failed.update({k: "not run: all model actors died" for k, _, _ in queue})
                queue.clear()
                continue
            queue.appendleft((key, method, args))
        else:
            pool.note_pid(i, pid)
            on_done(key, result)
        for j in alive:
            submit(j)
    return failed


class _Progress:
    """A tqdm bar on a terminal; in a job log (no tty) one line every `every_s` seconds."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, every_s: float = 15.0):
        from tqdm.auto import tqdm

        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done, self.t0, self.last = 0, time.perf_counter(), 0.0
        self.enabled = enabled
        self.bar = tqdm(total=total, desc=desc, unit=unit) if enabled and sys.stderr.isatty() else None

    def update(self, n: int, note: str = "") -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if note:
                self.bar.set_postfix_str(note)
            return
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            el = now - self.t0
            rate = self.done / el if el > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(f"[{self.desc}] {self.done}/{self.total} {self.unit} | {rate:.2f} {self.unit}/s | "
                  f"elapsed {el:.0f}s | eta {eta:.0f}s {note}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_eval_distributed(pool: WorkerPool, samples: Sequence[Sample],
                         presses: Sequence[Press] | Mapping[bool, Sequence[Press]], *, out_dir,
                         protocols: Iterable[bool] = (False,), run_id: str | None = None, progress: bool = True,
                         max_in_flight: int = 2, on_submit: Callable | None = None):
    """`kvray.eval.runner.run_eval` over a pool of model actors: same rows, same shards, same
    resume; `presses` as there (every press in every protocol, or {query_aware: presses}), the
    costliest samples handed out first. Raises `EvaluationError` naming the samples that failed
    (the others are written). Returns (run_id, DataFrame of the whole run)."""
    run_id, protocols, todo = start_run(pool.model_name, samples, presses, out_dir=out_dir, protocols=protocols,
                                        run_id=run_id)
    pool.run = run_id
    n_configs = len(config_pairs(presses, protocols))
    # a few samples per task when they have few configs: their rows decode as one batch
    by_key = {shard_name(g[0]): g for g in sample_groups(todo, n_configs, len(pool.actors))}
    scores: list[float] = []
    errors: dict[str, str] = {}
    bar = _Progress(len(todo) * n_configs, f"eval {run_id}", "cfg", enabled=progress)

    def done(key: str, results: list) -> None:
        for sample, rows in zip(by_key[key], results):
            if isinstance(rows, str):  # this sample failed (alone); its neighbours' rows are written
                errors[sample.sample_id] = rows
                log.error("sample %s failed: %s", sample.sample_id, rows)
                continue
            write_shard(rows, out_dir, run_id, shard_name(sample))
            scores.extend(r["score"] for r in rows)
            bar.update(len(rows), f"mean score {sum(scores) / max(1, len(scores)):.3f}")

    work = presses if isinstance(presses, Mapping) else list(presses)
    items = [(key, "evaluate_group", (group, work, protocols, run_id)) for key, group in by_key.items()]
    try:
        failed = _schedule(pool, items, done, max_in_flight=max_in_flight, on_submit=on_submit)
    finally:
        bar.close()
    if failed or errors:
        names = {s.sample_id: err for k, err in failed.items() for s in by_key[k]} | errors
        raise EvaluationError(
            f"{len(names)} of {len(todo)} samples failed (the other rows are written; rerun with run id "
            f"{run_id!r} to retry only these): " + "; ".join(f"{k}: {v}" for k, v in list(names.items())[:5]),
            names)
    return run_id, read_results(run_dir(out_dir, run_id))


def measure_curves_distributed(pool: WorkerPool, samples: Sequence[Sample], methods: dict[str, dict],
                               retentions: Sequence[float], *, query_aware: bool = False,
                               progress: bool = True, per_sample: dict[str, Sequence[float]] | None = None,
                               probe: dict | None = None, score: bool = False) -> list[dict]:
    """NLL-ratio curves (`kvray.calibration.measure_curves`) of every (sample, method) in
    parallel over the pool, one prefill per sample. `methods` maps a method name to its
    parameters; `per_sample` (sample_id -> retentions) replaces `retentions` for those samples;
    `probe` (the fields of a `kvray.probe.ProbeSpec`) adds the reconstruction probe's columns,
    `score` the greedy answers' task scores."""
    per_sample = per_sample or {}
    items = [(s.sample_id, "measure_curves", (s, dict(methods), list(per_sample.get(s.sample_id, retentions)),
                                              query_aware, probe, score)) for s in by_cost(samples)]
    rows: list[dict] = []
    bar = _Progress(len(items), "calibration", "context", enabled=progress)

    def done(key: str, result: list[dict]) -> None:
        rows.extend(result)
        bar.update(1)

    try:
        failed = _schedule(pool, items, done)
    finally:
        bar.close()
    if failed:
        raise EvaluationError(f"{len(failed)} calibration curves failed: " +
                              "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:5]), failed)
    return rows



def prefill_distributed(pool: WorkerPool, samples: Sequence[Sample], *, capture_window: int, with_question: bool,
                        capture_hidden: bool) -> dict[str, Any]:
    """{sample_id: ObjectRef of its `Prefill`}: every sample prefilled once, round robin over
    the pool, the prefills left in Ray's object store (owned by this process, so they outlive
    the pool's actors) for other actors to `ray.get` and `bind` to their own copy of the model.
    Returns when all are made; a prefill that fails raises here, with its sample."""
    refs, pids = {}, {}
    for i, s in enumerate(samples):
        actor = pool.actors[i % len(pool.actors)]
        pid, pre = actor.prefill.options(num_returns=2).remote(s, capture_window, with_question, capture_hidden)
        refs[s.sample_id], pids[pid] = pre, s.sample_id
    for ref, sample_id in pids.items():
        try:
            ray.get(ref)
        except RayTaskError as exc:
            raise EvaluationError(f"the prefill of {sample_id} failed: {exc.cause or exc}", {sample_id: str(exc)}) from exc
    return refs

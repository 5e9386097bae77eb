"""The evaluation runner: `ModelHost` prefills each sample once and evaluates every (method,
ratio, plan) config, in one or both protocols, on that prefill; rows go to Parquet shards
(one per sample) written atomically, so a rerun of the same run id resumes where it stopped."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from .. import __version__
from ..generate import ConfigRuns
from ..runtime import build_prompt, capture_window_for, hidden_needed_for, prefill
from ..models import LanguageModel, load_model
from ..presses import Press, make_press
from ..results import (SCHEMA_VERSION, new_run_id, press_config_id, now_utc, read_results, run_dir, shard_exists,
                       short_hash, write_manifest, write_shard)
from .metrics import score_sample
from .tasks import Sample

log = logging.getLogger(__name__)


def build_presses(methods: Sequence[str], ratios: Sequence[float], params: dict | None = None) -> list[Press]:
    """methods x ratios (the full cache once, at ratio 0), with per-method parameters."""
    params = params or {}
    unknown = set(params) - set(methods)
    if unknown:
        raise ValueError(f"parameters given for methods not evaluated: {sorted(unknown)}")
    presses: list[Press] = []
    for method in methods:
        if method == "full":
            presses.append(make_press("full", **params.get("full", {})))
            continue
        for ratio in ratios:
            presses.append(make_press(method, compression_ratio=ratio, **params.get(method, {})))
    seen, unique = set(), []
    for p in presses:
        key = (p.name, p.params_json(), p.target_ratio, p.plan_id)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def config_pairs(presses: Sequence[Press] | Mapping[bool, Sequence[Press]],
                 protocols: Iterable[bool] = (False,)) -> list[tuple[Press, bool]]:
    """(press, query_aware) pairs: every press in every protocol, or, when `presses` maps a
    protocol to its own presses ({query_aware: presses}), those (`protocols` is then unused)."""
    if isinstance(presses, Mapping):
        return [(p, bool(q)) for q, ps in presses.items() for p in ps]
    return [(p, bool(q)) for q in dict.fromkeys(protocols) for p in presses]


# configs x samples one task on an actor decodes as one batch (see `sample_groups`): the 19-config grid
# decoded 3 samples together 15% faster than one at a time (34.0-35.7 s vs 40.1-41.7 s for 6 samples,
# interleaved runs, 2026-12-07); the job's 74-config grid stays one sample per task
ROWS_TOGETHER = 64
# rows decoding together before `kvray eval` (`ModelHost.evaluate_stream`) admits the next sample: the
# 19-config grid of 6 samples took 21.4 s at 128 and 21.1 s with all at once, vs 22.5 s at 64 and
# 22.3 s in groups of 3 samples (2026-12-07, one run each, machine at its slower speed)
STREAM_ROWS = 128


def sample_groups(samples: Sequence[Sample], n_configs: int, workers: int = 1,
                  rows: int = ROWS_TOGETHER) -> list[list[Sample]]:
    """`samples` (in `by_cost` order) cut into consecutive groups that one task evaluates
    together (`ModelHost.evaluate_samples`): up to `rows` // `n_configs` samples each (a sample
    with many configs already fills a batch: one per group), and at least two groups per worker
    while there are samples enough, so that no worker waits on another's long group."""
    order = by_cost(samples)
    k = max(1, min(rows // max(1, n_configs), -(-len(order) // (2 * max(1, workers)))))
    return [order[i:i + k] for i in range(0, len(order), k)]


def by_cost(samples: Sequence[Sample]) -> list[Sample]:
    """Samples in the order to hand them out, the costliest first (most new tokens, then the
    longest context): when work is spread over actors, the last ones to finish are short."""
    return sorted(samples, key=lambda s: (s.max_new_tokens, s.length or 0, len(s.context)), reverse=True)


@dataclass
class ModelHost:
    """Owns one model on one device and evaluates samples x configs (no Ray here; the actors
    in `kvray.actors` wrap this class)."""

    lm: LanguageModel
    kv_budget: int | None = None  # KV bytes decoded together (None: generate.default_kv_budget)

    @classmethod
    def load(cls, name: str | None = None, device=None, dtype=None) -> "ModelHost":
        return cls(load_model(name, device=device, dtype=dtype))

    def evaluate_sample(self, sample: Sample, presses: Sequence[Press] | Mapping[bool, Sequence[Press]],
                        protocols: Sequence[bool] = (False,), run_id: str = "") -> list[dict]:
        """Rows for every (press, protocol) on one prefill of `sample` (`config_pairs`)."""
        return self.evaluate_samples([sample], presses, protocols, run_id)[0]

    def evaluate_samples(self, samples: Sequence[Sample], presses: Sequence[Press] | Mapping[bool, Sequence[Press]],
                         protocols: Sequence[bool] = (False,), run_id: str = "") -> list[list[dict]]:
        """Each sample's rows (as `evaluate_sample`), in the order of `samples`, every config of
        every sample on one decoder (`evaluate_stream`, all admitted at once)."""
        got = dict(self.evaluate_stream(samples, presses, protocols, run_id, rows=None))
        return [got[i] for i in range(len(samples))]

    def evaluate_stream(self, samples: Sequence[Sample], presses: Sequence[Press] | Mapping[bool, Sequence[Press]],
                        protocols: Sequence[bool] = (False,), run_id: str = "",
                        rows: int | None = STREAM_ROWS) -> Iterator[tuple[int, list[dict]]]:
        """(index in `samples`, its rows) for each sample as soon as its last config is done: one
        prefill per sample, and the configs of every sample admitted decode as rows of one batch
        (`ConfigRuns`; a decode step of a small model costs about the same for 6 rows as for
        24), each leaving when it is done. The next sample is prefilled and admitted once its
        configs fit within `rows` decoding rows, or nothing decodes (None: all at once; the KV
        budget still bounds what decodes together), so its configs join while the last sample's
        long answers still decode."""
        lm = self.lm
        configs = config_pairs(presses, protocols)
        every = [p for p, _ in configs]
        aware = [q for _, q in configs]
        runs = ConfigRuns(lm, self.kv_budget)
        todo = list(enumerate(samples))[::-1]
        admitted: dict[int, tuple[int, Sample]] = {}  # handle -> (index, sample)
        while todo or admitted:
            if todo and (not runs.active or rows is None or runs.active + len(configs) <= rows):
                i, sample = todo.pop()
                prompt = build_prompt(lm.tokenizer, sample.context, sample.question, sample.answer_prefix)
                pre = prefill(lm, prompt, capture_window=capture_window_for(every),
                              capture_hidden=hidden_needed_for(every), with_question=any(aware))
                admitted[runs.add(pre, every, aware, sample.max_new_tokens, release_prefill=True)] = (i, sample)
                del pre
            elif runs.active:
                runs.step()
            done = runs.finished()
            if not done and not runs.active and not todo:
                raise RuntimeError(f"{len(admitted)} samples admitted but none decoding")  # a bug, not a hang
            for handle in done:  # also those finished while `add` made room
                i, sample = admitted.pop(handle)
                yield i, [self._row(run_id, sample, press, q, out)
                          for (press, q), out in zip(configs, runs.outputs(handle))]

    def _row(self, run_id, sample, press, query_aware, out) -> dict:
        s = out.stats
        params_json = press.params_json()
        cid = press_config_id(press, query_aware)
        return {
            "run_id": run_id, "created_at": now_utc(), "kvray_version": __version__,
            "schema_version": SCHEMA_VERSION, "item_id": short_hash(cid, sample.sample_id), "config_id": cid,
            "model": self.lm.name, "method": press.name, "params": params_json, "plan_id": press.plan_id,
            "compression_ratio": press.target_ratio, "achieved_ratio": s.compression_ratio,
            "query_aware": bool(query_aware), "task": sample.task, "sample_id": sample.sample_id,
            "target_length": sample.length, "context_tokens": s.kv_tokens_full, "prediction": out.text, "answers": list(sample.answers),
            "score": score_sample(sample, out.text), "kv_bytes_full": s.kv_bytes_full,
            "kv_bytes_kept": s.kv_bytes_kept, "prefill_s": s.prefill_s, "compress_s": s.compress_s,
            "decode_s": s.decode_s, "new_tokens": s.new_tokens, "peak_mem_bytes": s.peak_mem_bytes,
            "device": str(self.lm.device),
        }


def work_manifest(model: str, samples: Sequence[Sample], presses: Sequence[Press] | Mapping[bool, Sequence[Press]],
                  protocols: Sequence[bool]) -> dict:
    key = lambda p: f"{p.name}|{p.params_json()}|{p.target_ratio}|{p.plan_id}"  # noqa: E731
    if isinstance(presses, Mapping):  # each protocol its own presses
        configs = sorted(f"{'aware' if q else 'agnostic'}|{key(p)}" for p, q in config_pairs(presses))
    else:
        configs = sorted(key(p) for p in presses)
    return {"model": model, "samples": sorted(s.sample_id for s in samples), "configs": configs,
            "protocols": sorted(bool(q) for q in protocols)}


def shard_name(sample: Sample) -> str:
    return short_hash(sample.sample_id)


def start_run(model: str, samples: Sequence[Sample], presses: Sequence[Press] | Mapping[bool, Sequence[Press]], *,
              out_dir, protocols: Iterable[bool] = (False,), run_id: str | None = None):
    """Check the work (`presses`: see `config_pairs`), record it in the run's manifest and return
    (run_id, protocols, samples still to do). A run id that exists is resumed: samples whose
    shard is written are skipped, and a different plan of work under the same id is refused."""
    if isinstance(presses, Mapping):
        presses = {bool(q): list(ps) for q, ps in presses.items() if ps}
        protocols = list(presses)
    protocols = list(dict.fromkeys(bool(q) for q in protocols))
    if not samples:
        raise ValueError("no samples to evaluate")
    if not presses:
        raise ValueError("no methods to evaluate")
    if not protocols:
        raise ValueError("no protocol to evaluate (query_aware False and/or True)")
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids are not unique; every sample needs its own sample_id")
    run_id = run_id or new_run_id()
    write_manifest(out_dir, run_id, {"created_at": now_utc().isoformat(), "kvray_version": __version__,
                                     "work": work_manifest(model, samples, presses, protocols)})
    todo = [s for s in samples if not shard_exists(out_dir, run_id, shard_name(s))]
    if len(todo) < len(samples):
        log.info("run %s: %d of %d samples already done, skipping them", run_id, len(samples) - len(todo), len(samples))
    return run_id, protocols, todo


def run_eval(host: ModelHost, samples: Sequence[Sample], presses: Sequence[Press] | Mapping[bool, Sequence[Press]],
             *, out_dir, protocols: Iterable[bool] = (False,), run_id: str | None = None, progress: bool = True):
    """Evaluate and write one Parquet shard per sample under `out_dir/run_id=<id>/`.

    Samples whose shard exists are skipped (resume). Returns (run_id, DataFrame of the run).
    `kvray.actors.run_eval_distributed` does the same over Ray actors."""
    from tqdm.auto import tqdm

    run_id, protocols, todo = start_run(host.lm.name, samples, presses, out_dir=out_dir,
                                        protocols=protocols, run_id=run_id)
    n_configs = len(config_pairs(presses, protocols))
    bar = tqdm(total=len(todo) * n_configs, disable=not progress, unit="cfg", desc=f"eval {run_id}")
    order = by_cost(todo)
    try:  # the next sample joins while the last one's long answers decode; each shard as it is done
        t0 = time.perf_counter()
        for k, (i, rows) in enumerate(host.evaluate_stream(order, presses, protocols, run_id=run_id)):
            write_shard(rows, out_dir, run_id, shard_name(order[i]))
            bar.update(n_configs)
            bar.set_postfix(sample=order[i].sample_id, s=f"{(time.perf_counter() - t0) / (k + 1):.1f}")
    finally:
        bar.close()
    return run_id, read_results(run_dir(out_dir, run_id))


def summarize(df) -> str:
    """Score by method x ratio x task (and protocol), with kv bytes kept and times."""
    import pandas as pd

    if df.empty:
        return "(no rows)"
    df = df.copy()
    df["protocol"] = df["query_aware"].map({True: "aware", False: "agnostic"})
    # several target lengths: one column per task and length
    lengths = df["target_length"].dropna().unique()
    df["cell"] = df["task"]
    if len(lengths) > 1:
        df["cell"] = df["task"] + "@" + df["target_length"].map(lambda n: "?" if pd.isna(n) else str(int(n)))
    scores = df.pivot_table(index=["protocol", "method", "compression_ratio"], columns="cell", values="score",
                            aggfunc="mean")
    scores["mean"] = df.groupby(["protocol", "method", "compression_ratio"])["score"].mean()
    extra = df.groupby(["protocol", "method", "compression_ratio"]).agg(
        n=("score", "size"),
        kv_MiB_kept=("kv_bytes_kept", lambda x: x.mean() / 2**20),
        compress_ms=("compress_s", lambda x: 1000 * x.mean()),
        decode_s=("decode_s", "mean"),
    )
    extra["kept_frac"] = (df.groupby(["protocol", "method", "compression_ratio"])
                          .apply(lambda g: g["kv_bytes_kept"].sum() / g["kv_bytes_full"].sum(), include_groups=False))
    table = pd.concat([scores, extra], axis=1)
    prefill = df.drop_duplicates("sample_id")["prefill_s"].mean()
    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.float_format", "{:.3f}".format):
        return f"{table.to_string()}\n\nmean prefill: {prefill:.2f} s per sample (shared by every config)"


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)

"""Decode-engine benchmarks, side by side in one run (embedded model, CPU threads, 127.0.0.1 only):

(a) Serve closed loop on one model replica: the batching engine vs today's one-request-at-a-time
    path (both deployed in the same Serve instance, used in turn), on two workloads --
    decode-heavy (~200-token contexts, 64 new tokens) and prompt-heavy (~1k-token contexts, 16 new
    tokens) -- for full vs snapkv@0.5 vs snapkv@0.75 at concurrency 1/4/16/32: req/s, output
    tokens/s, time to first token (streamed), latency p50/p99.
(b) Admission: the most concurrent rows each policy gets under one KV budget (the engine's own
    reservation, from a real compressed cache of the workload).
(c) The 19-config grid (full + random, streaming_llm, knorm, snapkv, pyramidkv, adakv x
    0.5/0.75/0.9; niah_single ~1k tokens) per sample: `kvray eval` as a user runs it (start-up
    included) vs one prefill per config (kvray's own, and kvpress 0.5.5 itself when
    .venv-kvpress exists: bench/kvpress_grid.py); and one decode step of 16 rows against this machine's
    limit (bytes of weights + KV read / measured memory bandwidth).
(d) Decode ms/token at 4k tokens: head-adaptive (adakv) 0.75 vs uniform (snapkv) 0.75 vs full.
(e) What a served batch keeps alive vs what it counts, with and without the engine's compaction
    (in-process engine, decode-heavy prompts at concurrency 16, rows leaving at different steps).

    python bench/bench_engine.py               # ~15 minutes: docs/bench_engine.md + bench/results/bench_engine.json
    python bench/bench_engine.py --quick       # a smoke check of every part (~3 minutes)
    python bench/bench_engine.py --parts c,d   # some parts only (a,b,c,d,e)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GRID = "full,random,streaming_llm,knorm,snapkv,pyramidkv,adakv"
WORKLOADS = {"decode-heavy": (200, 64), "prompt-heavy": (1000, 16)}  # context tokens, new tokens
POLICIES = {"full": ("full", 0.0), "snapkv@0.5": ("snapkv", 0.5), "snapkv@0.75": ("snapkv", 0.75)}


def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def requests_for(tok, context_tokens: int, n: int, seed: int) -> list[dict]:
    from kvray.eval import make_samples

    count = lambda s: len(tok(s, add_special_tokens=False).input_ids)  # noqa: E731
    return [{"context": s.context, "question": s.question}
            for s in make_samples("niah_single", n, length=context_tokens, seed=seed, count_tokens=count)]


# ----------------------------------------------------------------------------- (a) Serve


async def closed_loop(url: str, bodies: list[dict], concurrency: int, total: int) -> dict:
    """`concurrency` clients; each streams its next request when the last one is answered, until
    `total` requests have been sent. Latency = until the last event; TTFT = the first piece."""
    import httpx

    lat, ttft, tokens, codes = [], [], 0, {}
    sent = 0
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        async def worker():
            nonlocal sent, tokens
            while sent < total:
                body = bodies[sent % len(bodies)]
                sent += 1
                t0 = time.perf_counter()
                first = None
                async with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                    if r.status_code != 200:
                        await r.aread()
                        continue
                    last = None
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            first = first or time.perf_counter()
                            last = line
                final = json.loads(last[6:])
                lat.append(time.perf_counter() - t0)
                ttft.append((first or time.perf_counter()) - t0)
                tokens += final["new_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(lat), "status": {str(k): v for k, v in codes.items()},
            "wall_s": wall, "req_per_s": len(lat) / wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": pct(ttft, 50), "p50_s": pct(lat, 50), "p99_s": pct(lat, 99)}


def part_a(args, tok, out: dict) -> None:
    import ray
    from ray import serve

    from kvray.serve.app import deploy

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    store = tempfile.mkdtemp(prefix="kvray-bench-policies-")
    ray.init(address="local", num_cpus=2 * args.threads, include_dashboard=False, log_to_driver=False)
    res = out.setdefault("serve", {"cells": []})
    try:
        common = dict(port=port, cpus=args.threads, threads=args.threads)
        deploy(store, None, name="engine", route_prefix="/engine", **common)
        deploy(store, None, name="one-at-a-time", route_prefix="/one", batching=False, **common)
        levels = [1, 4] if args.quick else [1, 4, 16, 32]
        for workload, (ctx, new) in WORKLOADS.items():
            bodies = requests_for(tok, ctx, 8, seed=11)
            for label, (method, ratio) in POLICIES.items():
                if args.quick and label == "snapkv@0.75":
                    continue
                for path, kind in (("/engine", "engine"), ("/one", "one-at-a-time")):
                    if kind == "one-at-a-time" and label != "snapkv@0.5":
                        continue  # today's path: one policy is enough to show it is flat
                    for c in levels:
                        if kind == "one-at-a-time" and c not in (1, 16):
                            continue
                        total = max(2 * c, 4) if not args.quick else max(c, 2)
                        if kind == "one-at-a-time":
                            total = max(c, 4) if not args.quick else 2
                        reqs = [{**b, "method": method, "compression_ratio": ratio, "max_new_tokens": new,
                                 "ignore_eos": True} for b in bodies]  # every request decodes its full length
                        asyncio.run(closed_loop(url + path, reqs[:1], 1, 1))  # warm
                        r = asyncio.run(closed_loop(url + path, reqs, c, total))
                        r.update(workload=workload, policy=label, path=kind)
                        res["cells"].append(r)
                        print(f"[a] {workload:>12} {label:>11} {kind:>13} c={c:>2}: {r['req_per_s']:.2f} req/s "
                              f"{r['tokens_per_s']:.1f} tok/s ttft {r['ttft_p50_s']:.2f}s p50 {r['p50_s']:.2f}s "
                              f"p99 {r['p99_s']:.2f}s {r['status']}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


# ----------------------------------------------------------------------------- (b) admission


def part_b(args, lm, out: dict) -> None:
    import kvray
    from kvray.generate import compress
    from kvray.runtime import build_prompt, prefill
    from kvray.serve.engine import BatchingEngine

    engine = BatchingEngine(lm, kv_budget=1)  # only its accounting is used
    res = out.setdefault("admission", {})
    for workload, (ctx, new) in WORKLOADS.items():
        body = requests_for(lm.tokenizer, ctx, 1, seed=12)[0]
        prompt = build_prompt(lm.tokenizer, body["context"], body["question"])
        pre = prefill(lm, prompt, with_question=False)
        rows = {}
        for label, (method, ratio) in POLICIES.items():
            press = kvray.make_press(method, compression_ratio=ratio) if ratio else kvray.make_press("full")
            cache = compress(lm, pre, press, False)
            rows[label] = {"estimate_bytes": engine.estimate(press, prompt, False, new),
                           "row_bytes": engine.decoder.row_bytes(cache, len(prompt.rest), new)}
        budget = 16 * rows["full"]["row_bytes"]  # a budget that holds 16 full-cache rows of this workload
        for r in rows.values():
            r["rows"] = budget // r["row_bytes"]
        for r in rows.values():
            r["vs_full"] = r["rows"] / rows["full"]["rows"]
        res[workload] = {"budget_bytes": budget, "policies": rows}
        print(f"[b] {workload}: budget {budget / 2**20:.1f} MiB -> " + ", ".join(
            f"{k} {v['rows']} rows ({v['vs_full']:.2f}x)" for k, v in rows.items()), flush=True)
    engine.close()


# ----------------------------------------------------------------------------- (c) the grid


def bandwidth_gbs() -> float:
    """Measured copy bandwidth (read + write) of a 512 MiB fp32 tensor, best of 5."""
    import torch

    x = torch.empty(128 * 2**20, dtype=torch.float32).fill_(1.0)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.nbytes / best / 1e9


def matmul_gflops(dtype=None) -> float:
    """Measured matmul throughput (2048^3, best of 5; fp32 unless `dtype`), in GFLOP/s."""
    import torch

    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048 ** 3 / best / 1e9


def part_c(args, lm, out: dict) -> None:
    import torch

    import kvray
    from kvray.eval import make_samples
    from kvray.eval.runner import build_presses
    from kvray.generate import compress
    from kvray.runtime import Decoder, build_prompt, prefill

    samples = 2 if args.quick else 6
    res = out.setdefault("grid", {})
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "kvray.cli", "eval", "--methods", GRID, "--ratios", "0.5,0.75,0.9",
               "--tasks", "niah_single", "--length", "1000", "--samples", str(samples), "--threads",
               str(args.threads), "--out", tmp, "--no-progress"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
    presses = build_presses(GRID.split(","), [0.5, 0.75, 0.9])
    res.update(configs=len(presses), samples=samples, kvray_eval_s=wall, kvray_per_sample_s=wall / samples)
    # one prefill per config, each decoded alone: kvpress's way (start-up not counted)
    n_re = 1 if args.quick else 2
    count = lambda s: len(lm.tokenizer(s, add_special_tokens=False).input_ids)  # noqa: E731
    t0 = time.perf_counter()
    for s in make_samples("niah_single", n_re, 1000, seed=0, count_tokens=count):
        for p in presses:
            kvray.generate(lm, s.context, s.question, press=p, answer_prefix=s.answer_prefix,
                           max_new_tokens=s.max_new_tokens)
    res["reprefill_per_sample_s"] = (time.perf_counter() - t0) / n_re
    res["speedup"] = res["reprefill_per_sample_s"] / res["kvray_per_sample_s"]
    print(f"[c] grid of {len(presses)} configs: kvray eval {res['kvray_per_sample_s']:.1f} s/sample (start-up "
          f"included, {samples} samples) vs one prefill per config {res['reprefill_per_sample_s']:.1f} s/sample "
          f"-> {res['speedup']:.1f}x", flush=True)
    kvpress_grid(args, lm, samples, count, res)
    # one decode step of 16 rows: time vs bytes read / bandwidth
    s = make_samples("niah_single", 1, 1000, seed=1, count_tokens=count)[0]
    prompt = build_prompt(lm.tokenizer, s.context, s.question, s.answer_prefix)
    pre = prefill(lm, prompt, with_question=False)
    dec = Decoder(lm)
    for p in presses[:16]:
        dec.add(compress(lm, pre, p, False), feed=pre.rest(False), max_new_tokens=40, ignore_stop_tokens=True)
    dec.step()
    dec.step()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        dec.step()
        times.append(time.perf_counter() - t0)
    weights = sum(t.numel() * t.element_size() for t in lm.model.parameters())
    emb = lm.model.get_input_embeddings().weight
    tied = lm.model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    # every weight is read once per step except the input embedding (rows looked up); a tied LM head is read
    weights_read = weights - (0 if tied else emb.numel() * emb.element_size())
    kv = dec.kv_bytes()
    bw = bandwidth_gbs()
    gflops = matmul_gflops(lm.dtype)  # the model's own dtype: bf16's peak is not fp32's
    step = float(np.median(times))
    limit = (weights_read + kv) / (bw * 1e9 / 2)  # reading only: half of the copy's read + write traffic
    # compute: 2 FLOPs per weight per row in the linear layers (the embedding is a lookup), plus
    # attention's 4 FLOPs per (query head, entry, dim): QK^T and PV
    cfg = lm.config
    linear = sum(p.numel() for n, p in lm.model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    entries = kv / (2 * lm.dtype.itemsize * lm.head_dim)  # keys + values
    flops = 2 * linear * dec.active + 4 * entries * (cfg.num_attention_heads // lm.num_kv_heads) * lm.head_dim
    compute = flops / (gflops * 1e9)
    res["decode_step_16"] = {"rows": dec.active, "dtype": str(lm.dtype).removeprefix("torch."),
                             "step_ms": 1000 * step, "weights_bytes": weights_read,
                             "kv_bytes": kv, "copy_bandwidth_gbs": bw, "limit_ms": 1000 * limit,
                             "fraction_of_limit": limit / step, "gflop": flops / 1e9, "matmul_gflops": gflops,
                             "compute_limit_ms": 1000 * compute, "fraction_of_compute_limit": compute / step}
    print(f"[c] one decode step of {dec.active} rows: {1000 * step:.1f} ms; weights {weights_read / 2**20:.0f} MiB + "
          f"KV {kv / 2**20:.1f} MiB at {bw:.1f} GB/s copy bandwidth -> limit {1000 * limit:.1f} ms "
          f"({100 * limit / step:.0f}% of it); {flops / 1e9:.1f} GFLOP at {gflops:.0f} GFLOP/s -> "
          f"{1000 * compute:.1f} ms ({100 * compute / step:.0f}% of it)", flush=True)
    del dec
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def kvpress_grid(args, lm, n: int, count, res: dict) -> None:
    """kvpress 0.5.5 itself on the same samples (bench/kvpress_grid.py in its own virtualenv, same
    dtype and threads, model load not counted), when `--kvpress-python` exists."""
    from kvray.eval import make_samples
    from kvray.models import _converted_dir, _resolve

    py = Path(args.kvpress_python)
    if not py.is_file():
        print(f"[c] kvpress: {py} not found, skipped (python3 -m venv .venv-kvpress && "
              ".venv-kvpress/bin/pip install torch==2.13.0 kvpress==0.5.5)", flush=True)
        return
    _, source, gguf = _resolve(None)
    model_dir = _converted_dir(source, gguf)
    samples = [{"context": s.context, "question": s.question, "answer_prefix": s.answer_prefix,
                "max_new_tokens": s.max_new_tokens}
               for s in make_samples("niah_single", n, 1000, seed=0, count_tokens=count)]  # kvray eval's samples
    dtype = str(lm.dtype).removeprefix("torch.")
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp, "samples.json")
        spec.write_text(json.dumps({"samples": samples}))
        done = subprocess.run([str(py), str(ROOT / "bench" / "kvpress_grid.py"), "--model-dir", str(model_dir),
                               "--samples", str(spec), "--dtype", dtype, "--threads", str(args.threads)],
                              check=True, capture_output=True, text=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    per = float(np.mean(got["per_sample_s"]))
    res["kvpress"] = {"per_sample_s": per, "samples": got["samples"], "configs": got["configs"], "dtype": dtype,
                      "speedup": per / res["kvray_per_sample_s"],
                      "pyramidkv_timed_as_snapkv": got["pyramidkv_timed_as_snapkv"]}
    print(f"[c] kvpress 0.5.5, one prefill per config ({dtype}): {per:.1f} s/sample -> kvray eval is "
          f"{res['kvpress']['speedup']:.1f}x faster per sample", flush=True)


# ----------------------------------------------------------------------------- (d) decode at 4k


def part_e(args, lm, out: dict) -> None:
    """The engine in-process (no HTTP): decode-heavy prompts at concurrency 16, answers of 16-64
    tokens so rows leave at different steps; kept alive (`kv_bytes_referenced`) / counted
    (`kv_bytes_held`), sampled every 50 ms, and requests/s, compaction off and on, in turn."""
    import kvray.serve.engine as engine_mod
    from kvray.serve.api import GenerateJob, ModelBackend

    n = 16 if args.quick else 48
    bodies = requests_for(lm.tokenizer, WORKLOADS["decode-heavy"][0], n, seed=7)
    jobs = [GenerateJob(context=b["context"], question=b["question"], method="snapkv", compression_ratio=0.5,
                        query_aware=False, max_new_tokens=16 + (i * 7) % 49, ignore_eos=True) for i, b in enumerate(bodies)]
    default = engine_mod.COMPACT_ABOVE
    res = out.setdefault("compaction", {"requests": n, "concurrency": 16, "compact_above": default, "runs": []})
    res["runs"] = []
    try:
        for setting in (None, default) * (1 if args.quick else 2):
            engine_mod.COMPACT_ABOVE = setting
            backend = ModelBackend(lm)
            ratios = []

            async def main(backend=backend, ratios=ratios):
                gate = asyncio.Semaphore(16)

                async def one(job):
                    async with gate:
                        return await backend.generate(job)

                async def watch():
                    while True:
                        st = backend.stats()
                        if st["kv_bytes_held"]:
                            ratios.append(st["kv_bytes_referenced"] / st["kv_bytes_held"])
                        await asyncio.sleep(0.05)

                watcher = asyncio.ensure_future(watch())
                t0 = time.perf_counter()
                await asyncio.gather(*(one(j) for j in jobs))
                watcher.cancel()
                return time.perf_counter() - t0

            wall = asyncio.run(main())
            backend.engine.close()
            run = {"compact_above": setting, "req_per_s": n / wall, "kept_alive_p50": pct(ratios, 50),
                   "kept_alive_max": max(ratios, default=float("nan"))}
            res["runs"].append(run)
            print(f"[e] compact_above {setting}: {run['req_per_s']:.2f} req/s, kept alive / counted p50 "
                  f"{run['kept_alive_p50']:.2f}, max {run['kept_alive_max']:.2f}", flush=True)
    finally:
        engine_mod.COMPACT_ABOVE = default


def part_d(args, lm, out: dict) -> None:
    import kvray
    from kvray.eval import make_samples
    from kvray.generate import compress
    from kvray.runtime import Decoder, build_prompt, prefill

    count = lambda s: len(lm.tokenizer(s, add_special_tokens=False).input_ids)  # noqa: E731
    s = make_samples("niah_single", 1, 4000, seed=2, count_tokens=count)[0]
    prompt = build_prompt(lm.tokenizer, s.context, s.question, s.answer_prefix)
    pre = prefill(lm, prompt, with_question=False)
    configs = {"full": kvray.make_press("full"), "uniform snapkv@0.75": kvray.make_press("snapkv", compression_ratio=0.75),
               "head-adaptive adakv@0.75": kvray.make_press("adakv", compression_ratio=0.75)}
    tokens = 12 if args.quick else 40
    times = {k: [] for k in configs}
    sizes = {}
    # the three decode side by side, one step each in turn: this machine's speed drifts by up to
    # 25% within minutes, and a drift then hits all three alike; the median step of each
    for _ in range(2 if args.quick else 3):
        decs = {}
        for label, press in configs.items():
            cache = compress(lm, pre, press, False)
            sizes[label] = cache.prefix_nbytes()
            decs[label] = dec = Decoder(lm)
            dec.add(cache, feed=pre.rest(False), max_new_tokens=tokens + 2, ignore_stop_tokens=True)
            dec.step()
            dec.step()
        for _ in range(tokens):
            for label, dec in decs.items():
                t0 = time.perf_counter()
                dec.step()
                times[label].append(time.perf_counter() - t0)
        del decs, dec
    med = {label: float(np.median(t)) for label, t in times.items()}
    res = out.setdefault("decode_4k", {"context_tokens": pre.n_context, "steps_each": len(times["full"])})
    for label in configs:
        res[label] = {"ms_per_token": 1000 * med[label], "vs_full": med[label] / med["full"],
                      "kv_bytes": sizes[label]}
    res["adaptive_vs_uniform"] = med["head-adaptive adakv@0.75"] / med["uniform snapkv@0.75"]
    print("[d] " + ", ".join(f"{k} {v['ms_per_token']:.1f} ms ({v['vs_full']:.2f}x full)"
                             for k, v in res.items() if isinstance(v, dict))
          + f"; adaptive / uniform {res['adaptive_vs_uniform']:.3f}", flush=True)


# ----------------------------------------------------------------------------- page


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_page(res: dict, page: Path, quick: bool) -> None:
    lines = ["# Decode engine benchmark", "",
             f"Generated by `python bench/bench_engine.py` in one run on {res['machine']}; model {res['model']}, "
             f"{res['threads']} torch threads. Raw numbers: `bench/results/bench_engine.json`.", "",
             *(["**Quick run: too short for conclusions.**", ""] if quick else [])]
    if "serve" in res:
        lines += ["## (a) Serve, closed loop, one model replica", "",
                  "Each client streams its next request when the previous one is answered. Decode-heavy: ~200-token "
                  "contexts, 64 new tokens; prompt-heavy: ~1k-token contexts, 16 new tokens (niah_single prompts; "
                  "`ignore_eos`, so every request decodes exactly that many tokens whatever the policy). "
                  "`engine`: continuous batching; `one-at-a-time`: today's path (one request on the model at a "
                  "time), same replica resources, same Serve instance, measured in turn.", "",
                  "| workload | policy | path | concurrency | requests | req/s | output tok/s | TTFT p50 | p50 | p99 |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["serve"]["cells"]:
            lines.append(f"| {r['workload']} | {r['policy']} | {r['path']} | {r['concurrency']} | {r['requests']} | "
                         f"{r['req_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} s | "
                         f"{r['p50_s']:.2f} s | {r['p99_s']:.2f} s |")
        lines.append("")
        cells = res["serve"]["cells"]

        def find(w, p, path, c):
            return next((x for x in cells if (x["workload"], x["policy"], x["path"], x["concurrency"]) == (w, p, path, c)), None)

        for w in WORKLOADS:
            e1, e16, o1 = find(w, "snapkv@0.5", "engine", 1), find(w, "snapkv@0.5", "engine", 16), \
                find(w, "snapkv@0.5", "one-at-a-time", 1)
            if e1 and e16 and o1:
                lines.append(f"- {w}, snapkv@0.5: concurrency 16 serves {e16['req_per_s'] / e1['req_per_s']:.2f}x the "
                             f"req/s of concurrency 1; latency at concurrency 1 is {e1['p50_s'] / o1['p50_s']:.2f}x "
                             "the one-at-a-time path's.")
        lines.append("")
    if "admission" in res:
        lines += ["## (b) Admission under one KV budget", "",
                  "The budget holds 16 full-cache rows of the workload; a row reserves its compressed prompt plus "
                  "the tokens fed and generated after compression, and on this CPU (the torch path) the attention "
                  "blocks it builds: a padded copy of the same with room for the tokens it may decode "
                  "(`Decoder.row_bytes`, the engine's own accounting, from a real compressed cache).", "",
                  "| workload | budget | policy | bytes per row | rows admitted | vs full |", "|---|---|---|---|---|---|"]
        for w, v in res["admission"].items():
            for p, r in v["policies"].items():
                lines.append(f"| {w} | {v['budget_bytes'] / 2**20:.1f} MiB | {p} | {r['row_bytes'] / 2**20:.2f} MiB | "
                             f"{r['rows']} | {r['vs_full']:.2f}x |")
        lines.append("")
    if "grid" in res:
        g = res["grid"]
        lines += ["## (c) The 19-config grid per sample", "",
                  f"`kvray eval --methods {GRID} --ratios 0.5,0.75,0.9 --tasks niah_single --length 1000 --samples "
                  f"{g['samples']}` as a user runs it (a fresh process, model load included): "
                  f"**{g['kvray_per_sample_s']:.1f} s per sample**. One prefill per config, each decoded alone "
                  f"(kvpress's way, model load not counted): {g['reprefill_per_sample_s']:.1f} s per sample. "
                  f"Ratio: **{g['speedup']:.1f}x**.", ""]
        if "kvpress" in g:
            k = g["kvpress"]
            lines += [f"kvpress 0.5.5 itself (`bench/kvpress_grid.py` in its own virtualenv, {k['dtype']}, same threads, "
                      f"the same {k['samples']} samples, its text-generation pipeline once per config, model load not "
                      f"counted): {k['per_sample_s']:.1f} s per sample. `kvray eval` costs **{k['speedup']:.1f}x** less "
                      "per sample."
                      + (" (kvpress's PyramidKVPress fails in its pipeline on this model once the question is fed "
                         "after compression, a mask-size mismatch; its three configs are timed as SnapKV at the same "
                         "ratio, the same scorer and cost.)" if k.get("pyramidkv_timed_as_snapkv") else ""), ""]
        d = g["decode_step_16"]
        lines += [f"One decode step of {d['rows']} rows of that grid: {d['step_ms']:.1f} ms. It reads the weights "
                  f"({d['weights_bytes'] / 2**20:.0f} MiB, {d.get('dtype', 'float32')}) and the rows' KV ({d['kv_bytes'] / 2**20:.1f} MiB); at "
                  f"the measured copy bandwidth ({d['copy_bandwidth_gbs']:.1f} GB/s read + write) reading them takes "
                  f"{d['limit_ms']:.1f} ms: the step runs at {100 * d['fraction_of_limit']:.0f}% of that bandwidth limit. "
                  f"It is {d['gflop']:.1f} GFLOP (linear layers for every row, plus attention); at the measured "
                  f"{d.get('dtype', 'float32')} matmul throughput ({d['matmul_gflops']:.0f} GFLOP/s, 2048^3) that is {d['compute_limit_ms']:.1f} ms: "
                  f"{100 * d['fraction_of_compute_limit']:.0f}% of the compute limit. With 16 rows a CPU step is bound "
                  "by compute, not by reading memory.", ""]
    if "decode_4k" in res:
        d = res["decode_4k"]
        lines += ["## (d) Decode at 4k tokens", "",
                  f"A {d['context_tokens']}-token niah_single context, one row each: the median of "
                  f"{d.get('steps_each', '?')} decode steps per cache, the three stepping in turn, ms per generated token.", "", "| cache | ms/token | vs full | KV bytes |", "|---|---|---|---|"]
        for k, v in d.items():
            if isinstance(v, dict):
                lines.append(f"| {k} | {v['ms_per_token']:.1f} | {v['vs_full']:.2f}x | {v['kv_bytes'] / 2**20:.1f} MiB |")
        lines += ["", f"Head-adaptive / uniform at 0.75: {d['adaptive_vs_uniform']:.3f}x.", ""]
    if "compaction" in res:
        e = res["compaction"]
        lines += ["## (e) What a served batch keeps alive", "",
                  f"The engine in-process, {e['requests']} decode-heavy requests (snapkv@0.5, 16-64 new tokens) at "
                  f"concurrency {e['concurrency']}: the bytes of every tensor the batch keeps alive over the bytes its "
                  "rows use (`kv_bytes_referenced` / `kv_bytes_held`, sampled every 50 ms), without compaction and "
                  f"with the engine's (`COMPACT_ABOVE` = {e['compact_above']}), in turn.", "",
                  "| compaction | req/s | kept alive / counted, p50 | max |", "|---|---|---|---|"]
        for r in e["runs"]:
            lines.append(f"| {'off' if r['compact_above'] is None else r['compact_above']} | {r['req_per_s']:.2f} | "
                         f"{r['kept_alive_p50']:.2f} | {r['kept_alive_max']:.2f} |")
        lines.append("")
    page.write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--parts", default="a,b,c,d,e")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kvpress-python", default=str(ROOT / ".venv-kvpress" / "bin" / "python"),
                    help="a python with kvpress 0.5.5 for part (c)'s kvpress baseline (skipped if absent)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_engine.json"))
    ap.add_argument("--page", default=str(ROOT / "docs" / "bench_engine.md"))
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    import kvray

    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
           "model": "embedded SmolLM2-135M-Instruct", "threads": args.threads, "date": time.strftime("%Y-%m-%d")}
    path = Path(args.out)
    if path.is_file():  # parts run separately accumulate in one file
        out = {**json.loads(path.read_text()), **{k: out[k] for k in ("machine", "threads", "date")}}
    lm = kvray.load_model()
    for name, fn in (("d", part_d), ("b", part_b), ("c", part_c), ("e", part_e)):
        if name in parts:
            fn(args, lm, out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out, indent=1))
    if "a" in parts:
        tok = lm.tokenizer
        del lm
        out.pop("serve", None)
        part_a(args, tok, out)
    path.write_text(json.dumps(out, indent=1))
    write_page(out, Path(args.page), args.quick)
    print(f"wrote {args.out} and {args.page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

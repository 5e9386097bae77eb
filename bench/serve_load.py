"""Load benchmark of the kvray HTTP API on Ray Serve (embedded model), against 127.0.0.1 only,
bounded in time and count (not a timed test).

1. Serve overhead: the same request (a ~500-token needle context, snapkv at 0.5 or a policy,
   16 new tokens, greedy) through HTTP -> Serve -> the model replica, and through an in-process
   `kvray.generate` with the same torch threads, interleaved in blocks in one run; overhead =
   median(HTTP) / median(in-process) - 1.
2. Closed-loop load at concurrency 1, 4 and 16 (each client sends its next request when the
   previous one is answered) for a fixed time each: p50 / p99 latency, throughput, status codes.
   Errors are anything but 200, except the deliberate 503s of phase 3.
3. Overload: concurrency 48 for a short time against the ingress's 16 ongoing + 16 queued: the
   excess is answered 503 at once (their latency is reported), nothing hangs.

    python bench/serve_load.py                 # ~4 minutes; docs/bench_serve.md + bench/results/serve_load.json
    python bench/serve_load.py --quick         # a smoke check (~1 minute)
    make bench-serve
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q, method="nearest")) if xs else float("nan")


def make_request(args) -> dict:
    import kvray
    from kvray.eval import make_samples

    tok = kvray.load_tokenizer(args.model)
    (sample,) = make_samples("niah_single", 1, length=args.context_tokens, seed=3,
                             count_tokens=lambda s: len(tok(s, add_special_tokens=False).input_ids))
    body = {"context": sample.context, "question": sample.question, "max_new_tokens": args.max_new_tokens}
    body.update({"policy": args.policy} if args.policy else {"method": "snapkv", "compression_ratio": 0.5})
    return body


def in_process_generate(lm, body: dict, press) -> float:
    import kvray

    t0 = time.perf_counter()
    kvray.generate(lm, body["context"], body["question"], press=press, max_new_tokens=body["max_new_tokens"],
                   query_aware=bool(body.get("query_aware", False)))
    return time.perf_counter() - t0


def overhead(url: str, body: dict, lm, press, blocks: int, per_block: int) -> dict:
    """Interleaved blocks: `per_block` HTTP requests, then `per_block` in-process calls, so slow
    drifts of a shared machine hit both alike."""
    http_s, local_s, answers = [], [], set()
    with httpx.Client(base_url=url, timeout=300) as client:
        client.post("/v1/generate", json=body).raise_for_status()  # warm-up, both sides
        in_process_generate(lm, body, press)
        for _ in range(blocks):
            for _ in range(per_block):
                t0 = time.perf_counter()
                r = client.post("/v1/generate", json=body)
                http_s.append(time.perf_counter() - t0)
                r.raise_for_status()
                answers.add(r.json()["answer"])
            for _ in range(per_block):
                local_s.append(in_process_generate(lm, body, press))
    med_http, med_local = statistics.median(http_s), statistics.median(local_s)
    return {"requests_each": len(http_s), "http_median_s": med_http, "in_process_median_s": med_local,
            "http_p90_s": percentile(http_s, 90), "in_process_p90_s": percentile(local_s, 90),
            "overhead": med_http / med_local - 1.0, "overhead_ms": 1000 * (med_http - med_local),
            "distinct_answers": len(answers)}


async def closed_loop(url: str, body: dict, concurrency: int, duration: float) -> dict:
    """`concurrency` clients, each sending its next request when the last is answered, until
    `duration` has passed (requests in flight then are awaited and counted)."""
    lat_ok, lat_503, codes, tokens = [], [], Counter(), 0
    errors: list[str] = []
    deadline = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker():
            nonlocal tokens
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/generate", json=body)
                    code = r.status_code
                except httpx.HTTPError as exc:
                    code, r = f"{type(exc).__name__}", None
                dt = time.perf_counter() - t0
                codes[code] += 1
                if code == 200:
                    lat_ok.append(dt)
                    tokens += r.json()["new_tokens"]
                elif code == 503:
                    lat_503.append(dt)
                    await asyncio.sleep(0.05)  # a client backing off, not a busy loop
                elif len(errors) < 5:
                    errors.append(f"{code}: {r.text[:200] if r is not None else ''}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "window_s": duration, "duration_s": wall, "requests": sum(codes.values()), "ok": len(lat_ok),
            "status": {str(k): v for k, v in sorted(codes.items(), key=str)},
            "errors": sum(v for k, v in codes.items() if k not in (200, 503)), "error_samples": errors,
            "deliberate_503": codes.get(503, 0),
            "p50_s": percentile(lat_ok, 50), "p99_s": percentile(lat_ok, 99), "max_s": max(lat_ok, default=float("nan")),
            "p99_503_s": percentile(lat_503, 99), "throughput_rps": len(lat_ok) / wall, "tokens_per_s": tokens / wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--policies", default=None, help="policy store (default: a temporary empty one)")
    ap.add_argument("--policy", default=None, help="a policy id to request (default: snapkv at 0.5)")
    ap.add_argument("--context-tokens", type=int, default=500)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                    help="torch threads, for the replica and the in-process run alike")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds at the highest concurrency")
    ap.add_argument("--short-duration", type=float, default=30.0, help="seconds at the other concurrencies")
    ap.add_argument("--overload", type=int, default=48, help="concurrency of the overload phase (0: skip)")
    ap.add_argument("--overload-duration", type=float, default=15.0)
    ap.add_argument("--quick", action="store_true", help="short phases, to check the script")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_load.json"))
    ap.add_argument("--page", default=str(ROOT / "docs" / "bench_serve.md"))
    args = ap.parse_args()
    if args.quick:
        args.duration, args.short_duration, args.overload_duration = 10.0, 5.0, 5.0
    levels = [int(c) for c in args.concurrency.split(",")]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import tempfile

    import ray
    import torch
    from ray import serve

    import kvray
    from kvray.serve.app import INGRESS_MAX_ONGOING, INGRESS_MAX_QUEUED, deploy

    torch.set_num_threads(args.threads)
    body = make_request(args)
    store = args.policies or tempfile.mkdtemp(prefix="kvray-bench-policies-")
    ray.init(address="local", num_cpus=max(args.threads, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                                f"ray {ray.__version__}",
                     "model": args.model or "embedded SmolLM2-135M-Instruct", "threads": args.threads,
                     "request": {k: v for k, v in body.items() if k != "context"} | {"context_chars": len(body["context"])},
                     "ingress_limits": {"max_ongoing_requests": INGRESS_MAX_ONGOING,
                                        "max_queued_requests": INGRESS_MAX_QUEUED}}
    try:
        t0 = time.perf_counter()
        deploy(store, args.model, port=port, name="kvray-bench", cpus=args.threads, threads=args.threads)
        results["deploy_s"] = time.perf_counter() - t0
        print(f"[serve_load] app up at {url} in {results['deploy_s']:.1f}s", flush=True)
        lm = kvray.load_model(args.model)
        if args.policy:  # the in-process twin of the policy request
            from kvray.policy import PolicyStore

            policy = PolicyStore(Path(store)).get(args.policy)
            press, body["query_aware"] = policy.press(), policy.query_aware
        else:
            press = kvray.make_press("snapkv", compression_ratio=0.5)
        blocks, per_block = (2, 3) if args.quick else (5, 4)
        results["overhead"] = overhead(url, body, lm, press, blocks, per_block)
        o = results["overhead"]
        print(f"[serve_load] concurrency 1, HTTP vs in-process: median {o['http_median_s']:.3f}s vs "
              f"{o['in_process_median_s']:.3f}s -> overhead {100 * o['overhead']:+.1f}% ({o['overhead_ms']:.0f} ms)",
              flush=True)
        del lm
        results["load"] = []
        for c in levels:
            dur = args.duration if c == max(levels) else args.short_duration
            r = asyncio.run(closed_loop(url, body, c, dur))
            results["load"].append(r)
            print(f"[serve_load] concurrency {c:>2} for {r['duration_s']:.0f}s: {r['ok']} ok, errors {r['errors']}, "
                  f"p50 {r['p50_s']:.2f}s p99 {r['p99_s']:.2f}s, {r['throughput_rps']:.2f} req/s, "
                  f"{r['tokens_per_s']:.1f} tok/s, status {r['status']}", flush=True)
        if args.overload:
            r = asyncio.run(closed_loop(url, body, args.overload, args.overload_duration))
            results["overload"] = r
            print(f"[serve_load] overload, concurrency {args.overload}: {r['ok']} ok, {r['deliberate_503']} x 503 "
                  f"(p99 {r['p99_503_s'] * 1000:.0f} ms), other errors {r['errors']}", flush=True)
        # the app still answers after all that
        results["healthy_after"] = httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    finally:
        serve.shutdown()
        ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=float))
    write_page(results, Path(args.page), args.quick)
    print(f"[serve_load] wrote {args.out} and {args.page}")
    return 0


def write_page(res: dict, page: Path, quick: bool) -> None:
    o = res["overhead"]
    lines = ["# Serve load benchmark", "",
             "Generated by `python bench/serve_load.py` (`make bench-serve`); raw numbers in "
             "`bench/results/serve_load.json`. Everything against 127.0.0.1, one run, "
             f"{res['machine']}; model {res['model']}, one model replica with {res['threads']} torch threads "
             "(requests are served one at a time per replica).", "",
             *(["**Quick run: phases too short for conclusions.**", ""] if quick else []),
             f"Request: {res['request']}.", "",
             "## Serve overhead at concurrency 1", "",
             "The same request through HTTP -> Serve ingress -> model replica, and through `kvray.generate` in "
             "the benchmark's own process with the same threads, interleaved in blocks.", "",
             "| requests each | HTTP median | in-process median | overhead |", "|---|---|---|---|",
             f"| {o['requests_each']} | {o['http_median_s']:.3f} s | {o['in_process_median_s']:.3f} s | "
             f"{100 * o['overhead']:+.1f}% ({o['overhead_ms']:.0f} ms) |", "",
             "## Closed-loop load", "",
             "Each client sends its next request when the last one is answered, for the phase's window; "
             "`seconds` runs until the last request in flight is answered. Errors: any status but 200 and the "
             "overload phase's 503s.", "",
             "| concurrency | window | seconds | ok | errors | p50 | p99 | req/s | new tokens/s | status codes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["load"] + ([res["overload"]] if "overload" in res else []):
        lines.append(f"| {r['concurrency']} | {r.get('window_s', float('nan')):.0f} s | {r['duration_s']:.0f} | "
                     f"{r['ok']} | {r['errors']} | {r['p50_s']:.2f} s | "
                     f"{r['p99_s']:.2f} s | {r['throughput_rps']:.2f} | {r['tokens_per_s']:.1f} | {r['status']} |")
    if "overload" in res:
        r = res["overload"]
        lim = res["ingress_limits"]
        lines += ["", f"The last row is the overload phase: {r['concurrency']} clients against the ingress's "
                      f"{lim['max_ongoing_requests']} ongoing + {lim['max_queued_requests']} queued requests; "
                      f"{r['deliberate_503']} requests were shed with 503 (p99 {1000 * r['p99_503_s']:.0f} ms to "
                      "the 503; clients back off 50 ms and retry), the admitted ones were served. Throughput is "
                      "flat from concurrency 1 to 16: one replica serves one request at a time (no cross-request "
                      "batching), so latency grows with the queue; more replicas (`--max-replicas`, GPUs) scale it."]
    lines += ["", f"Healthy after the run: {res.get('healthy_after')}. Deploy (model load included): "
                  f"{res.get('deploy_s', float('nan')):.1f} s.", ""]
    page.write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())

"""The GPU path, measured: kvray's Triton kernels on Llama-3.1-8B-shaped layers (random weights,
bf16, no download), side by side with their torch twins and dense attention, in one run.

    python bench/bench_kernels.py --out DIR          # on a CUDA GPU (bench/gpu_check.sh runs it)
    python bench/bench_kernels.py --smoke --out DIR  # tiny shapes, any machine (CPU: Triton's interpreter)

Writes DIR/bench_kernels.json and DIR/bench_kernels.md:
- (a) ragged decode attention, one layer (32 query heads, 8 KV heads, d = 128), 16 rows, at 4k /
  32k / 128k context keeping 25 / 50 / 100 %, uniform and skewed per-head budgets: the kernel, the
  torch twin, and dense SDPA over the full cache; achieved GB/s (K and V bytes read / time)
  against the GPU's peak and a copy bandwidth measured in the same run;
- (b) window scores at 32k (W = 64): time and peak memory, kernel vs materialising (the twin);
- (c) end to end: decode ms/token and peak memory of a random-initialised Llama-3.1-8B-shaped
  model, full cache vs kvray at 25 % kept (snapkv), one row, 32k context.
Timings: median (p20 / p80) of `triton.testing.do_bench` (L2 flushed between runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_TBS = {"H200": 4.8, "H100": 3.35, "A100": 2.0, "L40S": 0.864, "A10G": 0.6}  # HBM / GDDR peak, TB/s


def peak_bandwidth(name: str) -> float | None:
    return next((v for k, v in PEAK_TBS.items() if k in name), None)


def timed(fn, cuda: bool, reps: int = 20) -> dict:
    if cuda:
        import triton.testing

        ms = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=10, rep=50)
        return {"ms": ms[0], "p20": ms[1], "p80": ms[2]}
    fn()
    ts = []
    for _ in range(max(1, reps // 10)):
        t0 = time.perf_counter()
        fn()
        ts.append(1000 * (time.perf_counter() - t0))
    ts.sort()
    return {"ms": ts[len(ts) // 2], "p20": ts[0], "p80": ts[-1]}


def copy_bandwidth_gbs(torch, device, cuda: bool) -> float:
    n = (1 << 28) if cuda else (1 << 22)
    x = torch.empty(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), cuda)
    return 2 * x.nbytes / (t["ms"] / 1000) / 1e9  # read + write


def ragged_layer(torch, B, H, N, keep, skewed, d, dtype, device, seed=0):
    from kvray.cache import RaggedKV

    g = torch.Generator().manual_seed(seed)
    per = max(1, int(N * keep))
    lengths = []
    for _ in range(B):
        if skewed and keep < 1.0:  # head budgets from 0.25x to 1.75x the mean, same total
            w = torch.linspace(0.25, 1.75, H)
            row = [min(N, max(1, int(round(per * x)))) for x in w.tolist()]
        else:
            row = [per] * H
        lengths += row
    total = sum(lengths)
    k = torch.randn(total, d, generator=g, dtype=torch.float32).to(device, dtype)
    v = torch.randn(total, d, generator=g, dtype=torch.float32).to(device, dtype)
    return RaggedKV(k, v, torch.zeros(total, dtype=torch.long, device=device), tuple(lengths), B, H)


def part_a(args, torch, device, cuda, res):
    import torch.nn.functional as F

    from kvray.kernels.ragged_attention import ragged_attention_triton
    from kvray.runtime.attention import ragged_attention_torch

    Hq, H, d, T = 32, 8, 128, 16
    B = 2 if args.smoke else 16
    dtype = torch.bfloat16 if cuda else torch.float32
    contexts = [256] if args.smoke else [4096, 32768, 131072]
    rows = []
    for N in contexts:
        for keep in (0.25, 0.5, 1.0):
            for skewed in (False, True):
                if skewed and keep == 1.0:
                    continue
                Bn = B if N <= 32768 else max(1, B // 4)  # 128k x 16 rows does not fit with the dense baseline
                prefix = ragged_layer(torch, Bn, H, N, keep, skewed, d, dtype, device)
                q = torch.randn(Bn, Hq, 1, d, device=device, dtype=dtype)
                tk = torch.randn(Bn, H, T, d, device=device, dtype=dtype)
                tv = torch.randn_like(tk)
                scale = 1 / math.sqrt(d)
                kv_bytes = (sum(prefix.lengths) + Bn * H * T) * d * 2 * prefix.keys.element_size()
                row = {"context": N, "keep": keep, "skewed": skewed, "rows": Bn, "kv_bytes": kv_bytes}
                row["triton"] = timed(lambda: ragged_attention_triton(q, prefix, tk, tv, scale), cuda)
                row["torch_twin"] = timed(lambda: ragged_attention_torch(q, prefix, tk, tv, scale), cuda)
                if keep == 1.0:
                    full_k = torch.randn(Bn, H, N + T, d, device=device, dtype=dtype)
                    full_v = torch.randn_like(full_k)
                    row["dense_sdpa_full"] = timed(lambda: F.scaled_dot_product_attention(
                        q, full_k, full_v, enable_gqa=True), cuda)
                    del full_k, full_v
                row["triton_gbs"] = kv_bytes / (row["triton"]["ms"] / 1000) / 1e9
                rows.append(row)
                print(f"[a] N={N} keep={keep} skewed={skewed}: triton {row['triton']['ms']:.3f} ms "
                      f"({row['triton_gbs']:.0f} GB/s), twin {row['torch_twin']['ms']:.3f} ms", flush=True)
                del prefix
    res["ragged_decode"] = rows


def part_b(args, torch, device, cuda, res):
    from kvray.kernels.window_scores import window_scores_torch, window_scores_triton

    Hq, H, d, W = 32, 8, 128, 64
    N = 512 if args.smoke else 32768
    dtype = torch.bfloat16 if cuda else torch.float32
    q = torch.randn(1, Hq, W, d, device=device, dtype=dtype)
    k = torch.randn(1, H, N, d, device=device, dtype=dtype)
    qpos = torch.arange(N - W, N, device=device)
    out = {"context": N, "window": W}
    for name, fn in (("triton", window_scores_triton), ("materialised", window_scores_torch)):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        fn(q, qpos, k)
        if cuda:
            torch.cuda.synchronize()
            out[f"{name}_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        out[name] = timed(lambda: fn(q, qpos, k), cuda)
    if cuda:
        out["memory_ratio"] = out["triton_peak_extra_bytes"] / max(1, out["materialised_peak_extra_bytes"])
    print(f"[b] window scores N={N}: {json.dumps(out)}", flush=True)
    res["window_scores"] = out


def part_c(args, torch, device, cuda, res):
    import kvray
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kvray.generate import compress
    from kvray.runtime import Decoder, PromptTokens, enable_kvray_attention, prefill

    if args.smoke:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
        N = 300
    else:  # Llama-3.1-8B's shape
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                          rope_theta=500000.0)
        N = 32768
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    enable_kvray_attention(model)
    lm = kvray.LanguageModel(model=model, tokenizer=_NoTokenizer(), name="llama-8b-shape")
    ids = torch.randint(10, cfg.vocab_size - 10, (N + 8,)).tolist()
    prompt = PromptTokens(ids[:N], ids[N:N + 6], ids[N + 6:])
    out = {"context": N, "layers": cfg.num_hidden_layers}
    steps = 8 if args.smoke else 64
    for label, press in (("full", kvray.make_press("full")), ("snapkv_25pct", kvray.make_press("snapkv", compression_ratio=0.75))):
        pre = prefill(lm, prompt, with_question=False)
        cache = compress(lm, pre, press, False)
        del pre
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        dec = Decoder(lm)
        dec.add(cache, feed=prompt.rest, max_new_tokens=steps + 2, ignore_stop_tokens=True)
        dec.step()
        dec.step()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = 0
        while dec.active:
            dec.step()
            n += 1
        if cuda:
            torch.cuda.synchronize()
        out[label] = {"ms_per_token": 1000 * (time.perf_counter() - t0) / max(n, 1), "kv_bytes": cache.nbytes(),
                      "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}
        del dec, cache
        print(f"[c] {label}: {out[label]}", flush=True)
    out["decode_ratio"] = out["snapkv_25pct"]["ms_per_token"] / out["full"]["ms_per_token"]
    res["end_to_end"] = out


class _NoTokenizer:
    """Random token ids need no tokenizer; the decoder only asks for stop tokens."""

    eos_token_id = None
    unk_token_id = None

    def convert_tokens_to_ids(self, tok):
        return None


def render(res: dict) -> str:
    lines = [f"# Kernel benchmark ({res['device']})", "",
             f"Generated by `python bench/bench_kernels.py` ({res['when']}); copy bandwidth measured in the same run: "
             f"{res['copy_gbs']:.0f} GB/s (read + write); peak: {res.get('peak_tbs') or '?'} TB/s.", "",
             "## (a) Ragged decode attention, one Llama-3.1-8B layer (32 q heads, 8 KV heads, d = 128)", "",
             "| context | keep | heads | rows | triton ms | GB/s | % of peak | twin ms | dense SDPA (full) ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    peak = res.get("peak_tbs")
    for r in res.get("ragged_decode", []):
        pct = f"{100 * r['triton_gbs'] / (peak * 1000):.0f}%" if peak else "?"
        dense = f"{r['dense_sdpa_full']['ms']:.3f}" if "dense_sdpa_full" in r else ""
        lines.append(f"| {r['context']} | {r['keep']:.0%} | {'skewed' if r['skewed'] else 'uniform'} | {r['rows']} | "
                     f"{r['triton']['ms']:.3f} | {r['triton_gbs']:.0f} | {pct} | {r['torch_twin']['ms']:.3f} | {dense} |")
    w = res.get("window_scores")
    if w:
        lines += ["", f"## (b) Window scores at {w['context']} tokens (W = {w['window']})", "",
                  f"- kernel {w['triton']['ms']:.3f} ms, materialised {w['materialised']['ms']:.3f} ms",
                  f"- peak extra memory: kernel {w.get('triton_peak_extra_bytes', '?')} B, materialised "
                  f"{w.get('materialised_peak_extra_bytes', '?')} B (ratio {w.get('memory_ratio', '?')})"]
    e = res.get("end_to_end")
    if e:
        lines += ["", f"## (c) End to end, Llama-3.1-8B shape, {e['context']} tokens, one row", "",
                  f"- full cache: {e['full']['ms_per_token']:.2f} ms/token, peak {e['full']['peak_bytes']}",
                  f"- snapkv at 25% kept: {e['snapkv_25pct']['ms_per_token']:.2f} ms/token, peak "
                  f"{e['snapkv_25pct']['peak_bytes']}", f"- ratio: {e['decode_ratio']:.2f}x"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script; CPU: the interpreter)")
    ap.add_argument("--parts", default="a,b,c")
    args = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            print("no CUDA device: the GPU numbers need one (use --smoke to check the script here)", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    res = {"device": name, "when": time.strftime("%Y-%m-%d %H:%M"), "peak_tbs": peak_bandwidth(name),
           "copy_gbs": copy_bandwidth_gbs(torch, device, cuda)}
    parts = set(args.parts.split(","))
    for key, fn in (("a", part_a), ("b", part_b), ("c", part_c)):
        if key in parts:
            fn(args, torch, device, cuda, res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_kernels.json").write_text(json.dumps(res, indent=1))
    (out / "bench_kernels.md").write_text(render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

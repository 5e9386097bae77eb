"""What the attention blocks' head bins cost and save (`kvray.runtime.attention._plan`), side by
side in one run: one decode step's upkeep and attention (`DecodeBlocks.append` + `attend`) over
random bf16 entries, 3 KV heads x 3 query heads each, d = 64, a 20-slot tail, for heads of
x, 0.6x and 1.4x entries (uneven) and x, 0.9x and 1.1x (even), one row and six rows, laid out
plain (every head padded to the longest), in one bin per row and in two.

    python bench/bench_bins.py            # prints a markdown table (us per step, median of 5 runs)

The numbers behind `BIN_OVERHEAD` and `BIN_COLUMN_ROWS` (docs/bench_engine.md, 2026-12-07 late).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kvray.runtime.attention as attn
from kvray.cache import RaggedKV

H, G, D, TAIL = 3, 3, 64, 20
SHAPES = {"uneven": (1.0, 0.6, 1.4), "even": (1.0, 0.9, 1.1)}


def step_us(lengths: list[tuple[int, ...]], bins: int | None, calls: int) -> float:
    """Median us of one decode step (append a slot, attend) laid out plain (bins None) or in
    `bins` bins per row."""
    attn.FORCE_BINS, overhead = bins, attn.BIN_OVERHEAD
    attn.BIN_OVERHEAD = 10**12 if bins is None else overhead  # None: plain, whatever `_plan` says
    try:
        flat = [n for row in lengths for n in row]
        total, B = sum(flat), len(lengths)
        dt = torch.bfloat16
        prefix = RaggedKV(torch.randn(total, D, dtype=dt), torch.randn(total, D, dtype=dt), torch.arange(total),
                          tuple(flat), B, H)
        tk, tv = torch.randn(B, H, TAIL + 1, D, dtype=dt), torch.randn(B, H, TAIL + 1, D, dtype=dt)
        blocks = attn.DecodeBlocks(prefix, tk[:, :, :TAIL], tv[:, :, :TAIL], None, room=8, G=G)
        q = torch.randn(B, H, G, D, dtype=dt)
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                blocks.filled = TAIL  # the same slot appended again: the same work every call
                blocks.append(tk, tv)
                blocks.attend(q, 1, D ** -0.5, None)
            runs.append((time.perf_counter() - t0) / calls * 1e6)
        return statistics.median(runs)
    finally:
        attn.FORCE_BINS, attn.BIN_OVERHEAD = None, overhead


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="100,250,500,1000,1500", help="x: entries of a row's first head")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; us per decode step (append + attend)\n")
    print("| heads | x | 1 row: plain | 2 bins | 6 rows: plain | 1 bin | 2 bins |")
    print("|---|---|---|---|---|---|---|")
    for shape, scale in SHAPES.items():
        for x in map(int, args.sizes.split(",")):
            row = tuple(int(x * s) for s in scale)
            one = [step_us([row], b, 200) for b in (None, 2)]
            six = [step_us([row] * 6, b, 60) for b in (None, 1, 2)]
            print(f"| {shape} | {x} | " + " | ".join(f"{t:.0f}" for t in one + six) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

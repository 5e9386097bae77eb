"""Triton kernels, each with its torch twin (the CPU path and the test oracle).

- `ragged_attention`: decode / extend attention of the new queries over a compressed layer's
  ragged per-(row, KV head) prefix plus each row's dense tail (split-K partials, then a
  log-sum-exp merge).
- `window_scores`: SnapKV-style window attention scores, mean over the window's rows, without
  materialising the [Hq, W, N] attention (a row-LSE pass, then column sums per key block).

Importing this package does not import triton; the launchers do, on first use. `impl="auto"`
picks Triton on CUDA when it is installed and otherwise falls back to the twin, saying why once;
an explicit `impl="triton"` that cannot run raises with the reasons. Under `TRITON_INTERPRET=1`
(set before triton is imported) the kernels also run on CPU tensors, slowly: that is how the
tests check them against their twins.
"""

from .ragged_attention import ragged_attention
from .window_scores import window_scores

__all__ = ["ragged_attention", "window_scores"]

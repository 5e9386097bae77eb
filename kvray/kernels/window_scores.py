"""SnapKV-style window scores without materialising the window's attention: the Triton kernel,
its launcher and its torch twin.

`window_scores(queries, query_positions, keys)` is, per query head, the mean over the window's W
rows of softmax(q.k / sqrt(d)) over the N keys, a query seeing only keys at or before its own
position: [B, Hq, N] fp32, what snapkv, pyramidkv and adakv (snapkv's scorer), lava and laq
reduce over the GQA group (mean or max) and pool afterwards, in torch, in that order (max
pooling does not commute with the group mean, so the kernel keeps one score per query head; the
group reduction and pooling run on O(Hq * N) data). The twin materialises [B, Hq, W, N] as
`kvray.presses.scoring.window_attention` does (kvpress too: 268 MB per layer at N = 32k, Hq = 32,
W = 64); the kernel holds O(Hq * W) row statistics and the [B, Hq, N] result.

- Pass A, grid (B*H, row blocks): each window row's log-sum-exp over the keys it sees, online.
- Pass B, grid (B*H, key blocks): one program per key block sums exp(s - lse) over every row
  of each query head of its KV head, and writes its block: no atomics.

obcache's saliencies need per-row terms (the attention output and the logits), not only these
column sums, and compactor's leverage sketch is a few small GEMMs and a 48 x 48 factorisation
(cuBLAS), so both stay in torch.
"""

from __future__ import annotations


import torch

from .ragged_attention import _next_pow2, interpreting

BLOCK_N = 32
BLOCK_R = 16


def window_probs(queries: torch.Tensor, query_positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """softmax(q.k / sqrt(d)) in fp32 of `queries` [B, Hq, W, d] at `query_positions` [W] over
    `keys` [B, H, N, d] at positions 0..N-1, a query seeing only keys at or before its own
    position: [B, Hq, W, N] (what `kvray.presses.scoring.window_attention` returns)."""
    B, Hq, W, d = queries.shape
    H, N = keys.shape[1], keys.shape[2]
    G = Hq // H
    logits = torch.matmul(queries.reshape(B, H, G * W, d).float(), keys.float().transpose(-1, -2)) / d**0.5
    logits = logits.view(B, H, G, W, N)
    future = torch.arange(N, device=queries.device)[None, :] > query_positions.to(queries.device)[:, None]
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1).view(B, Hq, W, N)


def window_scores_torch(queries: torch.Tensor, query_positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The twin: [B, Hq, N], the mean over the W window rows of `window_probs` (materialises
    [B, Hq, W, N])."""
    return window_probs(queries, query_positions, keys).mean(dim=2)


def window_scores_triton(queries: torch.Tensor, query_positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The Triton path of `window_scores` (same arguments and result)."""
    from .triton_kernels import window_col_sums as col_sums, window_row_lse as row_lse
    B, Hq, W, d = queries.shape
    H, N = keys.shape[1], keys.shape[2]
    G = Hq // H
    R = G * W
    if interpreting() and queries.dtype == torch.bfloat16:  # the interpreter's bf16 dot is wrong
        queries, keys = queries.float(), keys.float()
    q = queries.reshape(B, H, R, d).contiguous()
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    qpos = query_positions.to(device=keys.device, dtype=torch.int32).contiguous()
    BLOCK_D = max(16, _next_pow2(d))
    ieee = q.dtype == torch.float32
    lse = torch.empty(B * H * R, dtype=torch.float32, device=keys.device)
    row_lse[(B * H, -(-R // BLOCK_R))](q, keys, qpos, lse, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1),
                                        keys.stride(2), H, R, N, d, 1.0 / d**0.5, IEEE=ieee, BLOCK_R=BLOCK_R,
                                        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, W=W)
    out = torch.empty(B, Hq, N, dtype=torch.float32, device=keys.device)
    col_sums[(B * H, -(-N // BLOCK_N))](q, keys, qpos, lse, out, q.stride(0), q.stride(1), keys.stride(0),
                                         keys.stride(1), keys.stride(2), H, G, N, d, 1.0 / d**0.5, IEEE=ieee,
                                         BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, W=W)
    return out


def window_scores(queries: torch.Tensor, query_positions: torch.Tensor, keys: torch.Tensor,
                  impl: str = "auto") -> torch.Tensor:
    """Window scores [B, Hq, N] fp32 of `queries` [B, Hq, W, d] at `query_positions` [W] against
    `keys` [B, H, N, d] at positions 0..N-1 (see the module docstring). `impl`: "auto" (Triton on
    CUDA, else the torch twin), "triton" or "torch"."""
    from ..runtime.attention import resolve_impl

    if resolve_impl(impl, keys.device) == "triton":
        return window_scores_triton(queries, query_positions, keys)
    return window_scores_torch(queries, query_positions, keys)

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

import functools

import torch

from .ragged_attention import _next_pow2, interpreting

BLOCK_N = 32
BLOCK_R = 16


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def row_lse(Q, K, QPOS, LSE, sqb, sqh, skb, skh, skn, H, R, N, D, scaling,
                IEEE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                W: tl.constexpr):
        seg = tl.program_id(0)
        rb = tl.program_id(1)
        b = seg // H
        h = seg % H
        offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        rmask = offs_r < R
        dmask = offs_d < D
        q = tl.load(Q + b * sqb + h * sqh + offs_r[:, None] * D + offs_d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        qpos = tl.load(QPOS + offs_r % W, mask=rmask, other=0)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + offs_n
            k = tl.load(K + b * skb + h * skh + n[:, None] * skn + offs_d[None, :],
                        mask=(n < N)[:, None] & dmask[None, :], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scaling
            s = tl.where((n[None, :] < N) & (n[None, :] <= qpos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m_i = m_new
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("inf"))  # inf: the row sees nothing
        tl.store(LSE + seg * R + offs_r, lse, mask=rmask)

    @triton.jit
    def col_sums(Q, K, QPOS, LSE, OUT, sqb, sqh, skb, skh, skn, H, G, N, D, scaling,
                 IEEE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 W: tl.constexpr):
        seg = tl.program_id(0)
        nb = tl.program_id(1)
        b = seg // H
        h = seg % H
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        offs_d = tl.arange(0, BLOCK_D)
        offs_w = tl.arange(0, BLOCK_R)
        dmask = offs_d < D
        k = tl.load(K + b * skb + h * skh + n[:, None] * skn + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        for g in range(0, G):
            total = tl.zeros([BLOCK_N], tl.float32)
            for w0 in range(0, W, BLOCK_R):
                w = w0 + offs_w
                wmask = w < W
                r = g * W + w
                q = tl.load(Q + b * sqb + h * sqh + r[:, None] * D + offs_d[None, :],
                            mask=wmask[:, None] & dmask[None, :], other=0.0)
                qpos = tl.load(QPOS + w, mask=wmask, other=0)
                lse = tl.load(LSE + seg * G * W + r, mask=wmask, other=float("inf"))
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                p = tl.exp(s * scaling - lse[:, None])
                p = tl.where(wmask[:, None] & nmask[None, :] & (n[None, :] <= qpos[:, None]), p, 0.0)
                total += tl.sum(p, 0)
            tl.store(OUT + (b * H * G + h * G + g) * N + n, total / W, mask=nmask)

    return row_lse, col_sums


def window_scores_torch(queries: torch.Tensor, query_positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The twin: [B, Hq, N] mean over the W window rows of softmax(q.k / sqrt(d)) in fp32,
    causal by position (materialises [B, Hq, W, N])."""
    B, Hq, W, d = queries.shape
    H, N = keys.shape[1], keys.shape[2]
    G = Hq // H
    logits = torch.matmul(queries.reshape(B, H, G * W, d).float(), keys.float().transpose(-1, -2)) / d**0.5
    logits = logits.view(B, H, G, W, N)
    future = torch.arange(N, device=queries.device)[None, :] > query_positions.to(queries.device)[:, None]
    attn = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1).view(B, Hq, W, N)
    return attn.mean(dim=2)


def window_scores_triton(queries: torch.Tensor, query_positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The Triton path of `window_scores` (same arguments and result)."""
    row_lse, col_sums = _kernels()
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

"""Ragged decode / extend attention over a compressed layer: the Triton kernel, its launcher and
its torch twin (`kvray.runtime.attention.ragged_attention_torch`, the CPU path and the oracle).

Layout read (see `kvray.cache`): the kept entries packed over (row, KV head), b-major, as
`keys` / `values` [total, d] with segment offsets `indptr` [B*H + 1] (int32, on the device,
cu_seqlens style); each row's dense tail [B, H, T, d], left-padded per row (`pads`); the new
queries [B, Hq, q, d] are the tail's last q slots.

Stage 1, grid (B*H, splits + 1): the G*q query rows of one (row, KV head) share a program
(padded to at least 16 rows, so `tl.dot` compiles on a GPU). Programs 0..splits-1 each take one
contiguous part of the segment's prefix (split-K: long prefixes are spread over programs), the
last one the tail (causal, padding masked). Each writes its normalised partial output and its
log-sum-exp; an empty part has lse = -inf and output 0. Stage 2, grid (B*H,), merges the parts
with log-sum-exp weights. The tail always holds the current token, so no row is all -inf.

Sliding windows that bind and attention sinks are not handled here: the runtime keeps those on
the torch path (`kvray.runtime.attention.ragged_attention`).
"""

from __future__ import annotations

import functools
import os

import torch

from ..cache import RaggedKV

#: key block of the inner loop
BLOCK_N = 32
#: prefix entries per split-K program, at most (more entries -> more programs, up to MAX_SPLITS)
SPLIT_TOKENS = 512
MAX_SPLITS = 16


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def stage1(Q, K, V, TK, TV, INDPTR, PADS, OUT, LSE,
               sqb, sqh, sqr, stb, sth, stt, svb, svh, svt,
               H, R, T, q_len, D, scaling, softcap,
               SPLITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        seg = tl.program_id(0)
        part = tl.program_id(1)
        b = seg // H
        h = seg % H
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        rmask = offs_r < R
        dmask = offs_d < D
        q = tl.load(Q + b * sqb + h * sqh + offs_r[:, None] * sqr + offs_d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        if part < SPLITS:  # one contiguous part of the segment's prefix entries
            start = tl.load(INDPTR + seg)
            end = tl.load(INDPTR + seg + 1)
            chunk = tl.cdiv(end - start, SPLITS)
            lo = start + part * chunk
            hi = tl.minimum(end, lo + chunk)
            for k0 in range(lo, hi, BLOCK_N):
                n = k0 + offs_n
                nmask = n < hi
                k = tl.load(K + n[:, None] * D + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
                v = tl.load(V + n[:, None] * D + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                s = s * scaling
                if HAS_SOFTCAP:
                    s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)  # softcap * tanh(s / softcap)
                s = tl.where(nmask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(s - m_safe[:, None])
                alpha = tl.exp(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                if IEEE:
                    pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
                else:
                    pv = tl.dot(p.to(v.dtype), v)
                acc = acc * alpha[:, None] + pv
                m_i = m_new
        else:  # the row's tail: causal, its leading padding masked
            pad = tl.load(PADS + b)
            last = T - q_len + offs_r % q_len  # the tail slot of each query row
            for t0 in range(0, T, BLOCK_N):
                t = t0 + offs_n
                tmask = t < T
                k = tl.load(TK + b * stb + h * sth + t[:, None] * stt + offs_d[None, :],
                            mask=tmask[:, None] & dmask[None, :], other=0.0)
                v = tl.load(TV + b * svb + h * svh + t[:, None] * svt + offs_d[None, :],
                            mask=tmask[:, None] & dmask[None, :], other=0.0)
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                s = s * scaling
                if HAS_SOFTCAP:
                    s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)
                ok = tmask[None, :] & (t[None, :] >= pad) & (t[None, :] <= last[:, None])
                s = tl.where(ok, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(s - m_safe[:, None])
                alpha = tl.exp(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                if IEEE:
                    pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
                else:
                    pv = tl.dot(p.to(v.dtype), v)
                acc = acc * alpha[:, None] + pv
                m_i = m_new
        nonempty = l_i > 0
        out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse = tl.where(nonempty, m_i + tl.log(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        row = (seg * (SPLITS + 1) + part) * BLOCK_R + offs_r
        tl.store(OUT + row[:, None] * BLOCK_D + offs_d[None, :], out)
        tl.store(LSE + row, lse)

    @triton.jit
    def stage2(OUT, LSE, O, sob, soh, sor, H, R, D,
               SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        seg = tl.program_id(0)
        b = seg // H
        h = seg % H
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for part in tl.static_range(SPLITS + 1):
            m = tl.maximum(m, tl.load(LSE + (seg * (SPLITS + 1) + part) * BLOCK_R + offs_r))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        total = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for part in tl.static_range(SPLITS + 1):
            row = (seg * (SPLITS + 1) + part) * BLOCK_R + offs_r
            w = tl.exp(tl.load(LSE + row) - m_safe)
            total += w
            acc += w[:, None] * tl.load(OUT + row[:, None] * BLOCK_D + offs_d[None, :])
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        mask = (offs_r < R)[:, None] & (offs_d < D)[None, :]
        tl.store(O + b * sob + h * soh + offs_r[:, None] * sor + offs_d[None, :], out.to(O.dtype.element_ty), mask=mask)

    return stage1, stage2


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def indptr(prefix: RaggedKV) -> torch.Tensor:
    """The prefix's segment offsets [B*H + 1] as an int32 device tensor (built once per prefix)."""
    cached = prefix.__dict__.get("_indptr")
    if cached is None:
        cached = torch.tensor(prefix.offsets, dtype=torch.int32, device=prefix.keys.device)
        prefix._indptr = cached
    return cached


def ragged_attention_triton(query: torch.Tensor, prefix: RaggedKV, tail_k: torch.Tensor, tail_v: torch.Tensor,
                            scaling: float, pads: tuple[int, ...] | None = None,
                            softcap: float | None = None) -> torch.Tensor:
    """The Triton path of `ragged_attention` (same arguments and result: [B, q, Hq, d])."""
    stage1, stage2 = _kernels()
    B, Hq, q_len, d = query.shape
    H = prefix.heads
    G = Hq // H
    R = G * q_len
    T = tail_k.shape[2]
    dev = query.device
    dtype = query.dtype
    keys, values = prefix.keys, prefix.values
    if interpreting() and dtype == torch.bfloat16:  # the interpreter's bf16 dot is wrong: compute in fp32
        query, keys, values = query.float(), keys.float(), values.float()
        tail_k, tail_v = tail_k.float(), tail_v.float()
    qg = query.reshape(B, H, R, d)
    if qg.stride(-1) != 1:
        qg = qg.contiguous()
    keys, values = keys.contiguous(), values.contiguous()
    if tail_k.stride(-1) != 1:
        tail_k = tail_k.contiguous()
    if tail_v.stride(-1) != 1:
        tail_v = tail_v.contiguous()
    BLOCK_R = max(16, _next_pow2(R))
    BLOCK_D = max(16, _next_pow2(d))
    longest = max(prefix.lengths) if prefix.lengths else 0
    splits = max(1, min(MAX_SPLITS, -(-longest // SPLIT_TOKENS)))
    part_out = torch.empty(B * H * (splits + 1) * BLOCK_R, BLOCK_D, dtype=torch.float32, device=dev)
    part_lse = torch.empty(B * H * (splits + 1) * BLOCK_R, dtype=torch.float32, device=dev)
    pad_t = torch.tensor(pads if pads is not None else (0,) * B, dtype=torch.int32, device=dev)
    out = torch.empty(B, H, R, d, dtype=dtype, device=dev)
    ieee = qg.dtype == torch.float32
    stage1[(B * H, splits + 1)](
        qg, keys, values, tail_k, tail_v, indptr(prefix), pad_t, part_out, part_lse,
        qg.stride(0), qg.stride(1), qg.stride(2), tail_k.stride(0), tail_k.stride(1), tail_k.stride(2),
        tail_v.stride(0), tail_v.stride(1), tail_v.stride(2),
        H, R, T, q_len, d, float(scaling), float(softcap or 0.0),
        SPLITS=splits, HAS_SOFTCAP=softcap is not None, IEEE=ieee,
        BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    stage2[(B * H,)](part_out, part_lse, out, out.stride(0), out.stride(1), out.stride(2), H, R, d,
                     SPLITS=splits, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
    return out.view(B, H, G, q_len, d).reshape(B, Hq, q_len, d).transpose(1, 2).contiguous()


def ragged_attention(query: torch.Tensor, prefix: RaggedKV, tail_k: torch.Tensor, tail_v: torch.Tensor,
                     scaling: float, pads: tuple[int, ...] | None = None, softcap: float | None = None,
                     impl: str = "auto") -> torch.Tensor:
    """Attention of `query` [B, Hq, q, d] over a ragged prefix (fully visible) and a dense tail
    [B, H, T, d] holding the q new tokens as its last slots (seen causally); row b ignores its
    first `pads[b]` tail slots; `softcap`: logit soft-capping. Returns [B, q, Hq, d].
    `impl`: "auto" (Triton on CUDA, else the torch twin), "triton" or "torch"."""
    from ..runtime.attention import ragged_attention_torch, resolve_impl

    if resolve_impl(impl, query.device) == "triton":
        return ragged_attention_triton(query, prefix, tail_k, tail_v, scaling, pads, softcap)
    return ragged_attention_torch(query, prefix, tail_k, tail_v, scaling, pads, softcap)

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
    from .triton_kernels import ragged_stage1 as stage1, ragged_stage2 as stage2
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

"""The Triton kernels themselves (imported only by the launchers in `ragged_attention.py` and
`window_scores.py`, so that `kvray.kernels` imports without triton). What they compute and how is
in those modules' docstrings."""

import triton
import triton.language as tl


@triton.jit
def _attend(q, k, v, ok, m_i, l_i, acc, scaling, softcap, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
    """One key block into the running (max, sum, output) of the online softmax; `ok` masks it."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scaling
    if HAS_SOFTCAP:
        s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap)) - 1.0)  # softcap * tanh(s / softcap)
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
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def ragged_stage1(Q, K, V, TK, TV, INDPTR, PADS, OUT, LSE,
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
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(K + n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            m_i, l_i, acc = _attend(q, k, v, nmask[None, :], m_i, l_i, acc, scaling, softcap, HAS_SOFTCAP, IEEE)
    else:  # the row's tail: causal, its leading padding masked
        pad = tl.load(PADS + b)
        last = T - q_len + offs_r % q_len  # the tail slot of each query row
        for t0 in range(0, T, BLOCK_N):
            t = t0 + offs_n
            tmask = t < T
            kv_mask = tmask[:, None] & dmask[None, :]
            k = tl.load(TK + b * stb + h * sth + t[:, None] * stt + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(TV + b * svb + h * svh + t[:, None] * svt + offs_d[None, :], mask=kv_mask, other=0.0)
            ok = tmask[None, :] & (t[None, :] >= pad) & (t[None, :] <= last[:, None])
            m_i, l_i, acc = _attend(q, k, v, ok, m_i, l_i, acc, scaling, softcap, HAS_SOFTCAP, IEEE)
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    row = (seg * (SPLITS + 1) + part) * BLOCK_R + offs_r
    tl.store(OUT + row[:, None] * BLOCK_D + offs_d[None, :], out)
    tl.store(LSE + row, lse)


@triton.jit
def ragged_stage2(OUT, LSE, O, sob, soh, sor, H, R, D,
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


@triton.jit
def window_row_lse(Q, K, QPOS, LSE, sqb, sqh, skb, skh, skn, H, R, N, D, scaling,
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
def window_col_sums(Q, K, QPOS, LSE, OUT, sqb, sqh, skb, skh, skn, H, G, N, D, scaling,
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

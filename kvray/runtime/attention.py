"""The attention dispatch: the function transformers calls for attention implementation
``"kvray"``, and ragged attention over a compressed layer (prefix + tail) with
``impl="auto" | "torch" | "triton"``.

`ragged_attention_torch` is the runtime's CPU path and the twin of the Triton kernel
(`kvray.kernels.ragged_attention`, chosen by `impl="auto"` on CUDA), its test oracle.
Layout it reads (see `kvray.cache`): per layer, the kept entries packed over (row, KV head),
b-major ([total, d], lengths per (row, head)), and a dense tail [B, H, T, d] left-padded per row.
It loops over nothing when every (row, head) holds the same count (one batched pair of matmuls).
Otherwise rows of similar length (`GROUP_SPREAD`) are gathered into one padded block and attended
together with a mask (a copy of their entries, made once per batch while decoding and kept with
the prefix: cheaper on a CPU than one small matmul per row, where op overhead dominates), and a
row left alone is attended on its own: dense per head when its heads hold the same count, else
in one matmul of all its packed entries against all its query heads with the entries of other
heads masked out (H times the dot products, one op instead of H). There is no Python loop over
heads.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch
import torch.nn.functional as F

from ..cache import ATTN_IMPLEMENTATION, KVRayLayer, RaggedKV
from .support import UnsupportedModelError, check_supported

log = logging.getLogger(__name__)

IMPLS = ("auto", "torch", "triton")
_explained: set[str] = set()


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_unavailable(device: torch.device, explicit: bool = False) -> list[str]:
    """Why the Triton path cannot run on `device` (empty when it can). Called on every attention
    call, so the import is tried once (a failed import searches sys.path each time). An explicit
    `impl="triton"` also runs on CPU tensors under TRITON_INTERPRET=1 (Triton's interpreter: the
    tests); `auto` never picks the interpreter."""
    reasons = []
    if device.type != "cuda" and not (explicit and os.environ.get("TRITON_INTERPRET", "") == "1"):
        reasons.append(f"the tensors are on {device.type}, Triton kernels run on CUDA")
    if not _triton_installed():
        reasons.append("triton is not installed (pip install 'kvray[triton]')")
    return reasons


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation that runs for `impl` on `device`: `auto` falls back to torch and says
    why once; an explicit `triton` that cannot run raises with the reasons."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    reasons = triton_unavailable(device, explicit=impl == "triton")
    if not reasons:
        return "triton"
    if impl == "triton":
        raise RuntimeError("impl='triton' cannot run: " + "; ".join(reasons))
    key = "; ".join(reasons)
    if key not in _explained:
        _explained.add(key)
        log.info("ragged attention: using the torch path (%s)", key)
    return "torch"


# ----------------------------------------------------------------------------- dense (no prefix)


def _causal_tail_mask(q_len: int, kv_len: int, device, window: int | None = None) -> torch.Tensor:
    """Bottom-right aligned causal mask [q_len, kv_len]: query i sees key j iff
    j <= kv_len - q_len + i, and, with a sliding `window`, (kv_len - q_len + i) - j < window
    (transformers' convention: a query sees itself and the window - 1 tokens before it)."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    mask = j <= (kv_len - q_len) + i
    if window is not None:
        mask &= (kv_len - q_len) + i - j < window
    return mask


def _capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Logit soft-capping (Gemma 2): softcap * tanh(scores / softcap), before any -inf mask."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def dense_attention(query, key, value, attention_mask, scaling, sliding_window: int | None = None,
                    softcap: float | None = None):
    """Attention over contiguous keys that end at the last query (a prefill, or an ordinary
    transformers cache): causal, bottom-right aligned, within `sliding_window` when the layer has
    one, with `softcap` applied to the logits. A 4D `attention_mask` is used as given."""
    q_len, kv_len = query.shape[2], key.shape[2]
    window = sliding_window if sliding_window is not None and kv_len > sliding_window else None  # else it cannot bind
    kwargs = {}
    if query.shape[1] != key.shape[1]:
        kwargs["enable_gqa"] = True
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask[..., :kv_len]
    elif window is None and q_len == kv_len:
        mask = None
        kwargs["is_causal"] = q_len > 1
    elif window is None and q_len == 1:
        mask = None
    else:
        mask = _causal_tail_mask(q_len, kv_len, query.device, window)
    if softcap is not None:  # SDPA has no soft-capping: the plain computation
        G = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(G, dim=1) if G > 1 else key
        v = value.repeat_interleave(G, dim=1) if G > 1 else value
        logits = _capped(torch.matmul(query, k.transpose(-1, -2)).float() * scaling, softcap)
        if kwargs.get("is_causal"):
            mask = _causal_tail_mask(q_len, kv_len, query.device)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        out = torch.matmul(torch.softmax(logits, dim=-1).to(query.dtype), v)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, **kwargs)
    return out.transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------- ragged (torch twin)


def _scores(q, k, scaling, bias=None, softcap=None):
    """scaling * q @ k^T (+ bias), in one op: q [..., R, d], k [..., n, d] -> [..., R, n];
    with `softcap`, capped before the bias (a -inf mask stays -inf)."""
    kt = k.transpose(-1, -2)
    if softcap is not None:
        out = _capped(torch.matmul(q, kt).mul_(scaling), softcap)
        return out if bias is None else out + bias
    if bias is None:
        return torch.matmul(q, kt).mul_(scaling)
    if q.dim() == 2:
        return torch.addmm(bias, q, kt, alpha=scaling)
    return torch.baddbmm(bias.expand(*q.shape[:-1], k.shape[-2]).flatten(0, -3),
                         q.flatten(0, -3), kt.flatten(0, -3), alpha=scaling).view(*q.shape[:-1], k.shape[-2])


def _two_block(qg, pk, pv, tk, tv, tail_mask, scaling, prefix_bias=None, softcap=None):
    """Softmax attention of grouped queries qg [..., R, d] over prefix (pk, pv) [..., n, d] and
    tail (tk, tv) [..., T, d] at once, without concatenating the (large) prefix. `tail_mask`
    (True = attend; None: all) hides the tail's future and padding; `prefix_bias` (0 / -inf,
    broadcast over R) hides padding of a padded prefix. Scores are softmaxed in fp32."""
    sp = _scores(qg, pk, scaling, prefix_bias, softcap)
    st = _scores(qg, tk, scaling, softcap=softcap)
    if tail_mask is not None:
        st = st.masked_fill(~tail_mask, float("-inf"))
    probs = torch.softmax(torch.cat([sp, st], dim=-1), dim=-1, dtype=torch.float32).to(qg.dtype)
    n = pk.shape[-2]
    return torch.matmul(probs[..., :n], pv) + torch.matmul(probs[..., n:], tv)


def _packed_bias(prefix: RaggedKV, b: int, group: int, keep: bool) -> torch.Tensor:
    """[H * group, E] additive mask (0 where query row r = h * group + g may see packed entry e
    of row b, i.e. the entry belongs to KV head h; -inf elsewhere). `keep`: built once per prefix
    and kept with it (decode steps; about Hq / (2 d) of the row's KV bytes, not in `nbytes`)."""
    cache = prefix.__dict__.setdefault("_row_bias", {})
    if (b, group) in cache:
        return cache[b, group]
    s, e = prefix.row_span(b)
    heads = prefix.head_ids[s:e]
    col_head = torch.arange(prefix.heads, device=heads.device, dtype=heads.dtype).repeat_interleave(group)
    bias = torch.zeros((prefix.heads * group, e - s), dtype=prefix.keys.dtype, device=heads.device)
    bias.masked_fill_(col_head[:, None] != heads[None, :], float("-inf"))
    if keep:
        cache[b, group] = bias
    return bias


def _packed_row(qg, keys, values, bias, tk, tv, tail_mask, scaling, softcap=None):
    """One row whose KV heads hold different counts: qg [H, R, d] over its packed entries
    keys/values [E, d] (`bias` [H*R, E]: `_packed_bias`, hiding the entries of other heads) and
    its tail tk/tv [H, T, d]: one matmul of every query head against every entry (H times the
    dot products, one op instead of H)."""
    H, R, d = qg.shape
    E = keys.shape[0]
    sp = _scores(qg.reshape(H * R, d), keys, scaling, bias, softcap)  # [H*R, E]
    st = _scores(qg, tk, scaling, softcap=softcap)
    if tail_mask is not None:
        st = st.masked_fill(~tail_mask, float("-inf"))
    probs = torch.softmax(torch.cat([sp, st.reshape(H * R, -1)], dim=-1), dim=-1, dtype=torch.float32).to(qg.dtype)
    out = torch.matmul(probs[:, :E], values).view(H, R, d)
    return out + torch.matmul(probs[:, E:].view(H, R, -1), tv)


#: rows whose longest head holds at most this many times the entries of the group's shortest are
#: padded to one length and attended in one batched pair of matmuls (a gather per step); the
#: others, one row at a time
GROUP_SPREAD = 1.5


def row_groups(prefix: RaggedKV) -> list[tuple[list[int], torch.Tensor | None, torch.Tensor | None]]:
    """Rows of a non-uniform prefix in groups of similar length (`GROUP_SPREAD`), shortest first:
    (rows, gather index [n * H * P] into the packed entries, additive padding bias [n, H, 1, P])
    for groups of two rows or more, (rows, None, None) for a row alone. Computed once per prefix
    (it never changes while the batch does not)."""
    cached = getattr(prefix, "_groups", None)
    if cached is not None:
        return cached
    H = prefix.heads
    longest = [max(prefix.row_lengths(b)) for b in range(prefix.batch)]
    order = sorted(range(prefix.batch), key=lambda b: longest[b])
    groups, cur = [], []
    for b in order:
        if cur and longest[b] > GROUP_SPREAD * max(longest[cur[0]], 1):
            groups.append(cur)
            cur = []
        cur.append(b)
    if cur:
        groups.append(cur)
    out = []
    dev = prefix.keys.device
    for rows in groups:
        if len(rows) == 1:
            out.append((rows, None, None))
            continue
        P = max(longest[b] for b in rows)
        lens = torch.tensor([[prefix.lengths[b * H + h] for h in range(H)] for b in rows], device=dev)
        starts = torch.tensor([[prefix.offsets[b * H + h] for h in range(H)] for b in rows], device=dev)
        j = torch.arange(P, device=dev)
        valid = j[None, None, :] < lens[:, :, None]  # [n, H, P]
        idx = torch.where(valid, starts[:, :, None] + j, 0).to(torch.int32).reshape(-1)
        bias = torch.zeros(valid.shape, dtype=prefix.keys.dtype, device=dev).masked_fill_(~valid, float("-inf"))
        out.append((rows, idx, bias[:, :, None, :]))
    prefix._groups = out
    return out


def _group_block(prefix: RaggedKV, gi: int, idx: torch.Tensor, n: int, P: int,
                 keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [n, H, P, d] of row group `gi` (`row_groups`), gathered into one padded
    block. `keep`: gathered once per prefix and kept with it (decode steps: the prefix does not
    change while the batch does not; a copy of the group's entries, not in `nbytes`), instead of
    a gather of the whole block at every step."""
    cache = prefix.__dict__.setdefault("_group_kv", {})
    if gi in cache:
        return cache[gi]
    d = prefix.keys.shape[-1]
    block = (prefix.keys.index_select(0, idx).view(n, prefix.heads, P, d),
             prefix.values.index_select(0, idx).view(n, prefix.heads, P, d))
    if keep:
        cache[gi] = block
    return block


def _one_row(prefix: RaggedKV, b: int, qg, tk, tv, mask, scaling, group: int, decoding: bool,
             softcap=None) -> torch.Tensor:
    """Row b of a non-uniform prefix attended alone: dense per head when its heads hold the same
    count, else `_packed_row`."""
    row = prefix.row(b)
    if row is not None:
        return _two_block(qg, row[0], row[1], tk, tv, mask, scaling, softcap=softcap)
    s, e = prefix.row_span(b)
    return _packed_row(qg, prefix.keys[s:e], prefix.values[s:e], _packed_bias(prefix, b, group, decoding),
                       tk, tv, mask, scaling, softcap)


def ragged_attention_torch(query: torch.Tensor, prefix: RaggedKV, tail_k: torch.Tensor, tail_v: torch.Tensor,
                           scaling: float, pads: tuple[int, ...] | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """Attention of `query` [B, Hq, q, d] over a ragged prefix (fully visible) and a dense tail
    [B, H, T, d] that already holds the q new tokens as its last slots (seen causally); row b
    ignores its first `pads[b]` tail slots; `softcap`: logit soft-capping. Returns [B, q, Hq, d]."""
    B, Hq, q_len, d = query.shape
    H = prefix.heads
    G = Hq // H
    T = tail_k.shape[2]
    dev = query.device
    padded = pads is not None and any(pads)
    mask = None  # one new token, no padding: it sees the whole tail
    if q_len > 1 or padded:
        # rows are (g, i) pairs; row r = g * q_len + i is query position i
        row_pos = torch.arange(q_len, device=dev).repeat(G)
        j = torch.arange(T, device=dev)
        mask = (j[None, :] <= (T - q_len) + row_pos[:, None])[None, None]  # [1, 1, G*q, T]
    if padded:
        own = j[None, :] >= torch.tensor(pads, device=dev)[:, None]  # [B, T]
        mask = mask & own[:, None, None, :]
    qg = query.reshape(B, H, G * q_len, d)
    if prefix.uniform:
        pk, pv = prefix.dense()
        out = _two_block(qg, pk, pv, tail_k, tail_v, mask, scaling, softcap=softcap)
    elif B == 1:  # one row alone (no batch to scatter into)
        out = _one_row(prefix, 0, qg[0], tail_k[0], tail_v[0], None if mask is None else mask[0], scaling, G * q_len,
                       q_len == 1, softcap)[None]
    else:
        out = torch.empty_like(qg)
        for gi, (rows, idx, bias) in enumerate(row_groups(prefix)):
            if idx is not None:  # rows of similar length: padded to one length, one batched pair of matmuls
                sel = torch.tensor(rows, device=dev)
                pk, pv = _group_block(prefix, gi, idx, len(rows), bias.shape[-1], keep=q_len == 1)
                m = mask.index_select(0, sel) if mask is not None and mask.shape[0] > 1 else mask
                out[sel] = _two_block(qg.index_select(0, sel), pk, pv, tail_k.index_select(0, sel),
                                      tail_v.index_select(0, sel), m, scaling, prefix_bias=bias, softcap=softcap)
                continue
            b = rows[0]
            m = None if mask is None else mask[b if mask.shape[0] > 1 else 0]
            out[b] = _one_row(prefix, b, qg[b], tail_k[b], tail_v[b], m, scaling, G * q_len, q_len == 1, softcap)
    return out.view(B, H, G, q_len, d).reshape(B, Hq, q_len, d).transpose(1, 2).contiguous()


def ragged_attention(query: torch.Tensor, layer: KVRayLayer, scaling: float, impl: str = "auto",
                     sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of `query` [B, Hq, q, d] over a layer's ragged prefix + dense tail (the tail
    already holds the q new tokens, appended by `update`). Returns [B, q, Hq, d].

    A sliding-window layer (`sliding_window`) sees, from a query at position p, only the entries
    at positions > p - sliding_window: while no query is that far, the ordinary path is exact;
    beyond, `windowed_attention_torch` masks by position (a hybrid model's windowed layers also
    drop what fell out of their window, `KVRayLayer.update`)."""
    chosen = resolve_impl(impl, query.device)
    pads = layer.rows.pads if layer.rows is not None else None
    if sliding_window is not None:
        T, q_len = layer.tail_length(), query.shape[2]
        ends = layer.rows.next_positions(T) if layer.rows is not None else [layer.get_seq_length()] * query.shape[0]
        if max(ends) > sliding_window:  # the last query (at end - 1) cannot see position 0
            qpos = torch.tensor(ends, device=query.device)[:, None] - q_len + torch.arange(q_len, device=query.device)
            return windowed_attention_torch(query, layer.prefix, layer.keys, layer.values, scaling, pads, softcap,
                                            sliding_window, qpos)
    if chosen == "triton":
        from ..kernels.ragged_attention import ragged_attention_triton

        return ragged_attention_triton(query, layer.prefix, layer.keys, layer.values, scaling, pads, softcap)
    return ragged_attention_torch(query, layer.prefix, layer.keys, layer.values, scaling, pads, softcap)


def windowed_attention_torch(query, prefix: RaggedKV, tail_k, tail_v, scaling: float, pads, softcap,
                             window: int, qpos: torch.Tensor) -> torch.Tensor:
    """`ragged_attention_torch` for a sliding-window layer whose window binds: a query at
    position p sees only entries at positions > p - window (prefix entries by their recorded
    positions, tail slots by their place). `qpos` [B, q] are the queries' positions. A uniform
    prefix (a hybrid model's sliding layers keep the same count everywhere) is attended in one
    batched pair of matmuls with the window folded into its mask; otherwise one row at a time
    (`_packed_row`, likewise). Returns [B, q, Hq, d]."""
    B, Hq, q_len, d = query.shape
    H = prefix.heads
    G = Hq // H
    R = G * q_len
    T = tail_k.shape[2]
    dev = query.device
    qg = query.reshape(B, H, R, d)
    i = torch.arange(q_len, device=dev).repeat(G)  # query index of each of a head's R rows
    j = torch.arange(T, device=dev)
    last = (T - q_len) + i[:, None]  # tail slot of each row's query
    tail_ok = (j[None, :] <= last) & (last - j[None, :] < window)  # [R, T]
    neg = torch.tensor(float("-inf"), dtype=query.dtype, device=dev)
    if prefix.uniform:
        pk, pv = prefix.dense()
        kpos = prefix.positions.view(B, H, 1, -1)
        seen = qpos[:, i][:, None, :, None] - kpos < window  # [B, H, R, n]
        bias = torch.zeros(seen.shape, dtype=query.dtype, device=dev).where(seen, neg)
        m = tail_ok[None, None]
        if pads and any(pads):
            m = m & (j[None, :] >= torch.tensor(pads, device=dev)[:, None])[:, None, None, :]
        out = _two_block(qg, pk, pv, tail_k, tail_v, m, scaling, prefix_bias=bias, softcap=softcap)
        return out.view(B, H, G, q_len, d).reshape(B, Hq, q_len, d).transpose(1, 2).contiguous()
    out = torch.empty_like(qg)
    heads = prefix.head_ids
    row_head = torch.arange(H, device=dev, dtype=heads.dtype).repeat_interleave(R)  # [H*R] each row's KV head
    row_pos = qpos[:, i].repeat(1, H)  # [B, H*R] each row's query position
    for b in range(B):
        s, e = prefix.row_span(b)
        ok = (row_head[:, None] == heads[None, s:e]) & (row_pos[b, :, None] - prefix.positions[None, s:e] < window)
        bias = torch.zeros(ok.shape, dtype=query.dtype, device=dev).where(ok, neg)
        m = tail_ok if not pads or not pads[b] else tail_ok & (j >= pads[b])[None, :]
        out[b] = _packed_row(qg[b], prefix.keys[s:e], prefix.values[s:e], bias, tail_k[b], tail_v[b], m[None],
                             scaling, softcap)
    return out.view(B, H, G, q_len, d).reshape(B, Hq, q_len, d).transpose(1, 2).contiguous()


def kvray_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                    softcap=None, **kwargs):
    """transformers attention function: SDPA, or ragged attention when the layer has a prefix.
    Honours the per-layer options the attention modules pass (`scaling`, `sliding_window`,
    `softcap`); attention sinks (`s_aux`) raise (and are refused at load, with every other
    architecture kvray cannot run: `kvray.runtime.support`)."""
    layer = kwargs.get("kvray_layer")
    if kwargs.get("s_aux") is not None:
        raise UnsupportedModelError(f"{type(module).__name__} uses attention sinks (s_aux), which kvray does not support")
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    if isinstance(layer, KVRayLayer):
        if layer.capture_window > 0:
            layer._capture(query)
        if layer.prefix is not None:
            if query.shape[0] != layer.prefix.batch:
                raise ValueError(f"the cache holds {layer.prefix.batch} rows, the input {query.shape[0]}")
            return ragged_attention(query, layer, scaling, layer.attn_impl, sliding_window, softcap), None
    return dense_attention(query, key, value, attention_mask, scaling, sliding_window, softcap), None


def register_kvray_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, kvray_attention)


def enable_kvray_attention(model) -> None:
    """Route `model`'s attention through `kvray_attention` (plain SDPA for ordinary caches), after
    checking that kvray can run it correctly (`kvray.runtime.support`; else UnsupportedModelError).

    Custom attention names get no mask from transformers: kvray_attention builds the causal
    mask itself, so inputs must not be left-padded (rows of different prompts are batched only
    after compression, through `KVRayCache.merge`, whose padding the cache itself tracks).
    """
    check_supported(model)
    register_kvray_attention()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)

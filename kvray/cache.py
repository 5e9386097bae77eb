"""The compressed KV cache (real memory) and the attention function that reads it.

Per layer the cache holds a **static ragged prefix** -- the kept context entries, packed per
(batch, KV head) with their own lengths, never re-allocated -- and a **dense growing tail** for
tokens appended afterwards (question, generated tokens). Only kept entries are stored, so
`nbytes()` is the memory really held, for uniform, per-layer and per-KV-head budgets alike.

Two seams of transformers 5.x make it work with any `model(...)` / `model.generate(...)`:
`Cache.update(..., kwargs=attn_kwargs)` receives the very dict later splatted into the attention
function, so each layer puts itself in it (`kvray_layer`); `kvray_attention`, registered under the
attention implementation name ``"kvray"``, then attends over prefix + tail. Without a compressed
prefix it is plain SDPA, so a model set to ``"kvray"`` behaves exactly as with ``"sdpa"``.

Positions never move: `get_seq_length()` counts original positions (context length + tail), so
the model gives new tokens their true RoPE positions although fewer entries are stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

ATTN_IMPLEMENTATION = "kvray"


@dataclass
class RaggedKV:
    """Kept entries of one layer, packed over (batch, KV head), b-major.

    keys, values: [total, head_dim]; positions: [total] int64 original token positions;
    lengths: per (b, h) entry counts (python ints, len = batch * heads).
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    lengths: tuple[int, ...]
    batch: int
    heads: int

    def __post_init__(self):
        assert len(self.lengths) == self.batch * self.heads
        assert self.keys.shape[0] == sum(self.lengths) == self.values.shape[0]
        self.offsets = [0]
        for n in self.lengths:
            self.offsets.append(self.offsets[-1] + n)

    @property
    def uniform(self) -> bool:
        return len(set(self.lengths)) <= 1

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, H, n, d] views; only when all heads hold the same count."""
        assert self.uniform
        n = self.lengths[0] if self.lengths else 0
        d = self.keys.shape[-1]
        return (self.keys.view(self.batch, self.heads, n, d), self.values.view(self.batch, self.heads, n, d))

    def row(self, b: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """[H, n, d] views of batch row b when its heads hold the same count, else None."""
        lens = self.lengths[b * self.heads:(b + 1) * self.heads]
        if len(set(lens)) != 1:
            return None
        s, e = self.offsets[b * self.heads], self.offsets[(b + 1) * self.heads]
        d = self.keys.shape[-1]
        return self.keys[s:e].view(self.heads, lens[0], d), self.values[s:e].view(self.heads, lens[0], d)

    def head(self, bh: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, e = self.offsets[bh], self.offsets[bh + 1]
        return self.keys[s:e], self.values[s:e]

    @classmethod
    def gather(cls, keys: torch.Tensor, values: torch.Tensor, indices: list[torch.Tensor]) -> "RaggedKV":
        """Pack `keys/values[b, h, indices[b*H + h]]` from dense [B, H, N, d] tensors (copies)."""
        B, H, N, d = keys.shape
        assert len(indices) == B * H
        flat_idx = torch.cat([idx.to(keys.device, torch.long) + bh * N for bh, idx in enumerate(indices)])
        k = keys.reshape(B * H * N, d).index_select(0, flat_idx)
        v = values.reshape(B * H * N, d).index_select(0, flat_idx)
        pos = torch.cat([idx.to(torch.long) for idx in indices]).to(keys.device)
        return cls(k, v, pos, tuple(int(i.numel()) for i in indices), B, H)


class KVRayLayer(DynamicLayer):
    """One layer: optional ragged prefix covering `prefix_tokens` original positions + dense tail.

    The tail is `self.keys` / `self.values` of `DynamicLayer` ([B, H, T, d]); before compression
    the whole sequence lives there, so an uncompressed `KVRayCache` is a `DynamicCache`.
    """

    def __init__(self, prefix: RaggedKV | None = None, prefix_tokens: int = 0, capture_window: int = 0):
        super().__init__()
        self.prefix = prefix
        self.prefix_tokens = prefix_tokens
        self.capture_window = capture_window
        self.window_queries: torch.Tensor | None = None  # [B, Hq, <=W, d] post-RoPE, last queries seen
        self.window_positions: torch.Tensor | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        attn_kwargs = kwargs.get("kwargs")
        if isinstance(attn_kwargs, dict):
            attn_kwargs["kvray_layer"] = self
        return super().update(key_states, value_states)

    def tail_length(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.prefix_tokens + self.tail_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and -tokens_to_remove > self.tail_length():
            raise ValueError("cannot crop into the compressed prefix of a kvray cache")
        super().crop(tokens_to_remove)

    def nbytes(self) -> int:
        tail = 0 if self.tail_length() == 0 else self.keys.nbytes + self.values.nbytes
        return (self.prefix.nbytes if self.prefix is not None else 0) + tail

    def _capture(self, query: torch.Tensor) -> None:
        end = self.get_seq_length()
        q_len = query.shape[2]
        pos = torch.arange(end - q_len, end, device=query.device)
        w = self.capture_window
        if self.window_queries is not None:
            query = torch.cat([self.window_queries, query], dim=2)
            pos = torch.cat([self.window_positions, pos])
        # new tensors, never in-place: a caller may hold the previous window (see prefill)
        self.window_queries = query[:, :, -w:].detach().clone()
        self.window_positions = pos[-w:].clone()

    def keep(self, indices: list[torch.Tensor]) -> None:
        """Evict during decoding: per (batch, KV head), b-major, keep the entries at `indices` of
        that head's prefix followed by the tail (index i < n: prefix entry i, else tail entry
        i - n). The kept entries, in the given order and with their original positions, become
        the new prefix (copied, so the old tensors can be freed); the tail is emptied, so
        `get_seq_length()` -- the next token's position -- does not change."""
        T = self.tail_length()
        prefix = self.prefix
        if prefix is None:
            if not T:
                raise ValueError("nothing cached to keep entries of")
            B, H, _, d = self.keys.shape
            prefix = RaggedKV(self.keys.new_empty((0, d)), self.values.new_empty((0, self.values.shape[-1])),
                              torch.empty(0, dtype=torch.long, device=self.keys.device), (0,) * (B * H), B, H)
        B, H = prefix.batch, prefix.heads
        pk, pv, ppos, lengths, offsets = prefix.keys, prefix.values, prefix.positions, prefix.lengths, prefix.offsets
        if len(indices) != B * H:
            raise ValueError(f"keep needs one index tensor per (batch, KV head): {B * H}, got {len(indices)}")
        if T:
            d = self.keys.shape[-1]
            pk, pv = torch.cat([pk, self.keys.reshape(-1, d)]), torch.cat([pv, self.values.reshape(-1, d)])
            tail_pos = torch.arange(self.prefix_tokens, self.prefix_tokens + T, device=ppos.device)
            ppos = torch.cat([ppos, tail_pos.repeat(B * H)])
        # one gather for all heads: head-local indices -> rows of [prefix entries | tail entries]
        dev = pk.device
        counts = [int(i.numel()) for i in indices]
        idx = torch.cat([i.reshape(-1).to(dev, torch.long) for i in indices])
        head = torch.repeat_interleave(torch.arange(B * H, device=dev), torch.tensor(counts, device=dev))
        n = torch.tensor(lengths, device=dev, dtype=torch.long)[head]
        if idx.numel() and bool(((idx < 0) | (idx >= n + T)).any()):
            raise ValueError(f"keep: index out of range (heads hold {[m + T for m in lengths]} entries)")
        sel = torch.where(idx < n, torch.tensor(offsets[:-1], device=dev, dtype=torch.long)[head] + idx,
                          sum(lengths) + head * T + idx - n)
        self.prefix = RaggedKV(pk.index_select(0, sel), pv.index_select(0, sel), ppos.index_select(0, sel),
                               tuple(counts), B, H)
        self.prefix_tokens += T
        if self.is_initialized and T:
            self.keys = self.keys.new_empty((B, H, 0, self.keys.shape[-1]))
            self.values = self.values.new_empty((B, H, 0, self.values.shape[-1]))


class KVRayCache(Cache):
    """A transformers `Cache` of `KVRayLayer`s (see module docstring)."""

    def __init__(self, layers: list[KVRayLayer]):
        super().__init__(layers=layers)

    @classmethod
    def empty(cls, num_layers: int, capture_window: int = 0) -> "KVRayCache":
        return cls([KVRayLayer(capture_window=capture_window) for _ in range(num_layers)])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    @classmethod
    def stack(cls, caches: list["KVRayCache"]) -> "KVRayCache":
        """One batched cache from compressed single-sequence caches of the same prompt (same
        compressed length, empty tails): batch row i is caches[i]. Copies the kept entries."""
        layers = []
        for parts in zip(*(c.layers for c in caches)):
            prefixes = [p.prefix for p in parts]
            if any(p is None for p in prefixes) or any(p.tail_length() for p in parts):
                raise ValueError("only compressed caches with nothing decoded yet can be stacked")
            if len({p.prefix_tokens for p in parts}) != 1 or len({x.heads for x in prefixes}) != 1:
                raise ValueError("stacked caches must cover the same prompt with the same heads")
            ragged = RaggedKV(torch.cat([x.keys for x in prefixes]), torch.cat([x.values for x in prefixes]),
                              torch.cat([x.positions for x in prefixes]),
                              tuple(n for x in prefixes for n in x.lengths),
                              sum(x.batch for x in prefixes), prefixes[0].heads)
            layers.append(KVRayLayer(prefix=ragged, prefix_tokens=parts[0].prefix_tokens))
        return cls(layers)

    def prefix_nbytes(self) -> int:
        return sum(layer.prefix.nbytes for layer in self.layers if layer.prefix is not None)

    def prefix_entries(self) -> int:
        return sum(sum(layer.prefix.lengths) for layer in self.layers if layer.prefix is not None)


# ----------------------------------------------------------------------------- attention


def _causal_tail_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Bottom-right aligned causal mask [q_len, kv_len]: query i sees key j iff j <= kv_len - q_len + i."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    return j <= (kv_len - q_len) + i


def _dense_attention(query, key, value, attention_mask, scaling):
    q_len, kv_len = query.shape[2], key.shape[2]
    kwargs = {}
    if query.shape[1] != key.shape[1]:
        kwargs["enable_gqa"] = True
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask[..., :kv_len]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, **kwargs)
    elif q_len == kv_len:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=q_len > 1, scale=scaling, **kwargs)
    elif q_len == 1:
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling, **kwargs)
    else:
        mask = _causal_tail_mask(q_len, kv_len, query.device)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, **kwargs)
    return out.transpose(1, 2).contiguous()


def _two_block_attention(qg, pk, pv, tk, tv, tail_mask, scaling):
    """Softmax attention of grouped queries qg [..., R, d] over prefix (pk, pv) [..., n, d] and
    tail (tk, tv) [..., T, d] at once, without concatenating the (large) prefix."""
    sp = torch.matmul(qg, pk.transpose(-1, -2)).float() * scaling
    st = torch.matmul(qg, tk.transpose(-1, -2)).float() * scaling
    st = st.masked_fill(~tail_mask, float("-inf"))
    probs = torch.softmax(torch.cat([sp, st], dim=-1), dim=-1).to(qg.dtype)
    n = pk.shape[-2]
    return torch.matmul(probs[..., :n], pv) + torch.matmul(probs[..., n:], tv)


def ragged_attention(query: torch.Tensor, layer: KVRayLayer, scaling: float) -> torch.Tensor:
    """Attention of `query` [B, Hq, q, d] over a layer's ragged prefix + dense tail.

    The tail already holds the q new tokens (appended by `update`); the prefix is fully visible,
    the tail causally. Returns [B, q, Hq, d]. Reference twin of the Triton varlen kernel.
    """
    prefix = layer.prefix
    B, Hq, q_len, d = query.shape
    H = prefix.heads
    G = Hq // H
    tk, tv = layer.keys, layer.values  # [B, H, T, d]
    T = tk.shape[2]
    # rows are (g, i) pairs; row r = g * q_len + i is query position i
    row_pos = torch.arange(q_len, device=query.device).repeat(G)
    tail_mask = torch.arange(T, device=query.device)[None, :] <= (T - q_len) + row_pos[:, None]
    qg = query.reshape(B, H, G * q_len, d)
    if prefix.uniform:
        pk, pv = prefix.dense()
        out = _two_block_attention(qg, pk, pv, tk, tv, tail_mask, scaling)
    else:
        out = torch.empty_like(qg)
        for b in range(B):
            row = prefix.row(b)
            if row is not None:  # e.g. one config of a stacked batch with uniform heads
                out[b] = _two_block_attention(qg[b], row[0], row[1], tk[b], tv[b], tail_mask, scaling)
                continue
            for h in range(H):
                pk, pv = prefix.head(b * H + h)
                out[b, h] = _two_block_attention(qg[b, h], pk, pv, tk[b, h], tv[b, h], tail_mask, scaling)
    return out.view(B, H, G, q_len, d).reshape(B, Hq, q_len, d).transpose(1, 2).contiguous()


def kvray_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: SDPA, or ragged attention when the layer has a prefix."""
    layer = kwargs.get("kvray_layer")
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    if isinstance(layer, KVRayLayer):
        if layer.capture_window > 0:
            layer._capture(query)
        if layer.prefix is not None:
            if query.shape[0] != layer.prefix.batch:
                raise ValueError("batch size changed after compression")
            return ragged_attention(query, layer, scaling), None
    return _dense_attention(query, key, value, attention_mask, scaling), None


def register_kvray_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, kvray_attention)


def enable_kvray_attention(model) -> None:
    """Route `model`'s attention through `kvray_attention` (plain SDPA for ordinary caches).

    Custom attention names get no mask from transformers: kvray_attention builds the causal
    mask itself, so inputs must not be left-padded (kvray evaluates one sample at a time).
    """
    register_kvray_attention()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)

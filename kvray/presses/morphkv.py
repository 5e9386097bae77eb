"""MorphKV: a constant-size KV cache while decoding, re-ranked at every step by the attention
of the most recent tokens (`MorphKVPress`, and `MorphKVLayer`, the per-layer state it keeps)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from ..budget import keep_count
from ..cache import KVRayCache, KVRayLayer, RaggedKV
from .base import LayerInputs, PrefillState, Press, protect
from .scoring import check_window_params

FUSIONS = ("sum", "max")


class MorphKVLayer(KVRayLayer):
    """A `KVRayLayer` that also holds what MorphKV re-ranks with.

    budgets: per batch row, entries per KV head kept between decoding steps (the constant size;
        rows of one prompt with different budgets share a lane: `MorphKVPress.merge_lane`);
    row_logits: per batch row, [1, H, G, R', n_b] fp32 pre-softmax logits q.k/sqrt(d) of the last
        R' <= R queries (rows, oldest first, at positions `window_positions`) against the n_b
        cached entries of each KV head, in the prefix's order; -inf where the key is newer than
        the query. `window_logits` is all rows as one tensor (when they hold the same count).
    """

    def __init__(self, prefix: RaggedKV, prefix_tokens: int, window: int, budget: int | Sequence[int]):
        super().__init__(prefix=prefix, prefix_tokens=prefix_tokens, capture_window=window)
        self.budgets = (int(budget),) * prefix.batch if isinstance(budget, int) else tuple(int(b) for b in budget)
        if len(self.budgets) != prefix.batch:
            raise ValueError(f"MorphKVLayer: {len(self.budgets)} budgets for {prefix.batch} rows")
        self.row_logits: list[torch.Tensor] | None = None

    @property
    def budget(self) -> int:
        """The constant size, when every row has the same one."""
        if len(set(self.budgets)) != 1:
            raise ValueError(f"rows hold different constant sizes {self.budgets}: read `budgets`")
        return self.budgets[0]

    @property
    def window_logits(self) -> torch.Tensor | None:
        """[B, H, G, R', n] of every row (rows with different counts: read `row_logits`)."""
        if self.row_logits is None:
            return None
        return self.row_logits[0] if len(self.row_logits) == 1 else torch.cat(self.row_logits)

    @window_logits.setter
    def window_logits(self, logits: torch.Tensor | None) -> None:
        self.row_logits = None if logits is None else list(logits.split(1))


def window_logits(queries: torch.Tensor, query_positions: torch.Tensor, keys: torch.Tensor,
                  key_positions: torch.Tensor) -> torch.Tensor:
    """q.k/sqrt(d) in fp32: queries [B, Hq, t, d] at positions [t], keys [B, H, m, d] at positions
    [B, H, m] (or [m]) -> [B, H, G, t, m], -inf where the key comes after the query."""
    B, Hq, t, d = queries.shape
    H, m = keys.shape[1], keys.shape[2]
    G = Hq // H
    # one [G * t, d] x [d, m] product per (row, KV head), not G broadcast ones
    q = queries.float().reshape(B, H, G * t, d)
    logits = (torch.matmul(q, keys.float().transpose(-1, -2)) / d**0.5).view(B, H, G, t, m)
    kpos = key_positions.to(keys.device)
    kpos = kpos.view(1, 1, m) if kpos.dim() == 1 else kpos
    future = kpos[:, :, None, None, :] > query_positions.to(keys.device)[None, None, None, :, None]
    return logits.masked_fill(future, float("-inf"))


def top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B, H, min(k, n)] positions of the top-k of scores [B, H, n] per head, ascending."""
    B, H, n = scores.shape
    if k >= n:
        return torch.arange(n, device=scores.device).expand(B, H, n)
    return scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def take_entries(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Columns `indices[b, h]` ([B, H, k]) of each head's logits [B, H, G, R, n] -> [B, H, G, R, k]."""
    B, H, G, R, _ = logits.shape
    return logits.gather(-1, indices[:, :, None, None, :].expand(B, H, G, R, indices.shape[-1]))


@dataclass(frozen=True)
class MorphKVPress(Press):
    """MorphKV (Ghadia, Kumar, Jain, Nair, Das, "Dialogue Without Limits: Constant-Sized KV
    Caches for Extended Responses in LLMs", ICML 2025, arXiv 2503.00979; code ghadiaravi13/MorphKV).

    The cache holds a constant C entries per KV head through decoding: the most recent
    `window_size` (R) tokens, always kept, plus the C - R older tokens that the recent window's
    queries attend to most. Old tokens are re-ranked after every forward pass, so the kept set
    "morphs" as generation drifts. Score of an old entry: per window query, softmax of q.k/sqrt(d)
    over the old entries only (fp32), reduced over each KV head's query group (`gqa_reduction`,
    per query row), then fused over the R rows (`fusion`: sum or max).

    - Compression (`compress`): the window is the last R tokens of the compressed region (its
      captured queries); C entries are kept per head, no pooling (SnapKV-like first step).
    - Decoding (`after_step`, called by the runtime's decoder after every forward): the new
      token(s) are appended, their query rows are added to the cached window logits, and each
      head is cut back to C with one keep mask applied to both the KV entries and the columns of
      the cached logits. Positions never move (no RoPE re-rotation).

    Budget: C = `cache_size` if given (tokens per KV head; it then overrides `compression_ratio`,
    and the cache grows until it reaches C when the context is shorter), else
    C = round((1 - compression_ratio) * N_context), so the reported compression ratio is the
    usual one at the end of compression and the cache stays at that size while decoding.
    `plan` budgets are refused (one constant size per layer and head).

    Equivalence with the reference code: it evicts just before attending the current token, with
    the W queries before it and W + 1 protected tokens, holding `max_capacity` + 1 entries while
    attending; kvray evicts right after each forward with the R = W queries ending at the newest
    token. Both keep the same set for the next token: C entries between steps, C + 1 while one
    is attended, C = `max_capacity`. Deviations:
    - one keep mask per KV head for the cache and the cached logits alike (the reference prunes
      the logits with per-query-head masks, so for GQA they can drift from the kept keys);
    - GQA: per-head softmax, then `max` (the reference's Mistral patch, our default) or `mean`
      over the group; the Llama patch's sum of logits before the softmax is not offered;
    - eviction at every step (`evict_after = 1`, the reference's default), batch rows allowed;
    - the window logits are cached in fp32 (R x C per query head and layer, not counted in
      `nbytes()`, which is the KV memory).

    window_size: R, the recent tokens kept and whose queries vote (32: the LongBench runs);
    fusion: how the R rows combine, "sum" (LongBench / LongWriter runs) or "max";
    gqa_reduction: "max" or "mean" over the query heads of a KV head;
    cache_size: tokens per KV head (None: from `compression_ratio`).
    """

    window_size: int = 32
    fusion: str = "sum"
    gqa_reduction: str = "max"
    cache_size: int | None = None
    name = "morphkv"
    needs_queries = True
    #: evicts during decoding: the decoder gives it a lane of its own and calls `after_step`
    evicts_during_decoding: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if self.plan is not None:
            raise ValueError(f"{self.name}: budget plans are not supported (one constant size per KV head); "
                             "pass compression_ratio or cache_size")
        check_window_params(self.name, window_size=self.window_size, gqa_reduction=self.gqa_reduction)
        if self.fusion not in FUSIONS:
            raise ValueError(f"{self.name}: fusion must be one of {FUSIONS}, got {self.fusion!r}")
        c = self.cache_size
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"{self.name}: cache_size must be None or an integer >= 1 (tokens per KV head), got {c!r}")

    # -- budget -------------------------------------------------------------------------------------

    def constant_size(self, n_tokens: int) -> int:
        """C: entries per KV head held between decoding steps, for a context of `n_tokens`."""
        return self.cache_size if self.cache_size is not None else keep_count(n_tokens, self.compression_ratio)

    def layer_counts(self, state: PrefillState) -> list[list[int]]:
        k = min(self.constant_size(state.n_tokens), state.n_tokens)
        return [[k] * state.num_kv_heads for _ in range(state.num_layers)]

    # -- scoring ------------------------------------------------------------------------------------

    def _prefill_logits(self, layer: LayerInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(window logits [B, H, G, R, N] against every context entry, queries, their positions)."""
        if layer.queries is None:
            raise ValueError(f"{self.name} needs the window queries, but the prefill captured none")
        q, qpos = layer.queries[:, :, -self.window_size:], layer.query_positions[-self.window_size:]
        kpos = torch.arange(layer.n_tokens, device=layer.keys.device)
        return window_logits(q, qpos, layer.keys, kpos), q, qpos

    def window_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, H, n] keep scores of n entries sorted by position, from the window logits
        [B, H, G, R', n]: the last R entries are the window (protected), the rest are scored."""
        n = logits.shape[-1]
        w = min(self.window_size, n)
        # every old entry precedes every window query, so no causal mask is needed here
        probs = torch.softmax(logits[..., -self.window_size:, : n - w], dim=-1)  # [B, H, G, R', n - w]
        grouped = probs.amax(2) if self.gqa_reduction == "max" else probs.mean(2)
        fused = grouped.sum(2) if self.fusion == "sum" else grouped.amax(2)
        scores = torch.cat([fused, fused.new_zeros(fused.shape[:2] + (w,))], dim=-1)
        return protect(scores, last=w)

    def score(self, layer: LayerInputs) -> torch.Tensor:
        return self.window_scores(self._prefill_logits(layer)[0])

    # -- compression and decoding -------------------------------------------------------------------

    def compress(self, state: PrefillState) -> KVRayCache:
        """The first step: keep C entries per head, and the window logits of the kept ones."""
        counts = self.layer_counts(state)
        size = self.constant_size(state.n_tokens)
        layers = []
        for layer, layer_counts in zip(state.layers, counts):
            logits, q, qpos = self._prefill_logits(layer)
            idx = top_sorted(self.window_scores(logits), layer_counts[0])
            prefix = RaggedKV.gather(layer.keys, layer.values, list(idx.reshape(-1, idx.shape[-1])))
            out = MorphKVLayer(prefix, state.n_tokens, self.window_size, size)
            out.window_logits = take_entries(logits, idx)
            out.window_queries, out.window_positions = q.detach().clone(), qpos.clone()
            layers.append(out)
        return state.assemble(layers)

    def after_step(self, cache: KVRayCache, step: int) -> None:
        """Cut every layer back to its constant size after a forward pass (`step` is unused:
        MorphKV evicts after every one)."""
        own = [layer for layer in cache.layers if isinstance(layer, MorphKVLayer)]  # not a hybrid's windowed layers
        first = own[0] if own else None
        if first is None or first.row_logits is None:
            raise ValueError(f"{self.name}: after_step needs a cache built by {type(self).__name__}.compress")
        if first.tail_length() and int(first.window_positions[-1]) != first.get_seq_length() - 1:
            raise ValueError(f"{self.name}: the decoding queries were not captured; the model must run "
                             "kvray's attention (kvray.runtime.enable_kvray_attention)")
        for layer in own:
            self.evict(layer)

    def lane_key(self) -> tuple:
        """Rows of one prompt whose presses share this key decode in one lane (`merge_lane`): the
        same re-ranking, constant sizes of their own."""
        return (type(self), self.window_size, self.fusion, self.gqa_reduction)

    @staticmethod
    def merge_lane(caches: list[KVRayCache]) -> KVRayCache:
        """One cache of the rows of `caches`: MorphKV caches of one prompt and protocol (before
        decoding), with constant sizes of their own. `evict` then cuts each row to its own size,
        so every row keeps exactly what it keeps decoded alone, in one forward for all."""
        if len(caches) == 1:
            return caches[0]
        if len({tuple(c.layout()[0]) for c in caches}) != 1 or any(c.layers[0].tail_length() for c in caches):
            raise ValueError("morphkv: only caches of one prompt, before decoding, share a lane")
        merged = KVRayCache.merge(caches)
        for i, layer in enumerate(merged.layers):
            srcs = [c.layers[i] for c in caches]
            if srcs[0].capture_window:  # the window queries of every row, at the same positions
                if any(not torch.equal(s.window_positions, srcs[0].window_positions) for s in srcs):
                    raise ValueError("morphkv: caches to merge captured their queries at different positions")
                if isinstance(srcs[0], MorphKVLayer):
                    out = MorphKVLayer(layer.prefix, layer.prefix_tokens, srcs[0].capture_window,
                                       [b for s in srcs for b in s.budgets])
                    out.row_logits = [r for s in srcs for r in s.row_logits]
                    out.window = layer.window
                    merged.layers[i] = layer = out
                else:
                    layer.capture_window = srcs[0].capture_window
                layer.window_queries = torch.cat([s.window_queries for s in srcs])
                layer.window_positions = srcs[0].window_positions
        return merged

    def evict(self, layer: MorphKVLayer) -> None:
        """Add the rows of the tokens appended since the last call to the window logits, then keep
        the window + the top old entries per KV head, in the cache and in the logits alike (all
        rows at once when they hold the same count, else row by row, each to its own size)."""
        T = layer.tail_length()
        if T == 0:
            return
        prefix = layer.prefix
        B, H = prefix.batch, prefix.heads
        t = min(T, self.window_size)
        q, qpos = layer.window_queries[:, :, -t:], layer.window_positions[-t:]
        tail_pos = torch.arange(layer.prefix_tokens, layer.prefix_tokens + T, device=prefix.keys.device)
        if prefix.uniform and len(set(layer.budgets)) == 1:  # every head of every row: one size
            pk, _ = prefix.dense()
            parts = [(slice(0, B), pk, prefix.positions.view(B, H, -1), layer.window_logits, layer.budgets[0])]
        else:
            parts = []
            for b in range(B):
                s, e = prefix.row_span(b)
                pk = prefix.keys[s:e].view(1, H, -1, prefix.keys.shape[-1])
                parts.append((slice(b, b + 1), pk, prefix.positions[s:e].view(1, H, -1), layer.row_logits[b],
                              layer.budgets[b]))
        indices, logits_out = [], []
        for rows, pk, ppos, old, budget in parts:
            new_rows = torch.cat([window_logits(q[rows], qpos, pk, ppos),
                                  window_logits(q[rows], qpos, layer.keys[rows], tail_pos)], dim=-1)
            # older rows never see the new keys (they come after them: causal)
            old_rows = F.pad(old, (0, T), value=float("-inf"))
            logits = torch.cat([old_rows, new_rows], dim=3)[..., -self.window_size:, :]
            idx = top_sorted(self.window_scores(logits), budget)  # [b, H, k]
            indices += list(idx.reshape(-1, idx.shape[-1]))
            logits_out.append(take_entries(logits, idx))
        layer.keep(indices)
        layer.row_logits = [r for x in logits_out for r in x.split(1)]

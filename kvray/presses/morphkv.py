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
        #: the ring layout of the steady state (`MorphKVPress.evict`): per (row, KV head) the C - R
        #: old entries in any order, then slot C - R + (p mod R) for the window token at position
        #: p, and the logits' row p mod R for the window query at p. False: position order.
        self.ring = False

    @property
    def budget(self) -> int:
        """The constant size, when every row has the same one."""
        if len(set(self.budgets)) != 1:
            raise ValueError(f"rows hold different constant sizes {self.budgets}: read `budgets`")
        return self.budgets[0]

    @property
    def window_logits(self) -> torch.Tensor | None:
        """[B, H, G, R', n] of every row (rows with different counts: read `row_logits`), in
        position order (reading it takes the layer out of the ring layout: `canonical`)."""
        if self.row_logits is None:
            return None
        self.canonical()
        return self.row_logits[0] if len(self.row_logits) == 1 else torch.cat(self.row_logits)

    def _relayout(self, entry: list[torch.Tensor], rows: torch.Tensor) -> None:
        """Permute the entries of every (row, KV head) (`entry[b]`: [H, C_b] head-local source
        indices) and the window rows of every row's logits (`rows`: [R] source rows)."""
        prefix, H = self.prefix, self.prefix.heads
        dev = prefix.keys.device
        starts = torch.tensor(prefix.offsets[:-1], device=dev).view(-1, H)
        flat = torch.cat([(idx.to(dev) + starts[b, :, None]).reshape(-1) for b, idx in enumerate(entry)])
        self.prefix = RaggedKV(prefix.keys.index_select(0, flat), prefix.values.index_select(0, flat),
                               prefix.positions.index_select(0, flat), prefix.lengths, prefix.batch, H)
        self.row_logits = [take_entries(rl, idx[None].to(rl.device)).index_select(3, rows.to(rl.device))
                           for rl, idx in zip(self.row_logits, entry)]
        self._tail_replaced()  # the attention's decode blocks copied the old layout

    def to_ring(self, window: int) -> None:
        """Position order -> ring layout (see `ring`): every row holds its constant size C_b >
        `window` R, with the last R positions (all kept, consecutive) as its window and R rows
        of logits."""
        if self.ring:
            return
        P, R = self.prefix_tokens, window  # cached positions < P; the window is P - R .. P - 1
        roll = (torch.arange(R) - P) % R  # ring slot r <- sorted window index (r - P) mod R
        entry = []
        for b, C in enumerate(self.budgets):
            order = torch.cat([torch.arange(C - R), C - R + roll])
            entry.append(order.expand(self.prefix.heads, C))
        self._relayout(entry, roll)
        self.ring = True

    def canonical(self) -> None:
        """Back to position order (entries by position, logits rows oldest first)."""
        if not self.ring:
            return
        R = self.row_logits[0].shape[3]
        P = self.prefix_tokens
        entry = [self.prefix.positions[slice(*self.prefix.row_span(b))].view(self.prefix.heads, -1).argsort(-1)
                 for b in range(self.prefix.batch)]
        self._relayout(entry, (torch.arange(R) + P) % R)  # sorted row i (query P - R + i) <- ring row (P + i) mod R
        self.ring = False

    @window_logits.setter
    def window_logits(self, logits: torch.Tensor | None) -> None:
        self.row_logits = None if logits is None else list(logits.split(1))
        self.ring = False


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
      the cached logits. Positions never move (no RoPE re-rotation). In the steady state (one
      token per step, the cache at C) exactly one entry per head leaves: the ring step
      (`_ring_step`) does this in place, the leaving window token taking the freed slot, with
      no re-packing of the cache, its logits or the attention's blocks (`MorphKVLayer.ring`).

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
        if T == 1 and self._steady(layer):
            return self._ring_step(layer)
        layer.canonical()
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

    def _steady(self, layer: MorphKVLayer) -> bool:
        """Whether the ring step applies: one prompt, every row at its constant size with a
        full window of R logits rows and old entries to choose from (else `evict`'s general
        path, which also handles feeds of several tokens and caches still growing)."""
        R, prefix = self.window_size, layer.prefix
        return (layer.rows is None and layer.prefix_tokens >= R and all(
            rl.shape[3] == R and C > R and set(prefix.row_lengths(b)) == {C}
            for b, (C, rl) in enumerate(zip(layer.budgets, layer.row_logits))))

    def _ring_step(self, layer: MorphKVLayer) -> None:
        """`evict` for one new token at the constant size, in place (ring layout, `MorphKVLayer.
        ring`): the new query's logits row replaces the oldest row; the token leaving the window
        (position p - R) competes with the C - R old entries, and the lowest score of those
        C - R + 1 leaves: the leaving token takes the freed old slot (unless it is the lowest
        itself), and the new token its window slot. The same keep rule as the general path
        (one token in, one out, per KV head), without re-packing the cache or its logits."""
        layer.to_ring(self.window_size)
        prefix, R = layer.prefix, self.window_size
        H, d = prefix.heads, prefix.keys.shape[-1]
        dev = prefix.keys.device
        p = layer.prefix_tokens  # the new token's position
        r = p % R  # its logits row, and its window slot
        q_new = layer.window_queries[:, :, -1].float()  # [B, Hq, d]
        k_new = layer.keys[:, :, 0]  # [B, H, d]
        G = q_new.shape[1] // H
        heads = torch.arange(H, device=dev)
        moved, slots = [], []  # per row: the packed index of each head's freed old slot / window slot
        local = []  # per row: (row-head, freed slot, window slot), head-local
        for b, C in enumerate(layer.budgets):
            s, e = prefix.row_span(b)
            L = layer.row_logits[b].view(H, G, R, C)
            q = q_new[b].view(H, G, d)
            o, slot = C - R, C - R + r  # old slots [0, o); the leaving token's window slot
            logits = torch.matmul(q, prefix.keys[s:e].view(H, C, d).float().transpose(1, 2)) / d**0.5
            L[:, :, r] = logits  # the new query sees every entry
            leaving = logits.new_empty((H, G, R))
            leaving.copy_(L[:, :, :, slot])  # every window query sees the leaving token
            # softmax over the C - R + 1 candidates, per query head and window row
            top = torch.maximum(L[..., :o].amax(dim=-1), leaving)
            p_old = (L[..., :o] - top[..., None]).exp_()
            p_leaving = (leaving - top).exp_()
            total = p_old.sum(dim=-1).add_(p_leaving)
            p_old.div_(total[..., None])
            p_leaving.div_(total)
            grouped = (p_old.amax(1), p_leaving.amax(1)) if self.gqa_reduction == "max" else (p_old.mean(1), p_leaving.mean(1))
            fused = [g.sum(1) if self.fusion == "sum" else g.amax(1) for g in grouped]  # [H, o], [H]
            drop = torch.cat([fused[0], fused[1][:, None]], dim=1).argmin(dim=1)  # o: the leaving token
            to = torch.where(drop < o, drop, slot)  # [H]; its own slot: a no-op move
            # the leaving token's column into the freed one; the new token's column: only its own
            # query (row r) sees it
            cols = L.view(H, G * R, C)
            flat = (heads[:, None] * (G * R * C) + torch.arange(G * R, device=dev) * C + to[:, None]).reshape(-1)
            cols.view(-1).index_copy_(0, flat, leaving.reshape(-1))
            L[:, :, :, slot] = float("-inf")
            L[:, :, r, slot] = torch.matmul(q, k_new[b].float()[:, :, None])[..., 0] / d**0.5
            base = s + heads * C
            moved.append(base + to)
            slots.append(base + slot)
            local.append((b * H + heads, to, torch.full_like(to, slot)))
        # the cache: every row's leaving token into its freed slot, then the new token into its
        # window slot, with one copy per tensor for all rows
        moved, slots = torch.cat(moved), torch.cat(slots)
        n = slots.numel()
        for x, new in ((prefix.keys, k_new.reshape(n, -1)), (prefix.values, layer.values[:, :, 0].reshape(n, -1)),
                       (prefix.positions, torch.full((n,), p, dtype=torch.long, device=dev))):
            x.index_copy_(0, moved, x.index_select(0, slots))
            x.index_copy_(0, slots, new)
        layer.prefix_tokens += 1
        layer.keys, layer.values = layer.keys[:, :, :0], layer.values[:, :, :0]  # the tail's buffers stay
        blocks = prefix.__dict__.get("_decode_blocks")  # the attention's copy of a ragged prefix
        buffer = layer._bufs[0]  # where the next token goes (an empty view has no address)
        if blocks is not None and blocks.filled == 1 and buffer is not None:
            bh = torch.cat([x[0] for x in local] * 2)
            at = torch.cat([x[1] for x in local] + [x[2] for x in local])  # head-local: moved, then window slots
            written = torch.cat([moved, slots])
            if not blocks.absorb_tail(bh, at, prefix.keys.index_select(0, written),
                                      prefix.values.index_select(0, written), buffer):
                layer._tail_replaced()
        else:
            layer._tail_replaced()

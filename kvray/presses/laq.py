"""Lookahead Q-Cache (LAQ / LAQ++): rescore the full prefill with the queries of a few pseudo
answer tokens decoded greedily on a provisional SnapKV cache."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..cache import KVRayCache, KVRayLayer
from ..runtime.decoder import Decoder
from ..runtime.prefill import ensure_kvray_attention, forward
from .base import LayerInputs, Press, protect
from .scoring import check_window_params, pool, reduce_gqa, window_scores
from .snapkv import SnapKVPress


@dataclass(frozen=True)
class LAQPress(Press):
    """Lookahead Q-Cache (Wang et al., "Lookahead Q-Cache: Achieving More Consistent KV Cache
    Eviction via Pseudo Query", EMNLP 2025, arXiv 2505.20334), following the authors' code
    (noforit/Lookahead_Q-Cache, `run_LAQ.sh` defaults).

    1. Stage 1: a provisional copy of the prefill cache compressed by SnapKV at the same budget
       (`window_size`, `kernel_size`, `pooling`, `gqa_reduction`).
    2. Lookahead: `lookahead` pseudo answer tokens are decoded greedily on that copy -- after
       feeding the rest of the prompt (query-agnostic protocol) or from the prefill's first-token
       logits (query-aware) -- and every layer keeps their post-RoPE queries. A stop token ends
       the lookahead early (as the reference's EOS check; the stop token itself is not fed).
    3. Stage 2: the FULL prefill cache (never modified) is rescored with the pseudo queries,
       preceded by the last `stage2_window` prompt queries (LAQ++; 0 = plain LAQ): fp32 softmax
       over the prompt keys, mean over query rows, GQA reduction and pooling as SnapKV; the last
       `stage2_window` prompt tokens are protected. Shared code selects and packs the kept entries.

    `score(layer)` rescores with the last `stage2_window + lookahead` rows of `layer.queries`
    (what `compress_prefill` puts there). Called through `compress(state)` without a model, the
    pseudo queries are missing and the last prompt queries stand in for them (SnapKV-like).

    Deviations from the reference code:
    - one cache per KV head (`gqa_reduction`, mean by default, as kvray's SnapKV) instead of
      `repeat_kv` before caching (G times the memory, scores per query head);
    - the mask is by position (a query at position p sees keys at positions <= p), not the
      reference's lower-triangular block on the last `stage2_window + lookahead` keys, which
      hides the last prompt keys from the pseudo queries (docs/methods.md, section 3);
    - mean over query rows instead of sum (same ranking), pooling over all N columns as kvray's
      SnapKV does (the reference pools the unprotected columns only);
    - query-agnostic protocol (the reference only has query-aware prompts): by default the
      lookahead starts after only the chat template's suffix (end of the user turn, assistant
      header) is fed on the provisional cache -- neither the question nor the answer prefix,
      which can name the key -- so the compression stays blind to the query as the protocol
      requires;
      `lookahead_sees_question=True` feeds the question first (then the kept entries depend on
      it: not comparable with the other methods' query-agnostic numbers);
    - if the very first pseudo token is a stop token there is nothing to look ahead at and the
      stage-1 cache is returned (the answer is empty anyway).

    window_size: stage-1 SnapKV window (the reference's `lookahead_window_size`, 32).
    kernel_size, pooling, gqa_reduction: pooling and GQA reduction of both stages (7, max, mean).
    lookahead: pseudo tokens decoded (`max_lookahead_size`, 8).
    stage2_window: prompt queries joined to the pseudo ones and prompt tokens protected in
        stage 2 (8 = LAQ++, the script's default; 0 = LAQ); at most `window_size`, so the
        prefill captures them.
    lookahead_sees_question: query-agnostic protocol only, see above (False).
    """

    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    gqa_reduction: str = "mean"
    lookahead: int = 8
    stage2_window: int = 8
    lookahead_sees_question: bool = False
    name = "laq"
    needs_queries = True
    needs_model = True

    def __post_init__(self):
        super().__post_init__()
        for field_name in ("window_size", "kernel_size", "lookahead", "stage2_window"):
            v = getattr(self, field_name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{self.name}: {field_name} must be an integer, got {v!r}")
        check_window_params(self.name, window_size=self.window_size, kernel_size=self.kernel_size,
                            pooling=self.pooling, gqa_reduction=self.gqa_reduction)
        if self.lookahead < 1:
            raise ValueError(f"{self.name}: lookahead (pseudo tokens) must be >= 1, got {self.lookahead}")
        if not 0 <= self.stage2_window <= self.window_size:
            raise ValueError(f"{self.name}: stage2_window must lie in [0, window_size={self.window_size}] "
                             f"(0 = LAQ, 8 = LAQ++), got {self.stage2_window}")
        if not isinstance(self.lookahead_sees_question, bool):
            raise ValueError(f"{self.name}: lookahead_sees_question must be True or False, "
                             f"got {self.lookahead_sees_question!r}")

    # -- stage 2 scoring ----------------------------------------------------------------------

    def score(self, layer: LayerInputs) -> torch.Tensor:
        """[B, H, N]: attention the last `stage2_window + lookahead` queries of `layer.queries`
        pay to the prompt keys (each query masked by its own position), pooled; the last
        `stage2_window` tokens protected."""
        mean, _ = window_scores(layer, self.stage2_window + self.lookahead)  # [B, Hq, N]
        scores = reduce_gqa(mean, layer.num_kv_heads, self.gqa_reduction)
        scores = pool(scores, self.kernel_size, self.pooling)
        return protect(scores, last=self.stage2_window)

    def observed(self, layer: LayerInputs, pseudo: torch.Tensor, positions: torch.Tensor) -> LayerInputs:
        """`layer` with the stage-2 queries: the last `stage2_window` prompt queries followed by
        the pseudo queries [B, Hq, n, d] at `positions` [n]."""
        q, pos = pseudo, positions
        if self.stage2_window:
            if layer.queries is None:
                raise ValueError(f"{self.name}: stage2_window > 0 needs the prefill's window queries")
            q = torch.cat([layer.queries[:, :, -self.stage2_window:], q], dim=2)
            pos = torch.cat([layer.query_positions[-self.stage2_window:].to(pos.device), pos])
        return dataclasses.replace(layer, queries=q, query_positions=pos)

    # -- stages 1 and lookahead ---------------------------------------------------------------

    def stage1(self) -> SnapKVPress:
        """The provisional compressor: SnapKV at the same budget."""
        return SnapKVPress(compression_ratio=self.compression_ratio, plan=self.plan, window_size=self.window_size,
                           kernel_size=self.kernel_size, pooling=self.pooling, gqa_reduction=self.gqa_reduction)

    def lookahead_feed(self, pre, query_aware: bool) -> list[int]:
        """Tokens fed on the provisional cache before the pseudo tokens."""
        if query_aware or self.lookahead_sees_question:
            return pre.rest(query_aware)
        # the template only: the answer prefix can name the query's key ("The magic number for X is")
        return list(pre.prompt.template_suffix) or list(pre.prompt.suffix)

    @torch.inference_mode()
    def pseudo_decode(self, lm, cache: KVRayCache, feed: list[int],
                      first_logits: torch.Tensor | None) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Greedy pseudo tokens on `cache` (their entries are appended to its tail) and, per
        layer, their post-RoPE queries [B, Hq, n, d] with positions [n]. Feeds `feed` first, or
        starts from `first_logits` when it is empty; stops at a stop token or `lookahead`."""
        return self.pseudo_decode_rows(lm, cache, feed, first_logits)[0]

    @torch.inference_mode()
    def pseudo_decode_rows(self, lm, cache: KVRayCache, feed: list[int], first_logits: torch.Tensor | None
                           ) -> list[tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]]:
        """`pseudo_decode` for every row of `cache` (one prompt; e.g. provisional caches of several
        budgets, merged), all in one lane: one forward per pseudo token for all rows. A row that
        stops early is fed a filler until the others are done; its queries are those of its own
        tokens (the first it fed), which the others' never change."""
        if not feed and first_logits is None:
            raise ValueError(f"{self.name}: nothing to start the lookahead from (no tokens to feed, no logits)")
        if feed:
            first_logits = forward(lm, [feed] * cache.batch, cache)
        for layer in cache.layers:  # capture only the pseudo tokens, not `feed`
            layer.capture_window = self.lookahead
        try:
            # every pseudo token is fed too (feed_final): its queries are what stage 2 reads
            dec = Decoder(lm)
            rows = dec.add(cache, first_logits=first_logits, max_new_tokens=self.lookahead, feed_final=True)
            dec.run()
            for row in rows:
                if row.error is not None:
                    raise row.error
        finally:
            for layer in cache.layers:
                layer.capture_window = 0
        out = []
        for b, row in enumerate(rows):
            n = len(row.tokens)
            out.append((row.tokens, [(layer.window_queries[b:b + 1, :, :n], layer.window_positions[:n])
                                     for layer in cache.layers] if n else []))
        return out

    def together_key(self) -> tuple | None:
        """Presses of one prompt and protocol with the same key decode their lookaheads together
        (`compress_together`): the same number of pseudo tokens after the same feed."""
        return (type(self), self.lookahead, self.lookahead_sees_question)

    @classmethod
    @torch.inference_mode()
    def compress_together(cls, lm, pre, query_aware: bool, presses: list["LAQPress"]) -> list[KVRayCache]:
        """`compress_prefill` of each press (the same caches), with the lookaheads of those that
        share a `together_key` decoded as the rows of one lane (`_with_lookahead`)."""
        state = pre.state(query_aware)
        out: list[KVRayCache | None] = [None] * len(presses)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(presses):
            if (p.target_ratio == 0.0 and p.plan is None) or state.batch != 1:
                out[i] = p.compress_prefill(lm, pre, query_aware)
            else:
                groups.setdefault(p.together_key(), []).append(i)
        for members in groups.values():
            for i, cache in zip(members, cls._with_lookahead(lm, pre, query_aware, [presses[i] for i in members])):
                out[i] = cache
        return out

    @torch.inference_mode()
    def compress_prefill(self, lm, pre, query_aware: bool) -> KVRayCache:
        state = pre.state(query_aware)
        if self.target_ratio == 0.0 and self.plan is None:
            return self.compress(state)
        if state.batch != 1:
            raise ValueError(f"{self.name}: the lookahead decodes one sequence; got a batch of {state.batch}")
        return self._with_lookahead(lm, pre, query_aware, [self])[0]

    @staticmethod
    def _with_lookahead(lm, pre, query_aware: bool, presses: list["LAQPress"]) -> list[KVRayCache]:
        """Stage 1, the lookahead and stage 2 for presses of one `together_key` (a compressing
        budget, a one-sequence prefill): each its own provisional SnapKV cache, all of them one
        row each of the lookahead's lane, then each rescored and compressed on its own."""
        state = pre.state(query_aware)
        ensure_kvray_attention(lm)
        head = presses[0]
        provisional = [p.stage1().compress(state) for p in presses]
        feed = head.lookahead_feed(pre, query_aware)
        first = pre.first_logits(query_aware) if not feed else None
        lane = provisional[0] if len(provisional) == 1 else KVRayCache.merge(provisional)
        out = []
        for press, prov, (tokens, pseudo) in zip(presses, provisional, head.pseudo_decode_rows(lm, lane, feed, first)):
            if not tokens:  # nothing looked ahead at: the stage-1 cache
                out.append(KVRayCache([_untailed(layer) for layer in prov.layers]))
                continue
            layers = [press.observed(layer, *pseudo[layer.layer_idx]) for layer in state.layers]
            out.append(press.compress(dataclasses.replace(state, layers=layers)))
        return out


def _untailed(layer: KVRayLayer) -> KVRayLayer:
    """The layer's compressed prefix alone (the lookahead's tail dropped)."""
    out = KVRayLayer(prefix=layer.prefix, prefix_tokens=layer.prefix_tokens)
    out.window = layer.window
    return out

"""The step-wise decoder with per-row state: one decode path for every caller.

A row joins with its own compressed cache, its own tokens to feed first (the query-agnostic
protocol's question + suffix) or the logits to start from, its own stop rule and token limit.
`step()` decodes one token for every active row; a finished row leaves at once (the batch is
re-packed without it) and rows added since the last step join before the next forward.

Rows whose cache changes shape while decoding (a press with an `after_step` hook, e.g. MorphKV)
or that capture their queries (LAQ's lookahead) are decoded in a lane of their own; every other
row shares one batch (`KVRayCache.merge`: rows of different prompts, lengths and per-head
budgets, each with its own positions), so one forward serves them all.

    dec = Decoder(lm)
    row = dec.add(cache, feed=prompt.rest, max_new_tokens=32)[0]
    while dec.active:
        dec.step()
    row.tokens, row.finish_reason

Greedy (argmax) decoding; `teacher` forces the tokens instead (teacher-forced scoring), with
`on_logits` seeing every logits vector before its token is chosen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..cache import KVRayCache
from .attention import DecodeBlocks, resolve_impl
from .prefill import ensure_kvray_attention, forward
from .prompt import stop_token_ids

@dataclass(eq=False)
class Row:
    """One sequence being decoded (state owned by the decoder; read it, don't write it)."""

    key: Any
    max_new_tokens: int
    stops: frozenset
    teacher: tuple[int, ...] | None = None
    feed_final: bool = False
    on_token: Callable[["Row", int], None] | None = None
    on_logits: Callable[["Row", torch.Tensor], None] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None
    forwards: int = 0
    decode_s: float = 0.0  # this row's share of the forwards it took part in
    _logits: torch.Tensor | None = None
    _best: int | None = None  # argmax of _logits, taken for the whole batch at once
    _next: int | None = None  # the token to feed next
    _cancel: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Take this row out of the batch at the next step (e.g. its client disconnected)."""
        self._cancel = True


def _room(rows: list[Row]) -> int:
    """The most tokens any of `rows` may still be fed (its last token included)."""
    return max((r.max_new_tokens - len(r.tokens) + 1 for r in rows), default=0)


def _prepare(cache: KVRayCache, impl: str, room: int) -> None:
    """Set the attention implementation of `cache`'s layers, and the tail slots their attention
    blocks should keep free (`DecodeBlocks`): the tokens the rows may still decode, so that the
    blocks need no rebuild (a copy of every entry into fresh memory: 5.2 s for a 72-row batch at
    1 thread when a 50-token answer outgrew the default room)."""
    for layer in cache.layers:
        layer.attn_impl = impl
        if layer.prefix is not None:
            layer.prefix.block_room = room


@dataclass(eq=False)
class _Lane:
    """Rows decoded by one forward: the shared batch (merged, re-packed as rows leave) or one
    cache of its own (`hook`: after every forward; finished rows stay and are fed a filler)."""

    cache: KVRayCache
    rows: list[Row]
    hook: Callable[[KVRayCache, int], None] | None = None
    forwards: int = 0


class Decoder:
    """Continuous greedy decoding over rows of different prompts (see the module docstring).

    impl: the ragged attention implementation (`kvray.runtime.attention.IMPLS`)."""

    def __init__(self, lm, *, impl: str = "auto", compact_above: float | None = None):
        ensure_kvray_attention(lm)
        #: when the batch keeps alive more than this many times the bytes its rows use (the
        #: entries and block slots of rows that left, spare tail room: `KVRayCache.referenced_nbytes`),
        #: it is compacted as it is re-packed (`KVRayCache.compact`); None: never
        self.compact_above = compact_above
        #: the torch path also holds a padded copy of every row in its attention blocks
        #: (`DecodeBlocks`); the Triton path reads the packed entries themselves
        self.blocks = resolve_impl(impl, lm.device) == "torch"
        self.lm = lm
        self.impl = impl
        #: bytes one token costs in a full cache (keys + values, every layer and KV head), and one
        #: block slot on the torch path (a key, a value and a mask entry per layer and KV head)
        self.bytes_per_token = 2 * lm.num_layers * lm.num_kv_heads * lm.head_dim * lm.dtype.itemsize
        self.bytes_per_slot = lm.num_layers * lm.num_kv_heads * (2 * lm.head_dim + 1) * lm.dtype.itemsize
        self._group = lm.config.num_attention_heads // lm.num_kv_heads  # query heads per KV head
        self._stops = frozenset(stop_token_ids(lm.tokenizer))
        self._batch: _Lane | None = None
        self._joining: list[tuple[KVRayCache, list[Row], tuple[int, ...]]] = []  # (cache, rows, tokens to feed)
        self._solo: list[_Lane] = []
        self.steps = 0
        self._finished: list[Row] = []  # rows finished since the last step() returned

    # -- rows -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def add(self, cache: KVRayCache, *, feed: Sequence[int] = (), first_logits: torch.Tensor | None = None,
            max_new_tokens: int, key: Any = None, stops: Sequence[int] | None = None,
            ignore_stop_tokens: bool = False, after_step: Callable[[KVRayCache, int], None] | None = None,
            teacher: Sequence[int] | None = None, feed_final: bool = False,
            on_token: Callable[[Row, int], None] | None = None,
            on_logits: Callable[[Row, torch.Tensor], None] | None = None) -> list[Row]:
        """Rows for every batch row of `cache` (a compressed cache of one prompt; it becomes the
        decoder's). `feed` is fed first on the cache itself (the same tokens for each of its rows);
        without it, decoding starts from `first_logits` ([vocab] or [B, vocab]). `after_step`
        (a press's decode-time hook) is called after every forward on this cache, `feed` included;
        such a cache is decoded in a lane of its own, as is one that captures queries."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        feed = [int(t) for t in feed]
        if not feed and first_logits is None:
            raise ValueError("nothing to decode from: pass the tokens to feed or the first logits")
        if teacher is not None:
            teacher = tuple(int(t) for t in teacher)
            if len(teacher) < max_new_tokens:
                raise ValueError(f"teacher has {len(teacher)} tokens for max_new_tokens={max_new_tokens}")
        stop_set = frozenset() if ignore_stop_tokens or teacher is not None else (
            self._stops if stops is None else frozenset(int(s) for s in stops))
        _prepare(cache, self.impl, 0 if after_step is not None else max_new_tokens + 1)
        B = cache.batch
        rows = [Row(key if B == 1 else (key, b), max_new_tokens, stop_set, teacher, feed_final, on_token, on_logits)
                for b in range(B)]
        solo = after_step is not None or any(layer.capture_window > 0 for layer in cache.layers)
        if not feed:
            for r, lg in zip(rows, first_logits.reshape(-1, first_logits.shape[-1]).expand(B, -1)):
                r._logits = lg
        if solo:
            lane = _Lane(cache, rows, hook=after_step)
            if feed:
                self._feed([(cache, rows)], feed, hook=after_step)
                lane.forwards = 1
            self._solo.append(lane)
        else:  # fed at the next step, together with the other rows that join with the same tokens
            self._joining.append((cache, rows, tuple(feed)))
        return rows

    def _feed(self, parts: list[tuple[KVRayCache, list[Row]]], feed: Sequence[int],
              hook: Callable[[KVRayCache, int], None] | None = None) -> KVRayCache:
        """Feed the same tokens to every row of `parts` in one forward (merged when several);
        sets each row's logits. Returns the (merged) cache."""
        rows = [r for _, rs in parts for r in rs]
        # blocks a merge builds before the feed need room for it too; one cache builds its own
        # during the feed's forward, with the fed tokens already in its tail
        room = 0 if hook is not None else _room(rows) + (len(feed) if len(parts) > 1 else 0)
        cache = parts[0][0] if len(parts) == 1 else KVRayCache.merge([c for c, _ in parts], room)
        _prepare(cache, self.impl, room)
        try:
            logits, seconds = self._forward(cache, [list(feed)] * len(rows), hook, 0)
        except Exception as exc:  # noqa: BLE001 -- these rows fail, the others go on
            self._fail(rows, exc)
            return cache
        self._credit(rows, logits, seconds)
        return cache

    def _forward(self, cache: KVRayCache, ids: list[list[int]], hook, step: int) -> tuple[torch.Tensor, float]:
        """One forward of `ids` (a list per row of `cache`), then the decode-time hook: (logits, s)."""
        t0 = time.perf_counter()
        positions = cache.next_positions() if cache.layers[0].rows is not None else None
        logits = forward(self.lm, ids, cache, positions=positions)
        if hook is not None:
            hook(cache, step)
        return logits, time.perf_counter() - t0

    @staticmethod
    def _credit(rows: list[Row], logits: torch.Tensor, seconds: float, fed: list[bool] | None = None) -> None:
        """Each fed row gets its share of the forward's time and, while decoding, its logits."""
        share = seconds / max(1, len(rows) if fed is None else sum(fed))
        # one argmax for the batch (per row, it cost 19 calls of 0.19 ms each in a 19-row step)
        best = logits.float().argmax(-1).tolist() if any(r.teacher is None for r in rows) else None
        for i, r in enumerate(rows):
            if fed is not None and not fed[i]:
                continue
            r.forwards += 1
            r.decode_s += share
            r._next = None
            if not r.done:
                r._logits = logits[i]
                r._best = None if best is None else best[i]

    @property
    def rows(self) -> list[Row]:
        """The rows not yet finished."""
        out = [r for r in (self._batch.rows if self._batch else []) if not r.done]
        out += [r for _, rows, _ in self._joining for r in rows if not r.done]
        out += [r for lane in self._solo for r in lane.rows if not r.done]
        return out

    @property
    def active(self) -> int:
        return len(self.rows)

    def row_bytes(self, cache: KVRayCache, fed: int, max_new_tokens: int) -> int:
        """Bytes the rows of `cache` (compressed, not yet added) will hold at most: the cache, the
        `fed` tokens and the ones each row generates, and on the torch path their attention
        blocks as built at their first forward (`DecodeBlocks.estimate`: each row in a group of
        its own, with room for every token it may decode; exact for a row that joins alone,
        while merged with other rows it can hold more)."""
        total = cache.nbytes() + self.bytes_per_token * (fed + max_new_tokens) * cache.batch
        if self.blocks:
            total += sum(DecodeBlocks.estimate(layer.prefix, layer.tail_length() + max(fed, 1), max_new_tokens + 1,
                                               self._group)
                         for layer in cache.layers if layer.prefix is not None)
        return int(total)

    def estimate_bytes(self, kept: float, fed: int, max_new_tokens: int) -> int:
        """`row_bytes` of a row not compressed yet: `kept` entries per (layer, KV head) assumed
        (e.g. from the target ratio), none of them padded."""
        total = self.bytes_per_token * (kept + fed + max_new_tokens)
        if self.blocks:
            total += self.bytes_per_slot * DecodeBlocks.slots(kept, max(fed, 1), max_new_tokens + 1)
        return int(total)

    def kv_bytes(self, referenced: bool = False) -> int:
        """Bytes the decoder's caches hold now (joining rows included), their attention blocks
        (the torch path's padded copy, `KVRayCache.blocks_nbytes`) too; `referenced`: the bytes
        of every tensor they keep alive (`KVRayCache.referenced_nbytes`)."""
        lanes = ([self._batch] if self._batch else []) + self._solo
        caches = [lane.cache for lane in lanes] + [c for c, _, _ in self._joining]
        if referenced:  # a storage that several caches keep alive counted once
            return sum({k: v for c in caches for k, v in c.storages().items()}.values())
        return sum(c.held_nbytes() for c in caches)

    # -- one step ---------------------------------------------------------------------------------

    def _finish(self, row: Row, reason: str, exc: BaseException | None = None) -> None:
        row.finish_reason, row.error = reason, exc
        self._finished.append(row)

    def _choose(self, row: Row) -> bool:
        """Pick the row's next token from its logits; True if it must be fed."""
        if row.done:
            return False
        if row._cancel:
            self._finish(row, "cancelled")
            return False
        logits, row._logits = row._logits, None
        best, row._best = row._best, None
        if row.on_logits is not None:
            row.on_logits(row, logits)
            best = None  # the hook may have changed them
        j = len(row.tokens)
        if row.teacher is not None:
            tok = row.teacher[j]
        else:
            tok = best if best is not None else int(logits.argmax(-1))
        if tok in row.stops:
            self._finish(row, "stop")
            return False
        row.tokens.append(tok)
        if row.on_token is not None:
            row.on_token(row, tok)
        if len(row.tokens) >= row.max_new_tokens:
            self._finish(row, "length")
            if not row.feed_final:
                return False
        row._next = tok
        return True

    def _fail(self, rows: list[Row], exc: BaseException) -> None:
        for r in rows:
            if not r.done:
                self._finish(r, "error", exc)
            elif r._next is not None:  # its last token unfed (feed_final)
                r.finish_reason, r.error = "error", exc
            r._next = None

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """One token for every active row. Returns the rows that finished in this step."""
        # the shared batch: choose, drop the rows that are done, let the new ones in, one forward
        feeding: list[Row] = []
        batch_rows = self._batch.rows if self._batch else []
        keep = []
        for i, r in enumerate(batch_rows):
            if self._choose(r):
                keep.append(i)
                feeding.append(r)
        joining = []
        groups: dict[tuple, list] = {}
        for cache, rows, feed in self._joining:
            if feed:
                groups.setdefault(feed, []).append((cache, rows))
            else:
                joining.append((cache, rows))
        for feed, group in groups.items():  # rows joining with the same tokens to feed: one forward
            cache = self._feed(group, feed)
            joining.append((cache, [r for _, rs in group for r in rs]))
        parts, new_rows = [], []
        if self._batch is not None and keep:
            cache = self._batch.cache
            parts.append(cache if len(keep) == len(batch_rows) else cache.select_rows(keep))
            new_rows += feeding
        for cache, rows in joining:
            fed = [self._choose(r) for r in rows]
            if not any(fed):
                continue
            sel = [b for b, f in enumerate(fed) if f]
            parts.append(cache if len(sel) == len(rows) else cache.select_rows(sel))
            new_rows += [rows[b] for b in sel]
        if parts:
            room = _room(new_rows)
            cache = parts[0] if len(parts) == 1 else KVRayCache.merge(parts, room)
            if self.compact_above is not None and len(keep) < len(batch_rows) and \
                    cache.referenced_nbytes() > self.compact_above * cache.held_nbytes():
                cache.compact()
            _prepare(cache, self.impl, room)
            self._batch = lane = _Lane(cache, new_rows)  # visible to rows/kv_bytes meanwhile
            self._joining = []
            self._run(lane, [r._next for r in new_rows])
            if not any(not r.done for r in lane.rows):
                self._batch = None
        else:
            self._batch, self._joining = None, []
        # lanes of their own: finished rows stay, fed a filler, until the whole lane is done
        for lane in list(self._solo):
            fed = [self._choose(r) for r in lane.rows]
            if not any(fed):
                self._solo.remove(lane)
                continue
            filler = next(iter(lane.rows[0].stops), 0) if lane.rows[0].stops else 0
            self._run(lane, [r._next if f else filler for r, f in zip(lane.rows, fed)], fed)
            if lane in self._solo and all(r.done for r in lane.rows):
                self._solo.remove(lane)
        self.steps += 1
        finished, self._finished = self._finished, []
        return finished

    def _run(self, lane: _Lane, tokens: list[int], fed: list[bool] | None = None) -> None:
        try:
            logits, seconds = self._forward(lane.cache, [[t] for t in tokens], lane.hook, lane.forwards)
        except Exception as exc:  # noqa: BLE001 -- the lane's rows fail, the others go on
            self._fail(lane.rows, exc)
            if lane in self._solo:
                self._solo.remove(lane)
            return
        lane.forwards += 1
        self._credit(lane.rows, logits, seconds, fed)

    def run(self) -> None:
        """Step until every row is done."""
        while self.active:
            self.step()

"""The compressed KV cache (real memory).

Per layer the cache holds a **static ragged prefix** -- the kept context entries, packed per
(row, KV head) with their own lengths, never re-allocated -- and a **dense growing tail** for
tokens appended afterwards (question, generated tokens), written in place into a buffer with
room for `TAIL_SLACK` more tokens (not counted by `nbytes()`, which counts entries held). Only kept entries are stored, so
`nbytes()` is the memory really held by keys and values, for uniform, per-layer and per-KV-head
budgets alike (the int64 index of original positions, one per kept entry, is not counted).

Rows of one cache may come from different prompts (the decoder's batch, `KVRayCache.merge`):
each row then has its own original positions (`RowLayout.starts`: the positions its prefix
covers) and its own tail length. The tail is one dense [B, H, T, d] tensor, **left-padded** per
row (`RowLayout.pads`): every decode step appends one token to every row, so tails grow in
lockstep and a row that joined later simply has more leading padding, masked in attention.

Two seams of transformers 5.x make it work with any `model(...)` / `model.generate(...)`:
`Cache.update(..., kwargs=attn_kwargs)` receives the very dict later splatted into the attention
function, so each layer puts itself in it (`kvray_layer`); the attention function registered
under the name ``"kvray"`` (`kvray.runtime.attention`) then attends over prefix + tail. Without
a compressed prefix it is plain SDPA, so a model set to ``"kvray"`` behaves exactly as with
``"sdpa"``.

Positions never move: `get_seq_length()` counts original positions (context length + tail), so
the model gives new tokens their true RoPE positions although fewer entries are stored; a batch
of rows from different prompts is fed with explicit `position_ids` (the decoder does that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

ATTN_IMPLEMENTATION = "kvray"
#: tokens of room a layer's tail keeps past its end (appends copy only the new tokens)
TAIL_SLACK = 64
#: a windowed (sliding) layer drops the prefix entries that fell out of its window once some
#: (row, KV head) has this many, or a quarter of the window if less (one gather every so many
#: tokens, not one per token)
WINDOW_SLACK = 32


def window_slack(window: int) -> int:
    """Out-of-window entries a windowed layer lets pile up before dropping them."""
    return max(1, min(WINDOW_SLACK, window // 4))


@dataclass(frozen=True)
class RowLayout:
    """Per-row bookkeeping of a cache whose rows come from different prompts (shared by all its
    layers: every layer has seen the same tokens).

    starts: per row, the original positions its compressed prefix covers (its prompt's length
        up to where compression happened);
    pads: per row, the leading slots of the layers' dense tail that are not its own (the tail
        is left-padded: row b's tail entries are the last T - pads[b] slots).
    """

    starts: tuple[int, ...]
    pads: tuple[int, ...]

    def tail_lengths(self, T: int) -> list[int]:
        return [T - p for p in self.pads]

    def next_positions(self, T: int) -> list[int]:
        """The original position of each row's next token when the tail holds T slots."""
        return [s + T - p for s, p in zip(self.starts, self.pads)]


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
        self._layout()

    def _layout(self) -> None:
        self.offsets = [0]
        for n in self.lengths:
            self.offsets.append(self.offsets[-1] + n)
        self._head_ids: torch.Tensor | None = None
        self.uniform = len(set(self.lengths)) <= 1  # every (row, head) holds the same count

    @property
    def head_ids(self) -> torch.Tensor:
        """[total] int16: the KV head (0..H-1) of every packed entry (built once, on demand)."""
        if self._head_ids is None:
            heads = torch.arange(self.heads, device=self.device, dtype=torch.int16).repeat(self.batch)
            counts = torch.tensor(self.lengths, device=self.device, dtype=torch.long)
            self._head_ids = torch.repeat_interleave(heads, counts)
        return self._head_ids

    def row_span(self, b: int) -> tuple[int, int]:
        """[start, end) of row b's entries (all its heads) in the packed tensors."""
        return self.offsets[b * self.heads], self.offsets[(b + 1) * self.heads]

    def row_lengths(self, b: int) -> tuple[int, ...]:
        return self.lengths[b * self.heads:(b + 1) * self.heads]

    @property
    def nbytes(self) -> int:
        if "_pending" in self.__dict__:  # what the entries will take once copied
            return sum(self.lengths) * self.entry_bytes
        return self.keys.nbytes + self.values.nbytes

    @property
    def entry_bytes(self) -> int:
        """Bytes of one entry: its key and its value."""
        src = self._source()
        return src.keys.shape[-1] * src.keys.element_size() + src.values.shape[-1] * src.values.element_size()

    def _source(self) -> "RaggedKV":
        """A RaggedKV whose tensors exist and have this one's device, dtype and dims."""
        pending = self.__dict__.get("_pending")
        return self if pending is None else pending[0][0]

    @property
    def device(self) -> torch.device:
        return self._source().keys.device

    @property
    def dtype(self) -> torch.dtype:
        return self._source().keys.dtype

    def select_rows(self, keep: Sequence[int]) -> "RaggedKV":
        """The entries of batch rows `keep` (new row i is row keep[i]), copied when first read
        (`keys`, `values`, `positions`), not now: a decode batch that a row leaves attends through
        its own blocks (`kvray.runtime.attention.DecodeBlocks`, which move to the new batch) and
        may never read them, and a chain of selections (or merges, `concat`) copies once. Until
        then the sources' tensors stay referenced (`nbytes` counts the selected entries only)."""
        parts, picked = self.__dict__.get("_pending") or ((self,), None)
        dev = self.device
        sel = torch.cat([torch.arange(*self.row_span(b), device=dev) for b in keep]) if keep else \
            torch.empty(0, dtype=torch.long, device=dev)
        return self._lazy(parts, sel if picked is None else picked.index_select(0, sel),
                          tuple(n for b in keep for n in self.row_lengths(b)), len(keep), self.heads)

    @classmethod
    def concat(cls, parts: Sequence["RaggedKV"]) -> "RaggedKV":
        """The rows of `parts` one after the other (same heads), copied when first read, like
        `select_rows`: a decode batch attends through blocks merged without a copy
        (`kvray.runtime.attention.DecodeBlocks.merge`) and may never read the packed entries."""
        if len({x.heads for x in parts}) != 1:
            raise ValueError("caches to merge must have the same KV heads")
        pending = [x.__dict__.get("_pending") or ((x,), None) for x in parts]
        sel = None
        if any(picked is not None for _, picked in pending):  # entries of the sources, in order
            sels, base = [], 0
            for xs, picked in pending:
                n = sum(y.keys.shape[0] for y in xs)
                sels.append((picked if picked is not None else torch.arange(n, device=xs[0].device)) + base)
                base += n
            sel = torch.cat(sels)
        return cls._lazy(tuple(y for xs, _ in pending for y in xs), sel,
                         tuple(n for x in parts for n in x.lengths), sum(x.batch for x in parts), parts[0].heads)

    @classmethod
    def _lazy(cls, parts: tuple["RaggedKV", ...], sel: torch.Tensor | None, lengths: tuple[int, ...], batch: int,
              heads: int) -> "RaggedKV":
        """Entries `sel` (None: all) of `parts` packed one after the other, copied at the first
        read; `parts` hold their tensors (never lazy themselves)."""
        out = object.__new__(cls)
        out.lengths, out.batch, out.heads = lengths, batch, heads
        out._pending = (parts, sel)
        out._layout()
        return out

    def pieces(self) -> list[tuple["RaggedKV", int]]:
        """(source, first packed entry) of runs that hold this prefix's entries in order, without
        copying them: the parts of a lazy `concat`, else this prefix itself."""
        pending = self.__dict__.get("_pending")
        if pending is None or pending[1] is not None:
            return [(self, 0)]
        out, at = [], 0
        for x in pending[0]:
            out.append((x, at))
            at += x.keys.shape[0]
        return out

    def __getattr__(self, name: str):
        # the entries of a lazy selection or concatenation, copied at the first read
        pending = self.__dict__.get("_pending")
        if pending is None or name not in ("keys", "values", "positions"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        parts, sel = pending
        for attr in ("keys", "values", "positions"):
            ts = [getattr(x, attr) for x in parts]
            if sel is None:  # a fresh tensor, also for one part: the sources stay as they are
                t = torch.cat(ts) if len(ts) > 1 else ts[0].clone()
            else:
                t = (torch.cat(ts) if len(ts) > 1 else ts[0]).index_select(0, sel)
            self.__dict__[attr] = t
        del self._pending
        return self.__dict__[name]

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, H, n, d] views; only when all heads hold the same count."""
        assert self.uniform
        n = self.lengths[0] if self.lengths else 0
        d = self.keys.shape[-1]
        return (self.keys.view(self.batch, self.heads, n, d), self.values.view(self.batch, self.heads, n, d))

    def row(self, b: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """[H, n, d] views of batch row b when its heads hold the same count, else None."""
        lens = self.row_lengths(b)
        if len(set(lens)) != 1:
            return None
        s, e = self.row_span(b)
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
    `rows` is set when the rows come from different prompts (see `RowLayout`); then
    `prefix_tokens` is unused and each row has its own start and tail padding.
    """

    def __init__(self, prefix: RaggedKV | None = None, prefix_tokens: int = 0, capture_window: int = 0,
                 rows: RowLayout | None = None):
        super().__init__()
        self.prefix = prefix
        self.prefix_tokens = prefix_tokens
        self.rows = rows
        self._bufs: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)  # the tail's storage
        self.attn_impl = "auto"  # ragged attention implementation (kvray.runtime.attention.IMPLS)
        self.capture_window = capture_window
        #: a sliding layer of a hybrid model keeping its window (not compressed; see
        #: PrefillState.assemble): left out of `prefix_entries` / `prefix_nbytes`
        self.window: int | None = None
        self.window_queries: torch.Tensor | None = None  # [B, Hq, <=W, d] post-RoPE, last queries seen
        self.window_positions: torch.Tensor | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        """Append to the tail in place: `keys` / `values` are views of buffers with room for
        TAIL_SLACK more tokens, so a decode step copies one token, not the whole tail (a plain
        DynamicLayer concatenates, copying every earlier token at every step)."""
        attn_kwargs = kwargs.get("kwargs")
        if isinstance(attn_kwargs, dict):
            attn_kwargs["kvray_layer"] = self
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        T, n = self.tail_length(), key_states.shape[-2]
        kb, vb = self._bufs
        # the tail still a view of the buffers (by address: `_base` is not set under inference_mode)
        views = T == 0 or (kb is not None and self.keys.data_ptr() == kb.data_ptr() and self.keys.stride() == kb.stride()
                           and self.values.data_ptr() == vb.data_ptr())
        fits = (kb is not None and views and kb.shape[:2] == key_states.shape[:2]
                and T + n <= kb.shape[2] and kb.dtype == key_states.dtype)
        if not fits:
            B, H, _, d = key_states.shape
            kb = key_states.new_empty((B, H, T + n + TAIL_SLACK, d))
            vb = value_states.new_empty((B, H, T + n + TAIL_SLACK, value_states.shape[-1]))
            if T:
                kb[:, :, :T] = self.keys
                vb[:, :, :T] = self.values
            self._bufs = (kb, vb)
            blocks = self.prefix.__dict__.get("_decode_blocks") if self.prefix is not None else None
            if blocks is not None and blocks.tail_ptr == self.keys.data_ptr():
                blocks.tail_ptr = kb.data_ptr()  # the same tail, moved: the attention's blocks still hold it
        kb[:, :, T:T + n] = key_states
        vb[:, :, T:T + n] = value_states
        self.keys, self.values = kb[:, :, :T + n], vb[:, :, :T + n]
        if self.window is not None and self.prefix is not None:
            self._drop_out_of_window(n)
        return self.keys, self.values

    def _drop_out_of_window(self, q_len: int) -> None:
        """A windowed layer's prefix entries that no query of this step or later can see (at
        positions <= earliest query - window) are dropped, once some (row, head) holds
        `window_slack` of them: the layer then holds at most max(window - 1, tail) + that slack
        entries per (row, head), the tail being the tokens since compression (transformers'
        sliding cache holds window - 1), and `nbytes()` says so."""
        prefix, T = self.prefix, self.tail_length()
        if not prefix.positions.numel():
            return
        last = self.rows.next_positions(T) if self.rows is not None else [self.prefix_tokens + T] * prefix.batch
        # positions are distinct per head, so a head holds at most limit - min + 1 dead entries:
        # most steps end here, on Python ints (the minimum is computed once per prefix)
        lowest = prefix.__dict__.get("_min_position")
        if lowest is None:
            lowest = prefix._min_position = int(prefix.positions.min())
        if max(last) - q_len - self.window - lowest + 1 < window_slack(self.window):
            return
        ends = torch.tensor(last, device=prefix.positions.device)
        bh = torch.repeat_interleave(torch.arange(len(prefix.lengths), device=ends.device),
                                     torch.tensor(prefix.lengths, device=ends.device))  # each entry's (row, head)
        dead = prefix.positions <= (ends - q_len - self.window)[bh // prefix.heads]
        if not bool(dead.any()):
            return
        per_head = torch.zeros(len(prefix.lengths), dtype=torch.long, device=ends.device)
        per_head.index_add_(0, bh, dead.long())
        if int(per_head.max()) < window_slack(self.window):
            return
        keep = (~dead).nonzero().flatten()
        lengths = tuple(n - int(k) for n, k in zip(prefix.lengths, per_head.tolist()))
        self.prefix = RaggedKV(prefix.keys.index_select(0, keep), prefix.values.index_select(0, keep),
                               prefix.positions.index_select(0, keep), lengths, prefix.batch, prefix.heads)

    def tail_length(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        if self.rows is not None:  # the furthest row (transformers only sizes masks with it)
            return max(self.rows.next_positions(self.tail_length()))
        return self.prefix_tokens + self.tail_length()

    def set_tail(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the dense tail ([B, H, T, d], T may be 0)."""
        self.device = keys.device
        self.keys, self.values = keys, values
        self._bufs = (None, None)
        self.is_initialized = True
        self._tail_replaced()

    def _tail_replaced(self) -> None:
        """The tail no longer extends the one the attention's decode blocks copied: drop them
        (`kvray.runtime.attention.DecodeBlocks`, kept with the prefix)."""
        if self.prefix is not None:
            self.prefix.__dict__.pop("_decode_blocks", None)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and -tokens_to_remove > self.tail_length():
            raise ValueError("cannot crop into the compressed prefix of a kvray cache")
        super().crop(tokens_to_remove)
        self._tail_replaced()

    def nbytes(self) -> int:
        tail = 0 if self.tail_length() == 0 else self.keys.nbytes + self.values.nbytes
        return (self.prefix.nbytes if self.prefix is not None else 0) + tail

    def _capture(self, query: torch.Tensor) -> None:
        if self.rows is not None:
            raise ValueError("query capture needs a single-prompt cache (rows of different prompts share no positions)")
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
        if self.rows is not None:
            raise ValueError("keep() evicts in a single-prompt cache; decode rows that evict while decoding alone")
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
            self.set_tail(self.keys.new_empty((B, H, 0, self.keys.shape[-1])),
                          self.values.new_empty((B, H, 0, self.values.shape[-1])))


def _merge_blocks(parts: list[KVRayLayer], tails: list[tuple[torch.Tensor, torch.Tensor]], merged: KVRayLayer,
                  room: int) -> None:
    """Give the merged layer the attention blocks of its sources (`DecodeBlocks.merge`, no copy),
    when one of them has blocks up to date with its tail; the sources without get one set built
    for all of them (with `room`, `DecodeBlocks`)."""
    found = [p.prefix.__dict__.pop("_decode_blocks", None) for p in parts]  # they move to the batch
    found = [b if b is not None and b.filled == p.tail_length() and (not p.tail_length() or b.fits(p.keys)) else None
             for b, p in zip(found, parts)]
    T = merged.tail_length()
    if T == 0 or all(b is None for b in found):
        return  # built at the first forward over the batch, once for all its rows
    from .runtime.attention import DecodeBlocks

    sets, rest, base = [], [], 0
    for b, p, (k, v) in zip(found, parts, tails):
        rows = list(range(base, base + k.shape[0]))
        base += k.shape[0]
        if b is not None:
            sets.append((b, rows, T - k.shape[2]))
        else:
            rest.append((p, k, v, rows))
    if rest:  # one set for the sources without blocks, their tails left-padded to the longest
        t = max(k.shape[2] for _, k, _, _ in rest)
        pads = [x + t - k.shape[2] for p, k, _, _ in rest for x in (p.rows.pads if p.rows is not None else [0] * k.shape[0])]
        pad = lambda x: torch.nn.functional.pad(x, (0, 0, t - x.shape[2], 0))  # noqa: E731
        built = DecodeBlocks(RaggedKV.concat([p.prefix for p, _, _, _ in rest]), torch.cat([pad(k) for _, k, _, _ in rest]),
                             torch.cat([pad(v) for _, _, v, _ in rest]), pads if any(pads) else None, room,
                             next(b.G for b in found if b is not None))
        sets.append((built, [r for _, _, _, rows in rest for r in rows], T - t))
    merged.prefix._decode_blocks = DecodeBlocks.merge(sets, merged.keys)


class KVRayCache(Cache):
    """A transformers `Cache` of `KVRayLayer`s (see module docstring)."""

    def __init__(self, layers: list[KVRayLayer]):
        super().__init__(layers=layers)

    @classmethod
    def empty(cls, num_layers: int, capture_window: int = 0) -> "KVRayCache":
        return cls([KVRayLayer(capture_window=capture_window) for _ in range(num_layers)])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def referenced_nbytes(self) -> int:
        """Bytes of the tensors this cache keeps alive: the sources of a lazily selected or merged
        prefix whole, the tail's buffers with their spare room, the attention blocks' buffers with
        the slots of rows that left. At least `held_nbytes()`; `compact` brings it
        close to that."""
        return sum(self.storages().values())

    def storages(self) -> dict[int, int]:
        """{storage address: bytes} of the tensors this cache keeps alive (`referenced_nbytes`)."""
        seen = {}
        for layer in self.layers:
            tensors = [layer.keys, layer.values] if layer.tail_length() else []
            if layer.prefix is not None:
                pending = layer.prefix.__dict__.get("_pending")
                tensors += [t for src in (pending[0] if pending else (layer.prefix,)) for t in (src.keys, src.values)]
                blocks = layer.prefix.__dict__.get("_decode_blocks")
                tensors += [t for buf in (blocks.bufs if blocks is not None else ()) for t in buf]
            seen.update((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors)
        return seen

    def compact(self) -> None:
        """Copy what the rows use out of what they keep alive (`referenced_nbytes`): a lazy
        prefix's entries now (freeing their sources), the tail without its spare room; the
        attention blocks are dropped and rebuilt, sized to the rows, at the next forward."""
        for layer in self.layers:
            if layer.prefix is not None:
                layer.prefix.keys  # noqa: B018 -- a lazy selection or merge copies its entries on this read
                layer.prefix.__dict__.pop("_decode_blocks", None)
            if layer.tail_length():
                layer.set_tail(layer.keys.clone(), layer.values.clone())

    def held_nbytes(self) -> int:
        """Bytes its rows use: the packed layout and, on the torch path, the attention blocks."""
        return self.nbytes() + self.blocks_nbytes()

    def blocks_nbytes(self) -> int:
        """Bytes of the attention blocks the torch path built for this cache's layers (a padded
        copy of each prefix and its tail, `kvray.runtime.attention.DecodeBlocks.nbytes`): held
        beside `nbytes()`, which counts the packed layout alone (all the Triton path holds)."""
        found = (layer.prefix.__dict__.get("_decode_blocks") for layer in self.layers if layer.prefix is not None)
        return sum(blocks.nbytes for blocks in found if blocks is not None)

    @classmethod
    def merge(cls, caches: list["KVRayCache"], room: int = 0) -> "KVRayCache":
        """One batch from compressed caches of possibly different prompts, lengths, budgets and
        tail lengths (each may itself be a merged batch): its rows are the rows of `caches`, in
        order. The entries are copied when first read (`RaggedKV.concat`; tails, left-padded to
        the longest, now); the sources can be dropped afterwards, and are left as they are. When
        a source's layer has attention blocks (`kvray.runtime.attention.DecodeBlocks`), the
        batch takes them over, without a copy, and builds one set for the other sources, with
        `room` tail slots to spare (the tokens its rows may still decode)."""
        if not caches:
            raise ValueError("nothing to merge")
        n_layers = {len(c.layers) for c in caches}
        if len(n_layers) != 1:
            raise ValueError(f"caches to merge have different layer counts: {sorted(n_layers)}")
        layouts = [c.layout() for c in caches]
        layers = []
        for parts in zip(*(c.layers for c in caches)):
            prefixes = [p.prefix for p in parts]
            if any(x is None for x in prefixes):
                raise ValueError("only compressed caches (with a prefix in every layer) can be merged")
            ragged = RaggedKV.concat(prefixes)
            layer = KVRayLayer(prefix=ragged)
            layer.window = parts[0].window
            T = max(p.tail_length() for p in parts)
            tails = []
            for p, x in zip(parts, prefixes):
                t = p.tail_length()
                if t:
                    k, v = p.keys, p.values
                else:
                    d = x._source().keys.shape[-1]
                    k = v = torch.empty((x.batch, x.heads, 0, d), dtype=x.dtype, device=x.device)
                tails.append((k, v))
            if T:
                layer.set_tail(torch.cat([torch.nn.functional.pad(k, (0, 0, T - k.shape[2], 0)) for k, _ in tails]),
                               torch.cat([torch.nn.functional.pad(v, (0, 0, T - v.shape[2], 0)) for _, v in tails]))
            _merge_blocks(parts, tails, layer, room)
            layers.append(layer)
        T = layers[0].tail_length()
        starts, pads = [], []
        for c, (s, p) in zip(caches, layouts):
            t = c.layers[0].tail_length()
            starts += s
            pads += [x + T - t for x in p]
        return cls._with_rows(layers, RowLayout(tuple(starts), tuple(pads)))

    def select_rows(self, keep: list[int]) -> "KVRayCache":
        """A new batch of the rows `keep` (in that order), copied; leading tail slots that no
        kept row uses are dropped."""
        starts, pads = self.layout()
        if not keep:
            raise ValueError("select_rows needs at least one row")
        T = self.layers[0].tail_length()
        trim = min(pads[b] for b in keep) if T else 0
        layers = []
        for old in self.layers:
            x = old.prefix
            if x is None:
                raise ValueError("select_rows needs a compressed cache")
            ragged = x.select_rows(keep)  # copied when read: the attention's blocks move without a copy
            layer = KVRayLayer(prefix=ragged)
            layer.window = old.window
            if T:
                rows = torch.tensor(keep, device=old.keys.device)
                layer.set_tail(old.keys.index_select(0, rows)[:, :, trim:], old.values.index_select(0, rows)[:, :, trim:])
                # the attention's decode blocks move to the new batch without a rebuild; this
                # batch, if used again, rebuilds its own (kvray.runtime.attention.DecodeBlocks)
                blocks = x.__dict__.pop("_decode_blocks", None)
                if blocks is not None and blocks.filled == T and blocks.fits(old.keys):
                    ragged._decode_blocks = blocks.select(keep, trim, layer.keys)
            layers.append(layer)
        return self._with_rows(layers, RowLayout(tuple(starts[b] for b in keep), tuple(pads[b] - trim for b in keep)))

    @classmethod
    def _with_rows(cls, layers: list[KVRayLayer], rows: RowLayout) -> "KVRayCache":
        if len(set(rows.starts)) == 1 and not any(rows.pads):  # one prompt's layout: the plain form
            for layer in layers:
                layer.prefix_tokens = rows.starts[0]
        else:
            for layer in layers:
                layer.rows = rows
        return cls(layers)

    def layout(self) -> tuple[list[int], list[int]]:
        """(starts, pads) per row (see `RowLayout`), also for a single-prompt cache."""
        first = self.layers[0]
        if first.rows is not None:
            return list(first.rows.starts), list(first.rows.pads)
        B = first.prefix.batch if first.prefix is not None else (first.keys.shape[0] if first.tail_length() else 1)
        return [first.prefix_tokens] * B, [0] * B

    def next_positions(self) -> list[int]:
        """Per row, the original position of its next token."""
        starts, pads = self.layout()
        T = self.layers[0].tail_length()
        return [s + T - p for s, p in zip(starts, pads)]

    @property
    def batch(self) -> int:
        return len(self.layout()[0])

    def prefix_nbytes(self) -> int:
        """Bytes of the compressed layers' kept entries (windowed layers apart: `window_nbytes`)."""
        return sum(layer.prefix.nbytes for layer in self.layers if layer.prefix is not None and layer.window is None)

    def prefix_entries(self) -> int:
        """Entries the compressed layers keep (over (row, KV head)); windowed layers left out."""
        return sum(sum(layer.prefix.lengths) for layer in self.layers if layer.prefix is not None and layer.window is None)

    def window_nbytes(self) -> int:
        """Bytes the windowed (sliding, uncompressed) layers of a hybrid model hold in their prefix."""
        return sum(layer.prefix.nbytes for layer in self.layers if layer.prefix is not None and layer.window is not None)



"""The attention dispatch: the function transformers calls for attention implementation
``"kvray"``, and ragged attention over a compressed layer (prefix + tail) with
``impl="auto" | "torch" | "triton"``.

`ragged_attention_torch` is the runtime's CPU path and the twin of the Triton kernel
(`kvray.kernels.ragged_attention`, chosen by `impl="auto"` on CUDA), its test oracle.
Layout it reads (see `kvray.cache`): per layer, the kept entries packed over (row, KV head),
b-major ([total, d], lengths per (row, head)), and a dense tail [B, H, T, d] left-padded per row.
Rows of similar length (`GROUP_SPREAD`) share a padded block that also holds
their tail (`DecodeBlocks`: a copy made once per batch and appended to at every step, cheaper on
a CPU than gathers or one small matmul per row, where op overhead and memory traffic dominate):
one SDPA call per group (plain matmuls under soft-capping), no Python loop over rows or heads.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
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


def _probs(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Softmax over the last dim, returned in `dtype`. torch's softmax of bf16/fp16 scores
    accumulates in fp32 and rounds once, so no fp32 copy of the scores is made. Measured in bf16 on
    this project's CPU: 2.7x faster for a decode step's [57, 3, 600] scores and bit-identical there;
    within 1 ulp of an explicit fp32 softmax on 74 of a question feed's 7.7M probabilities."""
    return torch.softmax(scores, dim=-1).to(dtype)


def _two_block(qg, pk, pv, tk, tv, tail_mask, scaling, prefix_bias=None, softcap=None):
    """Softmax attention of grouped queries qg [..., R, d] over prefix (pk, pv) [..., n, d] and
    tail (tk, tv) [..., T, d] at once, without concatenating the (large) prefix. `tail_mask`
    (True = attend; None: all) hides the tail's future and padding; `prefix_bias` (0 / -inf,
    broadcast over R) hides padding of a padded prefix. Scores are softmaxed in fp32 (`_probs`)."""
    sp = _scores(qg, pk, scaling, prefix_bias, softcap)
    st = _scores(qg, tk, scaling, softcap=softcap)
    if tail_mask is not None:
        st = st.masked_fill(~tail_mask, float("-inf"))
    probs = _probs(torch.cat([sp, st], dim=-1), qg.dtype)
    n = pk.shape[-2]
    return torch.matmul(probs[..., :n], pv) + torch.matmul(probs[..., n:], tv)


def _packed_row(qg, keys, values, bias, tk, tv, tail_mask, scaling, softcap=None):
    """One row whose KV heads hold different counts: qg [H, R, d] over its packed entries
    keys/values [E, d] (`bias` [H*R, E] hides the entries of other heads) and its tail tk/tv
    [H, T, d]: one matmul of every query head against every entry (H times the dot products,
    one op instead of H)."""
    H, R, d = qg.shape
    E = keys.shape[0]
    sp = _scores(qg.reshape(H * R, d), keys, scaling, bias, softcap)  # [H*R, E]
    st = _scores(qg, tk, scaling, softcap=softcap)
    if tail_mask is not None:
        st = st.masked_fill(~tail_mask, float("-inf"))
    probs = _probs(torch.cat([sp, st.reshape(H * R, -1)], dim=-1), qg.dtype)
    out = torch.matmul(probs[:, :E], values).view(H, R, d)
    return out + torch.matmul(probs[:, E:].view(H, R, -1), tv)


#: rows whose longest head holds at most this many times the entries of the group's shortest
#: share one padded block (`DecodeBlocks`)
GROUP_SPREAD = 1.5
#: tail slots a decode block (`DecodeBlocks`) keeps free beyond the tail it was built with when
#: the decoder does not say how many tokens its rows may still decode (`RaggedKV.block_room`;
#: at most `MAX_BLOCK_ROOM` then): a rebuild copies every entry of the batch into fresh memory
BLOCK_ROOM = 32
MAX_BLOCK_ROOM = 256
#: the cost of a binned layout (`_plan`) beyond its columns, in padded columns of one round of
#: SDPA's threads: its query and output gathers and wider mask (measured with 3 KV heads, 2
#: threads: 13 us a call, as much as about 450 columns; 600 leaves the close calls plain)
BIN_OVERHEAD = 600
#: a column costs as much as this many query rows on it: a bin's Hb x G query rows make each of
#: its columns (BIN_COLUMN_ROWS + Hb x G) / (BIN_COLUMN_ROWS + G) as dear as a plain head's
#: (3 KV heads x 3 query heads, six rows: a bin of all three heads read a column at 1.2x)
BIN_COLUMN_ROWS = 27
#: tests: force this many bins per row (at most H - 1) whenever the heads' lengths differ (None:
#: `_plan` chooses)
FORCE_BINS: int | None = None


def _room_slots(room: int) -> int:
    """Free tail slots a block keeps: what the decoder asks for (`room`, up to `MAX_BLOCK_ROOM`),
    else `BLOCK_ROOM`."""
    return min(room, MAX_BLOCK_ROOM) if room > 0 else BLOCK_ROOM


def _length_groups(prefix: RaggedKV) -> list[list[int]]:
    """Rows of `prefix` in groups of similar length (`GROUP_SPREAD`, by their longest head),
    shortest first."""
    longest = [max(prefix.row_lengths(b)) for b in range(prefix.batch)]
    groups, cur = [], []
    for b in sorted(range(prefix.batch), key=lambda b: longest[b]):
        if cur and longest[b] > GROUP_SPREAD * max(longest[cur[0]], 1):
            groups.append(cur)
            cur = []
        cur.append(b)
    return groups + [cur] if cur else groups


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How a group's rows lie in its block: V bins per row of Hb head slots each; per row, its
    heads' bins (`members[row][bin]`: the heads, in slot order); P entry columns per bin.
    Plain (V = H, Hb = 1, head h in bin h): every head padded to the longest."""

    V: int
    Hb: int
    P: int
    members: tuple[tuple[tuple[int, ...], ...], ...]

    @property
    def binned(self) -> bool:
        return self.Hb > 1

    def mask_rows(self, G: int) -> int:
        """Mask rows per bin: one per query head when binned (G per head slot), else one."""
        return self.Hb * G if self.binned else 1


def _bins(lengths: tuple[int, ...], V: int, Hb: int) -> tuple[tuple[int, ...], ...]:
    """The heads of one row in V bins of at most Hb: longest first, each into the lightest bin
    with a free slot (fewest heads on a tie, so that no bin stays empty)."""
    members, total = [[] for _ in range(V)], [0] * V
    for h in sorted(range(len(lengths)), key=lambda h: -lengths[h]):
        v = min((v for v in range(V) if len(members[v]) < Hb), key=lambda v: (total[v], len(members[v])))
        members[v].append(h)
        total[v] += lengths[h]
    return tuple(tuple(m) for m in members)


def _plan(lengths: list[tuple[int, ...]], tail: int, G: int = 1) -> _Plan:
    """The layout of a group of rows (`lengths`: per row, its heads' entry counts) with `tail`
    tail slots and `G` query heads per KV head. Padding every head to the group's longest is
    plain; when heads differ, packing them into V < H bins (a bin holds its heads' entries one
    after the other, then their tail slots interleaved) reads fewer padded columns. SDPA's CPU kernel spends the same time on a
    masked column as on a real one and shares (row, bin) pairs among its threads, so a layout
    costs about ceil(rows x bins / threads) x the widest bin, and bins their own overhead
    (`BIN_OVERHEAD`, `BIN_COLUMN_ROWS`): worth it for long, uneven heads (adakv@0.75 at 4k tokens,
    one row, 3 KV heads on 2 threads: 20 of 30 layers take two bins, which read about as much
    as a uniform prefix where plain read 1.34x), not for short ones."""
    n, H = len(lengths), len(lengths[0])
    longest = max(max(x) for x in lengths)
    plain = _Plan(H, 1, longest, tuple(tuple((h,) for h in range(H)) for _ in lengths))
    if H == 1 or all(len(set(x)) == 1 for x in lengths):  # no row has a head to spare
        return plain
    threads = max(torch.get_num_threads(), 1)
    best, cost = plain, math.ceil(n * H / threads) * (longest + tail)
    for V in ([min(FORCE_BINS, H - 1)] if FORCE_BINS else range(H - 1, 0, -1)):
        Hb = -(-H // V)
        members = tuple(_bins(x, V, Hb) for x in lengths)
        P = max(sum(x[h] for h in m) for x, row in zip(lengths, members) for m in row)
        rows = (BIN_COLUMN_ROWS + Hb * G) / (BIN_COLUMN_ROWS + G)
        c = math.ceil(n * V / threads) * (P + Hb * tail) * rows + BIN_OVERHEAD
        if FORCE_BINS or c < cost:
            best, cost = _Plan(V, Hb, P, members), c
    return best


@dataclasses.dataclass(frozen=True)
class _Group:
    """Rows that attend together (one SDPA call): rows [first, first + n) in block order, in
    buffer `buf` from key slot `off` and mask entry `boff`, laid out as `plan` says; W columns
    per bin; tail slot t of a bin's head slot j lies in column P + (shift + t) * Hb + j.
    Binned: `qsel` picks the query rows of each (row, bin, slot) out of [n * H] (a slot no head
    fills repeats the bin's first head, masked out), `osel` each (row, head)'s output out of
    [n * V * Hb]; the mask holds a row per query head (G per slot), else one per head."""

    first: int
    n: int
    buf: int
    off: int
    boff: int
    P: int
    W: int
    shift: int
    V: int
    Hb: int
    rows: int  # mask rows per bin: 1 (plain) or Hb * G
    qsel: torch.Tensor | None = None
    osel: torch.Tensor | None = None

    def take(self, r0: int, m: int, first: int, H: int, trim: int) -> "_Group":
        """Its rows [r0, r0 + m), as a group of their own starting at block row `first`, their
        tail's first `trim` slots dropped."""
        qsel = osel = None
        if self.qsel is not None:
            qsel = self.qsel.view(self.n, -1)[r0:r0 + m].reshape(-1) - r0 * H
            osel = self.osel.view(self.n, -1)[r0:r0 + m].reshape(-1) - r0 * self.V * self.Hb
        return dataclasses.replace(self, first=first, n=m, off=self.off + r0 * self.V * self.W,
                                   boff=self.boff + r0 * self.V * self.rows * self.W, shift=self.shift + trim,
                                   qsel=qsel, osel=osel)


class DecodeBlocks:
    """A non-uniform prefix and its tail laid out for attention on the torch path: rows of
    similar length (`_length_groups`) share a block [n, V, W, d] of V bins per row. Plain
    (V = H), a bin is a KV head: its entries padded to the group's longest head P, then its tail
    slots. When heads differ enough (`_plan`), a row's heads are packed into V < H bins: a bin
    holds its heads' entries one after the other (padded to the group's widest bin P), then
    their tail slots interleaved, and its mask has a row per query head. Room for as many more
    tail slots as `room` asks (the tokens the rows may still decode; at most `MAX_BLOCK_ROOM`),
    or `BLOCK_ROOM` when it asks none. The blocks lie in flat buffers (one when built, one per
    source batch after `merge`), so a decode step appends every row's new key and value with one
    `index_copy_` per buffer, and a group attends with one SDPA call (padding, other heads'
    columns, free room and the tail's left padding masked by an additive bias; a feed of several
    tokens adds the causal mask): no gathers of entries, no concatenation, no separate tail, no
    loop over rows or heads.

    Built at the first forward over a batch (the feed of the question, or the first decode
    step) and kept with its prefix: a padded copy of the entries, held while the batch lives,
    not in `nbytes()` (which counts the packed layout, all the Triton path holds) but in
    `KVRayCache.blocks_nbytes()`. Rebuilt when the tail outgrows its room or is replaced
    (`KVRayLayer.set_tail` / `crop` drop it). Rows leaving the batch (`KVRayCache.select_rows`)
    take no rebuild: `select` keeps the other rows' slots where they lie; batches merged into
    one (`KVRayCache.merge`) keep theirs too (`merge`).

    Per (row, KV head), in row order: `head0` the key slot of its entry 0, `tail0` of its tail
    slot 0, `btail0` the mask entry of its tail slot 0 (its first mask row), `step` the slots
    between two of its tail slots (the bin's Hb) and `brow` between two of its mask rows (W, or
    0 when its bin has one mask row)."""

    def __init__(self, prefix: RaggedKV, tail_k: torch.Tensor, tail_v: torch.Tensor, pads, room: int = 0,
                 G: int = 1):
        B, H, T, d = tail_k.shape
        dev, dtype = prefix.device, prefix.dtype
        room = T + _room_slots(room)
        self.G = G
        order, self.groups = [], []
        n_bh = B * H
        head0, tail0, bhead0, btail0, step, brow = ([0] * n_bh for _ in range(6))
        slot = bslot = 0
        for rows in _length_groups(prefix):
            plan = _plan([prefix.row_lengths(b) for b in rows], T, G)
            V, Hb, P = plan.V, plan.Hb, plan.P
            W = P + Hb * room
            mrows = plan.mask_rows(G)
            qsel, osel = [], []
            for i, b in enumerate(rows):
                lengths = prefix.row_lengths(b)
                out_of = [0] * H
                for v, heads in enumerate(plan.members[i]):
                    col = 0
                    for j in range(Hb):
                        h = heads[j] if j < len(heads) else heads[0]
                        qsel.append(i * H + h)
                        if j >= len(heads):
                            continue
                        bh = b * H + h
                        out_of[h] = (i * V + v) * Hb + j
                        head0[bh] = slot + (i * V + v) * W + col
                        tail0[bh] = slot + (i * V + v) * W + P + j
                        base = bslot + ((i * V + v) * mrows + j * (mrows // Hb)) * W
                        bhead0[bh], btail0[bh] = base + col, base + P + j
                        step[bh], brow[bh] = Hb, W if mrows > 1 else 0
                        col += lengths[h]
                osel += out_of
            sel = (torch.tensor(qsel, device=dev), torch.tensor(osel, device=dev)) if plan.binned else (None, None)
            self.groups.append(_Group(len(order), len(rows), 0, slot, bslot, P, W, 0, V, Hb, mrows, *sel))
            order += rows
            slot += len(rows) * V * W
            bslot += len(rows) * V * mrows * W
        self._set_order(order, dev)
        self.tail0, self.head0, self.btail0 = (torch.tensor(x, device=dev) for x in (tail0, head0, btail0))
        self.step, self.brow = torch.tensor(step, device=dev), torch.tensor(brow, device=dev)
        self.plain = all(g.Hb == 1 for g in self.groups)  # mask entries lie as the keys do
        lengths = torch.tensor(prefix.lengths, device=dev)
        at = torch.arange(sum(prefix.lengths), device=dev) - torch.repeat_interleave(
            torch.tensor(prefix.offsets[:-1], device=dev), lengths)  # each entry's index in its head
        dst = torch.repeat_interleave(self.head0, lengths) + at
        keys = torch.zeros((slot, d), dtype=dtype, device=dev)  # zeros: padding must stay finite
        values = torch.zeros((slot, tail_v.shape[-1]), dtype=dtype, device=dev)
        bias = torch.full((bslot,), float("-inf"), dtype=dtype, device=dev)
        for src, start in prefix.pieces():  # the parts of a merged batch, copied from where they lie
            part = dst[start:start + src.keys.shape[0]]
            keys.index_copy_(0, part, src.keys)
            values.index_copy_(0, part, src.values)
        if self.plain:
            bias.index_fill_(0, dst, 0.0)
        else:
            bdst = torch.repeat_interleave(torch.tensor(bhead0, device=dev), lengths) + at
            bias.index_fill_(0, self._mask_rows(bdst, torch.repeat_interleave(self.brow, lengths)), 0.0)
        self.bufs = [(keys, values, bias)]
        self.buf_rows = None  # per buffer, its rows (a tensor) when there are several
        self.room, self.filled, self.tail_ptr = room, 0, tail_k.data_ptr()
        self.append(tail_k, tail_v, pads)

    def _mask_rows(self, idx: torch.Tensor, brow: torch.Tensor) -> torch.Tensor:
        """Mask entries `idx` [...] (of their first mask row) in every mask row of their bin slot
        (`brow` apart; G rows, the same entry G times where `brow` is 0) -> [..., G] flattened."""
        return (idx[..., None] + brow[..., None] * torch.arange(self.G, device=idx.device)).reshape(-1)

    @property
    def nbytes(self) -> int:
        """Bytes of its rows' slots (a key and a value each) and mask entries. Like the packed
        prefix's `nbytes` after `select_rows`, the slots of rows that left are not counted:
        their buffer stays referenced until the next rebuild."""
        keys, values, bias = self.bufs[0]
        kv = keys[0].nbytes + values[0].nbytes
        return sum(g.n * g.V * g.W * (kv + g.rows * bias[0].nbytes) for g in self.groups)

    @staticmethod
    def estimate(prefix: RaggedKV, tail: int, room: int, G: int = 1) -> int:
        """Bytes the blocks of `prefix` take when built over `tail` tail slots with `room` asked
        for, each row in a group of its own (as a row joining a decode batch builds them; `G`
        query heads per KV head): per row, its bins (`_plan`), each as wide as its entries plus
        the tail and room of its heads, a key and a value per column and a mask entry per column
        and mask row."""
        kv, item = prefix.entry_bytes, prefix.dtype.itemsize
        total = 0
        for b in range(prefix.batch):
            plan = _plan([prefix.row_lengths(b)], tail, G)
            W = plan.P + plan.Hb * (tail + _room_slots(room))
            total += plan.V * W * (kv + plan.mask_rows(G) * item)
        return total

    @staticmethod
    def slots(longest: int, tail: int, room: int) -> int:
        """Slots per KV head of a uniform row's block: its heads' length, the tail it is built
        over and the room asked for (`_room_slots`)."""
        return longest + tail + _room_slots(room)

    def _set_order(self, order: list[int], dev) -> None:
        self.order = order  # the rows in block order
        self.perm = None if order == list(range(len(order))) else torch.tensor(order, device=dev)
        self.inv = None if self.perm is None else torch.argsort(self.perm)

    def _set_buf_rows(self, dev) -> None:
        """Which rows lie in which buffer (for appends), from the groups."""
        if len(self.bufs) == 1:
            self.buf_rows = None
            return
        rows = [[] for _ in self.bufs]
        for g in self.groups:
            rows[g.buf] += self.order[g.first:g.first + g.n]
        self.buf_rows = [torch.tensor(sorted(r), dtype=torch.long, device=dev) for r in rows]

    def select(self, keep: list[int], trim: int, tail_k: torch.Tensor) -> "DecodeBlocks":
        """The blocks of rows `keep` (new row i is row keep[i]) after their tail lost its first
        `trim` slots (`KVRayCache.select_rows`), without copying: the kept rows' slots stay where
        they lie, a group is split where a row left it, and the slots of the rows that left go
        unused (a buffer that none of the kept rows lies in is let go). `tail_k` is the new tail.
        The blocks move to the result; this object must not be used again."""
        H = self.tail0.numel() // len(self.order)
        new_of = {b: i for i, b in enumerate(keep)}
        groups, order = [], []
        for g in self.groups:  # each run of kept rows: a group
            for kept, run in itertools.groupby(range(g.n), key=lambda i: self.order[g.first + i] in new_of):
                if kept:
                    run = list(run)
                    groups.append(g.take(run[0], len(run), len(order), H, trim))
                    order += [new_of[self.order[g.first + i]] for i in run]
        out = object.__new__(DecodeBlocks)
        dev = self.tail0.device
        used = sorted({g.buf for g in groups})  # a buffer no row uses any more is let go
        renum = {b: i for i, b in enumerate(used)}
        out.groups = [dataclasses.replace(g, buf=renum[g.buf]) for g in groups]
        out._set_order(order, dev)
        rows = torch.tensor(keep, device=dev)
        pick = lambda x: x.view(-1, H).index_select(0, rows).reshape(-1)  # noqa: E731
        out.G, out.plain = self.G, self.plain
        out.step, out.brow, out.head0 = pick(self.step), pick(self.brow), pick(self.head0)
        out.tail0 = pick(self.tail0) + trim * out.step
        out.btail0 = pick(self.btail0) + trim * out.step
        out.bufs = [self.bufs[b] for b in used]
        out._set_buf_rows(dev)
        out.room, out.filled = self.room - trim, self.filled - trim
        out.tail_ptr = tail_k.data_ptr()
        return out

    @classmethod
    def merge(cls, parts: list[tuple["DecodeBlocks", list[int], int]], tail_k: torch.Tensor) -> "DecodeBlocks":
        """The blocks of batches merged into one (`KVRayCache.merge`), without copying: per part,
        its blocks (up to date with its tail), the merged rows they hold (their row i is merged
        row rows[i]) and the left padding `pad` its tail took in the merged tail `tail_k`. The
        blocks move to the result."""
        out = object.__new__(cls)
        B, H = tail_k.shape[:2]
        dev = tail_k.device
        groups, order, bufs = [], [], []
        out.G = parts[0][0].G
        out.plain = all(b.plain for b, _, _ in parts)
        out.tail0, out.head0, out.btail0, out.step, out.brow = (torch.empty(B * H, dtype=torch.long, device=dev)
                                                                for _ in range(5))
        for blocks, rows, pad in parts:
            nb = len(bufs)
            for g in blocks.groups:  # merged tail slot t: the part's slot t - pad
                groups.append(dataclasses.replace(g, first=g.first + len(order), buf=g.buf + nb, shift=g.shift - pad))
            order += [rows[b] for b in blocks.order]
            at = (torch.tensor(rows, device=dev)[:, None] * H + torch.arange(H, device=dev)).reshape(-1)
            out.tail0[at] = blocks.tail0 - pad * blocks.step
            out.btail0[at] = blocks.btail0 - pad * blocks.step
            out.head0[at], out.step[at], out.brow[at] = blocks.head0, blocks.step, blocks.brow
            bufs += blocks.bufs
        out.groups, out.bufs = groups, bufs
        out._set_order(order, dev)
        out._set_buf_rows(dev)
        T = tail_k.shape[2]
        out.filled = T
        out.room = T + min(b.room - b.filled for b, _, _ in parts)
        out.tail_ptr = tail_k.data_ptr()
        return out

    def fits(self, tail_k: torch.Tensor) -> bool:
        T = tail_k.shape[2]
        return tail_k.data_ptr() == self.tail_ptr and self.filled <= T <= self.room

    def _tail_slots(self, t: torch.Tensor, rows: torch.Tensor | None = None):
        """Key slots [n * H * len(t)] and mask entries [(n, H, len(t), G)] of tail slots `t` of
        rows `rows` (all when None), row-major."""
        pick = (lambda x: x) if rows is None else (lambda x: x.view(-1, self.step.numel() // len(self.order))
                                                   .index_select(0, rows).reshape(-1))
        step = pick(self.step)[:, None] * t
        dst = (pick(self.tail0)[:, None] + step).reshape(-1)
        if self.plain:
            return dst, dst
        bdst = pick(self.btail0)[:, None] + step
        return dst, self._mask_rows(bdst, pick(self.brow)[:, None].expand_as(bdst))

    def append(self, tail_k: torch.Tensor, tail_v: torch.Tensor, pads=None) -> None:
        """Copy the tail slots [filled, T) of every (row, head) into the blocks and unmask them
        (a row's left padding, slots < pads[row], stays masked)."""
        B, H, T, d = tail_k.shape
        new = T - self.filled
        if new <= 0:
            return
        if new == 1 and self.buf_rows is None and not pads:  # a decode step: two index ops
            keys, values, bias = self.bufs[0]
            dst = torch.add(self.tail0, self.step, alpha=self.filled)
            keys.index_copy_(0, dst, tail_k[:, :, self.filled].reshape(-1, d))
            values.index_copy_(0, dst, tail_v[:, :, self.filled].reshape(-1, tail_v.shape[-1]))
            if not self.plain:
                if "_bias_tail" not in self.__dict__:  # every mask row of each (row, head)'s tail slot 0
                    self._bias_tail = (self._mask_rows(self.btail0, self.brow), self.step.repeat_interleave(self.G))
                dst = torch.add(*self._bias_tail, alpha=self.filled)
            bias.index_fill_(0, dst, 0.0)
            self.filled = T
            return
        t = torch.arange(self.filled, T, device=tail_k.device)
        if self.buf_rows is None:
            parts = [(self.bufs[0], None, tail_k, tail_v)]
        else:  # one copy per buffer, of its rows
            parts = [(buf, rows, tail_k.index_select(0, rows), tail_v.index_select(0, rows))
                     for buf, rows in zip(self.bufs, self.buf_rows) if rows.numel()]
        for (keys, values, bias), rows, tk, tv in parts:
            n = tk.shape[0]
            dst, bdst = self._tail_slots(t, rows)  # [(b, h, t)], [(b, h, t, g)]
            keys.index_copy_(0, dst, tk[:, :, self.filled:].reshape(-1, d))
            values.index_copy_(0, dst, tv[:, :, self.filled:].reshape(-1, tv.shape[-1]))
            own_pads = pads if rows is None or pads is None else [pads[b] for b in rows.tolist()]
            if own_pads is not None and any(p > self.filled for p in own_pads):
                own = (t[None, :] >= torch.tensor(own_pads, device=t.device)[:, None])  # [n, new]
                bdst = bdst.view(n, H, new, -1)[own[:, None, :, None].expand(n, H, new, bdst.numel() // dst.numel())]
            bias.index_fill_(0, bdst, 0.0)
        self.filled = T

    def absorb_tail(self, bh: torch.Tensor, j: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    tail_k: torch.Tensor) -> bool:
        """The prefix changed in place and took in the tail (MorphKV's ring step): prefix entry
        j[i] of (row, head) bh[i] now holds keys[i] / values[i], and the tail is empty; `tail_k`
        is the buffer its next tokens go to. The blocks follow without a rebuild; False (nothing
        done) when they lie in several buffers."""
        if len(self.bufs) > 1:
            return False
        kb, vb, bias = self.bufs[0]
        dst = self.head0[bh] + j
        kb.index_copy_(0, dst, keys)
        vb.index_copy_(0, dst, values)
        if self.filled:
            bias.index_fill_(0, self._tail_slots(torch.arange(self.filled, device=dst.device))[1], float("-inf"))
        self.filled = 0
        self.tail_ptr = tail_k.data_ptr()
        return True

    def attend(self, qg: torch.Tensor, q_len: int, scaling: float, softcap: float | None) -> torch.Tensor:
        """qg [B, H, R, d], R = G * q_len rows per KV head (row g * q_len + i: query i, the
        tail's slot T - q_len + i) -> [B, H, R, d].

        A group attends through SDPA, its bias as the mask (a feed of several tokens adds the
        causal part on the new slots' columns), or with soft-capping, which SDPA lacks, through
        the plain matmuls. Why SDPA: a batch's groups change shape whenever a row leaves or
        joins, and bf16 `bmm` on a CPU builds a new oneDNN kernel for each new shape, about 0.6 ms
        per op (a decode step of 40 rows cost 0.74 s after rows left, 0.17 s before), while
        SDPA's CPU kernel works in fixed-size tiles; it is also 4x faster for a question feed's
        135 query rows per head (15 vs 65 ms a layer for 57 rows), and keeps the scores in fp32."""
        B, H, R, d = qg.shape
        q = qg if self.perm is None else qg.index_select(0, self.perm)
        out = torch.empty_like(q)
        if q_len > 1:  # query i (row g * q_len + i) sees the new slots T - q_len + j for j <= i only
            j = torch.arange(q_len, device=q.device)
            future = j[None, :] > j.repeat(R // q_len)[:, None]  # [R, q_len]
        for g in self.groups:
            # the block's columns up to its last tail slot, a strided view that SDPA takes as it
            # lies: the free room is not read (13% of the slots in the 19-config grid)
            keys, values, bias = self.bufs[g.buf]
            n, V, W, Hb = g.n, g.V, g.W, g.Hb
            end = g.P + (g.shift + self.filled) * Hb
            k = keys[g.off:g.off + n * V * W].view(n, V, W, d)[:, :, :end]
            v = values[g.off:g.off + n * V * W].view(n, V, W, -1)[:, :, :end]
            mask = bias[g.boff:g.boff + n * V * g.rows * W].view(n, V, g.rows, W)[..., :end]
            qb = q[g.first:g.first + n]
            if g.qsel is not None:  # each bin's query rows: its head slots' G * q_len each
                qb = qb.reshape(n * H, R, d).index_select(0, g.qsel).view(n, V, Hb * R, d)
            if q_len > 1:  # the causal mask touches only the new slots' columns
                if g.rows == 1:
                    mask = mask.expand(n, V, R, end).clone()
                else:  # a mask row per query head, repeated for each query
                    mask = mask.view(n, V, Hb, self.G, 1, end).expand(n, V, Hb, self.G, q_len, end).reshape(
                        n, V, Hb * R, end)
                c0 = end - q_len * Hb  # the first new slot's column (slot j of the bin: c0 + j, every Hb)
                for s in range(Hb):
                    mask[:, :, s * R:(s + 1) * R, c0 + s::Hb].masked_fill_(future, float("-inf"))
            if softcap is None:
                o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scaling)
            else:
                o = torch.matmul(_probs(_capped(torch.matmul(qb, k.transpose(-1, -2)).mul_(scaling), softcap) + mask,
                                        q.dtype), v)
            if g.osel is not None:
                o = o.reshape(n * V * Hb, R, d).index_select(0, g.osel).view(n, H, R, d)
            out[g.first:g.first + n] = o
        return out if self.inv is None else out.index_select(0, self.inv)


def decode_blocks(prefix: RaggedKV, tail_k: torch.Tensor, tail_v: torch.Tensor, pads, G: int = 1) -> DecodeBlocks:
    """The prefix's `DecodeBlocks`, brought up to the tail (built or rebuilt when needed; `G`
    query heads per KV head)."""
    blocks = prefix.__dict__.get("_decode_blocks")
    if blocks is None or not blocks.fits(tail_k):
        blocks = prefix._decode_blocks = DecodeBlocks(prefix, tail_k, tail_v, pads,
                                                      prefix.__dict__.get("block_room", 0), G)
    else:
        blocks.append(tail_k, tail_v)
    return blocks


def ragged_attention_torch(query: torch.Tensor, prefix: RaggedKV, tail_k: torch.Tensor, tail_v: torch.Tensor,
                           scaling: float, pads: tuple[int, ...] | None = None,
                           softcap: float | None = None) -> torch.Tensor:
    """Attention of `query` [B, Hq, q, d] over a ragged prefix (fully visible) and a dense tail
    [B, H, T, d] that already holds the q new tokens as its last slots (seen causally); row b
    ignores its first `pads[b]` tail slots; `softcap`: logit soft-capping. Returns [B, q, Hq, d].
    Through the prefix's `DecodeBlocks`, uniform or not: a uniform prefix attended as it lies
    (prefix and tail apart, `_two_block`) decoded 9% slower at 4k tokens (snapkv@0.75: 39.4 vs
    36.0 ms a token), for one copy of the entries per batch."""
    B, Hq, q_len, d = query.shape
    H = prefix.heads
    G = Hq // H
    padded = pads is not None and any(pads)
    qg = query.reshape(B, H, G * q_len, d)
    out = decode_blocks(prefix, tail_k, tail_v, pads if padded else None, G).attend(qg, q_len, scaling, softcap)
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

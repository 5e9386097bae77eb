"""The runtime's decoder and ragged attention: rows of different prompts, lengths, methods,
per-head budgets and protocols decoded together give each row the tokens it gets alone."""

from __future__ import annotations

import math

import pytest
import torch

import kvray
from kvray.cache import KVRayCache, KVRayLayer, RaggedKV, RowLayout
from kvray.generate import compress
from kvray.runtime import Decoder, build_prompt, capture_window_for, hidden_needed_for, prefill, ragged_attention
from kvray.runtime.attention import ragged_attention_torch, resolve_impl
from test_cache import dense_masked_reference

WORDS = ("The river was quiet that morning. Ships waited at the dock while the clerk counted crates. "
         "A tall man asked for the key to room seven, and nobody answered him. ")


LAYOUTS = {  # per (row, head) lengths, H = 2
    "uniform": [5] * 6,
    "skewed": [1, 9, 4, 4, 7, 2],
    "empty_head": [0, 6, 3, 3, 5, 1],
    # rows of similar length are attended together, padded (and a long row alone)
    "grouped": [4, 6, 5, 5, 3, 6, 0, 6, 30, 2, 6, 4],
}


#: H = 3: packed into 2 bins of 2 head slots, one slot of a bin left empty
THREE_HEADS = [1, 9, 4, 7, 2, 5, 0, 3, 8, 6, 6, 6]


@pytest.fixture(params=[None, 1], ids=["planned", "binned"])
def bins(request, monkeypatch):
    """The blocks as `_plan` lays them out, and with every row's heads packed into one bin
    (`FORCE_BINS`: the interleaved tails, per-query-head mask rows and query / output gathers)."""
    import kvray.runtime.attention as attn

    monkeypatch.setattr(attn, "FORCE_BINS", request.param)
    return request.param


def _random_prefix(layout: str, d: int, H: int = 2) -> RaggedKV:
    """Random keys and values laid out as `LAYOUTS[layout]` (H = 2) or `THREE_HEADS` (H = 3)."""
    lengths = THREE_HEADS if layout == "three_heads" else LAYOUTS[layout]
    total = sum(lengths)
    return RaggedKV(torch.randn(total, d), torch.randn(total, d), torch.arange(total), tuple(lengths),
                    len(lengths) // H, H)


def _dense(prefix: RaggedKV):
    """The oracle's layout of a ragged prefix: keys, values [B, H, N, d] and keep [B, H, N]
    (the missing entries zero and masked)."""
    B, H, N, d = prefix.batch, prefix.heads, max(prefix.lengths), prefix.keys.shape[-1]
    keys, values = torch.zeros(B, H, N, d), torch.zeros(B, H, N, d)
    keep = torch.zeros(B, H, N, dtype=torch.bool)
    for bh, n in enumerate(prefix.lengths):
        k, v = prefix.head(bh)
        keys[bh // H, bh % H, :n], values[bh // H, bh % H, :n], keep[bh // H, bh % H, :n] = k, v, True
    return keys, values, keep


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ragged_attention_matches_reference(G, q_len, layout, bins):
    _matches_reference(G, q_len, layout, 2)


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("V", [None, 1, 2])
def test_ragged_attention_in_bins_matches_reference(G, q_len, V, monkeypatch):
    """Three KV heads in two bins (a bin slot left empty) or one, or as `_plan` lays them out."""
    import kvray.runtime.attention as attn

    monkeypatch.setattr(attn, "FORCE_BINS", V)
    _matches_reference(G, q_len, "three_heads", 3)


def _matches_reference(G, q_len, layout, H):
    torch.manual_seed(0)
    d, T = 16, 6
    prefix = _random_prefix(layout, d, H)
    B = prefix.batch
    pads = (0, 2, T - q_len, 1, 0, 3)[:B]  # row 2 joined just now: its tail is only the new tokens
    query = torch.randn(B, H * G, q_len, d)
    tk, tv = torch.randn(B, H, T, d), torch.randn(B, H, T, d)
    got = ragged_attention_torch(query, prefix, tk, tv, 1 / math.sqrt(d), pads)
    want = dense_masked_reference(query, *_dense(prefix), tk, tv, pads)
    err = (got.double() - want).abs().max().item()
    print(f"worst mismatch {err:.2e}")
    assert err < 1e-5


@pytest.mark.parametrize("layout", ["skewed", "grouped"])
def test_decode_blocks_follow_the_tail_step_by_step(layout, bins, monkeypatch):
    """Decode steps through a real layer: the padded blocks (`DecodeBlocks`) are built once and
    then appended to, rebuilt when the tail outgrows their room or its buffer, and dropped when
    the tail is replaced or cropped; every step matches the slow reference."""
    import kvray.runtime.attention as attn

    monkeypatch.setattr(attn, "BLOCK_ROOM", 3)  # rebuilt every few steps
    torch.manual_seed(2)
    H, G, d = 2, 3, 16
    prefix = _random_prefix(layout, d)
    B, total = prefix.batch, prefix.keys.shape[0]
    pads = tuple(range(B))  # left padding of the merged tails
    layer = KVRayLayer(prefix=prefix, rows=RowLayout(tuple([total] * B), pads))
    layer.set_tail(torch.randn(B, H, B + 1, d), torch.randn(B, H, B + 1, d))
    dense = _dense(prefix)
    built = []
    monkeypatch.setattr(attn.DecodeBlocks, "__init__", _counting(attn.DecodeBlocks.__init__, built))
    for step in range(12):
        if step == 9:  # the last token, already copied into the blocks, taken back and replaced
            layer.crop(-1)
        layer.update(torch.randn(B, H, 1, d), torch.randn(B, H, 1, d))
        if step == 7:  # the tail replaced by one of the same length (e.g. a re-packed batch)
            layer.set_tail(torch.randn_like(layer.keys), torch.randn_like(layer.values))
        query = torch.randn(B, H * G, 1, d)
        got = ragged_attention(query, layer, 1 / math.sqrt(d), impl="torch")
        want = dense_masked_reference(query, *dense, layer.keys, layer.values, pads)
        assert (got.double() - want).abs().max().item() < 1e-5, f"step {step}"
    # built at the first step, again when the room ran out or the tail was replaced: not every step
    assert 3 <= len(built) < 12


def test_decode_blocks_move_with_the_rows_that_stay(bins, monkeypatch):
    """Rows leaving the batch (`select_rows`, also reordered, with the tail's unused leading slots
    trimmed) keep attending through the same blocks, not rebuilt ones, until their room runs
    out; every step matches the slow reference; the batch they left rebuilds its own if used."""
    import kvray.runtime.attention as attn

    monkeypatch.setattr(attn, "BLOCK_ROOM", 3)
    torch.manual_seed(3)
    H, G, d = 2, 3, 16
    prefix = _random_prefix("grouped", d)
    B, total = prefix.batch, prefix.keys.shape[0]
    pads = (3, 0, 2, 1, 0, 2)  # rows 1 and 4 hold the longest tails: once they leave, 1 slot is trimmed
    layer = KVRayLayer(prefix=prefix, rows=RowLayout(tuple([total] * B), pads))
    layer.set_tail(torch.randn(B, H, 4, d), torch.randn(B, H, 4, d))
    cache = KVRayCache([layer])
    built = []
    monkeypatch.setattr(attn.DecodeBlocks, "__init__", _counting(attn.DecodeBlocks.__init__, built))

    def step(cache, tag):
        layer = cache.layers[0]
        n = layer.prefix.batch
        layer.update(torch.randn(n, H, 1, d), torch.randn(n, H, 1, d))
        query = torch.randn(n, H * G, 1, d)
        got = ragged_attention(query, layer, 1 / math.sqrt(d), impl="torch")
        want = dense_masked_reference(query, *_dense(layer.prefix), layer.keys, layer.values, layer.rows.pads)
        assert (got.double() - want).abs().max().item() < 1e-5, tag

    for i in range(3):  # built at the first step (tail 5, room 8); tail 7
        step(cache, f"all rows, step {i}")
    old = cache
    cache = cache.select_rows([0, 2, 3, 5])  # a row from the middle of a group, and the longest tails
    assert cache.layers[0].rows.pads == (2, 1, 0, 1)
    step(cache, "4 rows, step 0")  # tail 7 of the room left after the trim, 7: no rebuild
    assert len(built) == 1
    step(cache, "4 rows, step 1")  # tail 8: the room has run out
    assert len(built) == 2
    cache = cache.select_rows([3, 0])  # reordered
    for i in range(2):
        step(cache, f"2 rows, step {i}")
    assert len(built) == 2
    step(old, "the batch left behind")  # rebuilds its own blocks
    assert len(built) == 3


def test_merged_batches_keep_their_blocks(bins, monkeypatch):
    """Batches merged into one (`KVRayCache.merge`: tails of different lengths, left-padded)
    keep their attention blocks without a copy (`DecodeBlocks.merge`); the sources without
    blocks get one set built for all of them, and the packed entries are copied only when read. A feed of several
    tokens and the decode steps after it match the slow reference (the blocks rebuilt when the
    room the sources had left runs out), and the sources stay as they were."""
    import kvray.runtime.attention as attn

    monkeypatch.setattr(attn, "BLOCK_ROOM", 3)
    torch.manual_seed(4)
    H, G, d = 2, 3, 16

    def part(layout, T, pads):
        prefix = _random_prefix(layout, d)
        B = prefix.batch
        layer = KVRayLayer(prefix=prefix, rows=RowLayout(tuple(range(20, 20 + B)), pads))
        if T:
            layer.set_tail(torch.randn(B, H, T, d), torch.randn(B, H, T, d))
        return KVRayCache([layer])

    a, b, c = part("skewed", 4, (0, 1, 2)), part("grouped", 2, (0,) * 6), part("empty_head", 0, (0,) * 3)
    e = part("uniform", 1, (0,) * 3)
    for src in (a, b):  # a decode step each: their blocks are built
        layer = src.layers[0]
        n = layer.prefix.batch
        layer.update(torch.randn(n, H, 1, d), torch.randn(n, H, 1, d))
        ragged_attention(torch.randn(n, H * G, 1, d), layer, 1 / math.sqrt(d), impl="torch")
    kept = [src.layers[0].prefix.keys.clone() for src in (a, c, b, e)]
    built = []
    monkeypatch.setattr(attn.DecodeBlocks, "__init__", _counting(attn.DecodeBlocks.__init__, built))
    merged = KVRayCache.merge([a, c, b, e])
    layer = merged.layers[0]
    assert len(built) == 1  # one set for c and e, none for a or b
    assert layer.rows.pads == (0, 1, 2, 5, 5, 5, 2, 2, 2, 2, 2, 2, 4, 4, 4)
    assert "keys" not in layer.prefix.__dict__  # the packed entries: not copied yet
    dense = None
    for q_len in (3, 1, 1, 1):
        n = layer.prefix.batch
        layer.update(torch.randn(n, H, q_len, d), torch.randn(n, H, q_len, d))
        query = torch.randn(n, H * G, q_len, d)
        got = ragged_attention(query, layer, 1 / math.sqrt(d), impl="torch")
        dense = dense or _dense(layer.prefix)
        want = dense_masked_reference(query, *dense, layer.keys, layer.values, layer.rows.pads)
        assert (got.double() - want).abs().max().item() < 1e-5, f"q_len {q_len}"
        assert len(built) == (1 if q_len == 3 else 2), q_len  # 3 slots of room left: rebuilt at the next
    for src, k in zip((a, c, b, e), kept):
        assert torch.equal(src.layers[0].prefix.keys, k)
    # the rows of one source leave (the blocks were rebuilt into one buffer above): merge again,
    # then drop the newcomers' rows: their buffer is let go, the others attend as before
    f = part("skewed", 0, (0,) * 3)
    merged = KVRayCache.merge([merged, f])
    layer = merged.layers[0]
    assert len(layer.prefix._decode_blocks.bufs) == 2
    merged = merged.select_rows(list(range(15)))
    layer = merged.layers[0]
    assert len(layer.prefix._decode_blocks.bufs) == 1 and len(built) == 3
    layer.update(torch.randn(15, H, 1, d), torch.randn(15, H, 1, d))
    query = torch.randn(15, H * G, 1, d)
    got = ragged_attention(query, layer, 1 / math.sqrt(d), impl="torch")
    want = dense_masked_reference(query, *_dense(layer.prefix), layer.keys, layer.values, layer.rows.pads)
    assert (got.double() - want).abs().max().item() < 1e-5


def _counting(init, calls):
    def wrapped(self, *a, **k):
        calls.append(1)
        init(self, *a, **k)
    return wrapped


def test_impl_dispatch_explains_itself(monkeypatch):
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_impl("torch", torch.device("cpu")) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (the kernel tests' interpreter)
    with pytest.raises(RuntimeError, match="impl='triton' cannot run: .*CUDA"):
        resolve_impl("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="must be one of"):
        resolve_impl("cuda", torch.device("cpu"))


# ----------------------------------------------------------------------------- batched = sequential

REQUESTS = [  # (context repeats, question, method, params, protocol, max_new_tokens)
    (3, "Who asked for the key?", "snapkv", dict(compression_ratio=0.5), False, 7),
    (6, "What did the clerk count?", "adakv", dict(compression_ratio=0.75), True, 5),   # per-head budgets
    (2, "Where were the ships?", "full", {}, False, 9),
    (5, "Which room?", "knorm", dict(compression_ratio=0.25), True, 6),
    (4, "Was the river loud?", "pyramidkv", dict(compression_ratio=0.5), False, 8),
    (3, "Who answered?", "morphkv", dict(compression_ratio=0.5, window_size=8), False, 6),  # evicts while decoding
    (7, "What was quiet?", "streaming_llm", dict(compression_ratio=0.6), True, 4),
]


def _press(method, params):
    return kvray.make_press(method, **params)


def _row_inputs(lm, n, question, method, params, aware):
    press = _press(method, params)
    prompt = build_prompt(lm.tokenizer, WORDS * n, question)
    pre = prefill(lm, prompt, capture_window=capture_window_for([press]), with_question=aware,
                  capture_hidden=hidden_needed_for([press]))
    return press, pre, compress(lm, pre, press, aware)


def test_mixed_batch_equals_each_request_alone(tiny_lm):
    """Different contexts, lengths, methods, per-head budgets and both protocols, joining the
    batch at different steps and leaving at different steps: every row gets the tokens
    `kvray.generate` gives it alone. A mismatch is allowed only where the batched row's top two
    logits are within 1e-4 (reported)."""
    lm = tiny_lm
    alone = [kvray.generate(lm, WORDS * n, q, press=_press(m, p), max_new_tokens=k, query_aware=aware).token_ids
             for n, q, m, p, aware, k in REQUESTS]
    dec = Decoder(lm)
    logits: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(REQUESTS))}
    rows = {}

    def join(i):
        n, q, m, p, aware, k = REQUESTS[i]
        press, pre, cache = _row_inputs(lm, n, q, m, p, aware)
        rows[i] = dec.add(cache, feed=pre.rest(aware), first_logits=pre.first_logits(aware), max_new_tokens=k, key=i,
                          after_step=press.after_step if press.evicts_during_decoding else None,
                          on_logits=lambda row, lg: logits[row.key].append(lg.clone()))[0]

    for i in range(3):
        join(i)
    dec.step()
    dec.step()
    for i in range(3, 6):  # these join a batch that is already decoding
        join(i)
    dec.step()
    join(6)
    dec.run()
    mismatches = []
    for i, row in rows.items():
        assert row.error is None and row.done
        got, want = row.tokens, alone[i]
        if got != want:
            j = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            top2 = logits[i][j].float().topk(2).values
            mismatches.append((REQUESTS[i][2], j, float(top2[0] - top2[1])))
    print("mismatches (method, step, top-2 gap):", mismatches)
    assert all(gap < 1e-4 for _, _, gap in mismatches), mismatches


def test_rows_leave_when_done_and_bytes_are_freed(tiny_llama):
    lm = tiny_llama
    dec = Decoder(lm)
    lens = (2, 6)
    rows = []
    for k in lens:
        press, pre, cache = _row_inputs(lm, 3, "Who asked?", "snapkv", dict(compression_ratio=0.5), False)
        rows += dec.add(cache, feed=pre.rest(False), max_new_tokens=k, ignore_stop_tokens=True)
    dec.step()
    both = dec.kv_bytes()
    finished = dec.step()
    assert finished == [rows[0]] and rows[0].finish_reason == "length" and len(rows[0].tokens) == 2
    dec.step()  # the batch is re-packed without the finished row
    assert dec.active == 1 and dec.kv_bytes() < 0.6 * both
    dec.run()
    assert rows[1].finish_reason == "length" and len(rows[1].tokens) == 6


def test_blocks_keep_room_for_what_the_rows_will_decode(tiny_llama, monkeypatch):
    """The decoder tells the attention blocks how many tokens its rows may still decode, so a
    batch of rows that join together decodes them all without rebuilding its blocks (each
    rebuild copies every entry into fresh memory); a lane with a decode-time hook (MorphKV,
    whose tail never grows) keeps the default room."""
    import kvray.runtime.attention as attn

    monkeypatch.setattr(attn, "BLOCK_ROOM", 3)
    lm = tiny_llama
    built = []
    monkeypatch.setattr(attn.DecodeBlocks, "__init__", _counting(attn.DecodeBlocks.__init__, built))
    dec = Decoder(lm)
    for n, m, p in ((3, "snapkv", dict(compression_ratio=0.5)), (5, "adakv", dict(compression_ratio=0.75))):
        _, pre, cache = _row_inputs(lm, n, "Who asked?", m, p, False)
        dec.add(cache, feed=pre.rest(False), max_new_tokens=12, ignore_stop_tokens=True)
    dec.run()
    assert len(built) == lm.num_layers  # built at the question's feed, never rebuilt over 12 tokens
    press, pre, cache = _row_inputs(lm, 3, "Who asked?", "morphkv", dict(compression_ratio=0.5, window_size=8), False)
    spare = []
    init = attn.DecodeBlocks.__init__

    def recording(self, *a, **k):
        init(self, *a, **k)
        spare.append(self.room - self.filled)

    monkeypatch.setattr(attn.DecodeBlocks, "__init__", recording)
    dec.add(cache, feed=pre.rest(False), max_new_tokens=12, ignore_stop_tokens=True, after_step=press.after_step)
    dec.run()
    assert spare and set(spare) == {3}


def test_a_failing_row_fails_alone(tiny_llama):
    """A row whose decode-time hook raises fails with that error; its neighbours finish."""
    lm = tiny_llama
    dec = Decoder(lm)
    press, pre, good = _row_inputs(lm, 3, "Who asked?", "knorm", dict(compression_ratio=0.5), False)
    _, _, bad = _row_inputs(lm, 4, "Which room?", "knorm", dict(compression_ratio=0.5), False)

    def broken(cache, step):
        if step == 2:
            raise RuntimeError("press failed mid-batch")

    ok = dec.add(good, feed=pre.rest(False), max_new_tokens=6, ignore_stop_tokens=True)[0]
    ko = dec.add(bad, feed=pre.rest(False), max_new_tokens=6, ignore_stop_tokens=True, after_step=broken)[0]
    dec.run()
    assert ko.finish_reason == "error" and "mid-batch" in str(ko.error)
    assert ok.finish_reason == "length" and len(ok.tokens) == 6


def test_cancel_frees_the_row(tiny_llama):
    lm = tiny_llama
    dec = Decoder(lm)
    rows = []
    for n in (3, 5):
        press, pre, cache = _row_inputs(lm, n, "Who asked?", "snapkv", dict(compression_ratio=0.5), False)
        rows += dec.add(cache, feed=pre.rest(False), max_new_tokens=20, ignore_stop_tokens=True)
    dec.step()
    dec.step()
    before = dec.kv_bytes()
    rows[1].cancel()
    assert rows[1] in dec.step()
    dec.step()
    assert rows[1].finish_reason == "cancelled" and dec.active == 1 and dec.kv_bytes() < before


def test_merge_keeps_each_rows_positions(tiny_llama):
    press, pre_a, a = _row_inputs(tiny_llama, 2, "q", "snapkv", dict(compression_ratio=0.5), False)
    _, pre_b, b = _row_inputs(tiny_llama, 5, "q", "adakv", dict(compression_ratio=0.75), False)
    merged = KVRayCache.merge([a, b])
    assert merged.next_positions() == [pre_a.n_context, pre_b.n_context]
    assert merged.nbytes() == a.nbytes() + b.nbytes()
    assert isinstance(merged.layers[0], KVRayLayer) and merged.layers[0].rows == RowLayout(
        (pre_a.n_context, pre_b.n_context), (0, 0))
    back = merged.select_rows([1])
    assert back.next_positions() == [pre_b.n_context] and back.nbytes() == b.nbytes()


def test_window_scores_are_computed_once_per_sample(tiny_llama, monkeypatch):
    """SnapKV, PyramidKV and AdaKV at several ratios score one prefill's window once per layer
    (`Prefill.state` shares the views), and keep the entries they keep with fresh scores."""
    import kvray.presses.scoring as scoring

    lm = tiny_llama
    presses = [kvray.make_press(m, compression_ratio=r) for m in ("snapkv", "pyramidkv", "adakv") for r in (0.25, 0.5)]
    prompt = build_prompt(lm.tokenizer, WORDS * 4, "Who asked for the key?")

    def kept(pre):
        return [[layer.prefix.positions.tolist() for layer in compress(lm, pre, p, False).layers] for p in presses]

    calls = []
    real = scoring.scores_of
    monkeypatch.setattr(scoring, "scores_of", lambda *a: calls.append(1) or real(*a))
    shared = prefill(lm, prompt, capture_window=capture_window_for(presses), with_question=False)
    got = kept(shared)
    assert len(calls) == lm.num_layers  # once per layer, for the six configs
    fresh = []
    for p in presses:  # each config on a prefill of its own: nothing shared
        pre = prefill(lm, prompt, capture_window=capture_window_for(presses), with_question=False)
        fresh.append([layer.prefix.positions.tolist() for layer in compress(lm, pre, p, False).layers])
    assert got == fresh


def test_compaction_frees_what_rows_that_left_kept(tiny_llama):
    """Rows that leave a batch leave their packed entries and block slots alive (a re-pack copies
    nothing); with `compact_above` the decoder copies the rest out once the waste passes it: the
    same tokens, and the bytes kept alive fall back to what the rows use."""

    def run(compact_above):
        dec = Decoder(tiny_llama, compact_above=compact_above)
        rows = []
        for n, k in ((3, 2), (6, 3), (4, 4), (5, 5), (3, 6), (7, 20)):  # one feed: one batch, one buffer
            _, pre, cache = _row_inputs(tiny_llama, n, "Who asked?", "snapkv", dict(compression_ratio=0.5), False)
            rows += dec.add(cache, feed=pre.rest(False), max_new_tokens=k, ignore_stop_tokens=True)
        waste = []
        while dec.active:
            dec.step()
            if dec.active:
                waste.append(dec.kv_bytes(referenced=True) / dec.kv_bytes())
        return [r.tokens for r in rows], waste

    tokens, waste = run(None)
    compacted, less = run(1.25)
    assert compacted == tokens
    print("kept alive / used, without:", [round(w, 2) for w in waste], "with:", [round(w, 2) for w in less])
    assert max(waste) > 1.5 and max(less) < max(waste) - 0.3, (waste, less)
    assert less[-1] < 1.25 < waste[-1]  # the last row alone, in what it uses (and the tail's spare room)


@pytest.mark.parametrize("V", [None, 1, 2])
def test_block_estimate_is_exact_for_a_row_alone(V, monkeypatch):
    """`DecodeBlocks.estimate` (Serve's admission) is what a row's blocks hold when it is built
    alone, plain or in bins (whose mask has a row per query head)."""
    import kvray.runtime.attention as attn

    monkeypatch.setattr(attn, "FORCE_BINS", V)
    torch.manual_seed(5)
    prefix = _random_prefix("three_heads", 16, 3)
    for b in range(prefix.batch):
        row = prefix.select_rows([b])
        blocks = attn.DecodeBlocks(row, torch.randn(1, 3, 4, 16), torch.randn(1, 3, 4, 16), None, room=7, G=3)
        assert blocks.nbytes == attn.DecodeBlocks.estimate(row, 4, 7, G=3), b


def test_plan_bins_long_uneven_heads_only(monkeypatch):
    """Bins where the padded columns they save outweigh their own cost (2 threads, 3 KV heads
    x 3 query heads, a 20-slot tail): one long uneven row takes two bins (one round of both
    threads); short or balanced heads stay plain; six such rows take fewer bins than heads
    (9 rounds of the longest head against 3-6 of wider bins); 8 KV heads x 4 query heads in
    groups of eight rows stay plain (a bin's 32 query rows make its columns dear)."""
    import random

    from kvray.runtime.attention import _plan

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    plan = _plan([(1000, 600, 1400)], 20, G=3)
    assert (plan.V, plan.Hb, plan.P) == (2, 2, 1600)
    assert sorted(plan.members[0]) == [(0, 1), (2,)]
    for lengths in [(400, 240, 560), (1000, 900, 1100), (800, 800, 800)]:
        assert not _plan([lengths], 20, G=3).binned, lengths
    assert _plan([(1000, 600, 1400)] * 6, 20, G=3).V < 3
    rng = random.Random(0)
    assert not _plan([tuple(rng.randint(400, 1200) for _ in range(8)) for _ in range(8)], 20, G=4).binned
    # FORCE_BINS is capped at H - 1: with H bins or more a head would attend in another's place
    monkeypatch.setattr("kvray.runtime.attention.FORCE_BINS", 3)
    assert _plan([(1, 9, 4)], 6, G=2).V == 2

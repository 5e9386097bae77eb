"""MorphKV: scoring against slow loops, eviction while decoding (one mask for the cache and the
cached logits, true positions, constant memory), and its place in `run_configs`."""

import json
import math
import sys

import pytest
import torch

import kvray
from kvray.cache import KVRayCache, KVRayLayer, RaggedKV
from kvray.generate import PromptTokens, build_prompt, greedy_decode_batch, prefill, run_configs
from kvray.presses import LayerInputs, PrefillState
from kvray.presses.morphkv import MorphKVLayer, MorphKVPress


def prompt(n_ctx, n_q=5, n_suffix=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 1000, (n_ctx + n_q + n_suffix,), generator=g).tolist()
    return PromptTokens(ids[:n_ctx], ids[n_ctx:n_ctx + n_q], ids[n_ctx + n_q:])


# ----------------------------------------------------------------------------- slow reference


def slow_old_scores(queries, keys, old, fusion, gqa):
    """MorphKV scores by loops. queries [Hq, R, d] (the window rows), keys [H, M, d], `old`: per
    KV head the list of old entry indices into keys -> per head a list of scores (float64):
    per row and query head softmax over the old entries, group max/mean, then row sum/max."""
    Hq, R, d = queries.shape
    H = keys.shape[0]
    G = Hq // H
    out = []
    for h in range(H):
        cols = old[h]
        probs = torch.zeros(G, R, len(cols), dtype=torch.float64)
        for g in range(G):
            for i in range(R):
                logits = torch.tensor([float(keys[h, j].double() @ queries[h * G + g, i].double()) / math.sqrt(d)
                                       for j in cols], dtype=torch.float64)
                probs[g, i] = torch.softmax(logits, 0)
        scores = []
        for c in range(len(cols)):
            per_row = [max(probs[g, i, c] for g in range(G)) if gqa == "max" else sum(probs[g, i, c] for g in range(G)) / G
                       for i in range(R)]
            scores.append(float(sum(per_row)) if fusion == "sum" else float(max(per_row)))
        out.append(scores)
    return out


def slow_keep(queries, keys, candidates, window, size, fusion, gqa):
    """Kept positions per head: the last `window` candidates + the top (size - window) others."""
    kept = []
    for h, cand in enumerate(candidates):
        if len(cand) <= size:
            kept.append(sorted(cand))
            continue
        win, old = cand[len(cand) - window:], cand[: len(cand) - window]
        G = queries.shape[0] // keys.shape[0]  # this head's query group
        s = slow_old_scores(queries[h * G:(h + 1) * G], keys[h:h + 1], [old], fusion, gqa)[0]
        top = sorted(range(len(old)), key=lambda c: -s[c])[: size - window]
        kept.append(sorted([old[c] for c in top] + win))
    return kept


# ----------------------------------------------------------------------------- scoring at compression


@pytest.mark.parametrize("gqa", ["max", "mean"])
@pytest.mark.parametrize("fusion", ["sum", "max"])
@pytest.mark.parametrize("N", [7, 13, 37])
@pytest.mark.parametrize("G", [2, 3])
def test_prefill_scores_against_slow_reference(G, N, fusion, gqa):
    torch.manual_seed(N * 10 + G)
    H, d, R, W = 2, 8, 4, 6  # more queries captured than the window uses
    keys, values = torch.randn(1, H, N, d), torch.randn(1, H, N, d)
    queries, qpos = torch.randn(1, H * G, W, d), torch.arange(N - W, N)
    layer = LayerInputs(0, keys, values, queries, qpos)
    press = MorphKVPress(compression_ratio=0.4, window_size=R, fusion=fusion, gqa_reduction=gqa)
    got = press.score(layer)[0]
    old = N - R
    want = slow_old_scores(queries[0, :, -R:], keys[0], [list(range(old))] * H, fusion, gqa)
    torch.testing.assert_close(got[:, :old].double(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=1e-5)
    assert got[:, old:].min() > got[:, :old].max()  # the window is protected
    # the kept entries: C per head, the window + the top old ones
    cache = press.compress(PrefillState([layer], N))
    C = round(N * 0.6)
    assert cache.layers[0].prefix.lengths == (C, C)
    want_kept = slow_keep(queries[0, :, -R:], keys[0], [list(range(N))] * H, R, C, fusion, gqa)
    assert [p.tolist() for p in cache.layers[0].prefix.positions.view(H, C)] == want_kept


# ----------------------------------------------------------------------------- eviction while decoding


def logits_from_scratch(layer: MorphKVLayer, all_queries, all_keys, d):
    """The window logits a MorphKVLayer should hold: rows = its window queries' positions,
    columns = its kept entries, -inf for keys after the query. all_queries [Hq, T, d]."""
    B, H = layer.prefix.batch, layer.prefix.heads
    G = all_queries.shape[0] // H
    pos = layer.prefix.positions.view(H, -1)
    rows = layer.window_positions.tolist()[-layer.window_logits.shape[3]:]
    out = torch.full(layer.window_logits.shape, -math.inf)
    for h in range(H):
        for g in range(G):
            for i, r in enumerate(rows):
                for j, c in enumerate(pos[h].tolist()):
                    if c <= r:
                        out[0, h, g, i, j] = float(all_queries[h * G + g, r] @ all_keys[h, c]) / math.sqrt(d)
    return out


@pytest.mark.parametrize("check_every_step", [True, False])
@pytest.mark.parametrize("fusion,gqa", [("sum", "max"), ("max", "mean")])
@pytest.mark.parametrize("G,N", [(2, 13), (3, 37)])
def test_decoding_eviction_against_slow_reference(G, N, fusion, gqa, check_every_step):
    """Several decoding steps (first a 5-token feed, as the query-agnostic protocol does): the
    kept positions per head, the kept keys/values, and the cached window logits all match a
    from-scratch computation over the full history. The one-token steps run in the ring layout
    (`MorphKVLayer.ring`); checking puts the layer back in position order (`canonical`), so
    without a check between steps they run one after the other in the ring."""
    torch.manual_seed(G + N)
    H, d, R, C, steps = 2, 8, 3, 9, 8
    total = N + 5 + steps
    keys, values, queries = torch.randn(H, total, d), torch.randn(H, total, d), torch.randn(H * G, total, d)
    layer = LayerInputs(0, keys[None, :, :N], values[None, :, :N], queries[None, :, N - 5:N], torch.arange(N - 5, N))
    press = MorphKVPress(window_size=R, cache_size=C, fusion=fusion, gqa_reduction=gqa)
    cache = press.compress(PrefillState([layer], N))
    kept = slow_keep(queries[:, N - R:N], keys, [list(range(N))] * H, R, C, fusion, gqa)
    end = N
    rings = 0
    for step, T in enumerate([5] + [1] * steps):  # a first feed longer than the window
        mine = cache.layers[0]
        rings += mine.ring
        if check_every_step or step == 0:
            mine.canonical()
            assert [p.tolist() for p in mine.prefix.positions.view(H, -1)] == kept
            torch.testing.assert_close(mine.window_logits, logits_from_scratch(mine, queries, keys, d), atol=1e-5, rtol=1e-5)
        # append T tokens the way a forward pass does, then evict
        mine.update(keys[None, :, end:end + T], values[None, :, end:end + T])
        mine._capture(queries[None, :, end:end + T])
        press.after_step(cache, step)
        end += T
        kept = slow_keep(queries[:, end - R:end], keys, [k + list(range(end - T, end)) for k in kept], R, C, fusion, gqa)
    mine = cache.layers[0]
    assert rings == steps - 1 and mine.ring  # every one-token step ran in the ring (counted after it)
    mine.canonical()
    assert [p.tolist() for p in mine.prefix.positions.view(H, -1)] == kept
    assert mine.prefix.lengths == (C,) * H and mine.tail_length() == 0 and mine.get_seq_length() == end
    for h in range(H):
        torch.testing.assert_close(mine.prefix.dense()[0][0, h], keys[h, kept[h]])
        torch.testing.assert_close(mine.prefix.dense()[1][0, h], values[h, kept[h]])
    torch.testing.assert_close(mine.window_logits, logits_from_scratch(mine, queries, keys, d), atol=1e-5, rtol=1e-5)


def test_one_keep_mask_for_cache_and_logits_hand_made():
    """One KV head, two query heads that look at different tokens (d = 2). Query head 0 wants
    token 0, head 1 wants token 2: with the group max both stay, with the window (token 4).
    The KV entries and the cached logits' columns keep the same tokens for both query heads."""
    keys = torch.tensor([[10.0, 0], [0, 0], [0, 10], [0, 0], [-5, 0]]).view(1, 1, 5, 2)
    values = torch.arange(10.0).view(1, 1, 5, 2)
    q = torch.tensor([[1.0, 0], [0, 1]]).view(1, 2, 1, 2)  # query heads 0 and 1, at position 4
    layer = LayerInputs(0, keys, values, q, torch.tensor([4]))
    press = MorphKVPress(window_size=1, cache_size=3, gqa_reduction="max")
    cache = press.compress(PrefillState([layer], 5))
    m = cache.layers[0]
    assert m.prefix.positions.tolist() == [0, 2, 4]
    assert m.prefix.values.tolist() == [[0.0, 1], [4, 5], [8, 9]]
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(m.window_logits.view(2, 3), torch.tensor([[10 * s, 0, -5 * s], [0, 10 * s, 0]]))
    # next token (position 5, key 0): query head 0 now wants token 4, head 1 token 2 -> token 0 goes
    m.update(torch.zeros(1, 1, 1, 2), torch.tensor([10.0, 11]).view(1, 1, 1, 2))
    m._capture(torch.tensor([[-1.0, 0], [0, 1]]).view(1, 2, 1, 2))
    press.after_step(cache, 0)
    # in the ring layout (`MorphKVLayer.ring`) the leaving token 4 took token 0's slot
    assert m.ring and m.prefix.positions.tolist() == [4, 2, 5]
    m.canonical()
    assert m.prefix.positions.tolist() == [2, 4, 5] and m.prefix_tokens == 6 and m.tail_length() == 0
    assert m.prefix.values.tolist() == [[4.0, 5], [8, 9], [10, 11]]
    # only the row of position 5 is left (window 1), against keys 2, 4, 5
    torch.testing.assert_close(m.window_logits.view(2, 3), torch.tensor([[0, 5 * s, 0], [10 * s, 0, 0]]))


def test_keep_repacks_a_ragged_prefix_and_the_tail():
    torch.manual_seed(0)
    B, H, N, d, T = 2, 2, 9, 4, 3
    keys, values = torch.randn(B, H, N, d), torch.randn(B, H, N, d)
    first = [torch.tensor(i) for i in ([0, 3, 5], [1, 2, 4, 8], [7], [0, 1, 2, 3, 4, 5])]
    layer = KVRayLayer(prefix=RaggedKV.gather(keys, values, first), prefix_tokens=N)
    tk, tv = torch.randn(B, H, T, d), torch.randn(B, H, T, d)
    layer.update(tk, tv)
    # indices into prefix-then-tail of each head
    keep = [torch.tensor(i) for i in ([0, 2, 3], [4, 6], [1, 2, 3], [])]
    layer.keep(keep)
    assert layer.prefix.lengths == (3, 2, 3, 0) and layer.tail_length() == 0 and layer.get_seq_length() == N + T
    assert layer.nbytes() == 8 * 2 * d * 4
    want_pos = [[0, 5, 9], [9, 11], [9, 10, 11], []]
    for bh, pos in enumerate(want_pos):
        b, h = divmod(bh, H)
        k, v = layer.prefix.head(bh)
        assert layer.prefix.positions[layer.prefix.offsets[bh]:layer.prefix.offsets[bh + 1]].tolist() == pos
        full_k, full_v = torch.cat([keys[b, h], tk[b, h]]), torch.cat([values[b, h], tv[b, h]])
        torch.testing.assert_close(k, full_k[pos])
        torch.testing.assert_close(v, full_v[pos])
    with pytest.raises(ValueError, match="out of range"):
        layer.keep([torch.tensor([5])] * 4)


# ----------------------------------------------------------------------------- on the tiny models


def test_decoding_keeps_true_positions(tiny_llama):
    """After several evictions (different per layer and KV head), each step's logits equal a
    full-sequence eager run whose per-layer, per-head masks show each row exactly the entries
    the compressed cache held when that token was fed."""
    from transformers import AttentionInterface

    lm = tiny_llama
    H, Hq = lm.num_kv_heads, lm.model.config.num_attention_heads
    p = prompt(40, n_q=3, n_suffix=0)
    pre = prefill(lm, p, with_question=False)
    press = MorphKVPress(compression_ratio=0.5, window_size=4)
    cache = press.compress(pre.state(False))
    feeds, visible, got = [], [], []
    toks = p.question
    with torch.inference_mode():
        for step in range(7):
            visible.append([layer.prefix.positions.view(H, -1).clone() for layer in cache.layers])
            got.append(lm.model(input_ids=torch.tensor([toks]), cache=cache).logits[0])
            feeds.append(toks)
            press.after_step(cache, step)
            toks = [int(got[-1][-1].argmax())]
    ids = p.context + [t for f in feeds for t in f]
    n = len(ids)
    masks = []
    for layer_idx in range(lm.num_layers):
        mask = torch.tril(torch.ones(Hq, n, n, dtype=torch.bool))
        start = 40
        for f, fed in enumerate(feeds):
            for r in range(start, start + len(fed)):
                mask[:, r, :start] = False
                for hq in range(Hq):
                    mask[hq, r, visible[f][layer_idx][hq // (Hq // H)]] = True
            start += len(fed)
        masks.append(mask)

    def masked_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        G = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(G, 1), value.repeat_interleave(G, 1)
        logits = (query @ k.transpose(-1, -2)).float() * scaling
        logits = logits.masked_fill(~masks[module.layer_idx], float("-inf"))
        return (torch.softmax(logits, -1).to(v.dtype) @ v).transpose(1, 2).contiguous(), None

    AttentionInterface.register("kvray_test_morphkv_ref", masked_eager)
    impl = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("kvray_test_morphkv_ref")
    try:
        with torch.inference_mode():
            ref = lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, 40:]
    finally:
        lm.model.set_attn_implementation(impl)
    torch.testing.assert_close(torch.cat(got), ref, atol=1e-4, rtol=1e-4)
    # evictions did happen, and differ between layers / heads
    assert all(v[0].max() >= 40 for v in visible[-1])
    assert len({tuple(v.flatten().tolist()) for v in visible[-1]}) > 1


def test_constant_memory_through_1000_tokens(tiny_llama):
    lm = tiny_llama
    p = prompt(50, n_q=2, n_suffix=0)
    pre = prefill(lm, p, with_question=False)
    press = MorphKVPress(compression_ratio=0.5, window_size=8)
    cache = press.compress(pre.state(False))
    start = cache.nbytes()
    sizes, logit_shapes = [], set()

    def hook(c, step):
        press.after_step(c, step)
        sizes.append(c.nbytes())
        logit_shapes.update(tuple(layer.window_logits.shape) for layer in c.layers)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 1,000 tiny steps: thread hand-offs would cost more than they save
    try:
        out = greedy_decode_batch(lm, cache, p.question, 1000, after_step=hook, ignore_stop_tokens=True)
    finally:
        torch.set_num_threads(threads)
    assert len(out[0]) == 1000 and len(sizes) == 1000  # the question, then 999 generated tokens
    assert set(sizes) == {start} and cache.nbytes() == start
    assert all(layer.prefix.lengths == (25,) * lm.num_kv_heads for layer in cache.layers)
    assert len(logit_shapes) == 1
    # a full cache would have grown by 1,001 entries per head
    assert cache.get_seq_length() == 50 + 2 + 999
    d = lm.head_dim
    assert start == lm.num_layers * lm.num_kv_heads * 25 * 2 * d * 4


@pytest.mark.parametrize("query_aware", [False, True])
def test_run_configs_end_to_end(tiny_lm, query_aware):
    p = build_prompt(tiny_lm.tokenizer, " ".join(f"Fact {i}: the box {i % 5} is red." for i in range(30)),
                     "Which box is red?")
    pre = prefill(tiny_lm, p)
    press = MorphKVPress(compression_ratio=0.5, window_size=8)
    out = run_configs(tiny_lm, pre, [press], query_aware, 12)[0]
    s = out.stats
    assert 0 < s.new_tokens <= 12 and isinstance(out.text, str)
    assert abs(s.kv_bytes_kept / s.kv_bytes_full - 0.5) < 0.02
    assert s.kv_tokens_kept == round(s.kv_tokens_full * 0.5)


def test_other_presses_in_the_same_call_are_unaffected(tiny_llama, monkeypatch):
    """With MorphKV among them, the other presses are decoded in the same batch as without it
    (bit-identical logits at every step), and MorphKV in a lane of its own, as if it were the
    only config."""
    dec_mod = sys.modules["kvray.runtime.decoder"]
    forward, calls = dec_mod.forward, []

    def recording_forward(lm, rows, cache, positions=None):
        out = forward(lm, rows, cache, positions=positions)
        calls.append(out.clone())
        return out

    monkeypatch.setattr(dec_mod, "forward", recording_forward)
    pre = prefill(tiny_llama, prompt(120))
    snap, knorm = kvray.make_press("snapkv", compression_ratio=0.5), kvray.make_press("knorm", compression_ratio=0.25)
    morph = MorphKVPress(compression_ratio=0.5, window_size=8)
    for aware in (False, True):
        runs = {}
        for key, presses in (("mixed", [snap, morph, knorm]), ("without", [snap, knorm]), ("alone", [morph])):
            calls.clear()
            runs[key] = (run_configs(tiny_llama, pre, presses, aware, 8), list(calls))
        (mixed, mixed_calls), (without, without_calls), (alone, alone_calls) = runs["mixed"], runs["without"], runs["alone"]
        batch_calls = [c for c in mixed_calls if c.shape[0] == 2]
        solo_calls = [c for c in mixed_calls if c.shape[0] == 1]
        assert len(batch_calls) == len(without_calls) and len(solo_calls) == len(alone_calls)
        for got, want in zip(batch_calls + solo_calls, without_calls + alone_calls):
            assert torch.equal(got, want)
        assert [mixed[0].token_ids, mixed[2].token_ids] == [o.token_ids for o in without]
        assert [mixed[0].stats.kv_bytes_kept, mixed[2].stats.kv_bytes_kept] == [o.stats.kv_bytes_kept for o in without]
        assert mixed[1].token_ids == alone[0].token_ids and mixed[1].stats.kv_bytes_kept == alone[0].stats.kv_bytes_kept


# ----------------------------------------------------------------------------- budgets and parameters


def test_budgets_ratio_zero_cache_size_and_determinism(tiny_llama):
    pre = prefill(tiny_llama, prompt(61))
    state = pre.state(True)
    N = state.n_tokens
    full = MorphKVPress().compress(state)  # ratio 0: C = N, everything kept
    assert all(layer.prefix.lengths == (N,) * state.num_kv_heads for layer in full.layers)
    for ratio in (0.3, 0.75):
        press = MorphKVPress(compression_ratio=ratio, window_size=16)
        cache = press.compress(state)
        scores = [press.score(layer) for layer in state.layers]
        counts = press.allocate(state, scores)
        assert [list(layer.prefix.lengths) for layer in cache.layers] == counts
        assert all(c == round(N * (1 - ratio)) for row in counts for c in row)
        assert abs(cache.nbytes() - (1 - ratio) * state.kv_bytes()) <= 0.02 * state.kv_bytes()
        again = press.compress(state)
        assert all(torch.equal(a.prefix.positions, b.prefix.positions) for a, b in zip(cache.layers, again.layers))
    sized = MorphKVPress(compression_ratio=0.5, cache_size=20).compress(state)  # cache_size wins
    assert all(layer.prefix.lengths == (20,) * state.num_kv_heads for layer in sized.layers)
    bigger = MorphKVPress(cache_size=10 * N).compress(state)  # more than the context: all kept, room to grow
    assert all(layer.prefix.lengths == (N,) * state.num_kv_heads and layer.budget == 10 * N for layer in bigger.layers)


def test_parameters_validated_and_json():
    press = MorphKVPress(compression_ratio=0.5)
    assert json.loads(press.params_json()) == {"window_size": 32, "fusion": "sum", "gqa_reduction": "max",
                                               "cache_size": None}
    assert MorphKVPress.evicts_during_decoding and MorphKVPress.needs_queries
    with pytest.raises(ValueError, match="fusion must be one of"):
        MorphKVPress(fusion="mean")
    with pytest.raises(ValueError, match="gqa_reduction must be one of"):
        MorphKVPress(gqa_reduction="sum")
    with pytest.raises(ValueError, match="window_size must be an integer >= 1"):
        MorphKVPress(window_size=0)
    with pytest.raises(ValueError, match="cache_size must be None or an integer >= 1"):
        MorphKVPress(cache_size=0)
    with pytest.raises(ValueError, match=r"compression_ratio must be a number in \[0, 1\)"):
        MorphKVPress(compression_ratio=1.0)
    with pytest.raises(ValueError, match="plans are not supported"):
        MorphKVPress(plan=kvray.budget.BudgetPlan.uniform(3, 2, 0.5))
    with pytest.raises(ValueError, match="needs a cache built by"):
        press.after_step(KVRayCache([KVRayLayer(prefix=RaggedKV.gather(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2),
                                                                         [torch.tensor([0])]), prefix_tokens=2)]), 0)


# ----------------------------------------------------------------------------- one lane for several sizes


def test_merged_lane_keeps_what_each_row_keeps_alone(tiny_llama, monkeypatch):
    """Three MorphKV caches of one prompt (different constant sizes) merged into one lane and fed
    the same tokens get the logits each gets decoded alone at every step and, after the steps,
    hold exactly the entries (per layer and KV head) and the window logits each holds alone.
    The one-token steps run in the ring layout, and the lane's attention blocks (a ragged
    prefix) follow them in place: built once per layer, not at every step."""
    attention = sys.modules["kvray.runtime.attention"]
    builds = []
    build = attention.DecodeBlocks.__init__

    def counting(self, *args, **kwargs):
        builds.append(1)
        build(self, *args, **kwargs)

    monkeypatch.setattr(attention.DecodeBlocks, "__init__", counting)
    lm = tiny_llama
    p = prompt(60, n_q=3, n_suffix=0)
    pre = prefill(lm, p, with_question=False)
    presses = [MorphKVPress(compression_ratio=r, window_size=4) for r in (0.25, 0.5, 0.75)]
    alone = [press.compress(pre.state(False)) for press in presses]
    lane = MorphKVPress.merge_lane([press.compress(pre.state(False)) for press in presses])
    first = lane.layers[0]
    assert isinstance(first, MorphKVLayer) and first.budgets == tuple(c.layers[0].budget for c in alone)
    assert len(set(first.budgets)) == 3
    g = torch.Generator().manual_seed(1)
    feeds = [p.question] + [[int(t)] for t in torch.randint(10, 1000, (10,), generator=g)]
    with torch.inference_mode():
        for step, toks in enumerate(feeds):
            if step == 3:  # step 1 laid the lane out as a ring, step 2 built its blocks
                builds.clear()
            got = lm.model(input_ids=torch.tensor([toks] * 3), cache=lane).logits[:, -1]
            presses[0].after_step(lane, step)
            for b, (press, cache) in enumerate(zip(presses, alone)):
                want = lm.model(input_ids=torch.tensor([toks]), cache=cache).logits[0, -1]
                press.after_step(cache, step)
                torch.testing.assert_close(got[b], want, atol=1e-4, rtol=1e-4)
    assert not builds and all(layer.ring for layer in lane.layers)
    for b, cache in enumerate(alone):
        for mine, ref in zip(lane.layers, cache.layers):
            mine.canonical(), ref.canonical()  # both back in position order (a ring's order is its own)
            s, e = mine.prefix.row_span(b)
            assert mine.prefix.row_lengths(b) == ref.prefix.lengths
            assert torch.equal(mine.prefix.positions[s:e], ref.prefix.positions)
            torch.testing.assert_close(mine.prefix.keys[s:e], ref.prefix.keys)
            torch.testing.assert_close(mine.row_logits[b], ref.window_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("query_aware", [False, True])
def test_run_configs_decodes_morphkv_sizes_in_one_lane(tiny_llama, monkeypatch, query_aware):
    """run_configs puts MorphKV at several ratios (same window) in one lane: one 3-row forward per
    step instead of three 1-row ones; a different window gets a lane of its own; every config
    gets the tokens and bytes it gets alone."""
    dec_mod = sys.modules["kvray.runtime.decoder"]
    forward, calls = dec_mod.forward, []

    def recording_forward(lm, rows, cache, positions=None):
        calls.append(len(rows))
        return forward(lm, rows, cache, positions=positions)

    monkeypatch.setattr(dec_mod, "forward", recording_forward)
    pre = prefill(tiny_llama, prompt(120))
    same = [MorphKVPress(compression_ratio=r, window_size=8) for r in (0.25, 0.5, 0.75)]
    other = MorphKVPress(compression_ratio=0.5, window_size=4)
    presses = [same[0], kvray.make_press("snapkv", compression_ratio=0.5), same[1], other, same[2]]
    calls.clear()
    together = run_configs(tiny_llama, pre, presses, query_aware, 10, ignore_eos=True)
    lane_calls = list(calls)
    for press, out in zip(presses, together):
        calls.clear()
        alone = run_configs(tiny_llama, pre, [press], query_aware, 10, ignore_eos=True)[0]
        assert out.token_ids == alone.token_ids
        assert out.stats.kv_bytes_kept == alone.stats.kv_bytes_kept
        assert len(out.token_ids) == 10
    # the lane of three takes as many forwards as one of them alone; snapkv and the other window
    # one row each (as many again)
    assert set(calls) == {1} and lane_calls.count(3) == len(calls) and lane_calls.count(1) == 2 * len(calls)


def test_merge_lane_refuses_other_prompts(tiny_llama):
    press = MorphKVPress(compression_ratio=0.5, window_size=4)
    a = press.compress(prefill(tiny_llama, prompt(40)).state(False))
    b = press.compress(prefill(tiny_llama, prompt(50)).state(False))
    with pytest.raises(ValueError, match="one prompt"):
        MorphKVPress.merge_lane([a, b])

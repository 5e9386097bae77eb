"""Contract over every registered method, and reference tests of the scoring rules."""

import math

import pytest
import torch

import kvray
from conftest import reference_logits
from kvray.budget import head_adaptive_counts, keep_count, pyramid_layer_counts
from kvray.generate import PromptTokens, prefill
from kvray.presses import LayerInputs, PrefillState, list_methods, make_press

N_CONTEXT = 203  # odd on purpose


def prompt(n_ctx=N_CONTEXT, n_q=9, n_suffix=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 1000, (n_ctx + n_q + n_suffix,), generator=g).tolist()
    return PromptTokens(ids[:n_ctx], ids[n_ctx:n_ctx + n_q], ids[n_ctx + n_q:])


def ratio_for(method, ratio):
    return 0.0 if method == "full" else ratio


HEAD_ADAPTIVE = {"adakv", "lava"}      # per-head budgets inside a layer
LAYER_ADAPTIVE = {"pyramidkv", "lava"}  # per-layer budgets


@pytest.mark.parametrize("query_aware", [False, True])
@pytest.mark.parametrize("method", list_methods())
def test_contract_every_method(tiny_lm, method, query_aware):
    pre = prefill(tiny_lm, prompt(), capture_hidden=True)
    state = pre.state(query_aware)
    N = state.n_tokens
    assert N == N_CONTEXT + (9 + 4 if query_aware else 0)
    for ratio in (0.25, 0.5, 0.8):
        press = make_press(method, compression_ratio=ratio_for(method, ratio))
        cache = press.compress(state)
        # shapes and budgets: per-head counts are exactly what the allocation says
        scores = [press.score(layer) for layer in state.layers]
        for s in scores:
            assert s.shape == (1, state.num_kv_heads, N)
        counts = press.allocate(state, scores)
        # a hybrid model's sliding layers keep their window, the others what the allocation says
        assert len(cache.layers) == tiny_lm.num_layers == len(state.layers) + len(state.windowed)
        assert [i for i, layer in enumerate(cache.layers) if layer.window is None] == tiny_lm.compressed_layers
        held = [list(layer.prefix.lengths) for layer in cache.layers if layer.window is None]
        assert held == counts
        for w in state.windowed:
            assert list(cache.layers[w.layer_idx].prefix.lengths) == [min(N, w.window - 1)] * state.num_kv_heads
        if method not in HEAD_ADAPTIVE:
            # uniform heads inside each layer
            assert all(len(set(row)) == 1 for row in held)
        if method not in HEAD_ADAPTIVE | LAYER_ADAPTIVE | {"full"}:
            assert all(row[0] == keep_count(N, ratio) for row in held)
        # memory really held, within 2% of the target
        full_bytes = state.kv_bytes()
        target = (1 - press.target_ratio) * full_bytes
        assert abs(cache.prefix_nbytes() - target) <= 0.02 * full_bytes
        d = tiny_lm.head_dim
        assert cache.prefix_nbytes() == cache.prefix_entries() * 2 * d * 4
        assert cache.nbytes() == cache.prefix_nbytes() + cache.window_nbytes()
        # the full prefill cache is untouched
        assert state.layers[0].keys.shape[2] == N
        # determinism
        again = press.compress(state)
        for a, b in zip(cache.layers, again.layers):
            assert torch.equal(a.prefix.positions, b.prefix.positions)
        # kept positions are distinct, sorted, in range, per head
        for layer in cache.layers:
            for bh in range(len(layer.prefix.lengths)):
                s, e = layer.prefix.offsets[bh], layer.prefix.offsets[bh + 1]
                pos = layer.prefix.positions[s:e]
                assert torch.all(pos[1:] > pos[:-1]) and (pos.numel() == 0 or (0 <= pos.min() and pos.max() < N))


@pytest.mark.parametrize("method", list_methods())
def test_ratio_zero_is_the_identity(tiny_lm, method):
    """Logits of question + suffix on a ratio-0 compressed cache equal the model's own (transformers'
    SDPA attention; on the sliding-window models the window binds: 76 tokens, window 24)."""
    p = prompt(n_ctx=64)
    ref = reference_logits(tiny_lm, p.context + p.question + p.suffix)[len(p.context):]
    with torch.inference_mode():
        pre = prefill(tiny_lm, p, capture_hidden=True)
        cache = make_press(method, compression_ratio=0.0).compress(pre.state(False))
        out = tiny_lm.model(input_ids=torch.tensor([p.question + p.suffix]), cache=cache).logits[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_compressed_decoding_keeps_true_positions(tiny_llama):
    """Evicting entries must not shift positions: with a random press at ratio 0.5, the logits
    equal a dense model run where evicted entries are masked out (same-for-all-heads eviction)."""
    p = prompt(n_ctx=40, n_q=3, n_suffix=0)
    pre = prefill(tiny_llama, p, with_question=False)
    state = pre.state(False)
    keep = torch.ones(40, dtype=torch.bool)
    keep[torch.tensor([3, 7, 8, 20, 33])] = False
    idx = keep.nonzero().flatten()

    class Fixed(kvray.Press):
        name = "fixed"

        def select(self, state):
            return [[idx] * state.num_kv_heads for _ in state.layers]

    cache = Fixed().compress(state)
    q = torch.tensor([p.question])
    with torch.inference_mode():
        out = tiny_llama.model(input_ids=q, cache=cache).logits[0]
        full_ids = torch.tensor([p.context + p.question])
        n = full_ids.shape[1]
        mask = torch.tril(torch.ones(n, n, dtype=torch.bool))
        mask[40:, :40] &= keep  # only the rows after compression see the eviction
        eager = tiny_llama.model.config._attn_implementation
        tiny_llama.model.set_attn_implementation("eager")
        try:
            bias = torch.zeros(1, 1, n, n).masked_fill(~mask, float("-inf"))
            ref = tiny_llama.model(input_ids=full_ids, attention_mask=bias).logits[0, 40:]
        finally:
            tiny_llama.model.set_attn_implementation(eager)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- clear errors


def test_unknown_method_lists_the_registry():
    with pytest.raises(ValueError, match="known methods:.*snapkv.*Did you mean 'snapkv'"):
        make_press("snapkw")


def test_unknown_parameter_lists_the_parameters():
    with pytest.raises(ValueError, match="no parameter 'window'.*did you mean 'window_size'.*kernel_size"):
        make_press("snapkv", window=3)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.5", True])
def test_bad_ratio(bad):
    with pytest.raises(ValueError, match=r"compression_ratio must be a number in \[0, 1\)"):
        make_press("knorm", compression_ratio=bad)


def test_bad_method_parameters():
    with pytest.raises(ValueError, match="kernel_size must be an odd"):
        make_press("snapkv", kernel_size=4)
    with pytest.raises(ValueError, match="pooling must be one of"):
        make_press("snapkv", pooling="median")
    with pytest.raises(ValueError, match="alpha"):
        make_press("adakv", alpha=1.5)
    with pytest.raises(ValueError, match="full keeps every entry"):
        make_press("full", compression_ratio=0.5)


def test_adakv_takes_its_scorer_parameters():
    p = make_press("adakv", compression_ratio=0.5, scorer="knorm")
    assert p.inner.name == "knorm" and not p.needs_queries
    p = make_press("adakv", compression_ratio=0.5, window_size=16, kernel_size=3)
    assert p.inner.window_size == 16 and p.params()["window_size"] == 16
    with pytest.raises(ValueError, match="no parameter 'n_sink'"):
        make_press("adakv", scorer="snapkv", n_sink=3)


def test_registry_builds_fresh_objects_and_refuses_duplicates():
    from kvray.presses import SnapKVPress, register

    assert make_press("snapkv") is not make_press("snapkv")
    with pytest.raises(ValueError, match="already registered"):
        register(SnapKVPress)


# ----------------------------------------------------------------------------- references


def slow_snapkv_scores(q, qpos, keys, window, kernel, pooling, gqa):
    """SnapKV by loops: q [Hq, W, d] at positions qpos, keys [H, N, d] -> [H, N] before protection."""
    Hq, _, d = q.shape
    H, N, _ = keys.shape
    G = Hq // H
    q, qpos = q[:, -window:], qpos[-window:]
    per_q_head = torch.zeros(Hq, N, dtype=torch.float64)
    for hq in range(Hq):
        k = keys[hq // G].double()
        rows = []
        for i in range(q.shape[1]):
            logits = k @ q[hq, i].double() / math.sqrt(d)
            logits[qpos[i] + 1:] = -math.inf
            rows.append(torch.softmax(logits, 0))
        per_q_head[hq] = torch.stack(rows).mean(0)
    grouped = torch.zeros(H, N, dtype=torch.float64)
    for h in range(H):
        members = per_q_head[h * G:(h + 1) * G]
        grouped[h] = members.mean(0) if gqa == "mean" else members.max(0).values
    pooled = torch.zeros_like(grouped)
    r = kernel // 2
    for h in range(H):
        for j in range(N):
            win = grouped[h, max(0, j - r): j + r + 1]
            pooled[h, j] = win.max() if pooling == "max" else win.mean()
    return pooled


@pytest.mark.parametrize("pooling,gqa,kernel", [("max", "mean", 7), ("avg", "max", 5), ("max", "max", 1)])
def test_snapkv_against_slow_reference(pooling, gqa, kernel):
    torch.manual_seed(3)
    H, G, N, d, W = 2, 3, 23, 8, 5
    keys, values = torch.randn(1, H, N, d), torch.randn(1, H, N, d)
    qpos = torch.arange(N - W, N)
    queries = torch.randn(1, H * G, W, d)
    layer = LayerInputs(0, keys, values, queries, qpos)
    press = make_press("snapkv", compression_ratio=0.5, window_size=W, kernel_size=kernel, pooling=pooling,
                       gqa_reduction=gqa)
    got = press.score(layer)[0]
    want = slow_snapkv_scores(queries[0], qpos, keys[0], W, kernel, pooling, gqa)
    torch.testing.assert_close(got[:, : N - W].double(), want[:, : N - W], atol=1e-6, rtol=1e-5)
    # window protected above every real score, and kept
    assert got[:, N - W:].min() > got[:, : N - W].max()
    state = PrefillState([layer], N)
    kept = press.select(state)[0]
    k = keep_count(N, 0.5)
    for h in range(H):
        assert set(range(N - W, N)) <= set(kept[h].tolist())
        rest = [j for j in kept[h].tolist() if j < N - W]
        # compared as values: max-pooling makes ties between neighbours
        expect = torch.topk(want[h, : N - W], k - W).values
        assert sorted(want[h, rest].tolist()) == pytest.approx(sorted(expect.tolist()))


def test_pyramid_budgets_hand_computed():
    # N=100, ratio 0.5 -> mean 50, min 50/20 = 2.5, max 97.5: 97.5, 65.83, 34.17, 2.5
    assert pyramid_layer_counts(4, 100, 0.5, beta=20) == [98, 66, 34, 2]
    # ratio 0.2 -> mean 80, max would be 156 > N: clipped to 100, min = 60
    assert pyramid_layer_counts(3, 100, 0.2, beta=20) == [100, 80, 60]
    counts = pyramid_layer_counts(30, 1001, 0.75)
    assert sum(counts) == 30 * keep_count(1001, 0.75) and counts == sorted(counts, reverse=True)


def test_pyramidkv_uses_pyramid_counts_with_snapkv_ranking():
    torch.manual_seed(4)
    L, H, N, d, W = 4, 2, 100, 8, 4
    layers = [LayerInputs(i, torch.randn(1, H, N, d), torch.randn(1, H, N, d), torch.randn(1, H * 2, W, d),
                          torch.arange(N - W, N)) for i in range(L)]
    state = PrefillState(layers, N)
    press = make_press("pyramidkv", compression_ratio=0.5, window_size=W)
    snap = make_press("snapkv", compression_ratio=0.5, window_size=W)
    kept = press.select(state)
    assert [len(k[0]) for k in kept] == [98, 66, 34, 2]
    for i, layer in enumerate(layers):
        s = snap.score(layer)[0]
        for h in range(H):
            expect = torch.topk(s[h], len(kept[i][h])).indices.sort().values
            assert kept[i][h].tolist() == expect.tolist()


def test_head_adaptive_counts_hand_computed():
    s = torch.tensor([[9.0, 8, 1, 0], [7, 2, 1, 0]])
    assert head_adaptive_counts(s, 4, alpha=0.5) == [2, 2]
    s = torch.tensor([[9.0, 8, 7, 6], [1, 0, 0, 0]])
    assert head_adaptive_counts(s, 4, alpha=0.5) == [3, 1]   # 0.5*2 + 0.5*{4, 0}
    assert head_adaptive_counts(s, 4, alpha=0.2) == [4, 0]   # 3.6, 0.4 -> largest remainder
    assert head_adaptive_counts(s, 4, alpha=1.0) == [2, 2]   # alpha = 1 is uniform


def test_adakv_selection_against_slow_reference():
    torch.manual_seed(5)
    H, G, N, d, W = 3, 3, 40, 8, 4
    layer = LayerInputs(0, torch.randn(1, H, N, d), torch.randn(1, H, N, d), torch.randn(1, H * G, W, d),
                        torch.arange(N - W, N))
    press = make_press("adakv", compression_ratio=0.75, window_size=W, kernel_size=3, alpha=0.2)
    kept = press.select(PrefillState([layer], N))[0]
    s = make_press("snapkv", window_size=W, kernel_size=3).score(layer)[0]
    B = keep_count(N, 0.75)
    # slow: rank all (head, token) pairs, count winners per head, floor alpha
    pairs = sorted(((float(s[h, j]), h, j) for h in range(H) for j in range(N)), reverse=True)[: H * B]
    wins = [sum(1 for _, h, _ in pairs if h == hh) for hh in range(H)]
    caps = [0.2 * B + 0.8 * w for w in wins]
    assert sum(len(k) for k in kept) == H * B
    for h in range(H):
        assert abs(len(kept[h]) - caps[h]) < 1.0
        # the head's own top scores (compared as values: max-pooling makes ties between neighbours)
        expect = sorted((float(s[h, j]) for j in range(N)), reverse=True)[: len(kept[h])]
        assert sorted(s[h, kept[h]].tolist(), reverse=True) == pytest.approx(expect)
        assert set(range(N - W, N)) <= set(kept[h].tolist())  # window kept in every head
    assert len(set(len(k) for k in kept)) > 1  # really head-adaptive here


@pytest.mark.parametrize("pooling,gqa,kernel", [("max", "mean", 7), ("avg", "max", 3)])
def test_snapkv_question_observation_against_slow_reference(pooling, gqa, kernel):
    """observation="question": the question's rows are the window; everything from the question
    on (question, template, answer prefix) is kept, and at least the last window_size tokens."""
    torch.manual_seed(6)
    H, G, N, d, captured, q0, q1 = 2, 3, 31, 8, 12, 19, 24  # question at [19, 24), 7 suffix tokens
    keys, values = torch.randn(1, H, N, d), torch.randn(1, H, N, d)
    qpos = torch.arange(N - captured, N)
    queries = torch.randn(1, H * G, captured, d)
    layer = LayerInputs(0, keys, values, queries, qpos, question=(q0, q1))
    press = make_press("snapkv", compression_ratio=0.5, window_size=4, kernel_size=kernel, pooling=pooling,
                       gqa_reduction=gqa, observation="question")
    got = press.score(layer)[0]
    rows = (qpos >= q0) & (qpos < q1)
    want = slow_snapkv_scores(queries[0][:, rows], qpos[rows], keys[0], q1 - q0, kernel, pooling, gqa)
    torch.testing.assert_close(got[:, :q0].double(), want[:, :q0], atol=1e-6, rtol=1e-5)
    assert got[:, q0:].min() > got[:, :q0].max()
    kept = press.select(PrefillState([layer], N))[0]
    k = keep_count(N, 0.5)
    for h in range(H):
        assert len(kept[h]) == k and set(range(q0, N)) <= set(kept[h].tolist())
        rest = [j for j in kept[h].tolist() if j < q0]
        expect = torch.topk(want[h, :q0], k - (N - q0)).values
        assert sorted(want[h, rest].tolist()) == pytest.approx(sorted(expect.tolist()))
    # a window_size longer than question + suffix keeps the last window_size tokens
    wide = make_press("snapkv", compression_ratio=0.5, window_size=15, kernel_size=kernel, pooling=pooling,
                      gqa_reduction=gqa, observation="question").score(layer)[0]
    assert wide[:, N - 15:].min() > wide[:, : N - 15].max()
    torch.testing.assert_close(wide[:, : N - 15].double(), want[:, : N - 15], atol=1e-6, rtol=1e-5)
    # without a compressed question it is the last window_size rows, as observation="last"
    plain = LayerInputs(0, keys, values, queries, qpos)
    last = make_press("snapkv", compression_ratio=0.5, window_size=5, observation="last")
    as_last = make_press("snapkv", compression_ratio=0.5, window_size=5, observation="question")
    torch.testing.assert_close(as_last.score(plain), last.score(plain))


def test_question_observation_reads_the_question_rows_of_the_prefill(tiny_llama):
    """The question's rows of the whole-prompt prefill are those of a prefill that stops at the
    question (causal attention), however small capture_window is; both protocols."""
    p = prompt(n_q=9, n_suffix=6)
    n_ctx, n_q = len(p.context), len(p.question)
    pre = prefill(tiny_llama, p, capture_window=4)
    aware, agnostic = pre.state(True), pre.state(False)
    assert aware.layers[0].question == (n_ctx, n_ctx + n_q) and agnostic.layers[0].question is None
    question = make_press("snapkv", compression_ratio=0.5, window_size=4, observation="question")
    # reference: prefill only context + question; its last n_q rows are the question
    upto = prefill(tiny_llama, PromptTokens(p.context, p.question, []), capture_window=n_q).state(True)
    last = make_press("snapkv", compression_ratio=0.5, window_size=n_q)
    for layer, ref in zip(aware.layers, upto.layers):
        torch.testing.assert_close(question.score(layer)[..., :n_ctx], last.score(ref)[..., :n_ctx])
    kept = question.select(aware)
    assert all(set(range(n_ctx, aware.n_tokens)) <= set(k.tolist()) for heads in kept for k in heads)
    # query-agnostic: no question among the compressed tokens, the last window_size rows
    fallback = make_press("snapkv", compression_ratio=0.5, window_size=4)
    for layer in agnostic.layers:
        torch.testing.assert_close(question.score(layer), fallback.score(layer))
    with pytest.raises(ValueError, match="observation must be one of.*'last'.*'question'"):
        make_press("snapkv", observation="query")

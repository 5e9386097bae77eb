"""OBCache: saliencies against loops straight from the closed forms, hand-checked cases, hosts,
budgets and the tiny models end to end."""

import math

import pytest
import torch

from kvray.budget import keep_count
from kvray.generate import PromptTokens, prefill, run_configs
from kvray.presses import LayerInputs, PrefillState
from kvray.presses.obcache import OBCachePress

VARIANTS = ("value", "key", "joint")


def slow_saliency(q, qpos, keys, values, window, variant):
    """OBCache by loops: q [Hq, Wc, d] at qpos, keys/values [H, N, d] -> [H, N] (sum over the group)."""
    Hq, _, d = q.shape
    H, N, _ = keys.shape
    G = Hq // H
    q, qpos = q[:, -window:].double(), qpos[-window:].tolist()
    keys, values = keys.double(), values.double()
    out = torch.zeros(H, N, dtype=torch.float64)
    for hq in range(Hq):
        h = hq // G  # query head hq reads KV head hq // G
        for i in range(q.shape[1]):
            seen = qpos[i] + 1
            z = [float(q[hq, i] @ keys[h, p]) / math.sqrt(d) for p in range(seen)]
            m = max(z)
            e = [math.exp(x - m) for x in z]
            a = [x / sum(e) for x in e]
            o = sum(a[p] * values[h, p] for p in range(seen))
            for p in range(seen):
                v = values[h, p]
                s_v = a[p] ** 2 * float(v @ v)
                s_k = (a[p] * z[p]) ** 2 * float((v - o) @ (v - o))
                cross = 2 * a[p] ** 2 * z[p] * (float(v @ v) - float(v @ o))
                # the three terms are the squared first-order change of o_i, ||A (v + Z (v - o))||^2
                delta = a[p] * (v + z[p] * (v - o))
                assert s_v + s_k + cross == pytest.approx(float(delta @ delta), rel=1e-9, abs=1e-12)
                out[h, p] += {"value": s_v, "key": s_k, "joint": s_v + s_k + cross}[variant]
    return out


def slow_pool(x, kernel, how):
    n, r = x.shape[-1], kernel // 2
    y = torch.empty_like(x)
    for h in range(x.shape[0]):
        for j in range(n):
            win = x[h, max(0, j - r): min(n, j + r + 1)]
            y[h, j] = win.max() if how == "max" else win.mean()
    return y


def random_layer(H, G, N, d, Wc, seed):
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(2, H, N, d, generator=g), torch.randn(2, H, N, d, generator=g)
    queries = torch.randn(2, H * G, Wc, d, generator=g)
    return LayerInputs(0, keys, values, queries, torch.arange(N - Wc, N))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("G,N,W", [(2, 7, 3), (3, 13, 5), (2, 37, 5), (3, 37, 8)])
def test_saliencies_against_slow_loops(variant, G, N, W):
    H, d, Wc = 2, 4, min(N, 8)  # more rows captured than the window uses
    layer = random_layer(H, G, N, d, Wc, seed=N + G)
    press = OBCachePress(window_size=W, variant=variant, pooling="none")
    got = press.raw_scores(layer)
    for b in range(2):
        want = slow_saliency(layer.queries[b], layer.query_positions, layer.keys[b], layer.values[b], W, variant)
        torch.testing.assert_close(got[b].double(), want, atol=1e-5, rtol=1e-4)
    if variant == "joint":  # a sum of squared norms (see slow_saliency)
        assert got.min() > -1e-6
    # score = raw on the prefix (no pooling), the window above every real score
    s = press.score(layer)
    torch.testing.assert_close(s[..., : N - W], got[..., : N - W])
    assert (s[..., N - W:].amin(-1) > s[..., : N - W].amax(-1)).all()


@pytest.mark.parametrize("pooling,kernel", [("max", 7), ("avg", 5), ("max", 3)])
def test_pooling_covers_the_prefix_only(pooling, kernel):
    H, G, N, d, W = 2, 3, 37, 4, 5
    layer = random_layer(H, G, N, d, 6, seed=1)
    press = OBCachePress(window_size=W, kernel_size=kernel, pooling=pooling, variant="key")
    raw = press.raw_scores(layer)
    s = press.score(layer)
    for b in range(2):
        want = slow_pool(raw[b, :, : N - W].double(), kernel, pooling)
        torch.testing.assert_close(s[b, :, : N - W].double(), want, atol=1e-6, rtol=1e-5)


def hand_layer(G):
    """One KV head, d = 1, N = 3 tokens, one window row at position 2 with q = 1:
    Z = k = [0, ln 3, ln 4] -> A = [1/8, 3/8, 4/8]; v = [2, 2, 0] -> o = 2/8 + 6/8 = 1."""
    keys = torch.tensor([0.0, math.log(3), math.log(4)]).view(1, 1, 3, 1)
    values = torch.tensor([2.0, 2.0, 0.0]).view(1, 1, 3, 1)
    queries = torch.ones(1, G, 1, 1)  # G identical query heads
    return LayerInputs(0, keys, values, queries, torch.tensor([2]))


@pytest.mark.parametrize("G", [1, 2])
def test_hand_checked_tiny_case(G):
    L = math.log(3)
    # token 0: A = 1/8, Z = 0 -> only the value term: (1/8)^2 * 4 = 1/16
    # token 1: A = 3/8, Z = ln 3, v = 2, o = 1: value (9/64) * 4 = 9/16, key (9/64) L^2 (2-1)^2,
    #          cross 2 (9/64) L (4 - 2) = 9L/16;  joint = (9/64)(2 + L)^2
    want = {"value": [1 / 16, 9 / 16], "key": [0.0, 9 * L**2 / 64], "joint": [1 / 16, 9 * (2 + L) ** 2 / 64]}
    layer = hand_layer(G)
    for variant, (s0, s1) in want.items():
        press = OBCachePress(window_size=1, variant=variant, pooling="none")
        got = press.raw_scores(layer)[0, 0]
        # GQA sums the group: G identical heads give G times one head's saliency
        torch.testing.assert_close(got[:2], G * torch.tensor([s0, s1]), atol=1e-6, rtol=1e-6)
        # token 2 is the window: kept whatever its saliency
        assert press.score(layer)[0, 0, 2] > got[:2].max()


def multi_layer_state(L=3, H=3, G=2, N=41, d=4, Wc=8, seed=7):
    layers = []
    for i in range(L):
        g = torch.Generator().manual_seed(seed + i)
        k, v = torch.randn(1, H, N, d, generator=g), torch.randn(1, H, N, d, generator=g)
        # heads of unequal scale, so the saliencies favour some heads
        v = v * torch.tensor([0.2, 1.0, 3.0]).view(1, H, 1, 1)
        q = torch.randn(1, H * G, Wc, d, generator=g) * 2
        layers.append(LayerInputs(i, k, v, q, torch.arange(N - Wc, N)))
    return PrefillState(layers, N)


@pytest.mark.parametrize("variant", VARIANTS)
def test_snapkv_host_uniform_budgets_and_window(variant):
    state = multi_layer_state()
    N, H = state.n_tokens, state.num_kv_heads
    press = OBCachePress(compression_ratio=0.6, window_size=4, variant=variant)
    kept = press.select(state)
    k = keep_count(N, 0.6)
    for layer, idx in zip(state.layers, kept):
        s = press.score(layer)[0]
        for h in range(H):
            assert len(idx[h]) == k
            assert set(range(N - 4, N)) <= set(idx[h].tolist())
            expect = sorted(s[h].tolist(), reverse=True)[:k]  # as values: max-pooling makes ties
            assert sorted(s[h, idx[h]].tolist(), reverse=True) == pytest.approx(expect)
    again = press.select(state)
    assert all(torch.equal(a, b) for x, y in zip(kept, again) for a, b in zip(x, y))
    cache = press.compress(state)
    assert cache.nbytes() / state.kv_bytes() == pytest.approx(1 - 0.6, abs=0.02)


@pytest.mark.parametrize("alpha", [0.2, 0.5])
def test_adakv_host_budgets(alpha):
    state = multi_layer_state()
    N, H = state.n_tokens, state.num_kv_heads
    ratio = 0.75
    B = keep_count(N, ratio)
    press = OBCachePress(compression_ratio=ratio, window_size=4, host="adakv", alpha=alpha)
    scores = [press.score(layer) for layer in state.layers]
    counts = press.allocate(state, scores)
    cache = press.compress(state)
    assert [list(layer.prefix.lengths) for layer in cache.layers] == counts  # real per-head budgets
    adaptive = False
    for s, row in zip(scores, counts):
        assert sum(row) == H * B                         # the layer budget, exactly
        assert min(row) >= math.floor(alpha * B)         # the floor
        # slow AdaKV: rank all (head, token) pairs of the layer, count winners per head
        pairs = sorted(((float(s[0, h, j]), h) for h in range(H) for j in range(N)), reverse=True)[: H * B]
        wins = [sum(1 for _, h in pairs if h == hh) for hh in range(H)]
        for h in range(H):
            assert abs(row[h] - (alpha * B + (1 - alpha) * wins[h])) < 1.0
        adaptive |= len(set(row)) > 1
    assert adaptive
    assert cache.nbytes() / state.kv_bytes() == pytest.approx(1 - ratio, abs=0.02)


def test_ratio_zero_keeps_everything():
    state = multi_layer_state()
    for host in ("snapkv", "adakv"):
        kept = OBCachePress(host=host).select(state)
        assert all(idx.tolist() == list(range(state.n_tokens)) for layer in kept for idx in layer)


def test_defaults_params_and_errors():
    p = OBCachePress()
    assert p.needs_queries and p.name == "obcache"
    assert p.params() == {"window_size": 16, "kernel_size": 7, "pooling": "max", "variant": "joint",
                          "host": "snapkv", "alpha": 0.2}
    p.params_json()
    for bad, match in [(dict(variant="qk"), "variant must be one of"),
                       (dict(host="h2o"), "host must be one of"),
                       (dict(alpha=1.5), r"alpha .* \[0, 1\]"),
                       (dict(window_size=0), "window_size"),
                       (dict(kernel_size=4), "kernel_size must be an odd"),
                       (dict(pooling="median"), "pooling must be")]:
        with pytest.raises(ValueError, match=match):
            OBCachePress(**bad)


def test_needs_queries():
    layer = random_layer(1, 1, 7, 4, 3, seed=0)
    with pytest.raises(ValueError, match="window queries"):
        OBCachePress().score(LayerInputs(0, layer.keys, layer.values))


@pytest.mark.parametrize("query_aware", [False, True])
def test_tiny_models_end_to_end(tiny_lm, query_aware):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (97 + 7 + 3,), generator=g).tolist()
    pre = prefill(tiny_lm, PromptTokens(ids[:97], ids[97:104], ids[104:]), capture_window=16)
    presses = [OBCachePress(compression_ratio=0.5, variant=v, host=h)
               for v, h in [("joint", "snapkv"), ("key", "adakv"), ("value", "snapkv")]]
    outs = run_configs(tiny_lm, pre, presses, query_aware, max_new_tokens=3)
    for out in outs:
        s = out.stats
        assert 0 < s.new_tokens <= 3
        assert abs(s.kv_bytes_kept / s.kv_bytes_full - 0.5) <= 0.02
    state = pre.state(query_aware)
    counts = presses[1].allocate(state, [presses[1].score(layer) for layer in state.layers])
    assert all(sum(row) == state.num_kv_heads * keep_count(state.n_tokens, 0.5) for row in counts)

"""CurDKV: scores against slow loop references, leverage against an explicit SVD, budgets,
determinism and end-to-end decoding on the tiny models."""

import json

import pytest
import torch

from kvray.budget import keep_count
from kvray.generate import PromptTokens, prefill, run_configs
from kvray.presses import LayerInputs, PrefillState
from kvray.presses.curdkv import CurDKVPress, row_leverage


def slow_energy(x, estimator, rank, G=None):
    """Leverage of each row of x [N, d] by loops (fp64)."""
    N, d = x.shape
    x = x.double()
    if estimator == "svd":
        U, S, _ = torch.linalg.svd(x, full_matrices=False)
        r = int((S > S[0] * 1e-10).sum().clamp(max=rank))
        return [float(sum(U[i, j] ** 2 for j in range(r))) for i in range(N)]
    out = []
    for i in range(N):
        row = x[i] if estimator == "norm" else torch.stack([sum(x[i, a] * G[a, c] for a in range(d))
                                                            for c in range(G.shape[1])])
        out.append(float(sum(v * v for v in row)))
    return out


def slow_curdkv(keys, values, leverage="kv_product", estimator="norm", rank=20, window=16, sinks=4, G=None):
    """CurDKV scores by loops: keys/values [H, N, d] -> [H, N] before sink protection."""
    H, N, _ = keys.shape
    out = torch.zeros(H, N, dtype=torch.float64)
    for h in range(H):
        k = slow_energy(keys[h], estimator, rank, G)
        v = slow_energy(values[h], estimator, rank, G)
        if window:
            kn, vn = [], []
            for i in range(N):
                lo = (i // window) * window
                hi = min(N, lo + window)
                kn.append(k[i] / (sum(k[lo:hi]) / (hi - lo)))
                vn.append(v[i] / (sum(v[lo:hi]) / (hi - lo)))
            k, v = kn, vn
        s = [{"kv_product": a * b, "kv_avg": (a + b) / 2, "key": a, "value": b}[leverage] for a, b in zip(k, v)]
        total = sum(s)
        out[h] = torch.tensor([x / total for x in s], dtype=torch.float64)
    return out


def layer_of(H, N, d, G=1, W=3, seed=0, idx=0):
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(1, H, N, d, generator=g), torch.randn(1, H, N, d, generator=g)
    keys = keys * (1 + 3 * torch.rand(1, H, N, 1, generator=g))  # varied norms, as real keys
    q = torch.randn(1, H * G, W, d, generator=g)
    return LayerInputs(idx, keys, values, q, torch.arange(N - W, N))


@pytest.mark.parametrize("N", [7, 13, 37])
@pytest.mark.parametrize("leverage", ["kv_product", "kv_avg", "key", "value"])
@pytest.mark.parametrize("window", [16, 5, 0])
def test_scores_against_slow_reference(N, leverage, window):
    H, d, sinks = 2, 8, 3
    layer = layer_of(H, N, d, seed=N)
    press = CurDKVPress(compression_ratio=0.5, leverage=leverage, local_window_size=window, num_sinks=sinks)
    got = press.score(layer)[0]
    want = slow_curdkv(layer.keys[0], layer.values[0], leverage, window=window)
    torch.testing.assert_close(got[:, sinks:].double(), want[:, sinks:], atol=1e-6, rtol=1e-5)
    # sinks strictly above every real score, in every head
    assert got[:, :sinks].min() > got[:, sinks:].max()


@pytest.mark.parametrize("N", [7, 13, 37])
def test_gaussian_sketch_against_slow_reference(N):
    H, d, rank = 2, 8, 5
    layer = layer_of(H, N, d, seed=10 + N, idx=2)
    press = CurDKVPress(estimator="gaussian", rank=rank, seed=7, num_sinks=0)
    G = press.sketch(2, d, "cpu")
    assert G.shape == (d, rank)
    got = press.score(layer)[0]
    want = slow_curdkv(layer.keys[0], layer.values[0], "kv_product", "gaussian", rank, G=G.double(), sinks=0)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-4)
    # seeded: same G for the same (seed, layer), another for another layer or seed; global RNG untouched
    state = torch.random.get_rng_state()
    assert torch.equal(press.sketch(2, d, "cpu"), G)
    assert not torch.equal(press.sketch(3, d, "cpu"), G)
    assert not torch.equal(CurDKVPress(estimator="gaussian", rank=rank, seed=8).sketch(2, d, "cpu"), G)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_gaussian_sketch_is_unbiased_for_row_energy():
    # E ||x G||^2 = ||x||^2 for G ~ N(0, 1/r): average over many seeds
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    est = torch.stack([row_leverage(x, "gaussian", 20, CurDKVPress(seed=s).sketch(0, 16, "cpu")) for s in range(400)])
    torch.testing.assert_close(est.mean(0), row_leverage(x, "norm", 20), rtol=0.05, atol=0)


@pytest.mark.parametrize("N,d,rank", [(13, 6, 3), (37, 8, 8), (37, 8, 20), (7, 8, 20)])
def test_svd_leverage_against_explicit_svd(N, d, rank):
    x = torch.randn(2, N, d, generator=torch.Generator().manual_seed(N + rank)) * torch.linspace(0.5, 3, d)
    got = row_leverage(x, "svd", rank)
    for h in range(2):
        torch.testing.assert_close(got[h].double(), torch.tensor(slow_energy(x[h], "svd", rank), dtype=torch.float64), atol=1e-5, rtol=1e-4)
    # full rank: the diagonal of the hat matrix x (x^T x)^-1 x^T, summing to rank(x)
    if rank >= min(N, d):
        r = min(N, d)
        assert got.sum(-1).tolist() == pytest.approx([r, r], rel=1e-4)
        if N > d:
            xd = x.double()
            hat = torch.diagonal(xd @ torch.linalg.inv(xd.transpose(-1, -2) @ xd) @ xd.transpose(-1, -2), dim1=-2, dim2=-1)
            torch.testing.assert_close(got.double(), hat, atol=1e-5, rtol=1e-4)
        else:
            torch.testing.assert_close(got, torch.ones_like(got), atol=1e-5, rtol=0)  # N <= d: every row is needed


def test_svd_estimator_scores_against_slow_reference():
    H, N, d = 2, 37, 8
    layer = layer_of(H, N, d, seed=3)
    got = CurDKVPress(estimator="svd", rank=4, num_sinks=0).score(layer)[0]
    want = slow_curdkv(layer.keys[0], layer.values[0], estimator="svd", rank=4, sinks=0)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-4)


def test_hand_checked_and_keeps_high_norms():
    # one head, 6 tokens, window 3, no sinks: key energies 1,4,1 | 9,9,0 ; value energies all 1
    keys = torch.tensor([[1.0, 0], [2, 0], [1, 0], [0, 3], [3, 0], [0, 0]]).view(1, 1, 6, 2)
    values = torch.ones(1, 1, 6, 2)
    s = CurDKVPress(local_window_size=3, num_sinks=0).score(LayerInputs(0, keys, values))[0, 0]
    # k / window mean: 1/2, 2, 1/2 | 1.5, 1.5, 0 ; v normalised = 1 ; sum = 6
    torch.testing.assert_close(s, torch.tensor([0.5, 2, 0.5, 1.5, 1.5, 0]) / 6)
    # without local normalisation the highest-norm keys win: the opposite of knorm
    press = CurDKVPress(compression_ratio=0.5, local_window_size=0, num_sinks=0, leverage="key")
    kept = press.select(PrefillState([LayerInputs(0, keys, values)], 6))[0][0]
    assert kept.tolist() == [1, 3, 4]


def test_partial_last_window_not_inflated():
    # 17 tokens, window 16: one leftover token scores like an average token, not 16x one (kvpress)
    keys = torch.ones(1, 1, 17, 4)
    s = CurDKVPress(num_sinks=0, leverage="key").score(LayerInputs(0, keys, keys))[0, 0]
    torch.testing.assert_close(s, torch.full((17,), 1 / 17))


@pytest.mark.parametrize("G", [1, 2, 3])
def test_query_agnostic_and_gqa_independent(G):
    base = layer_of(2, 13, 8, G=1, seed=5)
    press = CurDKVPress(compression_ratio=0.5)
    want = press.score(LayerInputs(0, base.keys, base.values))
    other = LayerInputs(0, base.keys, base.values, torch.randn(1, 2 * G, 4, 8), torch.arange(9, 13))
    assert torch.equal(press.score(other), want)
    assert not CurDKVPress.needs_queries


def test_heads_and_batch_scored_independently():
    layer = layer_of(3, 37, 8, seed=6)
    press = CurDKVPress()
    full = press.score(layer)
    for h in range(3):
        one = press.score(LayerInputs(0, layer.keys[:, h:h + 1], layer.values[:, h:h + 1]))
        torch.testing.assert_close(full[:, h, 4:], one[:, 0, 4:])
    two = press.score(LayerInputs(0, torch.cat([layer.keys, layer.keys.flip(0)]), torch.cat([layer.values] * 2)))
    assert torch.equal(two[1], full[0])


@pytest.mark.parametrize("N", [7, 13, 37])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.9])
def test_budgets_exact_and_deterministic(N, ratio):
    layers = [layer_of(2, N, 8, seed=N + i, idx=i) for i in range(3)]
    state = PrefillState(layers, N)
    press = CurDKVPress(compression_ratio=ratio, estimator="gaussian")
    kept = press.select(state)
    k = keep_count(N, ratio)
    for layer, idx in zip(layers, kept):
        s = press.score(layer)[0]
        for h, pos in enumerate(idx):
            assert len(pos) == (N if ratio == 0 else k)
            assert torch.all(pos[1:] > pos[:-1])
            if ratio > 0:
                assert set(pos.tolist()) == set(torch.topk(s[h], k).indices.tolist())
                sinks, held = set(range(4)), set(pos.tolist())
                assert sinks <= held if k >= 4 else held <= sinks  # sinks first
    again = press.select(state)
    assert all(torch.equal(a, b) for la, lb in zip(kept, again) for a, b in zip(la, lb))
    cache = press.compress(state)
    mean_keep = cache.prefix_entries() / (3 * 2 * N)
    assert mean_keep == pytest.approx(keep_count(N, ratio) / N)


def test_validation_and_params():
    p = CurDKVPress()
    assert json.loads(p.params_json()) == {"num_sinks": 4, "leverage": "kv_product", "estimator": "norm",
                                           "rank": 20, "local_window_size": 16, "seed": 0}
    with pytest.raises(ValueError, match="leverage must be one of.*kv_product"):
        CurDKVPress(leverage="kv_sum")
    with pytest.raises(ValueError, match="estimator must be one of.*gaussian"):
        CurDKVPress(estimator="qr")
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        CurDKVPress(rank=0)
    with pytest.raises(ValueError, match="local_window_size must be an integer >= 0"):
        CurDKVPress(local_window_size=-1)
    with pytest.raises(ValueError, match="num_sinks must be an integer >= 0"):
        CurDKVPress(num_sinks=1.5)
    with pytest.raises(ValueError, match="seed must be an integer"):
        CurDKVPress(seed="a")
    with pytest.raises(ValueError, match=r"compression_ratio must be a number in \[0, 1\)"):
        CurDKVPress(compression_ratio=1.0)


def test_end_to_end_tiny_models(tiny_lm):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (101 + 7 + 3,), generator=g).tolist()
    pre = prefill(tiny_lm, PromptTokens(ids[:101], ids[101:108], ids[108:]))
    for query_aware in (False, True):
        presses = [CurDKVPress(compression_ratio=r) for r in (0.0, 0.5, 0.75)]
        presses.append(CurDKVPress(compression_ratio=0.5, estimator="gaussian"))
        presses.append(CurDKVPress(compression_ratio=0.5, estimator="svd"))
        outs = run_configs(tiny_lm, pre, presses, query_aware, max_new_tokens=3)
        for press, out in zip(presses, outs):
            st = out.stats
            assert st.new_tokens >= 1
            assert abs(st.kv_bytes_kept / st.kv_bytes_full - (1 - press.compression_ratio)) <= 0.02

"""LAVa: the value-scaled score against a slow loop reference, entropy layer budgets by hand,
head floors, exact totals, and end to end on the tiny models."""

import math

import pytest
import torch

from kvray.budget import keep_count
from kvray.generate import PromptTokens, prefill, run_configs
from kvray.presses import LayerInputs, PrefillState
from kvray.presses.base import protect, select_indices
from kvray.presses.lava import LAVaPress, layer_entropy, proportional_totals


def slow_lava_scores(q, qpos, keys, values, window, kernel, pooling, gqa):
    """LAVa by loops: q [Hq, W, d] at positions qpos, keys/values [H, N, d] -> [H, N - W]."""
    Hq, _, d = q.shape
    H, N, _ = keys.shape
    G = Hq // H
    q, qpos = q[:, -window:], qpos[-window:]
    W = q.shape[1]
    P = N - W
    r = kernel // 2
    per_q_head = torch.zeros(Hq, P, dtype=torch.float64)
    for hq in range(Hq):
        h = hq // G
        mean = torch.zeros(P, dtype=torch.float64)
        for i in range(W):
            logits = keys[h].double() @ q[hq, i].double() / math.sqrt(d)
            logits[qpos[i] + 1:] = -math.inf
            mean += torch.softmax(logits, 0)[:P] / W
        vbar = max(sum(abs(float(x)) for x in values[h, j]) for j in range(P))
        for j in range(P):  # pooled over prefix columns only
            win = mean[max(0, j - r): j + r + 1]
            pooled = win.max() if pooling == "max" else win.mean()
            per_q_head[hq, j] = pooled * vbar
    out = torch.zeros(H, P, dtype=torch.float64)
    for h in range(H):
        members = per_q_head[h * G:(h + 1) * G]
        out[h] = members.max(0).values if gqa == "max" else members.mean(0)
    return out


def random_layer(H, G, N, W, d=8, seed=0, idx=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, H, N, d, generator=g)
    values = torch.randn(1, H, N, d, generator=g) * torch.rand(1, H, 1, 1, generator=g) * 3
    queries = torch.randn(1, H * G, W, d, generator=g)
    return LayerInputs(idx, keys, values, queries, torch.arange(N - W, N))


@pytest.mark.parametrize("N", [7, 13, 37])
@pytest.mark.parametrize("G", [2, 3])
@pytest.mark.parametrize("pooling,gqa,kernel", [("max", "max", 7), ("avg", "mean", 3), ("none", "max", 1)])
def test_score_against_slow_reference(N, G, pooling, gqa, kernel):
    H, W = 2, 3
    layer = random_layer(H, G, N, W, seed=N * 10 + G)
    press = LAVaPress(compression_ratio=0.5, window_size=W, kernel_size=kernel, pooling=pooling, gqa_reduction=gqa)
    got = press.score(layer)[0]
    want = slow_lava_scores(layer.queries[0], layer.query_positions, layer.keys[0], layer.values[0],
                            W, kernel, pooling, gqa)
    err = (got[:, : N - W].double() - want).abs().max().item()
    assert err < 1e-5, f"worst mismatch {err:.3g}"
    assert got[:, N - W:].min() > got[:, : N - W].max()  # window strictly above (max + 1)


def test_value_scale_makes_heads_comparable():
    """Two heads seeing the same attention, values 3x larger in head 1: scores exactly 3x, and
    the head allocation gives head 1 the larger share."""
    N, W, d = 20, 4, 8
    torch.manual_seed(1)
    k = torch.randn(1, 1, N, d).repeat(1, 2, 1, 1)
    v = torch.randn(1, 1, N, d)
    values = torch.cat([v, 3 * v], dim=1)
    q = torch.randn(1, 1, W, d).repeat(1, 2, 1, 1)
    layer = LayerInputs(0, k, values, q, torch.arange(N - W, N))
    press = LAVaPress(compression_ratio=0.5, window_size=W, kernel_size=1, alpha=0.2)
    s = press.score(layer)[0]
    torch.testing.assert_close(s[1, : N - W], 3 * s[0, : N - W])
    counts = press.allocate(PrefillState([layer], N), [press.score(layer)])[0]
    assert sum(counts) == 2 * keep_count(N, 0.5) and counts[1] > counts[0]


def test_layer_entropy_hand_computed():
    assert layer_entropy(torch.ones(2, 4)) == pytest.approx(1.0)
    assert layer_entropy(torch.tensor([[1.0, 1, 0, 0]])) == pytest.approx(0.5)  # log 2 / log 4
    assert layer_entropy(torch.tensor([[5.0, 0, 0, 0]])) == 0.0
    assert layer_entropy(torch.tensor([[2.0]])) == 1.0


def test_proportional_totals_caps_and_reshares():
    assert proportional_totals([1.0, 0.5, 0.0], 3, 4) == [2, 1, 0]
    # 9 over weights 1 : 0.5 : 0 -> 6, 3, 0; layer 0 capped at 4, then layer 1, rest to layer 2
    assert proportional_totals([1.0, 0.5, 0.0], 9, 4) == [4, 4, 1]
    assert proportional_totals([0.0, 0.0], 3, 4) in ([2, 1], [1, 2])
    with pytest.raises(ValueError):
        proportional_totals([1.0, 1.0], 9, 4)


def entropy_state(N, W, prefix_rows):
    """A PrefillState of len(prefix_rows) one-head layers and hand-made scores."""
    layers, scores = [], []
    for i, row in enumerate(prefix_rows):
        layers.append(LayerInputs(i, torch.zeros(1, 1, N, 2), torch.zeros(1, 1, N, 2), torch.zeros(1, 1, W, 2),
                                  torch.arange(N - W, N)))
        s = torch.zeros(1, 1, N)
        s[0, 0, : N - W] = torch.tensor(row)
        scores.append(protect(s, last=W))
    return PrefillState(layers, N), scores


def test_entropy_layer_budgets_hand_computed():
    """3 layers, prefix scores uniform (entropy 1), half-peaked (0.5), one-hot (0): the uniform
    layer gets the largest prefix share. N = 6, W = 2, P = 4 per head."""
    state, scores = entropy_state(6, 2, [[1.0, 1, 1, 1], [1.0, 1, 0, 0], [1.0, 0, 0, 0]])
    press = LAVaPress(compression_ratio=0.5, window_size=2)  # K = 3: 1 prefix token per layer on average
    assert press.allocate(state, scores) == [[2 + 2], [2 + 1], [2 + 0]]
    press = LAVaPress(compression_ratio=1 / 6, window_size=2)  # K = 5: 9 prefix tokens, cap 4 per layer
    assert press.allocate(state, scores) == [[2 + 4], [2 + 4], [2 + 1]]
    # ablation: uniform layer budgets
    flat = LAVaPress(compression_ratio=0.5, window_size=2, dynamic_layers=False)
    assert flat.allocate(state, scores) == [[3], [3], [3]]
    # the selection keeps exactly those counts, window included
    kept = [select_indices(s, c)[0] for s, c in zip(scores, press.allocate(state, scores))]
    assert [len(k) for k in kept] == [6, 6, 3]
    assert all({4, 5} <= set(k.tolist()) for k in kept)


def random_state(L=4, H=2, G=3, N=37, W=5):
    return PrefillState([random_layer(H, G, N, W, seed=100 + i, idx=i) for i in range(L)], N)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.75, 0.9, 0.97])
def test_budgets_exact_floor_and_window(ratio):
    L, H, N, W, alpha = 4, 2, 37, 5, 0.3
    state = random_state(L, H, 3, N, W)
    press = LAVaPress(compression_ratio=ratio, window_size=W, alpha=alpha)
    scores = [press.score(layer) for layer in state.layers]
    counts = press.allocate(state, scores)
    K = keep_count(N, ratio)
    assert sum(map(sum, counts)) == K * L * H  # mean keep ratio exactly the target
    assert all(0 <= c <= N for row in counts for c in row)
    for row in counts:
        if K >= W:
            prefix = [c - W for c in row]
            assert min(prefix) >= 0  # the window fits in every head
            # the floor follows the layer's own (dynamic) budget
            assert min(prefix) >= math.floor(alpha * sum(prefix) / H)
    kept = press.select(state)
    assert [[len(i) for i in k] for k in kept] == counts
    for k, row in zip(kept, counts):
        for idx, c in zip(k, row):
            assert set(range(N - min(W, c), N)) <= set(idx.tolist())  # most recent window tokens kept
    assert press.select(state)[0][0].tolist() == kept[0][0].tolist()  # deterministic


def test_dynamic_budgets_really_vary():
    state = random_state()
    press = LAVaPress(compression_ratio=0.5, window_size=5, kernel_size=1)
    counts = press.allocate(state, [press.score(layer) for layer in state.layers])
    assert len({sum(row) for row in counts}) > 1  # layers differ
    assert any(len(set(row)) > 1 for row in counts)  # heads differ


def test_ratio_zero_keeps_everything():
    state = random_state()
    press = LAVaPress(window_size=5)
    kept = press.select(state)
    assert all(len(i) == state.n_tokens for k in kept for i in k)
    counts = press.allocate(state, [press.score(layer) for layer in state.layers])
    assert counts == [[state.n_tokens] * state.num_kv_heads] * state.num_layers


@pytest.mark.parametrize("bad", [dict(alpha=1.5), dict(kernel_size=4), dict(pooling="median"),
                                 dict(gqa_reduction="sum"), dict(window_size=0), dict(dynamic_layers="yes")])
def test_bad_parameters(bad):
    with pytest.raises(ValueError, match="lava: "):
        LAVaPress(**bad)


def test_params_are_json():
    import json

    p = LAVaPress(compression_ratio=0.5)
    assert json.loads(p.params_json()) == {"window_size": 32, "kernel_size": 7, "pooling": "max",
                                           "gqa_reduction": "max", "alpha": 0.2, "dynamic_layers": True}


@pytest.mark.parametrize("query_aware", [False, True])
def test_end_to_end_tiny(tiny_lm, query_aware):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (120 + 9 + 4,), generator=g).tolist()
    pre = prefill(tiny_lm, PromptTokens(ids[:120], ids[120:129], ids[129:]), with_question=query_aware)
    press = LAVaPress(compression_ratio=0.5)
    state = pre.state(query_aware)
    counts = press.allocate(state, [press.score(layer) for layer in state.layers])
    cache = press.compress(state)
    assert [list(layer.prefix.lengths) for layer in cache.layers if layer.window is None] == counts
    out = run_configs(tiny_lm, pre, [press], query_aware, max_new_tokens=3)[0]
    assert out.stats.new_tokens >= 1
    assert abs(out.stats.kv_bytes_kept / out.stats.kv_bytes_full - 0.5) <= 0.02

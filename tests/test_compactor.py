"""Compactor: leverage and non-causal chunked attention against slow references, the hidden-state
seam of the prefill, the blend and protection, budgets, and end to end on the tiny models."""

import json
import math

import pytest
import torch

from kvray.budget import keep_count
from kvray.generate import PromptTokens, hidden_needed_for, prefill, run_configs
from kvray.presses import compactor as cp
from kvray.presses.base import LayerInputs, protect
from kvray.presses.compactor import (CompactorPress, apply_model_rope, approx_leverage, context_queries,
                                     gaussian_sketch, noncausal_chunk_attention, prerope_keys, zscore)
from kvray.presses.snapkv import SnapKVPress

N_CONTEXT = 203


def prompt(n_ctx=N_CONTEXT, n_q=9, n_suffix=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 1000, (n_ctx + n_q + n_suffix,), generator=g).tolist()
    return PromptTokens(ids[:n_ctx], ids[n_ctx:n_ctx + n_q], ids[n_ctx + n_q:])


def exact_leverage(K: torch.Tensor) -> list[float]:
    """Leverage of the rows of the centred K [M, d]: squared row norms of U of its SVD (float64)."""
    Kc = K.double() - K.double().mean(0, keepdim=True)
    U, S, _ = torch.linalg.svd(Kc, full_matrices=False)
    r = int((S > 1e-9 * S[0]).sum())
    return [sum(U[i, j].item() ** 2 for j in range(r)) for i in range(K.shape[0])]


def loop_noncausal(q: torch.Tensor, k: torch.Tensor, chunk: int) -> torch.Tensor:
    """Slow reference: per (b, kv head), chunk, query head of the group, query row, an explicit
    softmax over the chunk's keys (no 1/sqrt(d)), added to each key's score."""
    B, Hq, M, d = q.shape
    H = k.shape[1]
    G = Hq // H
    out = torch.zeros(B, H, M, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for s in range(0, M, chunk):
                keys = range(s, min(s + chunk, M))
                for g in range(G):
                    for i in keys:
                        logits = [float(q[b, h * G + g, i].double() @ k[b, h, j].double()) for j in keys]
                        top = max(logits)
                        w = [math.exp(x - top) for x in logits]
                        for j, wj in zip(keys, w):
                            out[b, h, j] += wj / sum(w)
    return out


# ----------------------------------------------------------------------------- leverage


@pytest.mark.parametrize("M", [7, 13, 37])
def test_leverage_with_full_sketch_is_exact(M):
    # k = d: K Phi spans the same column space as K, so the sketch changes nothing
    d, B, H = 8, 2, 3
    keys = torch.randn(B, H, M, d, generator=torch.Generator().manual_seed(M)) * 3 + 1
    got = approx_leverage(keys, gaussian_sketch(d, d, seed=5))
    for b in range(B):
        for h in range(H):
            ref = exact_leverage(keys[b, h])
            assert got[b, h].tolist() == pytest.approx(ref, abs=2e-4)
            # sums to the rank of the centred keys: min(d, M - 1)
            assert got[b, h].sum().item() == pytest.approx(min(d, M - 1), abs=1e-3)
    if M < d:  # the centred keys span everything: hat matrix I - 11^T / M
        assert torch.allclose(got, torch.full_like(got, 1 - 1 / M), atol=1e-4)


def test_leverage_hand_checked():
    # d = 1: centred keys [-1, -1, -1, 3], sum of squares 12 -> [1/12, 1/12, 1/12, 9/12]
    keys = torch.tensor([0.0, 0.0, 0.0, 4.0]).view(1, 1, 4, 1)
    got = approx_leverage(keys, gaussian_sketch(1, 1, seed=0))
    assert got.view(-1).tolist() == pytest.approx([1 / 12, 1 / 12, 1 / 12, 3 / 4], abs=1e-6)
    # d = 2: three tokens on the x axis around 0, one alone on y: the lone one has leverage ~1
    keys = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0], [0.0, 5.0]]).view(1, 1, 4, 2)
    got = approx_leverage(keys, torch.eye(2)).view(-1)
    Kc = keys.view(4, 2) - keys.view(4, 2).mean(0)
    ref = torch.diagonal(Kc @ torch.linalg.pinv(Kc.T @ Kc) @ Kc.T)
    assert got.tolist() == pytest.approx(ref.tolist(), abs=1e-6)
    assert got.argmax().item() == 3


def test_sketched_leverage_finds_outliers():
    # k < d (the paper's regime): planted outlier keys still rank first
    d, k, M = 64, 16, 300
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, M, d, generator=g)
    outliers = [17, 150, 299]
    for i in outliers:
        keys[:, :, i] += 12 * torch.randn(d, generator=g)
    got = approx_leverage(keys, gaussian_sketch(d, k, seed=1))
    assert got[0].sum(-1).tolist() == pytest.approx([k, k], abs=1e-2)
    for h in range(2):
        assert sorted(got[0, h].topk(3).indices.tolist()) == outliers


def test_sketch_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = gaussian_sketch(16, 8, seed=3)
    gaussian_sketch.cache_clear()
    b = gaussian_sketch(16, 8, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, gaussian_sketch(16, 8, seed=4))
    assert torch.equal(state, torch.get_rng_state())
    assert a.shape == (16, 8) and abs(a.var().item() - 1 / 8) < 0.05


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("G", [1, 2, 3])
@pytest.mark.parametrize("M,chunk", [(7, 4), (13, 5), (37, 16), (37, 64), (12, 4)])
def test_noncausal_chunk_attention_matches_loops(G, M, chunk):
    B, H, d = 2, 2, 4
    g = torch.Generator().manual_seed(M * 10 + G)
    q = torch.randn(B, H * G, M, d, generator=g)
    k = torch.randn(B, H, M, d, generator=g)
    got = noncausal_chunk_attention(q, k, chunk)
    ref = loop_noncausal(q, k, chunk)
    assert got.shape == (B, H, M)
    assert torch.allclose(got.double(), ref, atol=1e-5), (got.double() - ref).abs().max()
    # every chunk hands out G mass per query, the short last one included
    for s in range(0, M, chunk):
        e = min(s + chunk, M)
        assert got[..., s:e].sum(-1).allclose(torch.full((B, H), float(G * (e - s))), atol=1e-4)


def test_noncausal_hand_checked_and_sliced(monkeypatch):
    # zero queries: uniform rows, each key receives exactly G (one row's 1/c from each of c rows)
    q = torch.zeros(1, 6, 11, 4)
    k = torch.randn(1, 2, 11, 4)
    assert torch.allclose(noncausal_chunk_attention(q, k, 4), torch.full((1, 2, 11), 3.0))
    # no 1/sqrt(d): two keys, one query aligned with the first: softmax([2, 0])
    q = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    k = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    p = 1 / (1 + math.exp(-2.0))
    assert noncausal_chunk_attention(q, k, 2).view(-1).tolist() == pytest.approx([p + 0.5, 1 - p + 0.5], abs=1e-6)
    # the memory cap only changes how many chunks go through one matmul
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 37, 8, generator=g), torch.randn(1, 2, 37, 8, generator=g)
    whole = noncausal_chunk_attention(q, k, 5)
    monkeypatch.setattr(cp, "_MAX_PROBS", 2 * 4 * 5 * 5)
    assert torch.allclose(noncausal_chunk_attention(q, k, 5), whole, atol=1e-6)


def test_zscore_per_layer():
    x = torch.randn(2, 3, 17, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1)
    x[1] += 4
    z = zscore(x)
    for b in range(2):
        assert z[b].mean().item() == pytest.approx(0.0, abs=1e-5)
        assert z[b].std(correction=0).item() == pytest.approx(1.0, abs=1e-5)
        # heads keep their relative spread (one standardisation for the whole layer row)
        assert z[b, 1].std() > 10 * z[b, 2].std()
    assert torch.allclose(z[1], zscore(x[1:] - 4)[0], atol=1e-5)  # per batch row, shift-free
    assert torch.equal(zscore(torch.ones(1, 2, 5)), torch.zeros(1, 2, 5))


# ----------------------------------------------------------------------------- the seam


def test_prefill_captures_hidden_only_when_asked(tiny_lm):
    p = prompt()
    pre = prefill(tiny_lm, p, capture_hidden=True)
    modules = pre.modules
    assert all(not m._forward_pre_hooks for m in modules)  # hooks removed
    D = tiny_lm.model.config.hidden_size
    for query_aware in (False, True):
        state = pre.state(query_aware)
        N = state.n_tokens
        pos = torch.arange(N)
        for layer in state.layers:
            assert layer.hidden.shape == (1, N, D)
            # pre-RoPE keys, rotated by the model's own RoPE, are the cached keys
            keys = apply_model_rope(layer.module, prerope_keys(layer.module, layer.hidden), pos)
            assert torch.allclose(keys, layer.keys, atol=1e-5)
            # recomputed queries end with the queries the attention captured
            W = layer.queries.shape[2]
            q = context_queries(layer.module, layer.hidden, pos)
            assert torch.allclose(q[:, :, -W:], layer.queries, atol=1e-5)
            assert layer.query_positions[-1].item() == N - 1
    plain = prefill(tiny_lm, p)
    assert plain.hidden is None and plain.state(False).layers[0].hidden is None
    with pytest.raises(ValueError, match="capture_hidden=True"):
        CompactorPress(compression_ratio=0.5).compress(plain.state(False))


def test_hidden_needed_for():
    class Wrapper:
        inner = CompactorPress()

    assert hidden_needed_for([SnapKVPress(), CompactorPress()])
    assert hidden_needed_for([Wrapper()])
    assert not hidden_needed_for([SnapKVPress(compression_ratio=0.5)])


# ----------------------------------------------------------------------------- the press


@pytest.fixture
def llama_pre(tiny_llama):
    return tiny_llama, prefill(tiny_llama, prompt(), capture_hidden=True)


def test_score_is_the_protected_blend(llama_pre):
    _, pre = llama_pre
    state = pre.state(False)
    N = state.n_tokens
    lam, first, last, chunk = 0.3, 8, 4, 64
    press = CompactorPress(compression_ratio=0.5, chunk_size=chunk, blending=lam, scoring="paper")
    for layer in state.layers:
        got = press.score(layer)
        H, d = layer.num_kv_heads, layer.keys.shape[-1]
        assert d < press.sketch_dim  # the tiny model's d = 16: k capped at d -> exact leverage
        mid = slice(first, N - last)
        hidden = layer.hidden[:, mid]
        kpre = prerope_keys(layer.module, hidden)
        lev = torch.tensor([[exact_leverage(kpre[0, h]) for h in range(H)]])
        q = context_queries(layer.module, hidden, torch.arange(first, N - last))
        att = noncausal_chunk_attention(q, layer.keys[:, :, mid], chunk).double()  # checked against loops above

        def z(x):
            return (x - x.mean()) / x.std(correction=0)

        ref = z(att) + lam * z(lev)
        assert torch.allclose(got[..., mid].double(), ref, atol=1e-3), (got[..., mid].double() - ref).abs().max()
        # protected sinks and recent tokens sit above every scored token, never tied
        top = got[..., mid].max()
        assert (got[..., :first] > top + 0.5).all() and (got[..., N - last:] > top + 0.5).all()
    # lambda weighs the leverage term: 0 ranks by attention alone
    layer = state.layers[1]
    only_attn = CompactorPress(blending=0.0, chunk_size=chunk, scoring="paper").score(layer)[..., first:N - last]
    q = context_queries(layer.module, layer.hidden[:, first:N - last], torch.arange(first, N - last))
    att = noncausal_chunk_attention(q, layer.keys[:, :, first:N - last], chunk)
    assert torch.allclose(only_attn, zscore(att), atol=1e-5)


@pytest.mark.parametrize("scoring", ["kvpress", "paper"])
def test_protection_on_tiny_inputs(llama_pre, scoring):
    _, pre = llama_pre
    layer = pre.state(False).layers[0]
    for N in (5, 12, 13):  # everything protected, nothing left over, one scored token
        small = LayerInputs(0, layer.keys[:, :, :N], layer.values[:, :, :N], module=layer.module,
                            hidden=layer.hidden[:, :N])
        s = CompactorPress(compression_ratio=0.5, scoring=scoring).score(small)
        assert s.shape == (1, 2, N) and torch.isfinite(s).all()
        ref = protect(torch.zeros(1, 2, N), first=min(8, N), last=min(4, N - min(8, N)))
        assert torch.equal(s, ref)


@pytest.mark.parametrize("head_adaptive", [False, True])
def test_budgets_and_determinism(llama_pre, head_adaptive):
    _, pre = llama_pre
    state = pre.state(False)
    N = state.n_tokens
    for ratio in (0.3, 0.8):
        press = CompactorPress(compression_ratio=ratio, head_adaptive=head_adaptive)
        cache = press.compress(state)
        scores = [press.score(layer) for layer in state.layers]
        counts = press.allocate(state, scores)
        held = [list(layer.prefix.lengths) for layer in cache.layers]
        assert held == counts
        for row in held:
            assert sum(row) == keep_count(N, ratio) * state.num_kv_heads
            if head_adaptive:  # the floor: alpha * the uniform share
                assert min(row) >= math.floor(press.head_floor * keep_count(N, ratio))
            else:
                assert len(set(row)) == 1
        assert abs(cache.nbytes() - (1 - ratio) * state.kv_bytes()) <= 0.02 * state.kv_bytes()
        # sinks and recent tokens are always kept
        for layer in cache.layers:
            for bh in range(state.num_kv_heads):
                pos = layer.prefix.positions[layer.prefix.offsets[bh]:layer.prefix.offsets[bh + 1]].tolist()
                assert set(range(8)) | set(range(N - 4, N)) <= set(pos)
        again = press.compress(state)
        for a, b in zip(cache.layers, again.layers):
            assert torch.equal(a.prefix.positions, b.prefix.positions)
    if head_adaptive:  # the allocation really varies across heads somewhere
        press = CompactorPress(compression_ratio=0.5, head_adaptive=True, head_floor=0.0)
        counts = press.allocate(state, [press.score(layer) for layer in state.layers])
        assert any(len(set(row)) > 1 for row in counts)
    # ratio 0 keeps everything (without scoring)
    full = CompactorPress().compress(state)
    assert all(list(layer.prefix.lengths) == [N] * state.num_kv_heads for layer in full.layers)


@pytest.mark.parametrize("scoring,parity", [("kvpress", None), ("paper", None), ("kvpress", "kvpress")])
def test_parts_computed_once_per_layer_and_shared_by_every_ratio(tiny_llama, monkeypatch, scoring, parity):
    """The attention and leverage parts do not depend on the budget or the weight: on one state
    every ratio and blending computes them once per layer, and scores exactly as a press that
    scores on a state of its own (a fresh prefill: nothing memoised)."""
    calls = []
    for name in ("prerope_keys", "noncausal_chunk_attention", "kvpress_chunk_attention"):
        real = getattr(cp, name)
        monkeypatch.setattr(cp, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    shared = prefill(tiny_llama, prompt(), capture_hidden=True).state(False)
    presses = [CompactorPress(compression_ratio=r, scoring=scoring, parity=parity,
                              blending=None if parity else b)
               for r in (0.25, 0.5, 0.75) for b in (None, 0.3)]
    got = [[p.score(layer) for layer in shared.layers] for p in presses]
    per_layer = 2  # pre-RoPE keys and the chunked attention
    assert len(calls) == per_layer * len(shared.layers)
    for press, scores in zip(presses, got):
        fresh = prefill(tiny_llama, prompt(), capture_hidden=True).state(False)
        for layer, s in zip(fresh.layers, scores):
            assert torch.equal(press.score(layer), s)
    # the weight still weighs: two ratios with blending=None score differently
    assert not torch.equal(got[0][1], got[2][1])
    # another chunk size is other parts
    calls.clear()
    CompactorPress(compression_ratio=0.5, scoring=scoring, parity=parity, chunk_size=32).score(shared.layers[0])
    assert len(calls) == per_layer


def test_parameters_validated_and_jsonable():
    p = CompactorPress(compression_ratio=0.5)
    assert p.name == "compactor" and p.needs_hidden and not p.needs_queries
    assert json.loads(p.params_json()) == {"sink_tokens": 8, "recent_tokens": 4, "chunk_size": 256,
                                           "sketch_dim": 48, "blending": None, "seed": 0,
                                           "head_adaptive": False, "head_floor": 0.2, "scoring": "kvpress"}
    for bad, word in (({"chunk_size": 0}, "chunk_size"), ({"sketch_dim": 0}, "sketch_dim"),
                      ({"sink_tokens": -1}, "sink_tokens"), ({"recent_tokens": 2.5}, "recent_tokens"),
                      ({"blending": -0.1}, "blending"), ({"blending": float("inf")}, "blending"),
                      ({"seed": -1}, "seed"), ({"head_adaptive": 1}, "head_adaptive"),
                      ({"head_floor": 1.5}, "head_floor"), ({"compression_ratio": 1.0}, "compression_ratio"),
                      ({"scoring": "vllm"}, "scoring"), ({"parity": "kvpress", "scoring": "paper"}, "scoring")):
        with pytest.raises(ValueError, match=word):
            CompactorPress(**bad)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("query_aware", [False, True])
def test_end_to_end(tiny_lm, query_aware):
    pre = prefill(tiny_lm, prompt(), capture_hidden=True)
    presses = [CompactorPress(compression_ratio=0.5), CompactorPress(compression_ratio=0.25, head_adaptive=True)]
    outs = run_configs(tiny_lm, pre, presses, query_aware, max_new_tokens=3)
    assert len(outs) == len(presses)
    for press, out in zip(presses, outs):
        kept = out.stats.kv_bytes_kept / out.stats.kv_bytes_full
        assert abs(kept - (1 - press.compression_ratio)) <= 0.02
        assert out.stats.new_tokens >= 1

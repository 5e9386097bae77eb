"""LAQ / LAQ++: stage-2 rescoring against a slow loop reference (position mask included), the
pseudo decoding on a tiny model (queries, positions, tokens, prefill left untouched), and end
to end through run_configs in both protocols."""

import functools
import importlib
import json
import math

import pytest
import torch

from kvray.budget import keep_count
from kvray.generate import PromptTokens, greedy_decode, prefill, run_configs
from kvray.presses import LayerInputs, PrefillState
from kvray.presses.base import protect
from kvray.presses.laq import LAQPress
from kvray.presses.snapkv import SnapKVPress


def slow_laq_scores(q, qpos, keys, kernel, pooling, gqa):
    """Stage-2 scores by loops: queries q [Hq, R, d] at positions qpos, keys [H, N, d] -> [H, N]
    (before protection). Query row i sees key j iff j <= qpos[i]."""
    Hq, R, d = q.shape
    H, N, _ = keys.shape
    G = Hq // H
    r = kernel // 2
    mean = torch.zeros(Hq, N, dtype=torch.float64)
    for hq in range(Hq):
        h = hq // G
        for i in range(R):
            logits = torch.tensor([float(keys[h, j].double() @ q[hq, i].double()) / math.sqrt(d) for j in range(N)],
                                  dtype=torch.float64)
            for j in range(N):
                if j > int(qpos[i]):
                    logits[j] = -math.inf
            mean[hq] += torch.softmax(logits, 0) / R
    reduced = torch.zeros(H, N, dtype=torch.float64)  # GQA reduction first, then pooling (as SnapKV)
    for h in range(H):
        members = mean[h * G:(h + 1) * G]
        reduced[h] = members.max(0).values if gqa == "max" else members.mean(0)
    out = torch.zeros(H, N, dtype=torch.float64)
    for h in range(H):
        for j in range(N):
            win = reduced[h, max(0, j - r): j + r + 1]
            out[h, j] = reduced[h, j] if pooling == "none" else (win.max() if pooling == "max" else win.mean())
    return out


@pytest.mark.parametrize("G", [2, 3])
@pytest.mark.parametrize("N", [7, 13, 37])
@pytest.mark.parametrize("stage2_window", [0, 3])
@pytest.mark.parametrize("pooling,gqa", [("max", "mean"), ("avg", "max"), ("none", "mean")])
def test_rescoring_matches_slow_reference(G, N, stage2_window, pooling, gqa):
    H, d, lookahead = 2, 8, 4
    g = torch.Generator().manual_seed(N * 10 + G)
    keys = torch.randn(1, H, N, d, generator=g) * 2
    values = torch.randn(1, H, N, d, generator=g)
    # the prefill's window queries (last 5 prompt positions) and hand-made pseudo queries after
    # the prompt, at a gap (as after a fed question)
    window_q = torch.randn(1, H * G, 5, d, generator=g) * 2
    window_pos = torch.arange(N - 5, N)
    pseudo_q = torch.randn(1, H * G, lookahead, d, generator=g) * 2
    pseudo_pos = torch.arange(N + 6, N + 6 + lookahead)
    press = LAQPress(compression_ratio=0.5, kernel_size=3, pooling=pooling, gqa_reduction=gqa,
                     lookahead=lookahead, stage2_window=stage2_window, window_size=5)
    layer = press.observed(LayerInputs(0, keys, values, window_q, window_pos), pseudo_q, pseudo_pos)
    R = stage2_window + lookahead
    assert layer.queries.shape == (1, H * G, R, d)
    assert layer.query_positions.tolist() == list(range(N - stage2_window, N)) + pseudo_pos.tolist()
    got = press.score(layer)[0].double()
    ref = slow_laq_scores(layer.queries[0], layer.query_positions, keys[0], 3, pooling, gqa)
    P = N - stage2_window
    torch.testing.assert_close(got[:, :P], ref[:, :P], rtol=1e-5, atol=1e-6)
    if stage2_window:  # the window outranks every real score
        assert got[:, P:].min() > got[:, :P].max()
        torch.testing.assert_close(got, protect(ref[None].float(), last=stage2_window)[0].double(),
                                   rtol=1e-5, atol=1e-5)


def test_position_mask_by_hand():
    """Zero queries attend uniformly to what they see: a query at position 2 sees keys 0..2 only;
    a pseudo query after the prompt sees all N = 5 keys."""
    N, d = 5, 4
    keys = torch.randn(1, 1, N, d)
    q = torch.zeros(1, 1, 2, d)
    layer = LayerInputs(0, keys, keys, q, torch.tensor([2, N + 1]))
    press = LAQPress(compression_ratio=0.5, kernel_size=1, pooling="none", lookahead=1, stage2_window=1,
                     window_size=1)
    got = press.score(layer)[0, 0]
    expect = torch.tensor([(1 / 3 + 1 / 5) / 2] * 3 + [(1 / 5) / 2] * 2)
    torch.testing.assert_close(got[:4], expect[:4])
    assert got[4] > got[:4].max() + 0.5  # protected last token (stage2_window = 1)
    # plain LAQ: nothing protected, the raw mean
    laq = LAQPress(compression_ratio=0.5, kernel_size=1, pooling="none", lookahead=2, stage2_window=0)
    torch.testing.assert_close(laq.score(layer)[0, 0], expect)


def test_validation_and_params():
    p = LAQPress()
    assert (p.window_size, p.kernel_size, p.pooling, p.gqa_reduction, p.lookahead, p.stage2_window) == \
        (32, 7, "max", "mean", 8, 8)
    assert p.needs_model and p.needs_queries and p.name == "laq"
    json.dumps(p.params())
    for bad in (dict(lookahead=0), dict(stage2_window=-1), dict(stage2_window=40), dict(kernel_size=4),
                dict(pooling="mean"), dict(gqa_reduction="sum"), dict(window_size=0), dict(compression_ratio=1.0),
                dict(lookahead_sees_question="yes"), dict(lookahead=2.5)):
        with pytest.raises(ValueError):
            LAQPress(**bad)


# ------------------------------------------------------------------------- on the tiny models

N_CONTEXT = 101


@functools.lru_cache(maxsize=1)
def varied_llama():
    """The tiny Llama with untied embeddings and a wider init: the fixture models (tied, small
    init) echo one token forever, which would make the pseudo-token checks trivial."""
    from transformers import AutoModelForCausalLM

    import kvray
    from conftest import tiny_config, tokenizer
    from kvray.runtime import enable_kvray_attention

    tok = tokenizer()
    cfg = tiny_config("llama", len(tok))
    cfg.tie_word_embeddings, cfg.initializer_range = False, 0.2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    enable_kvray_attention(model)
    return kvray.LanguageModel(model=model, tokenizer=tok, name="tiny-llama-varied")


def prompt(n_ctx=N_CONTEXT, n_q=7, n_suffix=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 1000, (n_ctx + n_q + n_suffix,), generator=g).tolist()
    return PromptTokens(ids[:n_ctx], ids[n_ctx:n_ctx + n_q], ids[n_ctx + n_q:])


def snapshot(pre):
    out = [pre.aware_logits.clone()]
    for layer, (q, qpos) in zip(pre.cache.layers, pre.agnostic_queries):
        out += [layer.keys.clone(), layer.values.clone(), layer.window_queries.clone(),
                layer.window_positions.clone(), q.clone(), qpos.clone()]
    return out


@pytest.mark.parametrize("varied", [False, True])
@pytest.mark.parametrize("query_aware", [False, True])
def test_pseudo_decoding_on_tiny_llama(tiny_llama, query_aware, varied):
    lm = varied_llama() if varied else tiny_llama
    pre = prefill(lm, prompt())
    state = pre.state(query_aware)
    N = state.n_tokens
    press = LAQPress(compression_ratio=0.5, lookahead=4)
    feed = press.lookahead_feed(pre, query_aware)
    assert feed == ([] if query_aware else list(pre.prompt.template_suffix) or pre.prompt.suffix)  # blind to the query
    provisional = press.stage1().compress(state)
    tokens, queries = press.pseudo_decode(lm, provisional, feed, pre.first_logits(query_aware))
    assert len(tokens) == press.lookahead
    first_pos = N + len(feed)
    Hq = lm.config.num_attention_heads
    for q, pos in queries:
        assert q.shape == (1, Hq, press.lookahead, lm.head_dim)
        assert pos.tolist() == list(range(first_pos, first_pos + press.lookahead))
    # the pseudo tokens are a plain greedy decode on a fresh provisional cache
    plain = greedy_decode(lm, press.stage1().compress(state), feed, press.lookahead, pre.first_logits(query_aware))
    assert tokens == plain
    if varied:
        assert len(set(tokens)) > 1
    # the captured query of the first pseudo token at layer 0 is q_proj + RoPE at its position
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    with torch.inference_mode():
        inner = lm.model.model
        h = inner.layers[0].input_layernorm(inner.embed_tokens(torch.tensor([[tokens[0]]])))
        attn = inner.layers[0].self_attn
        q0 = attn.q_proj(h).view(1, 1, Hq, lm.head_dim).transpose(1, 2)
        cos, sin = inner.rotary_emb(q0, torch.tensor([[first_pos]]))
        q0, _ = apply_rotary_pos_emb(q0, q0, cos, sin)
    torch.testing.assert_close(queries[0][0][:, :, :1], q0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("query_aware,ratio,stage2", [(False, 0.6, 0), (True, 0.3, 8)])
def test_compress_prefill_budgets_and_untouched_prefill(tiny_llama, query_aware, ratio, stage2):
    lm = tiny_llama
    pre = prefill(lm, prompt())
    before = snapshot(pre)
    state = pre.state(query_aware)
    press = LAQPress(compression_ratio=ratio, stage2_window=stage2)
    cache = press.compress_prefill(lm, pre, query_aware)
    held = [list(layer.prefix.lengths) for layer in cache.layers]
    assert held == press.layer_counts(state)
    assert all(n == keep_count(state.n_tokens, ratio) for row in held for n in row)
    assert all(layer.tail_length() == 0 and layer.prefix_tokens == state.n_tokens for layer in cache.layers)
    if stage2:  # the last stage2_window prompt tokens are kept in every head
        for layer in cache.layers:
            for bh in range(len(layer.prefix.lengths)):
                pos = layer.prefix.positions[layer.prefix.offsets[bh]:layer.prefix.offsets[bh + 1]]
                assert set(range(state.n_tokens - stage2, state.n_tokens)) <= set(pos.tolist())
    # the prefill (cache, captured queries, logits) is untouched
    after = snapshot(pre)
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert all(layer.capture_window == 0 for layer in pre.cache.layers)
    # the selection is the stage-2 rescoring with the pseudo queries, reproducibly
    provisional = press.stage1().compress(state)
    _, pseudo = press.pseudo_decode(lm, provisional, press.lookahead_feed(pre, query_aware),
                                    pre.first_logits(query_aware))
    manual = press.compress(PrefillState([press.observed(l, q, p) for l, (q, p) in zip(state.layers, pseudo)],
                                         state.n_tokens))
    for a, b in zip(cache.layers, manual.layers):
        assert torch.equal(a.prefix.positions, b.prefix.positions)
        assert torch.equal(a.prefix.keys, b.prefix.keys) and torch.equal(a.prefix.values, b.prefix.values)
    # and it is not the provisional (stage-1 SnapKV) selection
    assert any(not torch.equal(a.prefix.positions, b.prefix.positions)
               for a, b in zip(cache.layers, provisional.layers))


def test_stop_token_ends_the_lookahead(monkeypatch):
    """A stop token ends the lookahead (not fed); a stop as the very first pseudo token leaves the
    stage-1 cache."""
    dec = importlib.import_module("kvray.runtime.decoder")

    lm = varied_llama()
    pre = prefill(lm, prompt())
    state = pre.state(True)
    press = LAQPress(compression_ratio=0.5, lookahead=6)
    tokens, _ = press.pseudo_decode(lm, press.stage1().compress(state), [], pre.first_logits(True))
    fresh = [i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i]]
    if not fresh:
        pytest.skip(f"the tiny model repeats one token {tokens}: no stop point to test")
    i = fresh[0]
    monkeypatch.setattr(dec, "stop_token_ids", lambda tok: {tokens[i]})
    short, queries = press.pseudo_decode(lm, press.stage1().compress(state), [], pre.first_logits(True))
    assert short == tokens[:i] and all(q.shape[2] == i for q, _ in queries)
    monkeypatch.setattr(dec, "stop_token_ids", lambda tok: {tokens[0]})
    cache = press.compress_prefill(lm, pre, True)
    stage1 = press.stage1().compress(state)
    for a, b in zip(cache.layers, stage1.layers):
        assert torch.equal(a.prefix.positions, b.prefix.positions) and a.tail_length() == 0


def test_agnostic_lookahead_and_the_question():
    """Query-agnostic protocol: with lookahead_sees_question=True the pseudo tokens follow the fed
    question, so they change with it; by default (False) the selection does not depend on it."""
    lm = varied_llama()
    p1 = prompt()
    p2 = PromptTokens(p1.context, [11, 12, 13], p1.suffix)
    pre1, pre2 = prefill(lm, p1), prefill(lm, p2)
    sees = LAQPress(compression_ratio=0.5, lookahead=4, lookahead_sees_question=True)
    t1, _ = sees.pseudo_decode(lm, sees.stage1().compress(pre1.state(False)), sees.lookahead_feed(pre1, False), None)
    t2, _ = sees.pseudo_decode(lm, sees.stage1().compress(pre2.state(False)), sees.lookahead_feed(pre2, False), None)
    assert t1 != t2
    blind = LAQPress(compression_ratio=0.5, lookahead=4)
    assert blind.lookahead_feed(pre1, False) == (list(p1.template_suffix) or p1.suffix)
    c1, c2 = blind.compress_prefill(lm, pre1, False), blind.compress_prefill(lm, pre2, False)
    for a, b in zip(c1.layers, c2.layers):
        assert torch.equal(a.prefix.positions, b.prefix.positions)


@pytest.mark.parametrize("query_aware", [False, True])
def test_end_to_end_run_configs(tiny_lm, query_aware):
    pre = prefill(tiny_lm, prompt())
    ratio = 0.5
    out_full, out_laq, out_zero = run_configs(
        tiny_lm, pre, [SnapKVPress(), LAQPress(compression_ratio=ratio), LAQPress()], query_aware, max_new_tokens=2)
    s = out_laq.stats
    assert s.kv_tokens_full == (N_CONTEXT + (10 if query_aware else 0))
    assert s.kv_tokens_kept == keep_count(s.kv_tokens_full, ratio)  # exact per-head budget
    assert abs(s.kv_bytes_kept / s.kv_bytes_full - (1 - ratio)) <= 0.02
    # ratio 0 keeps everything and decodes as the full cache
    assert out_zero.stats.kv_bytes_kept == out_zero.stats.kv_bytes_full
    assert out_zero.token_ids == out_full.token_ids


def test_agnostic_lookahead_does_not_see_the_answer_prefix(tiny_llama):
    """The answer prefix can name the query's key ("The special magic number for X is"): in the
    query-agnostic protocol the lookahead feeds the chat template's suffix only."""
    from kvray.generate import build_prompt

    lm = tiny_llama
    ctx = "The sky is blue and the grass is green. " * 12
    p1 = build_prompt(lm.tokenizer, ctx, "What colour is the sky?", "Answer: the colour of the sky is")
    p2 = build_prompt(lm.tokenizer, ctx, "What colour is the grass?", "Answer: the colour of the grass is")
    assert p1.template_suffix and p1.suffix[:len(p1.template_suffix)] == list(p1.template_suffix)
    assert p1.template_suffix == p2.template_suffix and p1.suffix != p2.suffix
    press = LAQPress(compression_ratio=0.5, lookahead=3)
    c1 = press.compress_prefill(lm, prefill(lm, p1), False)
    c2 = press.compress_prefill(lm, prefill(lm, p2), False)
    for a, b in zip(c1.layers, c2.layers):
        assert torch.equal(a.prefix.positions, b.prefix.positions)


@pytest.mark.parametrize("query_aware", [False, True])
def test_lookaheads_of_several_presses_decode_together(tiny_llama, monkeypatch, query_aware):
    """LAQ at several budgets (and stage-1 / stage-2 settings) on one prefill: `compress_together`
    decodes their lookaheads as the rows of one lane -- one forward per pseudo token for all --
    and every press keeps exactly what `compress_prefill` keeps alone. A different lookahead
    is a group of its own; through `run_configs` each config gets the tokens it gets alone."""
    import kvray.runtime.decoder as dec_mod

    lm = tiny_llama
    pre = prefill(lm, prompt())
    presses = [LAQPress(compression_ratio=0.3), LAQPress(compression_ratio=0.6, kernel_size=3),
               LAQPress(compression_ratio=0.8, stage2_window=0), LAQPress(compression_ratio=0.5, lookahead=3)]
    assert len({p.together_key() for p in presses[:3]}) == 1 and presses[3].together_key() != presses[0].together_key()
    alone = [p.compress_prefill(lm, pre, query_aware) for p in presses]
    real, rows_per_forward = dec_mod.forward, []
    monkeypatch.setattr(dec_mod, "forward", lambda lm, rows, *a, **k: rows_per_forward.append(len(rows)) or real(lm, rows, *a, **k))
    together = LAQPress.compress_together(lm, pre, query_aware, presses)
    # the group of three: 3-row forwards, at most one per pseudo token; the other press alone
    assert rows_per_forward.count(3) <= presses[0].lookahead and rows_per_forward.count(3) >= 1
    assert set(rows_per_forward) == {1, 3} and rows_per_forward.count(1) <= presses[3].lookahead
    for a, b in zip(alone, together):
        for x, y in zip(a.layers, b.layers):
            assert x.prefix.lengths == y.prefix.lengths
            assert torch.equal(x.prefix.positions, y.prefix.positions)
            assert x.tail_length() == y.tail_length() == 0
    monkeypatch.setattr(dec_mod, "forward", real)
    outs = run_configs(lm, pre, presses, query_aware, 6, ignore_eos=True)
    for press, out in zip(presses, outs):
        assert out.token_ids == run_configs(lm, pre, [press], query_aware, 6, ignore_eos=True)[0].token_ids

"""kvray.generate on tiny models: text, stats, protocols, errors."""

import pytest

import kvray
from kvray.generate import build_prompt

CONTEXT = " ".join(f"Line {i} says the weather in town {i % 7} was mild." for i in range(40))


@pytest.mark.parametrize("query_aware", [False, True])
def test_generate_stats(tiny_lm, query_aware):
    out = kvray.generate(tiny_lm, CONTEXT, "What was the weather?", press=kvray.make_press("snapkv", compression_ratio=0.5),
                         max_new_tokens=5, query_aware=query_aware)
    s = out.stats
    assert isinstance(out.text, str) and 0 < s.new_tokens <= 5
    assert s.kv_tokens_kept == pytest.approx(s.kv_tokens_full * 0.5, abs=1)
    assert abs(s.kv_bytes_kept / s.kv_bytes_full - 0.5) < 0.02
    assert s.compression_ratio == pytest.approx(0.5, abs=0.01)
    assert s.prefill_s > 0 and s.compress_s > 0 and s.decode_s > 0 and s.peak_mem_bytes > 0


def test_query_aware_compresses_the_whole_prompt(tiny_llama):
    p = build_prompt(tiny_llama.tokenizer, CONTEXT, "What was the weather?")
    a = kvray.generate(tiny_llama, CONTEXT, "What was the weather?", max_new_tokens=2)
    b = kvray.generate(tiny_llama, CONTEXT, "What was the weather?", max_new_tokens=2, query_aware=True)
    assert a.stats.kv_tokens_full == len(p.context)
    assert b.stats.kv_tokens_full == len(p.context) + len(p.question) + len(p.suffix)
    assert a.text == b.text  # the full cache gives the same answer in both protocols


def test_prompt_layout_follows_the_chat_template(tiny_llama):
    tok = tiny_llama.tokenizer
    p = build_prompt(tok, "CONTEXT TEXT", "QUESTION?", "The answer is")
    text = tok.decode(p.context + p.question + p.suffix)
    assert text.index("CONTEXT TEXT") < text.index("QUESTION?") < text.index("<|im_start|>assistant") < text.index("The answer is")
    assert "QUESTION" not in tok.decode(p.context) and "<|im_start|>assistant" not in tok.decode(p.question)


def test_generate_errors(tiny_llama):
    with pytest.raises(ValueError, match="max_new_tokens"):
        kvray.generate(tiny_llama, CONTEXT, "q", max_new_tokens=0)
    with pytest.raises(ValueError, match="unknown method"):
        kvray.generate(tiny_llama, CONTEXT, "q", press="snap")
    with pytest.raises(ValueError, match="without compression_ratio would compress nothing"):
        kvray.generate(tiny_llama, CONTEXT, "q", press="snapkv")
    with pytest.raises(ValueError, match="supports at most"):
        kvray.generate(tiny_llama, "word " * 5000, "q")


def test_press_by_name(tiny_llama):
    out = kvray.generate(tiny_llama, CONTEXT, "q", press="knorm", compression_ratio=0.5, max_new_tokens=2)
    assert out.stats.compression_ratio == pytest.approx(0.5, abs=0.01)  # a name goes with its ratio


def test_batched_decoding_equals_one_config_at_a_time(tiny_lm):
    """Stacking compressed caches of different methods/ratios (ragged across rows) gives each
    row the logits it gets alone."""
    import torch

    from kvray.cache import KVRayCache
    from kvray.generate import prefill

    p = build_prompt(tiny_lm.tokenizer, CONTEXT, "What was the weather?")
    pre = prefill(tiny_lm, p)
    presses = [kvray.make_press("snapkv", compression_ratio=0.5), kvray.make_press("adakv", compression_ratio=0.75),
               kvray.make_press("knorm", compression_ratio=0.25)]
    rest = p.question + p.suffix
    with torch.inference_mode():
        alone = [tiny_lm.model(input_ids=torch.tensor([rest]), cache=pr.compress(pre.state(False))).logits[0]
                 for pr in presses]
        stacked = KVRayCache.merge([pr.compress(pre.state(False)) for pr in presses])
        together = tiny_lm.model(input_ids=torch.tensor([rest] * 3), cache=stacked).logits
        step = tiny_lm.model(input_ids=torch.tensor([[5], [6], [7]]), cache=stacked).logits
    for i in range(3):
        torch.testing.assert_close(together[i], alone[i], atol=1e-4, rtol=1e-4)
    assert step.shape[0] == 3 and stacked.get_seq_length() == pre.n_context + len(rest) + 1


def test_run_configs_batched_matches_sequential(tiny_llama):
    from kvray.generate import prefill, run_configs

    p = build_prompt(tiny_llama.tokenizer, CONTEXT, "What was the weather?")
    pre = prefill(tiny_llama, p)
    presses = [kvray.make_press("full"), kvray.make_press("snapkv", compression_ratio=0.5),
               kvray.make_press("streaming_llm", compression_ratio=0.5)]
    for aware in (False, True):
        batched = run_configs(tiny_llama, pre, presses, aware, 6)
        single = run_configs(tiny_llama, pre, presses, aware, 6, kv_budget=1)  # one row at a time
        assert [o.token_ids for o in batched] == [o.token_ids for o in single]
        assert [o.stats.kv_bytes_kept for o in batched] == [o.stats.kv_bytes_kept for o in single]


def test_release_prefill_drops_the_full_cache(tiny_llama):
    from kvray.generate import prefill, run_configs

    pre = prefill(tiny_llama, build_prompt(tiny_llama.tokenizer, CONTEXT, "q"))
    outs = run_configs(tiny_llama, pre, [kvray.make_press("knorm", compression_ratio=0.5)], False, 3,
                       release_prefill=True)
    assert pre.cache is None and outs[0].stats.kv_bytes_kept * 2 == pytest.approx(outs[0].stats.kv_bytes_full, rel=0.02)


def test_run_configs_over_several_prefills_equals_each_alone(tiny_llama):
    """Presses on prefills of different prompts (one per press), both protocols, their own token
    limits, MorphKV lanes and LAQ groups per prefill, in one call: each config gets the tokens,
    bytes and full-cache size it gets alone on its own prefill; each prefill is released after
    its last config."""
    from kvray.generate import prefill, run_configs

    lm = tiny_llama
    pres = [prefill(lm, build_prompt(lm.tokenizer, CONTEXT[:n], q), capture_window=8, with_question=True)
            for n, q in ((900, "What was the weather?"), (1500, "Which town?"))]
    morph = [kvray.make_press("morphkv", compression_ratio=r, window_size=4) for r in (0.25, 0.5, 0.75)]
    laq = [kvray.make_press("laq", compression_ratio=r, lookahead=2) for r in (0.25, 0.5)]
    snap = kvray.make_press("snapkv", compression_ratio=0.5)
    presses = [morph[0], snap, laq[0], morph[1], laq[1], snap, morph[0], laq[0], morph[2]]
    which = [0, 0, 1, 0, 1, 1, 1, 0, 0]
    aware = [False, True, False, False, False, False, True, True, False]
    limits = [3, 5, 4, 6, 2, 5, 4, 3, 6]  # morph[1] and morph[2]: one lane; morph[0] another limit
    outs = run_configs(lm, [pres[w] for w in which], presses, aware, limits, ignore_eos=True)
    for press, w, q, limit, out in zip(presses, which, aware, limits, outs):
        alone = run_configs(lm, pres[w], [press], q, limit, ignore_eos=True)[0]
        assert out.token_ids == alone.token_ids and len(out.token_ids) == limit
        assert out.stats.kv_bytes_kept == alone.stats.kv_bytes_kept
        assert out.stats.kv_tokens_full == alone.stats.kv_tokens_full == pres[w].state(q).n_tokens
    assert pres[0].state(True).n_tokens != pres[1].state(True).n_tokens
    released = run_configs(lm, pres, [snap, snap], False, 2, release_prefill=True)
    assert len(released) == 2 and all(p.cache is None for p in pres)
    with pytest.raises(ValueError, match="2 presses but 3 prefills"):
        run_configs(lm, pres + pres[:1], [snap, snap], False, 2)


def test_prefill_travels_between_processes_and_binds_to_its_model(tiny_llama):
    """A prefill pickled (as Ray's object store does) and bound to a copy of the same model gives
    every press, in both protocols, the tokens and bytes the original prefill gives; it cannot
    be used unbound, nor bound to a model of another shape."""
    import pickle

    from conftest import _tiny_lm
    from kvray.generate import prefill, run_configs

    lm = tiny_llama
    pre = prefill(lm, build_prompt(lm.tokenizer, CONTEXT, "What was the weather?"), capture_window=8,
                  with_question=True, capture_hidden=True)
    moved = pickle.loads(pickle.dumps(pre))
    assert moved.modules is None
    with pytest.raises(RuntimeError, match="bind"):
        moved.state(False)
    # fresh copies (_tiny_lm is cached: its object is the fixture every other test shares)
    other = _tiny_lm.__wrapped__("llama")  # a second copy of the same seeded model, as another actor loads it
    assert other.model is not lm.model
    assert moved.bind(other) is moved
    presses = [kvray.make_press(m, compression_ratio=0.5) for m in ("snapkv", "compactor", "knorm")]
    for aware in (False, True):
        a = run_configs(lm, pre, presses, aware, 5, ignore_eos=True)
        b = run_configs(other, moved, presses, aware, 5, ignore_eos=True)
        assert [o.token_ids for o in a] == [o.token_ids for o in b]
        assert [o.stats.kv_bytes_kept for o in a] == [o.stats.kv_bytes_kept for o in b]
    wrong = _tiny_lm.__wrapped__("llama")  # a model of another shape: fewer layers than the prefill has
    wrong.model.model.layers = wrong.model.model.layers[:1]
    with pytest.raises(ValueError, match="bind it to the model that made it"):
        pickle.loads(pickle.dumps(pre)).bind(wrong)

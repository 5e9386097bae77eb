"""End to end on the embedded SmolLM2-135M-Instruct (offline; about 10 s)."""

import pytest

import kvray
from kvray.eval import make_samples, score_sample

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def needle(embedded_lm):
    return make_samples("niah_single", 1, 1000, seed=0)[0]


def test_embedded_model_shape(embedded_lm):
    assert embedded_lm.num_layers == 30 and embedded_lm.num_kv_heads == 3 and embedded_lm.head_dim == 64
    assert embedded_lm.model.config._attn_implementation == "kvray"


@pytest.mark.parametrize("press", [None, kvray.make_press("snapkv", compression_ratio=0.5)], ids=["full", "snapkv"])
def test_1k_needle_is_retrieved(embedded_lm, needle, press):
    out = kvray.generate(embedded_lm, needle.context, needle.question, press=press, answer_prefix=needle.answer_prefix,
                         max_new_tokens=needle.max_new_tokens, query_aware=True)
    assert score_sample(needle, out.text) == 1.0, out.text
    s = out.stats
    assert 950 <= s.kv_tokens_full <= 1200
    expected = 1.0 if press is None else 0.5
    assert abs(s.kv_bytes_kept / s.kv_bytes_full - expected) < 0.01


def test_adakv_bytes_match_the_plan(embedded_lm, needle):
    out = kvray.generate(embedded_lm, needle.context, needle.question, press=kvray.make_press("adakv", compression_ratio=0.75),
                         answer_prefix=needle.answer_prefix, max_new_tokens=4)
    assert abs(out.stats.kv_bytes_kept - 0.25 * out.stats.kv_bytes_full) <= 0.02 * 0.25 * out.stats.kv_bytes_full


def test_model_generate_works_on_the_compressed_cache(embedded_lm, needle):
    """transformers' own generate() runs on a KVRayCache (positions from get_seq_length)."""
    import torch

    from kvray.generate import build_prompt, greedy_decode, prefill

    p = build_prompt(embedded_lm.tokenizer, needle.context, needle.question, needle.answer_prefix)
    pre = prefill(embedded_lm, p, with_question=False)
    press = kvray.make_press("snapkv", compression_ratio=0.5)
    cache = press.compress(pre.state(False))
    ids = torch.tensor([p.context + p.question + p.suffix])
    out = embedded_lm.model.generate(ids, cache=cache, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert cache.get_seq_length() == ids.shape[1] + 7
    ours = greedy_decode(embedded_lm, press.compress(pre.state(False)), p.question + p.suffix, 8)
    n = min(len(ours), 8)
    assert n > 0 and out[0, ids.shape[1]:ids.shape[1] + n].tolist() == ours[:n]


@pytest.mark.parametrize("method", kvray.list_methods())
@pytest.mark.parametrize("query_aware", [False, True], ids=["agnostic", "aware"])
def test_every_method_generates_on_the_embedded_model(embedded_lm, needle, method, query_aware):
    """All 13 methods through kvray.generate on the real model: memory held = the plan (2%)."""
    ratio = 0.0 if method == "full" else 0.5
    out = kvray.generate(embedded_lm, needle.context, needle.question, press=kvray.make_press(method, compression_ratio=ratio),
                         answer_prefix=needle.answer_prefix, max_new_tokens=6, query_aware=query_aware)
    s = out.stats
    assert s.new_tokens >= 1
    assert abs(s.kv_bytes_kept / s.kv_bytes_full - (1 - ratio)) <= 0.02 * (1 - ratio)
    assert abs(s.compression_ratio - ratio) <= 0.02

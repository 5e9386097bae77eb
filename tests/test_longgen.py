"""Long-generation evaluation (kvray.eval.longgen) and the niah_list task: offline, seeded."""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import ClassVar

import pytest
import torch

from kvray.budget import keep_count
from kvray.cache import KVRayCache
from kvray.runtime import enable_kvray_attention
from kvray.eval import make_samples, score_sample, string_match_all
from kvray.eval import tasks as tasks_mod
from kvray.eval.longgen import (cache_size, compare_long_generation, continuation_nll, continuation_nll_on_prefill,
                                decode_hook, haystack_continuation, ordered_recall, raw_prompt)
from kvray.generate import capture_window_for, greedy_decode, prefill
from kvray.presses import FullPress, SnapKVPress

L, SEG = 37, 10  # continuation tokens, segment: 3 full segments and a short one


def _morphkv_press(**kwargs):
    try:
        module = importlib.import_module("kvray.presses.morphkv")
    except ImportError:
        pytest.skip("kvray.presses.morphkv is not there yet")
    cls = getattr(module, "MorphKVPress", None)
    if cls is None or not getattr(cls, "evicts_during_decoding", False):
        pytest.skip("MorphKVPress with evicts_during_decoding is not there yet")
    return cls(**kwargs)


@pytest.fixture(scope="module")
def tok():
    return tasks_mod._default_tokenizer()  # the embedded tokenizer, which the tiny models share


@pytest.fixture(scope="module")
def prose(tok):
    return haystack_continuation(tok, 150, L, seed=0)


def _plain_token_nll(lm, ctx, cont) -> torch.Tensor:
    """Per-token NLL of `cont` after `ctx` from one ordinary forward (SDPA, no cache at all)."""
    model = lm.model
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + cont]), use_cache=False).logits[0].float()
    finally:
        enable_kvray_attention(model)
    logp = torch.log_softmax(logits, dim=-1)
    return -logp[torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1), torch.tensor(cont)]


def _entries_per_position(lm) -> int:
    return lm.plan_layers * lm.num_kv_heads  # the compressed layers (a hybrid's sliding ones apart)


# ----------------------------------------------------------------------------- (a) NLL


@pytest.mark.parametrize("query_aware", (False, True))
def test_full_press_equals_plain_forward(tiny_llama, prose, query_aware):
    lm = tiny_llama
    ctx, cont = prose
    ref = _plain_token_nll(lm, ctx, cont)
    res = continuation_nll(lm, ctx, cont, FullPress(), query_aware=query_aware, segment=SEG)
    torch.testing.assert_close(torch.tensor(res["token_nll"]), ref, rtol=1e-4, atol=1e-5)
    assert res["nll"] == pytest.approx(float(ref.mean()), rel=1e-4)
    assert res["continuation_tokens"] == L and res["prompt_tokens"] == len(ctx)
    assert not res["evicts_during_decoding"]
    # segments: bounds, NLL per segment, and the cache that predicted each segment's last token
    segs = res["segments"]
    assert [(s["start"], s["end"]) for s in segs] == [(0, 10), (10, 20), (20, 30), (30, 37)]
    per_position = _entries_per_position(lm)
    bytes_per_entry = 2 * lm.head_dim * torch.finfo(lm.dtype).bits // 8
    for s in segs:
        assert s["nll"] == pytest.approx(float(ref[s["start"]:s["end"]].mean()), rel=1e-4)
        positions = len(ctx) + s["end"] - 1  # the context and the tokens fed before the last one
        assert s["kv_entries"] == positions * per_position
        assert s["kv_tokens_per_head"] == positions
        assert s["kv_bytes"] == s["kv_bytes_full"] == positions * per_position * bytes_per_entry
    assert res["kv_bytes_end"] == segs[-1]["kv_bytes"] and res["kv_entries_end"] == segs[-1]["kv_entries"]


def test_text_inputs_and_a_segment_longer_than_the_continuation(tiny_llama, prose):
    lm = tiny_llama
    ctx, cont = prose
    text_ctx, text_cont = lm.tokenizer.decode(ctx), lm.tokenizer.decode(cont)
    ids_ctx = lm.tokenizer(text_ctx).input_ids
    ids_cont = lm.tokenizer(text_cont, add_special_tokens=False).input_ids
    res = continuation_nll(lm, text_ctx, text_cont, None, segment=1000)
    assert len(res["segments"]) == 1 and res["segments"][0]["end"] == len(ids_cont)
    torch.testing.assert_close(torch.tensor(res["token_nll"]), _plain_token_nll(lm, ids_ctx, ids_cont),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("query_aware", (False, True))
def test_prefill_press_stepwise_equals_one_forward(tiny_lm, prose, query_aware):
    """No eviction while decoding -> feeding the continuation token by token on the compressed
    cache gives the same NLL as one forward of it on the same compressed cache."""
    lm = tiny_lm
    ctx, cont = prose
    press = SnapKVPress(compression_ratio=0.5, window_size=16)
    pre = prefill(lm, raw_prompt(ctx), capture_window=capture_window_for([press]), with_question=True)
    res = continuation_nll_on_prefill(lm, pre, cont, press, query_aware=query_aware, segment=SEG)

    cache = press.compress(pre.state(query_aware))
    rest = pre.rest(query_aware)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([rest + cont[:-1]]), cache=cache, use_cache=True).logits[0].float()
    if not rest:  # query-aware: the first token comes from the prefill's logits
        logits = torch.cat([pre.aware_logits.float()[None], logits])
    else:
        logits = logits[len(rest) - 1:]
    one_forward = -torch.log_softmax(logits, dim=-1)[torch.arange(L), torch.tensor(cont)]
    torch.testing.assert_close(torch.tensor(res["token_nll"]), one_forward, rtol=1e-4, atol=1e-5)

    n = pre.n_aware if query_aware else pre.n_context
    kept = keep_count(n, 0.5)
    per_position = _entries_per_position(lm)
    assert res["kv_entries_compressed"] == kept * per_position
    for s in res["segments"]:
        assert s["kv_tokens_per_head"] == kept + (len(ctx) - n) + s["end"] - 1  # prefix + growing tail
        assert s["kv_bytes"] < s["kv_bytes_full"]
    assert res["forwards"] == L - 1 + (1 if rest else 0)


@dataclasses.dataclass(frozen=True)
class RecentOnlyPress(SnapKVPress):
    """A toy decode-time press: after every forward pass keep only the last `keep` entries of
    each head (records its calls)."""

    keep: int = 12
    name = "recent-only"
    evicts_during_decoding: ClassVar[bool] = True
    calls: ClassVar[list] = []

    def after_step(self, cache: KVRayCache, step: int) -> None:
        self.calls.append((step, cache.layers[0].get_seq_length()))
        for layer in cache.layers:
            total = [n + layer.tail_length() for n in layer.prefix.lengths]
            layer.keep([torch.arange(max(0, t - self.keep), t) for t in total])


@pytest.mark.parametrize("query_aware", (False, True))
def test_decode_time_hook_runs_after_every_forward(tiny_llama, prose, query_aware):
    lm = tiny_llama
    ctx, cont = prose
    press = RecentOnlyPress(compression_ratio=0.5, window_size=16, keep=12)
    assert decode_hook(press) is not None and decode_hook(SnapKVPress()) is None
    RecentOnlyPress.calls.clear()
    res = continuation_nll(lm, ctx, cont, press, query_aware=query_aware, segment=SEG)
    first = len(ctx) if not query_aware else len(ctx) + 1  # seq length after the first forward
    assert RecentOnlyPress.calls == [(i, first + i) for i in range(res["forwards"])]
    assert res["evicts_during_decoding"]
    assert all(s["kv_tokens_per_head"] == 12 for s in res["segments"])  # constant size while decoding
    no_hook = continuation_nll(lm, ctx, cont, SnapKVPress(compression_ratio=0.5, window_size=16),
                               query_aware=query_aware, segment=SEG)
    # the hook runs after the forward whose logits scored the token: the first token is the same
    assert res["token_nll"][0] == pytest.approx(no_hook["token_nll"][0], rel=1e-5)
    assert abs(res["nll"] - no_hook["nll"]) > 1e-4  # the eviction reached the later steps


def _greedy_tokens(lm, ctx, press, n, query_aware):
    pre = prefill(lm, raw_prompt(ctx), capture_window=capture_window_for([press]), with_question=query_aware)
    cache = press.compress(pre.state(query_aware))
    return greedy_decode(lm, cache, pre.rest(query_aware), n, pre.first_logits(query_aware),
                         after_step=decode_hook(press), ignore_stop_tokens=True)


def test_teacher_forcing_the_greedy_output_reproduces_decoding(tiny_llama, prose):
    """Teacher-forcing what greedy decoding (kvray.generate, with the press's hook) produced: every
    reference token is the argmax, so the per-step cache evolves exactly as in generation."""
    lm = tiny_llama
    ctx, _ = prose
    press = RecentOnlyPress(compression_ratio=0.5, window_size=16, keep=12)
    tokens = _greedy_tokens(lm, ctx, press, 20, False)
    res = continuation_nll(lm, ctx, tokens, press, segment=SEG)
    assert res["top1"] == 1.0 and all(res["token_top1"])


def test_morphkv_constant_size_through_the_continuation(tiny_llama, prose):
    lm = tiny_llama
    ctx, _ = prose
    press = _morphkv_press(compression_ratio=0.5, window_size=8)
    tokens = _greedy_tokens(lm, ctx, press, 25, False)
    res = continuation_nll(lm, ctx, tokens, press, segment=SEG)
    assert res["evicts_during_decoding"] and res["top1"] == 1.0
    size = keep_count(len(ctx) - 1, 0.5)  # raw prompt: the last context token is fed, not compressed
    assert res["kv_entries_compressed"] == size * _entries_per_position(lm)
    assert [s["kv_tokens_per_head"] for s in res["segments"]] == [size] * 3


def test_validation(tiny_llama, prose):
    lm = tiny_llama
    ctx, cont = prose
    with pytest.raises(ValueError, match="empty"):
        continuation_nll(lm, ctx, [], None)
    with pytest.raises(ValueError, match="segment"):
        continuation_nll(lm, ctx, cont, None, segment=0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        raw_prompt(ctx[:1])
    with pytest.raises(ValueError, match="unknown method"):
        continuation_nll(lm, ctx, cont, "snapkvv")


def test_haystack_continuation(prose, tok):
    ctx, cont = prose
    assert len(ctx) == 150 and len(cont) == L
    assert (ctx, cont) == haystack_continuation(tok, 150, L, seed=0)  # seeded
    longer = haystack_continuation(tok, 150, 3 * L, seed=0)
    assert longer[0] == ctx and longer[1][:L] == cont  # the next tokens of the same stream
    assert haystack_continuation(tok, 150, L, seed=0, index=1)[0] != ctx
    text = tok.decode(ctx + cont)
    assert "magic" not in text and re.search(r"[a-z]+\. [A-Z]", text)  # plain prose


def test_cache_size_counts_prefix_and_tail(tiny_llama, prose):
    lm = tiny_llama
    ctx, _ = prose
    press = SnapKVPress(compression_ratio=0.75, window_size=16)
    pre = prefill(lm, raw_prompt(ctx), capture_window=capture_window_for([press]), with_question=False)
    cache = press.compress(pre.state(False))
    entries, nbytes = cache_size(cache)
    assert entries == keep_count(pre.n_context, 0.75) * _entries_per_position(lm) and nbytes == cache.nbytes()
    greedy_decode(lm, cache, pre.rest(False), 3, ignore_stop_tokens=True)  # 1 fed + 2 generated tokens
    assert cache_size(cache)[0] == entries + 3 * _entries_per_position(lm)


# ----------------------------------------------------------------------------- (b) niah_list


@pytest.fixture(scope="module")
def count_tokens(tok):
    return lambda text: len(tok(text, add_special_tokens=False).input_ids)


def _planted(sample) -> list[str]:
    return re.findall(r"The next entry of the special magic list is: (\S+)\.", sample.context)


@pytest.mark.parametrize("length", (300, 1000, 3000))
def test_niah_list_items_planted_in_order_and_length(length, count_tokens):
    for s in make_samples("niah_list", 2, length, seed=length, count_tokens=count_tokens):
        assert s.task == "niah_list" and s.metric == "all"
        assert len(s.answers) == tasks_mod.list_size(length) and len(set(s.answers)) == len(s.answers)
        assert _planted(s) == list(s.answers)  # answer order = context order
        positions = [s.context.index(a) for a in s.answers]
        assert positions == sorted(positions)
        assert all(s.context.count(a) == 1 for a in s.answers)  # nowhere but where planted
        assert not any(a in (s.question + s.answer_prefix).lower() for a in s.answers)
        assert abs(count_tokens(s.context) / length - 1) <= 0.05
        assert s.max_new_tokens >= count_tokens(" " + ", ".join(s.answers)) + 16
    long = make_samples("niah_list", 1, 3000, count_tokens=count_tokens)[0]
    assert len(long.answers) == 30
    # spread over the whole context: first item in the first tenth, last one in the last tenth
    assert long.context.index(long.answers[0]) < 0.1 * len(long.context)
    assert long.context.index(long.answers[-1]) > 0.9 * len(long.context)


def test_niah_list_options_and_determinism(count_tokens):
    a = make_samples("niah_list", 2, 800, seed=3, count_tokens=count_tokens)
    assert a == make_samples("niah_list", 2, 800, seed=3, count_tokens=count_tokens)
    assert a[0].answers != make_samples("niah_list", 1, 800, seed=4, count_tokens=count_tokens)[0].answers
    assert a[0].answers != a[1].answers
    numbers = make_samples("niah_list", 1, 1500, count_tokens=count_tokens, value_kind="number", num_items=24)[0]
    assert len(numbers.answers) == 24 and all(re.fullmatch(r"\d{7}", x) for x in numbers.answers)
    assert _planted(numbers) == list(numbers.answers) and numbers.sample_id.startswith("niah_list-1500-0-0-")
    with pytest.raises(ValueError, match="num_items"):
        make_samples("niah_list", 1, 800, count_tokens=count_tokens, num_items=0)
    with pytest.raises(ValueError, match="too short"):
        make_samples("niah_list", 1, 200, count_tokens=count_tokens, num_items=40)


def test_niah_list_recall_hand_cases(count_tokens):
    s = make_samples("niah_list", 1, 600, seed=1, count_tokens=count_tokens, num_items=4)[0]
    w = list(s.answers)
    assert score_sample(s, s.answer_prefix + " " + ", ".join(w)) == 1.0
    assert score_sample(s, ", ".join(reversed(w))) == 1.0  # recall ignores the order
    assert score_sample(s, f"{w[0].upper()} and {w[2]}, then {w[0]} again") == 0.5  # repeats count once
    assert score_sample(s, w[3]) == 0.25
    assert score_sample(s, s.answer_prefix + " I do not remember.") == 0.0
    assert string_match_all(", ".join(w[:3]), w) == 0.75


def test_ordered_recall_hand_cases():
    items = ["apricot", "banjo", "granite", "nutmeg"]
    assert ordered_recall("apricot, banjo, granite, nutmeg", items) == 1.0
    assert ordered_recall("nutmeg, granite, banjo, apricot", items) == 0.25
    assert ordered_recall("Apricot, granite, banjo, nutmeg", items) == 0.75  # one out of place
    assert ordered_recall("banjo and nutmeg", items) == 0.5  # two missing, the rest in order
    assert ordered_recall("", items) == 0.0
    with pytest.raises(ValueError):
        ordered_recall("x", [" "])


# ----------------------------------------------------------------------------- driver


def test_compare_long_generation(tiny_llama):
    presses = [FullPress(), SnapKVPress(compression_ratio=0.5, window_size=16)]
    try:
        presses.append(_morphkv_press(compression_ratio=0.5, window_size=8))
    except pytest.skip.Exception:
        pass
    df = compare_long_generation(tiny_llama, presses, n_samples=1, length=200, continuation_tokens=24, seed=0,
                                 segment=10)
    assert list(df["method"]) == [p.name for p in presses] and (df["sample"] == 0).all()
    for col in ("nll", "top1", "recall", "ordered_recall", "kv_bytes_end", "kv_bytes_full_end", "list_sample_id"):
        assert col in df.columns
    assert df["recall"].between(0, 1).all() and (df["nll"] > 0).all()
    full, snap = df.iloc[0], df.iloc[1]
    assert full["kv_bytes_end"] == full["kv_bytes_full_end"] > snap["kv_bytes_end"]
    assert snap["nll"] != full["nll"] and full["list_items"] == tasks_mod.list_size(200)

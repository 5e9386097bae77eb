"""Continuous batching in the model backend (kvray.serve.engine) on the tiny seeded Llama, no
Ray: concurrent requests get the answers they get alone, admission by KV bytes, a request that
fails or is abandoned leaves its neighbours alone and frees its bytes."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")

from kvray.serve.api import GenerateJob, ModelBackend, RequestError  # noqa: E402

WORDS = "The river was quiet that morning. Ships waited at the dock while the clerk counted crates. "


def job(n=4, question="Who counted?", method="snapkv", ratio=0.5, aware=False, new=6, context=None):
    return GenerateJob(context=context or WORDS * n, question=question, method=method, compression_ratio=ratio,
                       query_aware=aware, max_new_tokens=new)


JOBS = [job(3, method="snapkv", ratio=0.5), job(6, method="adakv", ratio=0.75, aware=True, new=4),
        job(2, method="full", ratio=0.0, new=8), job(5, method="knorm", ratio=0.25, aware=True, new=5),
        job(4, method="morphkv", ratio=0.5, new=6), job(7, method="streaming_llm", ratio=0.6, new=3)]


def test_concurrent_requests_equal_each_alone(tiny_llama):
    alone = ModelBackend(tiny_llama, batching=False)
    want = [alone.generate_sync(j) for j in JOBS]
    backend = ModelBackend(tiny_llama)

    async def together():
        return await asyncio.gather(*(backend.generate(j) for j in JOBS))

    got = asyncio.run(together())
    for g, w in zip(got, want):
        assert (g.answer, g.new_tokens, g.kv_bytes_kept, g.finish_reason) == (w.answer, w.new_tokens, w.kv_bytes_kept,
                                                                             w.finish_reason)
        assert 0 < g.ttft_s <= g.total_s
    stats = backend.stats()
    assert stats["requests_finished"] == len(JOBS) and stats["peak_rows"] > 1
    assert stats["active_rows"] == 0 and stats["kv_bytes_reserved"] == 0
    backend.engine.close()


def _peak_rows(lm, method, ratio, budget, n=8):
    backend = ModelBackend(lm, kv_budget=budget)

    async def run():
        return await asyncio.gather(*(backend.generate(job(40, method=method, ratio=ratio, new=12)) for _ in range(n)))

    asyncio.run(run())
    stats = backend.stats()
    backend.engine.close()
    return stats["peak_rows"]


def test_admission_by_kv_bytes(tiny_llama):
    """Under one budget, a cache that keeps a quarter admits about four times the rows (a long
    prompt: the attention blocks' room for new tokens is the same for every row)."""
    probe = ModelBackend(tiny_llama)
    press, prompt = probe.prepare(job(40, method="full", ratio=0.0, new=12))
    full_row = probe.engine.estimate(press, prompt, False, 12)
    probe.engine.close()
    budget = int(2.2 * full_row)  # two full-cache rows fit
    full = _peak_rows(tiny_llama, "full", 0.0, budget)
    snap = _peak_rows(tiny_llama, "snapkv", 0.75, budget)
    assert full == 2 and snap >= 3.5 * full - 1, (full, snap)


@pytest.mark.parametrize("j", JOBS[:4], ids=["snapkv", "adakv-aware", "full", "knorm-aware"])
def test_reservation_counts_the_attention_blocks(tiny_llama, j):
    """On the torch path a row also holds its attention blocks (a padded copy of its cache, with
    room for the tokens it will decode): what the engine reserves for them covers what the
    decoder builds at the row's first forward, within its slack, and the decoder's held bytes
    count them."""
    from kvray.generate import compress
    from kvray.runtime import Decoder, capture_window_for, hidden_needed_for, prefill

    backend = ModelBackend(tiny_llama)
    engine = backend.engine
    engine.close()
    press, prompt = backend.prepare(j)
    pre = prefill(tiny_llama, prompt, capture_window=capture_window_for([press]), with_question=j.query_aware,
                  capture_hidden=hidden_needed_for([press]))
    cache = compress(tiny_llama, pre, press, j.query_aware)
    rest, first = pre.rest(j.query_aware), pre.first_logits(j.query_aware)
    packed = cache.nbytes()
    reserved = engine.decoder.row_bytes(cache, len(rest), j.max_new_tokens)
    decoder = Decoder(tiny_llama, impl="torch")
    decoder.add(cache, feed=rest, first_logits=first, max_new_tokens=j.max_new_tokens, ignore_stop_tokens=True)
    decoder.step()  # the feed (agnostic) or the first decode step (aware) builds the blocks
    blocks = cache.blocks_nbytes()
    assert blocks > packed > 0
    # at most the 2 slots per (layer, KV head) of the decoder's slack (the token never fed, one more)
    slot = cache.layers[0].prefix.entry_bytes + tiny_llama.dtype.itemsize
    spare = reserved - packed - engine.decoder.bytes_per_token * (len(rest) + j.max_new_tokens) - blocks
    assert 0 <= spare <= 2 * slot * tiny_llama.num_layers * tiny_llama.num_kv_heads, (spare, slot)
    assert decoder.kv_bytes() == cache.nbytes() + blocks


def test_request_over_the_budget_is_refused(tiny_llama):
    backend = ModelBackend(tiny_llama, kv_budget=1000)
    with pytest.raises(RequestError, match="needs about .* bytes of KV cache") as err:
        asyncio.run(backend.generate(job()))
    assert err.value.status_code == 413
    backend.engine.close()


def test_a_failing_request_fails_alone(tiny_llama, monkeypatch):
    import sys

    gen = sys.modules["kvray.generate"]  # the package's `generate` is the function
    real = gen.compress

    def compress(lm, pre, press, aware):
        if press.name == "knorm":
            raise ValueError("press failed")
        return real(lm, pre, press, aware)

    monkeypatch.setattr(gen, "compress", compress)
    backend = ModelBackend(tiny_llama)

    async def run():
        return await asyncio.gather(*(backend.generate(j) for j in JOBS), return_exceptions=True)

    out = asyncio.run(run())
    assert isinstance(out[3], ValueError) and "press failed" in str(out[3])
    assert all(not isinstance(o, BaseException) and o.new_tokens > 0 for i, o in enumerate(out) if i != 3)
    assert backend.stats()["requests_failed"] == 1 and backend.stats()["kv_bytes_reserved"] == 0
    backend.engine.close()


def test_abandoned_stream_frees_its_row(tiny_llama):
    backend = ModelBackend(tiny_llama)

    async def run():
        long = job(6, new=200, question="Tell me everything.")
        long = GenerateJob(**{**long.__dict__})
        stream = backend.generate_stream(long)
        other = asyncio.ensure_future(backend.generate(job(3, new=30)))
        got = []
        async for event in stream:  # the client reads two pieces, then goes away
            got.append(event)
            if len(got) == 2:
                break
        await stream.aclose()
        await other
        for _ in range(100):
            s = backend.stats()
            if s["active_rows"] == 0:
                return s, got
            await asyncio.sleep(0.02)
        return backend.stats(), got

    stats, got = asyncio.run(run())
    assert len(got) == 2 and all(isinstance(g, str) for g in got)
    assert stats["requests_cancelled"] == 1 and stats["requests_finished"] == 1
    assert stats["active_rows"] == 0 and stats["kv_bytes_reserved"] == 0 and stats["kv_bytes_held"] == 0
    backend.engine.close()


def test_context_nll_runs_between_steps(tiny_llama):
    backend = ModelBackend(tiny_llama)

    async def run():
        return await asyncio.gather(backend.generate(job(5, new=10)), backend.context_nll(WORDS * 3))

    r, nll = asyncio.run(run())
    alone = ModelBackend(tiny_llama, batching=False)
    assert r.new_tokens > 0 and nll == pytest.approx(alone.context_nll_sync(WORDS * 3), rel=1e-5)
    backend.engine.close()


def test_hybrid_model_reports_its_windowed_bytes_apart():
    """On a hybrid model (tiny Gemma 3: 2 sliding layers, 1 full) the engine and the one-at-a-time
    path agree, the ratio counts the full-attention layer, and the sliding layers' bytes come
    apart (`kv_bytes_windowed`, `kv.bytes_windowed` over HTTP); a pure model reports none."""
    from conftest import _tiny_lm

    from kvray.serve.api import kv_stats_of

    lm = _tiny_lm("gemma3")
    j = job(6, method="snapkv", ratio=0.5)
    alone = ModelBackend(lm, batching=False).generate_sync(j)
    backend = ModelBackend(lm)
    got = asyncio.run(backend.generate(j))
    backend.engine.close()
    assert (got.answer, got.kv_bytes_kept, got.kv_bytes_windowed) == (alone.answer, alone.kv_bytes_kept,
                                                                      alone.kv_bytes_windowed)
    assert got.kv_bytes_windowed > 0 and abs(got.kv_bytes_kept / got.kv_bytes_full - 0.5) < 0.05
    assert kv_stats_of(got).model_dump()["bytes_windowed"] == got.kv_bytes_windowed
    pure = ModelBackend(_tiny_lm("llama"), batching=False).generate_sync(j)
    assert pure.kv_bytes_windowed == 0 and "bytes_windowed" not in kv_stats_of(pure).model_dump()

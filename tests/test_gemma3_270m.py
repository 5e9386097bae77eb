"""Gemma 3 270M (the optional second embedded model, `make gemma3`; CI installs it): kvray's full
cache answers the ~1k-token needles as plain transformers does, and snapkv / compactor / adakv
at 0.5 run and hold what their plan says over the full-attention layers, the sliding layers
keeping their window. Skipped where the model is not installed."""

import pytest
import torch

import kvray
from kvray.eval import make_samples
from kvray.models import ModelNotFoundError, gemma3_gguf_path
from kvray.runtime import enable_kvray_attention


@pytest.fixture(scope="module")
def gemma3():
    try:
        gemma3_gguf_path()
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    return kvray.load_model("gemma3-270m", device="cpu")


def test_gemma3_270m_full_cache_answers_as_transformers(gemma3):
    lm = gemma3
    assert lm.num_layers == 18 and lm.compressed_layers == [5, 11, 17] and lm.num_kv_heads == 1
    tok = lm.tokenizer
    samples = make_samples("niah_single", 2, 1000, seed=7,
                           count_tokens=lambda s: len(tok(s, add_special_tokens=False).input_ids))
    window = lm.config.sliding_window
    for s in samples:
        ids = tok(s.context + "\n\n" + s.question + "\n" + s.answer_prefix, return_tensors="pt").input_ids
        assert ids.shape[1] > 2 * window  # the window binds
        lm.model.set_attn_implementation("sdpa")
        try:
            with torch.inference_mode():
                ref = lm.model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
        finally:
            enable_kvray_attention(lm.model)
        out = kvray.generate(lm, s.context, s.question, press="full", compression_ratio=0.0,
                             answer_prefix=s.answer_prefix, max_new_tokens=12, ignore_eos=True)
        print(f"transformers {tok.decode(ref)!r} | kvray {out.text!r}")
        assert out.token_ids == ref
        # the sliding layers hold their window, apart from the compressed layers' bytes
        elem = 2 * lm.head_dim * lm.dtype.itemsize
        assert out.stats.kv_bytes_windowed == 15 * (window - 1) * elem
        for method in ("snapkv", "compactor", "adakv"):
            res = kvray.generate(lm, s.context, s.question, press=method, compression_ratio=0.5,
                                 answer_prefix=s.answer_prefix, max_new_tokens=4)
            st = res.stats
            assert abs(st.kv_bytes_kept / st.kv_bytes_full - 0.5) < 0.01, (method, st)
            assert st.kv_bytes_full == 3 * out.stats.kv_tokens_full * elem
            assert st.kv_bytes_windowed == out.stats.kv_bytes_windowed

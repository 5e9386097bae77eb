"""Models beyond Llama: the full cache (ratio 0) gives the model's own logits on every tiny
architecture (sliding windows that bind, q/k norms, one KV head, per-layer-type RoPE, logit
soft-capping), in both protocols and batched with another prompt; what kvray cannot run is
refused with the reason."""

import pytest
import torch
from conftest import TINY_WINDOW, reference_logits, tokenizer

import kvray
from kvray.runtime import Decoder, PromptTokens, UnsupportedModelError, enable_kvray_attention, prefill
from kvray.generate import compress


def _prompt(n_ctx, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 1000, (n_ctx + 7 + 3,), generator=g).tolist()
    return PromptTokens(ids[:n_ctx], ids[n_ctx:n_ctx + 7], ids[n_ctx + 7:])


def _greedy_reference(lm, ids, steps, logits_fn):
    """Greedy tokens of the model's own attention, recomputed from scratch every step, and the
    logits each token was chosen from."""
    ids, out, logits = list(ids), [], []
    for _ in range(steps):
        lg = logits_fn(lm, ids)[-1]
        tok = int(lg.argmax())
        logits.append(lg)
        out.append(tok)
        ids.append(tok)
    return out, logits


@pytest.mark.parametrize("query_aware", [False, True])
def test_full_cache_is_the_models_own_attention_batched(tiny_lm, query_aware):
    """Two prompts of different lengths (both past the sliding window), decoded together on one
    decoder from ratio-0 caches, teacher-forced on the reference's greedy tokens: every step's
    logits equal transformers' SDPA logits of the same sequence."""
    lm = tiny_lm
    steps = 6
    prompts = [_prompt(60, 1), _prompt(45, 2)]
    assert all(len(p.context) > TINY_WINDOW for p in prompts)
    refs = [_greedy_reference(lm, p.context + p.question + p.suffix, steps, reference_logits) for p in prompts]
    dec = Decoder(lm)
    seen = {0: [], 1: []}
    for i, p in enumerate(prompts):
        pre = prefill(lm, p, with_question=query_aware)
        cache = compress(lm, pre, kvray.make_press("full"), query_aware)
        dec.add(cache, feed=pre.rest(query_aware), first_logits=pre.first_logits(query_aware), max_new_tokens=steps,
                key=i, teacher=refs[i][0], on_logits=lambda row, lg: seen[row.key].append(lg.clone()))
    dec.run()
    for i in (0, 1):
        got = torch.stack(seen[i]).float()
        want = torch.stack(refs[i][1]).float()
        err = (got - want).abs().max().item()
        print(f"{lm.name} prompt {i}: worst |logit error| {err:.2e}")
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_generate_full_cache_equals_sdpa_greedy(tiny_lm):
    """kvray.generate at ratio 0 answers what the model itself answers (greedy)."""
    lm = tiny_lm
    p = _prompt(50, 3)
    want, _ = _greedy_reference(lm, p.context + p.question + p.suffix, 5, reference_logits)
    pre = prefill(lm, p, with_question=False)
    dec = Decoder(lm)
    row = dec.add(compress(lm, pre, kvray.make_press("full"), False), feed=pre.rest(False), max_new_tokens=5,
                  ignore_stop_tokens=True)[0]
    dec.run()
    assert row.tokens == want


def test_logit_softcapping_is_honoured():
    """Gemma 2 caps attention logits (softcap * tanh(s / softcap)); with a cap that binds, the
    ratio-0 cache gives the eager reference's logits (SDPA cannot cap)."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    tok = tokenizer()
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                       sliding_window=TINY_WINDOW, attn_logit_softcapping=2.0, final_logit_softcapping=None,
                       layer_types=["sliding_attention", "full_attention"], max_position_embeddings=4096)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # sharp attention, so that the cap binds
        for m in model.modules():
            if hasattr(m, "q_proj"):
                m.q_proj.weight.mul_(30.0)
    lm = kvray.LanguageModel(model=model, tokenizer=tok, name="tiny-gemma2")
    enable_kvray_attention(model)
    p = _prompt(40, 4)
    ids = p.context + p.question + p.suffix
    want = reference_logits(lm, ids, attn="eager")  # SDPA cannot cap: eager is transformers' reference
    with torch.inference_mode():
        dense = model(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(dense, want, atol=2e-4, rtol=2e-4)
    # the compressed-cache path: question + suffix on a ratio-0 cache of the context
    pre = prefill(lm, p, with_question=False)
    cache = compress(lm, pre, kvray.make_press("full"), False)
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([p.question + p.suffix]), cache=cache).logits[0]
    torch.testing.assert_close(out, want[len(p.context):], atol=2e-4, rtol=2e-4)
    # and the cap binds here: the same weights without it give other logits
    for m in model.modules():
        if hasattr(m, "attn_logit_softcapping"):
            m.attn_logit_softcapping = None
    with torch.inference_mode():
        uncapped = model(input_ids=torch.tensor([ids])).logits[0]
    assert (uncapped - want).abs().max() > 1e-2


def _tiny(cfg, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg._attn_implementation = attn
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_unsupported_models_are_refused_with_the_reason():
    from transformers import GPT2Config, LlamaConfig

    tok = tokenizer()
    gpt2 = _tiny(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(UnsupportedModelError, match="no attention modules with q_proj/k_proj/v_proj"):
        enable_kvray_attention(gpt2)
    chunked = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1)
    chunked.attention_chunk_size = 8  # Llama 4's chunked attention
    with pytest.raises(UnsupportedModelError, match="chunked attention"):
        enable_kvray_attention(_tiny(chunked))
    linear = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    linear.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UnsupportedModelError, match="linear_attention"):
        enable_kvray_attention(_tiny(linear))
    # nothing was switched to kvray's attention on the way
    assert gpt2.config._attn_implementation == "sdpa"


def test_attention_sinks_are_refused():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("this transformers has no gpt-oss")
    tok = tokenizer()
    cfg = transformers.GptOssConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=2,
                                    num_experts_per_tok=1, sliding_window=8,
                                    layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(UnsupportedModelError, match="attention sinks"):
        enable_kvray_attention(_tiny(cfg, "eager"))  # (transformers runs gpt-oss without SDPA)


def _windowed_reference(query, prefix, tk, tv, scaling, pads, window, qpos, softcap=None):
    """Plain loops: query (b, head, i) at position qpos[b, i] attends to every entry of its KV
    head -- prefix entries at their recorded positions, tail slot j at qpos[b, -1] - (T - 1 - j)
    -- that is not after it and less than `window` before it."""
    B, Hq, q_len, d = query.shape
    H = prefix.heads
    T = tk.shape[2]
    out = torch.zeros(B, q_len, Hq, d, dtype=torch.float64)
    for b in range(B):
        end = int(qpos[b, -1])
        for hq in range(Hq):
            h = hq // (Hq // H)
            k, v = prefix.head(b * H + h)
            pos = prefix.positions[prefix.offsets[b * H + h]:prefix.offsets[b * H + h + 1]].tolist()
            keys = [k[e] for e in range(k.shape[0])]
            vals = [v[e] for e in range(v.shape[0])]
            for j in range(pads[b], T):
                keys.append(tk[b, h, j])
                vals.append(tv[b, h, j])
                pos.append(end - (T - 1 - j))
            for i in range(q_len):
                p = int(qpos[b, i])
                seen = [e for e, kp in enumerate(pos) if kp <= p and p - kp < window]
                s = torch.stack([query[b, hq, i].double() @ keys[e].double() * scaling for e in seen])
                if softcap is not None:
                    s = torch.tanh(s / softcap) * softcap
                w = torch.softmax(s, 0)
                out[b, i, hq] = sum(w[n] * vals[e].double() for n, e in enumerate(seen))
    return out


@pytest.mark.parametrize("lengths", [[7, 7, 7, 7], [3, 9, 0, 6]], ids=["uniform", "skewed"])
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_windowed_attention_matches_plain_loops(lengths, q_len, softcap):
    from kvray.cache import RaggedKV
    from kvray.runtime.attention import windowed_attention_torch

    torch.manual_seed(0)
    B, H, G, d, T, window = 2, 2, 3, 8, 5, 6
    starts = (20, 14)  # each row's first tail position: the prompts differ in length
    pos = []
    for bh, n in enumerate(lengths):  # kept positions before the row's tail, some out of the window
        g = torch.Generator().manual_seed(bh)
        pos.append(torch.randperm(starts[bh // H], generator=g)[:n].sort().values)
    total = sum(lengths)
    prefix = RaggedKV(torch.randn(total, d), torch.randn(total, d), torch.cat(pos), tuple(lengths), B, H)
    pads = (0, 2)
    query = torch.randn(B, H * G, q_len, d)
    tk, tv = torch.randn(B, H, T, d), torch.randn(B, H, T, d)
    ends = torch.tensor([starts[b] + T - pads[b] for b in range(B)])
    qpos = ends[:, None] - q_len + torch.arange(q_len)
    got = windowed_attention_torch(query, prefix, tk, tv, 0.3, pads, softcap, window, qpos)
    want = _windowed_reference(query, prefix, tk, tv, 0.3, pads, window, qpos, softcap)
    err = (got.double() - want).abs().max().item()
    print(f"worst mismatch {err:.2e}")
    assert err < 1e-5


class _BosTokenizer:
    """A tokenizer that puts BOS (id 2) in front by default, like Gemma's; no chat template."""

    bos_token_id = 2
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        ids = [100 + ord(c) for c in text]
        return type("Enc", (), {"input_ids": ([2] if add_special_tokens else []) + ids})()


def test_plain_layout_starts_with_the_tokenizers_bos():
    """A base model without a chat template gets the plain layout, led by the BOS its tokenizer
    adds by default (Gemma 3 answers garbage without it); the BOS is template, not context."""
    from kvray.runtime import build_prompt

    p = build_prompt(_BosTokenizer(), "ctx", "q?", "A:")
    assert p.context == [2, 100 + ord("c"), 100 + ord("t"), 100 + ord("x")]
    assert p.template_prefix == 1
    assert p.question == [100 + ord(c) for c in "\n\nq?"]
    assert p.suffix == [100 + ord(c) for c in "\nA:"]


def test_gemma3_not_installed_names_the_make_target(tmp_path, monkeypatch):
    import importlib.util

    from kvray import models

    monkeypatch.setenv("KVRAY_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == models._GEMMA3_PACKAGE else real(name, *a))
    with pytest.raises(models.ModelNotFoundError, match="make gemma3"):
        kvray.load_model("gemma3-270m")


def test_windowed_layers_hold_their_window_while_decoding():
    """On a hybrid model, decoding far past the window: every step's logits stay the model's own,
    and the sliding layers drop what fell out of their window: per (row, head) they never hold
    more than max(window - 1, tokens since compression) + the slack."""
    from conftest import _tiny_lm

    from kvray.cache import window_slack

    lm = _tiny_lm("gemma3")
    p = _prompt(40, 5)
    slack = window_slack(TINY_WINDOW)
    steps = 2 * TINY_WINDOW + 6
    want_tokens, want_logits = _greedy_reference(lm, p.context + p.question + p.suffix, steps, reference_logits)
    pre = prefill(lm, p, with_question=False)
    cache = compress(lm, pre, kvray.make_press("full"), False)
    windowed = [layer for layer in cache.layers if layer.window is not None]
    assert windowed and all(sum(layer.prefix.lengths) == TINY_WINDOW - 1 for layer in windowed)
    held, seen = [], []

    def observe(row, lg):
        seen.append(lg.clone())
        held.append(max((sum(layer.prefix.lengths) + layer.tail_length(), layer.tail_length()) for layer in windowed))

    dec = Decoder(lm)
    dec.add(cache, feed=pre.rest(False), max_new_tokens=steps, teacher=want_tokens, on_logits=observe)
    dec.run()
    torch.testing.assert_close(torch.stack(seen).float(), torch.stack(want_logits).float(), atol=2e-4, rtol=2e-4)
    print("held (entries, tail) per step:", held)
    # from the first one-token step on (the feed's own queries span `fed` positions)
    assert all(n <= max(TINY_WINDOW - 1, tail) + slack for n, tail in held[1:])
    assert held[-1][0] < TINY_WINDOW - 1 + held[-1][1]  # entries were dropped

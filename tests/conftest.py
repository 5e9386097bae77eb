"""Tiny seeded models built from configs (offline), sharing the embedded model's tokenizer."""

from __future__ import annotations

import functools
import os

import pytest
import torch

# Triton kernels run in Triton's interpreter on a machine without CUDA (tests/test_kernels*.py);
# it must be chosen before triton is first imported. Only an explicit impl="triton" uses it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kvray  # noqa: E402 (after choosing the Triton mode)
from kvray.runtime import enable_kvray_attention  # noqa: E402

torch.set_num_threads(2)

TINY_KINDS = ("llama", "qwen2", "mistral", "qwen3", "gemma3", "mistral_sw")
#: the sliding window of the tiny sliding-window models: shorter than the tests' prompts, so it binds
TINY_WINDOW = 24


@functools.lru_cache(maxsize=1)
def tokenizer():
    return kvray.load_tokenizer()


def tiny_config(kind: str, vocab_size: int):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=True)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if kind == "mistral_sw":  # every layer within a sliding window
        return MistralConfig(**common, sliding_window=TINY_WINDOW)
    if kind == "qwen3":  # per-head q/k RMSNorm, head_dim apart from hidden / heads
        return Qwen3Config(**common, head_dim=24)
    if kind == "gemma3":  # sliding + full layers (2:1), one KV head, q/k norm, per-layer-type RoPE
        common.update(num_hidden_layers=3, num_key_value_heads=1)
        return Gemma3TextConfig(**common, head_dim=32, query_pre_attn_scalar=32, sliding_window=TINY_WINDOW,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                final_logit_softcapping=30.0)
    raise ValueError(kind)


@functools.lru_cache(maxsize=None)
def _tiny_lm(kind: str) -> kvray.LanguageModel:
    from transformers import AutoModelForCausalLM

    tok = tokenizer()
    torch.manual_seed(0)
    cfg = tiny_config(kind, len(tok))
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg).eval()
    enable_kvray_attention(model)
    return kvray.LanguageModel(model=model, tokenizer=tok, name=f"tiny-{kind}")


@pytest.fixture(params=TINY_KINDS)
def tiny_lm(request) -> kvray.LanguageModel:
    return _tiny_lm(request.param)


@pytest.fixture
def tiny_llama() -> kvray.LanguageModel:
    return _tiny_lm("llama")


@pytest.fixture(scope="session")
def embedded_lm() -> kvray.LanguageModel:
    return kvray.load_model(device="cpu")


@pytest.fixture(scope="session")
def ray_session():
    """One private local Ray for the whole session (4 logical CPUs; never a running cluster)."""
    import os

    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """The tiny seeded Llama saved as a model directory, so actors and replicas load it by name."""
    lm = _tiny_lm("llama")
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


def reference_logits(lm: kvray.LanguageModel, ids: list[int], attn: str = "sdpa") -> torch.Tensor:
    """The model's own logits [len(ids), vocab] with one of transformers' attentions (not kvray's)."""
    from kvray.runtime import enable_kvray_attention as enable

    lm.model.set_attn_implementation(attn)
    try:
        with torch.inference_mode():
            return lm.model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        enable(lm.model)

"""What kvray can run correctly, checked before anything runs: a model kvray would answer
wrongly is refused with the reason, at `load_model` (or whenever kvray's attention is enabled).

Supported: decoder-only transformers models whose every layer is softmax attention with
`q_proj` / `k_proj` / `v_proj` projections and RoPE applied by the module (Llama, Mistral, Qwen 2/3,
Gemma 2/3, SmolLM, ...), with per-layer options the attention function honours: the module's
`scaling`, logit soft-capping, and sliding windows (exactly while they cannot bind; see
`kvray.runtime.attention.ragged_attention`). Refused, each with its name: encoder-decoder models,
layers that are not attention (state-space or linear-attention hybrids), attention sinks
(gpt-oss), chunked attention (Llama 4), bidirectional attention, multi-head latent attention
(DeepSeek), and layer types other than full and sliding attention.
"""

from __future__ import annotations

LAYER_TYPES = ("full_attention", "sliding_attention")


class UnsupportedModelError(ValueError):
    """The model (or one of its attention options) is one kvray cannot run correctly."""


def _attention_modules(model) -> list:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]


def unsupported_reasons(model) -> list[str]:
    """Why kvray cannot run `model` correctly (empty when it can)."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg  # multimodal wrappers keep the LM's config inside
    name = type(model).__name__
    reasons = []
    if cfg is None:
        return [f"{name} has no config"]
    if getattr(cfg, "is_encoder_decoder", False):
        reasons.append(f"{name} is an encoder-decoder model (kvray compresses decoder-only caches)")
    mods = _attention_modules(model)
    n_layers = getattr(cfg, "num_hidden_layers", None)
    if not mods:
        found = sorted({type(m).__name__ for m in model.modules() if "attention" in type(m).__name__.lower()})
        reasons.append(f"{name} has no attention modules with q_proj/k_proj/v_proj projections"
                       + (f" (found {', '.join(found)})" if found else ""))
    else:
        for m in mods:
            missing = [p for p in ("k_proj", "v_proj") if not hasattr(m, p)]
            if missing:
                reasons.append(f"{type(m).__name__} (layer {m.layer_idx}) has no {', '.join(missing)}: "
                               "kvray needs separate key and value projections (multi-head latent or fused "
                               "attention is not supported)")
                break
        if n_layers is not None and len(mods) != n_layers:
            reasons.append(f"{name} has {n_layers} layers but {len(mods)} attention modules: layers that are "
                           "not softmax attention (state-space, linear attention) are not supported")
        if any(getattr(m, "sinks", None) is not None for m in mods):
            reasons.append(f"{type(mods[0]).__name__} has attention sinks, which kvray does not support")
    types = getattr(cfg, "layer_types", None) or []
    other = sorted(set(types) - set(LAYER_TYPES))
    if other:
        reasons.append(f"layer types {other} are not supported (supported: {list(LAYER_TYPES)})")
    if getattr(cfg, "attention_chunk_size", None):
        reasons.append(f"chunked attention (attention_chunk_size={cfg.attention_chunk_size}) is not supported")
    if getattr(cfg, "use_bidirectional_attention", False):
        reasons.append("bidirectional attention is not supported (kvray compresses causal caches)")
    if getattr(cfg, "kv_lora_rank", None):
        reasons.append("multi-head latent attention (kv_lora_rank) is not supported")
    return reasons


def check_supported(model) -> None:
    """Raise `UnsupportedModelError` naming everything kvray cannot run correctly in `model`."""
    reasons = unsupported_reasons(model)
    if reasons:
        raise UnsupportedModelError(f"kvray cannot run {type(model).__name__} correctly: " + "; ".join(reasons))

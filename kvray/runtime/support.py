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

import ctypes
import os
import sys

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


def layer_window(module) -> int | None:
    """The sliding window of one attention module (None: it attends to the whole context). Modules
    that carry `sliding_window` (Gemma 2/3, Qwen 2/3) say it per layer; others (Mistral) pass the
    config's to every layer."""
    if hasattr(module, "sliding_window"):
        return int(module.sliding_window) if module.sliding_window else None
    cfg = module.config
    types = getattr(cfg, "layer_types", None)
    if types:
        return int(cfg.sliding_window) if types[module.layer_idx] == "sliding_attention" and cfg.sliding_window else None
    window = getattr(cfg, "sliding_window", None)
    return int(window) if window else None


def windowed_layers(windows: list[int | None]) -> list[int]:
    """Layers that keep their window instead of being compressed: the sliding layers of a hybrid
    model (sliding and full layers mixed, e.g. Gemma 3's 5:1). When every layer slides (Mistral
    7B v0.1), every layer is compressed, and the window is applied by position while decoding."""
    if all(w is not None for w in windows):
        return []
    return [i for i, w in enumerate(windows) if w is not None]


#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_malloc_tuned: bool | None = None


def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let this process reuse the memory it frees instead of handing it back to the OS at every
    free (glibc `mallopt`; a no-op elsewhere, or with KVRAY_KEEP_FREED_MEMORY=0). Returns whether
    it applied.

    glibc serves allocations above 128 KiB-32 MiB (its adaptive threshold) with a fresh `mmap`
    and unmaps them when freed, so every large tensor a forward or a re-packed batch allocates
    is page-faulted in again, page by page. On this project's 2-core CPU machine that made
    zero-filling a fresh 5 MB block cost 1.3 ms, and building one batch's attention blocks
    (`DecodeBlocks`, 30 layers) 160-360 ms instead of 50-65 ms. The cost: the heap keeps up to
    `trim_threshold` of freed memory for reuse (resident, not returned to the OS)."""
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    _malloc_tuned = False
    if os.environ.get("KVRAY_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        _malloc_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):  # not glibc (musl, ...)
        pass
    return _malloc_tuned

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
import weakref

import torch

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


class PackedLinear(torch.nn.Linear):
    """A bf16 `nn.Linear` on the CPU that multiplies with a copy of its weight laid out once for
    oneDNN (`pack_linear_weights`). `F.linear` re-lays the weight out at every call, which is most
    of a small batch's cost: measured on this project's 2-core AVX512-BF16 machine, SmolLM2-135M's
    211 linear layers take 52 ms for 5 rows with `F.linear` and 29 ms packed (67 vs 53 ms for 19
    rows), with bit-identical results. Falls back to `F.linear` whenever the packed copy may not
    apply: autograd, another dtype or device, or a weight changed since it was packed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = _PACKED.get(self)
        w = self.weight
        if (packed is None or x.dtype != w.dtype or x.device.type != "cpu" or x.numel() == 0
                or (w._version, w.data_ptr()) != packed[1]
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
            return torch.nn.functional.linear(x, w, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed[0], self.bias, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])


#: module -> (oneDNN-packed weight, (weight version, address) when packed); weak, so a copied or
#: dropped model neither shares nor keeps the packed copies
_PACKED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def pack_linear_weights(model: torch.nn.Module) -> int:
    """Give every bf16 CPU `nn.Linear` of `model` a oneDNN-packed copy of its weight
    (`PackedLinear`); returns how many were packed. A no-op (0) unless the CPU multiplies bf16
    natively, or with KVRAY_PACK_WEIGHTS=0. The cost: a second copy of the linear weights in memory
    (270 MB for SmolLM2-135M, whose tied embedding is packed for the LM head)."""
    if os.environ.get("KVRAY_PACK_WEIGHTS", "1") == "0":
        return 0
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return 0
    except (AttributeError, RuntimeError):  # a torch build without these ops
        return 0
    n = 0
    with torch.no_grad():
        for mod in model.modules():
            w = getattr(mod, "weight", None)
            if type(mod) not in (torch.nn.Linear, PackedLinear) or w is None or w.dtype != torch.bfloat16 \
                    or w.device.type != "cpu":
                continue
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16)
            except RuntimeError:
                return n
            _PACKED[mod] = (packed, (w._version, w.data_ptr()))
            mod.__class__ = PackedLinear
            n += 1
    return n

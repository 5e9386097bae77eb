"""Baselines: the full cache, random eviction, StreamingLLM and KNorm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LayerInputs, Press, protect


@dataclass(frozen=True)
class FullPress(Press):
    """No compression: every context entry is kept (the reference for every score)."""

    name = "full"

    def __post_init__(self):
        super().__post_init__()
        if self.target_ratio != 0.0:
            raise ValueError("full keeps every entry: its compression_ratio must be 0 and it takes no plan")

    def score(self, layer: LayerInputs) -> torch.Tensor:
        return torch.zeros(layer.keys.shape[:3], device=layer.keys.device)


@dataclass(frozen=True)
class RandomPress(Press):
    """Evicts uniformly at random (seeded per layer): the floor every method must beat.

    parity="kvpress": kvpress's RandomPress with this `seed` (its own default, None, draws from
    the global generator, which nothing reproduces): the same draw `torch.rand(B, H, N)` in the
    keys' dtype from a generator seeded with `seed` on the keys' device, for every layer."""

    seed: int = 0
    name = "random"
    kvpress_defaults = {}

    def score(self, layer: LayerInputs) -> torch.Tensor:
        if self.parity == "kvpress":
            keys = layer.keys
            gen = torch.Generator(device=keys.device).manual_seed(self.seed)
            return torch.rand(*keys.shape[:3], generator=gen, device=keys.device, dtype=keys.dtype)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + layer.layer_idx)
        return torch.rand(layer.keys.shape[:3], generator=gen).to(layer.keys.device)


@dataclass(frozen=True)
class StreamingLLMPress(Press):
    """StreamingLLM (Xiao et al. 2023, arXiv 2309.17453): keep `n_sink` attention sinks and the
    most recent tokens. Deviation: original positions are kept (no rolling RoPE), as kvpress.
    n_sink=4 is the paper's and kvpress's default.

    parity="kvpress": kvpress's scores (1 for the sinks and the last `int(N * (1 - ratio))` -
    n_sink tokens, 0 between) and its truncated keep count; the same kept set whenever the budget
    holds the sinks."""

    n_sink: int = 4
    name = "streaming_llm"
    kvpress_defaults = {}

    def __post_init__(self):
        super().__post_init__()
        if self.n_sink < 0:
            raise ValueError(f"streaming_llm: n_sink must be >= 0, got {self.n_sink}")

    def score(self, layer: LayerInputs) -> torch.Tensor:
        B, H, N = layer.keys.shape[:3]
        if self.parity == "kvpress":
            if N <= self.n_sink:
                raise ValueError(f"streaming_llm: kvpress needs more than n_sink={self.n_sink} tokens, got {N}")
            evicted = N - int(N * (1 - self.compression_ratio))
            scores = torch.ones(B, H, N, device=layer.keys.device, dtype=layer.keys.dtype)
            scores[..., self.n_sink:self.n_sink + evicted] = 0
            return scores
        recency = torch.arange(N, device=layer.keys.device, dtype=torch.float32).expand(B, H, N)
        return protect(recency, first=self.n_sink)


@dataclass(frozen=True)
class KnormPress(Press):
    """KNorm (Devoto et al. 2024, arXiv 2406.11430): keep the keys with the smallest L2 norm
    (score = -||k||). Query-agnostic, no attention needed. No parameters (neither in the paper
    nor in kvpress).

    parity="kvpress": kvpress's norm (`linalg.vector_norm` accumulated in at least fp32) and its
    truncated keep count."""

    name = "knorm"
    kvpress_defaults = {}

    def score(self, layer: LayerInputs) -> torch.Tensor:
        if self.parity == "kvpress":
            keys = layer.keys
            return -torch.linalg.vector_norm(keys, dim=-1, dtype=torch.promote_types(keys.dtype, torch.float32))
        return -layer.keys.float().norm(dim=-1)

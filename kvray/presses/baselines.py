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
    """Evicts uniformly at random (seeded per layer): the floor every method must beat."""

    seed: int = 0
    name = "random"

    def score(self, layer: LayerInputs) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + layer.layer_idx)
        return torch.rand(layer.keys.shape[:3], generator=gen).to(layer.keys.device)


@dataclass(frozen=True)
class StreamingLLMPress(Press):
    """StreamingLLM (Xiao et al. 2023, arXiv 2309.17453): keep `n_sink` attention sinks and the
    most recent tokens. Deviation: original positions are kept (no rolling RoPE), as kvpress."""

    n_sink: int = 4
    name = "streaming_llm"

    def __post_init__(self):
        super().__post_init__()
        if self.n_sink < 0:
            raise ValueError(f"streaming_llm: n_sink must be >= 0, got {self.n_sink}")

    def score(self, layer: LayerInputs) -> torch.Tensor:
        B, H, N = layer.keys.shape[:3]
        recency = torch.arange(N, device=layer.keys.device, dtype=torch.float32).expand(B, H, N)
        return protect(recency, first=self.n_sink)


@dataclass(frozen=True)
class KnormPress(Press):
    """KNorm (Devoto et al. 2024, arXiv 2406.11430): keep the keys with the smallest L2 norm
    (score = -||k||). Query-agnostic, no attention needed."""

    name = "knorm"

    def score(self, layer: LayerInputs) -> torch.Tensor:
        return -layer.keys.float().norm(dim=-1)

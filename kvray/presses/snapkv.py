"""SnapKV and PyramidKV: window-attention scoring with uniform or pyramid layer budgets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import kvpress_pyramid_counts, pyramid_layer_counts
from .base import LayerInputs, PrefillState, Press, protect
from .scoring import check_window_params, kvpress_window_scores, pool, reduce_gqa, window_scores


@dataclass(frozen=True)
class SnapKVPress(Press):
    """SnapKV (Li et al., NeurIPS 2024, arXiv 2404.14469).

    Score of a context token = attention it receives from the last `window_size` queries (mean
    over the window rows, fp32 softmax, causal inside the window), reduced over each KV head's
    query group (`gqa_reduction`, kvpress's mean by default: one cache per KV head, never the
    repeat_kv memory blow-up), then pooled along tokens (`pooling`, `kernel_size`). The window
    itself is always kept (padded with max + 1).

    Defaults follow the authors' LongBench configs (W=32, kernel 7, max-pool) rather than
    kvpress's (W=64, kernel 5, avg-pool): on SmolLM2-135M at ratio 0.5 the 32/7 setting kept a
    1k-token needle where 64/5 lost it. In the query-agnostic protocol the window is the last
    `window_size` context tokens.

    observation="question" (an option, not in the paper's code): in the query-aware protocol the
    observation window is the question's own tokens, whatever their number, rather than the
    last `window_size` tokens of the prompt, which after a chat template end with the assistant
    header and the answer prefix. Kept as the window: everything from the question on, and at
    least the last `window_size` tokens (so a short prompt keeps its recent context as with
    "last"). The paper's premise is that the window holds the question. Without a compressed
    question (query-agnostic protocol, empty question) it is the last `window_size` tokens, as
    with "last".

    parity="kvpress": kvpress's SnapKVPress (`kvpress_window_scores`: its op order, avg-pooling
    that counts the zero padding and runs per query head before the group mean, the window
    padded with max + 1, no other protection) and its truncated keep count; make_press gives it
    kvpress's window 64, kernel 5, avg-pool. pooling must be "avg", gqa_reduction "mean",
    observation "last" (kvpress has no other).
    """

    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    gqa_reduction: str = "mean"
    observation: str = "last"
    name = "snapkv"
    needs_queries = True
    kvpress_defaults = {"window_size": 64, "kernel_size": 5, "pooling": "avg"}

    def __post_init__(self):
        super().__post_init__()
        check_window_params(self.name, window_size=self.window_size, kernel_size=self.kernel_size,
                            pooling=self.pooling, gqa_reduction=self.gqa_reduction, observation=self.observation)
        if self.parity == "kvpress" and (self.pooling, self.gqa_reduction, self.observation) != ("avg", "mean", "last"):
            raise ValueError(f"{self.name}: kvpress pools with avg, reduces GQA groups by mean and observes the last "
                             f"window; got pooling={self.pooling!r}, gqa_reduction={self.gqa_reduction!r}, "
                             f"observation={self.observation!r}")

    def score(self, layer: LayerInputs) -> torch.Tensor:
        if self.parity == "kvpress":
            return kvpress_window_scores(layer, self.window_size, self.kernel_size)
        mean, W = window_scores(layer, self.window_size, self.observation)  # [B, Hq, N]
        scores = reduce_gqa(mean, layer.num_kv_heads, self.gqa_reduction)
        scores = pool(scores, self.kernel_size, self.pooling)
        # the window and everything after it is kept; with the question's rows as the window, also
        # at least the last window_size tokens
        if self.observation == "question" and layer.question is not None:
            return protect(scores, last=max(layer.n_tokens - layer.question[0], self.window_size))
        return protect(scores, last=W)


@dataclass(frozen=True)
class PyramidKVPress(SnapKVPress):
    """PyramidKV (Cai et al. 2024, arXiv 2406.02069): SnapKV scores, layer budgets decreasing
    linearly with depth (min = mean / beta, max = 2 * mean - min, as kvpress / KVCache-Factory),
    averaging exactly the uniform budget so the compression ratio holds. A static plan, if given,
    replaces the pyramid. beta=20 is KVCache-Factory's and kvpress's.

    parity="kvpress": SnapKV's kvpress scores and kvpress's per-layer budgets
    (`kvpress_pyramid_counts`: the window counted in, each layer rounded on its own, and a fall
    back to uniform budgets when the pyramid does not fit: at W=64, beta=20 and ratio 0.75 below
    5120 tokens), so the achieved ratio may differ slightly from the target."""

    beta: float = 20.0
    name = "pyramidkv"

    def __post_init__(self):
        super().__post_init__()
        if self.beta < 1:
            raise ValueError(f"pyramidkv: beta must be >= 1, got {self.beta}")

    def layer_counts(self, state: PrefillState) -> list[list[int]]:
        if self.plan is not None:
            return super().layer_counts(state)
        if self.parity == "kvpress":
            per_layer = kvpress_pyramid_counts(state.num_layers, state.n_tokens, self.compression_ratio,
                                               self.window_size, self.beta)
            return [[k] * state.num_kv_heads for k in per_layer]
        per_layer = pyramid_layer_counts(state.num_layers, state.n_tokens, self.compression_ratio, self.beta)
        return [[k] * state.num_kv_heads for k in per_layer]

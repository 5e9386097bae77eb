"""LAVa: value-scaled window-attention scores, entropy-driven layer budgets and head-adaptive
budgets inside each layer, allocated once over the whole prefill."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..budget import head_adaptive_counts, keep_count, round_preserving_sum
from .base import LayerInputs, PrefillState, Press, protect
from .scoring import check_window_params, pool, window_scores


def layer_entropy(prefix_scores: torch.Tensor) -> float:
    """Normalised entropy in [0, 1] of one layer's flattened, non-negative scores [H, P]:
    p = s / sum(s), e = -sum p log p / log |p| (1 = uniform = most uncertain). A layer with a
    single entry has nothing to tell apart (1.0); an all-zero layer gives 0, as the reference."""
    s = prefix_scores.double().flatten()
    if s.numel() <= 1:
        return 1.0
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    return float(-torch.special.xlogy(p, p).sum() / math.log(s.numel()))


def proportional_totals(weights: list[float], total: int, cap: int) -> list[int]:
    """Integers proportional to `weights`, each in [0, cap], summing exactly to `total`.

    Water-filling: entries whose share exceeds `cap` are clamped and the rest of the budget is
    shared again in proportion among the others (equally when their weights are all zero)."""
    n = len(weights)
    if not 0 <= total <= n * cap:
        raise ValueError(f"cannot share {total} over {n} slots of at most {cap}")
    shares = [0.0] * n
    free, left = list(range(n)), float(total)
    while free:
        mass = sum(weights[i] for i in free)
        tent = {i: left * weights[i] / mass if mass > 0 else left / len(free) for i in free}
        over = [i for i in free if tent[i] > cap]
        if not over:
            for i in free:
                shares[i] = tent[i]
            break
        for i in over:
            shares[i] = float(cap)
            left -= cap
            free.remove(i)
    return round_preserving_sum(shares, total, upper=cap)


def head_counts(prefix_scores: torch.Tensor, layer_total: int, window: int, alpha: float) -> list[int]:
    """Keep counts of one layer's heads: the `window` protected tokens in every head, plus an
    AdaKV split of the rest over the prefix scores [H, P] (floor `alpha` times the layer's own
    mean prefix budget). A budget that cannot hold every head's window is shared evenly (the
    selection then keeps the most recent window tokens)."""
    H, P = prefix_scores.shape
    if layer_total < H * window:
        return round_preserving_sum([layer_total / H] * H, layer_total, upper=window + P)
    rest = layer_total - H * window
    if rest == 0:
        return [window] * H
    return [window + c for c in head_adaptive_counts(prefix_scores, rest, alpha)]


@dataclass(frozen=True)
class LAVaPress(Press):
    """LAVa (Shen et al., "LAVa: Layer-wise KV Cache Eviction with Dynamic Budget Allocation",
    EMNLP 2025 Findings, arXiv 2509.09754; reference code MGDDestiny/Lava).

    Score of prefix token i in KV head h (window of the last W queries excluded):
    `V_h * pool((1/W) sum_j softmax(q_j K^T / sqrt d)[i])`, computed per query head (fp32
    softmax over all N keys, causal inside the window, prefix columns pooled on their own as
    the reference's `calcul_attn_score`), where `V_h = max_{i < N-W} ||v_i||_1` is a per-head
    scalar from the layer-output error bound that makes scores comparable across heads; then
    reduced over each KV head's query group with `gqa_reduction` (max, the reference's
    `gqa_support`: keep a token if any head of the group needs it). The window gets max + 1.

    Budgets (`allocate`, once over all layers since one prefill yields every layer's scores):
    every head keeps the W window tokens; the prefix budget L * H * (K - W), K =
    round(N * (1 - ratio)), is split over layers in proportion to the normalised entropy of
    each layer's flattened prefix scores (flatter = more uncertain layer = more tokens), capped
    at H * (N - W) per layer with the excess re-shared; inside a layer, heads get AdaKV's
    `alpha * B_l + (1 - alpha) * n_h` (n_h = winners of the layer's global top-H*B_l).

    window_size: observation window W (reference 32); kernel_size, pooling: smoothing of the
        window attention (reference 7, max-pool); gqa_reduction: "max" (reference) or "mean";
    alpha: head floor `floor_alpha` (0.2, the reference's LongBench `pred.py`);
    dynamic_layers: entropy layer budgets (True) or uniform ones (False, i.e. Ada-SnapKV with
        the LAVa score; the paper's ablation). A static `plan` also replaces the entropy split
        (its per-layer totals are kept, heads stay adaptive).

    Deviations from the reference code (pitfalls listed in docs/methods.md, section 6, avoided):
    - floor: the reference sets misspelled attributes (`floor_capactiy`), so its floor stays
      `int(base_capacity * alpha)` of the initial uniform budget and head budgets do not sum to
      the layer budget; here the floor is alpha times the layer's own budget and the counts sum
      exactly (largest-remainder rounding; the reference truncates with int() and round()).
    - layer budgets: the reference cascades re-evictions layer by layer during prefill with
      `floor(e_l / sum e * L * (B - W))` (total not exact) and leaves a layer uncompressed when its
      budget exceeds its length (so the memory target is missed); here the final proportional
      split is computed directly with a cap at the layer length, the total is exact, and the
      mean keep ratio is the target.
    - GQA: one cache per KV head (never repeat_kv'd storage); V_h is per KV head, which is what
      the reference's max over repeat_kv'd values gives.
    - avg pooling (not the default) ignores the zero padding (kvray's shared `pool`); the
      reference's `avg_pool1d` counts it. Batches share one allocation (scores averaged over B).
    - the reference's optional `normalize` and `skip` (both off in its configs) are not offered.
    """

    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    gqa_reduction: str = "max"
    alpha: float = 0.2
    dynamic_layers: bool = True
    name = "lava"
    needs_queries = True

    def __post_init__(self):
        super().__post_init__()
        check_window_params(self.name, window_size=self.window_size, kernel_size=self.kernel_size,
                            pooling=self.pooling, gqa_reduction=self.gqa_reduction)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"lava: alpha (head floor) must lie in [0, 1], got {self.alpha}")
        if not isinstance(self.dynamic_layers, bool):
            raise ValueError(f"lava: dynamic_layers must be True or False, got {self.dynamic_layers!r}")

    def window(self, layer: LayerInputs) -> int:
        """Protected window tokens of a layer (fewer when fewer queries were captured)."""
        captured = layer.queries.shape[2] if layer.queries is not None else self.window_size
        return min(self.window_size, captured, layer.n_tokens)

    def score(self, layer: LayerInputs) -> torch.Tensor:
        mean, W = window_scores(layer, self.window_size)  # [B, Hq, N]
        B, Hq, N = mean.shape
        H, P = layer.num_kv_heads, max(N - W, 0)
        scores = torch.zeros(B, H, N, dtype=torch.float32, device=mean.device)
        if P > 0:
            per_q = pool(mean[..., :P], self.kernel_size, self.pooling)  # [B, Hq, P]
            vbar = layer.values[:, :, :P].float().abs().sum(-1).amax(-1)  # [B, H]
            per_q = per_q.view(B, H, Hq // H, P) * vbar[:, :, None, None]
            scores[..., :P] = per_q.amax(2) if self.gqa_reduction == "max" else per_q.mean(2)
        return protect(scores, last=W)

    def allocate(self, state: PrefillState, scores: list[torch.Tensor]) -> list[list[int]]:
        L, H, N = state.num_layers, state.num_kv_heads, state.n_tokens
        W = self.window(state.layers[0])
        P = N - W
        prefix = [s.float().mean(0)[:, :P] for s in scores]  # one allocation for the batch
        if self.plan is not None or not self.dynamic_layers:
            totals = [sum(row) for row in self.layer_counts(state)]
        else:
            K = keep_count(N, self.compression_ratio)
            w = min(W, K)
            entropy = [layer_entropy(p) for p in prefix]
            totals = [H * w + t for t in proportional_totals(entropy, L * H * (K - w), H * P)]
        return [head_counts(p, t, W, self.alpha) for p, t in zip(prefix, totals)]

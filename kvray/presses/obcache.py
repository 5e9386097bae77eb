"""OBCache: Optimal-Brain-Damage saliencies of keys, values or key-value pairs, scored from the
observation window, hosted by SnapKV (uniform heads) or AdaKV (head-adaptive budgets)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import head_adaptive_counts
from .base import LayerInputs, PrefillState, Press, protect
from .scoring import check_window_params, pool

VARIANTS = ("value", "key", "joint")
HOSTS = ("snapkv", "adakv")


def window_terms(layer: LayerInputs, window_size: int):
    """What the saliencies need for the last `window_size` captured query rows, per query head.

    Returns, grouped by KV head (query head h * G + g):
      attn   A = softmax(Z) [B, H, G, W, N] (fp32, a row sees keys at or before its position),
      logits Z = Q K^T / sqrt(d) [B, H, G, W, N], 0 where masked (A is 0 there too),
      out    O = A V [B, H, G, W, d], the per-head attention output (before o_proj) of the same rows.
    """
    if layer.queries is None:
        raise ValueError("obcache needs the window queries, but the prefill captured none")
    q = layer.queries[:, :, -window_size:].float()
    qpos = layer.query_positions[-window_size:].to(q.device)
    B, Hq, W, d = q.shape
    H, N = layer.keys.shape[1], layer.keys.shape[2]
    G = Hq // H
    keys, values = layer.keys.float(), layer.values.float()
    logits = torch.matmul(q.reshape(B, H, G * W, d), keys.transpose(-1, -2)) / d**0.5
    logits = logits.view(B, H, G, W, N)
    future = torch.arange(N, device=q.device)[None, :] > qpos[:, None]  # [W, N]
    attn = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
    logits = logits.masked_fill(future, 0.0)  # never -inf * 0 = nan in the products below
    out = torch.matmul(attn.view(B, H, G * W, N), values).view(B, H, G, W, d)
    return attn, logits, out


def saliency(attn: torch.Tensor, logits: torch.Tensor, out: torch.Tensor, values: torch.Tensor,
             variant: str) -> torch.Tensor:
    """OBCache saliencies [B, H, G, N] per query head, summed over the window rows i:

      value: S_V[p] = sum_i A_ip^2 ||v_p||^2
      key:   S_K[p] = sum_i (A_ip Z_ip)^2 ||v_p - o_i||^2
      joint: S_V + S_K + 2 sum_i A_ip^2 Z_ip (||v_p||^2 - v_p . o_i)

    (the squared norm of the first-order change of o_i when v_p is zeroed, k_p is zeroed, or both).
    """
    v = values.float()
    v_sq = v.pow(2).sum(-1)[:, :, None, None, :]                       # [B, H, 1, 1, N]
    a_sq = attn.pow(2)
    if variant == "value":
        return a_sq.sum(3) * v_sq[:, :, :, 0]
    B, H, G, W, d = out.shape
    vo = torch.matmul(out.reshape(B, H, G * W, d), v.transpose(-1, -2)).view(B, H, G, W, -1)  # v_p . o_i
    o_sq = out.pow(2).sum(-1)[..., None]                                 # [B, H, G, W, 1]
    dist = (v_sq + o_sq - 2.0 * vo).clamp_min(0.0)                       # ||v_p - o_i||^2
    s_key = (a_sq * logits.pow(2) * dist).sum(3)
    if variant == "key":
        return s_key
    cross = 2.0 * (a_sq * logits * (v_sq - vo)).sum(3)
    return a_sq.sum(3) * v_sq[:, :, :, 0] + s_key + cross


@dataclass(frozen=True)
class OBCachePress(Press):
    """OBCache (Gu, Liang, Zhao, Diao, "Optimal Brain KV Cache Pruning for Efficient
    Long-Context LLM Inference", arXiv 2510.07651).

    Eviction as layer-wise Optimal-Brain-Damage pruning: a token's score is the second-order
    estimate of how much the attention outputs of the observation window change when its value
    (`variant="value"`), its key (`"key"`) or both (`"joint"`) are pruned; see `saliency`.
    A, Z (scaled, pre-softmax) and O (per-head output, before o_proj) are recomputed in fp32
    for the SAME last `window_size` query rows. GQA: the G per-query-head saliencies of a KV
    head are SUMMED (the Frobenius objective is additive over the heads sharing a KV head).

    The prefix (all but the window) is pooled along tokens (`pooling`, `kernel_size`, the
    window excluded from the pooling) and the last `window_size` tokens are always kept
    (`protect`, max + 1), as the reference's "recent" tokens.

    host: "snapkv" keeps the same count in every KV head (plain selection); "adakv" compares the
    saliencies across the KV heads of a layer and gives head h `alpha * B + (1 - alpha) * n_h`
    entries (n_h = its winners in the layer's global top-H*B, `alpha` the floor), with the
    layer total unchanged: real per-head budgets in the ragged cache.

    Defaults and deviations. The official repo (DreamSoul-AI/OBCache) was not available; the
    formulas are checked against a first-order derivation and the derivative
    MalachiAjayi/kv-cache-pruner, whose scripts use 16 recent tokens, which are also its
    perturbation window (`window_size=16`), max-pooling with kernel 7 for the SnapKV host, and
    a joint score by default (`variant="joint"`; the paper reports joint ~ key > value).
    Unlike that code: scores are computed once after the prefill (no accumulation over decoding
    steps), one cache per KV head (it `repeat_kv`s and caches Hq heads), avg-pooling ignores
    the zero padding, and ||v - o||^2 is clamped at 0 against rounding. The paper's AdaKV host
    runs in kvpress, which masks evicted entries; here they are really dropped.
    """

    window_size: int = 16
    kernel_size: int = 7
    pooling: str = "max"
    variant: str = "joint"
    host: str = "snapkv"
    alpha: float = 0.2
    name = "obcache"
    needs_queries = True

    def __post_init__(self):
        super().__post_init__()
        check_window_params(self.name, window_size=self.window_size, kernel_size=self.kernel_size,
                            pooling=self.pooling)
        if self.variant not in VARIANTS:
            raise ValueError(f"{self.name}: variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.host not in HOSTS:
            raise ValueError(f"{self.name}: host must be one of {HOSTS}, got {self.host!r}")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= float(a) <= 1.0:
            raise ValueError(f"{self.name}: alpha (the adakv head floor) must be a number in [0, 1], got {a!r}")
        object.__setattr__(self, "alpha", float(a))

    def raw_scores(self, layer: LayerInputs) -> torch.Tensor:
        """[B, H, N] saliencies summed over each KV head's query group, before pooling/protection."""
        attn, logits, out = window_terms(layer, self.window_size)
        return saliency(attn, logits, out, layer.values, self.variant).sum(2)

    def score(self, layer: LayerInputs) -> torch.Tensor:
        scores = self.raw_scores(layer)
        W = min(self.window_size, layer.queries.shape[2])
        N = scores.shape[-1]
        if N > W:  # pool the prefix only: the window's own scores do not leak onto its neighbours
            scores = torch.cat([pool(scores[..., : N - W], self.kernel_size, self.pooling), scores[..., N - W:]], -1)
        return protect(scores, last=W)

    def allocate(self, state: PrefillState, scores: list[torch.Tensor]) -> list[list[int]]:
        counts = self.layer_counts(state)
        if self.host == "snapkv":
            return counts
        # one allocation per layer, shared by the batch (kvray evaluates one sample at a time)
        return [head_adaptive_counts(s.float().mean(0), sum(c), self.alpha) for s, c in zip(scores, counts)]

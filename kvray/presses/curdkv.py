"""CurDKV: query-agnostic token scores from CUR-style key/value leverage (row energies)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LayerInputs, Press, protect

LEVERAGES = ("kv_product", "kv_avg", "key", "value")
ESTIMATORS = ("norm", "gaussian", "svd")


def row_leverage(x: torch.Tensor, estimator: str, rank: int, sketch: torch.Tensor | None = None) -> torch.Tensor:
    """Approximate leverage of each row of `x` [..., N, d] -> [..., N] (fp32).

    norm: ||x_i||^2; gaussian: ||x_i G||^2 with the sketch G [d, r]; svd: the exact rank-r
    statistical leverage ||U_{i, :r}||^2 of x = U S V^T, from the eigen-decomposition of the
    d x d Gram matrix (fp64): sum_j (x_i . v_j)^2 / s_j^2 over the top-r non-zero s_j."""
    if estimator == "norm":
        return x.float().pow(2).sum(-1)
    if estimator == "gaussian":
        return (x.float() @ sketch).pow(2).sum(-1)
    if estimator == "svd":
        xd = x.double()
        evals, evecs = torch.linalg.eigh(xd.transpose(-1, -2) @ xd)  # ascending
        evals, evecs = evals.flip(-1)[..., :rank], evecs.flip(-1)[..., :rank]
        # directions with (numerically) zero singular value span nothing: drop them
        eps = torch.finfo(torch.float64).eps
        tol = evals[..., :1].clamp_min(0) * eps * x.shape[-1] * max(x.shape[-2], 1)  # Gram round-off
        inv = torch.where(evals > tol, 1.0 / evals.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        return ((xd @ evecs).pow(2) * inv.unsqueeze(-2)).sum(-1).float()
    raise ValueError(f"unknown leverage estimator {estimator!r}; allowed: {', '.join(ESTIMATORS)}")


def local_normalise(e: torch.Tensor, window: int) -> torch.Tensor:
    """Divide each score of [..., N] by the mean over its window of `window` consecutive tokens
    (windows start at token 0; the last one holds the N mod window leftover tokens, averaged
    over those real tokens only)."""
    N = e.shape[-1]
    pad = (-N) % window
    blocks = torch.nn.functional.pad(e, (0, pad)).unflatten(-1, (-1, window))  # [..., N/w, w]
    sizes = torch.full((blocks.shape[-2],), float(window), device=e.device)
    sizes[-1] = window - pad
    mean = blocks.sum(-1, keepdim=True) / sizes.unsqueeze(-1)
    return (blocks / mean.clamp_min(torch.finfo(e.dtype).tiny)).flatten(-2)[..., :N]


@dataclass(frozen=True)
class CurDKVPress(Press):
    """CurDKV (Sengupta, Chaudhary, Chakraborty, "Value-Guided KV Compression for LLMs via
    Approximated CUR Decomposition", NeurIPS 2025, arXiv 2509.15038).

    Keeps the tokens whose keys AND values carry the most energy, so that the kept rows span the
    dominant subspace of the attention output softmax(QK^T)V. Per KV head, never looking at a
    query (query-agnostic, one cache per KV head, GQA-independent):
      1. leverage of each key row and value row (`estimator`, see below);
      2. local normalisation: divide by the mean over the token's window of
         `local_window_size` tokens (0 = off, raw leverage);
      3. combine (`leverage`): kv_product (default) k*v, kv_avg (k+v)/2, key, value;
      4. normalise to sum 1 per head (so heads are comparable, e.g. under AdaKV), and protect
         the first `num_sinks` tokens above every score.

    It keeps HIGH-norm / high-leverage entries: the opposite of KNorm, which keeps the keys of
    LOW norm.

    estimator: "norm" (default, the reference code's `use_random_leverage=False`): squared row
        norms; "gaussian" (the paper's sketch, `use_random_leverage=True`): squared norms of the
        rows times G [d, rank], G ~ N(0, 1/rank), drawn from a torch.Generator seeded with
        (`seed`, layer), one G per layer shared by keys, values and heads; "svd": the exact
        rank-`rank` statistical leverage scores ||U_{i,:rank}||^2 that CUR theory asks for,
        computed over the whole head (O(N d^2)); an ablation, not in the reference code.
    rank: sketch width / SVD rank r (the paper's r = 20).

    Follows NVIDIA/kvpress `CURPress` (same defaults: 4 sinks, kv_product, no sketch, windows
    of 16). Deviations: (a) local normalisation divides by the window MEAN over real tokens
    instead of the zero-padded window SUM: identical ranking on full windows, but the last
    N mod 16 tokens are no longer inflated (kvpress gives a single leftover token 1.0, i.e.
    16x an average token); (b) sinks get `protect` (max + 3, above the window's max + 1.5 to max + 2) instead of 1.0, which could tie;
    (c) the Gaussian sketch is seeded (kvpress draws a new G on every call).

    parity="kvpress": kvpress's CURPress (same defaults): squared norms in the keys' dtype, each
    divided by its zero-padded window's sum, the product normalised to sum 1 per head, the sinks
    set to 1.0, and kvpress's truncated keep count. estimator="norm" only (kvpress's Gaussian
    sketch is drawn unseeded from the global generator, its SVD does not exist).
    """

    num_sinks: int = 4
    leverage: str = "kv_product"
    estimator: str = "norm"
    rank: int = 20
    local_window_size: int = 16
    seed: int = 0
    name = "curdkv"
    needs_queries = False
    kvpress_defaults = {}

    def __post_init__(self):
        super().__post_init__()
        if self.leverage not in LEVERAGES:
            raise ValueError(f"curdkv: leverage must be one of {LEVERAGES}, got {self.leverage!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"curdkv: estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        for field_name, low in (("num_sinks", 0), ("rank", 1), ("local_window_size", 0)):
            v = getattr(self, field_name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"curdkv: {field_name} must be an integer >= {low}, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"curdkv: seed must be an integer, got {self.seed!r}")
        if self.parity == "kvpress" and self.estimator != "norm":
            raise ValueError(f"curdkv: parity='kvpress' reproduces estimator='norm' only, got {self.estimator!r}")

    def sketch(self, layer_idx: int, head_dim: int, device) -> torch.Tensor:
        """The Gaussian projection G [d, rank] of one layer, N(0, 1/rank), seeded."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + layer_idx)
        return (torch.randn(head_dim, self.rank, generator=gen) / self.rank**0.5).to(device)

    def score(self, layer: LayerInputs) -> torch.Tensor:
        if self.parity == "kvpress":
            return self.kvpress_score(layer)
        G = None
        if self.estimator == "gaussian":
            G = self.sketch(layer.layer_idx, layer.keys.shape[-1], layer.keys.device)
        parts = []
        if self.leverage != "value":
            parts.append(row_leverage(layer.keys, self.estimator, self.rank, G))
        if self.leverage != "key":
            parts.append(row_leverage(layer.values, self.estimator, self.rank, G))
        if self.local_window_size:
            parts = [local_normalise(p, self.local_window_size) for p in parts]
        scores = self._combine(parts)
        scores = scores / scores.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
        return protect(scores, first=self.num_sinks)

    def _combine(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The key and value parts by `leverage`: their product, their mean, or the one there is."""
        if self.leverage == "kv_product":
            return parts[0] * parts[1]
        if self.leverage == "kv_avg":
            return (parts[0] + parts[1]) / 2
        return parts[0]

    def kvpress_score(self, layer: LayerInputs) -> torch.Tensor:
        """The scores of kvpress's CURPress (see the class docstring)."""
        w = self.local_window_size
        parts = []
        if self.leverage != "value":
            parts.append((layer.keys ** 2).sum(dim=-1))
        if self.leverage != "key":
            parts.append((layer.values ** 2).sum(dim=-1))
        if w:
            B, H, N = parts[0].shape
            windows = [torch.nn.functional.pad(p, (0, (-N) % w)).reshape(B, H, -1, w) for p in parts]
            parts = [(x / x.sum(dim=-1, keepdim=True)).reshape(B, H, -1)[..., :N] for x in windows]
        scores = self._combine(parts)
        scores = scores / scores.sum(dim=-1, keepdim=True)
        scores[..., :self.num_sinks] = 1.0
        return scores

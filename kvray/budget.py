"""Budgets: `BudgetPlan` (keep fractions per layer and KV head) and the allocators that turn a
target compression ratio, and optionally token scores, into exact integer keep counts.

`compression_ratio` is the fraction of the context's KV entries removed, averaged over layers
and KV heads (kvpress's convention): the kept entries average `N * (1 - ratio)` per head.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch


def keep_count(n_tokens: int, compression_ratio: float) -> int:
    """Entries one head keeps at a uniform ratio (nearest integer)."""
    return int(round(n_tokens * (1.0 - compression_ratio)))


def kvpress_keep_count(n_tokens: int, compression_ratio: float) -> int:
    """Entries one head keeps in kvpress (`compute_n_kept`): `int(N * (1 - ratio))`, truncated
    where `keep_count` rounds, and at least 1."""
    return max(1, int(n_tokens * (1 - compression_ratio)))


def round_preserving_sum(values: list[float], total: int, upper: int | None = None) -> list[int]:
    """Integers close to `values` summing exactly to `total` (largest remainder), each in [0, upper]."""
    if not values:
        return []
    floors = [max(0, math.floor(v)) for v in values]
    if upper is not None:
        floors = [min(f, upper) for f in floors]
    short = total - sum(floors)
    order = sorted(range(len(values)), key=lambda i: (-(values[i] - math.floor(values[i])), i))
    step = 1 if short > 0 else -1
    while short != 0:
        moved = False
        for i in order if step > 0 else reversed(order):
            if short == 0:
                break
            nxt = floors[i] + step
            if nxt < 0 or (upper is not None and nxt > upper):
                continue
            floors[i] = nxt
            short -= step
            moved = True
        if not moved:
            raise ValueError(f"cannot distribute {total} over {len(values)} slots with upper bound {upper}")
    return floors


@dataclass(frozen=True)
class BudgetPlan:
    """Keep fractions `keep[layer][kv_head]` in [0, 1]. A plan is data: hashable, JSON, validated."""

    keep: tuple[tuple[float, ...], ...]
    name: str = "custom"

    def __post_init__(self):
        keep = tuple(tuple(float(f) for f in row) for row in self.keep)
        object.__setattr__(self, "keep", keep)
        if not keep or not keep[0]:
            raise ValueError("BudgetPlan.keep must be a non-empty [layer][kv_head] table of keep fractions")
        width = len(keep[0])
        for i, row in enumerate(keep):
            if len(row) != width:
                raise ValueError(f"BudgetPlan.keep is not rectangular: layer {i} has {len(row)} heads, layer 0 has {width}")
            for f in row:
                if not (0.0 <= f <= 1.0) or math.isnan(f):
                    raise ValueError(f"BudgetPlan keep fractions must lie in [0, 1]; layer {i} has {f}")

    @property
    def num_layers(self) -> int:
        return len(self.keep)

    @property
    def num_heads(self) -> int:
        return len(self.keep[0])

    @property
    def mean_keep(self) -> float:
        return sum(map(sum, self.keep)) / (self.num_layers * self.num_heads)

    @property
    def compression_ratio(self) -> float:
        return 1.0 - self.mean_keep

    @property
    def plan_id(self) -> str:
        blob = json.dumps([[round(f, 6) for f in row] for row in self.keep]).encode()
        return f"{self.name}-{hashlib.sha1(blob).hexdigest()[:10]}"

    @classmethod
    def uniform(cls, num_layers: int, num_heads: int, compression_ratio: float) -> "BudgetPlan":
        keep = 1.0 - compression_ratio
        return cls(tuple((keep,) * num_heads for _ in range(num_layers)), name="uniform")

    @classmethod
    def per_layer(cls, layer_keep: list[float], num_heads: int, name: str = "per_layer") -> "BudgetPlan":
        return cls(tuple((float(f),) * num_heads for f in layer_keep), name=name)

    def check_model(self, num_layers: int, num_heads: int) -> None:
        if (self.num_layers, self.num_heads) != (num_layers, num_heads):
            raise ValueError(
                f"BudgetPlan {self.plan_id} is {self.num_layers} layers x {self.num_heads} KV heads; "
                f"this model has {num_layers} layers x {num_heads} KV heads"
            )

    def counts(self, n_tokens: int) -> list[list[int]]:
        """Integer keep counts per (layer, head); their total equals round(mean_keep * L * H * N)."""
        flat = [f * n_tokens for row in self.keep for f in row]
        total = int(round(sum(flat)))
        ints = round_preserving_sum(flat, total, upper=n_tokens)
        H = self.num_heads
        return [ints[i * H:(i + 1) * H] for i in range(self.num_layers)]

    def to_dict(self) -> dict:
        return {"name": self.name, "keep": [list(row) for row in self.keep]}

    @classmethod
    def from_dict(cls, data: dict) -> "BudgetPlan":
        if "keep" not in data:
            raise ValueError("a BudgetPlan needs a 'keep' table [layer][kv_head]")
        return cls(tuple(tuple(row) for row in data["keep"]), name=data.get("name", "custom"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "BudgetPlan":
        return cls.from_dict(json.loads(text))


# ----------------------------------------------------------------------------- allocators


def uniform_counts(num_layers: int, num_heads: int, n_tokens: int, compression_ratio: float) -> list[list[int]]:
    k = keep_count(n_tokens, compression_ratio)
    return [[k] * num_heads for _ in range(num_layers)]


def pyramid_layer_counts(num_layers: int, n_tokens: int, compression_ratio: float, beta: float = 20.0) -> list[int]:
    """PyramidKV: per-layer budgets decreasing linearly with depth, mean = the uniform budget.

    As kvpress/KVCache-Factory: min = mean / beta, max = 2 * mean - min; when max exceeds N it
    is clipped and min re-derived so the mean is kept. Rounded with an exact total."""
    mean = n_tokens * (1.0 - compression_ratio)
    lo = mean / beta
    hi = 2 * mean - lo
    if hi > n_tokens:
        hi, lo = n_tokens, 2 * mean - n_tokens
    if num_layers == 1:
        values = [mean]
    else:
        values = [hi - i * (hi - lo) / (num_layers - 1) for i in range(num_layers)]
    return round_preserving_sum(values, keep_count(n_tokens, compression_ratio) * num_layers, upper=n_tokens)


def kvpress_pyramid_counts(num_layers: int, n_tokens: int, compression_ratio: float, window_size: int,
                           beta: float) -> list[int]:
    """kvpress's `PyramidKVPress.get_layer_budget` per layer (window included in each count): the
    capacity `C = W + N * (1 - ratio)` of KVCache-Factory, min = (C - W) / beta, max = 2 (C - W) - min,
    max clipped to N - W (min re-derived), each layer rounded on its own (Python's round: no exact
    total); when not N >= max >= min >= W, every layer keeps `round(N * (1 - ratio))` (at least 1)."""
    capacity = window_size + n_tokens * (1 - compression_ratio)
    lo = (capacity - window_size) / beta
    hi = (capacity - window_size) * 2 - lo
    if hi >= n_tokens - window_size:
        hi = n_tokens - window_size
        lo = (capacity - window_size) * 2 - hi
    if not n_tokens >= hi >= lo >= window_size:
        return [max(1, round(n_tokens * (1 - compression_ratio)))] * num_layers
    steps = (hi - lo) / (num_layers - 1) if num_layers > 1 else 0.0
    return [round(hi - i * steps) for i in range(num_layers)]


def kvpress_adakv_counts(scores: torch.Tensor, n_kept: int, alpha: float) -> list[int]:
    """kvpress's `AdaKVPress` allocation inside one layer, `scores` [H, N]: each head's top
    `max(1, int(n_kept * alpha))` are lifted to the dtype's max (its safeguard), then the
    `H * (N - n_kept)` lowest (token, head) pairs of the layer are evicted; returns what each head
    keeps (the heads' top scores)."""
    H, N = scores.shape
    n_safe = int(n_kept * alpha)
    if alpha > 0:
        n_safe = max(1, n_safe) if n_kept > 0 else 0
    lifted = scores.clone().scatter_(-1, scores.topk(n_safe, dim=-1).indices, torch.finfo(scores.dtype).max)
    evicted = torch.topk(-lifted.reshape(-1), H * (N - n_kept)).indices // N
    return [N - c for c in torch.bincount(evicted, minlength=H).tolist()]


def head_adaptive_counts(scores: torch.Tensor, layer_total: int, alpha: float = 0.2) -> list[int]:
    """AdaKV allocation inside one layer: `scores` [H, N] (comparable across heads).

    Take the global top-`layer_total` (token, head) pairs, count winners per head n_h, give each
    head `alpha * B + (1 - alpha) * n_h` with B = layer_total / H (a floor of alpha * B), rounded
    so the heads' counts sum exactly to `layer_total`."""
    H, N = scores.shape
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the head floor) must lie in [0, 1], got {alpha}")
    if layer_total > H * N or layer_total < 0:
        raise ValueError(f"layer budget {layer_total} outside [0, {H * N}]")
    winners = torch.topk(scores.reshape(-1).float(), layer_total).indices // N
    n_h = torch.bincount(winners, minlength=H).tolist()
    base = layer_total / H
    return round_preserving_sum([alpha * base + (1 - alpha) * c for c in n_h], layer_total, upper=N)


def fit_mean(values: list[float], mean: float, lo: float = 0.0, hi: float = 1.0, iters: int = 100) -> list[float]:
    """Shift `values` by one constant t so that clip(values + t, lo, hi) averages exactly `mean`
    (water-filling: entries that hit a bound give their excess to the others, the shape of the
    rest is kept). `mean` must lie in [lo, hi]."""
    if not lo <= mean <= hi:
        raise ValueError(f"mean keep {mean} outside [{lo}, {hi}]")
    n = len(values)
    a, b = lo - max(values), hi - min(values)

    def avg(t: float) -> float:
        return sum(min(hi, max(lo, v + t)) for v in values) / n

    for _ in range(iters):  # avg is monotone in t
        m = (a + b) / 2
        if avg(m) < mean:
            a = m
        else:
            b = m
    t = (a + b) / 2
    return [min(hi, max(lo, v + t)) for v in values]


def layer_curve_keep(num_layers: int, compression_ratio: float, slope: float = 0.0) -> list[float]:
    """Per-layer keep fractions on a line across depth averaging `1 - compression_ratio`:
    `slope` > 0 gives early layers more (PyramidKV-like), < 0 late layers more, 0 is uniform.
    keep_l = mean * (1 + slope * (1 - 2 l / (L - 1))), then clipped to [0, 1] with the mean kept."""
    if not -1.0 <= slope <= 1.0:
        raise ValueError(f"layer slope must lie in [-1, 1], got {slope}")
    mean = 1.0 - compression_ratio
    if num_layers == 1 or slope == 0:
        return [mean] * num_layers
    raw = [mean * (1 + slope * (1 - 2 * i / (num_layers - 1))) for i in range(num_layers)]
    return fit_mean(raw, mean)


def rescale_plan(plan: BudgetPlan, compression_ratio: float) -> BudgetPlan:
    """The same plan shape at another mean compression ratio (water-filling shift)."""
    flat = [f for row in plan.keep for f in row]
    new = fit_mean(flat, 1.0 - compression_ratio)
    H = plan.num_heads
    return BudgetPlan(tuple(tuple(new[i * H:(i + 1) * H]) for i in range(plan.num_layers)), name=plan.name)

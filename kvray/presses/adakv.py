"""AdaKV: head-adaptive budgets around any scoring method, with real per-head memory."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..budget import head_adaptive_counts, kvpress_adakv_counts, kvpress_keep_count
from .base import LayerInputs, PrefillState, Press


@dataclass(frozen=True)
class AdaKVPress(Press):
    """AdaKV (Feng et al. 2024, arXiv 2407.11550), the allocation of FFY0/AdaKV.

    Inside each layer, the scorer's per-head scores are compared across KV heads: the global
    top-B*H (token, head) pairs give each head a winner count n_h, and head h keeps
    `alpha * B + (1 - alpha) * n_h` entries (`alpha` = the floor, 0.2 as suggested for GQA).
    Layer budgets come from the scorer (uniform, or a pyramid for `scorer="pyramidkv"`) or a
    static plan. Unlike kvpress, which masks evicted keys and saves nothing, evicted entries are
    really dropped (ragged per-head cache).

    scorer: name of the scoring method; scorer_params: its parameters (pass them to
    `make_press("adakv", ...)` directly, e.g. `window_size=32`). alpha=0.2: AdaKV's floor for GQA
    and kvpress's `alpha_safeguard`.

    parity="kvpress": kvpress's AdaKVPress around the scorer's kvpress parity (make_press gives
    the scorer kvpress's defaults): each head's top `max(1, int(n * alpha))` are safe, the rest of
    the layer's `H * n` entries (n = kvpress's truncated keep count, whatever the scorer's own
    budgets, e.g. pyramidkv's) go to the best (token, head) pairs (`kvpress_adakv_counts`), not
    `alpha * B + (1 - alpha) * n_h`. Batch rows share one allocation, as here without parity.
    """

    scorer: str = "snapkv"
    alpha: float = 0.2
    scorer_params: tuple = ()
    inner: Press | None = field(default=None, init=False, repr=False, compare=False)
    name = "adakv"
    kvpress_defaults = {}

    def __post_init__(self):
        super().__post_init__()
        from . import make_press  # registry lives in the package

        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"adakv: alpha (head floor) must lie in [0, 1], got {self.alpha}")
        if self.scorer in ("adakv", "full", "morphkv", "laq"):
            raise ValueError(f"adakv: scorer must be a prefill scoring method (not adakv, full, or morphkv/laq, "
                             f"which act during decoding or need the model), got {self.scorer!r}")
        params = dict(self.scorer_params)
        object.__setattr__(self, "scorer_params", tuple(sorted(params.items())))
        if self.parity is not None:
            params["parity"] = self.parity
        object.__setattr__(self, "inner", make_press(self.scorer, compression_ratio=self.compression_ratio, **params))

    @property
    def needs_queries(self) -> bool:  # type: ignore[override]
        return self.inner.needs_queries

    @property
    def needs_hidden(self) -> bool:
        return getattr(self.inner, "needs_hidden", False)

    def params(self) -> dict:
        parity = {"parity": self.parity} if self.parity is not None else {}
        return {"scorer": self.scorer, "alpha": self.alpha, **dict(self.scorer_params), **parity}

    def score(self, layer: LayerInputs) -> torch.Tensor:
        return self.inner.score(layer)

    def layer_counts(self, state: PrefillState) -> list[list[int]]:
        return super().layer_counts(state) if self.plan is not None else self.inner.layer_counts(state)

    def allocate(self, state: PrefillState, scores: list[torch.Tensor]) -> list[list[int]]:
        if self.parity == "kvpress":
            n_kept = kvpress_keep_count(state.n_tokens, self.compression_ratio)
            return [kvpress_adakv_counts(s.mean(0), n_kept, self.alpha) for s in scores]
        counts = []
        for s, layer_counts in zip(scores, self.layer_counts(state)):
            # one allocation per layer, shared by the batch (kvray evaluates one sample at a time)
            counts.append(head_adaptive_counts(s.float().mean(0), sum(layer_counts), self.alpha))
        return counts

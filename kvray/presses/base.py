"""The `Press` base class: score tokens, allocate budgets, select and pack kept entries.

Shapes used throughout (B batch, H KV heads, Hq query heads, N tokens in the compressed
region, W window queries, d head dim):

- `LayerInputs.keys`, `.values`: [B, H, N, d], keys post-RoPE (as cached);
- `LayerInputs.queries`: [B, Hq, W, d] post-RoPE, the last W queries of the compressed region,
  at original positions `query_positions` [W];
- `LayerInputs.hidden`: [B, N, D] the attention module's input (hidden states after the input
  layernorm) over the compressed region; only captured for presses with `needs_hidden`;
- `Press.score(layer) -> [B, H, N]`: higher = keep. Protected tokens (sinks, window) get a score
  above every real one (`protect`), never a tie with the maximum.

Budgets are arguments: `allocate` returns integer keep counts per (layer, KV head) from the
target ratio, an optional static `BudgetPlan` and the scores; nothing is mutated between layers.

`parity="kvpress"` (presses with `kvpress_defaults`) reproduces NVIDIA kvpress 0.5.5's choices
instead of kvray's: its scores op for op, its keep counts (`kvpress_keep_count`, truncated) and its
selection (one `topk` over [B, H, N]), checked against kvpress's kept indices in
tests/test_kvpress_parity.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..budget import BudgetPlan, kvpress_keep_count, uniform_counts
from ..cache import KVRayCache, KVRayLayer, RaggedKV
from ..runtime.prefill import LayerInputs, PrefillState


def protect(scores: torch.Tensor, first: int = 0, last: int = 0) -> torch.Tensor:
    """Lift the first `first` and last `last` tokens above every score (max + 1, plus a small
    ramp so that, when the budget cannot hold all of them, the most recent ones win)."""
    N = scores.shape[-1]
    first, last = min(first, N), min(last, N)
    if first == 0 and last == 0:
        return scores
    scores = scores.clone()
    # above every score of the layer (all heads), so head-adaptive allocation sees them first too
    top = scores.amax(dim=tuple(range(1, scores.dim())), keepdim=True) + 1.0
    if last:
        ramp = torch.linspace(0.5, 1.0, last, device=scores.device, dtype=scores.dtype)
        scores[..., N - last:] = top + ramp
    if first:
        scores[..., :first] = top + 2.0  # sinks outrank the window
    return scores


def select_indices(scores: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """Per (b, h): the positions of the top-`counts[h]` scores, in ascending position order."""
    B, H, N = scores.shape
    out = []
    for b in range(B):
        for h in range(H):
            k = counts[h]
            if k >= N:
                out.append(torch.arange(N, device=scores.device))
            else:
                out.append(torch.topk(scores[b, h], k, sorted=False).indices.sort().values)
    return out


def kvpress_select_indices(scores: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """`select_indices` as kvpress picks: one `scores.topk(k, dim=-1)` over [B, H, N] when every
    head keeps k (its ScorerPress), per head otherwise (what AdaKV's global cut leaves per head)."""
    B, H, N = scores.shape
    if len(set(counts)) == 1 and counts[0] < N:
        kept = scores.topk(counts[0], dim=-1).indices.sort(dim=-1).values
        return [kept[b, h] for b in range(B) for h in range(H)]
    return [torch.arange(N, device=scores.device) if counts[h] >= N else
            scores[b, h].topk(counts[h]).indices.sort().values for b in range(B) for h in range(H)]


@dataclass(frozen=True)
class Press:
    """Base of every compression method; subclasses are frozen dataclasses registered by name.

    compression_ratio: fraction of context KV entries removed, in [0, 1) (0 keeps everything).
    plan: optional static `BudgetPlan` (per layer / KV head keep fractions); when given it sets
        the budgets and `compression_ratio` must be left at 0 or equal the plan's ratio.
    parity: None (kvray's own choices) or "kvpress": reproduce kvpress 0.5.5's computation for
        the press's parameters (see the module docstring); `make_press(name, parity="kvpress")`
        also starts from kvpress's defaults (`kvpress_defaults`). Takes no plan.
    """

    compression_ratio: float = 0.0
    plan: BudgetPlan | None = field(default=None, compare=True)
    parity: str | None = None

    name: ClassVar[str] = ""
    #: uses the queries of the last window (its result depends on the protocol)
    needs_queries: ClassVar[bool] = False
    #: compresses with the model at hand (extra forward passes, e.g. LAQ's pseudo decoding):
    #: the runner calls `compress_prefill(lm, pre, query_aware)` instead of `compress(state)`
    needs_model: ClassVar[bool] = False
    #: reads `LayerInputs.hidden` (prefill must be run with capture_hidden=True)
    needs_hidden: ClassVar[bool] = False
    #: changes the cache while decoding: the decoder calls `after_step(cache, step)` after every
    #: forward and decodes it in a lane of its own
    evicts_during_decoding: ClassVar[bool] = False
    #: the parameters that differ in kvpress's defaults, applied by make_press(name, parity="kvpress");
    #: None: the method has no kvpress counterpart
    kvpress_defaults: ClassVar[dict | None] = None

    def __post_init__(self):
        r = self.compression_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) < 1.0:
            raise ValueError(f"{self.name}: compression_ratio must be a number in [0, 1), got {r!r}")
        object.__setattr__(self, "compression_ratio", float(r))
        if self.plan is not None:
            if not isinstance(self.plan, BudgetPlan):
                raise TypeError(f"{self.name}: plan must be a kvray.BudgetPlan, got {type(self.plan).__name__}")
            if r and abs(r - self.plan.compression_ratio) > 1e-6:
                raise ValueError(
                    f"{self.name}: compression_ratio={r} disagrees with the plan's ratio "
                    f"{self.plan.compression_ratio:.4f}; pass one or the other"
                )
        if self.parity is not None:
            if self.parity != "kvpress":
                raise ValueError(f"{self.name}: parity must be None or 'kvpress', got {self.parity!r}")
            if self.kvpress_defaults is None:
                from . import list_methods, press_class  # the registry lives in the package
                have = [m for m in list_methods() if press_class(m).kvpress_defaults is not None]
                raise ValueError(f"{self.name} has no kvpress counterpart; parity='kvpress' exists for: "
                                 f"{', '.join(have)}")
            if self.plan is not None:
                raise ValueError(f"{self.name}: parity='kvpress' takes no plan (kvpress has no per-layer/head plans)")

    # -- what subclasses override -------------------------------------------------------------

    def score(self, layer: LayerInputs) -> torch.Tensor:
        """[B, H, N] token scores, higher = keep."""
        raise NotImplementedError(f"{type(self).__name__} does not score tokens")

    def layer_counts(self, state: PrefillState) -> list[list[int]]:
        """Keep counts per (layer, head) before any score-driven allocation."""
        if self.plan is not None:
            self.plan.check_model(state.num_layers, state.num_kv_heads)
            return self.plan.counts(state.n_tokens)
        if self.parity == "kvpress":
            k = kvpress_keep_count(state.n_tokens, self.compression_ratio)
            return [[k] * state.num_kv_heads for _ in range(state.num_layers)]
        return uniform_counts(state.num_layers, state.num_kv_heads, state.n_tokens, self.compression_ratio)

    def allocate(self, state: PrefillState, scores: list[torch.Tensor]) -> list[list[int]]:
        """Final keep counts per (layer, head); scorers with dynamic budgets override this."""
        return self.layer_counts(state)

    # -- shared machinery -------------------------------------------------------------------------

    @property
    def target_ratio(self) -> float:
        return self.plan.compression_ratio if self.plan is not None else self.compression_ratio

    @property
    def plan_id(self) -> str:
        return self.plan.plan_id if self.plan is not None else "uniform"

    def params(self) -> dict:
        """Method parameters (JSON-able), without the budget; `parity` only when set."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("compression_ratio", "plan") or not f.init or (f.name == "parity" and self.parity is None):
                continue
            out[f.name] = getattr(self, f.name)
        return out

    def params_json(self) -> str:
        return json.dumps(self.params(), sort_keys=True, default=str)

    def select(self, state: PrefillState) -> list[list[torch.Tensor]]:
        """Kept positions per layer, per (b, h)."""
        if self.target_ratio == 0.0 and self.plan is None:
            full = torch.arange(state.n_tokens, device=state.layers[0].keys.device)
            return [[full] * (state.batch * state.num_kv_heads) for _ in state.layers]
        scores = [self.score(layer) for layer in state.layers]
        counts = self.allocate(state, scores)
        pick = kvpress_select_indices if self.parity == "kvpress" else select_indices
        return [pick(s, c) for s, c in zip(scores, counts)]

    def after_step(self, cache: KVRayCache, step: int) -> None:
        """Decode-time hook of presses with `evicts_during_decoding` (nothing otherwise)."""

    def lane_key(self) -> tuple | None:
        """Presses that evict while decoding: the rows of one prompt and protocol whose presses
        give the same key may decode in one lane, their caches joined by `merge_lane`; None:
        each in a lane of its own."""
        return None

    @staticmethod
    def merge_lane(caches: list[KVRayCache]) -> KVRayCache:
        """One cache of the rows of `caches` (presses with the same `lane_key`)."""
        raise NotImplementedError("this press decodes in a lane of its own")

    def together_key(self) -> tuple | None:
        """Presses of one prompt and protocol whose keys are equal (not None) compress in one
        `compress_together` call (e.g. LAQ's lookaheads decoded as the rows of one lane); None:
        each compresses alone."""
        return None

    @classmethod
    def compress_together(cls, lm, pre, query_aware: bool, presses: list["Press"]) -> list[KVRayCache]:
        """`compress_prefill` of each of `presses` (one `together_key`): the same caches, made
        together where that is cheaper."""
        return [p.compress_prefill(lm, pre, query_aware) for p in presses]

    def compress_prefill(self, lm, pre, query_aware: bool) -> KVRayCache:
        """Compress the prefill `pre` (a `kvray.runtime.Prefill`) for one protocol with the model
        `lm` at hand; presses with `needs_model` override this, the rest use `compress`."""
        return self.compress(pre.state(query_aware))

    def compress(self, state: PrefillState) -> KVRayCache:
        """A new cache holding only the kept entries; `state` is left untouched."""
        indices = self.select(state)
        layers = []
        for layer, idx in zip(state.layers, indices):
            prefix = RaggedKV.gather(layer.keys, layer.values, idx)
            layers.append(KVRayLayer(prefix=prefix, prefix_tokens=state.n_tokens))
        return state.assemble(layers)

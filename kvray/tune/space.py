"""Search spaces for budget allocation (no Ray here): a handful of parameters that expand
deterministically into a press with a per-layer x per-KV-head budget at a fixed mean ratio.

- `layer_slope` in [-1, 1]: keep fractions on a line across depth (`budget.layer_curve_keep`;
  0 = uniform, > 0 = more to early layers as PyramidKV), mean held at the target;
- `head_alpha` in [0, 1]: the AdaKV head floor inside each layer (1 = every head the same
  budget; lower = budgets follow the scorer's cross-head comparison, real per-head memory);
- the method's own hyperparameters where they matter: SnapKV's window, pooling kernel and
  pooling; Compactor's scoring (kvpress's or the paper's), blending (the ratio or lambda 0.3)
  and its head-adaptive budgets.

`baseline()` is the uniform allocation with the method's defaults: always a candidate.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from ..budget import BudgetPlan, layer_curve_keep
from ..presses import Press, list_methods, make_press, method_params, press_class

ALLOCATION_CHOICES: dict[str, tuple] = {
    "layer_slope": (-0.5, 0.0, 0.5, 1.0),
    "head_alpha": (0.2, 0.5, 1.0),
}
METHOD_CHOICES: dict[str, dict[str, tuple]] = {
    "snapkv": {"window_size": (16, 32, 64), "kernel_size": (1, 3, 7), "pooling": ("max", "avg")},
    # scoring: kvpress's (value-norm weighting, avg-pool 3, z-score over the layer) or the paper's;
    # blending: None = the compression ratio (kvpress) or the paper's lambda 0.3; head_adaptive:
    # the layer's budget split across its KV heads by score (compactor's own; AdaKV does not wrap it)
    "compactor": {"scoring": ("kvpress", "paper"), "blending": (None, 0.3), "head_adaptive": (False, True)},
}
#: per method, allocation choices that do not apply (compactor splits heads itself)
FIXED: dict[str, dict[str, tuple]] = {"compactor": {"head_alpha": (1.0,)}}
SEARCHABLE = ("knorm", "random", "streaming_llm", "snapkv", "compactor")  # layer budgets come from the plan


@dataclass(frozen=True)
class SearchSpace:
    method: str
    compression_ratio: float
    choices: dict = field(default_factory=dict)  # parameter -> allowed values

    @classmethod
    def default(cls, method: str, compression_ratio: float, **overrides) -> "SearchSpace":
        """ALLOCATION_CHOICES + METHOD_CHOICES[method]; `overrides` replace choices by name."""
        if method not in list_methods():
            raise ValueError(f"unknown method {method!r}; known: {', '.join(list_methods())}")
        if method not in SEARCHABLE:
            raise ValueError(f"budget search supports {', '.join(SEARCHABLE)} (scorers whose layer budgets a plan "
                             f"sets); got {method!r}")
        if not 0.0 < compression_ratio < 1.0:
            raise ValueError(f"compression_ratio must lie in (0, 1) for a budget search, got {compression_ratio}")
        choices = {**ALLOCATION_CHOICES, **METHOD_CHOICES.get(method, {}), **FIXED.get(method, {})}
        known = (set(choices) | set(method_params(method))) - {"compression_ratio", "plan"}
        for name, values in overrides.items():
            if name not in known:
                raise ValueError(f"{name!r} is not a search parameter of {method}; known: {', '.join(sorted(known))}")
            values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
            if not values:
                raise ValueError(f"search parameter {name!r} needs at least one value")
            if name not in ALLOCATION_CHOICES:
                for value in values:  # a bad value fails here, not in a trial halfway through a search
                    make_press(method, compression_ratio=compression_ratio, **{name: value})
            choices[name] = values
        for name, values in FIXED.get(method, {}).items():
            if tuple(choices[name]) != values:
                raise ValueError(f"{name} is fixed at {values} for {method} (it allocates its heads itself); "
                                 f"got {tuple(choices[name])}")
        space = cls(method, float(compression_ratio), choices)
        # the uniform baseline (method defaults) is always a point of the space
        for name, value in space.baseline().items():
            if not any(_same(value, v) for v in choices[name]):
                choices[name] = (*choices[name], value)
        return space

    def baseline(self) -> dict:
        """The uniform allocation with the method's default hyperparameters."""
        defaults = {f.name: f.default for f in dataclasses.fields(press_class(self.method)) if f.init}
        base = {"layer_slope": 0.0, "head_alpha": 1.0}
        for name in self.choices:
            if name not in base:
                base[name] = defaults[name]
        return base

    def grid(self) -> list[dict]:
        names = sorted(self.choices)
        return [dict(zip(names, values)) for values in itertools.product(*(self.choices[n] for n in names))]

    def plan(self, config: dict, num_layers: int, num_kv_heads: int) -> BudgetPlan:
        keep = layer_curve_keep(num_layers, self.compression_ratio, float(config.get("layer_slope", 0.0)))
        return BudgetPlan.per_layer(keep, num_kv_heads, name=f"slope{float(config.get('layer_slope', 0.0)):+g}")

    def method_config(self, config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in ALLOCATION_CHOICES}

    def press(self, config: dict, num_layers: int, num_kv_heads: int) -> Press:
        alpha = float(config.get("head_alpha", 1.0))
        params = self.method_config(config)
        if alpha >= 1.0 and float(config.get("layer_slope", 0.0)) == 0.0:  # uniform: the method as registered
            return make_press(self.method, compression_ratio=self.compression_ratio, **params)
        plan = self.plan(config, num_layers, num_kv_heads)
        if alpha >= 1.0:
            return make_press(self.method, plan=plan, **params)
        return make_press("adakv", scorer=self.method, alpha=alpha, plan=plan, **params)

    def needs_hidden(self) -> bool:
        return bool(getattr(press_class(self.method), "needs_hidden", False))

    def is_baseline(self, config: dict) -> bool:
        base = self.baseline()
        return all(_same(config.get(k), v) for k, v in base.items())


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) < 1e-12
    return a == b

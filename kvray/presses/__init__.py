"""The method registry: `make_press(name, **params)`, `list_methods()`, `describe_methods()`."""

from __future__ import annotations

import dataclasses
import difflib

from .base import LayerInputs, PrefillState, Press, protect, select_indices

_REGISTRY: dict[str, type[Press]] = {}


def register(cls: type[Press]) -> type[Press]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return list(_REGISTRY)


def press_class(name: str) -> type[Press]:
    if name not in _REGISTRY:
        hint = difflib.get_close_matches(name, _REGISTRY, n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(_REGISTRY)}.{extra}")
    return _REGISTRY[name]


def method_params(name: str) -> list[str]:
    """Parameter names `make_press(name, ...)` accepts (`parity` where kvpress has the method)."""
    cls = press_class(name)
    return [f.name for f in dataclasses.fields(cls)
            if f.init and (f.name != "parity" or cls.kvpress_defaults is not None)]


def make_press(name: str, **params) -> Press:
    """A fresh press of method `name`. Unknown names or parameters raise a ValueError that
    lists what exists. `adakv` also takes its scorer's parameters (e.g. `window_size`).
    `parity="kvpress"` starts from kvpress's defaults (the class's `kvpress_defaults`), which the
    given parameters override."""
    cls = press_class(name)
    if params.get("parity") == "kvpress" and cls.kvpress_defaults is not None:
        params = {**cls.kvpress_defaults, **params}
    allowed = method_params(name)
    unknown = [k for k in params if k not in allowed]
    if name == "adakv" and unknown:
        scorer = params.get("scorer", "snapkv")
        scorer_allowed = [p for p in method_params(scorer) if p not in ("compression_ratio", "plan")]
        inner = {k: params.pop(k) for k in list(unknown) if k in scorer_allowed}
        params["scorer_params"] = tuple(sorted({**dict(params.get("scorer_params", ())), **inner}.items()))
        allowed = allowed + scorer_allowed
        unknown = [k for k in unknown if k not in inner]
    if unknown:
        hints = {k: difflib.get_close_matches(k, allowed, n=1) for k in unknown}
        detail = "; ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise ValueError(f"method {name!r} has no parameter {detail}; its parameters: {', '.join(allowed)}")
    return cls(**params)


def describe_methods() -> list[tuple[str, str]]:
    """(name, first line of the docstring) for every registered method."""
    out = []
    for name, cls in _REGISTRY.items():
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        out.append((name, " ".join(doc.split())))
    return out


from .baselines import FullPress, KnormPress, RandomPress, StreamingLLMPress  # noqa: E402
from .snapkv import PyramidKVPress, SnapKVPress  # noqa: E402
from .adakv import AdaKVPress  # noqa: E402
from .curdkv import CurDKVPress  # noqa: E402
from .obcache import OBCachePress  # noqa: E402
from .lava import LAVaPress  # noqa: E402
from .compactor import CompactorPress  # noqa: E402
from .laq import LAQPress  # noqa: E402
from .morphkv import MorphKVPress  # noqa: E402

for _cls in (FullPress, RandomPress, StreamingLLMPress, KnormPress, SnapKVPress, PyramidKVPress, AdaKVPress,
             CompactorPress, CurDKVPress, OBCachePress, LAQPress, LAVaPress, MorphKVPress):
    register(_cls)

__all__ = [
    "Press", "LayerInputs", "PrefillState", "protect", "select_indices", "make_press", "list_methods",
    "describe_methods", "method_params", "press_class", "register",
    "FullPress", "RandomPress", "StreamingLLMPress", "KnormPress", "SnapKVPress", "PyramidKVPress", "AdaKVPress",
    "CompactorPress", "LAQPress", "CurDKVPress", "OBCachePress", "LAVaPress", "MorphKVPress",
]

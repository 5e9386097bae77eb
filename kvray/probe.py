"""A measured calibrator: probe how much of *this* context survives compression, on its one
prefill, and pick the largest ratio the probe says is safe.

The NLL-curve calibrator (`kvray.calibration`) predicts a context's compressibility from one
number, the context's own NLL. This one measures it instead, after KVzip's idea (Kim et al.,
"KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", arXiv 2505.23416): a
cache that still holds a context can reproduce it. Per context:

1. From the prefill (which also gives each context token's NLL), choose `spans` short spans of
   the context: `cue` tokens followed by `target` tokens. `select="surprisal"` starts the
   targets at the context's most surprising tokens (needles, numbers, names: what a
   question is likely to ask for, and what eviction loses first), non-overlapping;
   `"uniform"` draws them at random (seeded), as KVzip's reconstruction does; `"mixed"` (the
   default: 12 spans of 6 + 6 tokens, what docs/results.md measured) takes half of each.
2. Compress the context at every ratio of a grid and teacher-force the spans (each after a
   newline) on every compressed cache and on the full one, all ratios as the rows of one
   batched forward: `probe_nll` is the mean NLL of the target tokens, and the probe ratio is
   `probe_nll(full) / probe_nll(compressed)` (1 = the compressed cache reproduces the spans as
   well as the full one).
3. `ProbeCalibrator.predict_ratio`: the largest grid ratio up to which every probe ratio stays at
   or above `theta`. `fit_probe_calibrator` chooses `theta` on calibration contexts: the
   most aggressive value whose share of contexts that keep their quality at the chosen ratio
   (answer NLL ratio >= tau, or the task score within a tolerance of the full cache's) is at
   least the target share.

`NeighbourCalibrator` reads the probe curve (and NLL(c)) as a fingerprint instead: the largest
ratio at which a share q of the k nearest calibration contexts kept their quality;
`fit_neighbour_calibrator` picks k, the features and q leave-one-out on the calibration
contexts. Both store what they need as JSON (`save` / `load`) and pick a press for a new context
with `press_for(lm, context)`.

The answer is never seen by the probe: it is query-agnostic, like the NLL-curve calibrator.

`operating_points` and `compare_heldout` put any calibrator and the best fixed ratio side by
side on held-out contexts, with 95% bootstrap intervals over contexts.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .stats import bootstrap_ci, paired_bootstrap_ci

PROBE_KIND = "kvray.probe_calibrator"
NEIGHBOUR_KIND = "kvray.neighbour_calibrator"
MEASURED_VERSION = 1
SELECTIONS = ("surprisal", "uniform", "mixed")
CRITERIA = ("nll", "score")


@dataclass(frozen=True)
class ProbeSpec:
    """Which spans of the context the probe reproduces (see the module docstring)."""

    spans: int = 12
    cue: int = 6
    target: int = 6
    select: str = "mixed"
    seed: int = 0

    def __post_init__(self):
        for name, lo in (("spans", 1), ("cue", 1), ("target", 1), ("seed", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"ProbeSpec.{name} must be an integer >= {lo}, got {v!r}")
        if self.select not in SELECTIONS:
            raise ValueError(f"ProbeSpec.select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")

    @classmethod
    def from_dict(cls, data: dict | None) -> "ProbeSpec":
        data = dict(data or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown probe field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(names))}")
        return cls(**data)


def choose_spans(token_nll: Sequence[float], start: int, n: int, spec: ProbeSpec) -> list[int]:
    """Target starts c (context positions) of the probe's spans, in context order: each span
    [c - cue, c + target) lies in [start, n) and the spans do not overlap. `token_nll[j]` is the
    NLL of context token start + j. Fewer than `spec.spans` when the context is short."""
    width = spec.cue + spec.target
    lo, hi = start + spec.cue, n - spec.target  # admissible target starts: lo <= c <= hi
    if hi < lo:
        return []
    surprising = sorted(range(lo, hi + 1), key=lambda c: (-float(token_nll[c - start]), c))
    drawn = list(range(lo, hi + 1))
    random.Random(spec.seed).shuffle(drawn)
    quotas = {"surprisal": [(surprising, spec.spans)], "uniform": [(drawn, spec.spans)],
              "mixed": [(surprising, (spec.spans + 1) // 2), (drawn, spec.spans)]}[spec.select]
    chosen: list[int] = []
    for order, quota in quotas:
        for c in order:
            if len(chosen) >= quota:
                break
            if all(abs(c - d) >= width for d in chosen):
                chosen.append(c)
    return sorted(chosen)


def probe_feed(context: Sequence[int], starts: Sequence[int], spec: ProbeSpec, sep: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """(ids, picks, targets): the probe's fed tokens (each span after `sep`), the positions of
    `ids` whose logits predict the target tokens, and those targets."""
    ids: list[int] = []
    picks: list[int] = []
    targets: list[int] = []
    for c in starts:
        ids += list(sep) + list(context[c - spec.cue:c])
        for t in context[c:c + spec.target]:
            picks.append(len(ids) - 1)
            targets.append(int(t))
            ids.append(int(t))
    return ids, picks, targets


# ----------------------------------------------------------------------------- the calibrator


def probe_safe_ratio(curve: dict[float, float], theta: float) -> float:
    """The largest ratio of `curve` (compression ratio -> probe ratio) up to which every probe
    ratio is >= theta (walking up from the smallest ratio); 0 when the smallest fails."""
    safe = 0.0
    for ratio in sorted(curve):
        value = curve[ratio]
        if not (value >= theta):  # NaN fails too
            break
        safe = ratio
    return safe


def from_json_object(cls, data: Any, kind: str, version: int, required: Sequence[str] = ()):
    """`cls(**data)` for a calibrator's JSON object (a dataclass with `kind` and `version` beside
    its fields), checked: an object, the `required` fields present, its kind and version, no
    unknown fields. Shared by every calibrator kind (`kvray.calibration.Calibrator` too)."""
    if not isinstance(data, dict):
        raise ValueError(f"a {kind} must be a JSON object, got {type(data).__name__}")
    for key in ("kind", "version", *required):
        if key not in data:
            raise ValueError(f"{kind} JSON is missing the field {key!r}")
    if data["kind"] != kind:
        raise ValueError(f"{kind} JSON field 'kind' must be {kind!r}, got {data['kind']!r}")
    if data["version"] != version:
        raise ValueError(f"unsupported {kind} version {data['version']!r} (this kvray reads version {version})")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names - {"kind", "version"})
    if unknown:
        raise ValueError(f"{kind} JSON has unknown field(s) {', '.join(map(repr, unknown))}")
    return cls(**{k: v for k, v in data.items() if k in names})


class _Measured:
    """What the measured calibrators share: the probe spec, deploy-time use, and the JSON form
    (a `kind` and `version` plus the dataclass fields; unknown fields are refused)."""

    KIND: ClassVar[str] = ""

    @property
    def spec(self) -> ProbeSpec:
        return ProbeSpec.from_dict(self.probe)

    def _check_common(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"{self.KIND} field 'method' must be a method name, got {self.method!r}")
        ratios = tuple(sorted(float(r) for r in self.ratios))
        if not ratios or not all(0.0 < r < 1.0 for r in ratios):
            raise ValueError(f"{self.KIND} 'ratios' must be compression ratios in (0, 1), got {self.ratios!r}")
        object.__setattr__(self, "ratios", ratios)
        object.__setattr__(self, "probe", asdict(ProbeSpec.from_dict(self.probe)))
        if self.criterion not in CRITERIA:
            raise ValueError(f"{self.KIND} 'criterion' must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")

    def _curve(self, curve: dict[float, float]) -> list[float]:
        """The probe ratios on this calibrator's grid, in its order."""
        out = []
        for r in self.ratios:
            hit = [v for k, v in curve.items() if abs(float(k) - r) < 1e-9]
            if not hit:
                raise ValueError(f"the probe curve lacks the calibrator's ratio {r:g} (it has {sorted(curve)})")
            out.append(float(hit[0]))
        return out

    def predict(self, curve: dict[float, float], context_nll: float) -> float:
        raise NotImplementedError

    def ratio_for(self, lm, context: str, method_params: dict | None = None) -> float:
        """Probe `context` with the model (`kvray.calibration.probe_curve`) and return its ratio."""
        from .calibration import probe_curve

        curve, nll = probe_curve(lm, context, self.method, self.ratios, probe=self.spec, method_params=method_params)
        return self.predict(curve, nll)

    def press_for(self, lm, context: str, **method_params):
        """A press of this calibrator's method at the ratio the probe allows for `context`."""
        from .presses import make_press

        return make_press(self.method, compression_ratio=self.ratio_for(lm, context, method_params), **method_params)

    def to_dict(self) -> dict:
        data = asdict(self)
        return {"kind": self.KIND, "version": MEASURED_VERSION,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}}

    @classmethod
    def from_dict(cls, data: Any):
        return from_json_object(cls, data, cls.KIND, MEASURED_VERSION)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class ProbeCalibrator(_Measured):
    """Compress a context to the largest grid ratio its probe keeps at >= theta."""

    KIND: ClassVar[str] = PROBE_KIND
    method: str
    theta: float
    ratios: tuple[float, ...]
    tau: float = 0.95
    target_share: float = 0.9
    probe: dict = field(default_factory=dict)
    n_contexts: int = 0
    fit_share: float | None = None
    fit_mean_ratio: float | None = None
    criterion: str = "nll"

    def __post_init__(self):
        if not isinstance(self.theta, (int, float)) or isinstance(self.theta, bool) or math.isnan(self.theta):
            raise ValueError(f"probe calibrator field 'theta' must be a number, got {self.theta!r}")
        self._check_common()

    def predict_ratio(self, curve: dict[float, float]) -> float:
        """The compression ratio for a context whose probe measured `curve` (ratio -> probe
        ratio, on `self.ratios`)."""
        return probe_safe_ratio(dict(zip(self.ratios, self._curve(curve))), self.theta)

    def predict(self, curve: dict[float, float], context_nll: float) -> float:
        return self.predict_ratio(curve)


FEATURES = ("probe", "probe+nll")


@dataclass(frozen=True)
class NeighbourCalibrator(_Measured):
    """The probe's curve as a fingerprint of the context: compress to the largest grid ratio at
    which at least a share `q` of its `k` nearest calibration contexts (Euclidean distance of
    standardised features: the probe curve, and NLL(c) with `features="probe+nll"`) kept their
    quality. It stores those contexts' features and outcomes (`points`, `ok`, `ids`)."""

    KIND: ClassVar[str] = NEIGHBOUR_KIND
    method: str
    ratios: tuple[float, ...]
    k: int
    q: float
    features: str
    center: tuple[float, ...]
    scale: tuple[float, ...]
    points: tuple[tuple[float, ...], ...]
    ok: tuple[tuple[bool, ...], ...]
    ids: tuple[str, ...] = ()
    tau: float = 0.95
    tolerance: float = 0.05
    target_share: float = 0.9
    probe: dict = field(default_factory=dict)
    fit_share: float | None = None
    fit_mean_ratio: float | None = None
    criterion: str = "nll"

    def __post_init__(self):
        self._check_common()
        if self.features not in FEATURES:
            raise ValueError(f"neighbour calibrator 'features' must be one of {', '.join(FEATURES)}, got {self.features!r}")
        n_feat = len(self.ratios) + (self.features == "probe+nll")
        points = tuple(tuple(float(x) for x in p) for p in self.points)
        ok = tuple(tuple(bool(x) for x in o) for o in self.ok)
        if not points or any(len(p) != n_feat for p in points) or len(ok) != len(points) or \
                any(len(o) != len(self.ratios) for o in ok):
            raise ValueError(f"neighbour calibrator: every point needs {n_feat} features and an outcome per ratio")
        if len(self.center) != n_feat or len(self.scale) != n_feat or any(float(x) <= 0 for x in self.scale):
            raise ValueError("neighbour calibrator: center and scale need one entry per feature, scale > 0")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"neighbour calibrator 'k' must be an integer >= 1, got {self.k!r}")
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "ok", ok)
        object.__setattr__(self, "center", tuple(float(x) for x in self.center))
        object.__setattr__(self, "scale", tuple(float(x) for x in self.scale))
        object.__setattr__(self, "ids", tuple(str(x) for x in self.ids))

    def vector(self, curve: dict[float, float], context_nll: float) -> np.ndarray:
        v = self._curve(curve) + ([float(context_nll)] if self.features == "probe+nll" else [])
        return (np.asarray(v) - np.asarray(self.center)) / np.asarray(self.scale)

    def predict(self, curve: dict[float, float], context_nll: float, exclude: str | None = None) -> float:
        """The ratio for a context (its probe `curve` and NLL(c)); `exclude`: leave that
        calibration context out of the neighbours (leave-one-out on the calibration split)."""
        z = self.vector(curve, context_nll)
        if not np.all(np.isfinite(z)):
            return 0.0  # a context the probe could not measure: keep everything
        pts = np.asarray(self.points)
        keep = np.asarray([i != exclude for i in self.ids]) if exclude is not None and self.ids else np.ones(len(pts), bool)
        d = ((pts - z) ** 2).sum(axis=1)
        d[~keep] = np.inf
        near = np.argsort(d, kind="stable")[:min(self.k, int(keep.sum()))]
        share = np.asarray(self.ok, dtype=float)[near].mean(axis=0)
        good = [r for r, s in zip(self.ratios, share) if s >= self.q - 1e-12]
        return max(good, default=0.0)


# ----------------------------------------------------------------------------- held-out comparison


def context_table(rows: Iterable[dict], *, criterion: str = "nll", tau: float = 0.95,
                  tolerance: float = 0.05) -> dict[Any, dict]:
    """Per context (sample_id): task, context_nll, `ok` (compression ratio -> whether the context
    keeps its quality there) and `probe` (ratio -> probe ratio, when measured). Quality:
    criterion "nll": the answer's NLL ratio (full / compressed) >= tau (the paper's); "score": the
    greedy answer's task score >= the full cache's - tolerance (`measure_curves(..., score=True)`).
    Ratio 0 (the full cache) always keeps it and is left out of the curves."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    out: dict[Any, dict] = {}
    for row in rows:
        ratio = round(float(row["compression_ratio"]), 6)
        c = out.setdefault(row["sample_id"], {"sample_id": row["sample_id"], "task": row.get("task"),
                                              "context_nll": float(row["context_nll"]), "ok": {}, "probe": {}})
        if ratio <= 0.0:
            continue
        if criterion == "nll":
            c["ok"][ratio] = bool(float(row["nll_ratio"]) >= tau)
        else:
            if "score" not in row or "score_full" not in row:
                raise ValueError("criterion 'score' needs rows measured with measure_curves(..., score=True)")
            c["ok"][ratio] = bool(float(row["score"]) >= float(row["score_full"]) - tolerance - 1e-12)
        if row.get("probe_ratio") is not None and not _isnan(row["probe_ratio"]):
            c["probe"][ratio] = float(row["probe_ratio"])
    return out


def _isnan(x) -> bool:
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def floor_to_grid(ratio: float, grid: Sequence[float]) -> float:
    """The largest grid ratio <= ratio (0 = keep everything when none is)."""
    below = [g for g in grid if g <= ratio + 1e-9]
    return max(below) if below else 0.0


def outcomes(table: dict[Any, dict], choose: Callable[[dict], float]) -> tuple[np.ndarray, np.ndarray]:
    """(ratio, ok) per context for the ratio `choose(context)` picks (a grid ratio, or 0 for the
    full cache, which is always ok)."""
    ratios, ok = [], []
    for c in table.values():
        r = choose(c)
        ratios.append(r)
        ok.append(True if r <= 0.0 else c["ok"][round(r, 6)])
    return np.asarray(ratios, dtype=float), np.asarray(ok, dtype=float)


def best_knob(table: dict[Any, dict], chooser: Callable[[Any], Callable[[dict], float]], knobs: Iterable[Any],
              target_share: float) -> tuple[Any, float, float]:
    """The knob whose chooser has the largest mean ratio among those whose share of ok contexts
    is >= target_share on `table` (ties: the larger share); (knob, share, mean ratio). None when
    no knob reaches the share."""
    best = (None, float("nan"), -1.0)
    for k in knobs:
        r, w = outcomes(table, chooser(k))
        share, mean = float(w.mean()), float(r.mean())
        if share >= target_share - 1e-12 and (mean > best[2] + 1e-12 or (abs(mean - best[2]) <= 1e-12 and share > best[1])):
            best = (k, share, mean)
    return best


def fit_probe_calibrator(rows: Iterable[dict], method: str, *, tau: float = 0.95, target_share: float = 0.9,
                         probe: ProbeSpec | dict | None = None, criterion: str = "nll",
                         tolerance: float = 0.05) -> ProbeCalibrator:
    """Choose theta on calibration rows (`measure_curves(..., probe=...)` output of `method`):
    the most aggressive threshold whose share of contexts that keep their quality (see
    `context_table`) is >= target_share. When none reaches it, theta = 1e9 (never compress)."""
    rows = [r for r in rows if r.get("method", method) == method]
    table = context_table(rows, criterion=criterion, tau=tau, tolerance=tolerance)
    if not table:
        raise ValueError(f"no calibration rows for method {method!r}")
    if any(not c["probe"] for c in table.values()):
        raise ValueError("the rows carry no probe ratios: measure them with measure_curves(..., probe=ProbeSpec())")
    grid = sorted({r for c in table.values() for r in c["probe"]})
    values = sorted({v for c in table.values() for v in c["probe"].values() if math.isfinite(v)})
    knobs = [math.inf] + values[::-1]
    theta, share, mean = best_knob(table, lambda t: (lambda c: probe_safe_ratio(c["probe"], t)), knobs, target_share)
    if theta is None:
        theta, share, mean = math.inf, 1.0, 0.0
    spec = probe if isinstance(probe, ProbeSpec) else ProbeSpec.from_dict(probe)
    return ProbeCalibrator(method=method, theta=float(theta) if math.isfinite(theta) else 1e9, ratios=tuple(grid),
                           tau=tau, target_share=target_share, probe=asdict(spec), n_contexts=len(table),
                           fit_share=share, fit_mean_ratio=mean, criterion=criterion)


def neighbour_chooser(cal: NeighbourCalibrator) -> Callable[[float], Callable[[dict], float]]:
    """knob q -> the ratio chooser of `cal` at share q, for `context_table` entries (a
    calibration context is left out of its own neighbours)."""
    def at(q: float) -> Callable[[dict], float]:
        at_q = replace(cal, q=q)
        return lambda c: at_q.predict(c["probe"], c["context_nll"], exclude=c["sample_id"])
    return at


def fit_neighbour_calibrator(rows: Iterable[dict], method: str, *, tau: float = 0.95, tolerance: float = 0.05,
                             target_share: float = 0.9, criterion: str = "nll", probe: ProbeSpec | dict | None = None,
                             ks: Sequence[int] = (5, 10, 20), features: Sequence[str] = FEATURES) -> NeighbourCalibrator:
    """Fit on calibration rows (`measure_curves(..., probe=..., score=...)` output of `method`):
    for every k in `ks` and feature set, the share q is the most aggressive one whose
    leave-one-out share of calibration contexts that keep their quality is >= target_share;
    the (k, features, q) with the largest leave-one-out mean ratio wins (ties: the smaller k).
    Everything is chosen on the calibration contexts alone. When no q reaches the share, q > 1
    (never compress)."""
    rows = [r for r in rows if r.get("method", method) == method]
    table = context_table(rows, criterion=criterion, tau=tau, tolerance=tolerance)
    if len(table) < 2:
        raise ValueError(f"need at least 2 calibration contexts for method {method!r}, got {len(table)}")
    if any(not c["probe"] for c in table.values()):
        raise ValueError("the rows carry no probe ratios: measure them with measure_curves(..., probe=ProbeSpec())")
    grid = tuple(sorted({r for c in table.values() for r in c["probe"]}))
    contexts = [c for c in table.values() if all(r in c["probe"] and math.isfinite(c["probe"][r]) for r in grid)]
    spec = probe if isinstance(probe, ProbeSpec) else ProbeSpec.from_dict(probe)
    qs = [i / 40 for i in range(41)]
    best = None
    for feats in features:
        raw = np.asarray([[c["probe"][r] for r in grid] + ([c["context_nll"]] if feats == "probe+nll" else [])
                          for c in contexts])
        center, scale = raw.mean(axis=0), raw.std(axis=0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        for k in ks:
            cal = NeighbourCalibrator(
                method=method, ratios=grid, k=int(k), q=1.0, features=feats, center=tuple(center), scale=tuple(scale),
                points=tuple(tuple((x - center) / scale) for x in raw),
                ok=tuple(tuple(c["ok"][r] for r in grid) for c in contexts), ids=tuple(str(c["sample_id"]) for c in contexts),
                tau=tau, tolerance=tolerance, target_share=target_share, probe=asdict(spec), criterion=criterion)
            q, share, mean = best_knob(table, neighbour_chooser(cal), qs, target_share)
            if q is None:
                q, share, mean = 1.01, 1.0, 0.0
            if best is None or mean > best[0] + 1e-12:
                best = (mean, replace(cal, q=float(q), fit_share=share, fit_mean_ratio=mean))
    return best[1]


def summarize_outcomes(name: str, ratios: np.ndarray, within: np.ndarray, base: tuple[np.ndarray, np.ndarray] | None = None,
                       seed: int = 0) -> dict:
    """Share of contexts that keep their quality (`share_within`) and mean ratio with 95% bootstrap intervals over contexts; with `base`
    (another chooser's (ratios, within) on the same contexts), the paired differences."""
    out = {"chooser": name, "n": int(len(ratios)),
           "share_within": float(within.mean()), "share_ci95": list(bootstrap_ci(within, seed=seed)),
           "mean_ratio": float(ratios.mean()), "mean_ratio_ci95": list(bootstrap_ci(ratios, seed=seed))}
    if base is not None:
        br, bw = base
        out["ratio_gain"] = float((ratios - br).mean())
        out["ratio_gain_ci95"] = list(paired_bootstrap_ci(ratios, br, seed=seed))
        out["share_diff"] = float((within - bw).mean())
        out["share_diff_ci95"] = list(paired_bootstrap_ci(within, bw, seed=seed))
    return out


def knob_matrix(table: dict[Any, dict], chooser: Callable[[Any], Callable[[dict], float]],
                knobs: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(ratios, ok), each [knobs, contexts]: every knob value's outcome on every context."""
    pairs = [outcomes(table, chooser(k)) for k in knobs]
    return np.stack([r for r, _ in pairs]), np.stack([w for _, w in pairs])


def frontier_at_share(ratios: np.ndarray, ok: np.ndarray, share: float, n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, np.ndarray]:
    """The largest mean ratio over knob values whose share of ok contexts is >= share, on the
    contexts themselves and on `n_boot` bootstrap resamples of them (seeded: two choosers with
    the same seed see the same resamples, so their replicates pair). -inf where no knob
    reaches the share. Returns (value, replicates)."""
    def best(idx):
        mean_r = ratios[:, idx].mean(axis=-1)
        share_ok = ok[:, idx].mean(axis=-1)
        return np.where(share_ok >= share - 1e-12, mean_r, -np.inf).max(axis=0)

    n = ratios.shape[1]
    value = float(best(np.arange(n)))
    rng = np.random.default_rng(seed)
    chunks = [best(rng.integers(0, n, (min(250, n_boot - s), n))) for s in range(0, n_boot, 250)]  # [K, b] -> [b]
    return value, np.concatenate(chunks) if chunks else np.empty(0)


__all__ = [
    "ProbeSpec", "choose_spans", "probe_feed", "probe_safe_ratio", "ProbeCalibrator", "fit_probe_calibrator",
    "NeighbourCalibrator", "fit_neighbour_calibrator", "neighbour_chooser", "FEATURES",
    "CRITERIA", "context_table", "floor_to_grid", "outcomes", "best_knob", "summarize_outcomes", "knob_matrix", "frontier_at_share", "SELECTIONS",
]

"""kvray's Ray metrics (`ray.util.metrics`): one declaration table, created lazily inside Ray
processes. Prometheus names get Ray's `ray_` prefix (and `_total` for counters), e.g.
`kvray_samples_evaluated` -> `ray_kvray_samples_evaluated_total`; the Grafana dashboard in
`dashboards/kvray.json` uses those names (a test checks that every one it uses is declared here)."""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

SCORE_BOUNDARIES = [0.1, 0.25, 0.5, 0.75, 0.9, 0.999]
LATENCY_BOUNDARIES = [0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]

#: name -> (kind, description, tag keys, histogram boundaries)
METRIC_SPECS: dict[str, tuple[str, str, tuple[str, ...], list | None]] = {
    "kvray_samples_evaluated": ("counter", "Samples evaluated (one prefill each)", ("run", "actor"), None),
    "kvray_configs_evaluated": ("counter", "(sample, config, protocol) rows evaluated", ("run", "method"), None),
    "kvray_score": ("histogram", "Per-row task score", ("run", "method"), SCORE_BOUNDARIES),
    "kvray_kv_bytes_saved": ("counter", "KV bytes freed by compression (full - kept), summed over rows",
                             ("run", "method"), None),
    "kvray_sample_latency_s": ("histogram", "Wall time to evaluate one sample with all its configs",
                               ("run",), LATENCY_BOUNDARIES),
    "kvray_actor_failures": ("counter", "Model actors that died or tasks that failed and were retried",
                             ("run",), None),
    "kvray_tune_sample_evaluations": ("counter", "Sample evaluations made by Tune trials", ("run", "method"), None),
}


def prometheus_names() -> set[str]:
    """Every series name Prometheus shows for the declared metrics."""
    out = set()
    for name, (kind, *_rest) in METRIC_SPECS.items():
        if kind == "counter":
            out.add(f"ray_{name}_total")
        elif kind == "histogram":
            out |= {f"ray_{name}_bucket", f"ray_{name}_sum", f"ray_{name}_count"}
        else:
            out.add(f"ray_{name}")
    return out


@functools.lru_cache(maxsize=None)
def metric(name: str):
    """The `ray.util.metrics` object for `name` (created once per process)."""
    from ray.util import metrics

    kind, description, tags, boundaries = METRIC_SPECS[name]
    if kind == "counter":
        return metrics.Counter(name, description=description, tag_keys=tags)
    if kind == "histogram":
        return metrics.Histogram(name, description=description, boundaries=boundaries, tag_keys=tags)
    return metrics.Gauge(name, description=description, tag_keys=tags)


def record(name: str, value: float, **tags) -> None:
    """Add `value` to a counter / observe it in a histogram / set a gauge; never raises (metrics
    must not break an evaluation), logs once per metric when it fails."""
    try:
        m = metric(name)
        kind = METRIC_SPECS[name][0]
        tags = {k: str(v) for k, v in tags.items()}
        if kind == "counter":
            if value > 0:  # Ray counters refuse 0
                m.inc(value, tags=tags)
        elif kind == "histogram":
            m.observe(value, tags=tags)
        else:
            m.set(value, tags=tags)
    except Exception as exc:  # noqa: BLE001 - reporting only
        if name not in _warned:
            _warned.add(name)
            log.warning("metric %s not recorded: %s", name, exc)


_warned: set[str] = set()

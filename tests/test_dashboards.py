"""dashboards/kvray.json against kvray's metric declarations (kvray/actors/metrics.py): every
`ray_kvray_*` series a panel queries must be declared, and every declared metric must have a
panel. Needs neither Ray nor Grafana: metrics.py and the kvray.actors package import Ray lazily."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"


from kvray.actors.metrics import METRIC_SPECS, prometheus_names

KVRAY_SERIES = re.compile(r"\bray_kvray_[a-z_]+")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    with open(DASHBOARDS / "kvray.json") as f:
        return json.load(f)


def _all_panels(dashboard: dict) -> list[dict]:
    """Top-level panels plus those nested in (collapsed) rows."""
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in _all_panels(dashboard) for t in p.get("targets", []) if t.get("expr")]


def _variable_queries(dashboard: dict) -> list[str]:
    out = []
    for v in dashboard["templating"]["list"]:
        q = v.get("query")
        out.append(q.get("query", "") if isinstance(q, dict) else str(q or ""))
        out.append(v.get("definition", ""))
    return out


def _metric_of(series: str) -> str:
    """Declared metric name behind a Prometheus series name."""
    name = series.removeprefix("ray_")
    for suffix in ("_total", "_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name.removesuffix(suffix) in METRIC_SPECS:
            return name.removesuffix(suffix)
    return name


def test_prometheus_names_follow_ray_conventions():
    names = prometheus_names()
    for name, (kind, *_rest) in METRIC_SPECS.items():
        if kind == "counter":
            assert f"ray_{name}_total" in names
        elif kind == "histogram":
            assert {f"ray_{name}_bucket", f"ray_{name}_sum", f"ray_{name}_count"} <= names


def test_is_a_valid_dashboard(dashboard):
    assert dashboard["uid"] == "kvray"
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    panels = _all_panels(dashboard)
    assert panels
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p.get("type") and p.get("title"), p
        gp = p["gridPos"]
        assert gp["x"] >= 0 and gp["w"] > 0 and gp["x"] + gp["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p.get("targets"), f"panel {p['title']!r} has no queries"
            ref_ids = [t["refId"] for t in p["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), p["title"]


def test_datasource_variable_and_session_filter(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables.get("datasource")
    assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert "SessionName" in variables and variables["SessionName"]["type"] == "query"
    # Every query goes through the variable (no data source uid baked in).
    for p in _all_panels(dashboard):
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t.get("datasource", p["datasource"])["uid"] == "${datasource}", p["title"]
            assert "$SessionName" in t["expr"], f"{p['title']}: not filtered by session"


def test_every_kvray_series_used_is_declared(dashboard):
    declared = prometheus_names()
    used = {m for text in _exprs(dashboard) + _variable_queries(dashboard) for m in KVRAY_SERIES.findall(text)}
    assert used, "the dashboard queries no kvray metric"
    undeclared = sorted(used - declared)
    assert not undeclared, f"series not declared in kvray/actors/metrics.py METRIC_SPECS: {undeclared}"


def test_every_declared_metric_has_a_panel(dashboard):
    used = {_metric_of(m) for e in _exprs(dashboard) for m in KVRAY_SERIES.findall(e)}
    missing = sorted(set(METRIC_SPECS) - used)
    assert not missing, f"declared metrics with no panel in dashboards/kvray.json: {missing}"


def test_histograms_are_queried_correctly(dashboard):
    """histogram_quantile needs the _bucket series aggregated by `le`; means divide _sum by _count."""
    for e in _exprs(dashboard):
        if "histogram_quantile" in e:
            assert "_bucket" in e and re.search(r"by \([^)]*\ble\b", e), e
        for series in KVRAY_SERIES.findall(e):
            if series.endswith("_bucket"):
                assert "histogram_quantile" in e, e
            if series.endswith("_sum"):
                assert series.removesuffix("_sum") + "_count" in e, e


def test_ray_builtins_present(dashboard):
    text = "\n".join(_exprs(dashboard))
    for series in ("ray_node_mem_used", "ray_node_gram_used", "ray_serve_num_http_requests_total",
                   "ray_serve_http_request_latency_ms_bucket"):
        assert series in text, series


def test_provisioning_points_at_this_folder():
    text = (DASHBOARDS / "provisioning" / "kvray.yml").read_text()
    assert "apiVersion: 1" in text and "type: file" in text
    assert re.search(r"^\s+path: \S+", text, re.M)
    try:
        import yaml
    except ImportError:  # pragma: no cover
        return
    prov = yaml.safe_load(text)
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_readme_lists_every_metric():
    text = (DASHBOARDS / "README.md").read_text()
    for name in METRIC_SPECS:
        assert f"ray_{name}_" in text, name
    assert "/tmp/ray/session_latest/metrics/prometheus/prometheus.yml" in text
    assert "RAY_GRAFANA_HOST" in text and "RAY_PROMETHEUS_HOST" in text

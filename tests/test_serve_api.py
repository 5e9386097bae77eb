"""The HTTP API (kvray.serve.api) with a fake backend through FastAPI's TestClient -- no Ray, no
model: every endpoint's happy path, a 4xx with a helpful message for each kind of bad input, the
API key, policy hot reload, timeouts, the OpenAPI schema. Then the plain `ModelBackend` on the
tiny seeded Llama. Through Ray Serve: tests/test_serve_ray.py."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # fastapi.testclient needs it (the `dev` extra)

from fastapi.testclient import TestClient  # noqa: E402

from kvray.budget import BudgetPlan  # noqa: E402
from kvray.calibration import Calibrator, probe_curve, retention_curve  # noqa: E402
from kvray.policy import Policy  # noqa: E402
from kvray.probe import ProbeCalibrator  # noqa: E402
from kvray.presses import list_methods  # noqa: E402
from kvray.serve.api import (MAX_CONTEXT_CHARS, GenerateJob, GenerateResult, ModelBackend, RequestError,  # noqa: E402
                             build_api, get_backend)

CAL = Calibrator(method="knorm", alpha=0.8, beta=-3.0, tau=0.95)
PATHS = {"/v1/generate", "/v1/calibrate", "/v1/chat/completions", "/v1/policies", "/v1/policies/{policy_id}",
         "/healthz", "/metrics"}


class FakeBackend:
    """Records the jobs; answers from the job itself. A context containing TOO_LONG is refused
    the way ModelBackend refuses a prompt over the model's context."""

    def __init__(self, delay: float = 0.0):
        self.jobs: list[GenerateJob] = []
        self.contexts: list[str] = []
        self.delay = delay

    async def generate(self, job: GenerateJob) -> GenerateResult:
        self.jobs.append(job)
        if "TOO_LONG" in job.context:
            raise RequestError("prompt is 5000 tokens; model fake-lm supports at most 4096 tokens: "
                               "shorten the context", 413)
        if self.delay:
            await asyncio.sleep(self.delay)
        kept = 100 * (1 - job.compression_ratio)
        return GenerateResult(answer=f"answer to {job.question!r}", model="fake-lm", prompt_tokens=120,
                              new_tokens=min(3, job.max_new_tokens), kv_tokens_full=100, kv_tokens_kept=kept,
                              kv_bytes_full=4000, kv_bytes_kept=int(40 * kept), achieved_ratio=job.compression_ratio,
                              prefill_s=0.1, compress_s=0.01, decode_s=0.2, total_s=0.31)

    async def generate_stream(self, job: GenerateJob):
        r = await self.generate(job)
        for word in r.answer.split(" "):  # the answer in pieces, as an engine would decode it
            yield word + " "
        yield r

    async def context_nll(self, context: str) -> float:
        self.contexts.append(context)
        if "TOO_LONG" in context:
            raise RequestError("prompt is 5000 tokens; model fake-lm supports at most 4096 tokens", 413)
        return 2.5

    async def probe(self, context: str, calibrator: dict):
        self.contexts.append(context)
        self.probed = calibrator
        return {0.25: 0.99, 0.5: 0.97, 0.75: 0.5}, 2.5


def _policies(store: Path) -> None:
    Policy(policy_id="snap-a", model="fake-lm", method="snapkv", compression_ratio=0.5).save(store)
    Policy(policy_id="knorm-cal", model="fake-lm", method="knorm", compression_ratio=0.25, query_aware=True,
           calibrator=CAL.to_dict(), metrics={"tune_score": 0.9}).save(store)
    plan = BudgetPlan(((0.2, 0.8), (0.5, 0.5), (0.4, 0.6)), name="tuned")  # 3 layers x 2 KV heads, ratio 0.5
    Policy(policy_id="snap-plan", model="fake-lm", method="snapkv", compression_ratio=0.5,
           plan=plan.to_dict(), allocation={"layer_slope": 0.3}).save(store)


@pytest.fixture
def store(tmp_path) -> Path:
    d = tmp_path / "policies"
    _policies(d)
    return d


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()


def _client(store, fake, **kw) -> TestClient:
    app = build_api(store, **{"api_key": "", **kw})
    app.dependency_overrides[get_backend] = lambda: fake
    return TestClient(app)


@pytest.fixture
def client(store, fake) -> TestClient:
    return _client(store, fake)


def _gen(**kw) -> dict:
    return {"context": "The secret number is 4711. " * 5, "question": "What is the secret number?", **kw}


def _detail(r) -> str:
    body = r.json()
    assert set(body) >= {"detail"}, body
    return body["detail"] if isinstance(body["detail"], str) else json.dumps(body["detail"])


# ----------------------------------------------------------------------------- happy paths


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_list_and_get_policies(client, store):
    r = client.get("/v1/policies")
    assert r.status_code == 200
    body = r.json()
    assert [p["policy_id"] for p in body["policies"]] == ["knorm-cal", "snap-a", "snap-plan"]
    assert body["errors"] == []
    cal = next(p for p in body["policies"] if p["policy_id"] == "knorm-cal")
    assert cal["calibrated"] is True and cal["method"] == "knorm" and cal["compression_ratio"] == 0.25

    r = client.get("/v1/policies/snap-plan")
    assert r.status_code == 200
    assert Policy.model_validate(r.json()) == Policy.load(store / "snap-plan.json")


def test_generate_defaults_without_policy(client, fake):
    r = client.post("/v1/generate", json=_gen())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] == "answer to 'What is the secret number?'"
    assert body["policy"] is None and body["method"] == "snapkv" and body["compression_ratio"] == 0.5
    assert body["query_aware"] is False and body["model"] == "fake-lm"
    assert body["kv"] == {"tokens_full": 100, "tokens_kept": 50.0, "bytes_full": 4000, "bytes_kept": 2000,
                          "compression_ratio": 0.5}
    assert set(body["timing"]) == {"prefill_s", "compress_s", "decode_s", "total_s", "ttft_s"}
    (job,) = fake.jobs
    assert job.max_new_tokens == 32 and job.policy is None and job.press().name == "snapkv"

    r = client.post("/v1/generate", json=_gen(method="full", max_new_tokens=5, answer_prefix="Answer:"))
    assert r.status_code == 200 and r.json()["compression_ratio"] == 0.0
    assert fake.jobs[-1].answer_prefix == "Answer:" and fake.jobs[-1].max_new_tokens == 5


def test_generate_with_policy_and_overrides(client, fake):
    r = client.post("/v1/generate", json=_gen(policy="knorm-cal"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["policy"], body["method"], body["compression_ratio"], body["query_aware"]) == \
        ("knorm-cal", "knorm", 0.25, True)
    assert fake.jobs[-1].policy["policy_id"] == "knorm-cal"

    r = client.post("/v1/generate", json=_gen(policy="knorm-cal", compression_ratio=0.75, query_aware=False,
                                              method="knorm"))
    assert r.status_code == 200 and r.json()["compression_ratio"] == 0.75 and r.json()["query_aware"] is False
    assert fake.jobs[-1].press().compression_ratio == 0.75

    # a tuned plan keeps its shape at another mean ratio
    r = client.post("/v1/generate", json=_gen(policy="snap-plan", compression_ratio=0.25))
    assert r.status_code == 200
    press = fake.jobs[-1].press()
    assert press.plan is not None and press.plan.compression_ratio == pytest.approx(0.25)
    keep = press.plan.keep
    assert keep[0][0] < keep[0][1]  # the head that kept less still keeps less


def test_calibrate(client, fake):
    r = client.post("/v1/calibrate", json={"context": "some long document", "policy": "knorm-cal"})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = float(CAL.max_compression_ratio(2.5, 0.95))
    assert 0 < expected < 0.99
    assert body["policy"] == "knorm-cal" and body["method"] == "knorm" and body["tolerance"] == 0.95
    assert body["context_nll"] == 2.5 and fake.contexts == ["some long document"]
    assert body["max_compression_ratio"] == pytest.approx(expected)
    assert body["retention"] == pytest.approx(1 - expected)
    assert body["curve_b"] == pytest.approx(CAL.b(2.5))
    assert body["predicted_quality"] == pytest.approx(0.95, abs=1e-6)
    assert body["predicted_quality"] == pytest.approx(retention_curve(1 - expected, CAL.b(2.5)))

    # a stricter tolerance allows less compression; the only calibrated policy is the default
    r = client.post("/v1/calibrate", json={"context": "some long document", "tolerance": 0.99})
    assert r.status_code == 200 and r.json()["policy"] == "knorm-cal"
    assert r.json()["max_compression_ratio"] < expected


def test_calibrate_measured(client, fake, store):
    """A policy with a measured calibrator: the replica probes the context, the ingress picks the
    ratio; no `tolerance` (it was fitted for its own target)."""
    probe = ProbeCalibrator(method="knorm", theta=0.95, ratios=(0.25, 0.5, 0.75), probe={"spans": 4})
    Policy(policy_id="probe-cal", model="fake-lm", method="knorm", compression_ratio=0.5,
           calibrator=probe.to_dict()).save(store)
    r = client.post("/v1/calibrate", json={"context": "some long document", "policy": "probe-cal"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["calibrator"] == "kvray.probe_calibrator" and body["method"] == "knorm"
    assert body["max_compression_ratio"] == 0.5 and body["retention"] == 0.5  # 0.75 has probe 0.5 < theta
    assert body["probe_curve"] == {"0.25": 0.99, "0.5": 0.97, "0.75": 0.5} and body["context_nll"] == 2.5
    assert body["curve_b"] is None and body["predicted_quality"] is None
    assert fake.probed == probe.to_dict() and fake.contexts[-1] == "some long document"
    r = client.post("/v1/calibrate", json={"context": "doc", "policy": "probe-cal", "tolerance": 0.9})
    assert r.status_code == 422 and "takes no `tolerance`" in _detail(r)
    # the NLL-curve policy says which kind it is
    r = client.post("/v1/calibrate", json={"context": "doc", "policy": "knorm-cal"})
    assert r.status_code == 200 and r.json()["calibrator"] == "kvray.calibrator" and r.json()["probe_curve"] is None
    Policy(policy_id="bad-cal", model="fake-lm", method="knorm", compression_ratio=0.5,
           calibrator={"kind": "kvray.guess"}).save(store)
    r = client.post("/v1/calibrate", json={"context": "doc", "policy": "bad-cal"})
    assert r.status_code == 500 and "unknown calibrator kind 'kvray.guess'" in _detail(r)


def test_chat_completions(client, fake):
    req = {"model": "whatever", "kv_policy": "snap-a", "max_tokens": 3, "temperature": 0,
           "messages": [{"role": "system", "content": "Doc part one."},
                        {"role": "user", "content": [{"type": "text", "text": "Doc part two."}]},
                        {"role": "assistant", "content": "ok"},
                        {"role": "user", "content": "What is in the doc?"}]}
    r = client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake-lm" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"] == {"role": "assistant",
                                                            "content": "answer to 'What is in the doc?'"}
    assert choice["finish_reason"] == "length"  # 3 of max_tokens 3
    assert body["usage"] == {"prompt_tokens": 120, "completion_tokens": 3, "total_tokens": 123}
    assert body["kv"]["bytes_kept"] == 2000 and body["kv_policy"] == "snap-a" and body["kv_method"] == "snapkv"
    job = fake.jobs[-1]
    assert job.context == "Doc part one.\n\nDoc part two.\n\nok" and job.question == "What is in the doc?"

    req.update(kv_policy=None, compression_ratio=0.25, max_tokens=10)
    r = client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop"
    assert r.json()["kv_policy"] is None and r.json()["compression_ratio"] == 0.25


def _sse_events(text: str) -> list:
    out = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_chat_accepts_a_single_user_message(client, fake):
    """OpenAI clients send one user message: it is the context, compressed whole, query-aware."""
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "The doc. What is it?"}]})
    assert r.status_code == 200, r.text
    job = fake.jobs[-1]
    assert job.context == "The doc. What is it?" and job.question == "" and job.query_aware is True
    r = client.post("/v1/chat/completions", json={"query_aware": False,
                                                 "messages": [{"role": "user", "content": "The doc."}]})
    assert r.status_code == 200 and fake.jobs[-1].query_aware is False


def test_chat_streams_openai_chunks(client, fake):
    r = client.post("/v1/chat/completions", json=_chat(stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.strip() == "answer to 'Question?'"
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "stop" and last["usage"]["completion_tokens"] == 3
    assert last["kv"]["bytes_kept"] == 2000


def test_generate_streams_deltas_then_the_response(client, fake):
    r = client.post("/v1/generate", json=_gen(stream=True))
    assert r.status_code == 200
    events = _sse_events(r.text)
    assert events[-1] == "[DONE]" and "".join(e["delta"] for e in events[:-2]).strip() == events[-2]["answer"]
    assert events[-2]["kv"]["bytes_full"] == 4000
    r = client.post("/v1/generate", json=_gen(stream=True, context="TOO_LONG"))  # refused before the stream starts
    assert r.status_code == 413 and "supports at most 4096" in _detail(r)


def test_openapi_schema_has_every_path(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    schema = r.json()
    assert PATHS <= set(schema["paths"])
    gen = schema["components"]["schemas"]["GenerateRequest"]
    assert gen["additionalProperties"] is False
    ratio = gen["properties"]["compression_ratio"]["anyOf"][0]
    assert ratio["minimum"] == 0 and ratio["exclusiveMaximum"] == 1
    assert gen["properties"]["max_new_tokens"]["maximum"] == 512
    assert "securitySchemes" not in schema.get("components", {})  # no key configured


# ----------------------------------------------------------------------------- bad input


BAD_GENERATE = [
    (_gen(compression_ratio=1.0), 422, "compression_ratio: Input should be less than 1"),
    (_gen(compression_ratio=-0.1), 422, "compression_ratio: Input should be greater than or equal to 0"),
    (_gen(max_new_tokens=0), 422, "max_new_tokens: Input should be greater than or equal to 1"),
    (_gen(max_new_tokens=513), 422, "max_new_tokens: Input should be less than or equal to 512"),
    (_gen(method="snapkvv"), 422, "unknown method 'snapkvv'; known methods: " + ", ".join(list_methods())),
    (_gen(context=""), 422, "context: String should have at least 1 character"),
    (_gen(context="  \n "), 422, "context is empty (only whitespace)"),
    ({"context": "abc"}, 422, "question: Field required"),
    (_gen(temperature=0.7), 422, "temperature: unknown field"),
    (_gen(context="x" * (MAX_CONTEXT_CHARS + 1)), 422, f"at most {MAX_CONTEXT_CHARS} characters"),
    (_gen(policy="nope"), 404, "unknown policy 'nope'; known: knorm-cal, snap-a, snap-plan"),
    (_gen(policy="snap-a", method="knorm"), 422, "policy 'snap-a' uses method 'snapkv'"),
    (_gen(method="full", compression_ratio=0.5), 422, "full keeps every entry"),
    (_gen(context="TOO_LONG " * 10), 413, "supports at most 4096 tokens"),
]


@pytest.mark.parametrize("body,status,message", BAD_GENERATE, ids=[m[:30] for _, _, m in BAD_GENERATE])
def test_generate_rejects_bad_input(client, body, status, message):
    r = client.post("/v1/generate", json=body)
    assert r.status_code == status, r.text
    assert message in _detail(r)
    assert len(r.content) < 10_000  # the input is not echoed back


def test_malformed_json_and_nan(client):
    r = client.post("/v1/generate", content=b'{"context": "a", ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON decode error" in _detail(r)
    r = client.post("/v1/generate", content=b'{"context": "a", "question": "b", "compression_ratio": NaN}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and "compression_ratio" in _detail(r)
    r = client.post("/v1/generate", json=["not", "an", "object"])
    assert r.status_code == 422
    r = client.get("/v1/generate")
    assert r.status_code == 405 and _detail(r) == "Method Not Allowed"


def test_policy_lookup_errors(client, store):
    r = client.get("/v1/policies/nope")
    assert r.status_code == 404 and "unknown policy 'nope'; known: knorm-cal, snap-a, snap-plan" in _detail(r)
    r = client.get("/v1/policies/..%2Fsecrets")  # no path traversal: ids are checked before the file system
    assert r.status_code == 404
    (store / "broken.json").write_text("{not json")
    r = client.get("/v1/policies")
    assert r.status_code == 200
    assert [e["policy_id"] for e in r.json()["errors"]] == ["broken"]
    assert "invalid policy" in r.json()["errors"][0]["error"]
    assert len(r.json()["policies"]) == 3


BAD_CALIBRATE = [
    ({"context": "doc", "policy": "snap-a"}, 422, "policy 'snap-a' has no calibrator (it was not calibrated); "
                                                 "calibrated policies: knorm-cal"),
    ({"context": "doc", "policy": "nope"}, 404, "unknown policy 'nope'"),
    ({"context": "doc", "policy": "knorm-cal", "tolerance": 0}, 422, "tolerance: Input should be greater than 0"),
    ({"context": "doc", "policy": "knorm-cal", "tolerance": 1.5}, 422,
     "tolerance: Input should be less than or equal to 1"),
    ({"context": "", "policy": "knorm-cal"}, 422, "context: String should have at least 1 character"),
    ({"context": "doc", "policy": "knorm-cal", "ratio": 0.5}, 422, "ratio: unknown field"),
    ({"context": "TOO_LONG", "policy": "knorm-cal"}, 413, "supports at most 4096 tokens"),
]


@pytest.mark.parametrize("body,status,message", BAD_CALIBRATE, ids=[m[:30] for _, _, m in BAD_CALIBRATE])
def test_calibrate_rejects_bad_input(client, body, status, message):
    r = client.post("/v1/calibrate", json=body)
    assert r.status_code == status, r.text
    assert message in _detail(r)


def test_calibrate_needs_a_policy_name_when_ambiguous(client, store):
    Policy(policy_id="snap-cal", model="fake-lm", method="snapkv", compression_ratio=0.5,
           calibrator=Calibrator(method="snapkv", alpha=1.0, beta=-2.0).to_dict()).save(store)
    r = client.post("/v1/calibrate", json={"context": "doc"})
    assert r.status_code == 422
    assert "name a `policy`: calibrated policies in the store: knorm-cal, snap-cal" in _detail(r)


def _chat(**kw):
    return {"messages": [{"role": "system", "content": "The document."}, {"role": "user", "content": "Question?"}],
            **kw}


BAD_CHAT = [
    (_chat(n=2), 422, "n must be 1"),
    (_chat(stop=["\n"]), 422, "stop sequences are not supported"),
    (_chat(max_tokens=1000), 422, "max_tokens: Input should be less than or equal to 512"),
    (_chat(compression_ratio=1), 422, "compression_ratio: Input should be less than 1"),
    (_chat(kv_policy="nope"), 404, "unknown policy 'nope'; known:"),
    (_chat(functions=[]), 422, "functions: unknown field"),
    ({"messages": []}, 422, "messages: List should have at least 1 item"),
    ({"messages": [{"role": "system", "content": " "}, {"role": "user", "content": "  "}]}, 422, "no context: send"),
    ({"messages": [{"role": "user", "content": "doc"}, {"role": "assistant", "content": "hi"}]}, 422,
     "the last message must be the user's question, got role 'assistant'"),
    ({"messages": [{"role": "tool", "content": "doc"}, {"role": "user", "content": "q"}]}, 422, "messages.0.role"),
    (_chat(kv_policy="snap-a", compression_ratio=0.5, query_aware=True), 200, ""),
]


@pytest.mark.parametrize("body,status,message", BAD_CHAT, ids=[m[:30] or "ok" for _, _, m in BAD_CHAT])
def test_chat_rejects_bad_input(client, body, status, message):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    if status != 200:
        assert message in _detail(r)


# ----------------------------------------------------------------------------- key, reload, limits


def test_api_key(store, fake, monkeypatch):
    client = _client(store, fake, api_key="s3cret")
    assert client.get("/healthz").status_code == 200  # liveness needs no key
    for method, path, body in [("get", "/v1/policies", None), ("get", "/v1/policies/snap-a", None),
                               ("post", "/v1/generate", _gen()), ("post", "/v1/calibrate", {"context": "d"}),
                               ("post", "/v1/chat/completions", _chat())]:
        r = client.request(method, path, json=body)
        assert r.status_code == 401 and "missing x-api-key header" in _detail(r), path
        r = client.request(method, path, json=body, headers={"x-api-key": "wrong"})
        assert r.status_code == 401 and "invalid API key" in _detail(r), path
        r = client.request(method, path, json=body, headers={"x-api-key": "s3cret"})
        assert r.status_code == 200, (path, r.text)
    assert fake.jobs, "the backend was reached only with the key"
    schema = client.get("/openapi.json").json()
    assert "x-api-key" in json.dumps(schema["components"]["securitySchemes"])

    monkeypatch.setenv("KVRAY_API_KEY", "from-env")
    client = _client(store, fake, api_key=None)
    assert client.get("/v1/policies").status_code == 401
    assert client.get("/v1/policies", headers={"x-api-key": "from-env"}).status_code == 200
    client = _client(store, fake, api_key="")  # explicitly off, whatever the environment says
    assert client.get("/v1/policies").status_code == 200


def test_policy_hot_reload(client, store, tmp_path):
    assert client.post("/v1/generate", json=_gen(policy="fresh")).status_code == 404
    ids = lambda: [p["policy_id"] for p in client.get("/v1/policies").json()["policies"]]  # noqa: E731
    assert "fresh" not in ids()
    Policy(policy_id="fresh", model="fake-lm", method="streaming_llm", compression_ratio=0.6).save(store)
    assert "fresh" in ids()
    r = client.post("/v1/generate", json=_gen(policy="fresh"))
    assert r.status_code == 200 and r.json()["method"] == "streaming_llm" and r.json()["compression_ratio"] == 0.6
    # an updated file is served as updated, a removed one is gone
    Policy(policy_id="fresh", model="fake-lm", method="streaming_llm", compression_ratio=0.3).save(store)
    assert client.post("/v1/generate", json=_gen(policy="fresh")).json()["compression_ratio"] == 0.3
    (store / "fresh.json").unlink()
    assert client.get("/v1/policies/fresh").status_code == 404


def test_store_from_environment(tmp_path, fake, monkeypatch):
    d = tmp_path / "env-store"
    Policy(policy_id="env-pol", model="m", method="knorm", compression_ratio=0.5).save(d)
    monkeypatch.setenv("KVRAY_POLICIES", str(d))
    client = _client(None, fake)
    assert [p["policy_id"] for p in client.get("/v1/policies").json()["policies"]] == ["env-pol"]


def test_timeout_and_missing_backend(store):
    client = _client(store, FakeBackend(delay=5.0), request_timeout_s=0.05)
    t0 = time.perf_counter()
    r = client.post("/v1/generate", json=_gen())
    assert r.status_code == 504 and "generation did not finish within 0.05 s" in _detail(r)
    assert time.perf_counter() - t0 < 2.0
    with pytest.raises(ValueError, match="request_timeout_s must be a positive number"):
        build_api(store, request_timeout_s=0)

    bare = TestClient(build_api(store, api_key=""))  # no backend provider, no override
    r = bare.post("/v1/generate", json=_gen())
    assert r.status_code == 503 and "no model backend" in _detail(r)
    assert bare.get("/v1/policies").status_code == 200  # what needs no model still works


# ----------------------------------------------------------------------------- the plain model backend


def test_model_backend_slot_outlives_an_abandoned_request():
    """A caller that gives up (timeout) must not free the model for the next request while the
    abandoned work still runs in its thread."""
    backend = ModelBackend(lm=None)
    release = threading.Event()

    async def scenario():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(backend._in_thread(release.wait, 5.0), 0.05)
        still_busy = backend._slots.locked()
        release.set()
        assert await backend._in_thread(lambda: 42) == 42
        return still_busy

    assert asyncio.run(scenario()) is True
    assert not backend._slots.locked()


def test_model_backend_on_tiny_model(tiny_llama, tmp_path):
    """The real backend end to end (no Ray): answer, KV sizes, 413 over the model's context, a
    policy plan of the wrong shape, the context NLL for /v1/calibrate."""
    store = tmp_path / "p"
    _policies(store)  # snap-plan is 3 layers x 2 KV heads: fits the tiny Llama
    Policy(policy_id="wrong-shape", model="other", method="snapkv", compression_ratio=0.5,
           plan=BudgetPlan.uniform(5, 2, 0.5).to_dict()).save(store)
    backend = ModelBackend(tiny_llama)
    app = build_api(store, api_key="", backend_provider=lambda: backend)
    client = TestClient(app)
    context = " ".join(f"Line {i}: the value of key {i} is {i * 7}." for i in range(40))

    r = client.post("/v1/generate", json={"context": context, "question": "What is key 3?", "policy": "snap-plan",
                                          "max_new_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    kv = body["kv"]
    assert body["model"] == "tiny-llama" and 1 <= body["new_tokens"] <= 3 and isinstance(body["answer"], str)
    assert kv["tokens_full"] > 100 and kv["bytes_kept"] / kv["bytes_full"] == pytest.approx(0.5, abs=0.02)
    assert kv["compression_ratio"] == pytest.approx(0.5, abs=0.02)
    assert body["timing"]["total_s"] >= body["timing"]["prefill_s"] > 0

    r = client.post("/v1/generate", json={"context": context * 30, "question": "q?", "method": "knorm"})
    assert r.status_code == 413 and "supports at most 4096 tokens" in _detail(r)

    r = client.post("/v1/generate", json={"context": context, "question": "q?", "policy": "wrong-shape"})
    assert r.status_code == 422
    assert "does not fit model tiny-llama" in _detail(r) and "5 layers x 2 KV heads" in _detail(r)

    r = client.post("/v1/calibrate", json={"context": context, "policy": "knorm-cal"})
    assert r.status_code == 200, r.text
    nll = r.json()["context_nll"]
    assert nll > 0 and r.json()["max_compression_ratio"] == pytest.approx(
        min(float(CAL.max_compression_ratio(nll)), 0.99))

    probe = ProbeCalibrator(method="knorm", theta=0.5, ratios=(0.3, 0.6), probe={"spans": 3, "cue": 4, "target": 3})
    Policy(policy_id="probe-cal", model="tiny-llama", method="knorm", compression_ratio=0.3,
           calibrator=probe.to_dict()).save(store)
    r = client.post("/v1/calibrate", json={"context": context, "policy": "probe-cal"})
    assert r.status_code == 200, r.text
    curve, c_nll = probe_curve(tiny_llama, context, "knorm", [0.3, 0.6], probe=probe.spec)
    assert r.json()["max_compression_ratio"] == probe.predict(curve, c_nll)
    assert r.json()["probe_curve"] == pytest.approx({f"{k:g}": v for k, v in curve.items()}, rel=1e-5)
    assert r.json()["context_nll"] == pytest.approx(nll, rel=1e-4)

    r = client.post("/v1/chat/completions", json={"kv_policy": "knorm-cal", "max_tokens": 2, "messages": [
        {"role": "system", "content": context}, {"role": "user", "content": "What is key 3?"}]})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > kv["tokens_full"]

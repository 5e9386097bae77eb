"""The HTTP API (docs/architecture.md, section 7) as a plain FastAPI app (no Ray): pydantic request /
response models, `build_api(...)`, and `ModelBackend`, the plain class that does the model work.

Endpoints (OpenAPI at /openapi.json, docs at /docs):

* `POST /v1/generate` -- answer a question about a context with the context's KV cache compressed
  by a tuned policy (by id) or a method at a ratio; returns the answer, KV sizes and timings.
  `stream: true`: server-sent events, `{"delta": text}` as tokens are decoded, then the whole
  response object, then `[DONE]`.
* `POST /v1/calibrate` -- the largest compression ratio this context supports for a policy's
  calibrator at a quality `tolerance` (the NLL ratio full / compressed to keep, tau, as in
  `jobs/calibrate.yaml`), with the predicted quality and the context's NLL.
* `POST /v1/chat/completions` -- OpenAI-compatible: the last user message is the question, the
  earlier messages (system included) are the context; a single message (what OpenAI clients send)
  is the context itself, compressed whole, query-aware unless the request says otherwise. The
  policy rides in the extra field `kv_policy` (`extra_body={"kv_policy": ...}` with the `openai`
  client), the response carries a `kv` field next to `usage`. `stream: true` sends OpenAI's
  `chat.completion.chunk` events; the last chunk carries `finish_reason`, `usage` and `kv`.
  Decoding is greedy: sampling fields (temperature, top_p, seed) are accepted for client
  compatibility and do not change the answer; `n > 1` and `stop` are refused with a 422 that
  says so.
* `GET /v1/policies`, `GET /v1/policies/{policy_id}`, `GET /healthz` (with the model replica's
  engine gauges), `GET /metrics` (the same in Prometheus text format).

Policies are read from the `PolicyStore` directory on every request, so a policy file written
while the server runs is served by the next request. The ingress resolves the id and ships the
policy (as JSON) with the job, so model replicas need no access to the store.

The model work goes through a backend obtained with `Depends(get_backend)`: any object with
`async generate(job)`, the async generator `generate_stream(job)` (text deltas, then the
`GenerateResult`), `async context_nll(context)`, `async probe(context, calibrator)` (for measured
calibrators) and optionally `stats()`. `ModelBackend` is the
in-process one (continuous batching on a `kvray.serve.engine.BatchingEngine`, or one request at
a time with `batching=False`); under Ray Serve (`kvray.serve.app`) the backend forwards to the
`CompressedLM` deployment. Tests replace it with `app.dependency_overrides[get_backend]`.

Bad input is answered with a 4xx whose JSON `detail` names what is wrong and what is allowed:
422 for validation (unknown fields, ratio outside [0, 1), max_new_tokens outside [1, 512],
unknown method), 404 for an unknown policy (the known ids are listed), 413 for a prompt longer
than the model's context or a request that could never fit the replica's KV budget, 401 for a
missing or wrong `x-api-key` when a key is configured (argument or env KVRAY_API_KEY; every
endpoint but /healthz, /metrics and the OpenAPI docs needs it), 504 when the model work exceeds
`request_timeout_s` (the request's row is then taken out of the batch). A streamed request that
fails after its first event ends with `{"error": {"message", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal, Protocol

from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from ..policy import Policy, PolicyStore, policy_summary
from ..presses import Press, list_methods, make_press
from .engine import DEFAULT_MAX_ROWS

DEFAULT_STORE = "runs/policies"          # where jobs/calibrate.py writes policies (out: runs)
DEFAULT_METHOD = "snapkv"                # without a policy and without a method
DEFAULT_RATIO = 0.5                      # without a policy and without a ratio (0 for `full`)
DEFAULT_MAX_NEW_TOKENS = 32
MAX_NEW_TOKENS = 512
MAX_CONTEXT_CHARS = 400_000              # a cheap guard before tokenising; the real limit is the model's context
MAX_QUESTION_CHARS = 20_000
MAX_PREFIX_CHARS = 2_000
MAX_MESSAGES = 256
MAX_SERVED_RATIO = 0.99                  # /v1/calibrate clips its answer so it can be sent to /v1/generate
DEFAULT_REQUEST_TIMEOUT_S = 300.0
API_KEY_HEADER = "x-api-key"


# ----------------------------------------------------------------------------- backend side


class RequestError(Exception):
    """Bad input that only the backend can see (a prompt longer than the model's context, a
    policy plan for another model shape): the API answers `status_code` with `detail`."""

    def __init__(self, detail: str, status_code: int = 422):
        super().__init__(detail, status_code)
        self.detail = detail
        self.status_code = status_code

    def __str__(self) -> str:
        return self.detail


def compressed_tokens(prompt, query_aware: bool) -> int:
    """Tokens of a prompt's compressed region: the context (with the template's prefix), plus the
    question when the question is compressed too."""
    return len(prompt.context) + (len(prompt.question) if query_aware else 0)


@dataclass(frozen=True)
class GenerateJob:
    """One resolved generation request, JSON-able (it crosses the Serve handle): the policy (its
    JSON, or None for a plain method) plus the request's overrides."""

    context: str
    question: str
    method: str
    compression_ratio: float
    query_aware: bool
    max_new_tokens: int
    answer_prefix: str = ""
    policy_id: str | None = None
    policy: dict | None = None
    ignore_eos: bool = False  # decode exactly max_new_tokens (benchmarks)

    def press(self, n_tokens: int | None = None) -> Press:
        """The press to run on a compressed region of `n_tokens` tokens (a policy's
        `min_kept_tokens` floor applies when it is given); ValueError (with what is allowed)
        when it cannot be built."""
        if self.policy is not None:
            policy = Policy.model_validate(self.policy)
            if n_tokens is not None:
                return policy.press_for(n_tokens, self.compression_ratio)
            return policy.press(self.compression_ratio)
        return make_press(self.method, compression_ratio=self.compression_ratio)


@dataclass(frozen=True)
class GenerateResult:
    answer: str
    model: str
    prompt_tokens: int
    new_tokens: int
    kv_tokens_full: int
    kv_tokens_kept: float
    kv_bytes_full: int
    kv_bytes_kept: int
    achieved_ratio: float
    prefill_s: float
    compress_s: float
    decode_s: float
    total_s: float
    finish_reason: str = "stop"  # "stop" (a stop token) or "length" (max_new_tokens)
    ttft_s: float = 0.0  # time to the first generated token
    kv_bytes_windowed: int = 0  # a hybrid model's sliding layers (their window), apart from the above


class Backend(Protocol):
    async def generate(self, job: GenerateJob) -> GenerateResult: ...

    def generate_stream(self, job: GenerateJob) -> AsyncIterator[str | GenerateResult]:
        """Text deltas (str) as they are decoded, then the GenerateResult."""

    async def context_nll(self, context: str) -> float: ...

    async def probe(self, context: str, calibrator: dict) -> tuple[dict[float, float], float]:
        """A measured calibrator's probe curve of `context` and its NLL(c)."""


class ModelBackend:
    """The model work for one `LanguageModel`, usable without Ray (and wrapped by the Serve
    deployment `CompressedLM`).

    With `batching` (the default) requests are decoded together by a `BatchingEngine`
    (continuous batching: each request is prefilled and compressed with its own press between
    decode steps, then joins the running batch; admission by `kv_budget` bytes, at most
    `max_rows` rows). Without it, each request runs `kvray.generate` alone in a worker thread,
    at most `max_concurrency` at a time (the path before the engine, kept for comparison)."""

    def __init__(self, lm, max_concurrency: int = 1, *, batching: bool = True, kv_budget: int | None = None,
                 max_rows: int | None = None):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.lm = lm
        self.batching = batching
        self._engine_args = {"kv_budget": kv_budget, "max_rows": max_rows or DEFAULT_MAX_ROWS}
        self._engine = None
        self._slots = asyncio.Semaphore(max_concurrency)
        self.broken: str | None = None  # set when the device is in a state requests cannot recover from

    @property
    def engine(self):
        if self._engine is None:
            from .engine import BatchingEngine

            self._engine = BatchingEngine(self.lm, **self._engine_args)
        return self._engine

    @property
    def model_name(self) -> str:
        return self.lm.name

    def check_health(self) -> None:
        broken = self.broken or (self._engine.broken if self._engine is not None else None)
        if broken:
            raise RuntimeError(f"model backend is unhealthy: {broken}")

    def stats(self) -> dict:
        """Engine gauges and counters (empty without batching)."""
        return self.engine.stats() if self.batching else {}

    def _check_length(self, n_prompt: int, max_new_tokens: int = 0) -> None:
        limit = self.lm.max_context
        if limit and n_prompt + max_new_tokens > limit:
            extra = f" + max_new_tokens {max_new_tokens}" if max_new_tokens else ""
            raise RequestError(f"prompt is {n_prompt} tokens{extra} = {n_prompt + max_new_tokens}; model "
                               f"{self.lm.name} supports at most {limit} tokens: shorten the context", 413)

    def prepare(self, job: GenerateJob):
        """(press, prompt tokens) of a job, or a RequestError saying what is wrong with it."""
        from ..runtime import build_prompt

        try:
            prompt = build_prompt(self.lm.tokenizer, job.context, job.question, job.answer_prefix)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        self._check_length(len(prompt), job.max_new_tokens)
        try:
            press = job.press(compressed_tokens(prompt, job.query_aware))
        except ValueError as exc:
            raise RequestError(f"cannot build the press: {exc}") from None
        plan = getattr(press, "plan", None)
        if plan is not None:
            try:
                plan.check_model(self.lm.plan_layers, self.lm.num_kv_heads)
            except ValueError as exc:
                raise RequestError(f"policy {job.policy_id!r} does not fit model {self.lm.name}: {exc}") from None
        return press, prompt

    def generate_sync(self, job: GenerateJob) -> GenerateResult:
        """One request alone (`kvray.generate`), without the engine."""
        from ..generate import generate

        t0 = time.perf_counter()
        press, prompt = self.prepare(job)
        out = self._guard(lambda: generate(self.lm, job.context, job.question, press=press,
                                           answer_prefix=job.answer_prefix, max_new_tokens=job.max_new_tokens,
                                           query_aware=job.query_aware, ignore_eos=job.ignore_eos))
        s = out.stats
        total = time.perf_counter() - t0
        return GenerateResult(
            answer=out.text, model=self.lm.name, prompt_tokens=len(prompt), new_tokens=s.new_tokens,
            kv_tokens_full=s.kv_tokens_full, kv_tokens_kept=float(s.kv_tokens_kept), kv_bytes_full=s.kv_bytes_full,
            kv_bytes_kept=s.kv_bytes_kept, achieved_ratio=float(s.compression_ratio), prefill_s=s.prefill_s,
            compress_s=s.compress_s, decode_s=s.decode_s, total_s=total,
            finish_reason="length" if s.new_tokens >= job.max_new_tokens else "stop", ttft_s=total,
            kv_bytes_windowed=s.kv_bytes_windowed)

    async def generate_stream(self, job: GenerateJob) -> AsyncIterator[str | GenerateResult]:
        """Text deltas as the engine decodes them, then the GenerateResult (the whole answer at
        once without batching). Closing the stream early cancels the request's row."""
        if not self.batching:
            r = await self._in_thread(self.generate_sync, job)
            if r.answer:
                yield r.answer
            yield r
            return
        t0 = time.perf_counter()
        press, prompt = await asyncio.to_thread(self.prepare, job)
        tok = self.lm.tokenizer
        tokens: list[int] = []
        shown, ttft = "", 0.0
        async for kind, value in self.engine.stream(job, press, prompt):
            if kind == "token":
                if not tokens:
                    ttft = time.perf_counter() - t0
                tokens.append(value)
                text = tok.decode(tokens, skip_special_tokens=True)
                if not text.endswith("\ufffd") and len(text) > len(shown):  # hold a split multi-byte char
                    yield text[len(shown):]
                    shown = text
                continue
            req, row = value, value.row
            text = tok.decode(row.tokens, skip_special_tokens=True)
            if len(text) > len(shown):
                yield text[len(shown):]
            kv = req.kv
            yield GenerateResult(
                answer=text, model=self.lm.name, prompt_tokens=len(prompt), new_tokens=len(row.tokens),
                kv_tokens_full=kv["tokens_full"], kv_tokens_kept=float(kv["tokens_kept"]),
                kv_bytes_full=kv["bytes_full"], kv_bytes_kept=kv["bytes_kept"], achieved_ratio=kv["achieved_ratio"],
                prefill_s=req.prefill_s, compress_s=req.compress_s, decode_s=row.decode_s,
                total_s=time.perf_counter() - t0, finish_reason=row.finish_reason, ttft_s=ttft or time.perf_counter() - t0,
                kv_bytes_windowed=kv.get("bytes_windowed", 0))

    async def generate(self, job: GenerateJob) -> GenerateResult:
        result = None
        async for event in self.generate_stream(job):
            if isinstance(event, GenerateResult):
                result = event
        return result

    def _check_context(self, context: str) -> None:
        """A context alone (no question) as /v1/calibrate runs it: a 4xx for one the model
        cannot take."""
        from ..runtime import build_prompt

        try:
            prompt = build_prompt(self.lm.tokenizer, context, "")
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        self._check_length(len(prompt))

    def context_nll_sync(self, context: str) -> float:
        from ..calibration import context_nll

        self._check_context(context)
        return float(self._guard(lambda: context_nll(self.lm, context)))

    def probe_sync(self, context: str, calibrator: dict) -> tuple[dict[float, float], float]:
        """A measured calibrator's probe of `context` (`kvray.calibration.probe_curve`): its
        curve (ratio -> probe ratio) and NLL(c)."""
        from ..calibration import load_calibrator, probe_curve

        cal = load_calibrator(calibrator)
        self._check_context(context)
        return self._guard(lambda: probe_curve(self.lm, context, cal.method, cal.ratios, probe=cal.spec))

    def _guard(self, work: Callable):
        try:
            return work()
        except RuntimeError as exc:
            if "CUDA error" in str(exc):  # a device-side assert poisons the context: let Serve restart us
                self.broken = str(exc).splitlines()[0][:200]
            raise

    async def _in_thread(self, fn: Callable, *args):
        """Run `fn(*args)` in a worker thread holding a slot until the thread ends -- also when the
        caller gives up (timeout, client gone): torch cannot be interrupted, so the slot must not
        be handed to the next request while the abandoned work still runs."""
        await self._slots.acquire()
        try:
            fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except BaseException:
            self._slots.release()
            raise

        def done(f: asyncio.Future) -> None:
            self._slots.release()
            if not f.cancelled():
                f.exception()  # retrieved: no "never retrieved" warning when the caller left

        fut.add_done_callback(done)
        return await asyncio.shield(fut)

    async def context_nll(self, context: str) -> float:
        if self.batching:  # in the engine's thread, between two decode steps
            return await self.engine.call(self.context_nll_sync, context)
        return await self._in_thread(self.context_nll_sync, context)

    async def probe(self, context: str, calibrator: dict) -> tuple[dict[float, float], float]:
        if self.batching:
            return await self.engine.call(self.probe_sync, context, calibrator)
        return await self._in_thread(self.probe_sync, context, calibrator)


def get_backend(request: Request) -> Backend:
    """FastAPI dependency: the app's backend (override it in tests)."""
    provider = request.app.state.backend_provider
    if provider is None:
        raise HTTPException(503, "no model backend is configured for this server")
    return provider()


# ----------------------------------------------------------------------------- request / response models


def _methods_text() -> str:
    return ", ".join(list_methods())


def _check_method(v: str | None) -> str | None:
    if v is not None and v not in list_methods():
        raise ValueError(f"unknown method {v!r}; known methods: {_methods_text()}")
    return v


def _check_text(v: str, what: str) -> str:
    if not v.strip():
        raise ValueError(f"{what} is empty (only whitespace): send the text to compress")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_RATIO_DOC = "fraction of the context's KV entries removed, in [0, 1); default: the policy's ratio"


class GenerateRequest(_Strict):
    context: str = Field(min_length=1, max_length=MAX_CONTEXT_CHARS,
                         description="the text whose KV cache is compressed")
    question: str = Field(max_length=MAX_QUESTION_CHARS, description="asked after the context (may be empty)")
    policy: str | None = Field(None, description="a policy id from GET /v1/policies")
    method: str | None = Field(None, description=f"without a policy: a compression method (default {DEFAULT_METHOD})")
    compression_ratio: float | None = Field(None, ge=0.0, lt=1.0, allow_inf_nan=False, description=_RATIO_DOC)
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1, le=MAX_NEW_TOKENS)
    ignore_eos: bool = Field(False, description="decode exactly max_new_tokens, past the end-of-turn token "
                                                "(as vLLM's ignore_eos; for benchmarks)")
    query_aware: bool | None = Field(None, description="compress with the question seen "
                                                       "(default: the policy's, else false)")
    answer_prefix: str = Field("", max_length=MAX_PREFIX_CHARS, description="text the answer starts with")
    stream: bool = Field(False, description="server-sent events: {\"delta\": text} as tokens are decoded, then "
                                            "the whole response object, then [DONE]")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str | None) -> str | None:
        return _check_method(v)

    @field_validator("context")
    @classmethod
    def _context(cls, v: str) -> str:
        return _check_text(v, "context")


class KVStats(BaseModel):
    tokens_full: int = Field(description="context tokens before compression")
    tokens_kept: float = Field(description="entries kept per layer and KV head, on average")
    bytes_full: int
    bytes_kept: int
    compression_ratio: float = Field(description="achieved: 1 - kept / full entries")
    bytes_windowed: int | None = Field(None, description="hybrid models (sliding + full-attention layers): bytes "
                                       "the sliding layers hold, each keeping its window; tokens, bytes and the "
                                       "ratio above count the full-attention layers only; absent for other models")

    @model_serializer(mode="wrap")
    def _absent_when_none(self, handler):  # the response stays as it was for pure models
        out = handler(self)
        if isinstance(out, dict) and out.get("bytes_windowed") is None:
            out.pop("bytes_windowed", None)
        return out


def kv_stats_of(r: GenerateResult) -> KVStats:
    """The response's KV stats of a result (`bytes_windowed` only for hybrid models)."""
    return KVStats(tokens_full=r.kv_tokens_full, tokens_kept=r.kv_tokens_kept, bytes_full=r.kv_bytes_full,
                   bytes_kept=r.kv_bytes_kept, compression_ratio=r.achieved_ratio,
                   bytes_windowed=r.kv_bytes_windowed or None)


class Timing(BaseModel):
    prefill_s: float
    compress_s: float
    decode_s: float
    total_s: float
    ttft_s: float = Field(0.0, description="time to the first generated token (admission wait included)")


class GenerateResponse(BaseModel):
    answer: str
    policy: str | None
    method: str
    compression_ratio: float = Field(description="the requested (target) ratio")
    query_aware: bool
    model: str
    new_tokens: int
    kv: KVStats
    timing: Timing


class CalibrateRequest(_Strict):
    context: str = Field(min_length=1, max_length=MAX_CONTEXT_CHARS)
    policy: str | None = Field(None, description="a calibrated policy id; may be omitted when exactly one "
                                                 "policy in the store has a calibrator")
    tolerance: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False,
                                    description="quality to keep: the NLL ratio full / compressed (tau), "
                                                "e.g. 0.95; default: the calibrator's")

    @field_validator("context")
    @classmethod
    def _context(cls, v: str) -> str:
        return _check_text(v, "context")


class CalibrateResponse(BaseModel):
    policy: str
    method: str
    calibrator: str = Field(description="the calibrator's kind: kvray.calibrator (the NLL curve) or a measured "
                                        "one (kvray.probe_calibrator, kvray.neighbour_calibrator)")
    tolerance: float = Field(description="the NLL-curve calibrator's tau; a measured calibrator's own (fitted) tau")
    context_nll: float = Field(description="the context's token-averaged NLL under the model")
    max_compression_ratio: float = Field(description="the largest ratio predicted to keep `tolerance` "
                                                     f"(at most {MAX_SERVED_RATIO})")
    retention: float = Field(description="1 - max_compression_ratio")
    predicted_quality: float | None = Field(None, description="the NLL curve at that ratio (predicted NLL ratio); "
                                                              "None for a measured calibrator")
    curve_b: float | None = Field(None, description="the curve parameter b = alpha * context_nll + beta; None for a "
                                                    "measured calibrator")
    probe_curve: dict[str, float] | None = Field(None, description="a measured calibrator's probe: compression ratio "
                                                                   "-> probe ratio (NLL of the context's spans, full / "
                                                                   "compressed)")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Strict):
    model: str | None = Field(None, description="accepted for compatibility; the server hosts one model")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    kv_policy: str | None = Field(None, description="kvray extension: a policy id from GET /v1/policies")
    compression_ratio: float | None = Field(None, ge=0.0, lt=1.0, allow_inf_nan=False, description=_RATIO_DOC)
    query_aware: bool | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="accepted; decoding is greedy")
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="accepted; decoding is greedy")
    seed: int | None = Field(None, description="accepted; decoding is greedy and deterministic")
    user: str | None = Field(None, max_length=256)
    n: int | None = Field(None, description="only 1")
    stream: bool | None = Field(None, description="server-sent events in OpenAI's chat.completion.chunk format; "
                                                  "the last chunk carries usage and the kv stats")
    stop: str | list[str] | None = Field(None, description="not supported (must be omitted)")

    @model_validator(mode="after")
    def _check(self) -> "ChatCompletionRequest":
        if self.n not in (None, 1):
            raise ValueError(f"n={self.n}: this server returns exactly one choice (n must be 1)")
        if self.stop not in (None, [], ""):
            raise ValueError("stop sequences are not supported: omit `stop` (generation ends at the "
                             "end-of-turn token or max_tokens)")
        if self.messages[-1].role != "user":
            raise ValueError(f"the last message must be the user's question, got role {self.messages[-1].role!r}")
        if not self.context().strip():
            raise ValueError("no context: send the text to compress (a system message, earlier messages, or "
                             "the user message itself)")
        total = sum(len(m.text()) for m in self.messages)
        if total > MAX_CONTEXT_CHARS + MAX_QUESTION_CHARS:
            raise ValueError(f"messages hold {total} characters; at most {MAX_CONTEXT_CHARS + MAX_QUESTION_CHARS}")
        return self

    @property
    def single(self) -> bool:
        """Only one message with text (e.g. one user message, as OpenAI clients send): it is the
        context, there is no separate question, and the whole prompt is compressed query-aware."""
        return not any(m.text().strip() for m in self.messages[:-1])

    def context(self) -> str:
        if self.single:
            return self.messages[-1].text()
        return "\n\n".join(t for t in (m.text() for m in self.messages[:-1]) if t.strip())

    def question(self) -> str:
        return "" if self.single else self.messages[-1].text()

    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_NEW_TOKENS


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    kv: KVStats
    kv_policy: str | None
    kv_method: str
    compression_ratio: float
    timing: Timing


class PolicyList(BaseModel):
    policies: list[dict[str, Any]] = Field(description="one summary per valid policy file")
    errors: list[dict[str, str]] = Field(description="policy files that could not be read, with why")


class Health(BaseModel):
    status: Literal["ok"]
    engine: dict[str, Any] | None = Field(None, description="the model replica's batching engine: active rows, "
                                                            "queued requests, KV bytes held / reserved vs budget")


# ----------------------------------------------------------------------------- the app


def _validation_detail(exc: RequestValidationError) -> tuple[str, list[dict]]:
    """One readable line per error (`field: message`), and the errors without the input echoed
    back (a rejected 400 kB context should not come back in the response)."""
    lines, errors = [], []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        msg = str(err.get("msg", "invalid input"))
        if err.get("type") == "extra_forbidden":
            msg = "unknown field (not part of this endpoint's request body; see /openapi.json)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        where = ".".join(loc)
        lines.append(f"{where}: {msg}" if where else msg)
        errors.append({"loc": loc, "msg": msg, "type": str(err.get("type", ""))})
    return "; ".join(lines), errors


def _unwrap(exc: BaseException) -> BaseException:
    cause = getattr(exc, "cause", None)  # Ray wraps a replica's exception; the original is `.cause`
    return cause if isinstance(cause, RequestError) else exc


def build_api(store_dir: str | os.PathLike | None = None, *, api_key: str | None = None,
              backend_provider: Callable[[], Backend] | None = None,
              request_timeout_s: float | None = None) -> FastAPI:
    """The FastAPI app. `store_dir`: the policy directory (default env KVRAY_POLICIES, else
    `runs/policies`); `api_key`: required in the `x-api-key` header (default env KVRAY_API_KEY;
    empty = none); `backend_provider`: returns the backend (see `get_backend`);
    `request_timeout_s`: bound on the model work per request (default env
    KVRAY_REQUEST_TIMEOUT_S, else 300 s) -> 504."""
    store = PolicyStore(Path(store_dir or os.environ.get("KVRAY_POLICIES") or DEFAULT_STORE))
    key = api_key if api_key is not None else os.environ.get("KVRAY_API_KEY", "")
    timeout = float(request_timeout_s if request_timeout_s is not None
                    else os.environ.get("KVRAY_REQUEST_TIMEOUT_S", DEFAULT_REQUEST_TIMEOUT_S))
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"request_timeout_s must be a positive number of seconds, got {timeout}")

    app = FastAPI(
        title="kvray", version=_version(),
        description="KV-cache compression policies over HTTP: generate, calibrate, OpenAI-compatible chat. "
                    "Errors are JSON {\"detail\": ...}.")
    app.state.backend_provider = backend_provider
    app.state.store = store

    scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                          description="required when the server is started with an API key")

    async def require_key(given: str | None = Security(scheme)) -> None:
        if given is None:
            raise HTTPException(401, f"missing {API_KEY_HEADER} header: this server requires an API key",
                                headers={"WWW-Authenticate": "ApiKey"})
        if not secrets.compare_digest(given.encode(), key.encode()):
            raise HTTPException(401, f"invalid API key in the {API_KEY_HEADER} header",
                                headers={"WWW-Authenticate": "ApiKey"})

    guarded = [Depends(require_key)] if key else []

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # JSON like every other error
        return JSONResponse(status_code=500, content={"detail": f"internal error: {type(exc).__name__}: {exc}"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        detail, errors = _validation_detail(exc)
        return JSONResponse(status_code=422, content={"detail": detail, "errors": errors})

    def load_policy(policy_id: str) -> Policy:
        try:
            return store.get(policy_id)
        except KeyError as exc:
            raise HTTPException(404, exc.args[0]) from None
        except ValueError as exc:  # a broken file on the server side
            raise HTTPException(500, f"policy {policy_id!r} cannot be read: {exc}") from None

    def resolve(policy_id: str | None, method: str | None, ratio: float | None, query_aware: bool | None,
                **rest) -> GenerateJob:
        policy = None
        if policy_id is not None:
            policy = load_policy(policy_id)
            if method is not None and method != policy.method:
                raise HTTPException(422, f"policy {policy_id!r} uses method {policy.method!r}, the request says "
                                         f"{method!r}: omit `method` with a policy, or omit `policy`")
            method = policy.method
            ratio = policy.compression_ratio if ratio is None else ratio
            query_aware = policy.query_aware if query_aware is None else query_aware
        else:
            method = method or DEFAULT_METHOD
            ratio = (0.0 if method == "full" else DEFAULT_RATIO) if ratio is None else ratio
        job = GenerateJob(method=method, compression_ratio=float(ratio), query_aware=bool(query_aware),
                          policy_id=policy_id, policy=policy.model_dump(mode="json") if policy else None, **rest)
        try:
            job.press()  # fail here, before the model is involved
        except ValueError as exc:
            raise HTTPException(422, f"cannot build the press: {exc}") from None
        return job

    async def run(coro, what: str):
        try:
            return await asyncio.wait_for(coro, timeout)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"{what} did not finish within {timeout:g} s") from None
        except RequestError as exc:
            exc = _unwrap(exc)
            raise HTTPException(exc.status_code, exc.detail) from None

    def timing(r: GenerateResult) -> Timing:
        return Timing(prefill_s=r.prefill_s, compress_s=r.compress_s, decode_s=r.decode_s, total_s=r.total_s,
                      ttft_s=r.ttft_s)

    async def engine_stats(request: Request) -> dict | None:
        provider = request.app.state.backend_provider
        backend = provider() if provider is not None else None
        stats = getattr(backend, "stats", None)
        if stats is None:
            return None
        try:
            out = stats()
            out = await out if asyncio.iscoroutine(out) else out
            return out or None
        except Exception:  # noqa: BLE001 -- a replica that cannot answer yet: liveness of the HTTP layer only
            return None

    @app.get("/healthz", response_model=Health, response_model_exclude_none=True, tags=["ops"])
    async def healthz(request: Request) -> Health:
        """Liveness of the HTTP layer (no API key needed), with the batching engine's gauges when
        a model replica answers; model replicas have their own health checks."""
        return Health(status="ok", engine=await engine_stats(request))

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def metrics(request: Request) -> PlainTextResponse:
        """Prometheus text format: the batching engine's gauges and counters (no API key needed)."""
        stats = await engine_stats(request) or {}
        lines = []
        for name, value in sorted(stats.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                kind = "counter" if name.startswith("requests_") or name == "steps" else "gauge"
                lines += [f"# TYPE kvray_engine_{name} {kind}", f"kvray_engine_{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/v1/policies", response_model=PolicyList, dependencies=guarded, tags=["policies"])
    async def list_policies() -> PolicyList:
        """Summaries of every policy in the store (re-read now)."""
        policies, errors = [], []
        for pid in store.ids():
            try:
                policies.append(policy_summary(store.get(pid)))
            except (KeyError, ValueError) as exc:  # deleted meanwhile, or broken
                errors.append({"policy_id": pid, "error": str(exc.args[0] if exc.args else exc)})
        return PolicyList(policies=policies, errors=errors)

    @app.get("/v1/policies/{policy_id}", dependencies=guarded, tags=["policies"])
    async def get_policy(policy_id: str) -> dict:
        """The full policy JSON (method, parameters, budget plan, calibrator, metrics, provenance)."""
        return load_policy(policy_id).model_dump(mode="json")

    def generate_response(job: GenerateJob, r: GenerateResult) -> GenerateResponse:
        return GenerateResponse(answer=r.answer, policy=job.policy_id, method=job.method,
                                compression_ratio=job.compression_ratio, query_aware=job.query_aware, model=r.model,
                                new_tokens=r.new_tokens, kv=kv_stats_of(r), timing=timing(r))

    async def open_stream(backend: Backend, job: GenerateJob):
        """The backend's event stream with its first event already there, so that bad input and
        overload are answered with their status code before a 200 stream starts."""
        events = backend.generate_stream(job).__aiter__()
        try:
            first = await run(events.__anext__(), "generation")
        except BaseException:
            await events.aclose()
            raise
        return first, events

    def sse(events, first, deadline: float, chunk: Callable, final: Callable):
        async def body():
            try:
                event = first
                while True:
                    if isinstance(event, GenerateResult):
                        for obj in final(event):
                            yield f"data: {json.dumps(obj)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    yield f"data: {json.dumps(chunk(event))}\n\n"
                    left = deadline - time.monotonic()
                    try:
                        event = await asyncio.wait_for(events.__anext__(), max(left, 1e-3))
                    except asyncio.TimeoutError:
                        yield f"data: {json.dumps({'error': {'message': f'generation did not finish within {timeout:g} s', 'code': 504}})}\n\n"
                        return
                    except RequestError as exc:
                        exc = _unwrap(exc)
                        yield f"data: {json.dumps({'error': {'message': exc.detail, 'code': exc.status_code}})}\n\n"
                        return
                    except StopAsyncIteration:
                        return
            finally:
                await events.aclose()  # a client that leaves takes its row out of the batch

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    @app.post("/v1/generate", response_model=GenerateResponse, dependencies=guarded, tags=["generate"])
    async def generate(req: GenerateRequest, backend: Backend = Depends(get_backend)):
        """Answer `question` about `context` with the context's KV cache compressed by `policy`
        (or `method` at `compression_ratio`); `stream: true` sends the answer as it is decoded."""
        job = resolve(req.policy, req.method, req.compression_ratio, req.query_aware, context=req.context,
                      question=req.question, max_new_tokens=req.max_new_tokens, answer_prefix=req.answer_prefix,
                      ignore_eos=req.ignore_eos)
        if not req.stream:
            return generate_response(job, await run(backend.generate(job), "generation"))
        deadline = time.monotonic() + timeout
        first, events = await open_stream(backend, job)
        return sse(events, first, deadline, chunk=lambda text: {"delta": text},
                   final=lambda r: [generate_response(job, r).model_dump(mode="json")])

    @app.post("/v1/calibrate", response_model=CalibrateResponse, dependencies=guarded, tags=["generate"])
    async def calibrate(req: CalibrateRequest, backend: Backend = Depends(get_backend)) -> CalibrateResponse:
        """The largest compression ratio predicted to keep `tolerance` of the quality on this
        context (one prefill to measure its NLL), from the policy's calibrator."""
        from ..calibration import CALIBRATOR_KIND, retention_curve

        if req.policy is None:
            calibrated = [p for p in store.ids() if _has_calibrator(store, p)]
            if len(calibrated) != 1:
                raise HTTPException(422, "name a `policy`: calibrated policies in the store: "
                                         f"{', '.join(calibrated) if calibrated else '(none)'}")
            policy = load_policy(calibrated[0])
        else:
            policy = load_policy(req.policy)
        try:
            cal = policy.calibrator_obj()
        except ValueError as exc:
            raise HTTPException(500, f"policy {policy.policy_id!r} has an unreadable calibrator: {exc}") from None
        if cal is None:
            calibrated = [p for p in store.ids() if _has_calibrator(store, p)]
            raise HTTPException(422, f"policy {policy.policy_id!r} has no calibrator (it was not calibrated); "
                                     f"calibrated policies: {', '.join(calibrated) if calibrated else '(none)'}")
        kind = policy.calibrator["kind"]
        if kind != CALIBRATOR_KIND:  # a measured calibrator: probe the context on the model
            if req.tolerance is not None:
                raise HTTPException(422, f"policy {policy.policy_id!r} has a measured calibrator ({kind}), fitted "
                                         f"for its own quality target (tau {cal.tau:g}, share {cal.target_share:g}); "
                                         "it takes no `tolerance`: leave it out")
            curve, nll = await run(backend.probe(req.context, policy.calibrator), "probing the context")
            ratio = min(max(float(cal.predict(curve, nll)), 0.0), MAX_SERVED_RATIO)
            return CalibrateResponse(policy=policy.policy_id, method=cal.method, calibrator=kind, tolerance=cal.tau,
                                     context_nll=float(nll), max_compression_ratio=ratio, retention=1.0 - ratio,
                                     probe_curve={f"{r:g}": float(v) for r, v in curve.items()})
        tau = cal.tau if req.tolerance is None else req.tolerance
        nll = float(await run(backend.context_nll(req.context), "measuring the context NLL"))
        ratio = min(max(float(cal.max_compression_ratio(nll, tau)), 0.0), MAX_SERVED_RATIO)
        b = float(cal.b(nll))
        return CalibrateResponse(policy=policy.policy_id, method=cal.method, calibrator=kind, tolerance=tau,
                                 context_nll=nll, max_compression_ratio=ratio, retention=1.0 - ratio,
                                 predicted_quality=float(retention_curve(1.0 - ratio, b)), curve_b=b)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, dependencies=guarded, tags=["openai"])
    async def chat(req: ChatCompletionRequest, backend: Backend = Depends(get_backend)):
        """OpenAI-compatible chat: the last user message is the question, the earlier messages the
        compressed context; a single message is the context itself, compressed whole (query-aware
        unless the request says otherwise). `kv_policy` (extension) picks the policy;
        `stream: true` sends chat.completion.chunk events."""
        n_new = req.new_tokens()
        aware = True if req.single and req.query_aware is None else req.query_aware
        job = resolve(req.kv_policy, None, req.compression_ratio, aware, context=req.context(),
                      question=req.question(), max_new_tokens=n_new)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def usage(r: GenerateResult) -> Usage:
            return Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.new_tokens,
                         total_tokens=r.prompt_tokens + r.new_tokens)

        def finish(r: GenerateResult) -> str:
            return "length" if r.finish_reason == "length" or r.new_tokens >= n_new else "stop"

        if not req.stream:
            r = await run(backend.generate(job), "generation")
            return ChatCompletionResponse(
                id=cid, created=created, model=r.model,
                choices=[ChatChoice(index=0, message=ChatChoiceMessage(content=r.answer), finish_reason=finish(r))],
                usage=usage(r), kv=kv_stats_of(r), kv_policy=job.policy_id, kv_method=job.method,
                compression_ratio=job.compression_ratio, timing=timing(r))
        deadline = time.monotonic() + timeout
        first, events = await open_stream(backend, job)
        model = getattr(backend, "model_name", None) or "kvray"
        started = []

        def chunk_of(delta: dict, finish_reason=None, **extra) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}

        def chunk(text: str) -> dict:
            delta = {"content": text} if started else {"role": "assistant", "content": text}
            started.append(True)
            return chunk_of(delta)

        def final(r: GenerateResult) -> list[dict]:
            out = [] if started else [chunk_of({"role": "assistant", "content": ""})]
            return out + [chunk_of({}, finish(r), usage=usage(r).model_dump(), kv=kv_stats_of(r).model_dump(),
                                   kv_policy=job.policy_id, kv_method=job.method,
                                   compression_ratio=job.compression_ratio, timing=timing(r).model_dump())]

        return sse(events, first, deadline, chunk=chunk, final=final)

    return app


def _has_calibrator(store: PolicyStore, policy_id: str) -> bool:
    try:
        return store.get(policy_id).calibrator is not None
    except (KeyError, ValueError):
        return False


def _version() -> str:
    from .. import __version__

    return __version__


__all__ = [
    "build_api", "get_backend", "ModelBackend", "GenerateJob", "GenerateResult", "RequestError", "Backend",
    "GenerateRequest", "GenerateResponse", "CalibrateRequest", "CalibrateResponse", "ChatCompletionRequest",
    "ChatCompletionResponse", "MAX_NEW_TOKENS", "MAX_CONTEXT_CHARS", "DEFAULT_STORE",
]

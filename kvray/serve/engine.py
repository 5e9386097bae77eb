"""Continuous batching on one model replica: the runtime's `Decoder` behind an asyncio API.

One engine thread owns the model. Between two decode steps it admits at most one waiting
request: prefill (the full cache of that prompt only), compress with the request's own press,
and the row joins the running batch; every step then decodes one token for every active row,
and a finished row leaves at once. Other model work (the context NLL of /v1/calibrate) runs in
the same thread between steps, so torch is never driven from two threads.

Admission is by KV bytes: each request reserves what its row will hold at most -- the
compressed prompt plus the tokens fed and generated after compression, and on the torch path
the padded copy its attention blocks hold (estimated from the method's ratio before the
prefill, corrected after compression) -- and waits (first come, first served) until the
reservations fit `kv_budget` (bytes). A policy at ratio r therefore admits
about 1 / (1 - r) times the rows of the full cache. The transient full cache of the one prompt
being prefilled is not counted. A request that could never fit is refused (413).

Rows that leave leave their entries alive in the re-packed batch (a re-pack copies nothing);
the decoder compacts the batch once what it keeps alive passes `COMPACT_ABOVE` times what its
rows use (`kv_bytes_referenced` vs `kv_bytes_held` in `stats()`).

Cancelling the awaiting coroutine (client gone, timeout) takes the row out of the batch at the
next step and frees its bytes; a request that fails (its press raises, say) fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import torch

log = logging.getLogger(__name__)

DEFAULT_MAX_ROWS = 64
#: the batch is compacted when it keeps alive more than this many times the bytes its rows use
#: (`Decoder.compact_above`): the entries and block slots of rows that left, spare tail room
COMPACT_ABOVE = 1.25


@dataclass(eq=False)
class _Request:
    job: Any
    press: Any
    prompt: Any
    reserve: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    row: Any = None
    prefill_s: float = 0.0
    compress_s: float = 0.0
    kv: dict | None = None
    cancelled: bool = False

    def emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


@dataclass(eq=False)
class _Call:
    fn: Callable
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class BatchingEngine:
    """See the module docstring. `kv_budget`: bytes of KV the batch may hold (default
    `kvray.generate.default_kv_budget`); `max_rows`: rows decoded together at most."""

    def __init__(self, lm, *, kv_budget: int | None = None, max_rows: int = DEFAULT_MAX_ROWS, impl: str = "auto"):
        from ..generate import default_kv_budget
        from ..runtime import Decoder

        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.lm = lm
        self.budget = int(kv_budget) if kv_budget is not None else default_kv_budget(lm.device)
        if self.budget < 1:
            raise ValueError(f"kv_budget must be >= 1 byte, got {kv_budget}")
        self.max_rows = int(max_rows)
        self.decoder = Decoder(lm, impl=impl, compact_above=COMPACT_ABOVE)
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._calls: deque[_Call] = deque()
        self._active: dict[int, _Request] = {}  # id(row) -> request
        self._reserved = 0
        self.counts = {"admitted": 0, "finished": 0, "failed": 0, "cancelled": 0, "rejected": 0}
        self.steps = 0
        self.peak_rows = 0  # most rows decoded together so far
        self.broken: str | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="kvray-engine", daemon=True)
        self._thread.start()

    # -- the asyncio side -------------------------------------------------------------------------

    def estimate(self, press, prompt, query_aware: bool, max_new_tokens: int) -> int:
        """Bytes a row of this request holds at most (before its prefill: from the target ratio;
        `Decoder.row_bytes` once compressed)."""
        n_comp = len(prompt) if query_aware else len(prompt.context)
        fed_after = 0 if query_aware else len(prompt.rest)
        return self.decoder.estimate_bytes(n_comp * (1.0 - press.target_ratio), fed_after, max_new_tokens)

    async def stream(self, job, press, prompt) -> AsyncIterator[tuple[str, Any]]:
        """Events of one request: ("token", id) per generated token, then ("done", info) with
        the row and its stats, or an exception raised. Cancelling the consumer cancels the row."""
        from .api import RequestError

        reserve = self.estimate(press, prompt, job.query_aware, job.max_new_tokens)
        if reserve > self.budget:
            self.counts["rejected"] += 1
            raise RequestError(f"this request needs about {reserve} bytes of KV cache and the replica's budget is "
                               f"{self.budget} bytes: shorten the context, compress more, or ask for fewer tokens",
                               413)
        loop = asyncio.get_running_loop()
        req = _Request(job, press, prompt, reserve, loop, asyncio.Queue())
        with self._cond:
            if self.broken:
                raise RuntimeError(f"model backend is unhealthy: {self.broken}")
            self._waiting.append(req)
            self._cond.notify()
        try:
            while True:
                kind, value = await req.events.get()
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "done":
                    return
        finally:
            self._cancel(req)

    def _cancel(self, req: _Request) -> None:
        with self._cond:
            req.cancelled = True
            if req in self._waiting:
                self._waiting.remove(req)
                self.counts["cancelled"] += 1
            elif req.row is not None and not req.row.done:
                req.row.cancel()
            self._cond.notify()

    async def call(self, fn: Callable, *args):
        """Run `fn(*args)` in the engine thread between two decode steps."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            self._calls.append(_Call(lambda: fn(*args), loop, fut))
            self._cond.notify()
        return await asyncio.shield(fut)

    def stats(self) -> dict:
        with self._cond:
            return {"active_rows": self.decoder.active, "queued_requests": len(self._waiting),
                    "kv_bytes_held": self.decoder.kv_bytes(), "kv_bytes_referenced": self.decoder.kv_bytes(True),
                    "kv_bytes_reserved": self._reserved,
                    "kv_budget_bytes": self.budget, "max_rows": self.max_rows, "peak_rows": self.peak_rows,
                    "steps": self.steps,
                    **{f"requests_{k}": v for k, v in self.counts.items()}}

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # -- the engine thread ------------------------------------------------------------------------

    def _can_admit(self) -> bool:
        """The first waiting request fits (first come, first served: the others wait behind it)."""
        if not self._waiting or self.decoder.active >= self.max_rows:
            return False
        return self._reserved + self._waiting[0].reserve <= self.budget or not self._active

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._calls or self._can_admit() or self.decoder.active):
                    self._cond.wait()
                if self._stop:
                    return
                call = self._calls.popleft() if self._calls else None
                req = self._waiting.popleft() if self._can_admit() else None
                if req is not None:
                    self._reserved += req.reserve
            if call is not None:
                self._run_call(call)
            if req is not None:
                self._admit(req)
            if self.decoder.active:
                self._step()

    def _run_call(self, call: _Call) -> None:
        try:
            result, exc = call.fn(), None
        except Exception as e:  # noqa: BLE001 -- handed to the caller
            result, exc = None, e
            self._check_device(e)

        def settle():
            if call.future.cancelled():
                return
            if exc is not None:
                call.future.set_exception(exc)
            else:
                call.future.set_result(result)

        call.loop.call_soon_threadsafe(settle)

    def _admit(self, req: _Request) -> None:
        from ..generate import compress
        from ..runtime import capture_window_for, hidden_needed_for, prefill

        if req.cancelled:
            self._release(req)
            return
        job, press = req.job, req.press
        try:
            with torch.inference_mode():
                t0 = time.perf_counter()
                pre = prefill(self.lm, req.prompt, capture_window=capture_window_for([press]),
                              with_question=job.query_aware, capture_hidden=hidden_needed_for([press]))
                req.prefill_s = time.perf_counter() - t0
                state = pre.state(job.query_aware)
                full_bytes, n_tokens = state.kv_bytes(), state.n_tokens
                heads = state.num_kv_heads * state.num_layers
                del state
                t0 = time.perf_counter()
                cache = compress(self.lm, pre, press, job.query_aware)
                req.compress_s = time.perf_counter() - t0
                rest, first = pre.rest(job.query_aware), pre.first_logits(job.query_aware)
                pre.cache = pre.hidden = None
                kept = cache.prefix_entries()
                req.kv = {"tokens_full": n_tokens, "tokens_kept": kept / heads, "bytes_full": full_bytes,
                          "bytes_kept": cache.prefix_nbytes(), "achieved_ratio": 1.0 - kept / (n_tokens * heads)}
                if cache.window_nbytes():  # a hybrid model's sliding layers, apart
                    req.kv["bytes_windowed"] = cache.window_nbytes()
                actual = self.decoder.row_bytes(cache, len(rest), job.max_new_tokens)
                row = self.decoder.add(cache, feed=rest, first_logits=first, max_new_tokens=job.max_new_tokens,
                                       key=req, ignore_stop_tokens=job.ignore_eos,
                                       after_step=press.after_step if press.evicts_during_decoding else None,
                                       on_token=lambda row, tok: req.emit("token", tok))[0]
            with self._cond:  # the reservation becomes what the row really needs
                self._reserved += actual - req.reserve
                req.reserve, req.row = actual, row
                self._active[id(row)] = req
                self.counts["admitted"] += 1
                self.peak_rows = max(self.peak_rows, len(self._active))
                if req.cancelled:
                    row.cancel()
        except Exception as exc:  # noqa: BLE001 -- this request fails alone
            self._check_device(exc)
            self._release(req)
            self.counts["failed"] += 1
            req.emit("error", exc)

    def _step(self) -> None:
        try:
            finished = self.decoder.step()
        except Exception as exc:  # noqa: BLE001 -- the decoder fails rows itself; this is a bug or the device
            self._check_device(exc)
            log.exception("decode step failed")
            with self._cond:
                rows = list(self._active.values())
            for req in rows:
                req.row.cancel()
                self._release(req)
                req.emit("error", exc)
            self.decoder = type(self.decoder)(self.lm, impl=self.decoder.impl)
            return
        self.steps += 1
        for row in finished:
            req = self._active.get(id(row))
            if req is None:
                continue
            self._release(req)
            if row.finish_reason == "error":
                self.counts["failed"] += 1
                self._check_device(row.error)
                req.emit("error", row.error)
            elif row.finish_reason == "cancelled":
                self.counts["cancelled"] += 1
            else:
                self.counts["finished"] += 1
                req.emit("done", req)

    def _release(self, req: _Request) -> None:
        with self._cond:
            if req.row is not None:
                self._active.pop(id(req.row), None)
            self._reserved -= req.reserve
            req.reserve = 0

    def _check_device(self, exc: BaseException | None) -> None:
        if exc is not None and "CUDA error" in str(exc):  # a device-side assert poisons the context
            self.broken = str(exc).splitlines()[0][:200]

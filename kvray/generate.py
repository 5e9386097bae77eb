"""Prefill -> compress -> decode, with stats: `kvray.generate` and `run_configs` (every config
of one prefill decoded together), both on the runtime's decoder (`kvray.runtime`)."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import torch

from .cache import KVRayCache
from .models import LanguageModel
from .presses import Press, make_press, press_class
from .runtime import (DEFAULT_CAPTURE_WINDOW, Decoder, Prefill, PromptTokens, build_prompt, capture_window_for,
                      hidden_needed_for, prefill, stop_token_ids)

__all__ = ["GenerationStats", "GenerationOutput", "generate", "run_configs", "run_config", "greedy_decode",
           "greedy_decode_batch", "peak_memory_bytes", "default_kv_budget", "compress",
           # the runtime's pieces most callers want, under their usual names
           "DEFAULT_CAPTURE_WINDOW", "Prefill", "PromptTokens", "build_prompt", "capture_window_for",
           "hidden_needed_for", "prefill", "stop_token_ids"]


@torch.inference_mode()
def greedy_decode_batch(lm: LanguageModel, cache: KVRayCache, rest: list[int], max_new_tokens: int,
                        first_logits: torch.Tensor | None = None, *,
                        after_step: Callable[[KVRayCache, int], None] | None = None,
                        ignore_stop_tokens: bool = False) -> list[list[int]]:
    """Greedy decoding of every row of a (batched) cache on the decoder: feed `rest` to all rows
    (or start from `first_logits`, shared, when `rest` is empty), then one token per row per
    step until each row hits a stop token or `max_new_tokens`.

    after_step: called as `after_step(cache, step)` after every forward pass (step 0 is the
        first: `rest`, or the first generated token), e.g. a press that evicts while decoding.
    ignore_stop_tokens: decode exactly `max_new_tokens` tokens whatever they are."""
    dec = Decoder(lm)
    rows = dec.add(cache, feed=rest, first_logits=first_logits, max_new_tokens=max_new_tokens,
                   after_step=after_step, ignore_stop_tokens=ignore_stop_tokens)
    dec.run()
    for r in rows:
        if r.error is not None:
            raise r.error
    return [r.tokens for r in rows]


def greedy_decode(lm: LanguageModel, cache: KVRayCache, rest: list[int], max_new_tokens: int,
                  first_logits: torch.Tensor | None = None, *,
                  after_step: Callable[[KVRayCache, int], None] | None = None,
                  ignore_stop_tokens: bool = False) -> list[int]:
    """Feed `rest` on `cache` (or start from `first_logits` when `rest` is empty), then decode
    greedily until a stop token or `max_new_tokens` (see `greedy_decode_batch`)."""
    return greedy_decode_batch(lm, cache, rest, max_new_tokens, first_logits, after_step=after_step,
                               ignore_stop_tokens=ignore_stop_tokens)[0]


@dataclass
class GenerationStats:
    kv_tokens_full: int        # context tokens before compression
    kv_tokens_kept: float      # entries kept per (layer, KV head), on average
    kv_bytes_full: int         # bytes the full context KV takes
    kv_bytes_kept: int         # bytes the compressed cache's tensors really hold (before decoding)
    compression_ratio: float   # achieved: 1 - kept entries / full entries
    prefill_s: float
    compress_s: float
    decode_s: float
    new_tokens: int
    peak_mem_bytes: int
    #: hybrid models (sliding + full layers): bytes the sliding layers hold, each keeping its
    #: window; the fields above count the compressed (full-attention) layers only. 0 otherwise.
    kv_bytes_windowed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationOutput:
    text: str
    stats: GenerationStats
    token_ids: list[int]


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def default_kv_budget(device: torch.device) -> int:
    """KV bytes the decoder may hold at once by default: half the free accelerator memory on
    CUDA; on a CPU a quarter of the machine's memory, at most 4 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 * 2**30
    return int(min(total // 4, 4 * 2**30))


def compress(lm: LanguageModel, pre: Prefill, press: Press, query_aware: bool) -> KVRayCache:
    """The compressed cache of one press on one prefill (the prefill is not modified)."""
    return press.compress_prefill(lm, pre, query_aware)  # presses without the model: compress(pre.state(...))


def compressed(lm: LanguageModel, pres: Prefill | Sequence[Prefill], presses: Sequence[Press],
               protocols: Sequence[bool]) -> Iterator[tuple[KVRayCache, float]]:
    """(cache, seconds) of each press in its protocol on its prefill (`pres`: one for all, or one
    per press), in order, made one at a time as they are asked for; except presses of one
    prefill and protocol that share a `together_key` (e.g. LAQ at several ratios): those are
    made in one `compress_together` call when the first of them is asked for, share its time,
    and wait for their turn."""
    pres = [pres] * len(presses) if isinstance(pres, Prefill) else list(pres)
    groups: dict[tuple, list[int]] = {}
    for i, (pre, press, aware) in enumerate(zip(pres, presses, protocols)):
        key = press.together_key()
        if key is not None:
            groups.setdefault((id(pre), bool(aware), key), []).append(i)
    together = {i: members for members in groups.values() if len(members) > 1 for i in members}
    ready: dict[int, tuple[KVRayCache, float]] = {}
    for i, (pre, press, aware) in enumerate(zip(pres, presses, protocols)):
        if i not in ready:
            members = together.get(i, [i])
            t0 = time.perf_counter()
            if len(members) > 1:
                caches = type(press).compress_together(lm, pre, aware, [presses[j] for j in members])
            else:
                caches = [compress(lm, pre, press, aware)]
            share = (time.perf_counter() - t0) / len(members)
            ready.update({j: (cache, share) for j, cache in zip(members, caches)})
        yield ready.pop(i)


class ConfigRuns:
    """Configs decoding together on one `Decoder`, added a prefill's worth at a time (`add`),
    each group's outputs ready as soon as its last row is done: what `run_configs`
    does in one call, and what lets an evaluation admit the next sample's configs while the
    last one's long answers still decode (`ModelHost.evaluate_stream`). `finished` names the
    groups done, and `outputs` hands a group's results over.

    Each add compresses a copy of the prefill cache with each press; the caches join the
    running batch as they are made, while the KV bytes the decoder holds stay within
    `kv_budget` (default `default_kv_budget`); a row leaves the batch as soon as it is done.
    Decoding a small model is bound by reading its weights, so a batch of configs costs little
    more than one. `decode_s` is each row's share of the forwards it took part in. Presses that
    evict while decoding (`evicts_during_decoding`, e.g. MorphKV) are decoded in a lane of their
    own with their `after_step` hook, one lane for those of a prefill, protocol and token limit
    that share a `lane_key` (MorphKV at several ratios: one forward per step)."""

    def __init__(self, lm: LanguageModel, kv_budget: int | None = None, impl: str = "auto",
                 ignore_eos: bool = False):
        self.budget = default_kv_budget(lm.device) if kv_budget is None else int(kv_budget)
        if self.budget < 1:
            raise ValueError(f"kv_budget must be >= 1 byte, got {kv_budget}")
        self.lm, self.ignore_eos = lm, ignore_eos
        self.dec = Decoder(lm, impl=impl)
        self._groups: dict[int, list] = {}  # handle -> per config (row, stats...), until collected
        self._open: dict[int, int] = {}  # handle -> rows not yet done
        self._handle_of: dict[int, int] = {}  # id(row) -> its group's handle
        self._done: list[int] = []
        self._next_handle = 0

    @property
    def active(self) -> int:
        """Rows still decoding."""
        return self.dec.active

    def add(self, pre: Prefill | Sequence[Prefill], presses: list[Press], query_aware: bool | list[bool],
            max_new_tokens: int | Sequence[int], release_prefill: bool = False) -> int:
        """Compress and add one group of configs; returns its handle (see `run_configs` for the
        arguments). Steps the decoder while the new rows would not fit the budget."""
        lm, dec = self.lm, self.dec
        n = len(presses)
        protocols = [bool(query_aware)] * n if isinstance(query_aware, bool) else [bool(q) for q in query_aware]
        pres = [pre] * n if isinstance(pre, Prefill) else list(pre)
        limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
        for what, got in (("protocols", protocols), ("prefills", pres), ("max_new_tokens", limits)):
            if len(got) != n:
                raise ValueError(f"{n} presses but {len(got)} {what}")
        sizes = {}
        for p, aware in zip(pres, protocols):  # (tokens, full bytes, heads x layers x batch) per prefill and protocol
            if (id(p), aware) not in sizes:
                st = p.state(aware)
                sizes[id(p), aware] = (st.n_tokens, st.kv_bytes(), st.num_kv_heads * st.num_layers * st.batch)
        last_use = {id(p): i for i, p in enumerate(pres)}
        # presses that evict while decoding and may share a lane (same prefill, protocol, token limit and
        # `lane_key`, e.g. MorphKV at several ratios): their caches wait until the last of them is made,
        # then join as one
        lanes: dict[tuple, list[int]] = {}
        for i, (p, press, aware, limit) in enumerate(zip(pres, presses, protocols, limits)):
            key = press.lane_key() if press.evicts_during_decoding else None
            if key is not None:
                lanes.setdefault((id(p), aware, limit, key), []).append(i)
        lane_of = {i: key for key, members in lanes.items() for i in members}
        waiting: dict[tuple, list] = {}
        handle = self._next_handle
        self._next_handle += 1
        made: list[tuple | None] = [None] * n
        self._groups[handle], self._open[handle] = made, n
        making = compressed(lm, pres, presses, protocols)
        for i, (p, press, aware, limit) in enumerate(zip(pres, presses, protocols, limits)):
            rest, first = p.rest(aware), p.first_logits(aware)
            n_tokens, full_bytes, heads = sizes[id(p), aware]
            cache, compress_s = next(making)
            if release_prefill and i == last_use[id(p)]:
                p.cache = p.hidden = None
            stats = (n_tokens, full_bytes, heads, p.prefill_s, compress_s, cache.prefix_entries(),
                     cache.prefix_nbytes(), cache.window_nbytes())
            members = [i]
            if i in lane_of:
                key = lane_of[i]
                waiting.setdefault(key, []).append((cache, stats))
                if i != lanes[key][-1]:
                    continue
                members = lanes[key]
                caches, member_stats = zip(*waiting.pop(key))
                cache = press.merge_lane(list(caches))
            else:
                member_stats = [stats]
            # room for these rows (their prefixes plus the tokens they will add), else decode until there is
            need = dec.row_bytes(cache, len(rest), limit)
            while dec.active and dec.kv_bytes() + need > self.budget:
                self.step()
            rows = dec.add(cache, feed=rest, first_logits=first, max_new_tokens=limit,
                           ignore_stop_tokens=self.ignore_eos,
                           after_step=press.after_step if press.evicts_during_decoding else None)
            for j, row, st in zip(members, rows, member_stats):
                made[j] = (row,) + st
                self._handle_of[id(row)] = handle
            del cache
        return handle

    def step(self) -> None:
        """One decode step (`finished` then names the groups it completed)."""
        for row in self.dec.step():
            h = self._handle_of.pop(id(row), None)
            if h is not None:
                self._open[h] -= 1
                if not self._open[h]:
                    self._done.append(h)

    def finished(self) -> list[int]:
        """The handles of the groups whose last row finished since the last call (while `add`
        made room too)."""
        done, self._done = self._done, []
        return done

    def outputs(self, handle: int) -> list[GenerationOutput]:
        """A finished group's outputs, in the order of its presses (raises the error a row
        failed with); the group is forgotten."""
        made = self._groups.pop(handle)
        del self._open[handle]
        peak = peak_memory_bytes(self.lm.device)
        outputs = []
        for row, n_tokens, full_bytes, heads, prefill_s, compress_s, kept_entries, kept_bytes, windowed_bytes in made:
            if row.error is not None:
                raise row.error
            stats = GenerationStats(
                kv_tokens_full=n_tokens, kv_tokens_kept=kept_entries / heads, kv_bytes_full=full_bytes,
                kv_bytes_kept=kept_bytes, compression_ratio=1.0 - kept_entries / (n_tokens * heads),
                prefill_s=prefill_s, compress_s=compress_s, decode_s=row.decode_s, new_tokens=len(row.tokens),
                peak_mem_bytes=peak, kv_bytes_windowed=windowed_bytes)
            outputs.append(GenerationOutput(text=self.lm.tokenizer.decode(row.tokens, skip_special_tokens=True),
                                            stats=stats, token_ids=row.tokens))
        return outputs


def run_configs(lm: LanguageModel, pre: Prefill | Sequence[Prefill], presses: list[Press],
                query_aware: bool | list[bool], max_new_tokens: int | Sequence[int], kv_budget: int | None = None,
                release_prefill: bool = False, impl: str = "auto", ignore_eos: bool = False) -> list[GenerationOutput]:
    """Compress a copy of the prefill cache with each press and decode them all on one
    `Decoder` (`ConfigRuns`, one group).

    `pre`: one prefill for all presses, or one per press (rows of different prompts then share
    the batch: e.g. a Tune trial's samples). `query_aware` and `max_new_tokens`: one for all
    presses, or one per press (both protocols of a sample then share the decoder). Outputs keep
    the order of `presses`. With `release_prefill` each prefill's full cache is dropped once its
    last config is compressed (real memory savings when nothing else shares the prefill).
    `ignore_eos`: decode exactly `max_new_tokens` tokens."""
    runs = ConfigRuns(lm, kv_budget, impl, ignore_eos)
    handle = runs.add(pre, presses, query_aware, max_new_tokens, release_prefill)
    while runs.active:
        runs.step()
    return runs.outputs(handle)


def run_config(lm: LanguageModel, pre: Prefill, press: Press, query_aware: bool,
               max_new_tokens: int, release_prefill: bool = False, ignore_eos: bool = False) -> GenerationOutput:
    """One press on the prefill cache (see `run_configs`)."""
    return run_configs(lm, pre, [press], query_aware, max_new_tokens, release_prefill=release_prefill,
                       ignore_eos=ignore_eos)[0]


def resolve_press(press: Press | str | None, compression_ratio: float | None = None) -> Press:
    """A press from a Press, a method name (with `compression_ratio`), or None (the full cache)."""
    if isinstance(press, Press):
        if compression_ratio is not None:
            raise ValueError("compression_ratio goes with a method name; this press already has its ratio "
                             f"({press.target_ratio})")
        return press
    if press is None or press == "full":
        if compression_ratio:
            raise ValueError("the full cache removes nothing: pass a method with compression_ratio")
        return make_press("full")
    if not isinstance(press, str):
        raise TypeError(f"press must be a kvray.Press, a method name or None, got {type(press).__name__}")
    press_class(press)  # an unknown name says so first
    if compression_ratio is None:
        raise ValueError(f"press={press!r} without compression_ratio would compress nothing: pass "
                         f"compression_ratio= (e.g. 0.5), or kvray.make_press({press!r}, ...)")
    return make_press(press, compression_ratio=compression_ratio)


def generate(lm: LanguageModel, context: str, question: str = "", *, press: Press | str | None = None,
             compression_ratio: float | None = None, answer_prefix: str = "", max_new_tokens: int = 32,
             query_aware: bool = False, ignore_eos: bool = False) -> GenerationOutput:
    """Greedy answer to `question` about `context` with the context's KV cache compressed by
    `press` (a Press; a method name with `compression_ratio`; or None for the full cache).

    query_aware=False (kvpress's default): the context is compressed before the question is
    seen; True: the question is part of the compressed prompt (as in the SnapKV paper).
    `ignore_eos`: decode exactly `max_new_tokens` tokens, past the end-of-turn token."""
    press = resolve_press(press, compression_ratio)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt = build_prompt(lm.tokenizer, context, question, answer_prefix)
    pre = prefill(lm, prompt, capture_window=capture_window_for([press]), with_question=query_aware,
                  capture_hidden=hidden_needed_for([press]))
    return run_config(lm, pre, press, query_aware, max_new_tokens, release_prefill=True, ignore_eos=ignore_eos)

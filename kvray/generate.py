"""Prefill -> compress -> decode, with stats: `kvray.generate` and the pieces the runner reuses
(one prefill serves every compression config of a sample, in both protocols)."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .cache import KVRayCache, enable_kvray_attention, ATTN_IMPLEMENTATION
from .models import LanguageModel
from .presses import LayerInputs, PrefillState, Press, make_press

DEFAULT_CAPTURE_WINDOW = 64


@dataclass(frozen=True)
class PromptTokens:
    """Token ids of the prompt in kvpress's layout: the chat template holds one user turn
    `context + question`, the assistant turn starts with `answer_prefix`."""

    context: list[int]   # template prefix + context: compressed in both protocols
    question: list[int]  # the question
    suffix: list[int]    # end of the user turn, assistant header, answer_prefix
    # question + suffix are fed after compression (query-agnostic) or compressed too (query-aware)
    template_suffix: tuple = ()  # the suffix without the answer prefix (which may name the query's key)


def build_prompt(tokenizer, context: str, question: str, answer_prefix: str = "") -> PromptTokens:
    sep = "" if not question or question[:1].isspace() else "\n\n"
    q_text = sep + question
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": context + q_text}], add_generation_prompt=True, tokenize=False
        )
        start = text.find(context + q_text)
        if start < 0:
            raise ValueError("the chat template changed the user message; cannot split context and question")
        ctx_end = start + len(context)
        q_end = ctx_end + len(q_text)
        ctx_str, q_str, template_str = text[:ctx_end], text[ctx_end:q_end], text[q_end:]
    else:
        ctx_str, q_str, template_str = context, q_text, "\n"
    suffix_str = template_str + answer_prefix

    def enc(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False).input_ids if s else []

    ids = PromptTokens(enc(ctx_str), enc(q_str), enc(suffix_str), tuple(enc(template_str)))
    if not ids.context:
        raise ValueError("empty context: nothing to compress")
    return ids


@dataclass
class Prefill:
    """The full cache after prefilling the context (+ the rest of the prompt), and the scorer
    views per protocol."""

    cache: KVRayCache
    prompt: PromptTokens
    n_context: int          # tokens compressed in the query-agnostic protocol
    n_aware: int            # tokens compressed in the query-aware protocol (the whole prompt)
    aware_logits: torch.Tensor | None  # next-token logits at the end of the whole prompt (full cache)
    agnostic_queries: list  # per layer (queries, positions) at the end of the context
    prefill_s: float
    modules: list
    hidden: list | None = None  # per layer [B, n_aware, D] attention inputs (capture_hidden only)

    def state(self, query_aware: bool) -> PrefillState:
        n = self.n_aware if query_aware else self.n_context
        n_q = len(self.prompt.question)
        question = (self.n_context, self.n_context + n_q) if query_aware and n_q and self.n_aware > self.n_context else None
        layers = []
        for i, layer in enumerate(self.cache.layers):
            if query_aware:
                q, qpos = layer.window_queries, layer.window_positions
            else:
                q, qpos = self.agnostic_queries[i]
            hidden = self.hidden[i][:, :n] if self.hidden is not None else None
            layers.append(LayerInputs(i, layer.keys[:, :, :n], layer.values[:, :, :n], q, qpos, self.modules[i],
                                      hidden=hidden, question=question))
        return PrefillState(layers, n)

    def rest(self, query_aware: bool) -> list[int]:
        """Tokens fed on the compressed cache before generation starts."""
        return [] if query_aware else self.prompt.question + self.prompt.suffix

    def first_logits(self, query_aware: bool) -> torch.Tensor | None:
        """Logits of the first answer token when nothing is fed after compression."""
        return self.aware_logits if query_aware else None


def _attention_modules(model) -> list:
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


def _check_ready(lm: LanguageModel) -> None:
    if lm.model.config._attn_implementation != ATTN_IMPLEMENTATION:
        enable_kvray_attention(lm.model)


def _forward(model, rows: list[list[int]], cache: KVRayCache, device) -> torch.Tensor:
    """Feed one list of ids per batch row on `cache`; returns the last position's logits [B, vocab]."""
    x = torch.tensor(rows, device=device)
    return model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


@contextmanager
def _attention_inputs(modules: list, enabled: bool):
    """While active and `enabled`, record each attention module's input (the hidden states after
    the input layernorm): yields per layer the list of [B, T, D] pieces, one per forward."""
    pieces: list[list[torch.Tensor]] = [[] for _ in modules]

    def keep(i):
        def hook(module, args, kwargs):
            pieces[i].append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
        return hook

    handles = [m.register_forward_pre_hook(keep(i), with_kwargs=True) for i, m in enumerate(modules)] if enabled else []
    try:
        yield pieces
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def prefill(lm: LanguageModel, prompt: PromptTokens, capture_window: int = DEFAULT_CAPTURE_WINDOW,
            with_question: bool = True, capture_hidden: bool = False) -> Prefill:
    """Prefill once, with a full cache that also keeps each layer's last `capture_window`
    post-RoPE queries: the context, then (`with_question`) the rest of the prompt (whose queries
    are all kept, however long: the question's rows are an observation window too).

    Query-agnostic configs compress the context only and feed question + suffix afterwards;
    query-aware configs compress the whole prompt -- context, question, end of the user turn,
    assistant header and answer prefix -- as SnapKV's own code does, so the observation window
    ends where generation starts, and the first answer token comes from the prefill's logits.

    `capture_hidden` also keeps every attention module's input over the prompt (as much memory
    as the queries of all tokens) for presses with `needs_hidden` (see `hidden_needed_for`)."""
    _check_ready(lm)
    n_ctx = len(prompt.context)
    total = n_ctx + len(prompt.question) + len(prompt.suffix)
    if lm.max_context and total > lm.max_context:
        raise ValueError(f"prompt is {total} tokens; {lm.name} supports at most {lm.max_context}")
    cache = KVRayCache.empty(lm.num_layers, capture_window=capture_window)
    modules = _attention_modules(lm.model)
    with _attention_inputs(modules, capture_hidden) as pieces:
        t0 = time.perf_counter()
        _forward(lm.model, [prompt.context], cache, lm.device)
        agnostic = [(layer.window_queries, layer.window_positions) for layer in cache.layers]
        n_aware, aware_logits = n_ctx, None
        rest = prompt.question + prompt.suffix
        if with_question and rest:
            for layer in cache.layers:  # every question row, for scorers that read the question (observation="question")
                layer.capture_window = max(capture_window, len(rest))
            aware_logits = _forward(lm.model, [rest], cache, lm.device)[0]
            n_aware += len(rest)
        prefill_s = time.perf_counter() - t0
    for layer in cache.layers:
        layer.capture_window = 0
    hidden = [p[0] if len(p) == 1 else torch.cat(p, dim=1) for p in pieces] if capture_hidden else None
    return Prefill(cache, prompt, n_ctx, n_aware, aware_logits, agnostic, prefill_s, modules, hidden)


def stop_token_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return ids


@torch.inference_mode()
def greedy_decode_batch(lm: LanguageModel, cache: KVRayCache, rest: list[int], max_new_tokens: int,
                        first_logits: torch.Tensor | None = None, *,
                        after_step: Callable[[KVRayCache, int], None] | None = None,
                        ignore_stop_tokens: bool = False) -> list[list[int]]:
    """Greedy decoding of every row of a (batched) cache: feed `rest` to all rows (or start
    from `first_logits`, shared, when `rest` is empty), then one token per row per step until
    each row hits a stop token or `max_new_tokens`. Finished rows keep being fed a stop token
    (their outputs are ignored) so all rows stay aligned.

    after_step: called as `after_step(cache, step)` after every forward pass (step 0 is the
        first: `rest`, or the first generated token), e.g. a press that evicts while decoding.
    ignore_stop_tokens: decode exactly `max_new_tokens` tokens whatever they are."""
    stops = set() if ignore_stop_tokens else stop_token_ids(lm.tokenizer)
    n = cache.layers[0].prefix.batch if cache.layers[0].prefix is not None else 1
    forwards = 0
    if rest:
        logits = _forward(lm.model, [rest] * n, cache, lm.device)
        if after_step is not None:
            after_step(cache, forwards)
        forwards += 1
    elif first_logits is not None:
        logits = first_logits.expand(n, -1)
    else:
        raise ValueError("nothing to decode from: pass the tokens to feed or the first logits")
    outs: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    filler = next(iter(stops)) if stops else 0
    for step in range(max_new_tokens):
        toks = logits.argmax(-1).tolist()
        for i, t in enumerate(toks):
            if not done[i]:
                if t in stops:
                    done[i] = True
                else:
                    outs[i].append(t)
        if all(done) or step == max_new_tokens - 1:
            break
        logits = _forward(lm.model, [[filler if done[i] else toks[i]] for i in range(n)], cache, lm.device)
        if after_step is not None:
            after_step(cache, forwards)
        forwards += 1
    return outs


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


def run_configs(lm: LanguageModel, pre: Prefill, presses: list[Press], query_aware: bool,
                max_new_tokens: int, decode_batch: int = 16, release_prefill: bool = False) -> list[GenerationOutput]:
    """Compress a copy of the prefill cache with each press, then decode the compressed caches
    `decode_batch` at a time as one batch (decoding a small model is bound by reading its
    weights, so a batch of configs costs little more than one). `decode_s` is the batch's wall
    time divided by its size. Presses that evict while decoding (`evicts_during_decoding`, e.g.
    MorphKV) are decoded alone, after the batches, with their `after_step` hook; outputs keep
    the order of `presses`. With `release_prefill` the full cache is dropped once the last
    configs are compressed (real memory savings when nothing else shares the prefill)."""
    if decode_batch < 1:
        raise ValueError(f"decode_batch must be >= 1, got {decode_batch}")
    state = pre.state(query_aware)
    rest, first = pre.rest(query_aware), pre.first_logits(query_aware)
    full_bytes = state.kv_bytes()
    n_tokens, heads, n_layers, batch = state.n_tokens, state.num_kv_heads, state.num_layers, state.batch
    full_entries = n_tokens * heads * n_layers * batch
    solo = [i for i, p in enumerate(presses) if getattr(p, "evicts_during_decoding", False)]
    shared = [i for i in range(len(presses)) if i not in solo]
    groups = [shared[s:s + decode_batch] for s in range(0, len(shared), decode_batch)] + [[i] for i in solo]
    outputs: list[GenerationOutput | None] = [None] * len(presses)
    for g, group in enumerate(groups):
        # compress only the configs decoded together: at most `decode_batch` caches live at once
        chunk = []
        for press in (presses[i] for i in group):
            t0 = time.perf_counter()
            cache = press.compress_prefill(lm, pre, query_aware) if press.needs_model else press.compress(state)
            chunk.append((cache, time.perf_counter() - t0, cache.prefix_entries(), cache.prefix_nbytes()))
        if release_prefill and g == len(groups) - 1:
            state = None
            pre.cache = pre.hidden = None
        merged = KVRayCache.stack([c[0] for c in chunk]) if len(chunk) > 1 else chunk[0][0]
        chunk = [(None, *c[1:]) for c in chunk]  # the stacked copy is all that stays alive
        after_step = presses[group[0]].after_step if group[0] in solo else None
        t0 = time.perf_counter()
        ids_per_row = greedy_decode_batch(lm, merged, rest, max_new_tokens, first, after_step=after_step)
        decode_s = (time.perf_counter() - t0) / len(chunk)
        del merged
        peak = peak_memory_bytes(lm.device)
        for i, (_, compress_s, kept_entries, kept_bytes), ids in zip(group, chunk, ids_per_row):
            stats = GenerationStats(
                kv_tokens_full=n_tokens, kv_tokens_kept=kept_entries / (heads * n_layers * batch),
                kv_bytes_full=full_bytes, kv_bytes_kept=kept_bytes,
                compression_ratio=1.0 - kept_entries / full_entries, prefill_s=pre.prefill_s,
                compress_s=compress_s, decode_s=decode_s, new_tokens=len(ids), peak_mem_bytes=peak)
            outputs[i] = GenerationOutput(text=lm.tokenizer.decode(ids, skip_special_tokens=True),
                                          stats=stats, token_ids=ids)
    return outputs


def run_config(lm: LanguageModel, pre: Prefill, press: Press, query_aware: bool,
               max_new_tokens: int, release_prefill: bool = False) -> GenerationOutput:
    """One press on the prefill cache (see `run_configs`)."""
    return run_configs(lm, pre, [press], query_aware, max_new_tokens, release_prefill=release_prefill)[0]


def capture_window_for(presses: list[Press]) -> int:
    sizes = [getattr(p, "window_size", 0) for p in presses]
    sizes += [getattr(getattr(p, "inner", None), "window_size", 0) for p in presses]
    return max([DEFAULT_CAPTURE_WINDOW, *sizes])


def hidden_needed_for(presses: list[Press]) -> bool:
    """Whether any press (or the scorer it wraps) reads the layers' hidden states."""
    return any(getattr(p, "needs_hidden", False) or getattr(getattr(p, "inner", None), "needs_hidden", False)
               for p in presses)


def generate(lm: LanguageModel, context: str, question: str = "", *, press: Press | str | None = None,
             answer_prefix: str = "", max_new_tokens: int = 32, query_aware: bool = False) -> GenerationOutput:
    """Greedy answer to `question` about `context` with the context's KV cache compressed by
    `press` (a Press, a method name, or None for the full cache).

    query_aware=False (kvpress's default): the context is compressed before the question is
    seen; True: the question is part of the compressed prompt (as in the SnapKV paper)."""
    if press is None:
        press = make_press("full")
    elif isinstance(press, str):
        press = make_press(press)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt = build_prompt(lm.tokenizer, context, question, answer_prefix)
    pre = prefill(lm, prompt, capture_window=capture_window_for([press]), with_question=query_aware,
                  capture_hidden=hidden_needed_for([press]))
    return run_config(lm, pre, press, query_aware, max_new_tokens, release_prefill=True)

"""Long-generation evaluation of KV-cache compression, for methods that also evict while decoding:
teacher-forced NLL of a long reference continuation fed one token at a time on the compressed
cache (`continuation_nll`), and a table of that NLL next to niah_list recall (`compare_long_generation`).

Decode-time presses (`evicts_during_decoding`, e.g. MorphKV) are driven exactly as `kvray.generate`
drives them while generating: after every forward pass on the compressed cache the press's
`after_step(cache, step)` runs (step 0 is the first forward), so the continuation sees the
cache the press would leave behind during generation. Prefill-time presses get no hook: their
cache only grows by the fed tokens.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

import torch

from ..cache import KVRayCache
from ..generate import compress, run_configs
from ..runtime import (Decoder, Prefill, PromptTokens, build_prompt, capture_window_for, hidden_needed_for,
                       prefill)
from ..models import LanguageModel
from ..presses import Press, list_methods, make_press
from . import haystack as hs
from .metrics import score_sample
from .tasks import make_samples

DEFAULT_SEGMENT = 100


# ----------------------------------------------------------------------------- inputs


def raw_prompt(context_ids: Sequence[int]) -> PromptTokens:
    """A prompt of raw token ids (no chat template): everything but the last token is the
    context that gets compressed; the last token is what the query-agnostic protocol feeds on
    the compressed cache to predict the first continuation token (as it feeds the question
    and answer header of a chat prompt). Query-aware compresses all of it."""
    ids = [int(t) for t in context_ids]
    if len(ids) < 2:
        raise ValueError(f"a raw context needs at least 2 tokens, got {len(ids)}")
    return PromptTokens(context=ids[:-1], question=[], suffix=ids[-1:])


def haystack_continuation(tokenizer, length: int, continuation_tokens: int, seed: int = 0,
                          index: int = 0) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): the first `length` tokens of a seeded haystack prose
    stream (`kvray.eval.haystack.Haystack`, the synthetic tasks' filler) and its next
    `continuation_tokens` tokens. One tokenisation of the whole text, cut at a token boundary,
    so the continuation is exactly what follows the context. Deterministic in (seed, index)."""
    if length < 2 or continuation_tokens < 1:
        raise ValueError(f"need length >= 2 and continuation_tokens >= 1, got {length}, {continuation_tokens}")
    hay = hs.Haystack(random.Random(f"kvray/longgen/{int(seed)}/{int(index)}"))
    need = length + continuation_tokens
    k = max(8, need // 16)  # sentences run ~20-30 tokens: usually one tokenisation is enough
    while True:
        ids = tokenizer(hay.render(range(k))).input_ids  # special tokens (BOS) as the model expects
        if len(ids) >= need:
            return list(ids[:length]), list(ids[length:need])
        k *= 2


def _as_press(press: Press | str | None) -> Press:
    if press is None:
        return make_press("full")
    return make_press(press) if isinstance(press, str) else press


def decode_hook(press: Press) -> Callable[[KVRayCache, int], None] | None:
    """The per-step hook the decoder gets for `press` (as in `kvray.generate.run_configs`):
    `press.after_step` for presses that evict while decoding, None for the others."""
    return press.after_step if press.evicts_during_decoding else None


def cache_size(cache: KVRayCache) -> tuple[int, int]:
    """(entries, bytes) the compressed layers hold now: kept prefix entries plus the dense tail,
    summed over layers, batch rows and KV heads; bytes are the K and V tensors really allocated.
    A hybrid model's windowed (sliding) layers are left out, as in every compression ratio."""
    entries = nbytes = 0
    for layer in cache.layers:
        if layer.window is not None:
            continue
        if layer.prefix is not None:
            entries += sum(layer.prefix.lengths)
        tail = layer.tail_length()
        if tail:
            entries += tail * layer.keys.shape[0] * layer.keys.shape[1]
        nbytes += layer.nbytes()
    return entries, nbytes


# ----------------------------------------------------------------------------- (a) continuation NLL


@torch.inference_mode()
def continuation_nll_on_prefill(lm: LanguageModel, pre: Prefill, continuation: Sequence[int],
                                press: Press | str | None = None, *, query_aware: bool = False,
                                segment: int = DEFAULT_SEGMENT) -> dict:
    """Teacher-forced NLL of `continuation` (token ids) after the prompt of `pre`, with the
    prompt's cache compressed by `press` (see `continuation_nll`). The prefill is not modified,
    so one prefill serves every press."""
    press = _as_press(press)
    cont = [int(t) for t in continuation]
    if not cont:
        raise ValueError("the continuation is empty: nothing to score")
    if isinstance(segment, bool) or not isinstance(segment, int) or segment < 1:
        raise ValueError(f"segment must be an integer >= 1 (tokens per segment), got {segment!r}")
    rest, first = pre.rest(query_aware), pre.first_logits(query_aware)
    if not rest and first is None:
        raise ValueError("the prefill has no logits for the first continuation token: prefill with "
                         "with_question=True for query_aware, or use a prompt with a suffix (raw_prompt)")
    n_prompt = pre.n_context + len(pre.prompt.question) + len(pre.prompt.suffix)
    if lm.max_context and n_prompt + len(cont) - 1 > lm.max_context:
        raise ValueError(f"prompt + continuation is {n_prompt + len(cont)} tokens; {lm.name} supports "
                         f"at most {lm.max_context}")
    state = pre.state(query_aware)
    bytes_per_token = state.kv_bytes() / state.n_tokens  # the full cache's cost of one position
    heads = state.num_layers * state.num_kv_heads * state.batch
    hook = decode_hook(press)

    t0 = time.perf_counter()
    cache = compress(lm, pre, press, query_aware)
    compress_s = time.perf_counter() - t0
    compressed_entries, compressed_bytes = cache_size(cache)
    del state

    token_logp: list[torch.Tensor] = []
    token_top1: list[torch.Tensor] = []
    sizes: list[tuple[int, int, int]] = []  # (entries, bytes, sequence length) after each segment

    def observe(row, logits):  # the logits that predict continuation token j, on the cache as it is now
        j = len(token_logp)
        logits = logits.float()
        token_logp.append(torch.log_softmax(logits, dim=-1)[cont[j]])
        token_top1.append(logits.argmax() == cont[j])
        if (j + 1) % segment == 0 or j == len(cont) - 1:
            # the cache that predicted token j: after the forward of token j - 1 and its eviction
            sizes.append((*cache_size(cache), cache.layers[0].get_seq_length()))

    t0 = time.perf_counter()
    dec = Decoder(lm)
    row = dec.add(cache, feed=rest, first_logits=None if rest else first.float(), max_new_tokens=len(cont),
                  teacher=cont, after_step=hook, on_logits=observe)[0]
    dec.run()
    if row.error is not None:
        raise row.error
    forwards = row.forwards
    decode_s = time.perf_counter() - t0

    nll = [-x for x in torch.stack(token_logp).tolist()]
    top1 = [bool(x) for x in torch.stack(token_top1).tolist()]
    segments = []
    for s, (entries, nbytes, seq) in enumerate(sizes):
        lo, hi = s * segment, min((s + 1) * segment, len(cont))
        segments.append({
            "start": lo, "end": hi, "nll": sum(nll[lo:hi]) / (hi - lo),
            "kv_entries": entries, "kv_tokens_per_head": entries / heads, "kv_bytes": nbytes,
            "kv_bytes_full": int(round(bytes_per_token * seq)),
        })
    last = segments[-1]
    return {
        "method": press.name, "params": press.params_json(), "compression_ratio": press.target_ratio,
        "query_aware": bool(query_aware), "context_tokens": pre.n_context, "prompt_tokens": n_prompt,
        "continuation_tokens": len(cont), "segment": segment,
        "nll": sum(nll) / len(nll), "token_nll": nll, "top1": sum(top1) / len(top1), "token_top1": top1,
        "segments": segments,
        "kv_entries_compressed": compressed_entries, "kv_bytes_compressed": compressed_bytes,
        "kv_entries_end": last["kv_entries"], "kv_tokens_per_head_end": last["kv_tokens_per_head"],
        "kv_bytes_end": last["kv_bytes"], "kv_bytes_full_end": last["kv_bytes_full"],
        "forwards": forwards, "compress_s": compress_s, "decode_s": decode_s,
        "evicts_during_decoding": hook is not None,
    }


def _prompt_of(lm: LanguageModel, context: str | Sequence[int] | PromptTokens) -> PromptTokens:
    if isinstance(context, PromptTokens):
        if context.question or context.suffix:
            return context
        return raw_prompt(context.context)
    if isinstance(context, str):
        return raw_prompt(lm.tokenizer(context).input_ids)
    return raw_prompt(context)


def continuation_nll(lm: LanguageModel, context: str | Sequence[int] | PromptTokens,
                     continuation: str | Sequence[int], press: Press | str | None = None, *,
                     query_aware: bool = False, segment: int = DEFAULT_SEGMENT) -> dict:
    """Teacher-forced NLL of a reference `continuation` after `context`, on the cache `press`
    compresses (a Press, a method name, or None for the full cache).

    The prompt is prefilled (full cache) and compressed as for generation; the continuation is
    then fed ONE token at a time on the compressed cache, recording log p(next reference token),
    and a press that evicts while decoding runs its `after_step` hook after every forward pass,
    as in `kvray.generate.run_configs`. So a decode-time method is scored on the cache
    it would really hold, while a prefill-time method gets the same numbers as one forward of
    the whole continuation on its compressed cache.

    context: raw text (tokenised with the tokenizer's special tokens, no chat template), raw
        token ids (`raw_prompt`), or a chat prompt from `kvray.generate.build_prompt` (the
        continuation then follows the answer prefix);
    continuation: text (tokenised without special tokens) or token ids, e.g. 200-1000 tokens;
    query_aware: False compresses the context alone and feeds the rest of the prompt (for raw
        prompts: the last context token) on the compressed cache, True compresses the prompt;
    segment: tokens per reported segment.

    Returns a dict: `nll` (mean over the continuation's tokens, nats), `token_nll` (per token),
    `top1` / `token_top1` (whether each reference token was the model's greedy choice),
    `segments` (per `segment` tokens: start, end, nll, and the cache that predicted the
    segment's last token -- kv_entries over layers and KV heads, kv_tokens_per_head, kv_bytes,
    and kv_bytes_full, what the uncompressed cache would hold at that point), the same sizes
    at the end (`kv_*_end`) and right after compression (`kv_*_compressed`), timings, and the
    press's name, params and ratio."""
    press = _as_press(press)
    prompt = _prompt_of(lm, context)
    cont = (lm.tokenizer(continuation, add_special_tokens=False).input_ids if isinstance(continuation, str)
            else list(continuation))
    pre = prefill(lm, prompt, capture_window=capture_window_for([press]), with_question=query_aware,
                  capture_hidden=hidden_needed_for([press]))
    return continuation_nll_on_prefill(lm, pre, cont, press, query_aware=query_aware, segment=segment)


# ----------------------------------------------------------------------------- (b) long answers + driver


def ordered_recall(prediction: str, answers: Sequence[str]) -> float:
    """Share of `answers` found in `prediction` in the right relative order: the longest run of
    answers (not necessarily adjacent) whose first occurrences (case-insensitive) increase,
    over the number of answers. Equals recall (`string_match_all`) when the order is right."""
    refs = [str(a).strip().lower() for a in answers]
    if not refs or not all(refs):
        raise ValueError(f"cannot score against an empty or blank reference answer: {list(answers)!r}")
    pred = (prediction or "").lower()
    found = [p for p in (pred.find(r) for r in refs) if p >= 0]
    best: list[int] = []  # longest increasing subsequence of the found positions, O(n^2): n is small
    for i, p in enumerate(found):
        best.append(1 + max((best[k] for k in range(i) if found[k] < p), default=0))
    return max(best, default=0) / len(refs)


def default_presses(compression_ratio: float = 0.5) -> list[Press]:
    """full, snapkv and, once registered, morphkv at `compression_ratio`."""
    presses = [make_press("full"), make_press("snapkv", compression_ratio=compression_ratio)]
    if "morphkv" in list_methods():
        presses.append(make_press("morphkv", compression_ratio=compression_ratio))
    return presses


def compare_long_generation(lm: LanguageModel, presses: Sequence[Press | str] | None = None, n_samples: int = 2,
                            length: int = 1024, continuation_tokens: int = 400, seed: int = 0, *,
                            query_aware: bool = False, segment: int = DEFAULT_SEGMENT,
                            compression_ratio: float = 0.5, num_items: int | None = None):
    """One row per (press, sample) with (a) the continuation NLL of a `length`-token haystack
    prose context (`haystack_continuation`, `continuation_tokens` reference tokens) and (b) the
    recall of a `length`-token niah_list sample decoded with `kvray.generate.run_configs` (the
    public decoding path: decode-time presses get their per-step hook there too).

    presses: Press objects or method names (None: `default_presses(compression_ratio)`).
    Columns: method, params, compression_ratio, query_aware, sample, context_tokens,
    continuation_tokens, nll, top1, nll_first, nll_last (first and last segment), kv_entries_end,
    kv_tokens_per_head_end, kv_bytes_end, kv_bytes_full_end (after the continuation),
    kv_bytes_compressed, nll_decode_s, list_sample_id, list_items, recall (string_match_all,
    order-insensitive), ordered_recall, list_new_tokens, list_kv_bytes_kept (after compression),
    list_decode_s, prediction. Returns a pandas DataFrame."""
    import pandas as pd  # light imports for `import kvray.eval`

    presses = default_presses(compression_ratio) if presses is None else [_as_press(p) for p in presses]
    if not presses:
        raise ValueError("no presses to compare")
    window, hidden = capture_window_for(presses), hidden_needed_for(presses)
    options = {} if num_items is None else {"num_items": num_items}
    samples = make_samples("niah_list", n_samples, length, seed=seed, count_tokens=lm.tokenizer, **options)
    rows = []
    for i, sample in enumerate(samples):
        ctx, cont = haystack_continuation(lm.tokenizer, length, continuation_tokens, seed, i)
        pre = prefill(lm, raw_prompt(ctx), capture_window=window, with_question=query_aware, capture_hidden=hidden)
        nlls = [continuation_nll_on_prefill(lm, pre, cont, p, query_aware=query_aware, segment=segment)
                for p in presses]
        del pre
        prompt = build_prompt(lm.tokenizer, sample.context, sample.question, sample.answer_prefix)
        pre = prefill(lm, prompt, capture_window=window, with_question=query_aware, capture_hidden=hidden)
        outs = run_configs(lm, pre, presses, query_aware, sample.max_new_tokens, release_prefill=True)
        del pre
        for press, res, out in zip(presses, nlls, outs):
            rows.append({
                "method": press.name, "params": press.params_json(), "compression_ratio": press.target_ratio,
                "query_aware": bool(query_aware), "sample": i, "context_tokens": res["context_tokens"],
                "continuation_tokens": res["continuation_tokens"], "nll": res["nll"], "top1": res["top1"],
                "nll_first": res["segments"][0]["nll"], "nll_last": res["segments"][-1]["nll"],
                "kv_entries_end": res["kv_entries_end"], "kv_tokens_per_head_end": res["kv_tokens_per_head_end"],
                "kv_bytes_end": res["kv_bytes_end"], "kv_bytes_full_end": res["kv_bytes_full_end"],
                "kv_bytes_compressed": res["kv_bytes_compressed"], "nll_decode_s": res["decode_s"],
                "list_sample_id": sample.sample_id, "list_items": len(sample.answers),
                "recall": score_sample(sample, out.text), "ordered_recall": ordered_recall(out.text, sample.answers),
                "list_new_tokens": out.stats.new_tokens, "list_kv_bytes_kept": out.stats.kv_bytes_kept,
                "list_decode_s": out.stats.decode_s, "prediction": out.text,
            })
    return pd.DataFrame(rows)

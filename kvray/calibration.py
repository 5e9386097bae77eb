"""Context-calibrated compression: how much of *this* context can be evicted.

Follows the context-calibrated compression section of Chari & Van Durme, "Calibrated
Query-Agnostic KV Cache Compression with Approximate Leverage Scores" (arXiv 2507.08143, v2);
see docs/methods.md, section 2.4. The quality proxy is the token-averaged NLL of a target continuation `t`
(the ground-truth answer) given question `q` and context `c`; the measured quantity is the ratio

    g(r, q, c) = NLL(t | q, c) / NLL(t | q, c~_r)        (c~_r keeps a fraction r of the entries)

and the query-agnostic assumption models it by a one-parameter curve of the retention r,

    f_b(r) = (exp(b(r-1)) - exp(-b)) / (1 - exp(-b)),    b(c) = alpha * NLL(c) + beta,

where NLL(c) is the context's own token-averaged NLL (taken from the prefill forward). For a
quality budget tau the smallest retention with f_b(r) >= tau is used (`min_retention`).

Pieces, all usable without Ray (plain torch):

* `retention_curve`, `min_retention`: the curve and its closed-form inverse.
* `prefill_with_context_nll` / `context_nll`: one prefill that also yields NLL(c).
* `measure_curve`: one sample's measured NLL ratios over a grid of retentions.
* `fit_calibrator` -> `Calibrator` (JSON-serialisable), `safe_compression_ratio`,
  `validate_calibrator`.

Deviations and choices (the paper's fitting code is not released; docs/methods.md, section 2.4):

* NLL(c) averages -log p(x_i | x_<i) over the context's own tokens, skipping the chat-template
  prefix (system prompt, role header) that precedes the context in the prompt; the question is
  not part of it. It is computed from the decoder's last hidden states captured during the
  prefill (no second forward), with the LM head applied in chunks.
* The target `t` is the reference answer(s) joined with ", ", appended after the answer prefix.
* The asymmetric loss weights residuals with f > y (the curve promises better quality than was
  measured, i.e. it would over-compress) by `over_weight`, the others by 1; y (the measured
  ratio) is clipped to [0, 1] because the curve cannot exceed 1 (an "improvement" counts as no
  loss). Points at retention 1 carry no information (f(1) = 1 always) and are skipped.
* The fit: NLL(c) is standardised, a coarse grid over (slope, intercept) picks starting points,
  and L-BFGS (float64, strong-Wolfe line search) refines the best few; deterministic.
"""

from __future__ import annotations

import json
import math
import numbers
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .runtime import Prefill, PromptTokens, build_prompt, capture_window_for, forward, hidden_needed_for, prefill
from .models import LanguageModel
from .cache import KVRayCache
from .presses import Press, make_press
from .generate import compressed
from .probe import NeighbourCalibrator, ProbeCalibrator, ProbeSpec, choose_spans, from_json_object, probe_feed

_SMALL_B = 1e-6          # |b| below this: second-order Taylor expansion around b = 0
CALIBRATOR_KIND = "kvray.calibrator"
CALIBRATOR_VERSION = 1
DEFAULT_TAU = 0.95


# ----------------------------------------------------------------------------- the curve


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _curve_float(r: float, b: float) -> float:
    if abs(b) < _SMALL_B:
        return r + 0.5 * b * r * (r - 1.0)
    if b > 0:  # negative exponents only: no overflow for large b
        return math.exp(-b * (1.0 - r)) * math.expm1(-b * r) / math.expm1(-b)
    return math.expm1(b * r) / math.expm1(b)


def _as_tensors(*xs) -> list[torch.Tensor]:
    """Broadcast to tensors of one floating dtype (float64 if any tensor has it, else the
    tensors' floating dtype, else the default) and device; numbers are converted in that dtype."""
    tensors = [x for x in xs if isinstance(x, torch.Tensor)]
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    dtype = torch.float64 if torch.float64 in floats else (floats[0] if floats else torch.get_default_dtype())
    device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
    ts = [x.to(device=device, dtype=dtype) if isinstance(x, torch.Tensor)
          else torch.as_tensor(x, dtype=dtype, device=device) for x in xs]
    return list(torch.broadcast_tensors(*ts))


def retention_curve(r, b):
    """f_b(r) = (exp(b(r-1)) - exp(-b)) / (1 - exp(-b)) = expm1(b r) / expm1(b): the predicted NLL
    ratio (full / compressed) when a fraction `r` of the context's KV entries is kept.

    f(0) = 0, f(1) = 1, increasing in r for every real b; b > 0 convex (incompressible context:
    quality drops as soon as anything is evicted), b < 0 concave (compressible), b -> 0 the
    identity f(r) = r. Evaluated without overflow for any b (b > 0 uses only negative
    exponents). Floats in -> float out; tensors (or a mix) broadcast and keep autograd."""
    if _is_real(r) and _is_real(b):
        return _curve_float(float(r), float(b))
    r, b = _as_tensors(r, b)
    small = b.abs() < _SMALL_B
    pos = b >= _SMALL_B
    ones = torch.ones_like(b)
    bp = torch.where(pos, b, ones)                         # safe values in the unused branches
    bn = torch.where(pos | small, -ones, b)
    f_pos = torch.exp(-bp * (1.0 - r)) * torch.expm1(-bp * r) / torch.expm1(-bp)
    f_neg = torch.expm1(bn * r) / torch.expm1(bn)
    f_small = r + 0.5 * b * r * (r - 1.0)
    return torch.where(small, f_small, torch.where(pos, f_pos, f_neg))


def _min_retention_float(b: float, tau: float) -> float:
    if math.isnan(tau) or math.isnan(b):
        raise ValueError(f"min_retention: b and tau must be numbers, got b={b!r}, tau={tau!r}")
    tau = min(max(tau, 0.0), 1.0)
    if abs(b) < _SMALL_B:
        r = tau - 0.5 * b * tau * (tau - 1.0)
    elif b > 0:  # = log1p(tau * expm1(b)) / b, without exp(b)
        r = 1.0 + math.log(tau + (1.0 - tau) * math.exp(-b)) / b if tau > 0 else 0.0
    else:
        r = math.log1p(tau * math.expm1(b)) / b
    return min(max(r, 0.0), 1.0)


def min_retention(b, tau):
    """Smallest retention r with f_b(r) >= tau: r* = log1p(tau * expm1(b)) / b (tau at b = 0),
    clipped to [0, 1]; tau outside [0, 1] is clipped first (tau > 1 cannot be met: r* = 1).
    Floats -> float; tensors broadcast."""
    if _is_real(b) and _is_real(tau):
        return _min_retention_float(float(b), float(tau))
    b, tau = _as_tensors(b, tau)
    if torch.isnan(b).any() or torch.isnan(tau).any():
        raise ValueError("min_retention: b and tau must not be NaN")
    tau = tau.clamp(0.0, 1.0)
    small = b.abs() < _SMALL_B
    pos = b >= _SMALL_B
    ones = torch.ones_like(b)
    bp = torch.where(pos, b, ones)
    bn = torch.where(pos | small, -ones, b)
    r_pos = 1.0 + torch.log(tau + (1.0 - tau) * torch.exp(-bp)) / bp
    r_neg = torch.log1p(tau * torch.expm1(bn)) / bn
    r_small = tau - 0.5 * b * tau * (tau - 1.0)
    r = torch.where(small, r_small, torch.where(pos, r_pos, r_neg))
    return r.nan_to_num(nan=0.0).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- NLL pieces


@contextmanager
def capture_hidden(lm: LanguageModel):
    """Collect the decoder's last hidden states ([B, T, d], after the final norm) of every
    forward run inside the block, with a forward hook on the base model that is always removed."""
    decoder = lm.model.get_decoder() if hasattr(lm.model, "get_decoder") else None
    if decoder is None or decoder is lm.model:
        decoder = getattr(lm.model, "model", None)
    if not isinstance(decoder, torch.nn.Module):
        raise TypeError(f"{lm.name}: cannot find the decoder (base model) under the LM head")
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            hidden = output[0]
        captured.append(hidden.detach())

    handle = decoder.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _head_logits(lm: LanguageModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's logits (float32) for hidden states [..., d], with final logit soft-capping
    where the config has it (Gemma 2/3)."""
    head = lm.model.get_output_embeddings()
    logits = head(hidden).float()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.inference_mode()
def nll_from_hidden(lm: LanguageModel, hidden: torch.Tensor, targets: Sequence[int] | torch.Tensor,
                    chunk_size: int = 512) -> float:
    """Mean -log p(targets[i] | hidden[i]) for hidden [T, d] (row i predicts targets[i]), with
    the LM head applied `chunk_size` rows at a time (never a [T, vocab] tensor for large T)."""
    targets = torch.as_tensor(targets, dtype=torch.long, device=hidden.device).reshape(-1)
    if hidden.dim() != 2 or hidden.shape[0] != targets.numel():
        raise ValueError(f"hidden must be [T, d] with T = len(targets); got {tuple(hidden.shape)} "
                         f"for {targets.numel()} targets")
    if targets.numel() == 0:
        raise ValueError("no target tokens to score")
    total = 0.0
    for s in range(0, targets.numel(), chunk_size):
        logits = _head_logits(lm, hidden[s:s + chunk_size])
        total += float(F.cross_entropy(logits, targets[s:s + chunk_size], reduction="sum"))
    return total / targets.numel()


@torch.inference_mode()
def prefill_with_token_nll(lm: LanguageModel, prompt: PromptTokens, *, skip: int = 0,
                           capture_window: int | None = None, with_question: bool = False,
                           chunk_size: int = 512, capture_hidden_states: bool = False) -> tuple[Prefill, torch.Tensor, int]:
    """`kvray.generate.prefill` plus the context's per-token NLL from the same forward: returns
    (prefill, nll, start) where nll[j] = -log p(context[start + j] | context[:start + j]) for
    start = max(skip, 1) (`skip`: the template prefix length, `PromptTokens.template_prefix`)."""
    n = len(prompt.context)
    start = max(int(skip), 1)
    if start >= n:
        raise ValueError(f"the context has {n} tokens and {start} are skipped: nothing to score")
    kwargs = {} if capture_window is None else {"capture_window": capture_window}
    with capture_hidden(lm) as captured:
        pre = prefill(lm, prompt, with_question=with_question, capture_hidden=capture_hidden_states, **kwargs)
    if not captured or captured[0].shape[1] != n:
        raise RuntimeError("the decoder hook did not see the context forward")
    hidden = captured[0][0][start - 1:n - 1]  # [n - start, d], the first forward is the context alone
    targets = torch.tensor(prompt.context[start:], device=hidden.device)
    nll = torch.cat([F.cross_entropy(_head_logits(lm, hidden[s:s + chunk_size]), targets[s:s + chunk_size],
                                     reduction="none") for s in range(0, len(targets), chunk_size)])
    return pre, nll, start


def prefill_with_context_nll(lm: LanguageModel, prompt: PromptTokens, *, skip: int = 0,
                             capture_window: int | None = None, with_question: bool = False,
                             chunk_size: int = 512, capture_hidden_states: bool = False) -> tuple[Prefill, float]:
    """`kvray.generate.prefill` plus NLL(c), the context's own token-averaged NLL, taken from
    the same forward: mean over i in [max(skip, 1), n) of -log p(context[i] | context[:i]), where
    `skip` is the template prefix length (`PromptTokens.template_prefix`)."""
    pre, nll, _ = prefill_with_token_nll(lm, prompt, skip=skip, capture_window=capture_window,
                                         with_question=with_question, chunk_size=chunk_size,
                                         capture_hidden_states=capture_hidden_states)
    return pre, float(nll.double().mean())


def context_nll(lm: LanguageModel, context: str, question: str = "", answer_prefix: str = "", *,
                skip_template: bool = True, chunk_size: int = 512) -> float:
    """NLL(c) of a context as the calibrator sees it (one prefill of the context, no other
    forward). Use `prefill_with_context_nll` to get it alongside a prefill you go on using."""
    prompt = build_prompt(lm.tokenizer, context, question, answer_prefix)
    skip = prompt.template_prefix if skip_template else 0
    return prefill_with_context_nll(lm, prompt, skip=skip, chunk_size=chunk_size)[1]


def answer_text(sample) -> str:
    """The teacher-forced target: the reference answers joined with ", ", with a space after an
    answer prefix that does not end in whitespace."""
    text = ", ".join(sample.answers)
    prefix = getattr(sample, "answer_prefix", "")
    if prefix and not prefix[-1].isspace():
        text = " " + text
    return text


# ----------------------------------------------------------------------------- measuring


def _check_retentions(retentions: Iterable[float]) -> list[float]:
    out = []
    for r in retentions:
        if not _is_real(r) or not 0.0 < float(r) <= 1.0:
            raise ValueError(f"retentions must be numbers in (0, 1], got {r!r}")
        out.append(float(r))
    if not out:
        raise ValueError("no retentions to measure")
    return out


def measure_curve(lm: LanguageModel, sample, method: str, retentions: Sequence[float], *,
                  method_params: dict | None = None, query_aware: bool = False) -> list[dict]:
    """Measured NLL ratios of one sample over `retentions` (fractions of context KV kept).

    One prefill (which also gives NLL(c)); the target is the reference answer (`answer_text`),
    scored by teacher forcing `rest + answer` on a copy of the full cache (`make_press("full")`)
    and on `make_press(method, compression_ratio=1 - r, **method_params).compress_prefill(...)` per
    retention; the prefill cache itself is never extended. Retention 1 is the full cache itself
    (nll_ratio exactly 1). Rows: sample_id, task, method, retention, compression_ratio,
    context_tokens, context_nll, nll_full, nll_compressed, nll_ratio (= nll_full /
    nll_compressed), plus query_aware, compressed_tokens and answer_tokens."""
    return measure_curves(lm, sample, {method: method_params or {}}, retentions, query_aware=query_aware)


def _rows_nll(lm: LanguageModel, caches: list, ids: list[int], picks: list[int], targets: list[int],
              max_rows: int = 8) -> list[torch.Tensor]:
    """Teacher forcing on several caches at once: feed `ids` after each cache (copies, merged
    `max_rows` at a time into one batch of ragged rows) and return per cache the NLL of each of
    `targets` ([len(targets)], float32), predicted at positions `picks` of `ids` (the LM head
    runs on those positions only)."""
    pick = torch.tensor(picks, device=lm.device)
    target = torch.tensor(targets, device=lm.device)
    out: list[torch.Tensor] = []
    for s in range(0, len(caches), max_rows):
        batch = KVRayCache.merge(caches[s:s + max_rows])  # a copy: the sources are never extended
        positions = batch.next_positions() if batch.layers[0].rows is not None else None
        with capture_hidden(lm) as captured:
            forward(lm, [ids] * batch.batch, batch, positions=positions, logits_to_keep=1)
        logits = _head_logits(lm, captured[0][:, pick])  # [B, len(picks), vocab]
        out += list(F.cross_entropy(logits.transpose(1, 2), target.expand(batch.batch, -1), reduction="none"))
    return out


def _answer_rows_nll(lm: LanguageModel, caches: list, rest: list[int], answer: list[int],
                     first_logits: torch.Tensor | None) -> list[float]:
    """Token-averaged NLL of `answer` by teacher forcing on each cache (copies; never extended):
    feed `rest + answer[:-1]` and score the last len(answer) positions. With nothing to feed
    first, the first answer token is scored from `first_logits` (the query-aware protocol)."""
    if rest:
        ids = rest + answer[:-1]
        return [float(x.mean()) for x in _rows_nll(lm, caches, ids, list(range(len(rest) - 1, len(ids))), answer)]
    if first_logits is None:
        raise ValueError("nothing to feed and no first-token logits")
    first = float(F.cross_entropy(first_logits.reshape(1, -1).float(), torch.tensor(answer[:1], device=lm.device)))
    if len(answer) == 1:
        return [first] * len(caches)
    rest_nll = _rows_nll(lm, caches, answer[:-1], list(range(len(answer) - 1)), answer[1:])
    return [(first + float(x.sum())) / len(answer) for x in rest_nll]


@torch.inference_mode()
def measure_curves(lm: LanguageModel, sample, methods: dict[str, dict], retentions: Sequence[float], *,
                   query_aware: bool = False, probe: ProbeSpec | dict | None = None,
                   score: bool = False) -> list[dict]:
    """`measure_curve` for several methods ({name: params}) on one prefill of `sample`; all
    retentions are teacher-forced as the rows of batched forwards.

    `probe` (a `kvray.probe.ProbeSpec`, or its fields): also reproduce spans of the context on
    every compressed cache (query-agnostic: the answer is not used) and add probe_nll_full,
    probe_nll, probe_ratio (= probe_nll_full / probe_nll; means over the target tokens of all
    spans), probe_spans, and per span its start, the NLL of its first target token in the
    context and its mean NLLs (probe_span_starts, probe_span_surprisal, probe_span_nll_full,
    probe_span_nll) to the rows.

    `score`: also decode every cache greedily (`sample.max_new_tokens`, all on one `Decoder`) and
    add the task metric: prediction, score and score_full (the full cache's)."""
    retentions = _check_retentions(retentions)
    if not methods:
        raise ValueError("no methods to measure")
    spec = None if probe is None else (probe if isinstance(probe, ProbeSpec) else ProbeSpec.from_dict(probe))
    presses = {m: [None if r >= 1.0 else make_press(m, compression_ratio=1.0 - r, **dict(params or {}))
                   for r in retentions] for m, params in methods.items()}
    prompt = build_prompt(lm.tokenizer, sample.context, sample.question, sample.answer_prefix)
    answer = lm.tokenizer(answer_text(sample), add_special_tokens=False).input_ids
    if not answer:
        raise ValueError(f"sample {sample.sample_id}: the answer tokenises to nothing")
    skip = prompt.template_prefix
    every = [p for ps in presses.values() for p in ps if p is not None]
    pre, token_nll, start = prefill_with_token_nll(lm, prompt, skip=skip, with_question=query_aware,
                                                   capture_window=capture_window_for(every),
                                                   capture_hidden_states=hidden_needed_for(every))
    c_nll = float(token_nll.double().mean())
    state = pre.state(query_aware)
    rest, first = pre.rest(query_aware), pre.first_logits(query_aware)
    full = make_press("full").compress(state)
    made = [press for ps in presses.values() for press in ps if press is not None]
    caches = [full] + [cache for cache, _ in compressed(lm, pre, made, [query_aware] * len(made))]
    answer_nll = _answer_rows_nll(lm, caches, rest, answer, first)
    starts, probe_nll = _probe(lm, prompt, token_nll, start, pre.n_context, caches, spec) if spec is not None else ([], None)
    scores: list[tuple[str, float]] | None = _decode_scores(lm, sample, caches, rest, first) if score else None
    nll_full = answer_nll[0]
    rows, k = [], 1
    for method, method_presses in presses.items():
        for r, press in zip(retentions, method_presses):
            j = 0 if press is None else k
            k += press is not None
            nll_c = answer_nll[j]
            row = {
                "sample_id": sample.sample_id, "task": sample.task, "method": method,
                "retention": r, "compression_ratio": 1.0 - r if press is not None else 0.0,
                "context_tokens": pre.n_context, "context_nll": c_nll,
                "nll_full": nll_full, "nll_compressed": nll_c, "nll_ratio": _ratio(nll_full, nll_c),
                "query_aware": bool(query_aware), "compressed_tokens": state.n_tokens, "answer_tokens": len(answer),
            }
            if scores is not None:
                row.update(prediction=scores[j][0], score=scores[j][1], score_full=scores[0][1])
            if spec is not None:
                pf = float(probe_nll[0].mean()) if probe_nll else math.nan
                pc = float(probe_nll[j].mean()) if probe_nll else math.nan
                row.update(probe_nll_full=pf, probe_nll=pc, probe_ratio=_ratio(pf, pc) if probe_nll else math.nan,
                           probe_spans=len(starts), probe_span_starts=list(starts),
                           probe_span_surprisal=[float(token_nll[c - start]) for c in starts],
                           probe_span_nll_full=probe_nll[0].tolist() if probe_nll else [],
                           probe_span_nll=probe_nll[j].tolist() if probe_nll else [])
            rows.append(row)
    return rows


def _decode_scores(lm: LanguageModel, sample, caches: list, rest: list[int],
                   first: torch.Tensor | None) -> list[tuple[str, float]]:
    """Greedy answers on every cache (the caches become the decoder's) and their task scores."""
    from .eval.metrics import score_sample
    from .runtime import Decoder

    dec = Decoder(lm)
    rows = [dec.add(c, feed=rest, first_logits=first, max_new_tokens=sample.max_new_tokens)[0] for c in caches]
    dec.run()
    out = []
    for row in rows:
        if row.error is not None:
            raise row.error
        text = lm.tokenizer.decode(row.tokens, skip_special_tokens=True)
        out.append((text, score_sample(sample, text)))
    return out


def _probe(lm: LanguageModel, prompt: PromptTokens, token_nll: torch.Tensor, start: int, n_context: int,
           caches: list, spec: ProbeSpec) -> tuple[list[int], list[torch.Tensor] | None]:
    """The probe's span starts and, per cache, each span's mean target NLL ([spans]); None when
    the context is too short for one span."""
    starts = choose_spans(token_nll.tolist(), start, n_context, spec)
    if not starts:
        return starts, None
    sep = lm.tokenizer("\n", add_special_tokens=False).input_ids
    ids, picks, targets = probe_feed(prompt.context, starts, spec, sep)
    return starts, [x.reshape(len(starts), spec.target).mean(dim=1) for x in _rows_nll(lm, caches, ids, picks, targets)]


@torch.inference_mode()
def probe_curve(lm: LanguageModel, context: str, method: str, ratios: Sequence[float], *,
                probe: ProbeSpec | dict | None = None, method_params: dict | None = None) -> tuple[dict[float, float], float]:
    """The probe of one context, as a deployed measured calibrator (`kvray.probe`) needs it: one
    prefill of the context alone, `method` at each compression ratio, and the probe's spans
    teacher-forced on every compressed cache in batched forwards. Returns (ratio -> probe ratio
    (probe NLL on the full cache / on the compressed one), NLL(c)); the ratios are NaN for a
    context too short for one span."""
    spec = probe if isinstance(probe, ProbeSpec) else ProbeSpec.from_dict(probe)
    ratios = [float(r) for r in ratios]
    if not ratios or not all(0.0 < r < 1.0 for r in ratios):
        raise ValueError(f"ratios must be compression ratios in (0, 1), got {ratios!r}")
    presses = [make_press(method, compression_ratio=r, **dict(method_params or {})) for r in ratios]
    prompt = build_prompt(lm.tokenizer, context, "")
    pre, token_nll, start = prefill_with_token_nll(lm, prompt, skip=prompt.template_prefix,
                                                   capture_window=capture_window_for(presses),
                                                   capture_hidden_states=hidden_needed_for(presses))
    caches = [make_press("full").compress(pre.state(False))] + [p.compress_prefill(lm, pre, False) for p in presses]
    _, nll = _probe(lm, prompt, token_nll, start, pre.n_context, caches, spec)
    c_nll = float(token_nll.double().mean())
    if nll is None:
        return {r: math.nan for r in ratios}, c_nll
    full = float(nll[0].mean())
    return {r: _ratio(full, float(x.mean())) for r, x in zip(ratios, nll[1:])}, c_nll


def _ratio(full: float, compressed: float) -> float:
    if compressed > 0:
        return full / compressed
    return 1.0 if full <= 0 else math.inf


# ----------------------------------------------------------------------------- the calibrator


def _finite(name: str, value: Any) -> float:
    if not _is_real(value) or not math.isfinite(float(value)):
        raise ValueError(f"calibrator field {name!r} must be a finite number, got {value!r}")
    return float(value)


def _check_tau(tau: Any) -> float:
    tau = _finite("tau", tau)
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau (the quality budget, the NLL ratio to keep) must be in (0, 1], got {tau}")
    return tau


@dataclass(frozen=True)
class Calibrator:
    """b(c) = alpha * NLL(c) + beta for one eviction method; keep the smallest retention with
    f_b(r) >= tau (Chari & Van Durme, arXiv 2507.08143 v2, context-calibrated compression)."""

    method: str
    alpha: float
    beta: float
    tau: float = DEFAULT_TAU
    over_weight: float = 4.0
    n_points: int = 0
    n_contexts: int = 0
    loss: float | None = None

    def __post_init__(self):
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"calibrator field 'method' must be a method name, got {self.method!r}")
        object.__setattr__(self, "alpha", _finite("alpha", self.alpha))
        object.__setattr__(self, "beta", _finite("beta", self.beta))
        object.__setattr__(self, "tau", _check_tau(self.tau))
        ow = _finite("over_weight", self.over_weight)
        if ow <= 0:
            raise ValueError(f"over_weight must be > 0, got {ow}")
        object.__setattr__(self, "over_weight", ow)
        for name in ("n_points", "n_contexts"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 0:
                raise ValueError(f"calibrator field {name!r} must be a non-negative integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.loss is not None:
            object.__setattr__(self, "loss", _finite("loss", self.loss))

    def b(self, context_nll):
        """The curve parameter for a context of token-averaged NLL `context_nll`."""
        return self.alpha * context_nll + self.beta

    def predict_retention(self, context_nll, tau: float | None = None):
        """Smallest fraction of the context's KV entries to keep for NLL ratio >= tau."""
        return min_retention(self.b(context_nll), self.tau if tau is None else _check_tau(tau))

    def max_compression_ratio(self, context_nll, tau: float | None = None):
        """1 - predicted retention: the largest compression ratio predicted to keep quality."""
        return 1.0 - self.predict_retention(context_nll, tau)

    def press(self, context_nll: float, tau: float | None = None, max_ratio: float = 0.99, **params) -> Press:
        """A press of this calibrator's method at the predicted ratio (at most `max_ratio`)."""
        ratio = min(float(self.max_compression_ratio(context_nll, tau)), max_ratio)
        return make_press(self.method, compression_ratio=max(ratio, 0.0), **params)

    # -- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"kind": CALIBRATOR_KIND, "version": CALIBRATOR_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any) -> "Calibrator":
        return from_json_object(cls, data, CALIBRATOR_KIND, CALIBRATOR_VERSION,
                                required=("method", "alpha", "beta", "tau"))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "Calibrator":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"calibrator JSON is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibrator":
        return cls.from_json(Path(path).read_text())


def load_calibrator(data: Any):
    """A calibrator from its JSON object, by its `kind`: the NLL-curve `Calibrator`, or a
    measured one (`kvray.probe.ProbeCalibrator`, `kvray.probe.NeighbourCalibrator`)."""
    kinds = {CALIBRATOR_KIND: Calibrator, ProbeCalibrator.KIND: ProbeCalibrator, NeighbourCalibrator.KIND: NeighbourCalibrator}
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in kinds:
        raise ValueError(f"unknown calibrator kind {kind!r}; known: {', '.join(kinds)}")
    return kinds[kind].from_dict(data)


# ----------------------------------------------------------------------------- fitting


def _asym_loss(a, c, z, r, y, over_weight):
    """Mean asymmetric squared error; a, c broadcast against z, r, y (last dim = points)."""
    d = retention_curve(r, a * z + c) - y
    w = torch.where(d > 0, torch.full_like(d, over_weight), torch.ones_like(d))
    return (w * d * d).mean(dim=-1)


def _points(rows: Iterable[dict], method: str | None) -> list[dict]:
    """The rows of `method` (rows without a method field count), checked for the needed fields."""
    pts = []
    for row in rows:
        if method is not None and row.get("method", method) != method:
            continue
        for key in ("retention", "context_nll", "nll_ratio"):
            if key not in row:
                raise ValueError(f"calibration row is missing {key!r}: {row!r}")
        pts.append(row)
    return pts


def fit_calibrator(rows: Iterable[dict], method: str, *, tau: float = DEFAULT_TAU,
                   over_weight: float = 4.0, y_max: float = 1.0) -> Calibrator:
    """Fit b = alpha * NLL(c) + beta to measured rows (`measure_curve` output; rows of other
    methods are ignored) by minimising the asymmetric squared error of f_b(r) - y, y = nll_ratio
    clipped to [0, y_max]; residuals with f > y (over-compression) weigh `over_weight`.

    Procedure (ours; the paper's is not released): standardise NLL(c) to z, grid over
    b = a z + c (a in [-20, 20], c in [-30, 30]), refine the 3 best grid points by L-BFGS in
    float64, keep the lowest loss, map back to (alpha, beta). Deterministic."""
    tau = _check_tau(tau)
    over_weight = _finite("over_weight", over_weight)
    if over_weight <= 0:
        raise ValueError(f"over_weight must be > 0, got {over_weight}")
    pts = _points(rows, method)
    pts = [p for p in pts if float(p["retention"]) < 1.0]  # f(1) = 1 always: no information
    if len(pts) < 2:
        raise ValueError(f"need at least 2 measured points with retention < 1 for method {method!r}, "
                         f"got {len(pts)}")
    n_contexts = len({p.get("sample_id", id(p)) for p in pts})
    dt = torch.float64
    x = torch.tensor([float(p["context_nll"]) for p in pts], dtype=dt)
    r = torch.tensor([float(p["retention"]) for p in pts], dtype=dt)
    y = torch.tensor([float(p["nll_ratio"]) for p in pts], dtype=dt).nan_to_num(nan=0.0, posinf=y_max)
    y = y.clamp(0.0, y_max)
    if not (torch.isfinite(x).all() and torch.isfinite(r).all()):
        raise ValueError("context_nll and retention must be finite")
    mu, sd = x.mean(), x.std(unbiased=False)
    if float(sd) <= 1e-12 * max(1.0, abs(float(mu))):
        raise ValueError("no variation in context_nll: alpha and beta cannot be separated "
                         "(measure contexts of different NLL)")
    z = (x - mu) / sd

    # coarse grid, one slope at a time (memory ~ len(cs) * points)
    a_grid = torch.linspace(-20.0, 20.0, 41, dtype=dt)
    c_grid = torch.linspace(-30.0, 30.0, 61, dtype=dt)
    cand = []
    for a in a_grid:
        losses = _asym_loss(a, c_grid[:, None], z, r, y, over_weight)
        for c, loss in zip(c_grid.tolist(), losses.tolist()):
            cand.append((loss, float(a), c))
    cand.sort()
    best = cand[0]
    with torch.enable_grad():
        for _, a0, c0 in cand[:3]:
            p = torch.tensor([a0, c0], dtype=dt, requires_grad=True)
            opt = torch.optim.LBFGS([p], lr=1.0, max_iter=500, tolerance_grad=1e-12,
                                    tolerance_change=1e-16, history_size=20, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = _asym_loss(p[0], p[1], z, r, y, over_weight)
                loss.backward()
                return loss

            opt.step(closure)
            q = p.detach()
            loss = float(_asym_loss(q[0], q[1], z, r, y, over_weight))
            if math.isfinite(loss) and bool(torch.isfinite(q).all()) and loss < best[0]:
                best = (loss, float(q[0]), float(q[1]))
    loss, a, c = best
    alpha = a / float(sd)
    beta = c - a * float(mu) / float(sd)
    return Calibrator(method=method, alpha=alpha, beta=beta, tau=tau, over_weight=over_weight,
                      n_points=len(pts), n_contexts=n_contexts, loss=loss)


# ----------------------------------------------------------------------------- validation


def safe_compression_ratio(curve_rows: Iterable[dict], tau: float) -> float:
    """The largest measured compression ratio of one context's curve such that every measured
    retention at or above it keeps nll_ratio >= tau (walking down from the highest retention);
    0 when even the highest measured retention fails."""
    rows = list(curve_rows)
    if not rows:
        raise ValueError("no rows")
    ids = {row.get("sample_id") for row in rows}
    if len(ids) > 1:
        raise ValueError(f"safe_compression_ratio takes one context's rows, got {len(ids)} sample ids")
    safe = 0.0
    for row in sorted(rows, key=lambda row: -float(row["retention"])):
        ratio = float(row["nll_ratio"])
        if not (ratio >= tau):  # NaN fails too
            break
        safe = max(safe, 1.0 - float(row["retention"]))
    return safe


def validate_calibrator(cal: Calibrator, heldout_rows: Iterable[dict], tau: float | None = None, *,
                        tolerance: float = 0.02) -> dict:
    """Predicted vs measured safe compression ratio per held-out context (rows of `cal.method`).

    A prediction is safe when predicted <= measured safe ratio + `tolerance` (the measured one
    is quantised to the retention grid). Returns share_safe, mean_abs_error (|predicted -
    measured|), n_contexts, tau and `contexts` (one dict per context)."""
    tau = cal.tau if tau is None else _check_tau(tau)
    pts = _points(heldout_rows, cal.method)
    groups: OrderedDict[Any, list[dict]] = OrderedDict()
    for row in pts:
        groups.setdefault(row.get("sample_id"), []).append(row)
    if not groups:
        raise ValueError(f"no held-out rows for method {cal.method!r}")
    per = []
    for sid, rows in groups.items():
        nll = float(rows[0]["context_nll"])
        predicted = float(cal.max_compression_ratio(nll, tau))
        measured = safe_compression_ratio(rows, tau)
        per.append({"sample_id": sid, "task": rows[0].get("task"), "context_nll": nll,
                    "predicted_ratio": predicted, "measured_safe_ratio": measured,
                    "error": predicted - measured, "safe": predicted <= measured + tolerance})
    return {
        "method": cal.method, "tau": tau, "tolerance": tolerance, "n_contexts": len(per),
        "share_safe": sum(p["safe"] for p in per) / len(per),
        "mean_abs_error": sum(abs(p["error"]) for p in per) / len(per),
        "contexts": per,
    }


def compare_with_fixed(cal: Calibrator, heldout_rows: Iterable[dict], at_predicted: Iterable[dict],
                       tau: float | None = None) -> dict:
    """Calibrated vs one fixed ratio for everybody, on held-out contexts.

    `heldout_rows`: the held-out contexts' curves on a retention grid; `at_predicted`: each
    held-out context measured at the retention the calibrator predicts for it (one row per
    context, `measure_curve(..., [cal.predict_retention(nll)])`). Returns share_ok (contexts
    whose NLL ratio stays >= tau at their predicted ratio), mean_predicted_ratio, and the best
    fixed ratio of the grid whose share of contexts with NLL ratio >= tau is at least share_ok
    (its ratio and share): calibration pays when mean_predicted_ratio > best_fixed_ratio."""
    tau = cal.tau if tau is None else _check_tau(tau)
    grid = _points(heldout_rows, cal.method)
    pred = [r for r in at_predicted if r.get("method") == cal.method]
    if not pred or not grid:
        raise ValueError(f"no held-out rows for method {cal.method!r}")
    ok = [float(r["nll_ratio"]) >= tau for r in pred]
    share_ok = sum(ok) / len(ok)
    ratios = [float(r["compression_ratio"]) for r in pred]
    by_ratio: dict[float, list[bool]] = {}
    for r in grid:
        by_ratio.setdefault(round(1.0 - float(r["retention"]), 6), []).append(float(r["nll_ratio"]) >= tau)
    best_fixed, best_share = 0.0, 1.0
    for ratio in sorted(by_ratio):
        share = sum(by_ratio[ratio]) / len(by_ratio[ratio])
        if share >= share_ok - 1e-9:
            best_fixed, best_share = ratio, share
    return {"method": cal.method, "tau": tau, "n_contexts": len(pred), "share_ok": share_ok,
            "mean_predicted_ratio": sum(ratios) / len(ratios), "best_fixed_ratio": best_fixed,
            "best_fixed_share": best_share,
            "fixed_shares": {f"{k:g}": sum(v) / len(v) for k, v in sorted(by_ratio.items())}}


__all__ = [
    "compare_with_fixed", "measure_curves", "retention_curve", "min_retention", "capture_hidden", "nll_from_hidden",
    "prefill_with_context_nll", "prefill_with_token_nll", "probe_curve", "context_nll", "answer_text", "measure_curve", "Calibrator",
    "fit_calibrator", "load_calibrator", "safe_compression_ratio", "validate_calibrator", "CALIBRATOR_KIND", "CALIBRATOR_VERSION",
]

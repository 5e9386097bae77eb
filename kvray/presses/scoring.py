"""Scoring building blocks shared by several presses: window attention, GQA reduction, pooling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kernels.window_scores import window_probs, window_scores as scores_of
from .base import LayerInputs

GQA_REDUCTIONS = ("mean", "max")
POOLINGS = ("avg", "max", "none")
OBSERVATIONS = ("last", "question")


def check_window_params(method: str, *, window_size=None, kernel_size=None, pooling=None, gqa_reduction=None,
                        observation=None) -> None:
    """Validate the window-attention parameters a press has (those given), with errors that
    say what is allowed."""
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if window_size is not None and (not is_int(window_size) or window_size < 1):
        raise ValueError(f"{method}: window_size must be an integer >= 1, got {window_size!r}")
    if kernel_size is not None and (not is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0):
        raise ValueError(f"{method}: kernel_size must be an odd integer >= 1, got {kernel_size!r}")
    if pooling is not None and pooling not in POOLINGS:
        raise ValueError(f"{method}: pooling must be one of {POOLINGS}, got {pooling!r}")
    if gqa_reduction is not None and gqa_reduction not in GQA_REDUCTIONS:
        raise ValueError(f"{method}: gqa_reduction must be one of {GQA_REDUCTIONS}, got {gqa_reduction!r}")
    if observation is not None and observation not in OBSERVATIONS:
        raise ValueError(f"{method}: observation must be one of {OBSERVATIONS} ('last': the last window_size tokens; "
                         f"'question': the question's tokens when it is compressed too), got {observation!r}")


def window_rows(layer: LayerInputs, window_size: int, observation: str = "last") -> tuple[torch.Tensor, torch.Tensor]:
    """The observation window's captured queries [B, Hq, W, d] and their positions [W].

    observation="last": the last `window_size` captured queries (W = min(window_size, captured)).
    observation="question": the question's rows when the question is among the compressed tokens
    (query-aware protocol, `layer.question`), else the last `window_size` as above."""
    if observation not in OBSERVATIONS:
        raise ValueError(f"unknown observation window {observation!r}; allowed: {', '.join(OBSERVATIONS)}")
    if layer.queries is None:
        raise ValueError("this method needs the window queries, but the prefill captured none")
    if observation == "question" and layer.question is not None:
        start, end = layer.question
        pos = layer.query_positions
        rows = ((pos >= start) & (pos < end)).nonzero().flatten()
        if rows.numel() != end - start:
            raise ValueError(f"the prefill captured {rows.numel()} of the question's {end - start} query rows; "
                             "prefill with with_question=True captures them all")
        return layer.queries[:, :, rows], pos[rows]
    return layer.queries[:, :, -window_size:], layer.query_positions[-window_size:]


def window_attention(layer: LayerInputs, window_size: int, observation: str = "last") -> torch.Tensor:
    """softmax(Q_win K^T / sqrt(d)) in fp32 for the observation window's queries (`window_rows`).

    Returns [B, Hq, W, N]; a query sees only keys at or before its own position (the causal
    mask inside the window)."""
    q, qpos = window_rows(layer, window_size, observation)
    return window_probs(q, qpos, layer.keys)


def window_scores(layer: LayerInputs, window_size: int, observation: str = "last") -> tuple[torch.Tensor, int]:
    """(the mean over the observation window's rows of `window_attention` [B, Hq, N] fp32, W):
    on CUDA the Triton kernel (`kvray.kernels.window_scores`, no [B, Hq, W, N] matrix), else its
    torch twin, the same computation as `window_attention(...).mean(dim=2)`. Computed once per
    (layer view, window, observation): SnapKV, PyramidKV, AdaKV, LAVa at every ratio share it."""
    # memoised on the layer's views (shared by the sample's configs: `Prefill.state`), keyed by
    # the tensors too, so a view with other queries (LAQ's lookahead) is scored afresh
    memo = layer.__dict__.setdefault("_window_scores", {})
    key = (window_size, observation, id(layer.queries), id(layer.keys))
    if key not in memo:
        q, qpos = window_rows(layer, window_size, observation)
        memo[key] = (scores_of(q, qpos, layer.keys), q.shape[2])
    scores, W = memo[key]
    return scores.clone(), W


def reduce_gqa(scores: torch.Tensor, num_kv_heads: int, how: str) -> torch.Tensor:
    """[B, Hq, N] -> [B, H, N] over the G query heads of each KV head."""
    B, Hq, N = scores.shape
    grouped = scores.view(B, num_kv_heads, Hq // num_kv_heads, N)
    if how == "mean":
        return grouped.mean(2)
    if how == "max":
        return grouped.amax(2)
    raise ValueError(f"unknown GQA reduction {how!r}; allowed: {', '.join(GQA_REDUCTIONS)}")


def pool(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """1-D pooling along tokens, stride 1, same length (SnapKV's clustering of neighbours)."""
    if pooling == "none" or kernel_size <= 1:
        return scores
    shape = scores.shape
    x = scores.reshape(-1, 1, shape[-1])
    pad = kernel_size // 2
    if pooling == "avg":
        out = F.avg_pool1d(x, kernel_size, stride=1, padding=pad, count_include_pad=False)
    elif pooling == "max":
        out = F.max_pool1d(x, kernel_size, stride=1, padding=pad)
    else:
        raise ValueError(f"unknown pooling {pooling!r}; allowed: {', '.join(POOLINGS)}")
    return out[..., : shape[-1]].reshape(shape)


def kvpress_window_scores(layer: LayerInputs, window_size: int, kernel_size: int) -> torch.Tensor:
    """[B, H, N] the scores of kvpress's SnapKVPress, op for op (the dtype casts and reduction
    order decide near-ties): the last `window_size` captured queries against the query-head-
    repeated keys, `QK^T / sqrt(d)` plus an upper-triangular -inf mask, softmax in fp32 cast back
    to the queries' dtype; over the N - W prefix columns, the mean over the window rows, then
    per query head `avg_pool1d` (zero padding counted), then the mean over each KV head's group;
    the window padded with the layer's max + 1.

    kvpress recomputes the window's queries from the hidden states (q_proj, RoPE), kvray captures
    the model's own: the same ops on the same rows."""
    if layer.queries is None:
        raise ValueError("this method needs the window queries, but the prefill captured none")
    B, H, N, d = layer.keys.shape
    W = window_size
    if N <= W:
        raise ValueError(f"kvpress's SnapKV needs more than window_size={W} tokens, got {N}")
    if layer.queries.shape[2] < W:
        raise ValueError(f"the prefill captured {layer.queries.shape[2]} window queries, kvpress's SnapKV reads {W}")
    q = layer.queries[:, :, -W:]
    G = q.shape[1] // H
    keys = layer.keys[:, :, None].expand(B, H, G, N, d).reshape(B, H * G, N, d)
    logits = torch.matmul(q, keys.transpose(2, 3)) / math.sqrt(d)
    logits += torch.triu(torch.full_like(logits, float("-inf")), diagonal=N - W + 1)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    scores = F.avg_pool1d(probs[..., :-W].mean(dim=-2), kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    scores = scores.view(B, H, G, N - W).mean(2)
    return F.pad(scores, (0, W), value=scores.max().item() + 1)

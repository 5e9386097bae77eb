"""Compactor: approximate leverage of pre-RoPE keys blended with non-causal chunked attention."""

from __future__ import annotations

import functools
import inspect
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..budget import head_adaptive_counts
from .base import LayerInputs, PrefillState, Press, protect

#: fp32 attention probabilities materialised at once by `noncausal_chunk_attention` (elements)
_MAX_PROBS = 1 << 26


@functools.lru_cache(maxsize=32)
def gaussian_sketch(d: int, k: int, seed: int) -> torch.Tensor:
    """Phi [d, k], entries N(0, 1/k), from its own seeded generator (never the global RNG).
    Cached and shared: callers must not modify it."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, k, generator=g) / math.sqrt(k)


def approx_leverage(keys: torch.Tensor, phi: torch.Tensor, rcond: float = 1e-6) -> torch.Tensor:
    """Leverage scores of the rows of the centred, right-sketched keys `(K - mean) Phi`.

    keys [..., M, d], phi [d, k] -> [..., M] float32: `o_i = x_i^T G^+ x_i` with `x = (K - mean) Phi`,
    `G = x^T x` (k x k, float64 eigendecomposition; eigenvalues below `rcond * max` are dropped, a
    pseudo-inverse). Centring commutes with the right sketch. With k = d and Phi invertible this
    is the exact leverage of the centred keys; each row's score lies in [0, 1], the sum is the rank.
    """
    x = torch.matmul(keys.float(), phi.to(keys.device, torch.float32))
    x = x - x.mean(dim=-2, keepdim=True)
    gram = torch.matmul(x.transpose(-1, -2).double(), x.double())
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    kept = evals > rcond * evals[..., -1:].clamp_min(0)
    inv_sqrt = torch.where(kept, evals.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(evals))
    u = torch.matmul(x, (evecs * inv_sqrt.unsqueeze(-2)).float())  # rows of U of x = U S V^T
    return (u * u).sum(-1)


def noncausal_chunk_attention(queries: torch.Tensor, keys: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Attention mass each key receives inside its chunk, non-causally, without 1/sqrt(d).

    queries [B, Hq, M, d], keys [B, H, M, d] (Hq = G * H, query head h reads KV head h // G) ->
    [B, H, M] float32: for the chunk c holding key j, `sum_{g, i in c} softmax_c(q_gi . k)_j`. The
    last chunk is simply shorter (its keys share its own queries' mass), so every chunk hands out
    exactly `G * len(chunk)` and the mean score per key is G everywhere."""
    B, Hq, M, d = queries.shape
    H = keys.shape[1]
    G = Hq // H
    out = torch.empty(B, H, M, dtype=torch.float32, device=keys.device)

    def mass(start: int, n_chunks: int, c: int) -> None:
        end = start + n_chunks * c
        q = queries[:, :, start:end].float().reshape(B, H, G, n_chunks, c, d).transpose(2, 3)
        q = q.reshape(B, H, n_chunks, G * c, d)
        k = keys[:, :, start:end].float().reshape(B, H, n_chunks, c, d)
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1)  # [B, H, n, G*c, c]
        out[:, :, start:end] = probs.sum(dim=-2).reshape(B, H, n_chunks * c)

    n_full = M // chunk_size
    step = max(1, _MAX_PROBS // (B * Hq * chunk_size * chunk_size))
    for i in range(0, n_full, step):
        mass(i * chunk_size, min(step, n_full - i), chunk_size)
    if M % chunk_size:
        mass(n_full * chunk_size, 1, M % chunk_size)
    return out


def zscore(scores: torch.Tensor) -> torch.Tensor:
    """[B, H, M] standardised per batch row over all heads and tokens of the layer together."""
    flat = scores.float().flatten(1)
    mean = flat.mean(1).view(-1, 1, 1)
    std = flat.std(1, correction=0).clamp_min(1e-12).view(-1, 1, 1)
    return (scores.float() - mean) / std


def _heads(module: torch.nn.Module, hidden: torch.Tensor, proj: str, norm: str) -> torch.Tensor:
    B, T, _ = hidden.shape
    x = getattr(module, proj)(hidden).view(B, T, -1, module.head_dim)
    if getattr(module, norm, None) is not None:  # Qwen3 / Gemma3 per-head RMSNorm
        x = getattr(module, norm)(x)
    return x.transpose(1, 2)


@torch.no_grad()
def prerope_keys(module: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """[B, T, D] attention input -> [B, H, T, d] keys before RoPE (k_proj, then k_norm if any)."""
    return _heads(module, hidden, "k_proj", "k_norm")


def apply_model_rope(module: torch.nn.Module, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, d] to `positions` [T] with the model family's own rotary code
    (`<Family>RotaryEmbedding` and `apply_rotary_pos_emb` of the attention module's file)."""
    family = sys.modules[type(module).__module__]
    apply = getattr(family, "apply_rotary_pos_emb", None)
    rotary = next((v for n, v in vars(family).items() if n.endswith("RotaryEmbedding") and isinstance(v, type)), None)
    if apply is None or rotary is None:
        raise ValueError(f"compactor: cannot find the rotary embedding of {type(module).__name__} "
                         f"(expected *RotaryEmbedding and apply_rotary_pos_emb in {family.__name__})")
    kwargs = {}
    if "layer_type" in inspect.signature(rotary.forward).parameters:  # per-layer-type RoPE (Gemma 3)
        kwargs["layer_type"] = getattr(module, "layer_type", None) or "full_attention"
    cos, sin = _rotary(rotary, module.config, x.device)(x, positions.to(x.device)[None], **kwargs)
    return apply(x, x, cos, sin)[0]


_ROTARIES: dict = {}


def _rotary(cls, config, device):
    """One rotary embedding per (class, config, device): its frequency tables are built once."""
    key = (cls, id(config), str(device))
    if key not in _ROTARIES:
        _ROTARIES[key] = (config, cls(config).to(device))  # the config is held so its id stays unique
    return _ROTARIES[key][1]


@torch.no_grad()
def context_queries(module: torch.nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, T, D] attention input at `positions` [T] -> [B, Hq, T, d] post-RoPE queries, as the model
    computes them (q_proj, q_norm if any, RoPE)."""
    return apply_model_rope(module, _heads(module, hidden, "q_proj", "q_norm"), positions)


_KVPRESS_SKETCHES: dict = {}


def kvpress_sketch(seed: int, layer_idx: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The Phi [B, H, d, k] kvpress's LeverageScorePress draws at layer `layer_idx` when the global
    CPU generator was seeded with `torch.manual_seed(seed)` before the prefill: one
    `torch.randn(B, H, d, k)` per layer, in layer order, times 1 / sqrt(k) (replayed on a private
    generator, never the global one; kept per (seed, shape, dtype): callers must not modify it)."""
    gen, draws = _KVPRESS_SKETCHES.setdefault((seed, tuple(shape), dtype), (torch.Generator().manual_seed(seed), []))
    while len(draws) <= layer_idx:
        draws.append(torch.randn(*shape, generator=gen, dtype=dtype) * (1 / math.sqrt(shape[-1])))
    return draws[layer_idx]


def kvpress_leverage(keys: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """kvpress's approximate leverage of pre-RoPE `keys` [B, H, M, d] with `phi` [B, H, d, k] ->
    [B, H, M] fp32: x = (K - mean) Phi (centred in the keys' dtype), `diag(x (x^T x + c I)^-1 x^T)`
    by a Cholesky solve, the jitter c = 0.01, raised tenfold (up to 4 times) while the
    factorisation fails; clamped at 0."""
    x = torch.matmul(keys - keys.mean(dim=-2, keepdim=True), phi).to(torch.float32)
    xt = x.transpose(-2, -1)
    gram = xt @ x
    gram = 0.5 * (gram + gram.transpose(-2, -1))
    eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    for jitter in (1e-2, 1e-1, 1.0, 10.0, 100.0):
        chol, info = torch.linalg.cholesky_ex(gram + jitter * eye, upper=False)
        if bool((info == 0).all()):
            break
    else:
        raise RuntimeError("compactor (kvpress parity): the Cholesky factorisation failed with jitter up to 100")
    return (x * torch.cholesky_solve(xt, chol, upper=False).transpose(-2, -1)).sum(dim=-1).clamp_min(0)


def kvpress_chunk_attention(queries: torch.Tensor, keys: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """kvpress's non-causal chunked attention mass: queries [B, Hq, M, d], keys [B, H, M, d] ->
    [B, Hq, M] fp32, no 1/sqrt(d). M is zero-padded to whole chunks; in the last chunk the padded
    queries' logits are 0 and the padded keys' -1e-9, so padded keys take mass and padded queries
    spread 1/chunk over every key; the mass each key gets is summed over its chunk's queries."""
    B, Hq, M, d = queries.shape
    keys = keys.repeat_interleave(Hq // keys.shape[1], dim=1)
    n = -(-M // chunk_size)
    pad = n * chunk_size - M
    q = F.pad(queries, (0, 0, 0, pad)).reshape(B, Hq, n, chunk_size, d)
    k = F.pad(keys, (0, 0, 0, pad)).reshape(B, Hq, n, chunk_size, d)
    logits = torch.matmul(q, k.transpose(-2, -1))
    if pad:
        padded = torch.arange(chunk_size, device=q.device) >= chunk_size - pad
        last = logits[:, :, -1]
        last.masked_fill_(padded[:, None], 0)
        last.masked_fill_(padded[None, :], -1e-9)
    return torch.softmax(logits.to(torch.float32), dim=-1).sum(dim=-2).view(B, Hq, -1)[..., :M]


def kvpress_zscore(x: torch.Tensor) -> torch.Tensor:
    """kvpress's z-score: over the whole tensor (all batch rows, heads and tokens), unbiased std."""
    return (x - x.mean()) / x.std().clamp_min(1e-6)


@dataclass(frozen=True)
class CompactorPress(Press):
    """Compactor (Chari & Van Durme, "Compactor: Calibrated Query-Agnostic KV Cache Compression
    with Approximate Leverage Scores", arXiv 2507.08143, v2 Dec 2025), query-agnostic.

    Per layer, over the unprotected middle of the compressed region (as kvpress; the protected
    tokens never enter the scores nor their statistics):
    - `o`: leverage of the pre-RoPE keys (k_proj of the captured attention inputs), approximated
      with a right Gaussian sketch Phi [d, k] (k = `sketch_dim`, capped at d) drawn once from a
      generator seeded with `seed`, per KV head on the whole middle (kvpress; compactor-vllm uses
      512-token chunks);
    - `a`: non-causal attention inside `chunk_size`-token chunks, post-RoPE queries (recomputed
      from the attention inputs) against the cached post-RoPE keys -- both references use
      post-RoPE here --, no 1/sqrt(d) scale (both references), summed over the chunk's queries
      and the GQA group's query heads (compactor-vllm; kvpress takes the group mean);
    - `s = z(a) + blending * z(o)`, each z-scored per layer (over all KV heads and tokens of a
      batch row together, as compactor-vllm's per-sequence z-score), so scores stay comparable
      across heads for `head_adaptive`.
    The first `sink_tokens` and last `recent_tokens` are protected (max + 1).

    Defaults: kvpress's choices (`scoring="kvpress"`, `blending=None`), because they scored
    higher on the project's suite (docs/results.md, "Defaults vs kvpress": 0.655 / 0.537 / 0.337
    against the paper's choices' 0.620 / 0.404 / 0.118 at ratios 0.5 / 0.75 / 0.9, n = 51,
    query-agnostic). `scoring="paper", blending=0.3` is the paper's (and kvray's earlier default),
    described next.

    Fields: sink_tokens=8, recent_tokens=4 (kvpress's port by the first author; compactor-vllm
    uses 16 / 64); chunk_size=256 (paper, kvpress); sketch_dim=48 (paper); blending=None: the
    compression ratio (kvpress's heuristic), or a number (the paper's lambda is 0.3,
    compactor-vllm's 0.5); scoring="kvpress": kvpress's score computation (the `parity` paragraph
    below) with kvray's keep counts, selection and protection (max + 1, never a tie), so plans
    and head_adaptive apply; "paper": the computation described first; seed=0;
    head_adaptive=False: uniform per-head budgets (kvpress); True: the layer's budget goes to its
    KV heads by the global top-k of the z-scored scores (the paper's head-adaptive variant, real
    per-head budgets) with a floor of `head_floor` times the uniform share (AdaKV's allocation;
    head_floor=0 is compactor-vllm's floor-free global top-k).

    Deviations from the reference code: leverage via a float64 eigendecomposition of the k x k
    Gram matrix with a relative cut-off (a pseudo-inverse) instead of a ridge + SVD (vllm) or
    Cholesky (kvpress); Phi is seeded and shared by every layer and head (kvpress redraws it per
    call); a short last chunk is a plain shorter chunk (no padded keys stealing mass as in
    kvpress, no 1/C mass from invalid rows as in vllm); no value-norm weighting or pooling of `a`
    (kvpress extras); protection with max + 1, never a tie (kvpress pads with max). Needs the
    prefill's hidden states (`needs_hidden`); the context-calibrated retention is not part of it.
    blending=None: the target compression ratio (kvpress's heuristic).

    parity="kvpress": kvpress's CompactorPress op for op (make_press sets blending=None; its other
    defaults are kvray's): leverage by a Cholesky solve (`kvpress_leverage`) with a sketch that
    replays kvpress's per-layer draws from torch's global CPU generator seeded with `seed`
    (`kvpress_sketch`); the chunked attention with kvpress's padding (`kvpress_chunk_attention`),
    averaged over the GQA group, times each value's norm, avg-pooled over 3 tokens (zero padding
    counted); both z-scored over the whole layer (unbiased std), summed as
    `blending * leverage + attention`; the protected tokens padded with the layer's max (a tie);
    kvpress's truncated keep count. No head_adaptive (kvpress has none), no cap of sketch_dim at d.
    """

    sink_tokens: int = 8
    recent_tokens: int = 4
    chunk_size: int = 256
    sketch_dim: int = 48
    blending: float | None = None
    seed: int = 0
    head_adaptive: bool = False
    head_floor: float = 0.2
    scoring: str = "kvpress"
    name = "compactor"
    needs_hidden = True
    kvpress_defaults = {"blending": None, "scoring": "kvpress"}

    def __post_init__(self):
        super().__post_init__()

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for f, lo in (("sink_tokens", 0), ("recent_tokens", 0), ("chunk_size", 1), ("sketch_dim", 1), ("seed", 0)):
            v = getattr(self, f)
            if not is_int(v) or v < lo:
                raise ValueError(f"{self.name}: {f} must be an integer >= {lo}, got {v!r}")
        b = self.blending
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < math.inf):
            raise ValueError(f"{self.name}: blending (lambda, the weight of the leverage score) must be a "
                             f"finite number >= 0 or None (the compression ratio), got {b!r}")
        object.__setattr__(self, "blending", None if b is None else float(b))
        if not isinstance(self.head_adaptive, bool):
            raise ValueError(f"{self.name}: head_adaptive must be True or False, got {self.head_adaptive!r}")
        f = self.head_floor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            raise ValueError(f"{self.name}: head_floor must be a number in [0, 1], got {f!r}")
        object.__setattr__(self, "head_floor", float(f))
        if self.scoring not in ("kvpress", "paper"):
            raise ValueError(f"{self.name}: scoring must be 'kvpress' or 'paper', got {self.scoring!r}")
        if self.parity == "kvpress" and self.scoring != "kvpress":
            raise ValueError(f"{self.name}: parity='kvpress' scores as kvpress does (scoring='kvpress')")
        if self.parity == "kvpress" and self.head_adaptive:
            raise ValueError(f"{self.name}: kvpress's Compactor has no head_adaptive variant (parity='kvpress')")

    @property
    def weight(self) -> float:
        """The leverage score's weight: `blending`, or the target compression ratio when None."""
        return self.target_ratio if self.blending is None else self.blending

    @torch.no_grad()
    def score(self, layer: LayerInputs) -> torch.Tensor:
        if layer.hidden is None or layer.module is None:
            raise ValueError(f"{self.name} needs each layer's attention inputs: prefill with capture_hidden=True "
                             "(kvray.generate.hidden_needed_for(presses) says when)")
        if self.parity == "kvpress":
            return self.kvpress_score(layer)
        B, H, N, d = layer.keys.shape
        if self.scoring == "kvpress":  # kvpress's scores; kvray's protection (max + 1, never a tie)
            first = min(self.sink_tokens, N)
            last = min(self.recent_tokens, N - first)
            if N - last - first < 2:  # nothing, or one token, to z-score
                return protect(torch.zeros(B, H, N, device=layer.keys.device), first=first, last=last)
            return protect(self.kvpress_score(layer).float(), first=first, last=last)
        first = min(self.sink_tokens, N)
        last = min(self.recent_tokens, N - first)
        scores = torch.zeros(B, H, N, dtype=torch.float32, device=layer.keys.device)
        end = N - last
        if end > first:
            def parts():
                hidden = layer.hidden[:, first:end]
                phi = gaussian_sketch(d, min(self.sketch_dim, d), self.seed)
                leverage = approx_leverage(prerope_keys(layer.module, hidden), phi)
                queries = context_queries(layer.module, hidden, torch.arange(first, end))
                attention = noncausal_chunk_attention(queries, layer.keys[:, :, first:end], self.chunk_size)
                return zscore(attention), zscore(leverage)

            attention, leverage = self._parts(layer, "paper", parts)
            scores[..., first:end] = attention + self.weight * leverage
        return protect(scores, first=first, last=last)

    def _parts(self, layer: LayerInputs, kind: str, compute) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention, leverage), z-scored: what the score blends with `weight`. Neither depends
        on the budget or the weight, so they are computed once per layer view and memoised on it
        (`Prefill.state` shares the views by every config of a sample: every ratio, and every
        trial of a Tune actor, pays for them once)."""
        memo = layer.__dict__.setdefault("_compactor_parts", {})
        key = (kind, self.sink_tokens, self.recent_tokens, self.chunk_size, self.sketch_dim, self.seed,
               id(layer.keys), id(layer.values), id(layer.hidden), id(layer.module))
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    def kvpress_score(self, layer: LayerInputs) -> torch.Tensor:
        """The scores of kvpress's CompactorPress (see the class docstring)."""
        B, H, N, d = layer.keys.shape
        first = min(self.sink_tokens, N)
        last = min(self.recent_tokens, N - first)
        end = N - last
        if end <= first:
            raise ValueError(f"{self.name}: kvpress needs tokens between the {first} sinks and the {last} recent ones")

        def parts():
            hidden, module = layer.hidden[:, first:end], layer.module
            keys = prerope_keys(module, hidden)
            phi = kvpress_sketch(self.seed, layer.layer_idx, (B, H, d, self.sketch_dim), keys.dtype).to(keys.device)
            leverage = kvpress_zscore(kvpress_leverage(keys, phi))
            queries = context_queries(module, hidden, torch.arange(first, end))
            mass = kvpress_chunk_attention(queries, layer.keys[:, :, first:end], self.chunk_size)
            mass = mass.view(B, H, -1, end - first).mean(dim=-2) * layer.values[:, :, first:end].norm(dim=-1)
            return kvpress_zscore(F.avg_pool1d(mass, kernel_size=3, padding=1, stride=1)), leverage

        attention, leverage = self._parts(layer, "kvpress", parts)
        scores = self.weight * leverage + attention
        return F.pad(scores, (first, last), value=scores.max().item())

    def allocate(self, state: PrefillState, scores: list[torch.Tensor]) -> list[list[int]]:
        if not self.head_adaptive:
            return super().allocate(state, scores)
        # one allocation per layer, shared by the batch (kvray evaluates one sample at a time)
        return [head_adaptive_counts(s.float().mean(0), sum(row), self.head_floor)
                for s, row in zip(scores, self.layer_counts(state))]

"""Prefill and the one forward every caller uses; what scorers see of a prefill.

One prefill serves every compression config of a sample, in both protocols: the context is
run first (query-agnostic configs compress it), then the rest of the prompt (query-aware configs
compress all of it). Shapes (B batch, H KV heads, Hq query heads, N tokens of the compressed
region, W window queries, d head dim, D hidden size):

- `LayerInputs.keys`, `.values`: [B, H, N, d], keys post-RoPE (as cached);
- `LayerInputs.queries`: [B, Hq, W, d] post-RoPE, the last W queries of the compressed region,
  at original positions `query_positions` [W];
- `LayerInputs.hidden`: [B, N, D] the attention module's input (after the input layernorm)
  over the compressed region; only captured for presses with `needs_hidden`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..cache import ATTN_IMPLEMENTATION, KVRayCache, KVRayLayer, RaggedKV
from .attention import enable_kvray_attention
from .prompt import PromptTokens
from .support import layer_window, windowed_layers

DEFAULT_CAPTURE_WINDOW = 64


@dataclass(frozen=True)
class LayerInputs:
    """What scorers see of one layer after the prefill (views, never modified)."""

    layer_idx: int
    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor | None = None
    query_positions: torch.Tensor | None = None
    module: torch.nn.Module | None = None
    hidden: torch.Tensor | None = None
    #: [start, end) positions of the question inside the compressed tokens (query-aware protocol
    #: with a non-empty question), else None
    question: tuple[int, int] | None = None
    #: the layer's sliding window (None: it attends to the whole context)
    window: int | None = None

    @property
    def n_tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]


@dataclass
class PrefillState:
    """The full prefill cache of the compressed region, shared by every config of a sample.

    `layers` are the layers presses compress (their model index in `layer_idx`): every layer,
    except in a hybrid model (sliding-window and full-attention layers mixed), where the sliding
    layers are in `windowed` instead and keep their window (`assemble`). Budgets, plans,
    `num_layers`, `kv_bytes()` and compression ratios are over `layers`."""

    layers: list[LayerInputs]
    n_tokens: int
    windowed: list[LayerInputs] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_kv_heads(self) -> int:
        return self.layers[0].num_kv_heads

    @property
    def batch(self) -> int:
        return self.layers[0].keys.shape[0]

    def kv_bytes(self) -> int:
        """Bytes of the compressed layers' full cache (the reference of compression ratios)."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers)

    def assemble(self, layers: list[KVRayLayer]) -> KVRayCache:
        """The model's cache from the compressed layers (one per `self.layers`, in order) and
        the windowed layers, each keeping its last window - 1 entries: all the next token sees."""
        if not self.windowed:
            return KVRayCache(layers)
        if len(layers) != len(self.layers):
            raise ValueError(f"{len(layers)} compressed layers for {len(self.layers)} to compress")
        out: list = [None] * (len(self.layers) + len(self.windowed))
        for inputs, layer in zip(self.layers, layers):
            out[inputs.layer_idx] = layer
        for inputs in self.windowed:
            out[inputs.layer_idx] = window_layer(inputs, self.n_tokens)
        return KVRayCache(out)


def window_layer(inputs: LayerInputs, n_tokens: int) -> KVRayLayer:
    """A sliding layer's cache after `n_tokens`: the last window - 1 positions of every head."""
    B, H = inputs.keys.shape[:2]
    keep = torch.arange(max(0, n_tokens - inputs.window + 1), n_tokens, device=inputs.keys.device)
    layer = KVRayLayer(prefix=RaggedKV.gather(inputs.keys, inputs.values, [keep] * (B * H)), prefix_tokens=n_tokens)
    layer.window = inputs.window
    return layer


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
    _states: dict = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict:
        """A prefill travels between processes (e.g. through Ray's object store) without the
        model's attention modules and the scorers' views: the receiver calls `bind` with its
        own copy of the same model."""
        state = dict(self.__dict__)
        state["modules"], state["_states"] = None, {}
        return state

    def bind(self, lm) -> "Prefill":
        """Attach `lm`'s attention modules (after unpickling); `lm` must be the model that made
        the prefill (same layers, KV heads and head size). Returns self."""
        modules = attention_modules(lm.model)
        layer = self.cache.layers[0]
        if len(modules) != len(self.cache.layers) or lm.num_kv_heads != layer.keys.shape[1]:
            raise ValueError(f"this prefill has {len(self.cache.layers)} layers x {layer.keys.shape[1]} KV heads; "
                             f"{lm.name} has {len(modules)} x {lm.num_kv_heads}: bind it to the model that made it")
        self.modules, self._states = modules, {}
        return self

    def state(self, query_aware: bool) -> PrefillState:
        """The scorers' views of one protocol, built once and shared by every config of the
        sample (so what scorers memoise on a layer, e.g. window scores, is computed once)."""
        if query_aware not in self._states:
            self._states[query_aware] = self._state(query_aware)
        return self._states[query_aware]

    def _state(self, query_aware: bool) -> PrefillState:
        if self.modules is None:
            raise RuntimeError("this prefill came from another process: call .bind(lm) with the model first")
        n = self.n_aware if query_aware else self.n_context
        n_q = len(self.prompt.question)
        question = (self.n_context, self.n_context + n_q) if query_aware and n_q and self.n_aware > self.n_context else None
        layers, windowed = [], []
        kept_whole = set(windowed_layers(self.windows))
        for i, layer in enumerate(self.cache.layers):
            if query_aware:
                q, qpos = layer.window_queries, layer.window_positions
            else:
                q, qpos = self.agnostic_queries[i]
            hidden = self.hidden[i][:, :n] if self.hidden is not None else None
            inputs = LayerInputs(i, layer.keys[:, :, :n], layer.values[:, :, :n], q, qpos, self.modules[i],
                                 hidden=hidden, question=question, window=self.windows[i])
            (windowed if i in kept_whole else layers).append(inputs)
        return PrefillState(layers, n, windowed)

    @property
    def windows(self) -> list[int | None]:
        """Each layer's sliding window (None: full attention)."""
        return [layer_window(m) for m in self.modules]

    def rest(self, query_aware: bool) -> list[int]:
        """Tokens fed on the compressed cache before generation starts."""
        return [] if query_aware else self.prompt.rest

    def first_logits(self, query_aware: bool) -> torch.Tensor | None:
        """Logits of the first answer token when nothing is fed after compression."""
        return self.aware_logits if query_aware else None


def attention_modules(model) -> list:
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


def ensure_kvray_attention(lm) -> None:
    """Route the model's attention through kvray's (once; a no-op afterwards)."""
    if lm.model.config._attn_implementation != ATTN_IMPLEMENTATION:
        enable_kvray_attention(lm.model)


def forward(lm, rows: list[list[int]], cache: KVRayCache, positions: list[int] | None = None,
            logits_to_keep: int = 1) -> torch.Tensor:
    """Feed one list of ids per batch row (all of one length) on `cache`; returns the logits
    of the last `logits_to_keep` positions, [B, vocab] when it is 1, else [B, k, vocab].
    `positions`: per row, the original position of its first fed token (rows of different
    prompts); None lets the model count from the cache's length."""
    x = torch.tensor(rows, device=lm.device)
    kwargs = {}
    if positions is not None:
        q = x.shape[1]
        start = torch.tensor(positions, device=lm.device, dtype=torch.long)[:, None]
        kwargs["position_ids"] = start + torch.arange(q, device=lm.device)[None, :]
    logits = lm.model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=logits_to_keep, **kwargs).logits
    return logits[:, -1] if logits_to_keep == 1 else logits


@contextmanager
def attention_inputs(modules: list, enabled: bool):
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
def prefill(lm, prompt: PromptTokens, capture_window: int = DEFAULT_CAPTURE_WINDOW,
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
    ensure_kvray_attention(lm)
    n_ctx = len(prompt.context)
    total = len(prompt)
    if lm.max_context and total > lm.max_context:
        raise ValueError(f"prompt is {total} tokens; {lm.name} supports at most {lm.max_context}")
    cache = KVRayCache.empty(lm.num_layers, capture_window=capture_window)
    modules = attention_modules(lm.model)
    with attention_inputs(modules, capture_hidden) as pieces:
        t0 = time.perf_counter()
        forward(lm, [prompt.context], cache)
        agnostic = [(layer.window_queries, layer.window_positions) for layer in cache.layers]
        n_aware, aware_logits = n_ctx, None
        rest = prompt.rest
        if with_question and rest:
            for layer in cache.layers:  # every question row, for scorers that read the question (observation="question")
                layer.capture_window = max(capture_window, len(rest))
            aware_logits = forward(lm, [rest], cache)[0]
            n_aware += len(rest)
        prefill_s = time.perf_counter() - t0
    for layer in cache.layers:
        layer.capture_window = 0
    hidden = [p[0] if len(p) == 1 else torch.cat(p, dim=1) for p in pieces] if capture_hidden else None
    return Prefill(cache, prompt, n_ctx, n_aware, aware_logits, agnostic, prefill_s, modules, hidden)


def capture_window_for(presses) -> int:
    sizes = [getattr(p, "window_size", 0) for p in presses]
    sizes += [getattr(getattr(p, "inner", None), "window_size", 0) for p in presses]
    return max([DEFAULT_CAPTURE_WINDOW, *sizes])


def hidden_needed_for(presses) -> bool:
    """Whether any press (or the scorer it wraps) reads the layers' hidden states."""
    return any(getattr(p, "needs_hidden", False) or getattr(getattr(p, "inner", None), "needs_hidden", False)
               for p in presses)

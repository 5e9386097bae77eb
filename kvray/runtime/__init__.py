"""The runtime below the presses: prompt layout, prefill, the one forward, the attention
dispatch (`impl="auto" | "torch" | "triton"`) and the step-wise decoder with per-row state that
every caller drives (kvray.generate, the evaluation runner, Tune, long generation, LAQ's lookahead
and the Serve replica; calibration's teacher forcing is one `forward` on the compressed cache)."""

from .attention import IMPLS, enable_kvray_attention, kvray_attention, ragged_attention, ragged_attention_torch
from .decoder import Decoder, Row
from .prefill import (DEFAULT_CAPTURE_WINDOW, LayerInputs, Prefill, PrefillState, attention_modules,
                      capture_window_for, ensure_kvray_attention, forward, hidden_needed_for, prefill)
from .prompt import PromptTokens, build_prompt, stop_token_ids
from .support import UnsupportedModelError, check_supported, unsupported_reasons

__all__ = [
    "IMPLS", "enable_kvray_attention", "kvray_attention", "ragged_attention", "ragged_attention_torch", "Decoder",
    "Row", "DEFAULT_CAPTURE_WINDOW", "LayerInputs", "Prefill", "PrefillState", "attention_modules",
    "capture_window_for", "ensure_kvray_attention", "forward", "hidden_needed_for", "prefill", "PromptTokens",
    "build_prompt", "stop_token_ids", "UnsupportedModelError", "check_supported", "unsupported_reasons",
]

"""Every Triton kernel against its torch twin (kvray/kernels), over awkward shapes, in fp32 and
fp16 (and bf16 through the launcher's fp32 cast, as Triton's interpreter multiplies bf16 wrong).
On a machine without CUDA the kernels run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1 before triton is imported); with CUDA they run on the GPU."""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from kvray.cache import RaggedKV  # noqa: E402
from kvray.kernels import ragged_attention, window_scores  # noqa: E402
from kvray.runtime.attention import ragged_attention_torch, resolve_impl  # noqa: E402
from kvray.kernels.window_scores import window_scores_torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

# (per (row, KV head) prefix lengths with H = 2, G, q_len, d, tail length T, pads per row, softcap)
RAGGED = {
    "uniform": ([6] * 4, 3, 1, 64, 4, (0, 1), None),
    "skewed": ([1, 9, 40, 3], 3, 1, 64, 5, (0, 2), None),
    "empty_head": ([0, 13, 5, 0], 1, 1, 128, 3, (0, 0), None),
    "one_entry": ([1, 1], 7, 1, 64, 1, (0,), None),
    "not_pow2_long": ([700, 33, 257, 1], 3, 1, 128, 6, (1, 4), None),  # split-K over 2 parts
    "gqa7": ([11, 4, 0, 9], 7, 1, 64, 2, (0, 1), None),
    "extend_q3": ([8, 5, 2, 17], 3, 3, 64, 7, (2, 0), None),
    "extend_q3_g1": ([3, 3, 3, 3], 1, 3, 128, 3, (0, 0), None),
    "softcap": ([10, 20, 5, 7], 3, 1, 64, 4, (0, 3), 0.7),
    "head_dim_24": ([4, 6, 6, 1], 3, 1, 24, 3, (0, 1), None),  # d not a power of two (masked)
    "three_rows": ([5, 0, 9, 2, 12, 12], 3, 1, 64, 6, (0, 5, 2), None),  # a row that just joined
}


def _ragged_case(name, dtype, seed=0):
    lengths, G, q_len, d, T, pads, softcap = RAGGED[name]
    H = 2
    B = len(lengths) // H
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    keys, values = (torch.randn(total, d, generator=g).to(DEVICE, dtype) for _ in range(2))
    prefix = RaggedKV(keys, values, torch.arange(total, device=DEVICE), tuple(lengths), B, H)
    query = torch.randn(B, H * G, q_len, d, generator=g).to(DEVICE, dtype)
    tk, tv = (torch.randn(B, H, T, d, generator=g).to(DEVICE, dtype) for _ in range(2))
    return prefix, query, tk, tv, pads, softcap, d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(RAGGED))
def test_ragged_attention_kernel_matches_its_twin(name, dtype):
    prefix, query, tk, tv, pads, softcap, d = _ragged_case(name, dtype)
    scaling = 1 / math.sqrt(d)
    got = ragged_attention(query, prefix, tk, tv, scaling, pads, softcap, impl="triton")
    # the twin in fp64: the reference the kernel's fp32 accumulation is held to
    p64 = RaggedKV(prefix.keys.double(), prefix.values.double(), prefix.positions, prefix.lengths,
                   prefix.batch, prefix.heads)
    want = ragged_attention_torch(query.double(), p64, tk.double(), tv.double(), scaling, pads, softcap)
    err = (got.double() - want).abs().max().item()
    print(f"{name} {dtype}: worst mismatch {err:.2e} (tolerance {TOL[dtype]:.0e})")
    assert got.shape == want.shape and got.dtype == dtype
    assert err < TOL[dtype]


def test_ragged_attention_kernel_bf16_through_the_launcher():
    prefix, query, tk, tv, pads, softcap, d = _ragged_case("skewed", torch.bfloat16)
    got = ragged_attention(query, prefix, tk, tv, 0.125, pads, impl="triton")
    want = ragged_attention_torch(query.float(), RaggedKV(prefix.keys.float(), prefix.values.float(),
                                  prefix.positions, prefix.lengths, prefix.batch, prefix.heads),
                                  tk.float(), tv.float(), 0.125, pads)
    err = (got.float() - want).abs().max().item()
    print(f"bf16: worst mismatch {err:.2e}")
    assert got.dtype == torch.bfloat16 and err < TOL[torch.bfloat16]


# (B, H, G, W, N, d)
WINDOW = {
    "small": (1, 2, 3, 5, 37, 64),
    "one_key": (1, 1, 3, 1, 1, 64),
    "window_longer_than_keys": (1, 2, 7, 20, 17, 64),
    "d128_batch2": (2, 1, 1, 16, 100, 128),
    "gqa7_not_pow2": (1, 2, 7, 9, 203, 64),
    "head_dim_24": (1, 3, 3, 6, 50, 24),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(WINDOW))
def test_window_scores_kernel_matches_its_twin(name, dtype):
    B, H, G, W, N, d = WINDOW[name]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H * G, W, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, H, N, d, generator=g).to(DEVICE, dtype)
    qpos = torch.arange(N - W, N) if W <= N else torch.arange(W)  # the last W tokens (or past the keys)
    got = window_scores(q, qpos, k, impl="triton")
    want = window_scores_torch(q.double(), qpos, k.double())
    err = (got.double() - want.double()).abs().max().item()
    print(f"{name} {dtype}: worst mismatch {err:.2e}")
    assert got.shape == (B, H * G, N) and got.dtype == torch.float32
    assert err < TOL[dtype]
    # each window row's probabilities sum to 1, so the mean over rows does too
    torch.testing.assert_close(got.sum(-1), torch.ones(B, H * G, device=DEVICE), atol=1e-3, rtol=0)


def test_auto_never_picks_the_interpreter_and_explains_why():
    if DEVICE == "cuda":
        assert resolve_impl("auto", torch.device("cuda")) == "triton"
    else:
        assert resolve_impl("auto", torch.device("cpu")) == "torch"
        assert resolve_impl("triton", torch.device("cpu")) == "triton"  # the interpreter, explicitly


def test_decoder_on_the_kernel_equals_the_torch_path(tiny_llama):
    """The runtime's dispatch end to end: a mixed batch (uniform and per-head budgets, two
    prompts, both protocols) decoded with impl="triton" gives the logits of impl="torch"."""
    import kvray
    from kvray.generate import compress
    from kvray.runtime import Decoder, build_prompt, prefill

    lm = tiny_llama
    runs = {}
    for impl in ("torch", "triton"):
        dec = Decoder(lm, impl=impl)
        seen: dict = {}
        for i, (n, method, aware) in enumerate([(3, "snapkv", False), (5, "adakv", True), (4, "full", False)]):
            prompt = build_prompt(lm.tokenizer, "The clerk counted crates at the dock. " * n, "Who counted?")
            pre = prefill(lm, prompt, with_question=aware)
            press = kvray.make_press(method, compression_ratio=0.0 if method == "full" else 0.5)
            dec.add(compress(lm, pre, press, aware), feed=pre.rest(aware), first_logits=pre.first_logits(aware),
                    max_new_tokens=4, key=i, ignore_stop_tokens=True,
                    on_logits=lambda row, lg: seen.setdefault(row.key, []).append(lg.float().clone()))
        dec.run()
        runs[impl] = seen
    for i in runs["torch"]:
        got, want = torch.stack(runs["triton"][i]), torch.stack(runs["torch"][i])
        print(f"row {i}: worst |logit| mismatch {(got - want).abs().max().item():.2e}")
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

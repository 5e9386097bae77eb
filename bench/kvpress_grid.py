"""The 19-config grid as kvpress 0.5.5 runs it: one prefill per config (part (c) of
bench/bench_engine.py calls this to time the baseline the issue names, side by side).

Runs in the kvpress virtualenv (kvpress pins transformers < 5.3; see tools/kvpress_fixtures.py):

    python3 -m venv .venv-kvpress && .venv-kvpress/bin/pip install torch==2.13.0 kvpress==0.5.5
    .venv-kvpress/bin/python bench/kvpress_grid.py --model-dir DIR --samples FILE.json [--dtype bfloat16]

FILE.json holds {"samples": [{"context", "question", "answer_prefix", "max_new_tokens"}, ...]}
(bench_engine writes it from kvray's own samples, so both sides see the same prompts). Every
sample goes through kvpress's text-generation pipeline once per config: the full cache (no
press), then random, streaming_llm, knorm, snapkv, pyramidkv and adakv(snapkv) at 0.5 / 0.75 /
0.9 with kvpress's defaults (pyramidkv timed as snapkv: see `grid`); the question is fed after
compression (kvpress's default, kvray eval's query-agnostic protocol), greedy decoding. Prints
one JSON object: seconds per sample (model load not counted) and the answers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

RATIOS = (0.5, 0.75, 0.9)


def grid():
    """(label, press or None) for the 19 configs of bench_engine part (c). kvpress 0.5.5's
    PyramidKVPress fails in its own pipeline on this model once the question is fed after
    compression (transformers 5.2 sizes the attention mask from one layer's length, and
    PyramidKV's layers hold different lengths: "The size of tensor a (972) must match the size of
    tensor b (1003)"), so its three configs are timed as SnapKV at the same ratio: the same
    scorer, the same entries kept on average, so the same cost."""
    from kvpress import AdaKVPress, KnormPress, RandomPress, SnapKVPress, StreamingLLMPress

    yield "full", None
    for name, make in (("random", lambda r: RandomPress(compression_ratio=r, seed=0)),
                       ("streaming_llm", lambda r: StreamingLLMPress(compression_ratio=r)),
                       ("knorm", lambda r: KnormPress(compression_ratio=r)),
                       ("snapkv", lambda r: SnapKVPress(compression_ratio=r)),
                       ("pyramidkv", lambda r: SnapKVPress(compression_ratio=r)),  # see above
                       ("adakv", lambda r: AdaKVPress(press=SnapKVPress(compression_ratio=r)))):
        for r in RATIOS:
            yield f"{name}@{r}", make(r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True, help="a Hugging Face model directory (kvray's converted model)")
    ap.add_argument("--samples", required=True, help="JSON file of samples (see the module docstring)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from kvpress import KVPressTextGenerationPipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    samples = json.loads(open(args.samples).read())["samples"]
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa").eval()
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device="cpu")
    configs = list(grid())
    per_sample, answers = [], []
    for s in samples:
        t0 = time.perf_counter()
        got = {}
        for label, press in configs:
            out = pipe(s["context"], question=s["question"], answer_prefix=s["answer_prefix"], press=press,
                       max_new_tokens=s["max_new_tokens"])
            got[label] = out["answer"]
        per_sample.append(time.perf_counter() - t0)
        answers.append(got)
    print(json.dumps({"configs": len(configs), "samples": len(samples), "dtype": args.dtype, "threads": args.threads,
                      "pyramidkv_timed_as_snapkv": True, "per_sample_s": per_sample,
                      "answers": answers}))


if __name__ == "__main__":
    main()

"""Fixtures of NVIDIA kvpress 0.5.5's kept KV entries, for tests/test_kvpress_parity.py.

For every press kvray mirrors (`make_press(name, parity="kvpress")`), at compression ratios 0.5 and
0.75 with kvpress's default parameters, prefill three contexts the way kvpress's pipeline does
(`KVPressTextGenerationPipeline.preprocess` splits the chat template at a placeholder; the context
part is run through `model.model` under `with press(model)`) on the embedded SmolLM2-135M-Instruct
in float32 on the CPU, and record per layer and KV head the positions kvpress keeps.

kvpress pins transformers<5.3, so it runs in a virtualenv of its own, next to kvray's `.venv`:

    python3 -m venv .venv-kvpress && .venv-kvpress/bin/pip install torch==2.13.0 kvpress==0.5.5
    .venv-kvpress/bin/python tools/kvpress_fixtures.py      # rewrites tests/fixtures/kvpress/ (1-2 min)

kvray's own `.venv` must exist (`make install`). The output is byte-identical from run to run.

The script asks kvray's venv (`--kvray-python`, default .venv/bin/python) for the embedded
model's converted Hugging Face directory (`--model-dir` to give one) and for the three contexts
(`kvray.eval.tasks.make_samples`, deterministic); the texts and the exact context ids go into
prompts.json, so the test does not depend on the task generator.

Captured as kvpress computes them: a ScorerPress's `score` is wrapped and the kept positions are
`scores.topk(n_kept)` with kvpress's own n_kept (checked against the keys its `compress` really
kept); for AdaKV (which masks instead of gathering) the positions not in `masked_key_indices`.
`margin` is the gap between the lowest kept and the highest evicted score of each (layer, head)
(AdaKV: of each layer, over its heads): how close the cut came to a tie. Randomness: RandomPress
with seed=0 (kvpress's default seed=None is unseeded); CompactorPress draws its sketches from
torch's global generator, seeded with torch.manual_seed(0) right before each prefill.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "kvpress"
RATIOS = (0.5, 0.75)
SEED = 0
#: (task, target context length) of the three prompts
PROMPTS = (("niah_single", 300), ("vt", 450), ("fwe", 600))

#: run by kvray's venv: the embedded model's converted directory (written on first load) and the prompts
_FROM_KVRAY = """
import json, sys
import kvray
from kvray.eval.tasks import make_samples
from kvray.models import _converted_dir, _resolve
_, source, gguf = _resolve(None)
model_dir = _converted_dir(source, gguf)
if not (model_dir / "config.json").is_file():
    kvray.load_model(device="cpu")
out = {"model_dir": str(model_dir), "prompts": []}
for task, length in json.loads(sys.argv[1]):
    s = make_samples(task, 1, length, seed=0)[0]
    out["prompts"].append({"sample_id": s.sample_id, "context": s.context, "question": s.question,
                           "answer_prefix": s.answer_prefix})
print(json.dumps(out))
"""


def presses():
    """(kvray method name, kvpress press with its defaults) per press and ratio."""
    from kvpress import (AdaKVPress, CompactorPress, CURPress, KnormPress, PyramidKVPress, RandomPress,
                         SnapKVPress, StreamingLLMPress)

    for r in RATIOS:
        yield "knorm", KnormPress(compression_ratio=r)
        yield "streaming_llm", StreamingLLMPress(compression_ratio=r)
        yield "random", RandomPress(compression_ratio=r, seed=SEED)
        yield "snapkv", SnapKVPress(compression_ratio=r)
        yield "pyramidkv", PyramidKVPress(compression_ratio=r)
        yield "adakv", AdaKVPress(press=SnapKVPress(compression_ratio=r))
        yield "compactor", CompactorPress(compression_ratio=r)
        yield "curdkv", CURPress(compression_ratio=r)


def params_of(press) -> dict:
    """A press's parameters but its ratio (a wrapped press's too), as recorded in the fixtures."""
    out = {}
    for f in dataclasses.fields(press):
        v = getattr(press, f.name)
        if f.name.startswith("_") or f.name == "compression_ratio":
            continue
        out[f.name] = {"press": type(v).__name__, **params_of(v)} if dataclasses.is_dataclass(v) else v
    return out


def margin(scores: torch.Tensor, n_kept: int) -> float | None:
    """Lowest kept minus highest evicted score along the last dimension (None: nothing evicted)."""
    if n_kept >= scores.shape[-1]:
        return None
    top = scores.float().topk(n_kept + 1).values
    return float(f"{(top[..., n_kept - 1] - top[..., n_kept]).item():.4g}")


def capture(press, model, context_ids: torch.Tensor) -> dict:
    """Run kvpress's prefill of `context_ids` under `press`; kept positions (and cut margins) per
    layer and KV head."""
    from kvpress import AdaKVPress, PyramidKVPress
    from kvpress.utils import compute_n_kept
    from transformers import DynamicCache

    scorer = press.press if isinstance(press, AdaKVPress) else press
    layers: dict[int, dict] = {}
    score, compress = scorer.score, press.compress

    def recording_score(module, *args, **kwargs):
        s = score(module, *args, **kwargs)
        # AdaKV lifts its safeguarded scores in place: "ranked" ends up as what it ranks
        layers[module.layer_idx] = {"scores": s.clone(), "ranked": s}
        return s

    def recording_compress(module, hidden_states, keys, values, attentions, kwargs):
        out_keys, out_values = compress(module, hidden_states, keys, values, attentions, kwargs)
        rec = layers[module.layer_idx]
        s = rec["scores"][0]  # [H, N], one batch row
        H, N = s.shape
        if isinstance(press, AdaKVPress):
            _, heads, seq = module.masked_key_indices
            kept = torch.ones(H, N, dtype=torch.bool)
            kept[heads, seq] = False
            rec["kept"] = [row.nonzero().flatten().tolist() for row in kept]
            rec["margin"] = [margin(rec["ranked"][0].flatten(), int(kept.sum()))]  # its cut over all heads
        else:
            n = press.get_layer_budget(module, N) if isinstance(press, PyramidKVPress) \
                else compute_n_kept(N, press.compression_ratio)
            idx = rec["scores"].topk(n, dim=-1).indices  # kvpress's own call in ScorerPress.compress
            gathered = keys.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
            assert torch.equal(gathered, out_keys), f"layer {module.layer_idx}: topk capture != what kvpress kept"
            rec["kept"] = [sorted(row.tolist()) for row in idx[0]]
            rec["margin"] = [margin(row, n) for row in s]
        del rec["scores"], rec["ranked"]
        return out_keys, out_values

    object.__setattr__(scorer, "score", recording_score)
    object.__setattr__(press, "compress", recording_compress)
    try:
        torch.manual_seed(SEED)  # CompactorPress's sketches come from the global generator
        with torch.no_grad(), press(model):
            model.model(input_ids=context_ids, past_key_values=DynamicCache())
    finally:
        for obj, name in ((scorer, "score"), (press, "compress")):
            obj.__dict__.pop(name, None)
    order = sorted(layers)
    return {"kept": [layers[i]["kept"] for i in order], "margin": [layers[i]["margin"] for i in order]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", help="the embedded model's converted HF directory (default: ask kvray)")
    ap.add_argument("--kvray-python", default=str(ROOT / ".venv" / "bin" / "python"))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    from kvpress import KVPressTextGenerationPipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)  # same fixtures as with 2 threads, and no 20x slow-down on busy cores
    info = json.loads(subprocess.run([args.kvray_python, "-c", _FROM_KVRAY, json.dumps(PROMPTS)], check=True,
                                     capture_output=True, text=True).stdout)
    model_dir = Path(args.model_dir or info["model_dir"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer, device="cpu")

    prompts = info["prompts"]
    context_ids = []
    for p in prompts:
        ids = pipe.preprocess(p["context"], [p["question"]], p["answer_prefix"], max_context_length=10**10)
        ids = ids["context_ids"]
        context_ids.append(ids)
        p["context_ids"] = ids[0].tolist()
        cache = DynamicCache()
        with torch.no_grad():
            model.model(input_ids=ids, past_key_values=cache)
        # per layer: digest of the post-RoPE keys kvpress scores (kvray's prefill should match bit for bit)
        p["keys_sha1"] = [hashlib.sha1(layer.keys.contiguous().numpy().tobytes()).hexdigest()[:16]
                          for layer in cache.layers]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"kvpress": version("kvpress"), "transformers": version("transformers"), "torch": torch.__version__,
            "model_dir": model_dir.name, "dtype": "float32", "device": "cpu", "attn_implementation": "sdpa"}
    (out / "prompts.json").write_text(json.dumps({**meta, "prompts": prompts}, indent=1) + "\n")
    by_method: dict[str, dict] = {}
    for method, press in presses():
        entry = by_method.setdefault(method, {**meta, "method": method, "press": type(press).__name__,
                                              "params": params_of(press), "seed": SEED, "cases": []})
        for i, ids in enumerate(context_ids):
            case = capture(press, model, ids)
            entry["cases"].append({"prompt": i, "compression_ratio": press.compression_ratio, **case})
        print(f"{method} r={press.compression_ratio}: {len(context_ids)} prompts", file=sys.stderr)
    for method, entry in by_method.items():
        blob = json.dumps(entry, separators=(",", ":")).encode()
        (out / f"{method}.json.gz").write_bytes(gzip.compress(blob, mtime=0))  # same bytes on every run
    print(f"wrote {len(by_method)} fixtures to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

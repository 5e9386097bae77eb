"""Do the conclusions generalise to another architecture? Every registered method at one ratio,
in both protocols, on the same samples (same texts) for the embedded SmolLM2-135M-Instruct (a
full-attention Llama) and Gemma 3 270M (a hybrid base model: 15 sliding-window layers of 512
tokens, 3 full-attention layers; `make gemma3`), then the section "Two architectures" of
docs/results.md with n and 95% intervals.

    python jobs/results_models.py                      # niah_single, niah_multikey x 15, vt x 10; ratio 0.5
    python jobs/results_models.py --render RUN_ID      # re-render from the Parquet only

On Gemma 3 the ratio is over the full-attention layers (the sliding layers keep their window:
kv_bytes_windowed), as everywhere in kvray.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import kvray
except ImportError:  # a plain source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import kvray

from kvray.eval.tasks import make_samples
from kvray.results import new_run_id, read_results

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "results_models"
MODELS = {"SmolLM2-135M-Instruct": None, "gemma3-270m": "gemma3-270m"}
START, END = "<!-- two-architectures:start -->", "<!-- two-architectures:end -->"


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (scores are in [0, 1], some fractional)."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def run(args) -> str:
    from kvray.eval.runner import ModelHost, build_presses, run_eval, set_threads
    from kvray.presses import list_methods

    set_threads(args.threads)
    base = args.run_id or new_run_id()
    tok = kvray.load_tokenizer()
    count = lambda s: len(tok(s, add_special_tokens=False).input_ids)  # noqa: E731 -- one tokenizer: the same texts for both
    samples = []
    for spec in args.tasks:  # "task" or "task:n"
        task, _, n = spec.partition(":")
        samples += make_samples(task, int(n or args.samples), args.length, seed=args.seed, count_tokens=count)
    presses = build_presses(list_methods(), [args.ratio])
    for label, name in MODELS.items():
        host = ModelHost.load(name)
        print(f"[models] {label}: {len(samples)} samples x {len(presses)} configs x 2 protocols", flush=True)
        run_eval(host, samples, presses, out_dir=OUT, protocols=[False, True], run_id=f"{base}-{label}")
        del host
    return base


def summary_lines(df, tasks) -> list[str]:
    """Per model and protocol: the full cache, and the best compressed method with its interval."""
    out = []
    for protocol in sorted(df["protocol"].unique()):
        parts = []
        for label in MODELS:
            g = df[(df["model"] == label) & (df["protocol"] == protocol)]
            full = g[g["method"] == "full"].sort_values("sample_id")["score"]
            means = g[g["method"] != "full"].groupby("method")["score"].mean().sort_values(ascending=False)
            best = means.index[0]
            lo, hi = bootstrap_ci(g[g["method"] == best].sort_values("sample_id")["score"].to_numpy())
            floor = [t for t in tasks if g[(g["method"] == "full") & (g["task"] == t)]["score"].mean() == 0]
            note = f"; its full cache scores 0 on {', '.join(floor)}" if floor else ""
            parts.append(f"{label}: full {full.mean():.2f}, best {best} {means.iloc[0]:.2f} [{lo:.2f}, {hi:.2f}]{note}")
        out.append(f"- {protocol} at this ratio: " + "; ".join(parts) + ".")
    return out


def render(base: str) -> str:
    import pandas as pd

    frames = []
    for label in MODELS:
        df = read_results(OUT / f"run_id={base}-{label}")
        df["model"] = label
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    df["protocol"] = df["query_aware"].map({True: "query-aware", False: "query-agnostic"})
    tasks = sorted(df["task"].unique())
    n_per = df.groupby(["model", "protocol", "method"])["score"].size()
    rows = []
    for (protocol, method), g in df.groupby(["protocol", "method"], sort=True):
        ratio = g["compression_ratio"].iloc[0]
        cells = []
        for label in MODELS:
            mine = g[g["model"] == label]
            x = mine.sort_values("sample_id")["score"]
            lo, hi = bootstrap_ci(x.to_numpy())
            frac = mine["kv_bytes_kept"].sum() / mine["kv_bytes_full"].sum()
            per_task = " / ".join(f"{mine[mine['task'] == t]['score'].mean():.2f}" for t in tasks)
            cells.append(f"{per_task} | **{x.mean():.2f}** [{lo:.2f}, {hi:.2f}] ({frac:.2f})")
        rows.append(f"| {protocol} | {method} | {ratio:g} | " + " | ".join(cells) + " |")
    n = int(n_per.min())
    first = df[(df["model"] == next(iter(MODELS))) & (df["method"] == "full") & (~df["query_aware"])]
    counts = ", ".join(f"{t} x {int((first['task'] == t).sum())}" for t in tasks)
    lines = [
        START,
        "## Two architectures: SmolLM2-135M (Llama) and Gemma 3 270M (hybrid sliding / full attention)",
        "",
        f"Generated by `python jobs/results_models.py` (run `{base}`): every method at one ratio, both protocols, "
        f"on the same samples ({counts}; ~1k tokens; the same texts for both models), n = {n} per cell. Mean "
        "score over all of them [95% bootstrap interval] (kv_kept = KV bytes held / full). On "
        "Gemma 3 the ratio and kv_kept are over its 3 full-attention layers; its 15 sliding layers keep their "
        "512-token window (`kv_bytes_windowed`, the same for every method). Gemma 3 270M is a base model: the "
        "plain prompt layout, no chat template.",
        "",
        "| protocol | method | ratio | " + " | ".join(f"{m}: {' / '.join(tasks)} | {m}: mean [95% CI] (kv_kept)"
                                                  for m in MODELS) + " |",
        "|---|---|---|" + "---|---|" * len(MODELS),
        *rows,
        "",
        *summary_lines(df, tasks),
        "",
        END,
    ]
    section = "\n".join(lines)
    page = ROOT / "docs" / "results.md"
    text = page.read_text()
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    page.write_text(text)
    return section


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=10, help="per task")
    ap.add_argument("--tasks", type=lambda s: s.split(","), default=["niah_single:15", "niah_multikey:15", "vt:10"],
                    help="comma list of task or task:samples")
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run-id", default=None, help="resume this run")
    ap.add_argument("--render", default=None, metavar="RUN_ID", help="only re-render the page from existing Parquet")
    args = ap.parse_args(argv)
    base = args.render or run(args)
    print(render(base))
    return 0


if __name__ == "__main__":
    sys.exit(main())

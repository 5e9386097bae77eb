"""The results page: run the task suite for every registered method at ratios 0.5 / 0.75 / 0.9
in both protocols on Ray actors (one prefill per sample), then write docs/results.md and PNG
plots (score vs compression per method and task) from the Parquet it wrote.

    python jobs/results_page.py                         # >= 50 samples per cell at 1k and at the 2k point
    python jobs/results_page.py --quick                 # a few samples, to check the pipeline
    python jobs/results_page.py --render RUN_DIR        # only re-render the page from existing Parquet
    python jobs/results_page.py --run-id ID             # resume an interrupted run

The numbers are what they are: nothing here is tuned to the suite.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

try:
    import kvray
except ImportError:  # a plain source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import kvray

from kvray.eval.tasks import make_samples
from kvray.results import new_run_id, read_results
from kvray.stats import bootstrap_ci, format_ci

ROOT = Path(__file__).resolve().parents[1]
RATIOS = [0.5, 0.75, 0.9]
TASKS_1K = ["niah_single", "niah_multikey", "vt"]
TASKS_2K = ["niah_single"]


def run(args) -> Path:
    import ray

    from kvray.actors import run_eval_distributed, start_workers
    from kvray.eval.runner import build_presses

    tok = kvray.load_tokenizer(args.model)

    def count(s: str) -> int:
        return len(tok(s, add_special_tokens=False).input_ids)

    n = 3 if args.quick else args.samples
    n2k = 3 if args.quick else args.samples_2k
    out = Path(args.out).resolve()
    run_id = args.run_id or new_run_id()
    ray.init(log_to_driver=True)
    pool = start_workers(args.workers, args.model, cpus_per_worker=1)
    methods = [m for m in kvray.list_methods()]
    presses = build_presses(methods, RATIOS)
    try:
        for length, tasks, k in ((1000, TASKS_1K, n), (2000, TASKS_2K, n2k)):
            samples = []
            for j, task in enumerate(tasks):
                samples += make_samples(task, k, length=length, seed=100 + j, count_tokens=count)
            print(f"[results] {length} tokens: {len(samples)} samples x {len(presses)} configs x 2 protocols", flush=True)
            run_eval_distributed(pool, samples, presses, out_dir=out, protocols=[False, True],
                                 run_id=f"{run_id}-{length}")
    finally:
        pool.shutdown()
    return out, run_id


def long_generation(out: Path, run_id: str, model: str | None, quick: bool = False) -> None:
    """MorphKV vs snapkv vs the full cache on long outputs (kvray.eval.longgen): teacher-forced
    NLL of a 300-token prose continuation with eviction at every step, and the niah_list task
    (list every planted item, scored by recall). In the driver process, 2 threads."""
    import torch

    from kvray.eval.longgen import compare_long_generation

    path = out / f"longgen-{run_id}.parquet"
    if path.is_file():
        return
    torch.set_num_threads(2)
    lm = kvray.load_model(model)
    n, cont = (1, 60) if quick else (4, 300)
    print(f"[results] long generation: {n} samples, {cont}-token continuations", flush=True)
    df = compare_long_generation(lm, n_samples=n, length=1024, continuation_tokens=cont, seed=7)
    df.to_parquet(path, index=False)


def _span(lo: int, hi: int) -> str:
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _dtype_name() -> str:
    """The dtype the model actors load with (kvray.models.default_dtype on this machine)."""
    import torch

    from kvray.models import default_dtype

    return str(default_dtype(torch.device("cpu"))).replace("torch.", "")


def render(out: Path, run_id: str, page: Path, quick: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    frames = []
    for length in (1000, 2000):
        rd = out / f"run_id={run_id}-{length}"
        if rd.exists():
            frames.append(read_results(rd))
    if not frames:
        raise SystemExit(f"no results for run {run_id} under {out}")
    df = pd.concat(frames, ignore_index=True)
    df["protocol"] = df["query_aware"].map({True: "query-aware", False: "query-agnostic"})
    df["cell"] = df["task"] + "@" + df["target_length"].astype(int).astype(str)
    img_dir = page.parent / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    full = df[df["method"] == "full"].groupby(["protocol", "cell"])["score"].mean()
    methods = [m for m in kvray.list_methods() if m != "full"]
    cells = sorted(df["cell"].unique())
    images = []
    for protocol, part in df.groupby("protocol"):
        fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.8), sharey=True, squeeze=False)
        for ax, cell in zip(axes[0], cells):
            sub = part[part["cell"] == cell]
            for i, m in enumerate(methods):  # 12 methods: distinct colours and line styles
                g = sub[sub["method"] == m].groupby("compression_ratio")["score"].mean()
                if len(g):
                    ax.plot([0.0, *g.index], [full.get((protocol, cell), float("nan")), *g.values], marker="o",
                            label=m, linewidth=1.2, color=plt.cm.tab20(i / max(1, len(methods) - 1)),
                            linestyle=("-", "--", ":")[i % 3])
            ax.set_title(cell)
            ax.set_xlabel("compression ratio")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("score (RULER string match)")
        axes[0][-1].legend(fontsize=7, loc="lower left")
        fig.suptitle(f"{protocol}: score vs compression (ratio 0 = full cache)")
        fig.tight_layout()
        name = f"score_vs_ratio_{protocol.replace('-', '_')}.png"
        fig.savefig(img_dir / name, dpi=110)
        plt.close(fig)
        images.append((protocol, name))
    table = df.pivot_table(index=["protocol", "method", "compression_ratio"], columns="cell", values="score",
                           aggfunc="mean")
    table["mean"] = df.groupby(["protocol", "method", "compression_ratio"])["score"].mean()
    ci = df.groupby(["protocol", "method", "compression_ratio"])["score"].apply(lambda x: format_ci(bootstrap_ci(x.values)))
    kept = df.groupby(["protocol", "method", "compression_ratio"]).apply(
        lambda g: g["kv_bytes_kept"].sum() / g["kv_bytes_full"].sum(), include_groups=False)
    table["kv_kept"] = kept
    n_per_cell = df.groupby(["method", "compression_ratio", "cell", "protocol"]).size()
    lines = [
        "# Results: every method on the task suite", "",
        "Regenerate: `python jobs/results_page.py` (runs everything on Ray, then renders this page); "
        f"re-render from the Parquet only: `python jobs/results_page.py --render {run_id}`.", "",
        f"Generated by `python jobs/results_page.py` (run `{run_id}`, {time.strftime('%Y-%m-%d')}) on the "
        f"embedded SmolLM2-135M-Instruct, CPU in {_dtype_name()}, greedy decoding; rows in Parquet under "
        f"`runs/results/run_id={run_id}-*`. {_span(n_per_cell.min(), n_per_cell.max())} samples per cell "
        "(method x ratio x task x protocol); `mean` is over all tasks, with its 95% bootstrap interval over samples. "
        "Score = RULER string match; `kv_kept` = KV bytes held / full "
        "(real memory: per-head budgets included).", "",
        *(["**Quick run (3 samples per cell): not for conclusions.**", ""] if quick else []),
    ]
    for protocol, name in images:
        lines += [f"![{protocol}](img/{name})", ""]
    cols = list(table.columns)
    lines += ["| protocol | method | ratio | " + " | ".join(cols[:-1]) + " | mean 95% CI | kv_kept |",
              "|---|---|---|" + "---|" * (len(cols) + 1)]
    for key, row in table.iterrows():
        protocol, method, ratio = key
        cells = [f"{v:.2f}" for v in row.values]
        lines.append(f"| {protocol} | {method} | {ratio:g} | " + " | ".join(cells[:-1]) + f" | {ci[key]} | {cells[-1]} |")
    lg_path = out / f"longgen-{run_id}.parquet"
    if lg_path.is_file():
        lg = pd.read_parquet(lg_path)
        cols = [c for c in ("nll", "nll_first", "nll_last", "top1", "kv_tokens_per_head_end", "kv_bytes_end",
                            "kv_bytes_full_end", "recall", "ordered_recall", "list_kv_bytes_kept") if c in lg.columns]
        agg = lg.groupby("method")[cols].mean()
        lines += ["", "## Long generation (decode-time eviction)", "",
                  f"{lg['sample_id'].nunique() if 'sample_id' in lg.columns else len(lg) // max(1, lg['method'].nunique())} "
                  "samples, ratio 0.5, query-agnostic: teacher-forced NLL of a prose continuation fed token by token "
                  "(MorphKV evicts after every step; `kv_*_end` = cache at the end) and `niah_list` (list every planted "
                  "item; recall). Raw rows: `longgen-*.parquet`.", "",
                  "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for m, row in agg.iterrows():
            lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" if abs(v) < 1e4 else f"{v:.3g}" for v in row.values) + " |")
    lines += ["", "## Notes", "", "NOTES_PLACEHOLDER", ""]
    text = "\n".join(lines)
    if page.exists() and "NOTES_PLACEHOLDER" not in page.read_text():
        old = page.read_text()
        if "## Notes" in old:  # keep hand-written notes when re-rendering
            text = text.replace("## Notes\n\nNOTES_PLACEHOLDER\n", old[old.index("## Notes"):])
    page.write_text(text)
    print(f"[results] wrote {page} and {len(images)} plots in {img_dir}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--samples", type=int, default=50, help="samples per task at 1k tokens")
    ap.add_argument("--samples-2k", type=int, default=50, help="samples per task at 2k tokens")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "runs" / "results"))
    ap.add_argument("--run-id", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--render", default=None, metavar="RUN_ID", help="only render the page for this run id")
    ap.add_argument("--longgen", default=None, metavar="RUN_ID", help="only run the long-generation part for this run id")
    ap.add_argument("--page", default=str(ROOT / "docs" / "results.md"))
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.render:
        render(Path(args.out).resolve(), args.render, Path(args.page), args.quick)
        return 0
    if args.longgen:
        long_generation(Path(args.out).resolve(), args.longgen, args.model, args.quick)
        render(Path(args.out).resolve(), args.longgen, Path(args.page), args.quick)
        return 0
    out, run_id = run(args)
    long_generation(out, run_id, args.model, args.quick)
    render(out, run_id, Path(args.page), args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())

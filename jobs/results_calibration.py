"""Calibration that earns its keep? The NLL-curve calibrator, the measured probe calibrator and the
best fixed ratio, side by side on held-out contexts (docs/results.md, section "Calibration vs a
fixed ratio").

    python jobs/results_calibration.py                 # 5 tasks x (28 calibration + 20 held-out) contexts
    python jobs/results_calibration.py --quick         # a few contexts, to check the pipeline
    python jobs/results_calibration.py --render DIR    # re-render the page section from DIR's Parquet
    python jobs/results_calibration.py --run-id ID     # resume: tasks already measured are kept

Per context, one prefill; every method is compressed at each ratio of the grid and the
reference answer (for the quality check) and the probe's spans (for the probe calibrator) are
teacher-forced on every compressed cache in batched forwards (`kvray.calibration.measure_curves`
with `probe=`). A context is *within tau* at a ratio when its answer's NLL ratio (full /
compressed) is >= tau there. Each chooser (the fixed ratio, the NLL-curve calibrator, the probe
calibrator) has one knob, set on the calibration contexts to the most aggressive value whose
share within tau reaches the target share; the held-out contexts then score all three, with 95%
bootstrap intervals over contexts (paired for the differences). The oracle (each context at its
own largest safe grid ratio) is the limit.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

try:
    import kvray
except ImportError:  # a plain source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import kvray

from kvray.eval.tasks import make_samples
from kvray.probe import ProbeSpec
from kvray.report import replace_section
from kvray.results import new_run_id

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["niah_single", "niah_multikey", "vt", "cwe", "fwe"]
METHODS = ["compactor"]
RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
TAU = 0.95
TOLERANCE = 0.05
CRITERIA = ["score", "nll"]
TARGET_SHARES = [0.8, 0.9]
NEIGHBOUR_CHOOSER = "probe-neighbours calibrator"
TASK_CHOOSER = "per-task fixed ratio (told the task: not a calibrator, a bound)"
PROBE = asdict(ProbeSpec())  # 12 spans of 6 cue + 6 target tokens, half surprisal-chosen, half drawn
SEED = 700


def collect(out: Path, n_fit: int, n_heldout: int, workers: int, model: str | None) -> Path:
    """Measure every task's contexts, one Parquet per task and split written atomically, so an
    interrupted run keeps what it finished; a rerun with more contexts measures only the new
    ones (the samples of a seed are prefix-stable). Returns the folder."""
    import pandas as pd
    import ray

    from kvray.actors import measure_curves_distributed, start_workers

    out.mkdir(parents=True, exist_ok=True)

    def have(task, split):
        path = out / f"curves-{task}-{split}.parquet"
        return pd.read_parquet(path) if path.is_file() else None

    todo = []
    for task in TASKS:
        for split, n in (("fit", n_fit), ("heldout", n_heldout)):
            old = have(task, split)
            if old is None or old["sample_id"].nunique() < n:
                todo.append((task, split, n))
    if not todo:
        return out
    tok = kvray.load_tokenizer(model)

    def count(s: str) -> int:
        return len(tok(s, add_special_tokens=False).input_ids)

    ray.init(log_to_driver=True)
    pool = start_workers(workers, model, cpus_per_worker=1)
    retentions = [round(1.0 - r, 6) for r in RATIOS]
    try:
        for task, split, n in todo:
            old = have(task, split)
            done = set() if old is None else set(old["sample_id"])
            seed = SEED + 2 * TASKS.index(task) + (split == "heldout")
            samples = [s for s in make_samples(task, n, length=1000, seed=seed, count_tokens=count) if s.sample_id not in done]
            t0 = time.time()
            rows = measure_curves_distributed(pool, samples, {m: {} for m in METHODS}, retentions, probe=PROBE, score=True)
            df = pd.DataFrame(rows)
            df["split"] = split
            if old is not None:
                df = pd.concat([old, df], ignore_index=True)
            tmp = out / f".curves-{task}-{split}.parquet"
            df.to_parquet(tmp, index=False)
            tmp.rename(out / f"curves-{task}-{split}.parquet")
            print(f"[calibration] {task} {split}: {len(samples)} contexts in {time.time() - t0:.0f} s "
                  f"({df['sample_id'].nunique()} in all)", flush=True)
    finally:
        pool.shutdown()
        ray.shutdown()
    return out


def load(run_dir: Path):
    import pandas as pd

    files = sorted(run_dir.glob("curves-*.parquet"))
    if not files:
        raise SystemExit(f"no curves-*.parquet under {run_dir}: run the job first")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def probe_views(rows) -> dict[str, object]:
    """The probe's aggregates besides every span (the rows' own `probe_ratio`): only the
    surprisal-chosen half, only the uniformly drawn half (the job measures `select="mixed"`: both
    halves in one forward)."""
    import numpy as np

    k = (PROBE["spans"] + 1) // 2

    def view(part: str):
        def agg(row) -> float:
            surprisal = np.asarray(row["probe_span_surprisal"], dtype=float)
            full = np.asarray(row["probe_span_nll_full"], dtype=float)
            comp = np.asarray(row["probe_span_nll"], dtype=float)
            if len(full) == 0:
                return float("nan")
            top = np.argsort(-surprisal, kind="stable")[:k]
            mask = np.zeros(len(full), bool)
            mask[top] = True
            sel = mask if part == "surprisal" else ~mask
            return float(full[sel].mean() / comp[sel].mean()) if sel.any() else float("nan")
        return agg
    return {"all": rows["probe_ratio"], **{part: rows.apply(view(part), axis=1) for part in ("surprisal", "uniform")}}


def analyse(run_dir: Path) -> dict:
    """Per quality criterion: fit every chooser's knob on the calibration contexts, score them
    on the held-out ones."""
    import numpy as np

    from kvray.calibration import fit_calibrator
    from kvray.probe import (best_knob, context_table, fit_neighbour_calibrator, floor_to_grid, frontier_at_share,
                             knob_matrix, neighbour_chooser, outcomes, probe_safe_ratio, summarize_outcomes)

    rows = load(run_dir)
    method = METHODS[0]
    rows = rows[rows["method"] == method].reset_index(drop=True)
    views = probe_views(rows)
    cal = fit_calibrator(rows[rows["split"] == "fit"].to_dict("records"), method, tau=TAU)
    grid = sorted(RATIOS)
    held_ids = rows.loc[rows["split"] == "heldout", "sample_id"]
    report = {"method": method, "tau": TAU, "tolerance": TOLERANCE, "ratios": grid, "probe": PROBE,
              "n_fit": int(rows.loc[rows["split"] == "fit", "sample_id"].nunique()), "n_heldout": int(held_ids.nunique()),
              "tasks": sorted(rows["task"].unique()), "calibrator": cal.to_dict(), "criteria": {}}
    taus = [round(x, 4) for x in np.linspace(0.05, 0.9995, 400)]
    for criterion in CRITERIA:
        def tables(view: str):
            r = rows.assign(probe_ratio=views[view])
            return tuple(context_table(r[r["split"] == split].to_dict("records"), criterion=criterion, tau=TAU,
                                       tolerance=TOLERANCE) for split in ("fit", "heldout"))

        probe_tables = {view: tables(view) for view in views}
        fit, held = probe_tables["all"]
        choosers = {
            "fixed ratio": (lambda rho: (lambda c: rho), [0.0] + grid, fit, held),
            "NLL-curve calibrator": (lambda t: (lambda c: floor_to_grid(float(cal.max_compression_ratio(c["context_nll"], t)), grid)),
                                     taus, fit, held),
        }
        for view, (f, h) in probe_tables.items():
            values = sorted({v for c in f.values() for v in c["probe"].values() if math.isfinite(v)})
            choosers[f"probe calibrator ({view} spans)"] = (lambda t: (lambda c: probe_safe_ratio(c["probe"], t)),
                                                             [math.inf] + values[::-1], f, h)
        nb = fit_neighbour_calibrator(rows[rows["split"] == "fit"].to_dict("records"),
                                      method, tau=TAU, tolerance=TOLERANCE, target_share=0.9, criterion=criterion,
                                      probe=PROBE)
        nb.save(run_dir / f"neighbours-{criterion}.json")
        choosers[NEIGHBOUR_CHOOSER] = (neighbour_chooser(nb), [i / 40 for i in range(41)], fit, held)
        # not a calibrator: it is told the task. Per task, the largest ratio whose share on that
        # task's calibration contexts is >= the knob: what telling context kinds apart could give
        per_task_ok = {}
        for c in fit.values():
            for r, ok in c["ok"].items():
                per_task_ok.setdefault(c["task"], {}).setdefault(r, []).append(ok)

        def per_task(k):
            best = {t: max([r for r, oks in curve.items() if np.mean(oks) >= k - 1e-12], default=0.0)
                    for t, curve in per_task_ok.items()}
            return lambda c: best.get(c["task"], 0.0)
        choosers[TASK_CHOOSER] = (per_task, [round(x, 3) for x in np.linspace(0.0, 1.0, 101)], fit, held)
        oracle = lambda c: max([r for r, ok in c["ok"].items() if ok], default=0.0)  # noqa: E731
        out = {"oracle": summarize_outcomes("oracle", *outcomes(held, oracle)), "frontier": {}, "targets": {},
               "matched": {}, "neighbours": {"k": nb.k, "features": nb.features, "q": nb.q}}
        mats = {name: knob_matrix(h, chooser, knobs) for name, (chooser, knobs, f, h) in choosers.items()}
        for name, (R, W) in mats.items():  # every knob on held-out: the plot and the matched-share table
            out["frontier"][name] = [[float(w), float(r)] for r, w in zip(R.mean(axis=1), W.mean(axis=1))]
        for share in TARGET_SHARES:
            matched = {}
            fixed_value, fixed_reps = frontier_at_share(*mats["fixed ratio"], share)
            for name, (R, W) in mats.items():
                value, reps = frontier_at_share(R, W, share)
                ok = np.isfinite(reps)
                entry = {"mean_ratio": value, "mean_ratio_ci95": list(np.percentile(reps[ok], [2.5, 97.5])) if ok.any() else None,
                         "resamples_reaching_share": float(ok.mean())}
                if name != "fixed ratio":
                    both = ok & np.isfinite(fixed_reps)
                    entry["gain"] = value - fixed_value
                    entry["gain_ci95"] = list(np.percentile((reps - fixed_reps)[both], [2.5, 97.5])) if both.any() else None
                matched[name] = entry
            out["matched"][f"{share:g}"] = matched
        for share in TARGET_SHARES:
            entry, base = {}, None
            for name, (chooser, knobs, f, h) in choosers.items():
                knob, fit_share, fit_mean = best_knob(f, chooser, knobs, share)
                if knob is None:
                    entry[name] = {"chooser": name, "knob": None}
                    continue
                r, w = outcomes(h, chooser(knob))
                summary = summarize_outcomes(name, r, w, base)
                tasks = np.asarray([c["task"] for c in h.values()])
                summary.update(knob=float(knob) if math.isfinite(knob) else None, fit_share=fit_share,
                               fit_mean_ratio=fit_mean,
                               per_task={t: {"share": float(w[tasks == t].mean()), "mean_ratio": float(r[tasks == t].mean())}
                                         for t in report["tasks"]})
                if base is None:
                    base = (r, w)
                entry[name] = summary
            out["targets"][f"{share:g}"] = entry
        report["criteria"][criterion] = out
    return report


START, END = "<!-- calibration-vs-fixed:start -->", "<!-- calibration-vs-fixed:end -->"


CRITERION_WORDS = {
    "score": "its greedy answer's task score is at least the full cache's minus {tol} (RULER string match, 0-1)",
    "nll": "its reference answer's NLL ratio (full / compressed) is >= tau = {tau} (the paper's criterion)",
}


def plot(report: dict, path: Path) -> None:
    """Held-out frontiers, one panel per quality criterion: share of contexts that keep their
    quality vs mean ratio, every knob value of every chooser; the operating points chosen on the
    calibration contexts are starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    crits = list(report["criteria"])
    fig, axes = plt.subplots(1, len(crits), figsize=(6.2 * len(crits), 4.8), squeeze=False)
    for ax, crit in zip(axes[0], crits):
        part = report["criteria"][crit]
        styles = {"fixed ratio": ("k", "o-"), "NLL-curve calibrator": ("tab:blue", "-")}
        colors = iter(["tab:orange", "tab:green", "tab:red", "tab:brown", "tab:gray"])
        for name, pts in part["frontier"].items():
            color, style = styles[name] if name in styles else (next(colors), "-")
            pts = sorted(pts, key=lambda p: (p[1], p[0]))
            ax.plot([p[1] for p in pts], [p[0] for p in pts], style, color=color, label=name, linewidth=1.3,
                    markersize=4, alpha=0.9)
            for entry in part["targets"].values():
                e = entry.get(name, {})
                if "mean_ratio" in e:
                    ax.plot(e["mean_ratio"], e["share_within"], "*", color=color, markersize=11, markeredgecolor="k")
        o = part["oracle"]
        ax.plot(o["mean_ratio"], o["share_within"], "P", color="purple", markersize=10,
                label="oracle (each context at its own largest good ratio)")
        ax.set_xlabel("mean compression ratio over held-out contexts")
        ax.set_ylabel("share of held-out contexts that keep quality")
        ax.set_title(f"quality = {crit}" + (f" (tolerance {report['tolerance']})" if crit == "score" else f" (tau {report['tau']})"),
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{report['method']}, query-agnostic, n = {report['n_heldout']} held-out contexts "
                 f"({len(report['tasks'])} tasks); stars: knobs set on the calibration contexts", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ci(pair, signed: bool = False) -> str:
    fmt = "{:+.2f}" if signed else "{:.2f}"
    return f"[{fmt.format(pair[0])}, {fmt.format(pair[1])}]"


def _table(part: dict, tasks: list[str], per_task: bool) -> list[str]:
    lines = []
    o = part["oracle"]
    for share, entry in part["targets"].items():
        lines += [f"Target share {share} (knobs set on the calibration contexts):", "",
                  "| chooser | knob | calibration share / mean ratio | held-out share [95% CI] | "
                  "held-out mean ratio [95% CI] | ratio gain vs fixed [95% CI] | share diff vs fixed [95% CI] |",
                  "|---|---|---|---|---|---|---|"]
        for name, e in entry.items():
            if "mean_ratio" not in e:
                lines.append(f"| {name} | no knob reaches the share on the calibration contexts | | | | | |")
                continue
            knob = "never compress" if e["knob"] is None else f"{e['knob']:.3g}"
            gain = f"{e['ratio_gain']:+.3f} {_ci(e['ratio_gain_ci95'], True)}" if "ratio_gain" in e else "(the baseline)"
            diff = f"{e['share_diff']:+.2f} {_ci(e['share_diff_ci95'], True)}" if "share_diff" in e else ""
            lines.append(f"| {name} | {knob} | {e['fit_share']:.2f} / {e['fit_mean_ratio']:.3f} | "
                         f"{e['share_within']:.2f} {_ci(e['share_ci95'])} | {e['mean_ratio']:.3f} {_ci(e['mean_ratio_ci95'])} | "
                         f"{gain} | {diff} |")
        lines += [f"| oracle (the limit) | | | {o['share_within']:.2f} | {o['mean_ratio']:.3f} {_ci(o['mean_ratio_ci95'])} | | |", ""]
        if per_task:
            lines += ["Held-out mean ratio (share that keeps quality) per task:", "",
                      "| chooser | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
            for name, e in entry.items():
                if "per_task" in e:
                    lines.append(f"| {name} | " + " | ".join(
                        f"{e['per_task'][t]['mean_ratio']:.2f} ({e['per_task'][t]['share']:.2f})" for t in tasks) + " |")
            lines.append("")
    return lines


def _matched(part: dict) -> list[str]:
    shares = list(part["matched"])
    names = list(part["matched"][shares[0]])
    lines = ["At the same held-out share (each chooser's best knob read off its held-out curve, for every chooser "
             "alike; a description of the curves, not an operating point): the largest mean ratio whose share of "
             "held-out contexts that keep quality is at least the target, with its 95% bootstrap interval "
             "(contexts resampled, the knob re-read on each resample, the same resamples for every chooser):", "",
             "| chooser | " + " | ".join(f"share >= {s}: mean ratio [95% CI] | gain vs fixed [95% CI]" for s in shares) + " |",
             "|---|" + "---|---|" * len(shares)]
    for name in names:
        cells = []
        for s in shares:
            e = part["matched"][s][name]
            if not math.isfinite(e["mean_ratio"]):
                cells += ["no knob reaches it", ""]
                continue
            ci = _ci(e["mean_ratio_ci95"]) if e["mean_ratio_ci95"] else ""
            v = f"{e['mean_ratio']:.3f}"
            gain = ("(the baseline)" if "gain" not in e else "" if not math.isfinite(e["gain"]) else
                    f"{e['gain']:+.3f} {_ci(e['gain_ci95'], True) if e['gain_ci95'] else ''}")
            cells += [f"{v} {ci}", gain]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def render(report: dict, run_dir: Path, page: Path) -> str:
    img = page.parent / "img" / "calibration_frontier.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    plot(report, img)
    p = report["probe"]
    lines = [START, "## Calibration vs a fixed ratio (held-out contexts)", "",
             f"Generated by `python jobs/results_calibration.py` (run `{run_dir.name}`; rows in `curves-*.parquet` there, "
             f"re-render with `--render`). {report['method']}, query-agnostic, on the embedded SmolLM2-135M-Instruct: "
             f"{report['n_fit']} calibration and {report['n_heldout']} held-out contexts of ~1k tokens over "
             f"{len(report['tasks'])} tasks ({', '.join(report['tasks'])}), disjoint seeds. Every chooser picks from the "
             f"grid {', '.join(f'{r:g}' for r in report['ratios'])} or 0 (the full cache; the NLL-curve calibrator's "
             "prediction is floored to the grid) and has one knob, set on the calibration contexts to the most aggressive "
             "value that keeps the target share of them at their quality there: the fixed ratio itself, the NLL-curve "
             "calibrator's tau, the probe's threshold theta. The held-out contexts then score them; intervals are 95% "
             "bootstrap intervals over contexts, paired for the differences with the fixed ratio.", "",
             f"The probe (`kvray.probe`, after KVzip's reconstruction): {p['spans']} spans of the context, each "
             f"{p['cue']} cue + {p['target']} target tokens, half starting at the context's most surprising tokens and "
             "half drawn at random, teacher-forced after the context on the full cache and on the cache compressed at "
             "every grid ratio (one batched forward); probe ratio = target NLL full / compressed. The probe "
             "calibrator compresses to the largest ratio up to which the probe ratio stays >= theta. It sees the "
             "context only, never the question or the answer.", "",
             "![calibration frontier](img/calibration_frontier.png)", ""]
    for i, (crit, part) in enumerate(report["criteria"].items()):
        words = CRITERION_WORDS[crit].format(tol=report["tolerance"], tau=report["tau"])
        lines += [f"### Quality = {crit}: a context keeps its quality at a ratio when {words}", ""]
        lines += _table(part, report["tasks"], per_task=i == 0) + _matched(part)
    lines += ["VERDICT_PLACEHOLDER", "", END]
    return "\n".join(lines)


def verdict(report: dict) -> str:
    """The issue's target in words: at the fixed ratio's share, a mean ratio >= 0.1 higher."""
    out = []
    for crit, part in report["criteria"].items():
        for share, entry in part["targets"].items():
            fixed = entry.get("fixed ratio", {})
            if "mean_ratio" not in fixed:
                continue
            for name, e in entry.items():
                if name in ("fixed ratio", TASK_CHOOSER) or "ratio_gain" not in e:
                    continue
                lo, hi = e["ratio_gain_ci95"]
                slo, shi = e["share_diff_ci95"]
                met = e["ratio_gain"] >= 0.1 and e["share_diff"] >= -0.02
                out.append(f"- {crit}, target share {share}, {name}: mean ratio {e['mean_ratio']:.3f} vs fixed "
                           f"{fixed['mean_ratio']:.3f} (gain {e['ratio_gain']:+.3f} [{lo:+.3f}, {hi:+.3f}]), share "
                           f"{e['share_within']:.2f} vs {fixed['share_within']:.2f} (diff [{slo:+.2f}, {shi:+.2f}]): "
                           + ("**meets the target** (+0.1 or more at the fixed ratio's share)" if met
                              else "does not meet the target (+0.1 at the fixed ratio's share)"))
    widths = [(e["ratio_gain_ci95"][1] - e["ratio_gain_ci95"][0]) / 2 for part in report["criteria"].values()
              for entry in part["targets"].values() for name, e in entry.items()
              if name not in ("fixed ratio", TASK_CHOOSER) and "ratio_gain_ci95" in e]
    share_widths = [(e["share_ci95"][1] - e["share_ci95"][0]) / 2 for part in report["criteria"].values()
                    for entry in part["targets"].values() for e in entry.values() if "share_ci95" in e]
    if widths:
        out.append(f"- Power: the gains' 95% intervals are +-{min(widths):.3f} to +-{max(widths):.3f} wide, so a gain of "
                   f"+0.1 would show; the shares' are +-{min(share_widths):.2f} to +-{max(share_widths):.2f} "
                   f"(n = {report['n_heldout']} held-out contexts).")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 + 3 contexts per task")
    ap.add_argument("--fit", type=int, default=28, help="calibration contexts per task")
    ap.add_argument("--heldout", type=int, default=20, help="held-out contexts per task")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--run-id", default=None, help="resume this run")
    ap.add_argument("--render", default=None, metavar="DIR", help="only analyse DIR and render the page section")
    ap.add_argument("--out", default=str(ROOT / "runs" / "results_calibration"))
    ap.add_argument("--page", default=str(ROOT / "docs" / "results.md"))
    args = ap.parse_args(argv)
    if args.render:
        run_dir = Path(args.render)
    else:
        run_dir = Path(args.out) / (args.run_id or new_run_id())
        n_fit, n_held = (2, 3) if args.quick else (args.fit, args.heldout)
        collect(run_dir, n_fit, n_held, args.workers, args.model)
    report = analyse(run_dir)
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))
    section = render(report, run_dir, Path(args.page)).replace("VERDICT_PLACEHOLDER", verdict(report))
    replace_section(Path(args.page), START, END, section)
    print(f"[calibration] wrote {args.page} and img/calibration_frontier.png", flush=True)
    print(verdict(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

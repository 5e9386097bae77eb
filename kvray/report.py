"""`kvray report RUN_DIR`: one self-contained HTML page (inline CSS, plots as embedded PNGs, no
JavaScript) of what jobs/calibrate.py wrote to a run directory; each plot is also saved to
`report_img/` next to the page."""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure  # no pyplot: nothing global (backend, figure registry) changes
from matplotlib.lines import Line2D

from .stats import bootstrap_ci, format_ci

PARTS = ("evals/run_id=*/part-*.parquet", "tune/*.parquet", "calibration/*.json", "calibration/curves-*.parquet",
         "policies/*.json", "summary.json")
MiB = 2**20

_esc = html.escape


def _protocol(aware) -> str:
    return "query-aware" if bool(aware) else "query-agnostic"


def _ratio(r) -> str:
    return "–" if pd.isna(r) else f"{r:g}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "plot"


# ----------------------------------------------------------------------------- loading


@dataclass
class _Run:
    path: Path
    evals: pd.DataFrame | None = None
    tune: pd.DataFrame | None = None
    calibrators: dict[str, dict] = field(default_factory=dict)
    validations: dict[str, dict] = field(default_factory=dict)
    curves: pd.DataFrame | None = None
    policies: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    config_text: str | None = None
    problems: list[str] = field(default_factory=list)  # files that exist but could not be read


def _read_json(path: Path, run: _Run) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        run.problems.append(f"{path.relative_to(run.path)}: {exc}")
        return None
    if not isinstance(data, dict):
        run.problems.append(f"{path.relative_to(run.path)}: not a JSON object")
        return None
    return data


def _load(run_dir: Path) -> _Run:
    from .policy import Policy, PolicyStore
    from .results import read_results

    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory at {run_dir} (expected one written by jobs/calibrate.py)")
    if not any(any(run_dir.glob(p)) for p in PARTS):
        raise FileNotFoundError(f"{run_dir} holds none of the parts of a calibrate run; expected at least one of "
                                + ", ".join(PARTS))
    run = _Run(run_dir)
    if any(run_dir.glob(PARTS[0])):
        run.evals = read_results(run_dir / "evals")
    tables = []
    for path in sorted(run_dir.glob("tune/*.parquet")):
        table = pd.read_parquet(path)
        if "method" not in table:
            table["method"] = path.stem
        tables.append(table)
    run.tune = pd.concat(tables, ignore_index=True) if tables else None
    for path in sorted(run_dir.glob("calibration/*.json")):
        data = _read_json(path, run)
        if data is None:
            continue
        if path.name.endswith(".validation.json"):
            run.validations[data.get("method") or path.name[: -len(".validation.json")]] = data
        else:
            run.calibrators[data.get("method") or path.stem] = data
    curves = [pd.read_parquet(p) for p in sorted(run_dir.glob("calibration/curves-*.parquet"))]
    run.curves = pd.concat(curves, ignore_index=True) if curves else None
    store = PolicyStore(run_dir / "policies")
    for policy_id in store.ids():
        try:
            run.policies.append(Policy.load(store.directory / f"{policy_id}.json"))
        except ValueError as exc:
            run.problems.append(str(exc))
    if (run_dir / "summary.json").is_file():
        run.summary = _read_json(run_dir / "summary.json", run) or {}
    if (run_dir / "config.yaml").is_file():
        run.config_text = (run_dir / "config.yaml").read_text()
    return run


# ----------------------------------------------------------------------------- html pieces


class _Images:
    """Saves a figure as `<img_dir>/<name>.png` and returns it as an embedded <img>."""

    def __init__(self, img_dir: Path):
        self.img_dir = img_dir

    def __call__(self, fig: Figure, name: str, alt: str) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        data = buf.getvalue()
        path = self.img_dir / f"{_slug(name)}.png"
        path.write_bytes(data)
        src = base64.b64encode(data).decode("ascii")
        return (f'<figure><img src="data:image/png;base64,{src}" alt="{_esc(alt)}">'
                f"<figcaption>{_esc(alt)} (report_img/{_esc(path.name)})</figcaption></figure>")


def _table(df: pd.DataFrame, digits: int = 3) -> str:
    # to_html escapes cells and headers
    return df.to_html(index=False, escape=True, border=0, na_rep="–", classes="t",
                      float_format=lambda v: f"{v:.{digits}f}")


def _absent(what: str, where: str) -> str:
    return f'<p class="absent">No {_esc(what)} in this run directory ({_esc(where)}).</p>'


def _section(anchor: str, title: str, body: list[str]) -> str:
    return f'<section id="{anchor}"><h2>{_esc(title)}</h2>\n' + "\n".join(body) + "\n</section>"


def _grid(n: int, ncols: int = 3) -> tuple[int, int]:
    ncols = min(ncols, n)
    return -(-n // ncols), ncols


def _hide_unused(axes, n: int) -> None:
    for ax in axes.flat[n:]:
        ax.set_visible(False)


# ----------------------------------------------------------------------------- sections


def _header(run: _Run) -> str:
    s = run.summary
    run_id = s.get("run_id") or run.path.name
    model = s.get("model")
    if not model and run.evals is not None and "model" in run.evals:
        model = ", ".join(map(str, run.evals["model"].dropna().unique()))
    if not model and run.policies:
        model = run.policies[0].model
    rows = [("run directory", str(run.path.resolve())), ("model", model or "(unknown)")]
    if isinstance(s.get("elapsed_s"), (int, float)):
        rows.append(("elapsed", f"{s['elapsed_s']:.1f} s ({s['elapsed_s'] / 60:.1f} min)"))
    if run.evals is not None:
        rows.append(("eval rows", str(len(run.evals))))
    policies = s.get("policies") or [p.policy_id for p in run.policies]
    rows.append(("policies", ", ".join(map(str, policies)) or "(none)"))
    found = [p for p in PARTS if any(run.path.glob(p))]
    rows.append(("parts found", ", ".join(found)))
    rows.append(("generated", time.strftime("%Y-%m-%d %H:%M:%S %Z")))
    out = [f"<h1>kvray run {_esc(str(run_id))}</h1>", '<table class="kv">']
    out += [f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows]
    out.append("</table>")
    out.append("<p>Regenerate with <code>kvray report RUN_DIR</code> (or <code>python -m kvray.report RUN_DIR "
               "[--out PATH]</code>); every plot is also a PNG file in <code>report_img/</code> next to this page.</p>")
    if run.problems:
        out.append('<p class="absent">Files that could not be read:</p><ul>'
                   + "".join(f"<li>{_esc(p)}</li>" for p in run.problems) + "</ul>")
    if run.config_text:
        out.append(f"<details><summary>config.yaml</summary><pre>{_esc(run.config_text)}</pre></details>")
    toc = [("scores", "1. Score vs compression"), ("budgets", "2. Tuned budgets"), ("calibration", "3. Calibration"),
           ("throughput", "4. Throughput and KV memory")]
    out.append("<nav>" + " · ".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t in toc) + "</nav>")
    return "\n".join(out)


def _labels(ev: pd.DataFrame) -> pd.Series:
    """The method name, plus the plan id when not uniform and the params when one method ran
    with several parameter sets (each is then its own curve)."""
    label = ev["method"].astype(str)
    if "plan_id" in ev:
        plan = ev["plan_id"].fillna("uniform").astype(str)
        label = label.where(plan == "uniform", label + " [" + plan + "]")
    if "params" in ev:
        several = ev.groupby("method")["params"].transform("nunique") > 1
        label = label.where(~several, label + " " + ev["params"].astype(str))
    return label


def _cells(ev: pd.DataFrame) -> pd.Series:
    cell = ev["task"].astype(str)
    if "target_length" in ev and ev["target_length"].dropna().nunique() > 1:
        n = ev["target_length"].map(lambda v: "?" if pd.isna(v) else str(int(v)))
        cell = cell + "@" + n
    return cell


def _scores(run: _Run, img: _Images) -> str:
    title = "1. Score vs compression"
    if run.evals is None:
        return _section("scores", title, [_absent("eval rows", "evals/run_id=*/part-*.parquet")])
    need = [c for c in ("method", "task", "compression_ratio", "score") if c not in run.evals]
    if need:
        return _section("scores", title, [f'<p class="absent">The eval rows lack the columns {_esc(str(need))}.</p>'])
    ev = run.evals.assign(label=_labels(run.evals), cell=_cells(run.evals))
    if "query_aware" not in ev:
        ev["query_aware"] = False
    labels = sorted(ev["label"].unique(), key=lambda s: (s != "full", s))
    body = ["<p>Mean score per task (one row per sample, config and protocol), x = compression ratio (fraction "
            "of the context's KV entries removed); the <code>full</code> cache's score is the x = 0 point of "
            "every curve. <i>mean over tasks</i> averages the per-task means. <i>kept</i> = kv_bytes_kept / "
            "kv_bytes_full summed over the rows.</p>"]
    for aware, part in ev.groupby("query_aware", sort=True):
        proto = _protocol(aware)
        per_cell = part.groupby(["label", "compression_ratio", "cell"])["score"].mean().unstack("cell")
        cells = list(per_cell.columns)
        per_cell["mean over tasks"] = per_cell[cells].mean(axis=1)
        fig = _score_figure(part, [lab for lab in labels if lab in per_cell.index.get_level_values(0)],
                            xmax=max(1.0, float(part["compression_ratio"].max()) + 0.03))
        fig.suptitle(f"Score vs compression ratio, {proto}: mean over samples with its 95% bootstrap interval "
                     "(grey: the full cache)", fontsize=11)
        body.append(f"<h3>{_esc(proto)}</h3>")
        body.append(img(fig, f"scores-{proto}", f"score vs compression ratio per method, {proto}"))
        body.append(_table(_score_table(part, per_cell, labels)))
    return _section("scores", title, body)


def _score_figure(part: pd.DataFrame, labels: list[str], xmax: float) -> Figure:
    """One panel per method: its mean score over samples at each ratio with a 95% bootstrap
    interval, over the full cache's mean and interval (a grey band), so no two curves overlap."""
    def mean_ci(scores) -> tuple[float, float, float]:
        lo, hi = bootstrap_ci(scores)
        return float(np.mean(scores)), lo, hi

    full = part[part["label"] == "full"]["score"].to_numpy()
    methods = [lab for lab in labels if lab != "full"] or ["full"]
    nrows, ncols = _grid(len(methods), ncols=4)
    fig = Figure(figsize=(3.3 * ncols, 2.6 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    f_mean, f_lo, f_hi = mean_ci(full) if len(full) else (np.nan, np.nan, np.nan)
    for ax, lab in zip(axes.flat, methods):
        if not np.isnan(f_mean):
            ax.axhspan(f_lo, f_hi, color="0.85", lw=0)
            ax.axhline(f_mean, color="0.45", lw=0.9, ls=(0, (1, 3)))
        mine = part[part["label"] == lab]
        stats = [(r, *mean_ci(g["score"].to_numpy()), len(g)) for r, g in mine.groupby("compression_ratio")]
        if stats:
            x, y, lo, hi, n = (np.array(v, dtype=float) for v in zip(*stats))
            ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", ms=3.5, lw=1.4, capsize=2.5, color="C0")
            ax.set_title(f"{lab} (n={int(n.min())}" + (f"-{int(n.max())}" if n.max() > n.min() else "") + ")",
                         fontsize=9)
        ax.set_xlim(-0.03, xmax)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("compression ratio")
    for ax in axes[:, 0]:
        ax.set_ylabel("mean score")
    _hide_unused(axes, len(methods))
    return fig


def _score_table(part: pd.DataFrame, per_cell: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Method x ratio rows: mean score per task and over tasks, rows, kept KV bytes / full."""
    sums = part.groupby(["label", "compression_ratio"]).agg(n=("score", "size"))
    if {"kv_bytes_kept", "kv_bytes_full"} <= set(part.columns):
        b = part.groupby(["label", "compression_ratio"])[["kv_bytes_kept", "kv_bytes_full"]].sum()
        sums["kept"] = b["kv_bytes_kept"] / b["kv_bytes_full"].replace(0, np.nan)
    table = per_cell.reset_index().merge(sums.reset_index(), on=["label", "compression_ratio"])
    table["_order"] = table["label"].map({lab: i for i, lab in enumerate(labels)})
    table = (table.sort_values(["_order", "compression_ratio"]).drop(columns="_order")
             .rename(columns={"label": "method", "compression_ratio": "ratio"}))
    table.columns.name = None
    table["ratio"] = table["ratio"].map(_ratio)
    return table


def _plans(run: _Run, img: _Images) -> str:
    body = []
    if not run.policies:
        body.append(_absent("policies", "policies/*.json"))
    else:
        body.append("<p>Each policy's <i>test</i> columns are measured on a split disjoint from every split it "
                    "was tuned, fitted or chosen on (the policy JSON's <code>validation</code>); [lo, hi] are 95% "
                    "bootstrap intervals over those samples, paired for the gain over uniform budgets.</p>")
        body.append(_table(pd.DataFrame([_policy_row(p) for p in run.policies])))
    for p in run.policies:
        if p.plan is None or np.ptp(np.asarray(p.plan["keep"], dtype=float)) < 1e-9:
            continue  # a uniform plan: a flat heatmap says nothing
        keep = np.asarray(p.plan["keep"], dtype=float)
        layers, heads = keep.shape
        fig = Figure(figsize=(max(5.5, 2.5 + 0.4 * heads), min(9.0, max(3.5, 1.6 + 0.13 * layers))),
                     layout="constrained")
        ax = fig.subplots()
        fig.colorbar(_keep_heatmap(ax, keep), ax=ax, label="fraction of KV entries kept")
        ax.set_ylabel("layer")
        v = p.validation or {}
        scores = (f"test {v['score']:.3f} vs uniform {v['uniform_score']:.3f} (n={v['n']})" if v
                  else "not validated")
        ax.set_title(f"{p.policy_id}\n{p.method}, target ratio {p.compression_ratio:g}; {scores}", fontsize=8)
        body.append(img(fig, f"plan-{p.policy_id}", f"keep fractions of policy {p.policy_id}"))
    if run.policies and all(p.plan is None or np.ptp(np.asarray(p.plan["keep"], dtype=float)) < 1e-9
                            for p in run.policies):
        body.append('<p class="absent">No policy has a per-layer / per-head plan that is not uniform.</p>')
    body.append("<h3>Tune trials</h3>")
    if run.tune is None:
        body.append(_absent("Tune trials", "tune/*.parquet"))
    else:
        body.append(_tune(run.tune, img))
        body.append(_top_allocations(run, img))
    return _section("budgets", "2. Tuned budgets", body)


def _policy_row(p) -> dict:
    v = p.validation or {}
    tune = p.metrics.get("tune") or {}
    ex = v.get("readme_example") or {}
    return {"policy": p.policy_id, "method": p.method, "ratio": p.compression_ratio, "query-aware": p.query_aware,
            "plan": p.plan.get("name", "custom") if p.plan else "uniform",
            "test n": str(v["n"]) if "n" in v else "", "test score": v.get("score"), "score 95%": format_ci(v.get("score_ci95")),
            "full": v.get("full_score"), "uniform": v.get("uniform_score"), "gain": v.get("gain_vs_uniform"),
            "gain 95%": format_ci(v.get("gain_ci95")), "verdict": v.get("verdict", "not validated"),
            "tune score": tune.get("score", p.metrics.get("tune_score")),
            "README example": ("ok" if ex.get("correct") else "wrong") if ex else "",
            "calibrated": p.calibrator is not None,
            "allocation": json.dumps(p.allocation, sort_keys=True) if p.allocation else ""}


def _keep_heatmap(ax, keep: np.ndarray, **scale):
    """Keep fractions [layer][KV head] as an image (layers down, heads across)."""
    im = ax.imshow(keep, aspect="auto", cmap="viridis", interpolation="nearest", **scale)
    ax.set_xlabel("KV head")
    if keep.shape[1] <= 16:
        ax.set_xticks(range(keep.shape[1]))
    return im


def _model_shape(run: _Run) -> tuple[int, int] | None:
    """(layers, KV heads): from summary.json (jobs/calibrate.py writes it) or any policy's plan."""
    layers, heads = run.summary.get("num_layers"), run.summary.get("num_kv_heads")
    if isinstance(layers, int) and isinstance(heads, int):
        return layers, heads
    for p in run.policies:
        if p.plan is not None:
            keep = np.asarray(p.plan["keep"], dtype=float)
            return keep.shape[0], keep.shape[1]
    return None


def _top_allocations(run: _Run, img: _Images, k: int = 4) -> str:
    """Per tuned method, the keep fractions (layer x KV head) of its `k` best distinct allocations,
    rebuilt from the trials' configs with the search space that made them."""
    from .tune.space import SearchSpace

    shape = _model_shape(run)
    if shape is None or "config" not in run.tune:
        return '<p class="absent">The model shape is unknown (no num_layers in summary.json, no policy plan): ' \
               "the trials' allocations are not drawn.</p>"
    layers, heads = shape
    figs = []
    for method, t in run.tune.groupby(run.tune["method"].astype(str)):
        t = t.sort_values("score", ascending=False).drop_duplicates("config").head(k)
        panels = []
        for _, row in t.iterrows():
            try:
                config = json.loads(row["config"])
                space = SearchSpace.default(method, float(row["target_ratio"]))
                press = space.press(config, layers, heads)
            except (ValueError, KeyError, TypeError):
                continue
            plan = press.plan
            if plan is None or np.ptp(np.asarray(plan.keep, dtype=float)) < 1e-9:
                continue  # uniform budgets: nothing to draw
            keep = np.asarray(plan.keep, dtype=float)
            alpha = float(config.get("head_alpha", 1.0))
            base = space.baseline()
            own = ", ".join(f"{k} {v}" for k, v in sorted(space.method_config(config).items()) if base.get(k) != v)
            panels.append((keep, f"score {row['score']:.3f}" + (" (uniform)" if row.get("is_baseline") else "")
                           + f"\nslope {float(config.get('layer_slope', 0.0)):+g}, head_alpha {alpha:g}"
                           + (f"\n{own}" if own else "")))
        if not panels:
            continue
        fig = Figure(figsize=(2.6 * len(panels) + 1.2, min(8.0, max(3.6, 1.8 + 0.12 * layers))), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (keep, title) in zip(axes, panels):
            im = _keep_heatmap(ax, keep, vmin=0.0, vmax=1.0)
            ax.set_title(title, fontsize=8)
        axes[0].set_ylabel("layer")
        fig.colorbar(im, ax=list(axes), label="fraction of KV entries kept")
        fig.suptitle(f"{method}: the {len(panels)} best allocations of the search (best first)", fontsize=10)
        figs.append(img(fig, f"tune-allocations-{method}", f"{method}: keep fractions of the best allocations"))
    note = ("<p>Layer budgets are the plan's; with head_alpha &lt; 1 AdaKV splits each layer's budget among its "
            "KV heads per context (at least head_alpha x the even share per head), so the head columns show "
            "the even split the run starts from.</p>")
    if not figs:
        return '<p class="absent">Every allocation among the best trials is uniform: no heatmap.</p>'
    return note + "\n".join(figs)


def _tune(tune: pd.DataFrame, img: _Images) -> str:
    methods = sorted(tune["method"].astype(str).unique())
    nrows, ncols = _grid(len(methods))
    fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows + 0.3), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, method in zip(axes.flat, methods):
        t = tune[tune["method"].astype(str) == method].reset_index(drop=True)
        xcol = "layer_slope" if "layer_slope" in t and t["layer_slope"].notna().any() else None
        x = t[xcol] if xcol else pd.Series(range(len(t)), dtype=float)
        y = t["score"] if "score" in t else pd.Series(np.nan, index=t.index)
        color = t["head_alpha"] if "head_alpha" in t and t["head_alpha"].notna().any() else None
        done = t["finished"].fillna(False).astype(bool) if "finished" in t else pd.Series(True, index=t.index)
        norm = None if color is None else (float(color.min()), float(color.max()))
        for mask, marker in ((done, "o"), (~done, "v")):
            if mask.any():
                sc = ax.scatter(x[mask], y[mask], c=None if color is None else color[mask], cmap="viridis",
                                vmin=norm and norm[0], vmax=norm and norm[1], marker=marker, s=30, zorder=3)
        if color is not None:
            fig.colorbar(sc, ax=ax, label="head_alpha")
        for flag, kw in (("is_baseline", dict(marker="s", s=130, edgecolors="k")),
                         ("is_best", dict(marker="o", s=230, edgecolors="tab:red", lw=1.6))):
            if flag in t:
                mask = t[flag].fillna(False).astype(bool)
                ax.scatter(x[mask], y[mask], facecolors="none", zorder=4, **kw)  # legend: proxies below
        ax.set_title(f"{method} ({len(t)} trials)", fontsize=10)
        ax.set_xlabel(xcol or "trial")
        ax.set_ylabel("score (calibration split)")
        ax.grid(alpha=0.3)
        marks = [Line2D([], [], color="0.4", marker="o", ls="", label="finished"),
                 Line2D([], [], color="0.4", marker="v", ls="", label="stopped early"),
                 Line2D([], [], color="k", marker="s", ms=10, mfc="none", ls="", label="uniform (baseline)"),
                 Line2D([], [], color="tab:red", marker="o", ms=13, mfc="none", ls="", label="best")]
        ax.legend(handles=marks, fontsize=7, loc="best")
    _hide_unused(axes, len(methods))
    fig.suptitle("Tune trials: score vs allocation", fontsize=11)
    out = [img(fig, "tune-trials", "Tune trials: score vs allocation (colour: head_alpha)")]
    cols = [c for c in tune.columns if c not in ("run_id", "model")]
    table = tune[cols]
    if "score" in table:
        table = table.sort_values(["method", "score"], ascending=[True, False])
    out.append(_table(table))
    return "\n".join(out)


def _calibration(run: _Run, img: _Images) -> str:
    body = []
    if not (run.calibrators or run.validations or run.curves is not None):
        return _section("calibration", "3. Calibration",
                        [_absent("calibration", "calibration/<method>.json, .validation.json, curves-*.parquet")])
    methods = sorted(set(run.calibrators) | set(run.validations))
    colors = {m: colormaps["tab10"](i % 10) for i, m in enumerate(
        sorted(set(methods) | (set(run.curves["method"].astype(str)) if run.curves is not None
                               and "method" in run.curves else set())))}
    rows = []
    for m in methods:
        c, v = run.calibrators.get(m, {}), run.validations.get(m, {})
        rows.append({"method": m, "alpha": c.get("alpha"), "beta": c.get("beta"), "tau": c.get("tau", v.get("tau")),
                     "fit points": c.get("n_points"), "fit contexts": c.get("n_contexts"), "loss": c.get("loss"),
                     "held-out contexts": v.get("n_contexts"), "share_safe": v.get("share_safe"),
                     "mean_abs_error": v.get("mean_abs_error")})
    if rows:
        body.append(_table(pd.DataFrame(rows), digits=4))
    contexts = [dict(ctx, method=m) for m, v in run.validations.items() for ctx in v.get("contexts") or []]
    if contexts:
        ctx = pd.DataFrame(contexts)
        fig = Figure(figsize=(5.6, 4.6), layout="constrained")
        ax = fig.subplots()
        hi = max(1.0, float(ctx[["predicted_ratio", "measured_safe_ratio"]].max().max()))
        ax.plot([0, hi], [0, hi], color="0.5", lw=0.9, ls="--", label="y = x")
        for m, g in ctx.groupby("method"):
            safe = g["safe"].astype(bool) if "safe" in g else pd.Series(True, index=g.index)
            ax.scatter(g["measured_safe_ratio"][safe], g["predicted_ratio"][safe], color=colors[m], s=30, label=m)
            if (~safe).any():
                ax.scatter(g["measured_safe_ratio"][~safe], g["predicted_ratio"][~safe], color=colors[m], s=45,
                           marker="X", label=f"{m} (unsafe)")
        ax.set_xlim(-0.02, hi + 0.02)
        ax.set_ylim(-0.02, hi + 0.02)
        ax.set_xlabel("measured largest safe compression ratio")
        ax.set_ylabel("predicted compression ratio")
        ax.set_title("Held-out contexts (above the line: over-compressed)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        body.append(img(fig, "calibration-safe-ratio", "predicted vs measured largest safe compression ratio"))
    else:
        body.append(_absent("held-out validation", "calibration/<method>.validation.json"))
    if run.curves is not None and {"method", "sample_id", "compression_ratio", "nll_ratio"} <= set(run.curves):
        body.append(_curves(run, img, colors))
    else:
        body.append(_absent("retention curves", "calibration/curves-*.parquet"))
    return _section("calibration", "3. Calibration", body)


def _curves(run: _Run, img: _Images, colors: dict) -> str:
    from .calibration import retention_curve

    curves = run.curves
    methods = sorted(curves["method"].astype(str).unique())
    nrows, ncols = _grid(len(methods), 2)
    fig = Figure(figsize=(5.4 * ncols + 1.8, 3.8 * nrows + 0.3), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    cmap = colormaps["tab10"]
    xs = np.linspace(0.0, 0.99, 100)
    for ax, m in zip(axes.flat, methods):
        cal = run.calibrators.get(m, {})
        for i, (sid, g) in enumerate(curves[curves["method"].astype(str) == m].groupby("sample_id", sort=True)):
            g = g.sort_values("compression_ratio")
            heldout = "split" in g and (g["split"] == "heldout").all()
            ax.plot(g["compression_ratio"], g["nll_ratio"], color=cmap(i % 10), ls="--" if heldout else "-",
                    marker="o", ms=3)
            if "alpha" in cal and "beta" in cal and "context_nll" in g:
                b = cal["alpha"] * float(g["context_nll"].iloc[0]) + cal["beta"]
                ax.plot(xs, [retention_curve(1.0 - x, b) for x in xs], color=cmap(i % 10), lw=0.8, ls=":")
        if "tau" in cal:
            ax.axhline(cal["tau"], color="0.3", lw=0.8)
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("compression ratio (1 - retention)")
        ax.set_ylabel("NLL ratio full / compressed")
        ax.grid(alpha=0.3)
    _hide_unused(axes, len(methods))
    proxies = [Line2D([], [], color="k", ls="-", marker="o", ms=3, label="fit context (measured)"),
               Line2D([], [], color="k", ls="--", marker="o", ms=3, label="held-out context (measured)"),
               Line2D([], [], color="k", ls=":", lw=0.8, label="calibrator curve f_b(1 - x)"),
               Line2D([], [], color="0.3", lw=0.8, label="tau")]
    fig.legend(handles=proxies, loc="outside lower center", ncols=4, fontsize=8)
    fig.suptitle("Retention curves per context (one colour per context)", fontsize=11)
    return img(fig, "calibration-curves", "NLL ratio vs compression ratio per context, fit and held-out")


def _throughput(run: _Run, img: _Images) -> str:
    title = "4. Throughput and KV memory"
    if run.evals is None:
        return _section("throughput", title, [_absent("eval rows", "evals/run_id=*/part-*.parquet")])
    ev = run.evals.assign(label=_labels(run.evals))
    labels = sorted(ev["label"].unique(), key=lambda s: (s != "full", s))
    if "compression_ratio" not in ev:
        ev["compression_ratio"] = np.nan
    groups = ev.groupby(["label", "compression_ratio"], dropna=False)
    table = groups.size().rename("rows").to_frame()

    def has(*cols):
        return all(c in ev for c in cols)

    if has("prefill_s"):
        table["prefill ms"] = 1000 * groups["prefill_s"].mean()
    if has("compress_s"):
        table["compress ms"] = 1000 * groups["compress_s"].mean()
    if has("decode_s", "new_tokens"):
        sums = groups[["decode_s", "new_tokens"]].sum()
        table["decode ms/token"] = 1000 * sums["decode_s"] / sums["new_tokens"].replace(0, np.nan)
        table["decode tokens/s"] = sums["new_tokens"] / sums["decode_s"].replace(0, np.nan)
    elif has("decode_s"):
        table["decode s"] = groups["decode_s"].mean()
    if has("kv_bytes_full"):
        table["KV MiB full"] = groups["kv_bytes_full"].mean() / MiB
    if has("kv_bytes_kept"):
        table["KV MiB kept"] = groups["kv_bytes_kept"].mean() / MiB
    table = table.reset_index()
    table["_order"] = table["label"].map({lab: i for i, lab in enumerate(labels)})
    table = (table.sort_values(["_order", "compression_ratio"]).drop(columns="_order")
             .rename(columns={"label": "method", "compression_ratio": "ratio"}))
    body = ["<p>Mean over samples and both protocols. The prefill is shared by every config of a sample, so it "
            "does not differ between methods; configs are decoded together in batches and <code>decode_s</code> "
            "is the batch's wall time divided by its size, so per-token decode times are approximate. Peak "
            "memory is measured per sample (the shared prefill), not per config, so it is not shown per method; "
            "the KV columns are each config's own.</p>"]
    if has("prefill_s", "context_tokens", "sample_id"):
        # one prefill of the whole prompt (context + question) serves both protocols of a sample
        pre = ev.groupby("sample_id").agg(prefill_s=("prefill_s", "first"), tokens=("context_tokens", "max"))
        total = pre["prefill_s"].sum()
        rate = pre["tokens"].sum() / total if total > 0 else float("nan")
        body.append(f"<p>Prefill: {1000 * pre['prefill_s'].mean():.1f} ms per sample on average "
                    f"({len(pre)} samples), {rate:.0f} prompt tokens/s.</p>")
    metrics = [c for c in ("compress ms", "decode ms/token", "KV MiB kept") if c in table]
    if metrics:
        ratios = sorted(table["ratio"].dropna().unique())
        cmap = colormaps["viridis"]
        fig = Figure(figsize=(min(16.0, max(7.0, 0.75 * len(labels) + 2.5)), 2.2 * len(metrics) + 0.8),
                     layout="constrained")
        axes = fig.subplots(len(metrics), 1, squeeze=False, sharex=True)[:, 0]
        # each method's bars are centred on its tick, one per ratio it ran at, coloured by ratio
        width = 0.8 / max(1, int(table.groupby("method")["ratio"].nunique().max()))
        slot = table.groupby("method").cumcount()
        count = table.groupby("method")["ratio"].transform("size")
        x = table["method"].map({lab: i for i, lab in enumerate(labels)}) + (slot - (count - 1) / 2) * width
        colour = {r: cmap(j / max(1, len(ratios) - 1) * 0.85) for j, r in enumerate(ratios)}
        for ax, metric in zip(axes, metrics):
            for r in ratios:
                at = table["ratio"] == r
                ax.bar(x[at], table.loc[at, metric], width=width, color=colour[r], label=f"{r:g}")
            ax.set_ylabel(metric)
            ax.grid(axis="y", alpha=0.3)
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", title="compression\nratio",
                   fontsize=8, title_fontsize=8)
        axes[-1].set_xticks(range(len(labels)))
        axes[-1].set_xticklabels(labels, rotation=30, ha="right")
        fig.suptitle("Compression time, decode time per token and KV cache kept,\nper method and ratio", fontsize=11)
        body.append(img(fig, "throughput", "compression time, decode time per token and KV MiB kept per method"))
    table["ratio"] = table["ratio"].map(_ratio)
    body.append(_table(table, digits=2))
    return _section("throughput", title, body)


# ----------------------------------------------------------------------------- page

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1250px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table.t, table.kv { border-collapse: collapse; font-size: 12.5px; margin: .8em 0; }
table.t th, table.t td, table.kv th, table.kv td { padding: 3px 8px; border-bottom: 1px solid #e3e3e3; }
table.t td { text-align: right; font-variant-numeric: tabular-nums; }
table.t td:first-child, table.kv th { text-align: left; }
table.t thead th { background: #f3f3f3; position: sticky; top: 0; }
table.t tbody tr:hover { background: #f7fbff; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #666; }
.absent { color: #8a6d3b; font-style: italic; }
nav { margin: 1em 0; } code, pre { background: #f5f5f5; padding: 1px 4px; }
"""


def results_job(argv, doc: str, run, render, *, seed: int, add_arguments=None) -> int:
    """The command line the results jobs share (jobs/results_*.py): their own options
    (`add_arguments(parser)`), then --length, --seed, --threads, --run-id, --render; runs
    `run(args)` unless --render names a run, then prints `render(run_id)`."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if add_arguments is not None:
        add_arguments(ap)
    ap.add_argument("--length", type=int, default=1000, help="target context tokens")
    ap.add_argument("--seed", type=int, default=seed)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run-id", default=None, help="resume this run")
    ap.add_argument("--render", default=None, metavar="RUN_ID", help="only re-render the page from existing Parquet")
    args = ap.parse_args(argv)
    print(render(args.render or run(args)))
    return 0


def replace_section(page: Path, start: str, end: str, section: str) -> None:
    """Put `section` (which begins with `start` and ends with `end`) into the Markdown page,
    replacing what lies between the markers there, or appended when they are absent."""
    text = page.read_text()
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    page.write_text(text)


def write_report(run_dir, out=None) -> Path:
    """Write the HTML report of `run_dir` to `out` (default `<run_dir>/report.html`) and its PNGs
    to `<out's folder>/report_img/`; returns the page's path. Raises FileNotFoundError when
    `run_dir` is missing or holds none of the parts jobs/calibrate.py writes."""
    run = _load(Path(run_dir))
    out = Path(out) if out is not None else run.path / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    img_dir = out.parent / "report_img"
    img_dir.mkdir(exist_ok=True)
    img = _Images(img_dir)
    body = [_header(run), _scores(run, img), _plans(run, img), _calibration(run, img), _throughput(run, img)]
    title = f"kvray run {run.summary.get('run_id') or run.path.name}"
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(str(title))}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
    out.write_text(page, encoding="utf-8")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kvray report", description="Write a self-contained HTML report of one "
                                 "run directory written by jobs/calibrate.py.")
    ap.add_argument("run_dir", metavar="RUN_DIR", help="e.g. runs/20261129-032058-92770e")
    ap.add_argument("--out", metavar="PATH", default=None, help="the HTML file (default: RUN_DIR/report.html); "
                    "plots also go to report_img/ next to it")
    args = ap.parse_args(argv)
    try:
        path = write_report(args.run_dir, args.out)
    except FileNotFoundError as exc:
        raise SystemExit(f"kvray report: {exc}") from None
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

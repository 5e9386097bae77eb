"""The main job: evaluate every registered method over a ratio grid, search per-layer / per-head
budgets with Ray Tune, fit context calibrators, and write Parquet + policies under one run
directory, then print a summary and where everything is.

    python jobs/calibrate.py                                  # local Ray (ray.init())
    python jobs/calibrate.py --smoke-test                     # about 2 minutes on a laptop
    python jobs/calibrate.py --set eval.samples=10 --set tune.methods='[snapkv]'
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/calibrate.py --out /abs/runs
    make calibrate                                            # local head + ray job submit + logs

A rerun with `--run-id ID` resumes: evaluation shards already written are skipped, finished
Tune searches and calibrations are loaded from the run directory instead of being redone.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml

try:
    import kvray
except ImportError:  # a plain source tree (e.g. a working_dir without kvray installed)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import kvray

from kvray.eval.tasks import make_samples
from kvray.results import new_run_id

DEFAULT_CONFIG = Path(__file__).with_name("calibrate.yaml")
SMOKE = {
    "eval": {"methods": ["full", "snapkv", "knorm"], "ratios": [0.5], "tasks": ["niah_single"], "length": 500,
             "samples": 2},
    "tune": {"methods": ["snapkv", "knorm"], "length": 500, "samples": 3, "trials": 3, "grace_period": 1},
    "calibration": {"methods": ["snapkv"], "tasks": ["niah_single"], "length": 500, "contexts": 2, "heldout": 1,
                    "retentions": [0.25, 0.5, 0.75]},
}
log = logging.getLogger("kvray.calibrate")


# ----------------------------------------------------------------------------- configuration


def deep_update(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_set(config: dict, assignment: str) -> None:
    """`section.key=value` with a YAML value; unknown keys are refused with the known ones."""
    if "=" not in assignment:
        raise SystemExit(f"--set expects section.key=value, got {assignment!r}")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    node = config
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            where = ".".join(keys[:i]) or "the top level"
            known = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
            raise SystemExit(f"--set {path}: no key {key!r} in {where}; known: {known}")
        if i == len(keys) - 1:
            node[key] = yaml.safe_load(raw)
        else:
            node = node[key]


def load_config(args) -> dict:
    config = yaml.safe_load(Path(args.config).read_text())
    if args.smoke_test:
        config = deep_update(config, SMOKE)
    for assignment in args.set or []:
        apply_set(config, assignment)
    for key in ("model", "out", "workers"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    return config


def tune_space(tu: dict, method: str):
    """The search space of `method`: kvray's default plus the config's `tune.space.<method>` choices."""
    from kvray.tune.space import SearchSpace

    extra = (tu.get("space") or {}).get(method) or {}
    if not isinstance(extra, dict):
        raise ValueError(f"tune.space.{method} must map parameter names to lists of values, got {extra!r}")
    return SearchSpace.default(method, float(tu["compression_ratio"]), **extra)


def check_tune_spaces(cfg: dict) -> None:
    """Build every tuned method's space before any work starts, so a bad `tune.space` costs nothing."""
    tu = cfg["tune"]
    if not isinstance(tu.get("space") or {}, dict):
        raise SystemExit(f"tune.space must map method names to {{parameter: [values]}}, got {tu['space']!r}")
    for method in tu["methods"]:
        try:
            tune_space(tu, method)
        except ValueError as e:
            raise SystemExit(f"tune.space / tune.methods: {e}") from None


def resolve_out(out: str) -> Path:
    """Relative paths resolve against where the user launched the job. Under `ray job submit`
    the job runs in a temporary copy of the working dir, so a relative path would vanish with
    it: it goes to ~/kvray-runs instead (pass an absolute --out, or use `make calibrate`)."""
    path = Path(out).expanduser()
    if path.is_absolute():
        return path
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ or "_ray_pkg_" in os.getcwd():  # a submitted job
        return Path.home() / "kvray-runs" / path
    return path.resolve()


# ----------------------------------------------------------------------------- stages


def samples_for(section: dict, seed: int, count_tokens, offset: int = 0) -> list:
    out = []
    for j, task in enumerate(section["tasks"]):
        n = section.get("samples") or (section.get("contexts", 0) + section.get("heldout", 0))
        out += make_samples(task, n, length=int(section["length"]), seed=seed + 1000 * offset + j,
                            count_tokens=count_tokens)
    return out


def stage_eval(cfg, pool, run_id, run_path, count_tokens):
    from kvray.actors import run_eval_distributed
    from kvray.eval.runner import build_presses

    ev = cfg["eval"]
    samples = samples_for(ev, cfg["seed"], count_tokens, offset=0)
    methods = kvray.list_methods() if ev["methods"] == "all" else list(ev["methods"])
    presses = build_presses(methods, [float(r) for r in ev["ratios"]])
    protocols = [p == "aware" for p in ev["protocols"]]
    bad = [p for p in ev["protocols"] if p not in ("agnostic", "aware")]
    if bad:
        raise SystemExit(f"eval.protocols must be agnostic and/or aware, got {bad}")
    print(f"[eval] {len(samples)} samples x {len(presses)} configs x {len(protocols)} protocols "
          f"on {len(pool.actors)} actors", flush=True)
    _, df = run_eval_distributed(pool, samples, presses, out_dir=run_path / "evals", protocols=protocols,
                                 run_id=run_id)
    return df


def stage_calibration(cfg, pool, run_path, count_tokens):
    import pandas as pd

    from kvray.actors import measure_curves_distributed
    from kvray.calibration import Calibrator, fit_calibrator, validate_calibrator

    cal = cfg["calibration"]
    out = run_path / "calibration"
    out.mkdir(parents=True, exist_ok=True)
    fitted: dict[str, tuple] = {}
    todo = [m for m in cal["methods"] if not (out / f"{m}.json").is_file()]
    for m in cal["methods"]:
        if m not in todo:
            fitted[m] = (Calibrator.load(out / f"{m}.json"), json.loads((out / f"{m}.validation.json").read_text()))
    if not todo:
        return fitted
    samples = samples_for(cal, cfg["seed"], count_tokens, offset=2)
    n_fit = int(cal["contexts"])
    fit_ids, held_ids = set(), set()
    for task in cal["tasks"]:
        ids = [s.sample_id for s in samples if s.task == task]
        fit_ids |= set(ids[:n_fit])
        held_ids |= set(ids[n_fit:])
    print(f"[calibration] {len(samples)} contexts x {len(todo)} methods x {len(cal['retentions'])} retentions",
          flush=True)
    rows = measure_curves_distributed(pool, samples, {m: {} for m in todo}, cal["retentions"])
    curves = pd.DataFrame(rows)
    curves["split"] = curves["sample_id"].map(lambda s: "fit" if s in fit_ids else "heldout")
    curves.to_parquet(out / f"curves-{'-'.join(todo)}.parquet", index=False)
    tau = float(cal["tolerance"])
    for m in todo:
        mine = curves[curves["method"] == m]
        calibrator = fit_calibrator(mine[mine["split"] == "fit"].to_dict("records"), m, tau=tau)
        report = validate_calibrator(calibrator, mine[mine["split"] == "heldout"].to_dict("records"), tau=tau)
        calibrator.save(out / f"{m}.json")
        (out / f"{m}.validation.json").write_text(json.dumps(report, indent=1, default=float))
        fitted[m] = (calibrator, report)
    return fitted


def stage_tune(cfg, run_id, run_path, count_tokens, cpus_per_trial):
    import pandas as pd

    from kvray.tune import search_budgets, trials_table

    tu = cfg["tune"]
    out = run_path / "tune"
    out.mkdir(parents=True, exist_ok=True)
    samples = samples_for(tu, cfg["seed"], count_tokens, offset=1)
    results = {}
    for method in tu["methods"]:
        path = out / f"{method}.parquet"
        if path.is_file():
            results[method] = pd.read_parquet(path)
            continue
        space = tune_space(tu, method)
        print(f"[tune] {method}: {len(space.grid())} allocations in the space, {tu['trials']} trials, "
              f"{len(samples)} calibration samples", flush=True)
        res = search_budgets(space, samples, model=cfg["model"], num_trials=int(tu["trials"]),
                             max_concurrent=int(cfg["workers"]), cpus_per_trial=cpus_per_trial,
                             query_aware=bool(tu["query_aware"]), grace_period=int(tu["grace_period"]),
                             reduction_factor=float(tu["reduction_factor"]), seed=int(cfg["seed"]),
                             storage_path=str(out / "ray"), name=f"{run_id}-{method}", run=run_id, verbose=0,
                             progress=lambda line: print(line, flush=True))
        table = trials_table(res, run_id, cfg["model"] or "SmolLM2-135M-Instruct")
        table.to_parquet(path, index=False)
        print(f"[tune] {method}: best {res.best_score:.3f} vs uniform {res.baseline_score:.3f} "
              f"({res.sample_evaluations} sample evaluations, {res.elapsed_s:.0f}s): {res.best_config}", flush=True)
        results[method] = table
    return results


def make_policies(cfg, run_id, run_path, model_name, num_layers, num_kv_heads, tuned, calibrated):
    from kvray.policy import Policy, make_policy_id

    tu = cfg["tune"]
    policies = []
    ratio = float(tu["compression_ratio"])
    for method in sorted(set(tuned) | set(calibrated)):
        space = tune_space(tu, method) if method in tuned else None
        metrics, allocation = {}, {}
        if method in tuned:
            table = tuned[method]
            best = table[table["is_best"]].iloc[0]
            config = json.loads(best["config"])
            base = table[table["is_baseline"]]
            press = space.press(config, num_layers, num_kv_heads)
            allocation = config
            metrics.update(tune_score=float(best["score"]),
                           uniform_score=float(base["score"].max()) if len(base) else None,
                           tune_samples=int(best["n_samples"]))
        else:
            press = kvray.make_press(method, compression_ratio=ratio)
        calibrator = None
        if method in calibrated:
            cal, report = calibrated[method]
            calibrator = cal.to_dict()
            metrics["calibration"] = {k: v for k, v in report.items() if not isinstance(v, list)}
        policy = Policy(
            policy_id=make_policy_id(model_name, method, ratio, run_id), model=model_name, method=press.name,
            params=press.params(), compression_ratio=press.target_ratio, query_aware=bool(tu["query_aware"]),
            plan=press.plan.to_dict() if press.plan is not None else None, allocation=allocation,
            calibrator=calibrator, metrics=metrics,
            provenance={"run_id": run_id, "source_method": method, "kvray_version": kvray.__version__,
                        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        policy.save(run_path / "policies")
        policy.save(Path(cfg["_out"]) / "policies")  # the store Serve reads
        policies.append(policy)
    return policies


# ----------------------------------------------------------------------------- serving


def serve_policies(cfg, store: Path, policy_ids: list[str], host: str, port: int) -> str:
    """--serve: make the kvray Serve app on this cluster serve `store`. A running app that already
    lists every new policy needs nothing (the store is re-read per request); otherwise the app
    is deployed, or redeployed over this store. Returns one line for the summary."""
    import urllib.request

    from kvray.serve.app import APP_NAME, deploy, example_curl, local_url

    base = local_url(host, port)
    headers = {"x-api-key": os.environ["KVRAY_API_KEY"]} if os.environ.get("KVRAY_API_KEY") else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{base}/v1/policies", headers=headers), timeout=10) as r:
            served = {p["policy_id"] for p in json.loads(r.read()).get("policies", [])}
    except (OSError, ValueError, AttributeError, KeyError):  # nothing listening, another app, an old schema
        served = set()
    if policy_ids and set(policy_ids) <= served:
        how = f"already serving {store} at {base}: the new policies are live (hot reload)"
    else:
        print(f"[serve] deploying app {APP_NAME!r} over {store} on {base} ...", flush=True)
        deploy(store, cfg["model"], host, port)
        how = f"deployed app {APP_NAME!r} over {store} at {base}"
    return how + "\n  try: " + example_curl(base, policy_ids[0] if policy_ids else None, bool(headers))


# ----------------------------------------------------------------------------- summary


def largest_safe_ratio(df, tolerance: float = 0.01) -> "object":
    """Per (protocol, method): the largest ratio whose mean score is within `tolerance` (on the
    0-1 score scale: 0.01 = "1 point") of the full cache's on the same samples, with its score, kv
    bytes, n, and the 95% paired bootstrap interval of (method - full) there; `verdict` says
    whether that interval clears -tolerance ("holds"), or the data cannot tell."""
    import pandas as pd

    from kvray.stats import paired_bootstrap_ci

    rows = []
    for aware, part in df.groupby("query_aware"):
        full_rows = part[part["method"] == "full"].set_index("sample_id")["score"]
        full = full_rows.mean()
        for method, m in part[part["method"] != "full"].groupby("method"):
            by_ratio = m.groupby("compression_ratio").agg(score=("score", "mean"),
                                                          kv_kept=("kv_bytes_kept", "mean"),
                                                          kv_full=("kv_bytes_full", "mean"), n=("score", "size"))
            ok = by_ratio[by_ratio["score"] >= full - tolerance]
            row = {"protocol": "aware" if aware else "agnostic", "method": method, "full_score": full,
                   "max_ratio_within_1pt": float("nan"), "score_there": float("nan"), "n": int(by_ratio["n"].min()),
                   "diff_ci95": "", "verdict": "no ratio", "kv_MiB_kept": float("nan"),
                   "kv_MiB_full": float(by_ratio["kv_full"].mean()) / 2**20}
            if len(ok):  # else no ratio of the grid stays within 1 point
                r = float(ok.index.max())
                there = m[m["compression_ratio"] == r].set_index("sample_id")["score"]
                common = there.index.intersection(full_rows.index)
                lo, hi = paired_bootstrap_ci(there[common].to_numpy(), full_rows[common].to_numpy())
                row.update(max_ratio_within_1pt=r, score_there=float(ok.loc[r, "score"]),
                           kv_MiB_kept=float(ok.loc[r, "kv_kept"]) / 2**20, diff_ci95=f"[{lo:+.2f}, {hi:+.2f}]",
                           verdict="holds" if lo >= -tolerance else "cannot tell")
            for ratio, score in by_ratio["score"].items():
                row[f"score@{ratio:g}"] = float(score)
            rows.append(row)
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: jobs/calibrate.yaml)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. eval.samples=10")
    ap.add_argument("--model", default=None, help="model name (default: the config's, i.e. the embedded SmolLM2)")
    ap.add_argument("--out", default=None, help="results root (absolute path recommended)")
    ap.add_argument("--workers", type=int, default=None, help="model actors")
    ap.add_argument("--run-id", default=None, help="resume this run (default: a new id)")
    ap.add_argument("--smoke-test", action="store_true", help="a tiny configuration (about 2 minutes on a laptop)")
    ap.add_argument("--skip", default="", help="comma list of stages to skip: eval,tune,calibration")
    ap.add_argument("--serve", action="store_true",
                    help="when done, deploy (or update) the kvray Serve app on this cluster over the policy store")
    ap.add_argument("--serve-host", default="127.0.0.1", help="HTTP host for --serve (default 127.0.0.1)")
    ap.add_argument("--serve-port", type=int, default=8000, help="HTTP port for --serve (default 8000)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("ray", "ray.tune", "ray.data"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    cfg = load_config(args)
    check_tune_spaces(cfg)
    skip = {s for s in args.skip.split(",") if s}
    if skip - {"eval", "tune", "calibration"}:
        raise SystemExit(f"--skip takes eval, tune, calibration; got {sorted(skip)}")
    out = resolve_out(cfg["out"])
    cfg["_out"] = str(out)
    run_id = args.run_id or new_run_id()
    run_path = out / run_id
    run_path.mkdir(parents=True, exist_ok=True)
    (run_path / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.items() if not k.startswith("_")}))
    t_start = time.perf_counter()

    import ray

    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    ray.init(log_to_driver=True)
    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) >= 1
    workers = int(cfg["workers"])
    cpus = float(cfg["cpus_per_worker"])
    print(f"[kvray] run {run_id} -> {run_path}\n[kvray] cluster: {resources.get('CPU', 0):g} CPUs, "
          f"{resources.get('GPU', 0):g} GPUs; {workers} model actors", flush=True)
    tokenizer = kvray.load_tokenizer(cfg["model"])

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    from kvray.actors import start_workers

    pool = start_workers(workers, cfg["model"], cpus_per_worker=cpus, use_gpu=use_gpu, run=run_id)
    info = pool.infos[0]
    model_name = info["model"]
    print(f"[kvray] model {model_name}: {info['num_layers']} layers x {info['num_kv_heads']} KV heads on "
          f"{info['device']}, loaded in {info['load_s']:.1f}s", flush=True)
    df = None
    calibrated: dict = {}
    try:
        if "eval" not in skip:
            df = stage_eval(cfg, pool, run_id, run_path, count_tokens)
        if "calibration" not in skip:
            calibrated = stage_calibration(cfg, pool, run_path, count_tokens)
    finally:
        pool.shutdown()  # free the CPUs/GPUs for the Tune trial actors
    tuned = {} if "tune" in skip else stage_tune(cfg, run_id, run_path, count_tokens, cpus)
    policies = make_policies(cfg, run_id, run_path, model_name, info.get("plan_layers", info["num_layers"]), info["num_kv_heads"],
                             tuned, calibrated)
    elapsed = time.perf_counter() - t_start

    import pandas as pd

    lines = [f"kvray calibrate: run {run_id} on {model_name} finished in {elapsed / 60:.1f} min", ""]
    summary: dict = {"run_id": run_id, "model": model_name, "elapsed_s": elapsed, "run_dir": str(run_path),
                     "num_layers": info["num_layers"], "num_kv_heads": info["num_kv_heads"]}
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
        if df is not None:
            safe = largest_safe_ratio(df)
            lines += ["Largest compression ratio within 1 point of the full cache (eval grid, mean over tasks). "
                      "1 point = 0.01 on the 0-1 score; n = samples per cell; diff_ci95 = 95% paired bootstrap "
                      "interval of (method - full) at that ratio; verdict 'holds' when it clears -0.01, 'cannot "
                      "tell' when the samples are too few to say, 'no ratio' when none of the grid's stays within:",
                      safe.to_string(index=False), ""]
            summary["largest_safe_ratio"] = safe.to_dict("records")
        if tuned:
            t_rows = []
            for method, table in tuned.items():
                best = table[table["is_best"]].iloc[0]
                base = table[table["is_baseline"]]["score"].max()
                t_rows.append({"method": method, "target_ratio": float(best["target_ratio"]),
                               "tuned_score": float(best["score"]), "uniform_score": float(base),
                               "gain": float(best["score"] - base), "trials": len(table),
                               "sample_evals": int(table["evaluated"].sum()), "best": best["config"]})
            tdf = pd.DataFrame(t_rows)
            lines += ["Tuned allocation vs uniform on the calibration split:", tdf.to_string(index=False), ""]
            summary["tune"] = t_rows
        if calibrated:
            c_rows = [{"method": m, "alpha": c.alpha, "beta": c.beta, "tau": c.tau,
                       **{k: v for k, v in rep.items() if not isinstance(v, list)}} for m, (c, rep) in calibrated.items()]
            lines += ["Calibrators (fit on some contexts, checked on held-out ones):",
                      pd.DataFrame(c_rows).to_string(index=False), ""]
            summary["calibration"] = c_rows
    def tuned_note(p) -> str:
        m = p.metrics
        if m.get("tune_score") is None or m.get("uniform_score") is None:
            return ""
        return f", tuned {m['tune_score']:.2f} vs uniform {m['uniform_score']:.2f}"

    lines += ["Policies:"] + [f"  {p.policy_id}  ({p.method}, ratio {p.compression_ratio:.2f}{tuned_note(p)}"
                              f"{', calibrated' if p.calibrator else ''})" for p in policies]
    # the curl names the policy whose search gained most over uniform (the first one on a tie)
    shown = max(policies, key=lambda p: (p.metrics.get("tune_score") or 0.0) - (p.metrics.get("uniform_score") or 0.0),
                default=None)
    from kvray.serve.app import example_curl

    store = out / "policies"
    if args.serve:
        serving = serve_policies(cfg, store, [p.policy_id for p in policies], args.serve_host, args.serve_port)
    else:
        serving = ("serve them: `make serve` (or `kvray serve --policies " + str(store) + "`), then\n  " +
                   example_curl("http://127.0.0.1:8000", shown.policy_id if shown else None))
    lines += ["", "Serving: " + serving]
    report = run_path / "report.html"
    summary.update(policies=[p.policy_id for p in policies], report=str(report))
    (run_path / "summary.json").write_text(json.dumps(summary, indent=1, default=str))  # the report reads it
    try:
        from kvray.report import write_report

        write_report(run_path, report)
        report_line = f"  report          {report}  (plots; regenerate: kvray report {run_path})"
    except Exception as exc:  # noqa: BLE001 -- the results are written; a plotting failure must not fail the job
        log.warning("the report could not be written: %s: %s", type(exc).__name__, exc)
        report_line = f"  report          not written ({type(exc).__name__}: {exc}); retry: kvray report {run_path}"
    lines += ["", "Where everything is:", report_line,
              f"  run directory   {run_path}",
              f"  eval rows       {run_path / 'evals'}  (pandas.read_parquet / duckdb / kvray.results.read_results)",
              f"  tune trials     {run_path / 'tune'}/<method>.parquet  (Tune state in tune/ray)",
              f"  calibration     {run_path / 'calibration'}",
              f"  policies        {run_path / 'policies'}  (also copied to the store {out / 'policies'})",
              f"  summary         {run_path / 'summary.txt'}, summary.json"]
    text = "\n".join(lines)
    (run_path / "summary.txt").write_text(text + "\n")
    print("\n" + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

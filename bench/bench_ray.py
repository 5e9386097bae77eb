"""Ray benchmark on the embedded model, side by side in one run (not a timed test).

(a) scaling: the same evaluation grid (samples x configs, one prefill per sample) on 1 model
    actor, then on 2 (one CPU / torch thread each): throughput ratio;
(b) Tune vs grid: the exhaustive grid over a budget-search space (every allocation on every
    calibration sample, with the same evaluation as the Tune trials), then `search_budgets` on
    the same space and samples: the best score each reaches and the sample evaluations each used.

    python bench/bench_ray.py            # writes docs/bench_ray.md and bench/results/ray.json
    python bench/bench_ray.py --quick    # smaller, for a smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import ray

import kvray
from kvray.actors import run_eval_distributed, start_workers
from kvray.eval import make_samples
from kvray.eval.runner import build_presses
from kvray.tune import SearchSpace, search_budgets

ROOT = Path(__file__).resolve().parent.parent


def bench_scaling(samples, presses, out) -> dict:
    res = {}
    for n in (1, 2):
        pool = start_workers(n, None, cpus_per_worker=1)
        t0 = time.perf_counter()
        _, df = run_eval_distributed(pool, samples, presses, out_dir=out / f"scaling{n}", progress=False)
        el = time.perf_counter() - t0
        pool.shutdown()
        res[n] = {"seconds": el, "samples_per_s": len(samples) / el, "rows": len(df),
                  "mean_score": float(df["score"].mean())}
        print(f"[scaling] {n} actor(s): {el:.1f}s for {len(samples)} samples x {len(presses)} configs", flush=True)
    res["speedup"] = res[1]["seconds"] / res[2]["seconds"]
    return res


def bench_tune_vs_grid(samples, space: SearchSpace, trials: int, seeds: list[int], out) -> dict:
    # the exhaustive grid: every allocation on every sample, one prefill per sample, 2 actors
    pool = start_workers(2, None, cpus_per_worker=1)
    info = pool.infos[0]
    grid = space.grid()
    presses = [space.press(c, info["num_layers"], info["num_kv_heads"]) for c in grid]
    t0 = time.perf_counter()
    _, df = run_eval_distributed(pool, samples, presses, out_dir=out / "grid", protocols=[True], progress=False)
    grid_s = time.perf_counter() - t0
    pool.shutdown()
    key = {(p.name, p.params_json(), p.plan_id): json.dumps(c, sort_keys=True) for p, c in zip(presses, grid)}
    df["config"] = [key[(m, pj, pid)] for m, pj, pid in zip(df["method"], df["params"], df["plan_id"])]
    by_config = df.groupby("config")["score"].mean().sort_values(ascending=False)
    grid_best = float(by_config.iloc[0])
    baseline = float(by_config[json.dumps(space.baseline(), sort_keys=True)])
    grid_evals = len(grid) * len(samples)
    table = df.pivot_table(index="config", columns="sample_id", values="score")[[s.sample_id for s in samples]]
    simulated = simulate_searchers(table, space, grid_best)
    print(f"[grid] {len(grid)} allocations x {len(samples)} samples = {grid_evals} evaluations in {grid_s:.0f}s; "
          f"best {grid_best:.3f} ({(by_config == grid_best).sum()} configs tie), uniform {baseline:.3f}", flush=True)
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        res = search_budgets(space, samples, num_trials=trials, max_concurrent=2, seed=seed,
                             storage_path=str(out / "tune"), name=f"bench-seed{seed}")
        el = time.perf_counter() - t0
        best_key = json.dumps(res.best_config, sort_keys=True)
        run = {"seed": seed, "trials": trials, "best_config": res.best_config, "tune_best_score": res.best_score,
               "grid_score_of_tune_best": float(by_config[best_key]), "gap_to_grid_best": grid_best - res.best_score,
               "sample_evaluations": res.sample_evaluations, "sample_steps": res.sample_steps,
               "share_of_grid_evaluations": res.sample_evaluations / grid_evals,
               "share_of_grid_steps": res.sample_steps / grid_evals, "seconds": el}
        runs.append(run)
        print(f"[tune seed {seed}] best {res.best_score:.3f} (gap {run['gap_to_grid_best']:+.3f}) with "
              f"{res.sample_evaluations} evaluations ({run['share_of_grid_evaluations']:.1%} of the grid), "
              f"{res.sample_steps} ASHA steps ({run['share_of_grid_steps']:.1%}), {el:.0f}s", flush=True)
    return {"space": {k: list(v) for k, v in space.choices.items()}, "method": space.method,
            "compression_ratio": space.compression_ratio, "samples": len(samples), "grid_configs": len(grid),
            "grid_evaluations": grid_evals, "grid_seconds": grid_s, "grid_best_score": grid_best,
            "grid_ties_at_best": int((by_config == grid_best).sum()), "grid_uniform_score": baseline,
            "grid_top5": {k: float(v) for k, v in by_config.head(5).items()}, "tune": runs,
            "simulated": simulated}


def simulate_searchers(table, space: SearchSpace, grid_best: float, seeds: int = 20, trials=(16, 24, 32, 40)) -> list:
    """Replay searchers on the grid's per-sample scores (evaluation is deterministic, so a trial's
    scores are the grid's): Optuna TPE (as search_budgets configures it) and random search, each
    with the same asynchronous successive-halving rule (grace 2 samples, reduction 3, uniform
    baseline first and never stopped), one trial at a time, many seeds. Cheap, and shows how often
    each reaches the grid's best, which one real run cannot."""
    import numpy as np
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n = table.shape[1]
    milestones, m = [], 2
    while m < n:
        milestones.append(m)
        m *= 3
    dists = {k: optuna.distributions.CategoricalDistribution(list(v)) for k, v in space.choices.items()}
    out = []
    for kind in ("tpe", "random"):
        for n_trials in trials:
            hits, evals = 0, []
            for seed in range(seeds):
                sampler = (optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=6)
                           if kind == "tpe" else optuna.samplers.RandomSampler(seed=seed))
                study = optuna.create_study(direction="maximize", sampler=sampler)
                study.enqueue_trial(space.baseline())
                rungs: dict[int, list] = {}
                finished, used = [], 0
                for _ in range(n_trials):
                    trial = study.ask(dists)
                    cfg = {k: trial.params[k] for k in space.choices}
                    row = table.loc[json.dumps(cfg, sort_keys=True)].to_numpy()
                    reached = n
                    for ms in milestones:
                        score = row[:ms].mean()
                        rungs.setdefault(ms, []).append(score)
                        cut = np.quantile(rungs[ms], 1 - 1 / 3) if len(rungs[ms]) >= 3 else -1.0
                        if score < cut and not space.is_baseline(cfg):
                            reached = ms
                            break
                    if reached == n:
                        finished.append(row.mean())
                    used += reached
                    study.tell(trial, row[:reached].mean())
                hits += abs(max(finished) - grid_best) <= 0.01
                evals.append(used)
            out.append({"searcher": kind, "trials": n_trials, "seeds": seeds, "reach_best_share": hits / seeds,
                        "mean_sample_steps": float(np.mean(evals)),
                        "share_of_grid": float(np.mean(evals)) / (n * len(table))})
    return out


def render(report: dict) -> str:
    sc, tg = report["scaling"], report["tune_vs_grid"]
    lines = [
        "# Ray benchmark (embedded SmolLM2-135M, CPU)", "",
        f"Machine: {report['machine']}. Generated by `python bench/bench_ray.py` (`make bench-ray`); "
        "raw numbers in `bench/results/ray.json`.", "",
        "## Scaling: 1 vs 2 model actors (one CPU thread each), same grid, same run", "",
        f"{report['scaling_setup']}", "",
        "| actors | seconds | samples/s |", "|---|---|---|",
        f"| 1 | {sc['1']['seconds']:.1f} | {sc['1']['samples_per_s']:.3f} |",
        f"| 2 | {sc['2']['seconds']:.1f} | {sc['2']['samples_per_s']:.3f} |", "",
        f"**Speed-up 2 vs 1 actor: {sc['speedup']:.2f}x.**", "",
        "## Tune (Optuna TPE + ASHA over samples) vs the exhaustive grid, same space and samples", "",
        f"Method `{tg['method']}` at mean ratio {tg['compression_ratio']}, query-aware; space "
        f"{json.dumps(tg['space'])} = {tg['grid_configs']} allocations; {tg['samples']} calibration samples "
        f"(niah_single, ~1k tokens).", "",
        f"Grid: {tg['grid_evaluations']} sample evaluations ({tg['grid_seconds']:.0f}s on 2 actors), best score "
        f"{tg['grid_best_score']:.3f} ({tg['grid_ties_at_best']} allocations tie at the best), uniform "
        f"{tg['grid_uniform_score']:.3f}.", "",
        "| seed | trials | Tune best | gap to grid best | evaluations (share of grid) | ASHA sample steps (share) | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in tg["tune"]:
        lines.append(f"| {r['seed']} | {r['trials']} | {r['tune_best_score']:.3f} | {r['gap_to_grid_best']:+.3f} | "
                     f"{r['sample_evaluations']} ({r['share_of_grid_evaluations']:.1%}) | "
                     f"{r['sample_steps']} ({r['share_of_grid_steps']:.1%}) | {r['seconds']:.0f} |")
    lines += ["", "Evaluations count compress + decode runs; a config the searcher proposes again on the same "
              "actor is served from memory (ASHA steps count those too). Top grid allocations: ", ""]
    lines += [f"- {k}: {v:.3f}" for k, v in tg["grid_top5"].items()]
    lines += ["", "Searchers replayed on the grid's per-sample scores (same ASHA rule, one trial at a time, "
              f"{tg['simulated'][0]['seeds']} seeds each): share of seeds whose best finished trial is within 0.01 "
              "of the grid's best, and sample steps used.", "",
              "| searcher | trials | reaches grid best | sample steps (share of grid) |", "|---|---|---|---|"]
    lines += [f"| {r['searcher']} | {r['trials']} | {r['reach_best_share']:.0%} | {r['mean_sample_steps']:.0f} "
              f"({r['share_of_grid']:.1%}) |" for r in tg["simulated"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tok = kvray.load_tokenizer()

    def count(s: str) -> int:
        return len(tok(s, add_special_tokens=False).input_ids)

    n_scale, n_cal, trials = (4, 4, 6) if args.quick else (12, 12, 32)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = Path(tempfile.mkdtemp(prefix="kvray-bench-"))
    scale_samples = make_samples("niah_single", n_scale, length=1000, seed=11, count_tokens=count)
    presses = build_presses(["full", "streaming_llm", "knorm", "snapkv", "pyramidkv", "adakv"], [0.5, 0.75])
    scaling = bench_scaling(scale_samples, presses, out)
    cal = make_samples("niah_single", n_cal, length=1000, seed=7, count_tokens=count)
    space = SearchSpace.default("snapkv", 0.5)
    if args.quick:
        space = SearchSpace.default("snapkv", 0.5, window_size=[16, 32], kernel_size=[7], layer_slope=[0, 0.5])
    tvg = bench_tune_vs_grid(cal, space, trials, [int(s) for s in args.seeds.split(",")], out)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, ray {ray.__version__}",
              "scaling_setup": f"{n_scale} samples (niah_single, ~1k tokens) x {len(presses)} configs, query-agnostic.",
              "scaling": {str(k): v for k, v in scaling.items()}, "tune_vs_grid": tvg}
    ray.shutdown()
    if not args.quick:
        (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
        (ROOT / "bench" / "results" / "ray.json").write_text(json.dumps(report, indent=1, default=str))
        (ROOT / "docs" / "bench_ray.md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()

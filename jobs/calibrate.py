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
from dataclasses import dataclass, field
from pathlib import Path

import yaml

try:
    import kvray
except ImportError:  # a plain source tree (e.g. a working_dir without kvray installed)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import kvray

from kvray.eval.tasks import make_samples
from kvray.results import new_run_id, press_config_id
from kvray.stats import format_ci as _ci
from kvray.validation import (CANNOT_TELL, DEFAULT_TOLERANCE, HOLDS, PLAN_WINS, largest_ratio, plan_verdict, recommend,
                              target_verdict, validation_record)

DEFAULT_CONFIG = Path(__file__).with_name("calibrate.yaml")
SMOKE = {
    "eval": {"methods": ["full", "snapkv", "knorm"], "ratios": [0.1, 0.5], "tasks": ["niah_single"], "length": 500,
             "samples": 2, "rounds": [4]},
    "tune": {"methods": ["snapkv", "compactor"], "tasks": ["niah_single"], "length": 500, "samples": 3, "trials": 3,
             "grace_period": 1},
    "calibration": {"methods": ["snapkv"], "tasks": ["niah_single"], "length": 500, "contexts": 2, "heldout": 1,
                    "retentions": [0.25, 0.5, 0.75]},
    # a looser target, so that the plumbing (selection, test split, policies) runs end to end
    "policy": {"tasks": ["niah_single"], "length": 500, "rounds": [2, 4], "tolerance": 0.15, "min_n": 4},
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


def tune_aware(tu: dict, method: str) -> bool:
    """Tune's protocol for `method`: `tune.query_aware` is one bool for all, or {method: bool}."""
    qa = tu["query_aware"]
    if isinstance(qa, dict):
        if method not in qa:
            raise SystemExit(f"tune.query_aware names no protocol for {method}: give it a bool for every method in "
                             f"tune.methods ({', '.join(tu['methods'])}), or one bool for all")
        return bool(qa[method])
    return bool(qa)


def check_tune_spaces(cfg: dict) -> None:
    """Build every tuned method's space before any work starts, so a bad `tune.space` costs nothing."""
    tu = cfg["tune"]
    if not isinstance(tu.get("space") or {}, dict):
        raise SystemExit(f"tune.space must map method names to {{parameter: [values]}}, got {tu['space']!r}")
    for method in tu["methods"]:
        tune_aware(tu, method)
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


def round_samples(section: dict, seed: int, count_tokens, offset: int, counts: list[int]) -> list[list]:
    """The samples each round adds: per task of `section`, those from the previous cumulative
    count to the next (`counts`, per task, the first one already there), from the split's seed
    (`make_samples` is prefix-stable, so round k's samples extend round k-1's)."""
    by_task: dict[str, list] = {}
    for s in samples_for(dict(section, samples=counts[-1]), seed, count_tokens, offset=offset):
        by_task.setdefault(s.task, []).append(s)
    return [[s for t in section["tasks"] for s in by_task[t][a:b]] for a, b in zip(counts, counts[1:])]


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


def tune_prefills(cfg, pool, run_path, count_tokens, num_layers, num_kv_heads) -> dict:
    """The tune split's prefills, made once on the model actors before they go (one that every
    search still to run can use) and left in the object store: each Tune trial actor then takes
    them instead of prefilling every sample itself, once per method. {} when no search is left."""
    from kvray.actors import prefill_distributed
    from kvray.tune import tune_prefill_spec

    tu = cfg["tune"]
    todo = [m for m in tu["methods"] if not (run_path / "tune" / f"{m}.parquet").is_file()]
    if not todo:
        return {}
    spec = tune_prefill_spec([tune_space(tu, m) for m in todo], [tune_aware(tu, m) for m in todo], num_layers,
                             num_kv_heads)
    samples = samples_for(tu, cfg["seed"], count_tokens, offset=1)
    t0 = time.perf_counter()
    refs = prefill_distributed(pool, samples, **spec)
    print(f"[tune] {len(refs)} prefills of the tune split made once for {', '.join(todo)} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return refs


def stage_tune(cfg, run_id, run_path, count_tokens, cpus_per_trial, prefills=None):
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
                             query_aware=tune_aware(tu, method), grace_period=int(tu["grace_period"]),
                             reduction_factor=float(tu["reduction_factor"]), seed=int(cfg["seed"]),
                             storage_path=str(out / "ray"), name=f"{run_id}-{method}", run=run_id, verbose=0,
                             progress=lambda line: print(line, flush=True), prefills=prefills)
        table = trials_table(res, run_id, cfg["model"] or "SmolLM2-135M-Instruct")
        table.to_parquet(path, index=False)
        print(f"[tune] {method}: best {res.best_score:.3f} vs uniform {res.baseline_score:.3f} "
              f"({res.sample_evaluations} sample evaluations, {res.elapsed_s:.0f}s): {res.best_config}", flush=True)
        results[method] = table
    return results


@dataclass
class Candidate:
    """A policy the job may emit: `method` at `ratio` in one protocol, with uniform budgets and,
    when Tune searched it, the tuned press (the plan moved to `ratio`, keeping its shape)."""

    method: str
    aware: bool
    ratio: float
    why: str
    uniform: object
    tuned: object = None
    allocation: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    tune: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    plan_verdict: str = ""

    @property
    def protocol(self) -> str:
        return "aware" if self.aware else "agnostic"

    def chosen(self):
        """The press the policy serves: the tuned one only when its gain held on the test split."""
        return self.tuned if self.tuned is not None and self.plan_verdict == PLAN_WINS else self.uniform


def build_candidates(cfg, df, tuned, num_layers, num_kv_heads) -> tuple[list[Candidate], list[str]]:
    """Per protocol of the eval grid, the method holding the largest ratio within the tolerance
    (the selection split); per tuned method, its own largest such ratio in Tune's protocol.
    Returns the candidates and one line per method that has no candidate, saying why."""
    from kvray.policy import Policy

    tol = float(cfg["policy"]["tolerance"])
    tu = cfg["tune"]
    out: dict[tuple, Candidate] = {}
    notes = []

    def select(aware: bool, method: str) -> dict | None:
        if df is None:
            return None
        return largest_ratio(df[df["query_aware"] == aware], method, tol)

    if df is not None:
        for aware, part in df.groupby("query_aware"):
            proto = "aware" if aware else "agnostic"
            ranked, exclude = [], {"full"}
            while len(ranked) < int(cfg["policy"].get("candidates", 1)):
                best = recommend(part, tol, exclude=exclude)
                if best is None:
                    break
                ranked.append(best)
                exclude.add(best["method"])
            if not ranked:
                notes.append(f"{proto}: no method of the eval grid stays within {tol:g} of the full cache at any "
                             "ratio; serve the full cache")
            for rank, best in enumerate(ranked, 1):
                out[(best["method"], bool(aware))] = Candidate(
                    best["method"], bool(aware), best["ratio"],
                    f"rank {rank} on the eval grid ({proto}): its largest ratio within {tol:g}",
                    kvray.make_press(best["method"], compression_ratio=best["ratio"]), selection=best)
    for method, table in tuned.items():
        aware = tune_aware(tu, method)
        sel = select(aware, method)
        if sel is not None and not sel["scores"]:
            sel = None  # not on the eval grid: no ratio was chosen for it
        if sel is not None and sel["ratio"] is None:
            notes.append(f"{method} (tuned, {'aware' if aware else 'agnostic'}): no ratio of the eval grid stays "
                         f"within {tol:g} of the full cache (scores {_fmt_scores(sel['scores'])} vs full "
                         f"{sel['full_score']:.2f}); no policy")
            continue
        ratio = sel["ratio"] if sel is not None else float(tu["compression_ratio"])
        best = table[table["is_best"]].iloc[0]
        base = table[table["is_baseline"]]
        config = json.loads(best["config"])
        press = tune_space(tu, method).press(config, num_layers, num_kv_heads)
        at_tune = Policy(policy_id="candidate", model="-", method=press.name, params=press.params(),
                         compression_ratio=press.target_ratio, plan=press.plan.to_dict() if press.plan else None)
        key = (method, aware)
        cand = out.get(key) or Candidate(method, aware, ratio, f"tuned ({method})",
                                         kvray.make_press(method, compression_ratio=ratio), selection=sel or {})
        cand.why = cand.why if key in out else (f"tuned, at the eval grid's largest ratio within {tol:g}"
                                                if sel is not None else "tuned, at Tune's ratio (not on the eval grid)")
        cand.tuned, cand.allocation = at_tune.press(ratio), config
        cand.tune = {"ratio": float(best["target_ratio"]), "score": float(best["score"]),
                     "uniform_score": float(base["score"].max()) if len(base) else None,
                     "samples": int(best["n_samples"]), "split": "tune"}
        out[key] = cand
    return list(out.values()), notes


def _fmt_scores(scores: dict) -> str:
    return ", ".join(f"{s:.2f}@{r:g}" for r, s in sorted(scores.items()))


def stage_validate(cfg, pool, run_id, run_path, count_tokens, candidates: list[Candidate]) -> "object":
    """Every candidate on the test split (its own seed: disjoint from the eval, tune and
    calibration splits), against uniform budgets and the full cache on the same samples, in
    rounds: a round adds samples only for the candidates whose verdicts the intervals cannot
    tell yet (successive halving over the cells). Fills each candidate's `validation`."""
    import pandas as pd

    from kvray.actors import run_eval_distributed

    pol = cfg["policy"]
    tol = float(pol["tolerance"])
    rounds = sorted({int(n) for n in pol["rounds"]})
    if not rounds or rounds[0] < 1:
        raise SystemExit(f"policy.rounds must be increasing positive sample counts per task, got {pol['rounds']!r}")
    batches = round_samples({"tasks": pol["tasks"], "length": pol["length"]}, cfg["seed"], count_tokens, 3,
                            [0] + rounds)
    full = kvray.make_press("full")
    frames, todo = [], list(candidates)
    for k, batch in enumerate(batches):
        print(f"[validate] round {k + 1}/{len(rounds)}: {len(batch)} test samples for "
              f"{', '.join(f'{c.method} ({c.protocol})' for c in todo)}", flush=True)
        # each protocol its own configs (none decoded in vain), both on one prefill per sample
        presses = {aware: list({press_config_id(p, aware): p for c in todo if c.aware == aware
                                for p in (full, c.uniform, c.tuned) if p is not None}.values())
                   for aware in sorted({c.aware for c in todo})}
        _, rows = run_eval_distributed(pool, batch, presses, out_dir=run_path / "validation",
                                       run_id=f"{run_id}-test{k + 1}")
        frames.append(rows)
        rows = pd.concat(frames, ignore_index=True)
        for c in todo:
            validate_candidate(c, rows, full, tol)
        todo = [c for c in todo if CANNOT_TELL in (c.validation["verdict"], c.plan_verdict or "")
                or c.validation["n"] < int(pol.get("min_n", 0))]
        if not todo:
            break
    return pd.concat(frames, ignore_index=True) if frames else None


def undecided_cells(df, tol: float, min_n: int, keep: int = 0) -> list[tuple[bool, str, float]]:
    """(protocol, method, ratio) cells of the eval grid whose verdict against the full cache the
    samples so far cannot settle: the interval straddles -tol, or it clears it on fewer than
    `min_n` samples (a bootstrap on a dozen 0/1 scores is overconfident). Clear failures stop,
    and so do ratios below one that already holds; with `keep` > 0, so do ratios below the
    `keep`-th largest ratio that any method meets on its mean (they cannot reach the top `keep`)."""
    from kvray.stats import paired_bootstrap_ci

    out = []
    for aware, part in df.groupby("query_aware"):
        full = part[part["method"] == "full"].groupby("sample_id")["score"].mean()
        cells = part[(part["method"] != "full") & (part["plan_id"] == "uniform")]
        met = sorted((r for r in (largest_ratio(part, m, tol)["ratio"] for m in cells["method"].unique())
                      if r is not None), reverse=True)
        floor = met[keep - 1] if keep and len(met) >= keep else 0.0
        for method, m in cells.groupby("method"):
            held = None
            verdicts = {}
            for ratio, cell in sorted(m.groupby("compression_ratio"), key=lambda kv: kv[0]):
                s = cell.groupby("sample_id")["score"].mean()
                common = s.index.intersection(full.index)
                lo, hi = paired_bootstrap_ci(s[common].to_numpy(), full[common].to_numpy())
                verdict = target_verdict(lo, hi, tol)
                if verdict == HOLDS and len(common) >= min_n:
                    held = ratio
                verdicts[ratio] = (verdict, len(common))
            for ratio, (verdict, n) in verdicts.items():
                if (held is not None and ratio <= held) or ratio < floor:
                    continue
                if verdict == CANNOT_TELL or (verdict == HOLDS and n < min_n):
                    out.append((bool(aware), method, float(ratio)))
    return out


def stage_select(cfg, pool, run_id, run_path, count_tokens, df):
    """Successive halving over the eval grid's cells: after the grid's own samples, each round
    adds samples (from the same split) only to the cells still undecided. Returns all rows."""
    import pandas as pd

    from kvray.actors import run_eval_distributed

    ev = cfg["eval"]
    tol = float(cfg["policy"]["tolerance"])
    min_n = int(cfg["policy"].get("min_n", 0))
    rounds = [int(n) for n in ev.get("rounds") or [] if int(n) > int(ev["samples"])]
    if not rounds:
        return df
    frames = [df]
    for k, batch in enumerate(round_samples(ev, cfg["seed"], count_tokens, 0, [int(ev["samples"])] + sorted(rounds))):
        cells = undecided_cells(pd.concat(frames, ignore_index=True), tol, min_n,
                                keep=int(cfg["policy"].get("candidates", 1)))
        if not cells:
            break
        print(f"[select] round {k + 1}: {len(batch)} more samples for {len(cells)} undecided cells: "
              + ", ".join(f"{m}@{r:g} ({'aware' if a else 'agnostic'})" for a, m, r in cells), flush=True)
        # each protocol its own cells (none decoded in vain), both on one prefill per sample
        presses = {aware: [kvray.make_press("full")] + [kvray.make_press(m, compression_ratio=r)
                                                        for a, m, r in cells if a == aware]
                   for aware in sorted({a for a, _, _ in cells})}
        _, rows = run_eval_distributed(pool, batch, presses, out_dir=run_path / "evals",
                                       run_id=f"{run_id}-select{k + 1}")
        frames.append(rows)
    return pd.concat(frames, ignore_index=True)


def validate_candidate(c: Candidate, rows, full, tol: float) -> None:
    part = rows[rows["query_aware"] == c.aware]
    uid, fid = press_config_id(c.uniform, c.aware), press_config_id(full, c.aware)
    if c.tuned is not None:
        tid = press_config_id(c.tuned, c.aware)
        vs = validation_record(part, tid, uid, fid, tolerance=tol)
        c.plan_verdict = plan_verdict(*vs["gain_ci95"])
        c.validation = vs if c.plan_verdict == PLAN_WINS else dict(
            validation_record(part, uid, uid, fid, tolerance=tol),
            rejected_plan={"score": vs["score"], "gain_vs_uniform": vs["gain_vs_uniform"],
                           "gain_ci95": vs["gain_ci95"], "verdict": c.plan_verdict})
    else:
        c.validation = validation_record(part, uid, uid, fid, tolerance=tol)


def check_example(cfg, pool, policies: list, tokenizer, run_id: str) -> None:
    """The README's curl example through each policy as Serve runs it (its `min_kept_tokens`
    floor included; one actor, greedy): records the answer and whether it contains the
    example's, as `validation.readme_example`, and saves the policy again."""
    import ray

    from kvray.eval.tasks import Sample
    from kvray.runtime import build_prompt
    from kvray.serve.api import compressed_tokens
    from kvray.serve.app import EXAMPLE

    sample = Sample(context=EXAMPLE["context"], question=EXAMPLE["question"], answer_prefix="",
                    answers=(EXAMPLE["answer"],), max_new_tokens=EXAMPLE["max_new_tokens"], task="readme_example",
                    sample_id="readme-example", metric="part")
    prompt = build_prompt(tokenizer, sample.context, sample.question, "")
    for p in policies:
        press = p.press_for(compressed_tokens(prompt, p.query_aware))
        _, rows = ray.get(pool.actors[0].evaluate.remote(sample, [press], [p.query_aware], f"{run_id}-example"))
        row = rows[0]
        p.validation["readme_example"] = {"answer": row["prediction"].strip(), "correct": row["score"] >= 1.0,
                                          "ratio_run": press.target_ratio}
        p.save(Path(cfg["_out"]) / "policies")


MIN_CALIBRATION_CONTEXTS = 10


def calibrator_beats_fixed(report: dict) -> dict:
    """On the calibration's held-out contexts: the calibrator's share of safe predictions and mean
    predicted ratio, against the largest fixed ratio (of the measured grid) that is safe for at
    least as large a share, with the same slack (`tolerance`: the measured ratios sit on a grid).
    `beats_fixed` when there are at least MIN_CALIBRATION_CONTEXTS held-out contexts and the
    calibrator's mean ratio exceeds that fixed ratio by more than the slack."""
    per = report["contexts"]
    tol = float(report.get("tolerance", 0.02))
    measured = [float(c["measured_safe_ratio"]) for c in per]
    share = sum(bool(c["safe"]) for c in per) / len(per)
    mean_pred = sum(float(c["predicted_ratio"]) for c in per) / len(per)
    best = 0.0
    for r in sorted({0.0, *measured}):
        if sum(r <= m + tol for m in measured) / len(measured) >= share - 1e-9:
            best = max(best, r)
    return {"n": len(per), "share_safe": share, "mean_ratio": mean_pred, "best_fixed_ratio": best,
            "beats_fixed": bool(len(per) >= MIN_CALIBRATION_CONTEXTS and mean_pred > best + tol)}


def make_policies(cfg, run_id, run_path, model_name, candidates: list[Candidate], calibrated) -> tuple[list, list[str]]:
    """A policy per candidate whose test-split score meets the target; the others are named
    with their numbers. A calibrator is attached only when it beat the fixed ratio on its
    held-out contexts."""
    from kvray.policy import Policy, make_policy_id

    policies, dropped = [], []
    for c in candidates:
        v = c.validation
        if not v.get("meets_target"):
            dropped.append(f"{c.method} ({c.protocol}) at ratio {c.ratio:g}: fails the target on the test split "
                           f"({v.get('score', float('nan')):.2f} vs full {v.get('full_score', float('nan')):.2f}, n={v.get('n', 0)})")
            continue
        press = c.chosen()
        calibrator, cal_check = None, None
        if c.method in calibrated:
            cal, report = calibrated[c.method]
            cal_check = calibrator_beats_fixed(report)
            calibrator = cal.to_dict() if cal_check["beats_fixed"] else None
        metrics = {"selection": {k: v for k, v in c.selection.items() if k != "scores"} | {"split": "eval"}
                   if c.selection else {}}
        if c.tune:
            metrics["tune"] = c.tune
        if cal_check is not None:
            metrics["calibration"] = cal_check
        policy = Policy(
            policy_id=make_policy_id(model_name, c.method, c.ratio, c.protocol, run_id), model=model_name,
            method=press.name, params=press.params(), compression_ratio=press.target_ratio, query_aware=c.aware,
            plan=press.plan.to_dict() if press.plan is not None else None,
            allocation=c.allocation if press is c.tuned else {}, calibrator=calibrator, metrics=metrics,
            min_kept_tokens=int(cfg["policy"].get("min_kept_tokens", 0)),
            validation=v,
            provenance={"run_id": run_id, "source_method": c.method, "why": c.why, "kvray_version": kvray.__version__,
                        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        policy.save(Path(cfg["_out"]) / "policies")  # the store Serve reads
        policies.append(policy)
    return policies, dropped


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


def largest_safe_ratio(df, tolerance: float = DEFAULT_TOLERANCE) -> "object":
    """Per (protocol, method): the largest ratio whose mean score is within `tolerance` (on the
    0-1 score scale: 0.05 = 5 points) of the full cache's on the same samples
    (`kvray.validation.largest_ratio`), with its score, kv bytes, n, and the 95% paired bootstrap
    interval of (method - full) there; `verdict` says whether that interval clears -tolerance
    ("holds"), or the data cannot tell. score@r: each ratio's mean (cells may differ in n when
    the selection rounds added samples to some)."""
    import pandas as pd

    from kvray.stats import paired_bootstrap_ci

    rows = []
    for aware, part in df.groupby("query_aware"):
        full_rows = part[part["method"] == "full"].groupby("sample_id")["score"].mean()
        for method, m in part[(part["method"] != "full") & (part["plan_id"] == "uniform")].groupby("method"):
            sel = largest_ratio(part, method, tolerance)
            row = {"protocol": "aware" if aware else "agnostic", "method": method,
                   "full_score": float(full_rows.mean()), "max_ratio_within_tol": float("nan"),
                   "score_there": float("nan"), "n": int(m.groupby("compression_ratio").size().min()),
                   "diff_ci95": "", "verdict": "no ratio", "kv_MiB_kept": float("nan"),
                   "kv_MiB_full": float(m["kv_bytes_full"].mean()) / 2**20}
            if sel["ratio"] is not None:  # else no ratio of the grid stays within the tolerance
                r = sel["ratio"]
                there = m[m["compression_ratio"] == r]
                s = there.groupby("sample_id")["score"].mean()
                common = s.index.intersection(full_rows.index)
                lo, hi = paired_bootstrap_ci(s[common].to_numpy(), full_rows[common].to_numpy())
                row.update(max_ratio_within_tol=r, score_there=sel["score"], full_score=sel["full_score"],
                           n=sel["n"], kv_MiB_kept=float(there["kv_bytes_kept"].mean()) / 2**20,
                           diff_ci95=f"[{lo:+.2f}, {hi:+.2f}]", verdict="holds" if lo >= -tolerance else "cannot tell")
            for ratio, score in sel["scores"].items():
                row[f"score@{ratio:g}"] = float(score)
            rows.append(row)
    return pd.DataFrame(rows)


def validation_row(c: Candidate, policies) -> dict:
    v = c.validation
    emitted = [p for p in policies if (p.provenance["source_method"], p.query_aware) == (c.method, c.aware)]
    ex = emitted[0].validation.get("readme_example") or {} if emitted else {}
    return {"method": c.method, "protocol": c.protocol, "ratio": c.ratio, "n": v["n"], "score": v["score"],
            "score_ci95": _ci(v["score_ci95"]), "full": v["full_score"], "vs_full_ci95": _ci(v["diff_vs_full_ci95"]),
            "target": v["verdict"] if v["meets_target"] else f"fails ({v['verdict']})",
            "plan": c.plan_verdict or "uniform only",
            "plan_gain_ci95": _ci((v.get("rejected_plan") or v)["gain_ci95"]) if c.tuned is not None else "",
            "readme_example": ("ok" if ex.get("correct") else f"wrong: {ex.get('answer', '')[:24]!r}") if ex else
            "(not emitted)"}


def policy_line(p) -> str:
    v = p.validation
    plan = "tuned budgets" if p.plan is not None else "uniform budgets"
    return (f"{p.method}, {'aware' if p.query_aware else 'agnostic'}, ratio {p.compression_ratio:.2f}, {plan}; test "
            f"{v['score']:.2f} {_ci(v['score_ci95'])} vs full {v['full_score']:.2f}, n={v['n']}"
            f"{', calibrated' if p.calibrator else ''}")


def recommendations(candidates, policies, notes, dropped, tol: float) -> list[str]:
    """What to deploy, per protocol, in words."""
    by_source = {(p.provenance["source_method"], p.query_aware): p for p in policies}
    out = []
    for aware in (False, True):
        proto = "query-aware (the question is in the compressed prompt)" if aware else \
            "query-agnostic (the context is compressed before the question)"
        mine = [by_source[(c.method, aware)] for c in candidates if (c.method, aware) in by_source]
        if not mine:
            continue
        # the selection split's order (largest ratio, then its score there); the test split only gates
        best = max(mine, key=lambda p: (p.compression_ratio, (p.metrics.get("selection") or {}).get("score", 0.0)))
        v = best.validation
        why = (f"it keeps {1 - best.compression_ratio:.0%} of the KV cache and scores {v['score']:.2f} "
               f"{_ci(v['score_ci95'])} on {v['n']} test samples against the full cache's {v['full_score']:.2f}; "
               f"the difference {_ci(v['diff_vs_full_ci95'])} "
               + ("clears" if v["verdict"] == HOLDS else "does not clear") + f" -{tol:g}")
        plan = "with tuned budgets (their gain over uniform held on the test split)" if best.plan is not None else \
            "with uniform budgets"
        out.append(f"{proto}: {best.provenance['source_method']} at ratio {best.compression_ratio:g} {plan}: {why}"
                   f"{'' if v['verdict'] == HOLDS else ' (so the target is met on average, not shown to hold)'}.")
    return out + notes + [f"not emitted: {d}" for d in dropped] or ["nothing to recommend (no stage produced a candidate)"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: jobs/calibrate.yaml)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. eval.samples=10")
    ap.add_argument("--model", default=None, help="model name (default: the config's, i.e. the embedded SmolLM2)")
    ap.add_argument("--out", default=None, help="results root (absolute path recommended)")
    ap.add_argument("--workers", type=int, default=None, help="model actors")
    ap.add_argument("--run-id", default=None, help="resume this run (default: a new id)")
    ap.add_argument("--smoke-test", action="store_true", help="a tiny configuration (about 2 minutes on a laptop)")
    ap.add_argument("--skip", default="", help="comma list of stages to skip: eval,tune,calibration,validate "
                    "(validate: no test split, so no policies are written)")
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
    if skip - {"eval", "tune", "calibration", "validate"}:
        raise SystemExit(f"--skip takes eval, tune, calibration, validate; got {sorted(skip)}")
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
            df = stage_select(cfg, pool, run_id, run_path, count_tokens, df)
        if "calibration" not in skip:
            calibrated = stage_calibration(cfg, pool, run_path, count_tokens)
        shared = {} if "tune" in skip else tune_prefills(cfg, pool, run_path, count_tokens,
                                                          info.get("plan_layers", info["num_layers"]),
                                                          info["num_kv_heads"])
    finally:
        pool.shutdown()  # free the CPUs/GPUs for the Tune trial actors
    tuned = {} if "tune" in skip else stage_tune(cfg, run_id, run_path, count_tokens, cpus, prefills=shared)
    candidates, notes = build_candidates(cfg, df, tuned, info.get("plan_layers", info["num_layers"]),
                                         info["num_kv_heads"])
    policies, dropped = [], []
    if candidates and "validate" in skip:
        notes.append(f"validation skipped (--skip validate): {len(candidates)} candidates untested, no policies written")
        candidates = []
    if candidates:
        pool = start_workers(workers, cfg["model"], cpus_per_worker=cpus, use_gpu=use_gpu, run=run_id)
        try:
            stage_validate(cfg, pool, run_id, run_path, count_tokens, candidates)
            policies, dropped = make_policies(cfg, run_id, run_path, model_name, candidates, calibrated)
            check_example(cfg, pool, policies, tokenizer, run_id)
        finally:
            pool.shutdown()
    for p in policies:
        p.save(run_path / "policies")
    elapsed = time.perf_counter() - t_start

    import pandas as pd

    tol = float(cfg["policy"]["tolerance"])
    lines = [f"kvray calibrate: run {run_id} on {model_name} finished in {elapsed / 60:.1f} min", "",
             f"Terms: the target is a mean score at most {tol:g} (= {tol * 100:g} points of the 0-1 score) below "
             "the full cache's on the same samples; [lo, hi] are 95% bootstrap intervals over samples (paired for "
             "differences); n = samples. The eval grid (selection split) chooses each policy's ratio; Tune (tune "
             "split) its budgets; every policy is then scored on a test split disjoint from both.", ""]
    summary: dict = {"run_id": run_id, "model": model_name, "elapsed_s": elapsed, "run_dir": str(run_path),
                     "num_layers": info["num_layers"], "num_kv_heads": info["num_kv_heads"], "tolerance": tol}
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
        if df is not None:
            safe = largest_safe_ratio(df, tol)
            lines += [f"Largest ratio within {tol:g} of the full cache on the eval grid (mean over tasks; "
                      f"diff_ci95 = interval of method - full there; verdict 'holds' when it clears -{tol:g}, "
                      "'cannot tell' when the samples are too few to say, 'no ratio' when no ratio of the grid "
                      "stays within):", safe.to_string(index=False), ""]
            summary["largest_safe_ratio"] = safe.to_dict("records")
        if tuned:
            t_rows = []
            for method, table in tuned.items():
                best = table[table["is_best"]].iloc[0]
                base = table[table["is_baseline"]]["score"].max()
                t_rows.append({"method": method, "target_ratio": float(best["target_ratio"]),
                               "tuned_score": float(best["score"]), "uniform_score": float(base),
                               "gain": float(best["score"] - base), "n": int(best["n_samples"]), "trials": len(table),
                               "sample_evals": int(table["evaluated"].sum()), "best": best["config"]})
            lines += ["Tune, on the tune split (the samples it searched on: optimistic; the test split decides):",
                      pd.DataFrame(t_rows).to_string(index=False), ""]
            summary["tune"] = t_rows
        if calibrated:
            c_rows = [{"method": m, "alpha": c.alpha, "beta": c.beta, "tau": c.tau,
                       **{k: v for k, v in rep.items() if not isinstance(v, list)},
                       **{k: v for k, v in calibrator_beats_fixed(rep).items() if k != "n"}}
                      for m, (c, rep) in calibrated.items()]
            lines += ["Calibrators (fit on some contexts, checked on held-out ones; share_safe: predictions at or "
                      "below the context's measured safe ratio; best_fixed_ratio: the largest single ratio safe for "
                      "as large a share; a policy is 'calibrated' only when mean_ratio beats it):",
                      pd.DataFrame(c_rows).to_string(index=False), ""]
            summary["calibration"] = c_rows
        if candidates:
            v_rows = [validation_row(c, policies) for c in candidates]
            lines += ["Validation on the test split (each candidate policy vs uniform budgets and the full cache, on "
                      "the same samples; rounds add samples only where a verdict is undecided):",
                      pd.DataFrame(v_rows).to_string(index=False), ""]
            summary["validation"] = v_rows
    lines += ["Recommendation:"] + [f"  {line}" for line in recommendations(candidates, policies, notes, dropped, tol)]
    min_n = int(cfg["policy"].get("min_n", 0))
    wide = [f"{c.method} ({c.protocol}, n={c.validation['n']})" for c in candidates if c.validation
            and (c.validation["score_ci95"][1] - c.validation["score_ci95"][0] > 0.2 or c.validation["n"] < min_n)]
    if wide:
        lines.append(f"  Precision: the test score's interval is wider than +-0.1, or rests on fewer than {min_n} "
                     f"samples, for {', '.join(wide)}; raise policy.rounds for tighter numbers.")
    lines += ["", "Policies:"] + ([f"  {p.policy_id}  ({policy_line(p)})" for p in policies] or ["  (none)"])
    # the curl names a policy that answers it, compressing most (then scoring best)
    shown = max(policies, key=lambda p: (bool(p.validation.get("readme_example", {}).get("correct")),
                                         p.compression_ratio, p.validation["score"]), default=None)
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

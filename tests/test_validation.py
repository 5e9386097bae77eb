"""Held-out validation of policies (kvray.validation) and the main job's use of it: ratio
selection on the eval grid, test-split rounds, plan-vs-uniform decisions, what gets emitted."""

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

import kvray
from kvray.policy import Policy
from kvray.results import config_id
from kvray.validation import largest_ratio, recommend, validation_record

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job():
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        import calibrate
    finally:
        sys.path.remove(str(ROOT / "jobs"))
    return calibrate


def _rows(cid, scores, *, method="m", ratio=0.5, aware=False, plan="uniform", start=0):
    return [{"config_id": cid, "sample_id": f"s{start + i}", "score": float(s), "method": method,
             "compression_ratio": ratio, "query_aware": aware, "plan_id": plan} for i, s in enumerate(scores)]


def test_validation_record_pairs_the_same_samples():
    full = [1, 1, 1, 0, 1, 1, 0, 1, 1, 1]
    uni = [1, 0, 1, 0, 1, 0, 0, 1, 1, 1]
    pol = [1, 1, 1, 0, 1, 0, 0, 1, 1, 1]
    rows = pd.DataFrame(_rows("F", full) + _rows("U", uni) + _rows("P", pol)
                        + _rows("P", [0, 0, 0], start=50))  # samples only the policy saw: not paired, ignored
    v = validation_record(rows, "P", "U", "F", tolerance=0.05)
    assert v["n"] == 10 and v["split"] == "test"
    assert v["score"] == pytest.approx(0.7) and v["full_score"] == pytest.approx(0.8)
    assert v["uniform_score"] == pytest.approx(0.6) and v["gain_vs_uniform"] == pytest.approx(0.1)
    lo, hi = v["gain_ci95"]
    assert 0.0 <= lo <= 0.1 <= hi  # gains are 0 or +1 here: the interval cannot go below 0
    lo, hi = v["score_ci95"]
    assert lo < 0.7 < hi
    assert v["diff_vs_full"] == pytest.approx(-0.1) and not v["meets_target"]
    assert v["verdict"] in ("fails", "cannot tell")
    same = validation_record(rows, "F", "F", "F")
    assert same["verdict"] == "holds" and same["meets_target"] and same["gain_ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="no sample"):
        validation_record(rows, "P", "U", "missing")


def test_largest_ratio_and_recommend_pick_the_largest_within_tolerance():
    full = [1] * 10
    rows = pd.DataFrame(_rows("F", full, method="full", ratio=0.0)
                        + _rows("a25", [1] * 10, method="a", ratio=0.25)
                        + _rows("a50", [1] * 9 + [0], method="a", ratio=0.5)  # 0.1 below: outside 0.05
                        + _rows("b50", [1] * 10, method="b", ratio=0.5)
                        + _rows("b75", [0] * 10, method="b", ratio=0.75)
                        + _rows("c", [0] * 10, method="c", ratio=0.25))
    assert largest_ratio(rows, "a", 0.05)["ratio"] == 0.25
    assert largest_ratio(rows, "a", 0.1)["ratio"] == 0.5  # a looser target reaches further
    r = largest_ratio(rows, "c", 0.05)
    assert r["ratio"] is None and r["scores"] == {0.25: 0.0}
    best = recommend(rows, 0.05)
    assert best["method"] == "b" and best["ratio"] == 0.5 and best["n"] == 10
    assert recommend(rows[rows["method"].isin(["full", "c"])], 0.05) is None


class _Press:
    """What the job reads of a press: name, params, ratio, plan id."""

    def __init__(self, name, ratio, plan_id="uniform"):
        self.name, self.target_ratio, self.plan_id, self.plan = name, ratio, plan_id, None

    def params_json(self):
        return "{}"

    def params(self):
        return {}


def test_validate_candidate_keeps_uniform_unless_the_plan_wins(job):
    full, uni, tuned = _Press("full", 0.0), _Press("snapkv", 0.5), _Press("snapkv", 0.5, "plan1")
    cid = {p: job.press_config_id(p, True) for p in (full, uni, tuned)}
    n = 40

    def rows(tuned_scores):
        return pd.DataFrame(_rows(cid[full], [1] * n, aware=True) + _rows(cid[uni], [1, 0] * (n // 2), aware=True)
                            + _rows(cid[tuned], tuned_scores, aware=True))

    c = job.Candidate("snapkv", True, 0.5, "tuned", uni, tuned)
    job.validate_candidate(c, rows([1] * n), full, 0.05)  # +0.5 on half the samples, never worse: wins
    assert c.plan_verdict == "plan wins" and c.chosen() is tuned and c.validation["score"] == 1.0
    c = job.Candidate("snapkv", True, 0.5, "tuned", uni, tuned)
    job.validate_candidate(c, rows([0, 1] * (n // 2)), full, 0.05)  # as good on average, not sample by sample
    assert c.plan_verdict == "cannot tell" and c.chosen() is uni
    assert c.validation["score"] == 0.5 and c.validation["rejected_plan"]["gain_vs_uniform"] == 0.0
    assert c.validation["verdict"] == "fails" and not c.validation["meets_target"]


def test_stage_validate_spends_samples_only_where_undecided(job, monkeypatch, tmp_path):
    import kvray.actors as actors

    seen: dict[str, int] = {}

    from kvray.eval.runner import config_pairs

    def fake_eval(pool, samples, presses, *, out_dir, run_id, protocols=(False,), **kw):
        rows = []
        for p, aware in config_pairs(presses, protocols):
            seen[p.name] = seen.get(p.name, 0) + len(samples)
            for s in samples:
                i = int(s.sample_id.rsplit("-", 1)[1])
                # "same" always equals full; "noisy" loses one sample in four: never decided at 5 points
                score = 0.0 if (p.name == "noisy" and i % 4 == 0) else 1.0
                rows.append({"config_id": job.press_config_id(p, aware), "sample_id": s.sample_id,
                             "score": score, "query_aware": aware})
        return run_id, pd.DataFrame(rows)

    monkeypatch.setattr(actors, "run_eval_distributed", fake_eval)
    monkeypatch.setattr(kvray, "make_press", lambda name, **kw: _Press(name, 0.0))
    cfg = {"seed": 0, "policy": {"tolerance": 0.05, "tasks": ["niah_single"], "length": 400, "rounds": [4, 8, 16]}}
    same = job.Candidate("same", False, 0.5, "x", _Press("same", 0.5))
    noisy = job.Candidate("noisy", False, 0.5, "x", _Press("noisy", 0.5))
    job.stage_validate(cfg, None, "run", tmp_path, len, [same, noisy])
    assert same.validation["verdict"] == "holds" and same.validation["n"] == 4  # settled in round 1
    assert noisy.validation["n"] == 16 and seen == {"full": 16, "same": 4, "noisy": 16}
    assert noisy.validation["verdict"] == "fails" or not noisy.validation["meets_target"]


def test_make_policies_emits_only_what_meets_the_target(job, tmp_path):
    from kvray.calibration import Calibrator

    press = kvray.make_press("snapkv", compression_ratio=0.5)
    good = job.Candidate("snapkv", True, 0.5, "x", press, selection={"ratio": 0.5, "score": 1.0, "scores": {0.5: 1.0}})
    good.validation = {"split": "test", "n": 30, "score": 0.9, "score_ci95": [0.8, 1.0], "full_score": 0.9,
                       "uniform_score": 0.9, "gain_vs_uniform": 0.0, "gain_ci95": [0.0, 0.0], "meets_target": True,
                       "verdict": "holds", "diff_vs_full_ci95": [0.0, 0.0]}
    bad = job.Candidate("knorm", True, 0.5, "x", kvray.make_press("knorm", compression_ratio=0.5))
    bad.validation = dict(good.validation, score=0.3, meets_target=False, verdict="fails")
    cal = Calibrator(method="snapkv", alpha=1.0, beta=0.0, tau=0.95)
    few = {"tolerance": 0.02, "contexts": [{"measured_safe_ratio": 0.25, "predicted_ratio": 0.6, "safe": False}] * 4}
    cfg = {"_out": str(tmp_path / "store"), "policy": {"min_kept_tokens": 64}}
    policies, dropped = job.make_policies(cfg, "run1", tmp_path / "run", "tiny", [good, bad], {"snapkv": (cal, few)})
    assert [p.method for p in policies] == ["snapkv"] and len(dropped) == 1 and "knorm" in dropped[0]
    saved = json.loads(next((tmp_path / "store" / "policies").glob("*.json")).read_text())
    assert saved["validation"]["n"] == 30 and saved["validation"]["score_ci95"] == [0.8, 1.0]
    assert saved["min_kept_tokens"] == 64 and saved["compression_ratio"] == 0.5
    assert saved["calibrator"] is None and saved["metrics"]["calibration"]["beats_fixed"] is False
    assert Policy.model_validate(saved).validation["split"] == "test"
    with pytest.raises(ValueError, match="validation lacks .*gain_ci95"):
        Policy.model_validate(dict(saved, validation={"split": "test", "n": 3}))


def test_calibrator_must_beat_the_best_fixed_ratio(job):
    ctx = [{"measured_safe_ratio": m, "predicted_ratio": p, "safe": p <= m + 0.02}
           for m, p in [(0.5, 0.45), (0.75, 0.7), (0.25, 0.2), (0.5, 0.5)] * 3]
    out = job.calibrator_beats_fixed({"tolerance": 0.02, "contexts": ctx})
    # every prediction is safe; a fixed ratio safe for all contexts is at most 0.25; the mean prediction 0.46
    assert out["share_safe"] == 1.0 and out["best_fixed_ratio"] == 0.25 and out["beats_fixed"]
    flat = [dict(c, predicted_ratio=0.26, safe=True) for c in ctx]  # no better than the fixed 0.25
    assert not job.calibrator_beats_fixed({"tolerance": 0.02, "contexts": flat})["beats_fixed"]
    assert not job.calibrator_beats_fixed({"tolerance": 0.02, "contexts": ctx[:4]})["beats_fixed"]  # too few


def test_min_kept_tokens_keeps_short_prompts_whole():
    pol = Policy(policy_id="p", model="tiny", method="snapkv", compression_ratio=0.75, min_kept_tokens=128)
    assert pol.ratio_for(1000) == 0.75  # 250 kept: the floor does not bind
    assert pol.ratio_for(256) == pytest.approx(0.5)  # 128 kept
    assert pol.ratio_for(100) == 0.0 and pol.press_for(100).name == "full"
    assert pol.press_for(256).target_ratio == pytest.approx(0.5)
    assert Policy(policy_id="p", model="tiny", method="snapkv", compression_ratio=0.75).ratio_for(10) == 0.75


def test_undecided_cells_get_more_samples_only_while_open(job):
    n = 12
    rows = pd.DataFrame(
        _rows("F", [1] * n, method="full", ratio=0.0)
        + _rows("a25", [1] * n, method="a", ratio=0.25)        # holds, but on 12 samples: still open
        + _rows("a50", [1] * 10 + [0, 0], method="a", ratio=0.5)  # straddles -0.05: open
        + _rows("b50", [0] * n, method="b", ratio=0.5)         # clearly fails: closed
        + _rows("c25", [1] * n, method="c", ratio=0.25) + _rows("c50", [1] * n, method="c", ratio=0.5))
    assert set(job.undecided_cells(rows, 0.05, min_n=12)) == {(False, "a", 0.5)}
    assert set(job.undecided_cells(rows, 0.05, min_n=30)) == {(False, "a", 0.25), (False, "a", 0.5),
                                                              (False, "c", 0.25), (False, "c", 0.5)}
    # only c meets the target at 0.5 on its mean: with one candidate to pick, ratios below 0.5 cannot win
    assert set(job.undecided_cells(rows, 0.05, min_n=30, keep=1)) == {(False, "a", 0.5), (False, "c", 0.5)}


def test_serve_applies_the_floor_to_the_prompt_it_runs():
    from kvray.serve.api import GenerateJob

    pol = Policy(policy_id="p", model="tiny", method="snapkv", compression_ratio=0.75, min_kept_tokens=128)
    job = GenerateJob(context="c", question="q", method="snapkv", compression_ratio=0.75, query_aware=False,
                      max_new_tokens=4, policy_id="p", policy=pol.model_dump(mode="json"))
    assert job.press().target_ratio == 0.75  # request-time check: the policy's own ratio
    assert job.press(60).name == "full" and job.press(512).target_ratio == pytest.approx(0.75)
    assert job.press(256).target_ratio == pytest.approx(0.5)


def test_build_candidates_ranks_the_grid_and_keeps_tuned_methods_off_it(job):
    grid = pd.DataFrame(_rows("F", [1] * 10, method="full", ratio=0.0)
                        + _rows("s25", [1] * 10, method="snapkv", ratio=0.25)
                        + _rows("s50", [0] * 10, method="snapkv", ratio=0.5)
                        + _rows("k25", [0] * 10, method="knorm", ratio=0.25))
    table = pd.DataFrame({"is_best": [True, False], "is_baseline": [False, True], "score": [0.6, 0.5],
                          "target_ratio": [0.5, 0.5], "n_samples": [9, 9],
                          "config": [json.dumps({"layer_slope": 0.5, "head_alpha": 1.0}),
                                     json.dumps({"layer_slope": 0.0, "head_alpha": 1.0})]})
    cfg = {"policy": {"tolerance": 0.05, "candidates": 2},
           "tune": {"compression_ratio": 0.5, "query_aware": False, "space": {}}}
    cands, notes = job.build_candidates(cfg, grid, {"random": table, "knorm": table}, 4, 2)
    by = {c.method: c for c in cands}
    assert by["snapkv"].ratio == 0.25 and by["snapkv"].tuned is None and "rank 1" in by["snapkv"].why
    # random is not on the grid: tested at Tune's ratio; knorm is, and holds no ratio: no candidate
    assert by["random"].ratio == 0.5 and by["random"].tuned.plan is not None and "not on the eval grid" in by["random"].why
    assert "knorm" not in by and any(n.startswith("knorm (tuned, agnostic): no ratio") for n in notes)


def test_skip_names_its_stages_and_the_old_mains_workload_loads(job, tmp_path):
    """`--skip` refuses what is not a stage (naming them, validate included) before any work, and
    bench/calibrate_ae89734.yaml (the previous main's job in today's schema) loads and checks."""
    import argparse

    with pytest.raises(SystemExit, match="eval, tune, calibration, validate; got \\['tests'\\]"):
        job.main(["--skip", "tests", "--out", str(tmp_path)])
    args = argparse.Namespace(config=str(ROOT / "bench" / "calibrate_ae89734.yaml"), smoke_test=False, set=None,
                              model=None, out=None, workers=None)
    cfg = job.load_config(args)
    job.check_tune_spaces(cfg)
    assert (cfg["eval"]["samples"], cfg["eval"]["rounds"], cfg["tune"]["methods"], cfg["tune"]["trials"]) == \
        (4, [], ["snapkv", "knorm"], 24)

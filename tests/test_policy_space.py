"""Budget curves, the Tune search space and policies (no Ray needed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import kvray
from kvray.budget import BudgetPlan, fit_mean, layer_curve_keep, rescale_plan
from kvray.policy import Policy, PolicyStore, make_policy_id
from kvray.tune.space import SearchSpace

ROOT = Path(__file__).resolve().parents[1]


def test_fit_mean_keeps_the_mean_and_the_bounds():
    out = fit_mean([0.9, 1.4, 0.2, -0.3], 0.5)
    assert sum(out) / 4 == pytest.approx(0.5, abs=1e-9)
    assert all(0.0 <= v <= 1.0 for v in out)
    # the unclipped entries keep their differences (one additive shift)
    free = [(a, b) for a, b in zip([0.9, 1.4, 0.2, -0.3], out) if 0 < b < 1]
    shifts = {round(b - a, 9) for a, b in free}
    assert len(shifts) == 1
    with pytest.raises(ValueError, match="outside"):
        fit_mean([0.5], 1.5)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("slope", [-1.0, -0.5, 0.0, 0.5, 1.0])
def test_layer_curve_mean_and_direction(ratio, slope):
    keep = layer_curve_keep(30, ratio, slope)
    assert sum(keep) / 30 == pytest.approx(1 - ratio, abs=1e-9)
    assert all(0 <= k <= 1 for k in keep)
    if slope > 0:
        assert keep[0] >= keep[-1]
    elif slope < 0:
        assert keep[0] <= keep[-1]
    else:
        assert max(keep) - min(keep) < 1e-12


def test_layer_curve_by_hand():
    # L = 3, mean 0.5, slope 0.5: 0.5 * (1.5, 1.0, 0.5) -- nothing clipped
    assert layer_curve_keep(3, 0.5, 0.5) == pytest.approx([0.75, 0.5, 0.25])
    with pytest.raises(ValueError, match="slope"):
        layer_curve_keep(3, 0.5, 2.0)


def test_rescale_plan_moves_the_mean_keeps_the_order():
    plan = BudgetPlan.per_layer(layer_curve_keep(6, 0.5, 1.0), 2)
    moved = rescale_plan(plan, 0.75)
    assert moved.compression_ratio == pytest.approx(0.75)
    firsts = [row[0] for row in moved.keep]
    assert firsts == sorted(firsts, reverse=True)


def test_space_grid_baseline_and_errors():
    space = SearchSpace.default("snapkv", 0.5, window_size=[8, 16])
    assert 32 in space.choices["window_size"]  # the default joins so the uniform baseline is in the space
    grid = space.grid()
    assert len(grid) == 4 * 3 * 3 * 3 * 2  # slope x alpha x window x kernel x pooling
    assert sum(space.is_baseline(c) for c in grid) == 1
    with pytest.raises(ValueError, match="not a search parameter"):
        SearchSpace.default("snapkv", 0.5, windw_size=[8])
    with pytest.raises(ValueError, match="unknown method"):
        SearchSpace.default("snapkvv", 0.5)
    with pytest.raises(ValueError, match="budget search supports"):
        SearchSpace.default("pyramidkv", 0.5)
    with pytest.raises(ValueError, match="compression_ratio"):
        SearchSpace.default("knorm", 0.0)
    # a bad value is refused when the space is built, not by a trial halfway through the search
    with pytest.raises(ValueError, match="observation must be one of"):
        SearchSpace.default("snapkv", 0.5, observation=["last", "first"])
    with pytest.raises(ValueError, match="not a search parameter.*known: gqa_reduction"):
        SearchSpace.default("snapkv", 0.5, plan=[None])
    both = SearchSpace.default("snapkv", 0.5, observation=["question"])
    assert both.choices["observation"] == ("question", "last") and both.baseline()["observation"] == "last"


def test_space_baseline_press_equals_the_plain_uniform_press(tiny_llama):
    """slope 0, alpha 1 keeps exactly what the method keeps at a uniform ratio."""
    from kvray.generate import build_prompt, prefill

    space = SearchSpace.default("snapkv", 0.5)
    lm = tiny_llama
    press = space.press(space.baseline(), lm.num_layers, lm.num_kv_heads)
    plain = kvray.make_press("snapkv", compression_ratio=0.5)
    prompt = build_prompt(lm.tokenizer, "The sky is blue. " * 20, "What colour is the sky?")
    state = prefill(lm, prompt, with_question=True).state(True)
    for a, b in zip(press.select(state), plain.select(state)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # alpha < 1 goes through adakv with real per-head budgets at the same mean
    ada = space.press({**space.baseline(), "head_alpha": 0.2, "layer_slope": 0.5}, lm.num_layers, lm.num_kv_heads)
    assert ada.name == "adakv" and ada.target_ratio == pytest.approx(0.5)
    kept = sum(len(i) for layer in ada.select(state) for i in layer)
    assert kept == round(0.5 * state.n_tokens * lm.num_layers * lm.num_kv_heads)  # the plan total is exact


def _policy(**kw) -> Policy:
    plan = BudgetPlan.per_layer(layer_curve_keep(3, 0.5, 0.5), 2)
    base = dict(policy_id=make_policy_id("tiny", "snapkv", 0.5, "run1"), model="tiny", method="snapkv",
                params={"window_size": 16}, compression_ratio=0.5, plan=plan.to_dict())
    return Policy(**{**base, **kw})


def test_policy_round_trip_and_press(tmp_path):
    pol = _policy()
    store = PolicyStore(tmp_path)
    assert store.ids() == []
    store.put(pol)
    back = store.get(pol.policy_id)
    assert back == pol
    press = back.press()
    assert press.name == "snapkv" and press.window_size == 16 and press.target_ratio == pytest.approx(0.5)
    assert back.press(0.75).target_ratio == pytest.approx(0.75)
    # a policy written later shows up without re-creating the store
    store.put(_policy(policy_id="other-policy"))
    assert "other-policy" in store.ids()


def test_policy_validation_messages(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        _policy(method="snapkvv")
    with pytest.raises(ValueError, match="policy_id"):
        _policy(policy_id="../etc/passwd")
    with pytest.raises(ValueError):
        _policy(compression_ratio=1.0)
    with pytest.raises(ValueError, match="Extra inputs|extra"):
        Policy.from_json(json.dumps({**json.loads(_policy().to_json()), "colour": "blue"}))
    with pytest.raises(KeyError, match="unknown policy 'nope'; known: "):
        PolicyStore(tmp_path).get("nope")


def test_policy_with_calibrator_predicts():
    from kvray.calibration import Calibrator

    cal = Calibrator(method="snapkv", alpha=1.0, beta=-2.0, tau=0.9)
    pol = _policy(calibrator=cal.to_dict())
    got = pol.calibrator_obj()
    assert got.max_compression_ratio(1.5) == pytest.approx(cal.max_compression_ratio(1.5))


def test_job_config_overrides():
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        import calibrate as job
    finally:
        sys.path.remove(str(ROOT / "jobs"))
    import yaml

    cfg = yaml.safe_load((ROOT / "jobs" / "calibrate.yaml").read_text())
    job.apply_set(cfg, "eval.samples=9")
    job.apply_set(cfg, "tune.methods=[knorm]")
    assert cfg["eval"]["samples"] == 9 and cfg["tune"]["methods"] == ["knorm"]
    with pytest.raises(SystemExit, match="known: .*samples"):
        job.apply_set(cfg, "eval.sampels=3")
    with pytest.raises(SystemExit, match="section.key=value"):
        job.apply_set(cfg, "eval.samples")
    smoke = job.deep_update(cfg, job.SMOKE)
    assert smoke["eval"]["samples"] == 2 and smoke["eval"]["protocols"] == cfg["eval"]["protocols"]
    # tune.space: the default config searches snapkv's observation window; bad spaces stop the job
    # before any work, with the reason
    cfg = yaml.safe_load((ROOT / "jobs" / "calibrate.yaml").read_text())
    assert job.tune_space(cfg["tune"], "snapkv").choices["observation"] == ("last", "question")
    assert "observation" not in job.tune_space(cfg["tune"], "knorm").choices
    job.check_tune_spaces(cfg)
    job.apply_set(cfg, "tune.space.snapkv.observation=[last, everything]")
    with pytest.raises(SystemExit, match="observation must be one of"):
        job.check_tune_spaces(cfg)
    job.apply_set(cfg, "tune.space={compactor: {window_size: [8]}}")
    with pytest.raises(SystemExit, match="'window_size' is not a search parameter of compactor"):
        job.check_tune_spaces(cfg)
    job.apply_set(cfg, "tune.space={}")
    job.apply_set(cfg, "tune.methods=[snapkv, knorm]")  # knorm has no protocol in tune.query_aware's mapping
    with pytest.raises(SystemExit, match="names no protocol for knorm"):
        job.check_tune_spaces(cfg)
    job.apply_set(cfg, "tune.query_aware=true")  # one bool for all
    job.check_tune_spaces(cfg)
    assert job.tune_aware(cfg["tune"], "knorm") is True
    job.apply_set(cfg, "tune.space=[snapkv]")
    with pytest.raises(SystemExit, match="tune.space must map method names"):
        job.check_tune_spaces(cfg)


def test_compactor_space_searches_its_own_choices():
    from kvray.presses.compactor import CompactorPress
    from kvray.tune.space import SearchSpace

    space = SearchSpace.default("compactor", 0.5)
    assert space.choices["blending"] == (None, 0.3) and space.choices["head_alpha"] == (1.0,)
    assert space.baseline() == {"layer_slope": 0.0, "head_alpha": 1.0, "blending": None, "head_adaptive": False,
                                "scoring": "kvpress"}
    presses = [space.press(c, 4, 2) for c in space.grid()]
    assert len(presses) == 4 * 2 * 2 * 2 and all(isinstance(p, CompactorPress) for p in presses)
    sloped = space.press({"layer_slope": 0.5, "head_alpha": 1.0, "blending": None, "head_adaptive": True,
                          "scoring": "kvpress"}, 4, 2)
    assert sloped.plan is not None and sloped.blending is None and sloped.weight == 0.5  # lambda = the ratio
    with pytest.raises(ValueError, match="head_alpha is fixed"):
        SearchSpace.default("compactor", 0.5, head_alpha=[0.5, 1.0])

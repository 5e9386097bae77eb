"""The measured (probe) calibrator, kvray.probe: span choice, the probe's feed, the batched
teacher forcing of kvray.calibration.measure_curves against one plain forward (full cache) and
one cache at a time (compressed caches), the threshold fit and the held-out comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kvray.calibration import answer_text, measure_curves, probe_curve
from kvray.eval.tasks import make_samples
from kvray.generate import build_prompt
from kvray.presses import make_press
from kvray.probe import (
    PROBE_KIND, NeighbourCalibrator, ProbeCalibrator, ProbeSpec, best_knob, choose_spans, context_table,
    fit_neighbour_calibrator, fit_probe_calibrator, floor_to_grid, neighbour_chooser,
    frontier_at_share, knob_matrix, outcomes, probe_feed, probe_safe_ratio, summarize_outcomes,
)
from kvray.runtime import enable_kvray_attention, forward, prefill

# ----------------------------------------------------------------------------- spans and feed


def test_choose_spans_surprisal_uniform_mixed():
    start, n = 2, 60
    nll = [0.1] * (n - start)
    for pos, v in ((30, 9.0), (33, 8.0), (50, 7.0), (5, 6.0), (58, 5.0)):
        nll[pos - start] = v
    spec = ProbeSpec(spans=3, cue=4, target=4)
    # 30 first; 33 overlaps it (|33 - 30| < 8); 50 next; 5 is too close to the start (cue
    # needs positions 1..4 >= start=2? 5-4=1 < 2); 58 leaves no room for 4 targets; then the
    # highest of the flat rest, the lowest position among equals that does not overlap
    got = choose_spans(nll, start, n, spec)
    assert 30 in got and 50 in got and 33 not in got and 5 not in got and 58 not in got
    assert got == sorted(got) and len(got) == 3
    for c in got:
        assert c - spec.cue >= start and c + spec.target <= n
    assert all(abs(a - b) >= 8 for a in got for b in got if a != b)
    uni = choose_spans(nll, start, n, ProbeSpec(spans=4, cue=4, target=4, select="uniform", seed=3))
    assert uni == choose_spans(nll, start, n, ProbeSpec(spans=4, cue=4, target=4, select="uniform", seed=3))
    assert uni != choose_spans(nll, start, n, ProbeSpec(spans=4, cue=4, target=4, select="uniform", seed=4))
    mixed = choose_spans(nll, start, n, ProbeSpec(spans=4, cue=4, target=4, select="mixed"))
    assert len(mixed) == 4 and {30, 50} <= set(mixed)  # the surprisal half
    assert choose_spans(nll, start, 9, spec) == []  # too short for one span
    with pytest.raises(ValueError, match="select"):
        ProbeSpec(select="random")
    with pytest.raises(ValueError, match="spans"):
        ProbeSpec(spans=0)
    with pytest.raises(ValueError, match="unknown probe field"):
        ProbeSpec.from_dict({"span": 3})


def test_probe_feed_layout():
    context = list(range(100, 140))
    spec = ProbeSpec(spans=2, cue=3, target=2)
    ids, picks, targets = probe_feed(context, [10, 20], spec, sep=[7])
    assert ids == [7, 107, 108, 109, 110, 111, 7, 117, 118, 119, 120, 121]
    assert targets == [110, 111, 120, 121]
    assert [ids[p + 1] for p in picks] == targets  # the logits at a pick predict the next fed token


# ----------------------------------------------------------------------------- on a tiny model


def _plain_probe_nll(lm, prompt, ids, picks, targets):
    """Full-cache probe NLL from one ordinary forward (SDPA, no cache) of context + probe."""
    model = lm.model
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt.context + ids]), use_cache=False).logits[0].float()
    finally:
        enable_kvray_attention(model)
    n = len(prompt.context)
    return float(F.cross_entropy(logits[[n + p for p in picks]], torch.tensor(targets)))


@torch.no_grad()
def _one_cache_nll(lm, cache, ids, picks, targets):
    """Teacher forcing on one compressed cache alone (no merged batch)."""
    copy = type(cache).merge([cache])
    logits = forward(lm, [ids], copy, logits_to_keep=len(ids))[0].float()
    return float(F.cross_entropy(logits[picks], torch.tensor(targets)))


def test_measure_curves_probe_matches_references(tiny_lm):
    lm = tiny_lm  # every architecture kvray runs, sliding windows and soft-capping included
    sample = make_samples("niah_single", 1, 260, seed=2)[0]
    spec = ProbeSpec(spans=3, cue=4, target=3)
    retentions = [1.0, 0.6, 0.3]
    rows = measure_curves(lm, sample, {"knorm": {}, "streaming_llm": {}}, retentions, probe=spec)
    assert len(rows) == 6
    prompt = build_prompt(lm.tokenizer, sample.context, sample.question, sample.answer_prefix)
    starts = rows[0]["probe_span_starts"]
    assert len(starts) == 3 == rows[0]["probe_spans"] and starts == sorted(starts)
    sep = lm.tokenizer("\n", add_special_tokens=False).input_ids
    ids, picks, targets = probe_feed(prompt.context, starts, spec, sep)
    ref_full = _plain_probe_nll(lm, prompt, ids, picks, targets)
    answer = lm.tokenizer(answer_text(sample), add_special_tokens=False).input_ids
    pre = prefill(lm, prompt)
    state = pre.state(False)
    a_ids = prompt.rest + answer[:-1]
    a_picks = list(range(len(prompt.rest) - 1, len(a_ids)))
    for row in rows:
        assert row["probe_nll_full"] == pytest.approx(ref_full, rel=1e-4, abs=1e-4)
        assert row["probe_ratio"] == pytest.approx(row["probe_nll_full"] / row["probe_nll"], rel=1e-9)
        assert np.mean(row["probe_span_nll"]) == pytest.approx(row["probe_nll"], rel=1e-5)
        assert len(row["probe_span_surprisal"]) == 3
        if row["retention"] == 1.0:
            assert row["probe_ratio"] == 1.0 and row["nll_ratio"] == 1.0
            continue
        cache = make_press(row["method"], compression_ratio=row["compression_ratio"]).compress(state)
        assert row["probe_nll"] == pytest.approx(_one_cache_nll(lm, cache, ids, picks, targets), rel=1e-4, abs=1e-4)
        assert row["nll_compressed"] == pytest.approx(_one_cache_nll(lm, cache, a_ids, a_picks, answer), rel=1e-4, abs=1e-4)
    assert any(r["probe_ratio"] != 1.0 for r in rows)  # compression changed the probe
    plain = measure_curves(lm, sample, {"knorm": {}}, retentions)
    assert "probe_ratio" not in plain[0]
    assert [r["nll_compressed"] for r in plain] == pytest.approx([r["nll_compressed"] for r in rows[:3]], rel=1e-5)


# ----------------------------------------------------------------------------- the calibrator


def test_probe_safe_ratio():
    curve = {0.1: 0.99, 0.2: 0.97, 0.3: 0.9, 0.4: 0.98}
    assert probe_safe_ratio(curve, 0.95) == 0.2  # stops at the first failure, 0.4 is not reached
    assert probe_safe_ratio(curve, 0.5) == 0.4
    assert probe_safe_ratio(curve, 0.995) == 0.0
    assert probe_safe_ratio({0.1: math.nan, 0.2: 1.0}, 0.0) == 0.0
    assert floor_to_grid(0.37, [0.1, 0.2, 0.3, 0.4]) == 0.3 and floor_to_grid(0.05, [0.1, 0.2]) == 0.0
    assert floor_to_grid(0.4, [0.1, 0.2, 0.3, 0.4]) == 0.4


def _rows(sid, task, answer, probe, nll=1.0):
    return [{"sample_id": sid, "task": task, "method": "m", "compression_ratio": r, "context_nll": nll,
             "nll_ratio": a, "probe_ratio": p} for r, a, p in zip((0.25, 0.5, 0.75), answer, probe)]


def _contexts():
    # two kinds of context: "easy" ones hold the answer to 0.75 and their probe stays high,
    # "hard" ones lose it from 0.5 on and their probe drops at 0.5
    rows = []
    for i in range(6):
        rows += _rows(f"e{i}", "easy", [1.0, 1.0, 0.99], [0.99, 0.97, 0.96 - 0.001 * i])
        rows += _rows(f"h{i}", "hard", [0.97, 0.5, 0.2], [0.98, 0.7 + 0.01 * i, 0.3])
    return rows


def test_fit_probe_calibrator_and_round_trip(tmp_path):
    rows = _contexts()
    cal = fit_probe_calibrator(rows, "m", tau=0.95, target_share=1.0, probe={"spans": 4})
    assert cal.criterion == "nll"
    # a threshold above every hard context's probe at 0.5 (<= 0.75) and at most the easy ones'
    # lowest probe at 0.75 (0.955): easy -> 0.75, hard -> 0.25, all within tau
    assert 0.75 < cal.theta <= 0.955
    assert cal.fit_share == 1.0 and cal.fit_mean_ratio == pytest.approx((0.75 + 0.25) / 2)
    assert cal.ratios == (0.25, 0.5, 0.75) and cal.probe["spans"] == 4 and cal.n_contexts == 12
    assert cal.predict_ratio({0.25: 1.0, 0.5: 0.99, 0.75: 0.99}) == 0.75
    assert cal.predict_ratio({0.25: 1.0, 0.5: 0.5, 0.75: 0.99}) == 0.25
    with pytest.raises(ValueError, match="lacks"):
        cal.predict_ratio({0.25: 1.0})
    again = ProbeCalibrator.load(cal.save(tmp_path / "probe.json"))
    assert again == cal
    with pytest.raises(ValueError, match="unknown field"):
        ProbeCalibrator.from_dict({**cal.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="kvray.probe_calibrator"):
        ProbeCalibrator.from_dict({**cal.to_dict(), "kind": "x"})
    # a share no threshold reaches except never compressing
    bad = [dict(r, nll_ratio=0.1) for r in rows]
    never = fit_probe_calibrator(bad, "m", tau=0.95, target_share=1.0)
    assert never.predict_ratio({0.25: 1.0, 0.5: 1.0, 0.75: 1.0}) == 0.0
    with pytest.raises(ValueError, match="no probe ratios"):
        fit_probe_calibrator([dict(r, probe_ratio=None) for r in rows], "m")


def test_outcomes_best_knob_and_summary():
    table = context_table(_contexts())
    assert len(table) == 12 and table["e0"]["ok"][0.75] and not table["h0"]["ok"][0.5]
    fixed = lambda rho: (lambda c: rho)  # noqa: E731
    r, w = outcomes(table, fixed(0.5))
    assert r.tolist() == [0.5] * 12 and w.mean() == 0.5  # only the easy half holds at 0.5
    knob, share, mean = best_knob(table, fixed, [0.25, 0.5, 0.75], 1.0)
    assert (knob, share, mean) == (0.25, 1.0, 0.25)
    knob, share, mean = best_knob(table, fixed, [0.25, 0.5, 0.75], 0.5)
    assert knob == 0.75 and share == 0.5
    assert best_knob(table, fixed, [0.5, 0.75], 1.0)[0] is None
    r0, w0 = outcomes(table, fixed(0.0))
    assert w0.mean() == 1.0  # ratio 0 is the full cache: always keeps quality
    s = summarize_outcomes("x", r, w, base=(r0, w0))
    assert s["n"] == 12 and s["share_within"] == 0.5 and s["mean_ratio"] == 0.5
    assert s["ratio_gain"] == 0.5 and s["ratio_gain_ci95"] == [0.5, 0.5]
    assert s["share_diff"] == -0.5 and s["share_ci95"][0] < 0.5 < s["share_ci95"][1]


def test_context_table_score_criterion():
    rows = [{"sample_id": "a", "task": "t", "compression_ratio": r, "context_nll": 1.0, "nll_ratio": 0.1,
             "score": s, "score_full": 1.0} for r, s in ((0.0, 1.0), (0.5, 0.96), (0.75, 0.9))]
    table = context_table(rows, criterion="score", tolerance=0.05)
    assert table["a"]["ok"] == {0.5: True, 0.75: False}
    assert context_table(rows)["a"]["ok"] == {0.5: False, 0.75: False}  # the NLL ratio 0.1 < tau
    assert context_table(rows, criterion="nll", tau=0.05)["a"]["ok"] == {0.5: True, 0.75: True}
    with pytest.raises(ValueError, match="criterion"):
        context_table(rows, criterion="f1")
    with pytest.raises(ValueError, match="score=True"):
        context_table([{k: v for k, v in row.items() if k != "score"} for row in rows], criterion="score")


def test_probe_curve_and_press_for(tiny_llama):
    lm = tiny_llama
    sample = make_samples("vt", 1, 260, seed=4)[0]
    spec = ProbeSpec(spans=3, cue=4, target=3)
    rows = measure_curves(lm, sample, {"knorm": {}}, [0.6, 0.3], probe=spec)
    curve, nll = probe_curve(lm, sample.context, "knorm", [0.4, 0.7], probe=spec)
    assert nll == pytest.approx(rows[0]["context_nll"], rel=1e-3)
    assert list(curve) == [0.4, 0.7]
    assert curve[0.4] == pytest.approx(rows[0]["probe_ratio"], rel=1e-4)
    assert curve[0.7] == pytest.approx(rows[1]["probe_ratio"], rel=1e-4)
    cal = ProbeCalibrator("knorm", theta=min(curve.values()) - 1e-6, ratios=(0.4, 0.7), probe=spec.__dict__)
    assert cal.ratio_for(lm, sample.context) == 0.7
    press = cal.press_for(lm, sample.context)
    assert press.name == "knorm" and press.compression_ratio == 0.7
    strict = ProbeCalibrator("knorm", theta=2.0, ratios=(0.4, 0.7), probe=spec.__dict__)
    assert strict.press_for(lm, sample.context).compression_ratio == 0.0
    with pytest.raises(ValueError, match="compression ratios"):
        probe_curve(lm, sample.context, "knorm", [0.0], probe=spec)
    assert all(math.isnan(v) for v in probe_curve(lm, "Hi.", "knorm", [0.5], probe=spec)[0].values())


def test_frontier_at_share():
    table = context_table(_contexts())
    fixed = lambda rho: (lambda c: rho)  # noqa: E731
    R, W = knob_matrix(table, fixed, [0.0, 0.25, 0.5, 0.75])
    assert R.shape == W.shape == (4, 12)
    value, reps = frontier_at_share(R, W, 1.0, n_boot=300)
    assert value == 0.25 and len(reps) == 300
    assert np.all(reps >= 0.25 - 1e-12)  # ratio 0.25 keeps every context in every resample
    value, _ = frontier_at_share(R, W, 0.5, n_boot=0)
    assert value == 0.75
    probe = lambda t: (lambda c: probe_safe_ratio(c["probe"], t))  # noqa: E731
    P, PW = knob_matrix(table, probe, [math.inf, 0.955, 0.5])
    pv, preps = frontier_at_share(P, PW, 1.0, n_boot=300)
    assert pv == 0.5  # easy -> 0.75, hard -> 0.25, all within
    diff = preps - reps if len(preps) == len(reps) else None
    _, reps2 = frontier_at_share(R, W, 1.0, n_boot=300)
    assert np.array_equal(reps, reps2)  # the same seed: the same resamples
    assert diff is not None and np.all(np.isfinite(diff))
    none, _ = frontier_at_share(R[:1] + 0.5, W[:1] * 0, 0.9, n_boot=0)
    assert none == -np.inf


def _kinds(n=8):
    # two context kinds told apart by their probe curves alone: "flat" ones (probe stays high)
    # keep quality to 0.75, "steep" ones (probe drops) only to 0.25
    rows = []
    for i in range(n):
        rows += _rows(f"f{i}", "flat", [1.0, 1.0, 1.0], [0.99, 0.98 - 0.001 * i, 0.97])
        rows += _rows(f"s{i}", "steep", [1.0, 0.5, 0.2], [0.8, 0.5 + 0.01 * i, 0.3])
    return rows


def test_neighbour_calibrator_fit_predict_round_trip(tmp_path):
    rows = _kinds()
    cal = fit_neighbour_calibrator(rows, "m", target_share=1.0, ks=(3, 5), features=("probe",))
    assert cal.k in (3, 5) and cal.features == "probe" and cal.ratios == (0.25, 0.5, 0.75)
    assert cal.fit_share == 1.0 and cal.fit_mean_ratio == pytest.approx(0.5)  # flat -> 0.75, steep -> 0.25
    assert cal.predict({0.25: 0.99, 0.5: 0.98, 0.75: 0.97}, 1.0) == 0.75
    assert cal.predict({0.25: 0.8, 0.5: 0.5, 0.75: 0.3}, 1.0) == 0.25
    assert cal.predict({0.25: math.nan, 0.5: 0.5, 0.75: 0.3}, 1.0) == 0.0  # unmeasured: keep everything
    # leave-one-out: a calibration context is not its own neighbour
    alone = NeighbourCalibrator(method="m", ratios=(0.5,), k=1, q=1.0, features="probe", center=(0.0,), scale=(1.0,),
                                points=((0.0,), (5.0,)), ok=((True,), (False,)), ids=("a", "b"))
    assert alone.predict({0.5: 0.0}, 1.0) == 0.5 and alone.predict({0.5: 0.0}, 1.0, exclude="a") == 0.0
    again = NeighbourCalibrator.load(cal.save(tmp_path / "nb.json"))
    assert again == cal
    with pytest.raises(ValueError, match="kvray.neighbour_calibrator"):
        NeighbourCalibrator.from_dict(cal.to_dict() | {"kind": PROBE_KIND})
    with pytest.raises(ValueError, match="features"):
        NeighbourCalibrator.from_dict(cal.to_dict() | {"features": "nll"})
    with pytest.raises(ValueError, match="lacks"):
        cal.predict({0.25: 1.0}, 1.0)
    # with NLL(c) as a feature the fit still separates the kinds; a share nothing reaches: never compress
    assert fit_neighbour_calibrator(rows, "m", target_share=1.0, ks=(3,)).fit_mean_ratio == pytest.approx(0.5)
    never = fit_neighbour_calibrator([dict(r, nll_ratio=0.1) for r in rows], "m", target_share=1.0, ks=(3,))
    assert never.fit_mean_ratio == 0.0 and never.predict({0.25: 0.99, 0.5: 0.98, 0.75: 0.97}, 1.0) == 0.0
    # a fixed ratio cannot do as well on these contexts: 0.25 is the largest that keeps all
    fixed = lambda rho: (lambda c: rho)  # noqa: E731
    assert best_knob(context_table(rows), fixed, [0.25, 0.5, 0.75], 1.0)[2] == 0.25
    assert best_knob(context_table(rows), neighbour_chooser(cal), [cal.q], 1.0)[2] == pytest.approx(0.5)

"""Context-calibrated compression (kvray.calibration): the curve, its inverse, the fit, the JSON
format, the measured NLL ratios on a tiny model against a plain forward, and validation."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from kvray.calibration import (
    Calibrator, answer_text, context_nll, fit_calibrator, measure_curve, min_retention, retention_curve,
    safe_compression_ratio, validate_calibrator,
)
from kvray.runtime import enable_kvray_attention
from kvray.eval.tasks import make_samples
from kvray.generate import build_prompt

# ----------------------------------------------------------------------------- the curve


def test_curve_hand_values():
    # b = ln 2: f(r) = (2^r - 1) / (2 - 1)
    assert retention_curve(0.5, math.log(2)) == pytest.approx(math.sqrt(2) - 1, abs=1e-12)
    assert retention_curve(0.25, math.log(2)) == pytest.approx(2 ** 0.25 - 1, abs=1e-12)
    # b = ln 3: f(0.5) = (sqrt 3 - 1) / 2; b = -ln 2: f(0.5) = (2^-0.5 - 1) / (1/2 - 1) = 2 - sqrt 2
    assert retention_curve(0.5, math.log(3)) == pytest.approx((math.sqrt(3) - 1) / 2, abs=1e-12)
    assert retention_curve(0.5, -math.log(2)) == pytest.approx(2 - math.sqrt(2), abs=1e-12)
    # the paper's form (exp(b(r-1)) - exp(-b)) / (1 - exp(-b)) at moderate b
    for b in (-4.0, -0.7, 0.3, 2.5):
        for r in (0.1, 0.6, 0.9):
            paper = (math.exp(b * (r - 1)) - math.exp(-b)) / (1 - math.exp(-b))
            assert retention_curve(r, b) == pytest.approx(paper, rel=1e-12)


@pytest.mark.parametrize("b", [-800.0, -30.0, -2.0, -1e-9, 0.0, 1e-9, 0.5, 5.0, 30.0, 800.0])
def test_curve_endpoints_monotone_and_tensor(b):
    assert retention_curve(0.0, b) == pytest.approx(0.0, abs=1e-12)
    assert retention_curve(1.0, b) == pytest.approx(1.0, abs=1e-12)
    r = torch.linspace(0, 1, 101, dtype=torch.float64)
    f = retention_curve(r, b)
    assert torch.isfinite(f).all()
    assert (f.diff() >= -1e-15).all()
    assert float(f[0]) == pytest.approx(0.0, abs=1e-12) and float(f[-1]) == pytest.approx(1.0, abs=1e-12)
    # float and tensor paths agree
    for i in (10, 50, 90):
        assert float(f[i]) == pytest.approx(retention_curve(float(r[i]), b), abs=1e-12)
    # convex for b > 0, concave for b < 0
    mid = retention_curve(0.5, b)
    if b > 1e-3:
        assert mid < 0.5
    elif b < -1e-3:
        assert mid > 0.5


def test_curve_limit_b_to_zero_and_gradients():
    for r in (0.2, 0.5, 0.8):
        assert retention_curve(r, 0.0) == r
        assert retention_curve(r, 1e-5) == pytest.approx(r, abs=1e-5)
        # the Taylor branch near 0 agrees with the exact expm1 ratio
        for b in (0.999e-6, -0.999e-6, 1e-8):
            assert retention_curve(r, b) == pytest.approx(math.expm1(b * r) / math.expm1(b), abs=1e-13)
    b = torch.tensor([-3.0, 0.0, 3.0], dtype=torch.float64, requires_grad=True)
    retention_curve(torch.tensor(0.5, dtype=torch.float64), b).sum().backward()
    assert torch.isfinite(b.grad).all() and (b.grad < 0).all()  # larger b: less quality at r = 0.5


def _bisect(b: float, tau: float) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if retention_curve(mid, b) >= tau:
            hi = mid
        else:
            lo = mid
    return hi


@pytest.mark.parametrize("b", [-40.0, -3.0, -0.5, 0.0, 0.5, math.log(2), 3.0, 40.0])
@pytest.mark.parametrize("tau", [0.5, 0.9, 0.95, 0.99])
def test_min_retention_closed_form(b, tau):
    r = min_retention(b, tau)
    assert 0.0 <= r <= 1.0
    assert r == pytest.approx(_bisect(b, tau), abs=1e-9)
    assert retention_curve(r, b) == pytest.approx(tau, abs=1e-9)
    if b != 0.0:  # the brief's form log1p(tau * expm1(b)) / b
        assert r == pytest.approx(math.log1p(tau * math.expm1(b)) / b, rel=1e-9)
    t = min_retention(torch.tensor([b, b], dtype=torch.float64), tau)
    assert torch.allclose(t, torch.tensor([r, r], dtype=torch.float64), atol=1e-12)


def test_min_retention_edges():
    assert min_retention(2.0, 1.0) == pytest.approx(1.0)
    assert min_retention(-2.0, 1.0) == pytest.approx(1.0)
    assert min_retention(2.0, 0.0) == 0.0
    assert min_retention(0.0, 0.7) == 0.7
    assert min_retention(1000.0, 0.95) <= 1.0 and min_retention(-1000.0, 0.95) >= 0.0
    assert min_retention(3.0, 1.5) == 1.0  # unattainable budget: keep everything
    with pytest.raises(ValueError):
        min_retention(float("nan"), 0.9)


# ----------------------------------------------------------------------------- fitting


def _synthetic_rows(alpha, beta, noise=0.0, seed=0, method="snapkv"):
    rng = random.Random(seed)
    rows = []
    for i in range(13):
        x = 1.0 + 0.25 * i
        for k in range(1, 11):
            r = k / 10
            y = retention_curve(r, alpha * x + beta) + (rng.gauss(0.0, noise) if noise and r < 1 else 0.0)
            rows.append({"sample_id": f"c{i}", "method": method, "retention": r, "context_nll": x, "nll_ratio": y})
    return rows


def test_fit_recovers_noiseless_parameters():
    rows = _synthetic_rows(1.5, -2.5)
    rows += [dict(r, method="other", nll_ratio=0.0) for r in rows[:20]]  # other methods are ignored
    cal = fit_calibrator(rows, "snapkv", tau=0.9, over_weight=4.0)
    assert cal.alpha == pytest.approx(1.5, abs=1e-4)
    assert cal.beta == pytest.approx(-2.5, abs=1e-4)
    assert cal.method == "snapkv" and cal.tau == 0.9 and cal.over_weight == 4.0
    assert cal.n_contexts == 13 and cal.n_points == 13 * 9  # retention 1 carries no information
    assert cal.loss < 1e-10
    assert fit_calibrator(rows, "snapkv") == fit_calibrator(rows, "snapkv")  # deterministic
    x = 2.0
    assert cal.b(x) == pytest.approx(0.5, abs=1e-3)
    assert cal.predict_retention(x) == pytest.approx(min_retention(cal.b(x), 0.9))
    assert cal.max_compression_ratio(x, tau=0.8) == pytest.approx(1 - min_retention(cal.b(x), 0.8))


def test_fit_over_weight_is_conservative():
    rows = _synthetic_rows(1.5, -2.5, noise=0.05, seed=0)
    strict = fit_calibrator(rows, "snapkv", over_weight=4.0)
    plain = fit_calibrator(rows, "snapkv", over_weight=1.0)
    xs = [1.0 + 0.25 * i for i in range(13)]
    assert all(strict.predict_retention(x) > plain.predict_retention(x) for x in xs)
    # the symmetric fit stays near the truth
    assert plain.alpha == pytest.approx(1.5, abs=0.3) and plain.beta == pytest.approx(-2.5, abs=0.5)


def test_fit_errors():
    with pytest.raises(ValueError, match="at least 2"):
        fit_calibrator([{"retention": 0.5, "context_nll": 1.0, "nll_ratio": 0.9, "method": "snapkv"}], "snapkv")
    with pytest.raises(ValueError, match="at least 2"):  # retention 1 does not count
        fit_calibrator([{"retention": 1.0, "context_nll": x, "nll_ratio": 1.0} for x in (1.0, 2.0, 3.0)], "snapkv")
    with pytest.raises(ValueError, match="no variation"):
        fit_calibrator([{"retention": r, "context_nll": 2.0, "nll_ratio": r} for r in (0.2, 0.5, 0.8)], "snapkv")
    with pytest.raises(ValueError, match="missing 'context_nll'"):
        fit_calibrator([{"retention": 0.5, "nll_ratio": 0.9}] * 2, "snapkv")
    with pytest.raises(ValueError, match="tau"):
        fit_calibrator(_synthetic_rows(1.0, 0.0), "snapkv", tau=0.0)


# ----------------------------------------------------------------------------- JSON


def test_calibrator_json_round_trip(tmp_path):
    cal = Calibrator("knorm", alpha=0.75, beta=-1.25, tau=0.9, over_weight=3.0, n_points=40, n_contexts=8, loss=0.01)
    data = json.loads(cal.to_json())
    assert data["kind"] == "kvray.calibrator" and data["version"] == 1
    assert Calibrator.from_json(cal.to_json()) == cal
    assert Calibrator.from_dict(cal.to_dict()) == cal
    path = cal.save(tmp_path / "cal.json")
    assert Calibrator.load(path) == cal
    assert Calibrator.from_json(Calibrator("snapkv", 1.0, 0.0).to_json()).loss is None


def test_calibrator_bad_json():
    good = Calibrator("snapkv", alpha=1.0, beta=0.5).to_dict()
    for field in ("alpha", "beta", "method", "tau", "kind", "version"):
        bad = {k: v for k, v in good.items() if k != field}
        with pytest.raises(ValueError, match=repr(field)):
            Calibrator.from_json(json.dumps(bad))
    with pytest.raises(ValueError, match="not valid JSON"):
        Calibrator.from_json("{alpha: 1")
    with pytest.raises(ValueError, match="JSON object"):
        Calibrator.from_json("[1, 2]")
    with pytest.raises(ValueError, match="kind"):
        Calibrator.from_json(json.dumps({**good, "kind": "kvray.plan"}))
    with pytest.raises(ValueError, match="version"):
        Calibrator.from_json(json.dumps({**good, "version": 99}))
    with pytest.raises(ValueError, match="alpha"):
        Calibrator.from_json(json.dumps({**good, "alpha": "x"}))
    with pytest.raises(ValueError, match="unknown"):
        Calibrator.from_json(json.dumps({**good, "gamma": 1}))
    with pytest.raises(ValueError, match="tau"):
        Calibrator("snapkv", 1.0, 0.0, tau=1.5)


def test_calibrator_press():
    cal = Calibrator("snapkv", alpha=0.0, beta=-3.0, tau=0.95)
    press = cal.press(1.7, window_size=8)
    assert press.name == "snapkv" and press.window_size == 8
    assert press.compression_ratio == pytest.approx(1 - min_retention(-3.0, 0.95))


# ----------------------------------------------------------------------------- validation


def _curve(sid, ratios, nll=2.0, method="snapkv", rs=(1.0, 0.75, 0.5, 0.25)):
    return [{"sample_id": sid, "task": "t", "method": method, "retention": r, "context_nll": nll, "nll_ratio": y}
            for r, y in zip(rs, ratios)]


def test_safe_compression_ratio():
    assert safe_compression_ratio(_curve("a", [1.0, 0.97, 0.93, 0.99]), 0.95) == pytest.approx(0.25)
    assert safe_compression_ratio(_curve("a", [1.0, 0.97, 0.96, 0.955]), 0.95) == pytest.approx(0.75)
    assert safe_compression_ratio(_curve("a", [1.0, 0.90, 0.99, 0.99]), 0.95) == 0.0
    # order of rows does not matter; without r = 1 a failing top point gives 0
    assert safe_compression_ratio(list(reversed(_curve("a", [1.0, 0.97, 0.93, 0.99]))), 0.95) == pytest.approx(0.25)
    assert safe_compression_ratio(_curve("a", [0.9, 0.99], rs=(0.75, 0.5)), 0.95) == 0.0
    assert safe_compression_ratio(_curve("a", [float("nan"), 1.0], rs=(0.75, 0.5)), 0.95) == 0.0
    with pytest.raises(ValueError, match="one context"):
        safe_compression_ratio(_curve("a", [1.0]) + _curve("b", [1.0]), 0.95)


def test_validate_calibrator():
    cal = Calibrator("snapkv", alpha=0.0, beta=-3.0, tau=0.95)
    predicted = 1 - min_retention(-3.0, 0.95)  # ~0.2233 for every context
    rows = (_curve("a", [1.0, 0.97, 0.93, 0.99], nll=1.0)      # measured 0.25: safe
            + _curve("b", [1.0, 0.90, 0.99, 0.99], nll=3.0)    # measured 0: unsafe
            + _curve("c", [1.0, 0.5, 0.5, 0.5], method="knorm"))  # other method: ignored
    out = validate_calibrator(cal, rows)
    assert out["n_contexts"] == 2 and out["tau"] == 0.95
    assert out["share_safe"] == pytest.approx(0.5)
    assert out["mean_abs_error"] == pytest.approx((abs(predicted - 0.25) + predicted) / 2)
    per = {c["sample_id"]: c for c in out["contexts"]}
    assert per["a"]["safe"] and not per["b"]["safe"]
    assert per["a"]["predicted_ratio"] == pytest.approx(predicted)
    assert per["b"]["measured_safe_ratio"] == 0.0 and per["a"]["context_nll"] == 1.0
    # a looser budget changes the verdict for b; tolerance covers grid quantisation
    assert validate_calibrator(cal, rows, tau=0.9)["contexts"][1]["measured_safe_ratio"] == pytest.approx(0.75)
    assert validate_calibrator(cal, _curve("d", [1.0, 0.9, 0.9, 0.9]), tolerance=0.25)["share_safe"] == 1.0
    with pytest.raises(ValueError, match="no held-out rows"):
        validate_calibrator(Calibrator("random", 0.0, 0.0), rows)


# ----------------------------------------------------------------------------- on a tiny model


def _reference(lm, sample):
    """Answer NLL and context NLL from one ordinary forward (SDPA, no cache at all)."""
    prompt = build_prompt(lm.tokenizer, sample.context, sample.question, sample.answer_prefix)
    answer = lm.tokenizer(answer_text(sample), add_special_tokens=False).input_ids
    ids = prompt.context + prompt.question + prompt.suffix + answer
    model = lm.model
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    finally:
        enable_kvray_attention(model)
    logp = torch.log_softmax(logits, dim=-1)
    n = len(ids) - len(answer)
    nll_answer = -logp[torch.arange(n - 1, len(ids) - 1), torch.tensor(answer)].mean()
    skip = _template_prefix(lm.tokenizer, prompt, sample.context, sample.question)
    nc = len(prompt.context)
    nll_context = -logp[torch.arange(skip - 1, nc - 1), torch.tensor(prompt.context[skip:])].mean()
    return float(nll_answer), float(nll_context), skip, prompt


def _template_prefix(tokenizer, prompt, context, question):
    """Oracle: tokens shared by the prompt's context part and the template text before the
    context, tokenised alone."""
    sep = "" if not question or question[:1].isspace() else "\n\n"
    text = tokenizer.apply_chat_template([{"role": "user", "content": context + sep + question}],
                                         add_generation_prompt=True, tokenize=False)
    pre = tokenizer(text[:text.find(context + sep + question)], add_special_tokens=False).input_ids
    n = next((i for i, (a, b) in enumerate(zip(pre, prompt.context)) if a != b), min(len(pre), len(prompt.context)))
    assert n == prompt.template_prefix and n > 0
    return n


def test_measure_curve_matches_plain_forward(tiny_llama):
    lm = tiny_llama
    sample = make_samples("niah_multivalue", 1, 220, seed=1)[0]
    assert len(sample.answers) > 1 and answer_text(sample).startswith(" ") and ", " in answer_text(sample)
    decoder = lm.model.get_decoder()
    hooks_before = len(decoder._forward_hooks)
    rows = measure_curve(lm, sample, "snapkv", [1.0, 0.5, 0.25], method_params={"window_size": 8})
    assert len(decoder._forward_hooks) == hooks_before  # the scoped hook is gone
    assert [r["retention"] for r in rows] == [1.0, 0.5, 0.25]
    assert [r["compression_ratio"] for r in rows] == [0.0, 0.5, 0.75]
    ref_answer, ref_context, skip, prompt = _reference(lm, sample)
    assert 0 < skip < len(prompt.context)
    assert lm.tokenizer.decode(prompt.context[skip:]).startswith(sample.context[:10])
    for row in rows:
        assert row["sample_id"] == sample.sample_id and row["task"] == sample.task and row["method"] == "snapkv"
        assert row["context_tokens"] == len(prompt.context) == row["compressed_tokens"]
        assert row["nll_full"] == pytest.approx(ref_answer, rel=1e-5, abs=1e-5)
        assert row["context_nll"] == pytest.approx(ref_context, rel=1e-5, abs=1e-5)
        assert row["nll_ratio"] == pytest.approx(row["nll_full"] / row["nll_compressed"], rel=1e-12)
    assert rows[0]["nll_ratio"] == 1.0 and rows[0]["nll_compressed"] == rows[0]["nll_full"]
    assert rows[2]["nll_compressed"] != rows[0]["nll_full"]  # compression changed something
    # the standalone helper gives the same statistic
    assert context_nll(lm, sample.context, sample.question, sample.answer_prefix) == pytest.approx(
        rows[0]["context_nll"], rel=1e-6)
    assert len(decoder._forward_hooks) == hooks_before


def test_measure_curve_query_aware_and_errors(tiny_llama):
    lm = tiny_llama
    sample = make_samples("niah_single", 1, 200, seed=0)[0]
    rows = measure_curve(lm, sample, "knorm", [1.0, 0.5], query_aware=True)
    ref_answer, ref_context, _, prompt = _reference(lm, sample)
    assert rows[0]["nll_ratio"] == 1.0
    assert rows[0]["compressed_tokens"] == len(prompt.context) + len(prompt.question) + len(prompt.suffix)
    for row in rows:
        assert row["query_aware"] is True
        assert row["nll_full"] == pytest.approx(ref_answer, rel=1e-5, abs=1e-5)
        assert row["context_nll"] == pytest.approx(ref_context, rel=1e-5, abs=1e-5)
    for bad in ([0.0], [1.5], []):
        with pytest.raises(ValueError, match="retention"):
            measure_curve(lm, sample, "knorm", bad)
    with pytest.raises(ValueError, match="no parameter"):
        measure_curve(lm, sample, "knorm", [0.5], method_params={"window": 3})

"""`kvray.report` on a synthetic run directory: images embedded and written, section titles,
table numbers equal to what was planted, missing parts, bad run directories, HTML escaping."""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime, timezone
from html.parser import HTMLParser

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from kvray.calibration import Calibrator
from kvray.policy import Policy
from kvray.report import main, write_report
from kvray.results import write_shard

RUN_ID = "20260101-000000-abcdef"
TASKS = ("niah", "<b>vt</b>")  # the second one checks escaping
# (method, ratio) -> the planted mean score on "niah", agnostic; aware is 0.1 lower, "<b>vt</b>" 0.2 lower
BASE = {("full", 0.0): 0.9, ("snapkv", 0.25): 0.8, ("snapkv", 0.5): 0.6, ("knorm", 0.5): 0.45}
COMPRESS_S = {"full": 0.001, "snapkv": 0.004, "knorm": 0.002}
DECODE_S = {"full": 0.1, "snapkv": 0.1, "knorm": 0.3}  # per 5 new tokens (x (i + 1) for sample i)
KV_FULL = 2 * 2**20
IMG_PREFIX = "data:image/png;base64,"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def planted_mean(method, ratio, aware, task) -> float:
    return BASE[(method, ratio)] - 0.1 * aware - 0.2 * (task != "niah")


def eval_rows() -> list[dict]:
    rows = []
    for (method, ratio) in BASE:
        for aware in (False, True):
            for task in TASKS:
                for i in range(2):
                    sid = f"{task}-{i}"
                    rows.append({
                        "run_id": RUN_ID, "created_at": datetime(2026, 1, 1, tzinfo=timezone.utc),
                        "kvray_version": "0.1.0", "schema_version": 1, "item_id": f"{method}{ratio}{aware}{sid}",
                        "config_id": f"{method}{ratio}{aware}", "model": "tiny", "method": method, "params": "{}",
                        "plan_id": "uniform", "compression_ratio": ratio, "achieved_ratio": ratio,
                        "query_aware": aware, "task": task, "sample_id": sid, "target_length": 500,
                        "context_tokens": 500 + 20 * aware, "prediction": "x", "answers": ["x"],
                        # +-0.05 around the planted mean
                        "score": planted_mean(method, ratio, aware, task) + (0.05 if i == 0 else -0.05),
                        "kv_bytes_full": KV_FULL, "kv_bytes_kept": int(KV_FULL * (1 - ratio)),
                        "prefill_s": 0.5, "compress_s": COMPRESS_S[method], "decode_s": DECODE_S[method] * (i + 1),
                        "new_tokens": 5 * (i + 1), "peak_mem_bytes": 3 * 2**20, "device": "cpu",
                    })
    return rows


def make_evals(run):
    write_shard(eval_rows(), run / "evals", RUN_ID, "a")


def make_full_run(run):
    make_evals(run)
    (run / "tune").mkdir(parents=True)
    pd.DataFrame({
        "run_id": RUN_ID, "model": "tiny", "method": "snapkv", "target_ratio": 0.5,
        "trial_id": ["t0", "t1", "t2", "t3"],
        "config": [json.dumps({"head_alpha": a, "layer_slope": s}) for a, s in
                   ((1.0, 0.0), (0.5, 0.5), (1.0, -0.5), (0.5, 0.0))],
        "layer_slope": [0.0, 0.5, -0.5, 0.0], "head_alpha": [1.0, 0.5, 1.0, 0.5],
        "score": [0.5, 0.25, 0.7, 0.0], "n_samples": [3, 3, 3, 1], "evaluated": [3, 3, 3, 1],
        "finished": [True, True, True, False], "is_baseline": [True, False, False, False],
        "kept_fraction": 0.5, "time_total_s": 1.0, "is_best": [False, False, True, False],
    }).to_parquet(run / "tune" / "snapkv.parquet", index=False)

    plan = {"name": "slope-0.5", "keep": [[0.4, 0.6], [0.5, 0.5], [0.6, 0.4]]}
    Policy(policy_id="tiny-snapkv-r0.5-aaaa", model="tiny", method="snapkv", compression_ratio=0.5, plan=plan,
           allocation={"layer_slope": -0.5, "head_alpha": 1.0},
           metrics={"tune": {"score": 0.7, "uniform_score": 0.5}},
           validation={"split": "test", "n": 40, "score": 0.65, "score_ci95": [0.5, 0.8], "full_score": 0.7,
                       "uniform_score": 0.55, "gain_vs_uniform": 0.1, "gain_ci95": [0.02, 0.2],
                       "verdict": "cannot tell", "readme_example": {"answer": "4711", "correct": True}}
           ).save(run / "policies")
    Policy(policy_id="tiny-knorm-r0.5-bbbb", model="tiny", method="knorm", compression_ratio=0.5).save(
        run / "policies")

    cal = run / "calibration"
    cal.mkdir()
    Calibrator(method="snapkv", alpha=1.25, beta=-3.5, tau=0.95, n_points=6, n_contexts=2, loss=0.001).save(
        cal / "snapkv.json")
    contexts = [{"sample_id": "h0", "task": "niah", "context_nll": 2.0, "predicted_ratio": 0.4,
                 "measured_safe_ratio": 0.5, "error": -0.1, "safe": True},
                {"sample_id": "h1", "task": "niah", "context_nll": 3.0, "predicted_ratio": 0.6,
                 "measured_safe_ratio": 0.25, "error": 0.35, "safe": False}]
    (cal / "snapkv.validation.json").write_text(json.dumps(
        {"method": "snapkv", "tau": 0.95, "tolerance": 0.02, "n_contexts": 2, "share_safe": 0.5,
         "mean_abs_error": 0.225, "contexts": contexts}))
    curves = [{"sample_id": sid, "task": "niah", "method": "snapkv", "retention": r, "compression_ratio": 1 - r,
               "context_nll": nll, "nll_ratio": r ** 0.5, "split": split}
              for sid, nll, split in (("f0", 2.5, "fit"), ("h0", 2.0, "heldout"), ("h1", 3.0, "heldout"))
              for r in (0.25, 0.5, 0.75)]
    pd.DataFrame(curves).to_parquet(cal / "curves-snapkv.parquet", index=False)

    (run / "summary.json").write_text(json.dumps(
        {"run_id": RUN_ID, "model": "tiny<i>", "elapsed_s": 125.0,
         "policies": ["tiny-knorm-r0.5-bbbb", "tiny-snapkv-r0.5-aaaa"]}))
    (run / "config.yaml").write_text("note: <script>alert(1)</script>\n")


class _Tables(HTMLParser):
    """Each <table> as a list of rows of cell texts (entities decoded)."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def tables_with(page: str, column: str) -> list[list[dict]]:
    parser = _Tables()
    parser.feed(page)
    return [[dict(zip(t[0], row)) for row in t[1:]] for t in parser.tables if t and column in t[0]]


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(re.escape(IMG_PREFIX) + r"([A-Za-z0-9+/=]+)", page)]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / RUN_ID
    make_full_run(run)
    path = write_report(run)
    return run, path, path.read_text()


EXPECTED_PNGS = {"scores-query-agnostic.png", "scores-query-aware.png", "plan-tiny-snapkv-r0.5-aaaa.png",
                 "tune-trials.png", "tune-allocations-snapkv.png", "calibration-safe-ratio.png", "calibration-curves.png", "throughput.png"}


def test_full_report_embeds_and_writes_every_plot(full_report):
    run, path, page = full_report
    assert path == run / "report.html"
    for title in ("1. Score vs compression", "2. Tuned budgets", "3. Calibration", "4. Throughput and KV memory",
                  "query-agnostic", "query-aware", "Tune trials", "kvray report RUN_DIR", f"kvray run {RUN_ID}"):
        assert title in page, title
    embedded = images(page)
    assert len(embedded) == len(EXPECTED_PNGS)
    files = {p.name: p.read_bytes() for p in (run / "report_img").glob("*.png")}
    assert set(files) == EXPECTED_PNGS
    assert sorted(embedded) == sorted(files.values())  # the page embeds exactly the written files
    for name, data in files.items():
        assert data.startswith(PNG_MAGIC), name
        assert matplotlib.image.imread(run / "report_img" / name).ndim == 3
    assert "<script" not in page and "http" not in page  # no JS, no CDN
    assert 'class="absent"' not in page  # every part is there


def test_score_tables_match_the_planted_means(full_report):
    _, _, page = full_report
    agnostic, aware = tables_with(page, "mean over tasks")
    for rows, is_aware in ((agnostic, False), (aware, True)):
        got = {(r["method"], r["ratio"]): r for r in rows}
        assert set(got) == {("full", "0"), ("snapkv", "0.25"), ("snapkv", "0.5"), ("knorm", "0.5")}
        for (method, ratio) in BASE:
            row = got[(method, f"{ratio:g}")]
            for task in TASKS:
                assert float(row[task]) == pytest.approx(planted_mean(method, ratio, is_aware, task), abs=5e-4)
            mean = sum(planted_mean(method, ratio, is_aware, t) for t in TASKS) / len(TASKS)
            assert float(row["mean over tasks"]) == pytest.approx(mean, abs=5e-4)
            assert float(row["kept"]) == pytest.approx(1 - ratio, abs=5e-4)
            assert row["n"] == "4"
    assert [r["method"] for r in agnostic][0] == "full"


def test_throughput_table_matches_the_planted_times(full_report):
    _, _, page = full_report
    (rows,) = tables_with(page, "decode tokens/s")
    got = {(r["method"], r["ratio"]): r for r in rows}
    for (method, ratio) in BASE:
        row = got[(method, f"{ratio:g}")]
        # decode: DECODE_S * (1 + 2) s for 5 * (1 + 2) tokens per protocol and task
        per_token = DECODE_S[method] / 5
        assert float(row["decode ms/token"]) == pytest.approx(1000 * per_token, abs=5e-3)
        assert float(row["decode tokens/s"]) == pytest.approx(1 / per_token, abs=5e-3)
        assert float(row["compress ms"]) == pytest.approx(1000 * COMPRESS_S[method], abs=5e-3)
        assert float(row["KV MiB kept"]) == pytest.approx(2 * (1 - ratio), abs=5e-3)
        assert float(row["KV MiB full"]) == pytest.approx(2.0, abs=5e-3)
        assert row["rows"] == "8"
    assert "Prefill: 500.0 ms per sample" in page


def test_policy_tune_and_calibration_tables(full_report):
    _, _, page = full_report
    (policies,) = tables_with(page, "tune score")
    by_id = {r["policy"]: r for r in policies}
    assert set(by_id) == {"tiny-snapkv-r0.5-aaaa", "tiny-knorm-r0.5-bbbb"}
    snap = by_id["tiny-snapkv-r0.5-aaaa"]
    assert (snap["tune score"], snap["test score"], snap["uniform"], snap["full"]) == ("0.700", "0.650", "0.550", "0.700")
    assert (snap["test n"], snap["score 95%"], snap["gain 95%"], snap["README example"]) == \
        ("40", "[0.50, 0.80]", "[0.02, 0.20]", "ok")
    assert by_id["tiny-knorm-r0.5-bbbb"]["verdict"] == "not validated"
    assert by_id["tiny-snapkv-r0.5-aaaa"]["plan"] == "slope-0.5"
    assert by_id["tiny-knorm-r0.5-bbbb"]["plan"] == "uniform"
    (trials,) = tables_with(page, "trial_id")
    assert [r["trial_id"] for r in trials] == ["t2", "t0", "t1", "t3"]  # best score first
    (cal,) = tables_with(page, "share_safe")
    assert cal == [{"method": "snapkv", "alpha": "1.2500", "beta": "-3.5000", "tau": "0.9500", "fit points": "6",
                    "fit contexts": "2", "loss": "0.0010", "held-out contexts": "2", "share_safe": "0.5000",
                    "mean_abs_error": "0.2250"}]


def test_text_from_data_is_escaped(full_report):
    _, _, page = full_report
    assert "<b>vt</b>" not in page and "&lt;b&gt;vt&lt;/b&gt;" in page
    assert "tiny<i>" not in page and "tiny&lt;i&gt;" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_evals_only_run_says_what_is_absent(tmp_path, capsys):
    run = tmp_path / RUN_ID
    make_evals(run)
    (run / "policies").mkdir()
    (run / "policies" / "broken.json").write_text("{")
    out = tmp_path / "elsewhere" / "r.html"
    assert main([str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    assert len(images(page)) == 3  # two protocols + throughput
    assert {p.name for p in (out.parent / "report_img").glob("*.png")} == {
        "scores-query-agnostic.png", "scores-query-aware.png", "throughput.png"}
    assert not (run / "report.html").exists()
    for line in ("No policies in this run directory", "No Tune trials in this run directory",
                 "No calibration in this run directory", "Files that could not be read", "broken.json"):
        assert line in page, line
    assert len(tables_with(page, "mean over tasks")) == 2


def test_policies_only_run(tmp_path):
    run = tmp_path / "run"
    Policy(policy_id="p-1", model="tiny", method="snapkv", compression_ratio=0.25,
           plan={"name": "x", "keep": [[0.7, 0.8]]}).save(run / "policies")
    Policy(policy_id="p-flat", model="tiny", method="snapkv", compression_ratio=0.25,
           plan={"name": "flat", "keep": [[0.75, 0.75]]}).save(run / "policies")
    page = write_report(run).read_text()
    assert len(images(page)) == 1  # the uniform plan's heatmap would be flat: not drawn
    assert "No eval rows in this run directory" in page and "No Tune trials" in page


@pytest.mark.parametrize("setup, message", [
    (None, "no run directory at"),
    (lambda d: d.mkdir(), "holds none of the parts"),
    (lambda d: (d.mkdir(), (d / "notes.txt").write_text("hi"), (d / "evals").mkdir()), "evals/run_id=*/part-*.parquet"),
])
def test_bad_run_dir_exits_with_a_message(tmp_path, setup, message):
    run = tmp_path / "run"
    if setup:
        setup(run)
    with pytest.raises(SystemExit) as exc:
        main([str(run)])
    assert message in str(exc.value)
    assert not (tmp_path / "run" / "report.html").exists()


def test_top_allocations_are_rebuilt_from_the_trials(tmp_path):
    """The best trials' plans come back from their configs with the model shape (summary.json or
    a policy's plan); without a shape the page says why there is no figure."""
    from kvray.report import _load, _top_allocations
    from kvray.tune.space import SearchSpace

    run_dir = tmp_path / RUN_ID
    make_full_run(run_dir)
    run = _load(run_dir)
    drawn = {}

    class Capture:
        def __call__(self, fig, name, alt):
            drawn[name] = [ax.images[0].get_array() for ax in fig.axes if ax.images]
            return name

    assert "tune-allocations-snapkv" in _top_allocations(run, Capture(), k=2)
    (best,) = drawn["tune-allocations-snapkv"]  # scores 0.7 (slope -0.5); the uniform 0.5 is not drawn
    expected = SearchSpace.default("snapkv", 0.5).plan({"layer_slope": -0.5}, 3, 2).keep
    assert np.allclose(best, expected) and best[0, 0] < best[-1, 0]
    run.policies = [p for p in run.policies if p.plan is None]
    assert "model shape is unknown" in _top_allocations(run, Capture())
    run.summary["num_layers"], run.summary["num_kv_heads"] = 4, 3
    _top_allocations(run, Capture(), k=1)
    assert drawn["tune-allocations-snapkv"][0].shape == (4, 3)

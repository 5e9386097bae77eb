"""kvray on a local Ray (one cluster for the session, 4 logical CPUs): distributed evaluation
equals the single-process runner row for row, resume, an actor killed mid-run, a failing sample,
the Tune search, and the main job's --smoke-test."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from conftest import _tiny_lm  # noqa: E402
from kvray.eval.runner import ModelHost, build_presses, run_eval  # noqa: E402
from kvray.eval.tasks import make_samples  # noqa: E402
from kvray.eval.metrics import score_sample  # noqa: E402
from kvray.generate import run_configs  # noqa: E402
from kvray.runtime import build_prompt, prefill  # noqa: E402
import kvray  # noqa: E402

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
CONTENT = ["item_id", "config_id", "method", "params", "plan_id", "compression_ratio", "achieved_ratio",
           "query_aware", "task", "sample_id", "context_tokens", "prediction", "score", "kv_bytes_full",
           "kv_bytes_kept", "new_tokens"]


@pytest.fixture(scope="module")
def pool(ray_session, tiny_dir):
    """Two model actors for this module; their CPUs go back to the session's Ray after it."""
    from kvray.actors import start_workers

    p = start_workers(2, tiny_dir, cpus_per_worker=1)
    yield p
    p.shutdown()


def _samples(n=4, length=160, seed=0):
    tok = _tiny_lm("llama").tokenizer
    return make_samples("niah_single", n, length=length, seed=seed, count_tokens=lambda s: len(tok(s).input_ids))


def _presses():
    return build_presses(["full", "snapkv", "knorm", "adakv"], [0.5])


def _content(df):
    return df.sort_values("item_id")[CONTENT].reset_index(drop=True)


def test_distributed_equals_single_process(pool, tiny_dir, tmp_path):
    from kvray.actors import run_eval_distributed
    from kvray.models import load_model

    samples, presses = _samples(), _presses()
    _, dist = run_eval_distributed(pool, samples, presses, out_dir=tmp_path / "d", protocols=[False, True],
                                   progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each actor
    try:
        _, local = run_eval(ModelHost(load_model(tiny_dir)), samples, presses, out_dir=tmp_path / "l",
                            protocols=[False, True], progress=False)
    finally:
        torch.set_num_threads(threads)
    assert len(dist) == len(samples) * len(presses) * 2
    assert dist["item_id"].is_unique
    assert _content(dist).equals(_content(local))


def test_driver_crash_then_resume(pool, tmp_path):
    from kvray.actors import run_eval_distributed
    from kvray.results import run_dir

    samples, presses = _samples(), _presses()
    submitted = []

    def crash_after_three(i, key, ref):
        submitted.append(key)
        if len(submitted) == 4:  # 2 actors x 1 in flight: one result is back and written by now
            raise KeyboardInterrupt("driver killed")

    with pytest.raises(KeyboardInterrupt):
        run_eval_distributed(pool, samples, presses, out_dir=tmp_path, run_id="r1", progress=False,
                             max_in_flight=1, on_submit=crash_after_three)
    written = {p: p.stat().st_mtime_ns for p in run_dir(tmp_path, "r1").glob("part-*.parquet")}
    assert 1 <= len(written) < len(samples)
    _, df = run_eval_distributed(pool, samples, presses, out_dir=tmp_path, run_id="r1", progress=False)
    assert len(df) == len(samples) * len(presses) and df["item_id"].is_unique
    assert sorted(df["sample_id"].unique()) == sorted(s.sample_id for s in samples)
    for path, mtime in written.items():  # shards already written were not redone
        assert path.stat().st_mtime_ns == mtime


def test_actor_killed_mid_run_loses_nothing(ray_session, tiny_dir, tmp_path):
    from kvray.actors import run_eval_distributed, start_workers

    pool = start_workers(2, tiny_dir, cpus_per_worker=1)
    samples, presses = _samples(6, seed=3), _presses()
    killed = []

    def kill_actor_0(i, key, ref):
        if i == 0 and not killed:
            killed.append(key)
            ray.kill(pool.actors[0], no_restart=False)  # dies with this task in flight; Ray restarts it

    try:
        _, df = run_eval_distributed(pool, samples, presses, out_dir=tmp_path, progress=False, max_in_flight=1,
                                     on_submit=kill_actor_0)
        # the restart is seen once actor 0 answers again (new pid)
        ray.get(pool.actors[0].info.remote())
    finally:
        pool.shutdown()
    assert killed
    assert len(df) == len(samples) * len(presses)
    assert df["item_id"].is_unique
    assert df.groupby("sample_id").size().eq(len(presses)).all()
    assert pool.restarts >= 1


def test_failing_sample_is_reported_and_others_written(pool, tmp_path):
    from kvray.actors import EvaluationError, run_eval_distributed
    from kvray.eval.tasks import Sample

    good = _samples(2, seed=5)
    bad = Sample(context="word " * 6000, question="What?", answer_prefix="", answers=("x",), task="niah_single",
                 sample_id="too-long", max_new_tokens=4)
    with pytest.raises(EvaluationError) as err:
        run_eval_distributed(pool, [*good, bad], _presses(), out_dir=tmp_path, run_id="r2", progress=False)
    assert "too-long" in err.value.failed and "tokens" in err.value.failed["too-long"]
    from kvray.results import read_results

    df = read_results(tmp_path, run_id="r2")
    assert sorted(df["sample_id"].unique()) == sorted(s.sample_id for s in good)


def test_failing_sample_in_a_group_fails_alone(pool, tiny_dir, tmp_path):
    """Samples with few configs go to the actors in groups that decode together; a sample that
    fails inside a group fails alone, its group's other samples are written, and they equal the
    single-process runner's rows."""
    from kvray.actors import EvaluationError, run_eval_distributed
    from kvray.eval.runner import sample_groups
    from kvray.eval.tasks import Sample
    from kvray.models import load_model
    from kvray.results import read_results

    good = _samples(7, seed=6)
    bad = Sample(context="word " * 6000, question="What?", answer_prefix="", answers=("x",), task="niah_single",
                 sample_id="too-long", max_new_tokens=good[0].max_new_tokens)
    presses = build_presses(["full", "snapkv"], [0.5])
    groups = sample_groups([*good, bad], len(presses), len(pool.actors))
    assert any(bad in g and len(g) > 1 for g in groups)  # it shares a group
    with pytest.raises(EvaluationError) as err:
        run_eval_distributed(pool, [*good, bad], presses, out_dir=tmp_path, run_id="g", progress=False)
    assert list(err.value.failed) == ["too-long"] and "tokens" in err.value.failed["too-long"]
    df = read_results(tmp_path, run_id="g")
    assert sorted(df["sample_id"].unique()) == sorted(s.sample_id for s in good) and df["item_id"].is_unique
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each actor
    try:
        _, local = run_eval(ModelHost(load_model(tiny_dir)), good, presses, out_dir=tmp_path / "l",
                            progress=False)
    finally:
        torch.set_num_threads(threads)
    assert _content(df).equals(_content(local))


def test_tune_search_reuses_actors_and_never_loses_to_uniform(ray_session, tiny_dir, tmp_path):
    from kvray.policy import Policy
    from kvray.tune import SearchSpace, search_budgets, trials_table

    samples = _samples(4, seed=9)
    space = SearchSpace.default("snapkv", 0.5, window_size=[8, 16], kernel_size=[1, 3])
    # a random tiny model scores 0 on the task (and says the same words to every context): make
    # two samples' answers what it says alone under the uniform allocation in more tokens than
    # their neighbours get, so that a batch handing a sample another's output is caught below
    samples = [dataclasses.replace(s, max_new_tokens=12 if i % 2 == 0 else 5) for i, s in enumerate(samples)]
    lm = kvray.load_model(tiny_dir)
    pres = {s.sample_id: prefill(lm, build_prompt(lm.tokenizer, s.context, s.question, s.answer_prefix),
                                 capture_window=16, with_question=True) for s in samples}
    base = space.press(space.baseline(), lm.plan_layers, lm.num_kv_heads)
    samples = [dataclasses.replace(s, answers=(run_configs(lm, pres[s.sample_id], [base], True, s.max_new_tokens)[0]
                                               .text.strip(),)) if i % 2 == 0 else s for i, s in enumerate(samples)]
    lines: list[str] = []
    res = search_budgets(space, samples, model=tiny_dir, num_trials=6, max_concurrent=2, storage_path=str(tmp_path),
                         progress=lines.append)
    df = res.trials
    assert len(df) == 6
    # one quiet line per ended trial, counting up to all of them
    counts = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert len(lines) == 6 and counts == sorted(counts) and counts[-1] == 6, lines
    assert lines[-1].startswith("[tune] snapkv: 6/6 trials ended") and "best" in lines[-1]
    assert df["is_baseline"].sum() == 1 and df.loc[df["is_baseline"], "finished"].all()
    assert res.best_score >= res.baseline_score
    # reuse_actors: at most one model per concurrent trial slot, and prefills kept across trials
    assert df["actor_pid"].nunique() <= 2 < len(df)
    assert res.sample_evaluations == df["evaluated"].sum() <= res.sample_steps == df["n_samples"].sum() <= 6 * len(samples)
    # the samples up to each rung decode as one batch (rows of different prompts), none past the
    # point where ASHA stopped the trial, and every trial scores what each sample scores alone
    assert (df["evaluated"] <= df["n_samples"]).all()
    for _, trial in df.iterrows():
        press = space.press(json.loads(trial["config"]), lm.plan_layers, lm.num_kv_heads)
        alone = [score_sample(s, run_configs(lm, pres[s.sample_id], [press], True, s.max_new_tokens)[0].text)
                 for s in samples[:trial["n_samples"]]]
        assert trial["score"] == pytest.approx(sum(alone) / len(alone)), trial["config"]
    table = trials_table(res, "r", "tiny")
    assert table["is_best"].sum() == 1
    press = space.press(res.best_config, 3, 2)
    pol = Policy(policy_id="tiny-best", model="tiny", method=press.name, params=press.params(),
                 compression_ratio=press.target_ratio, plan=press.plan.to_dict() if press.plan else None)
    assert Policy.from_json(pol.to_json()).press() == press


def test_tune_trials_share_prefills_made_once_on_the_pool(pool, tiny_dir, tmp_path):
    """Prefills made once on the model actors (`prefill_distributed`, the union `tune_prefill_spec`
    of a query-aware snapkv and an agnostic compactor search) and left in the object store after
    the pool's actors are done: no trial actor prefills, and every trial scores what each sample
    scores alone on its own prefill. A shared prefill that lacks what a search reads (here the
    question, for a query-aware search) is not used: the trial actors prefill themselves."""
    from kvray.actors import prefill_distributed
    from kvray.tune import SearchSpace, search_budgets, tune_prefill_spec

    samples = _samples(3, seed=11)
    lm = kvray.load_model(tiny_dir)
    snap = SearchSpace.default("snapkv", 0.5, window_size=[8, 16], kernel_size=[1, 3])
    compactor = SearchSpace.default("compactor", 0.5)
    spec = tune_prefill_spec([snap, compactor], [True, False], lm.plan_layers, lm.num_kv_heads)
    assert spec == {"capture_window": 64, "with_question": True, "capture_hidden": True}
    refs = prefill_distributed(pool, samples, **spec)
    assert sorted(refs) == sorted(s.sample_id for s in samples)
    res = search_budgets(snap, samples, model=tiny_dir, num_trials=4, max_concurrent=2,
                         storage_path=str(tmp_path / "a"), prefills=refs)
    df = res.trials
    assert len(df) == 4 and (df["prefills_made"] == 0).all()
    for _, trial in df.iterrows():
        press = snap.press(json.loads(trial["config"]), lm.plan_layers, lm.num_kv_heads)
        alone = []
        for s in samples[:trial["n_samples"]]:
            own = prefill(lm, build_prompt(lm.tokenizer, s.context, s.question, s.answer_prefix), capture_window=16,
                          with_question=True)
            alone.append(score_sample(s, run_configs(lm, own, [press], True, s.max_new_tokens)[0].text))
        assert trial["score"] == pytest.approx(sum(alone) / len(alone)), trial["config"]
    lacking = prefill_distributed(pool, samples, capture_window=16, with_question=False, capture_hidden=False)
    res = search_budgets(snap, samples, model=tiny_dir, num_trials=2, max_concurrent=2,
                         storage_path=str(tmp_path / "b"), prefills=lacking)
    assert (res.trials["prefills_made"] > 0).all()


def test_calibrate_job_smoke(ray_session, tiny_dir, tmp_path):
    """jobs/calibrate.py --smoke-test end to end (its own Ray driver, the tiny model)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "calibrate.py"), "--smoke-test", "--model", tiny_dir,
         "--out", str(tmp_path), "--run-id", "smoke", "--set", "tune.trials=2", "--set", "eval.length=200",
         "--set", "tune.length=200", "--set", "calibration.length=200"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "smoke"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["policies"]
    from kvray.policy import PolicyStore
    from kvray.results import read_results

    store = PolicyStore(tmp_path / "policies")
    assert set(summary["policies"]) <= set(store.ids())
    for pid in summary["policies"]:
        store.get(pid).press()  # loads and builds
    df = read_results(run / "evals")
    assert len(df) > 0 and df["item_id"].is_unique
    assert "Where everything is" in proc.stdout
    assert "Configuration for experiment" not in proc.stdout + proc.stderr  # Tune is quiet in the job log
    assert "Trial status" not in proc.stdout + proc.stderr
    # the report (plots of this run) and how to serve the policies, from the summary
    html = (run / "report.html").read_text()
    assert summary["report"] == str(run / "report.html") and html.count("data:image/png;base64,") >= 3
    assert f"kvray report {run}" in proc.stdout and "make serve" in proc.stdout
    assert f'"policy": "{summary["policies"][0]}"' in proc.stdout  # the curl with the printed policy id


def test_start_workers_goes_on_with_the_actors_that_fit(ray_session, tiny_dir, monkeypatch, capsys):
    """Two actors that each need all the free CPUs (as when a Serve app holds part of a laptop):
    the run goes on with the one placed, the other is removed; none placeable: a clear error."""
    import kvray.actors.pool as pool_mod

    free = ray.available_resources().get("CPU", 0)
    monkeypatch.setattr(pool_mod, "PLACE_GRACE_S", 3.0)
    pool = pool_mod.start_workers(2, tiny_dir, cpus_per_worker=free)
    try:
        assert len(pool.actors) == len(pool.infos) == 1
        assert "only 1 of 2 model actors could be placed" in capsys.readouterr().err
    finally:
        pool.shutdown()
    monkeypatch.setattr(pool_mod, "START_TIMEOUT_S", 3.0)
    with pytest.raises(RuntimeError, match="no model actor could start within 3 s"):
        pool_mod.start_workers(1, tiny_dir, cpus_per_worker=free + 1)
    time.sleep(1.0)
    assert ray.available_resources().get("CPU", 0) == free  # nothing left holding CPUs

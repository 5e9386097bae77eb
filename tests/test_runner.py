"""The runner: one prefill per sample for every config, both protocols, Parquet rows, resume;
the `kvray` command."""

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from kvray import results
from kvray.cli import main as kvray_main
from kvray.eval import make_samples
from kvray.eval import runner as runner_mod
from kvray.eval.runner import ModelHost, build_presses, by_cost, run_eval, summarize
from kvray.results import COLUMNS, read_results


def samples(lm, n=2, length=300):
    count = lambda s: len(lm.tokenizer(s, add_special_tokens=False).input_ids)  # noqa: E731
    return make_samples("niah_single", n, length, seed=0, count_tokens=count)


def small_presses():
    return build_presses(["full", "snapkv", "adakv"], [0.5, 0.75])


def test_grid_on_one_prefill_both_protocols(tiny_llama, tmp_path, monkeypatch):
    calls = []
    real = runner_mod.prefill
    monkeypatch.setattr(runner_mod, "prefill", lambda *a, **k: calls.append(1) or real(*a, **k))
    host = ModelHost(tiny_llama)
    presses = small_presses()
    assert len(presses) == 5  # full once, at ratio 0
    ss = samples(tiny_llama)
    run_id, df = run_eval(host, ss, presses, out_dir=tmp_path, protocols=[False, True], progress=False)
    assert len(calls) == len(ss)  # one prefill per sample
    assert len(df) == len(ss) * len(presses) * 2
    assert set(COLUMNS) <= set(df.columns)
    assert df["item_id"].is_unique
    assert set(df["query_aware"]) == {False, True}
    full = df[df.method == "full"]
    assert (full.kv_bytes_kept == full.kv_bytes_full).all() and (full.achieved_ratio == 0).all()
    comp = df[df.method != "full"]
    assert ((comp.kv_bytes_kept / comp.kv_bytes_full - (1 - comp.compression_ratio)).abs() < 0.02).all()
    assert json.loads(df[df.method == "snapkv"].params.iloc[0])["window_size"] == 32
    assert (df.run_id == run_id).all()
    # the shard files carry the schema (run_id comes from the hive directory)
    files = list((tmp_path / f"run_id={run_id}").glob("part-*.parquet"))
    assert len(files) == len(ss)
    assert pq.read_schema(files[0]).names == [c for c in COLUMNS if c != "run_id"]
    text = summarize(df)
    assert "snapkv" in text and "niah_single" in text and "kept_frac" in text


def test_resume_skips_done_shards_and_never_duplicates(tiny_llama, tmp_path, monkeypatch):
    host = ModelHost(tiny_llama)
    presses = small_presses()
    ss = samples(tiny_llama, n=3)
    real = host.evaluate_stream
    kept = []

    def crash_after_first(order, *a, **k):  # the run dies once its first sample is done
        for i, rows in real(order, *a, **k):
            kept.append(order[i].sample_id)
            yield i, rows
            raise RuntimeError("killed")

    monkeypatch.setattr(host, "evaluate_stream", crash_after_first)
    with pytest.raises(RuntimeError):
        run_eval(host, ss, presses, out_dir=tmp_path, run_id="r1", progress=False)
    partial = read_results(tmp_path / "run_id=r1")
    assert len(kept) == 1 and len(partial) == len(presses)  # what was done is kept
    assert set(partial["sample_id"]) == set(kept)
    done = []
    monkeypatch.setattr(host, "evaluate_stream",
                        lambda order, *a, **k: done.extend(s.sample_id for s in order) or real(order, *a, **k))
    _, df = run_eval(host, ss, presses, out_dir=tmp_path, run_id="r1", progress=False)
    assert sorted(done) == sorted({s.sample_id for s in ss} - set(kept))  # the rest, each once
    assert len(df) == 3 * len(presses) and df["item_id"].is_unique
    assert not list((tmp_path / "run_id=r1").glob(".*tmp"))
    with pytest.raises(ValueError, match="other methods/ratios"):
        run_eval(host, ss, presses[:2], out_dir=tmp_path, run_id="r1", progress=False)


def test_runner_input_errors(tiny_llama, tmp_path):
    host = ModelHost(tiny_llama)
    with pytest.raises(ValueError, match="no samples"):
        run_eval(host, [], small_presses(), out_dir=tmp_path)
    s = samples(tiny_llama, n=1)
    with pytest.raises(ValueError, match="not unique"):
        run_eval(host, s + s, small_presses(), out_dir=tmp_path)
    with pytest.raises(ValueError, match="not evaluated"):
        build_presses(["snapkv"], [0.5], {"knorm": {}})


def test_cli_methods(capsys):
    assert kvray_main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("full", "random", "streaming_llm", "knorm", "snapkv", "pyramidkv", "adakv"):
        assert any(line.startswith(name + " ") for line in out.splitlines())


def test_cli_eval_on_a_local_model_directory(tiny_llama, tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    tiny_llama.model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    out_dir = tmp_path / "out"
    rc = kvray_main(["eval", "--model", str(model_dir), "--methods", "full,knorm", "--ratios", "0.5",
                     "--tasks", "niah_single,vt", "--length", "300,600", "--samples", "1", "--out", str(out_dir),
                     "--run-id", "cli", "--no-progress", "--both-protocols"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "knorm" in text and "run cli: 16 rows" in text
    assert "niah_single@300" in text and "vt@600" in text and set(read_results(out_dir).target_length) == {300, 600}  # one column per task and length
    df = read_results(out_dir)
    assert len(df) == 16 and set(df.task) == {"niah_single", "vt"}


def test_cli_rejects_bad_input(capsys):
    with pytest.raises(SystemExit):
        kvray_main(["eval", "--ratios", "1.5"])
    assert "outside [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown method"):
        kvray_main(["eval", "--methods", "snapkw"])


def test_cli_rejects_bad_json_options():
    with pytest.raises(SystemExit, match="--method-params is not valid JSON"):
        kvray_main(["eval", "--methods", "snapkv", "--method-params", "{window: 3}"])


def test_each_protocol_its_own_presses_on_one_prefill(tiny_llama, tmp_path, monkeypatch):
    """{query_aware: presses}: each protocol evaluates only its own configs, all on one prefill
    per sample, with the rows (predictions included) the grid form gives for the same pairs."""
    calls = []
    real = runner_mod.prefill
    monkeypatch.setattr(runner_mod, "prefill", lambda *a, **k: calls.append(1) or real(*a, **k))
    host = ModelHost(tiny_llama)
    full, snap, _, ada, _ = small_presses()
    ss = samples(tiny_llama)
    _, df = run_eval(host, ss, {False: [full, snap], True: [full, ada]}, out_dir=tmp_path / "pairs", progress=False)
    assert len(calls) == len(ss)
    got = {(r.method, r.query_aware, r.sample_id): r.prediction for r in df.itertuples()}
    assert len(got) == len(df) == 4 * len(ss)
    assert {(m, q) for m, q, _ in got} == {("full", False), ("snapkv", False), ("full", True), ("adakv", True)}
    _, grid = run_eval(host, ss, [full, snap, ada], protocols=[False, True], out_dir=tmp_path / "grid", progress=False)
    want = {(r.method, r.query_aware, r.sample_id): r.prediction for r in grid.itertuples()}
    assert all(want[k] == v for k, v in got.items())
    with pytest.raises(ValueError, match="other methods/ratios"):  # a resumed run keeps its pairs
        run_eval(host, ss, {False: [full], True: [full, ada]}, out_dir=tmp_path / "pairs", run_id=df["run_id"][0],
                 progress=False)


def test_costliest_samples_are_handed_out_first(tiny_llama):
    ss = samples(tiny_llama, n=2, length=300) + samples(tiny_llama, n=1, length=500)
    long_answer = runner_mod.Sample(**{**ss[0].__dict__, "sample_id": "long-answer", "max_new_tokens": 99})
    order = runner_mod.by_cost(ss + [long_answer])
    assert order[0] is long_answer and order[1] is ss[2]


def test_samples_decoded_together_equal_each_alone(tiny_llama):
    """`evaluate_samples`: the configs of several samples (different prompts and token limits,
    both protocols, each protocol its own presses) decode as rows of one batch, and each sample
    gets the rows it gets alone."""
    import dataclasses

    host = ModelHost(tiny_llama)
    ss = samples(tiny_llama, n=2, length=300) + samples(tiny_llama, n=1, length=500)
    ss = [dataclasses.replace(s, max_new_tokens=m) for s, m in zip(ss, (3, 7, 5))]
    presses = {False: build_presses(["full", "snapkv"], [0.5]), True: build_presses(["knorm", "adakv"], [0.5, 0.75])}
    together = host.evaluate_samples(ss, presses)
    keep = ["config_id", "sample_id", "prediction", "kv_bytes_kept", "kv_bytes_full", "new_tokens", "context_tokens"]
    for s, rows in zip(ss, together):
        alone = host.evaluate_sample(s, presses)
        assert [{k: r[k] for k in keep} for r in rows] == [{k: r[k] for k in keep} for r in alone]
        assert {r["sample_id"] for r in rows} == {s.sample_id} and len(rows) == 6  # 2 agnostic + 4 aware configs
    assert len({r["new_tokens"] for rows in together for r in rows}) > 1  # the limits differ per sample


def test_stream_admits_samples_as_rows_leave(tiny_llama, monkeypatch):
    """`evaluate_stream`: the next sample is admitted while rows of the last still decode (up
    to `rows`), each sample comes out once, when its last config is done, with the rows it gets
    alone."""
    import dataclasses

    from kvray.generate import ConfigRuns

    host = ModelHost(tiny_llama)
    ss = samples(tiny_llama, n=4, length=300)
    ss = [dataclasses.replace(s, max_new_tokens=m) for s, m in zip(ss, (6, 2, 4, 3))]
    presses = build_presses(["full", "snapkv"], [0.5])
    active_at_add = []
    real_add = ConfigRuns.add

    def add(self, *a, **k):
        active_at_add.append(self.active)
        return real_add(self, *a, **k)

    monkeypatch.setattr(ConfigRuns, "add", add)
    got = list(host.evaluate_stream(ss, presses, rows=4))
    assert sorted(i for i, _ in got) == [0, 1, 2, 3]
    assert active_at_add[:2] == [0, 2]  # the second sample joined the first one's rows
    assert all(a + 2 <= 4 for a in active_at_add)  # never more than `rows`
    keep = ["config_id", "sample_id", "prediction", "kv_bytes_kept", "new_tokens"]
    for i, rows in got:
        alone = host.evaluate_sample(ss[i], presses)
        assert [{k: r[k] for k in keep} for r in rows] == [{k: r[k] for k in keep} for r in alone]


def test_sample_groups_cut_by_configs_and_workers(tiny_llama):
    ss = samples(tiny_llama, n=8, length=300) + samples(tiny_llama, n=4, length=500)
    order = runner_mod.by_cost(ss)
    cases = [(6, 2, 24, 3), (6, 1, 24, 4), (74, 2, 24, 1), (19, 2, 24, 1), (1, 1, 24, 6), (12, 2, 24, 2),
             (19, 1, 64, 3), (74, 2, 64, 1), (6, 1, 64, 6), (40, 1, 64, 1)]
    for n_configs, workers, rows, size in cases:
        groups = runner_mod.sample_groups(ss, n_configs, workers, rows)
        assert [s for g in groups for s in g] == order  # every sample once, the costliest first
        assert max(len(g) for g in groups) == size, (n_configs, workers, rows)
        assert len(groups) >= min(len(ss), 2 * workers)

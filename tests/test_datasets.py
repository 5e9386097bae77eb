"""Dataset loading (kvray.eval.datasets): local Parquet / JSONL files and folders, offline."""

import json
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvray.eval import Sample, load_samples
from kvray.eval.datasets import REQUIRED_COLUMNS, DatasetNotFoundError

ROWS = [
    dict(context="Alice keeps the key under the red pot.\n", question="Where is the key?",
         answer_prefix="Answer:", answer=["under the red pot", "red pot"], max_new_tokens=16),
    dict(context="The train leaves at noon.\n", question="When does the train leave?",
         answer_prefix="Answer:", answer=["noon"], max_new_tokens=8),
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_parquet_round_trip_with_list_answers(tmp_path):
    path = tmp_path / "niah_local.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    samples = load_samples(str(path))
    assert len(samples) == 2 and all(isinstance(s, Sample) for s in samples)
    first = samples[0]
    assert first.context == ROWS[0]["context"] and first.question == ROWS[0]["question"]
    assert first.answer_prefix == "Answer:" and first.answers == ("under the red pot", "red pot")
    assert first.max_new_tokens == 16 and type(first.max_new_tokens) is int
    assert [s.task for s in samples] == ["niah_local", "niah_local"]  # from the file stem
    assert [s.sample_id for s in samples] == ["niah_local-0", "niah_local-1"]
    assert first.metric == "all"


def test_parquet_with_string_answers_and_own_columns(tmp_path):
    path = tmp_path / "mixed.parquet"
    table = pa.table({
        "context": ["c1", "c2", "c3"], "question": ["q1", "q2", "q3"], "answer_prefix": ["", "", "A:"],
        "answer": ["7", "x", "yes"], "max_new_tokens": [4, 5, 6],
        "task": ["qa_1", "niah_single", "qa_1"], "sample_id": ["a", "b", "c"],
    })
    pq.write_table(table, path)
    samples = load_samples(path)
    assert [s.answers for s in samples] == [("7",), ("x",), ("yes",)]
    assert [s.task for s in samples] == ["qa_1", "niah_single", "qa_1"]
    assert [s.sample_id for s in samples] == ["a", "b", "c"]
    assert [s.metric for s in samples] == ["part", "all", "part"]  # RULER scores qa tasks with _part
    only_qa = load_samples(path, task="qa_1")
    assert [s.sample_id for s in only_qa] == ["a", "c"]
    assert [s.sample_id for s in load_samples(path, task="qa_1", limit=1)] == ["a"]
    with pytest.raises(ValueError, match="tasks present: niah_single, qa_1"):
        load_samples(path, task="vt")


def test_jsonl_round_trip_mixed_answers(tmp_path):
    rows = [dict(ROWS[0], answer="under the red pot"), ROWS[1], dict(ROWS[1], answers=["twelve"], metric="part")]
    del rows[2]["answer"]
    path = _write_jsonl(tmp_path / "notes.jsonl", rows)
    samples = load_samples(path, task="renamed")  # no task column: the argument names the task
    assert [s.answers for s in samples] == [("under the red pot",), ("noon",), ("twelve",)]
    assert [s.task for s in samples] == ["renamed"] * 3
    assert samples[2].metric == "part"
    assert load_samples(path, limit=2) == load_samples(path)[:2]


def test_generated_samples_survive_a_round_trip(tmp_path):
    from kvray.eval import make_samples

    samples = make_samples("niah_multivalue", 2, 300, count_tokens=lambda t: len(t.split()))
    records = [dict(context=s.context, question=s.question, answer_prefix=s.answer_prefix,
                    answer=list(s.answers), max_new_tokens=s.max_new_tokens, task=s.task,
                    sample_id=s.sample_id, metric=s.metric, length=s.length) for s in samples]
    pd.DataFrame(records).to_parquet(tmp_path / "gen.parquet")
    _write_jsonl(tmp_path / "gen.jsonl", records)
    assert load_samples(tmp_path / "gen.parquet") == samples
    assert load_samples(tmp_path / "gen.jsonl") == samples


def test_directory_of_files(tmp_path):
    pd.DataFrame(ROWS).to_parquet(tmp_path / "a.parquet")
    _write_jsonl(tmp_path / "b.jsonl", ROWS[:1])
    samples = load_samples(tmp_path)
    assert [s.task for s in samples] == ["a", "a", "b"]
    assert len({s.sample_id for s in samples}) == 3

    hub_like = tmp_path / "hub" / "4096"
    hub_like.mkdir(parents=True)
    pd.DataFrame(ROWS).to_parquet(hub_like / "test-00000-of-00001.parquet")
    pd.DataFrame(ROWS[:1]).to_parquet(hub_like / "train-00000-of-00001.parquet")
    test_split = load_samples(tmp_path / "hub")
    assert len(test_split) == 2 and {s.task for s in test_split} == {"4096"}
    assert len(load_samples(tmp_path / "hub", split="train")) == 1


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "bad.parquet"
    pd.DataFrame([{"context": "c", "question": "q", "answer": "a"}]).to_parquet(path)
    with pytest.raises(ValueError) as err:
        load_samples(path)
    message = str(err.value)
    assert "answer_prefix" in message and "max_new_tokens" in message
    assert "required: " + ", ".join(REQUIRED_COLUMNS) in message

    jsonl = _write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {k: v for k, v in ROWS[1].items() if k != "question"}])
    with pytest.raises(ValueError, match="lacks required column.*question"):
        load_samples(jsonl)


def test_bad_values_are_reported(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ROWS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        load_samples(broken)
    no_answer = _write_jsonl(tmp_path / "empty_answer.jsonl", [dict(ROWS[0], answer=[])])
    with pytest.raises(ValueError, match="row 0"):
        load_samples(no_answer)
    with pytest.raises(ValueError, match="limit"):
        load_samples(broken, limit=0)
    (tmp_path / "data.csv").write_text("context\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\.parquet.*\.jsonl"):
        load_samples(tmp_path / "data.csv")


def test_missing_local_source(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_samples(tmp_path / "nope.parquet")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError, match="no .parquet or .jsonl files"):
        load_samples(empty)


def test_hub_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DatasetNotFoundError) as err:
        load_samples("someone/some-ruler-copy:4096")
    message = str(err.value)
    assert "pip install datasets" in message and ".parquet" in message and ".jsonl" in message
    assert "Hugging Face hub" in message


def test_hub_failure_is_explained(monkeypatch):
    class FakeDatasets:
        @staticmethod
        def load_dataset(name, config, split):
            raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    with pytest.raises(DatasetNotFoundError, match="ConnectionError: no route to host"):
        load_samples("someone/ruler:4096", split="test")


def test_hub_dataset_rows(monkeypatch):
    class FakeDataset(list):
        column_names = list(ROWS[0])

    calls = []

    class FakeDatasets:
        @staticmethod
        def load_dataset(name, config, split):
            calls.append((name, config, split))
            return FakeDataset(ROWS)

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    samples = load_samples("someone/ruler:4096", split="test", limit=1)
    assert calls == [("someone/ruler", "4096", "test")]
    assert len(samples) == 1 and samples[0].task == "ruler" and samples[0].answers == tuple(ROWS[0]["answer"])

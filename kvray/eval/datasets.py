"""Loading evaluation samples from kvpress-style datasets: a local Parquet or JSONL file, a
folder of them, or a Hugging Face hub dataset (`owner/name` or `owner/name:config`)."""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kvray.eval.tasks import Sample

REQUIRED_COLUMNS: tuple[str, ...] = ("context", "question", "answer_prefix", "answer", "max_new_tokens")
OPTIONAL_COLUMNS: tuple[str, ...] = ("task", "sample_id", "metric")
LOCAL_SUFFIXES: tuple[str, ...] = (".parquet", ".jsonl")
_LOCAL_HELP = ("Local sources: a .parquet file, a .jsonl file (one JSON object a line), or a directory "
               "holding such files.")
_SHARD = re.compile(r"^[\w.]+-\d{5}-of-\d{5}$")  # e.g. test-00000-of-00001 (hub exports)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset source could not be read; the message says what was tried."""


def load_samples(source: str | Path, *, split: str = "test", limit: int | None = None,
                 task: str | None = None) -> list[Sample]:
    """Samples from a dataset with kvpress's columns.

    Required columns: context, question, answer_prefix, answer (a string or a list of strings;
    `answers` is accepted too), max_new_tokens. Optional: task (else the file's stem, or the
    dataset's name), sample_id (else `{task}-{row}`), metric ("all" or "part"; else "part" for
    RULER's qa tasks and "all" otherwise).

    `split`: the hub split; in a directory, files named after it (or under a folder named after
    it) are preferred when there are any. `task`: when the data has a task column, keep only
    rows of that task; otherwise it names the task of every row. `limit`: at most this many
    samples (after the task filter)."""
    if limit is not None and (not isinstance(limit, numbers.Integral) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be None (all rows) or a positive integer, got {limit!r}")
    if not isinstance(source, (str, Path)) or not str(source):
        raise ValueError(f"source must be a path or a Hugging Face dataset name, got {source!r}")

    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise ValueError(f"{str(path)!r} is neither .parquet nor .jsonl. {_LOCAL_HELP}")
        tables = [(_default_task(path), *_read_file(path))]
    elif path.is_dir():
        tables = [(_default_task(f), *_read_file(f)) for f in _files_in(path, split)]
    elif path.suffix in LOCAL_SUFFIXES or str(source).startswith((".", "/", "~")):
        raise DatasetNotFoundError(f"dataset file or directory {str(path)!r} does not exist. {_LOCAL_HELP}")
    else:
        tables = [_read_hub(str(source), split)]

    has_task_column = any("task" in columns for _, columns, _, _ in tables)
    samples: list[Sample] = []
    index = 0
    for default_task, columns, rows, where in tables:
        missing = [c for c in REQUIRED_COLUMNS if c not in columns and not (c == "answer" and "answers" in columns)]
        if missing:
            raise ValueError(f"{where} lacks required column(s) {', '.join(missing)}; required: "
                             f"{', '.join(REQUIRED_COLUMNS)} (optional: {', '.join(OPTIONAL_COLUMNS)}); "
                             f"found: {', '.join(sorted(columns)) or 'none'}")
        for row in rows:
            row_index, index = index, index + 1
            row_task = _text(row.get("task")) or default_task
            if task is not None and has_task_column and row_task != task:
                continue
            if task is not None and not has_task_column:
                row_task = task
            samples.append(_to_sample(row, row_task, row_index, where))
            if limit is not None and len(samples) >= limit:
                return samples
    if task is not None and has_task_column and not samples:
        found = sorted({_text(r.get("task")) or d for d, _, rows, _ in tables for r in rows})
        raise ValueError(f"no rows of task {task!r} in {source!s}; tasks present: {', '.join(found)}")
    return samples


# ---------------------------------------------------------------------------- readers

def _default_task(path: Path) -> str:
    """The file's stem, or its folder's name for hub-style shards (test-00000-of-00001)."""
    return path.parent.name if _SHARD.match(path.stem) and path.parent.name else path.stem


def _files_in(directory: Path, split: str) -> list[Path]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise DatasetNotFoundError(f"no .parquet or .jsonl files under {str(directory)!r}. {_LOCAL_HELP}")
    of_split = [p for p in files
                if p.stem == split or p.stem.startswith(f"{split}-") or split in p.relative_to(directory).parts[:-1]]
    return of_split or files


def _read_file(path: Path) -> tuple[set[str], Iterable[dict], str]:
    """-> (column names, rows, a name for messages)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return set(table.column_names), table.to_pylist(), str(path)
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number} is not valid JSON ({exc.msg}); expected one object a line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number} holds a {type(row).__name__}, expected a JSON object a line")
            if "answer" not in row and "answers" in row:
                row["answer"] = row.pop("answers")
            rows.append(row)
    # Columns are those every row has, so a missing field anywhere is reported.
    columns = set.intersection(*(set(r) for r in rows)) if rows else set(REQUIRED_COLUMNS)
    return columns, rows, str(path)


def _read_hub(source: str, split: str) -> tuple[str, set[str], Iterable[dict], str]:
    name, _, config = source.partition(":")
    tried = f"{source!r} is not a local file or directory, so it was taken as a Hugging Face hub dataset"
    try:
        import datasets
    except ImportError:
        raise DatasetNotFoundError(
            f"{tried}, but the `datasets` package is not installed (pip install datasets). {_LOCAL_HELP}"
        ) from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # datasets raises many types (network, missing repo, bad config or split)
        raise DatasetNotFoundError(
            f"{tried} (name {name!r}, config {config or None!r}, split {split!r}) and loading it failed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}. Offline? Download it "
            f"elsewhere and pass the files. {_LOCAL_HELP}"
        ) from exc
    return name.rstrip("/").rsplit("/", 1)[-1], set(ds.column_names), ds, f"hub dataset {source!r}"


# ---------------------------------------------------------------------------- rows

def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def _to_sample(row: dict, task: str, index: int, where: str) -> Sample:
    answer = row["answer"] if "answer" in row else row.get("answers")
    if isinstance(answer, str):
        answers = (answer,)
    elif isinstance(answer, Iterable) and not isinstance(answer, (bytes, dict)):
        answers = tuple(str(a) for a in answer)
    elif answer is None or (isinstance(answer, float) and math.isnan(answer)):
        raise ValueError(f"row {index} of {where} has no answer")
    else:
        answers = (str(answer),)
    max_new = row["max_new_tokens"]
    if isinstance(max_new, numbers.Real) and not isinstance(max_new, bool) and float(max_new).is_integer():
        max_new = int(max_new)
    metric = _text(row.get("metric")) or ("part" if task.startswith("qa") else "all")
    length = row.get("length")
    length = None if length is None or (isinstance(length, float) and math.isnan(length)) else int(length)
    try:
        return Sample(
            context=_text(row["context"]) or "",
            question=_text(row["question"]) or "",
            answer_prefix=_text(row["answer_prefix"]) or "",
            answers=answers,
            max_new_tokens=max_new,
            task=task,
            sample_id=_text(row.get("sample_id")) or f"{task}-{index}",
            metric=metric,
            length=length,
        )
    except ValueError as exc:
        raise ValueError(f"row {index} of {where}: {exc}") from None

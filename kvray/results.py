"""The Parquet results contract: one row per (sample, config), hive-partitioned by run, shards
written atomically (temp file + rename) so a crash never leaves a half file and a rerun with the
same run id skips shards already written."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1

SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")),
    ("kvray_version", pa.string()),
    ("schema_version", pa.int32()),
    ("item_id", pa.string()),           # hash(config_id, sample_id): unique per row of a run
    ("config_id", pa.string()),         # hash(method, params, ratio, plan, protocol)
    ("model", pa.string()),
    ("method", pa.string()),
    ("params", pa.string()),            # JSON
    ("plan_id", pa.string()),
    ("compression_ratio", pa.float64()),  # target
    ("achieved_ratio", pa.float64()),
    ("query_aware", pa.bool_()),
    ("task", pa.string()),
    ("sample_id", pa.string()),
    ("target_length", pa.int64()),      # the generator's target context length; null for datasets
    ("context_tokens", pa.int64()),     # tokens compressed (template + context [+ question in aware])
    ("prediction", pa.string()),
    ("answers", pa.list_(pa.string())),
    ("score", pa.float64()),
    ("kv_bytes_full", pa.int64()),
    ("kv_bytes_kept", pa.int64()),
    ("prefill_s", pa.float64()),
    ("compress_s", pa.float64()),
    ("decode_s", pa.float64()),
    ("new_tokens", pa.int64()),
    ("peak_mem_bytes", pa.int64()),
    ("device", pa.string()),
])

COLUMNS = SCHEMA.names


def short_hash(*parts: object) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


def config_id(method: str, params_json: str, ratio: float, plan_id: str, query_aware: bool) -> str:
    return short_hash(method, params_json, f"{ratio:.6f}", plan_id, int(query_aware))


def press_config_id(press, query_aware: bool) -> str:
    """`config_id` of a press (a `kvray.Press`) in one protocol: the id its eval rows carry."""
    return config_id(press.name, press.params_json(), press.target_ratio, press.plan_id, query_aware)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def run_dir(out_dir: str | os.PathLike, run_id: str) -> Path:
    return Path(out_dir) / f"run_id={run_id}"


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def to_table(rows: list[dict]) -> pa.Table:
    missing = [c for c in COLUMNS if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"result rows lack columns {missing}")
    # run_id is the hive partition key: it lives in the directory name, not in the file
    return pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows], schema=SCHEMA).drop(["run_id"])


def shard_path(out_dir, run_id: str, shard: str) -> Path:
    return run_dir(out_dir, run_id) / f"part-{shard}.parquet"


def shard_exists(out_dir, run_id: str, shard: str) -> bool:
    return shard_path(out_dir, run_id, shard).is_file()


def write_shard(rows: list[dict], out_dir, run_id: str, shard: str) -> Path:
    """Write rows atomically: a temp file in the same directory, then rename over the target."""
    target = shard_path(out_dir, run_id, shard)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(to_table(rows), tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def write_manifest(out_dir, run_id: str, manifest: dict) -> None:
    """Record what a run evaluates; resuming a run id with a different plan of work is refused."""
    path = run_dir(out_dir, run_id) / "_run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, sort_keys=True, indent=1, default=str)
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("work") != manifest.get("work"):
            raise ValueError(
                f"run {run_id!r} in {out_dir} was started with other methods/ratios/tasks/samples; "
                "resume it with the same arguments or pick a new --run-id"
            )
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_results(path: str | os.PathLike, run_id: str | None = None):
    """All rows under `path` (a results root or one run directory) as a pandas DataFrame."""
    import pyarrow.dataset as ds

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results at {path}")
    root = path
    if path.name.startswith("run_id="):
        run_id = run_id or path.name.split("=", 1)[1]
        root = path.parent
    # only the shards of run directories: other Parquet files next to them (Tune trials,
    # calibration curves) have other schemas
    pattern = f"run_id={run_id}/part-*.parquet" if run_id else "run_id=*/part-*.parquet"
    files = sorted(str(p) for p in root.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no result shards under {root}" + (f" for run {run_id}" if run_id else ""))
    dataset = ds.dataset(files, format="parquet", partitioning="hive", partition_base_dir=str(root))
    table = dataset.to_table()
    df = table.to_pandas()
    cols = [c for c in COLUMNS if c in df.columns] + [c for c in df.columns if c not in COLUMNS]
    return df[cols]

"""Parquet tables as the project stores them: one file or a folder of shards, streamed in batches, written
atomically (a reader never sees half a shard; a killed writer leaves only a hidden temporary file)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq


def shard_paths(path: str | os.PathLike) -> list[Path]:
    """The Parquet files of a table (one file, or a folder of shards in name order)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"no table at {p}: expected a .parquet file or a folder of shards")
    return sorted(q for q in p.glob("*.parquet") if not q.name.startswith("."))


def write_table_atomic(table: pa.Table, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def iter_batches(path: str | os.PathLike, batch_size: int = 1024,
                 columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream a table in record batches; memory stays bounded by ``batch_size``."""
    for shard in shard_paths(path):
        yield from pq.ParquetFile(shard).iter_batches(batch_size=batch_size, columns=columns)

"""Streaming Parquet readers and writers for the canonical tables.

Tables are folders of ``part-NNNNN.parquet`` shards so that a stage can stream them, resume at the shard
it stopped in, and hand them to Ray Data (``ray.data.read_parquet(folder)``) unchanged. Each shard is
written to a temporary name and renamed, so a killed writer never leaves a truncated shard behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..utils.parquet import iter_batches, shard_paths, write_table_atomic  # noqa: F401 (the table API)

SHARD_PATTERN = "part-{:05d}.parquet"


def rows_to_table(rows: list[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    columns = {name: [r.get(name) for r in rows] for name in schema.names}
    return pa.table(columns, schema=schema)


class ShardWriter:
    """Writes rows to ``out_dir/part-NNNNN.parquet``, ``rows_per_shard`` rows a shard.

    Memory is bounded by one shard. Use as a context manager so the last partial shard is flushed.
    """

    def __init__(self, out_dir: str | os.PathLike, schema: pa.Schema, rows_per_shard: int = 10_000,
                 start_index: int = 0):
        if rows_per_shard <= 0:
            raise ValueError("rows_per_shard must be positive")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.index = start_index
        self.rows_written = 0
        self.paths: list[Path] = []
        self._buffer: list[Mapping[str, Any]] = []

    def write(self, row: Mapping[str, Any]) -> None:
        self._buffer.append(row)
        if len(self._buffer) >= self.rows_per_shard:
            self.flush()

    def write_many(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.write(row)

    def flush(self) -> None:
        if not self._buffer:
            return
        table = rows_to_table(self._buffer, self.schema)
        self.paths.append(write_table_atomic(table, self.out_dir / SHARD_PATTERN.format(self.index)))
        self.rows_written += len(self._buffer)
        self.index += 1
        self._buffer = []

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.flush()


def write_rows(rows: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike, schema: pa.Schema,
               rows_per_shard: int = 10_000) -> int:
    with ShardWriter(out_dir, schema, rows_per_shard) as writer:
        writer.write_many(rows)
    return writer.rows_written


def iter_rows(path: str | os.PathLike, batch_size: int = 1024,
              columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    for batch in iter_batches(path, batch_size, columns):
        yield from batch.to_pylist()


def read_table(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    files = [str(p) for p in shard_paths(path)]
    if not files:
        raise FileNotFoundError(f"table {path} has no Parquet shards")
    return pads.dataset(files, format="parquet").to_table(columns=columns)


def count_rows(path: str | os.PathLike) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in shard_paths(path))

"""Rows of a table by id without holding the table in memory: what lets the judge and mining join a shard's
query and candidate content while the pool grows with the job.

:func:`build_lookup` copies the id and content columns of a Parquet table, batch by batch, into one Arrow IPC
file plus a sorted id index (two ``.npy`` arrays). :class:`RowLookup` memory-maps both: a process holds only
the pages it touches (shared through the page cache by every actor on the node) and the rows it asked for.
When an id occurs more than once, the last occurrence wins (what a dict built from the rows would hold).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pyarrow import ipc

from ..utils.parquet import iter_batches

# Rows per record batch of a lookup file. A take from a table of several batches concatenates them first (pyarrow
# 26: a copy of the whole column per call), so RowLookup takes batch by batch: big batches keep that loop short,
# and the builder holds one batch, whatever the table's size.
BATCH_ROWS = 1 << 17


def build_lookup(table: str | os.PathLike, path: str | os.PathLike, columns: Sequence[str], strip: str = "") -> Path:
    """Write ``path`` (an Arrow file of ``id`` + ``columns``, each stored without the prefix ``strip``) and its
    id index, atomically; kept when present."""
    path = Path(path)
    if path.is_file() and _index_paths(path)[1].is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    ids, pending = [], []
    writer = schema = None

    def flush() -> None:
        writer.write_table(pa.Table.from_batches(pending, schema).combine_chunks())
        pending.clear()

    for batch in iter_batches(table, batch_size=8192, columns=["id", *columns]):
        batch = batch.rename_columns([c.removeprefix(strip) for c in batch.schema.names])
        if writer is None:
            schema = batch.schema
            writer = ipc.new_file(str(tmp), schema)
        pending.append(batch if batch.schema == schema else batch.cast(schema))
        ids.extend(batch.column(0).to_pylist())
        if sum(b.num_rows for b in pending) >= BATCH_ROWS:
            flush()
    if writer is None:
        raise FileNotFoundError(f"table {table} has no rows to look up")
    if pending:
        flush()
    writer.close()
    keys, rows = sorted_ids(ids)
    keys_path, rows_path = _index_paths(path)
    np.save(keys_path, keys)
    np.save(rows_path, rows)
    os.replace(tmp, path)    # the Arrow file last: its presence means the index is complete
    return path


def sorted_ids(ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(the ids sorted, as UTF-8 bytes; the row number of each): the index :func:`find_rows` searches."""
    keys = np.array([str(i).encode() for i in ids], dtype=bytes) if len(ids) else np.array([], dtype="S1")
    order = np.argsort(keys, kind="stable")
    return keys[order], order.astype(np.int64)


def find_rows(keys: np.ndarray, rows: np.ndarray, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(row of each id, whether it was found) in a :func:`sorted_ids` index; of equal ids, the last row."""
    want = np.array([str(i).encode() for i in ids], dtype=bytes) if len(ids) else np.array([], dtype="S1")
    if not len(keys):
        return np.zeros(len(want), dtype=np.int64), np.zeros(len(want), dtype=bool)
    pos = np.maximum(np.searchsorted(keys, want, side="right") - 1, 0)
    return np.asarray(rows[pos]), keys[pos] == want


def _index_paths(path: Path) -> tuple[Path, Path]:
    return path.with_suffix(".ids.npy"), path.with_suffix(".rows.npy")


class RowLookup:
    """Rows of a :func:`build_lookup` file by id (memory-mapped; cheap to open in every actor)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        reader = ipc.open_file(pa.memory_map(str(self.path)))
        self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self.starts = np.cumsum([0] + [b.num_rows for b in self.batches])
        keys_path, rows_path = _index_paths(self.path)
        self.keys = np.load(keys_path, mmap_mode="r")
        self.rows = np.load(rows_path, mmap_mode="r")

    def find(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(row of each id, whether it was found)."""
        return find_rows(self.keys, self.rows, ids)

    def take(self, ids: Sequence[str], what: str = "id") -> pa.Table:
        """The rows of ``ids``, in that order; a ``KeyError`` names the first id not in the table."""
        rows, found = self.find(ids)
        if not found.all():
            raise KeyError(f"{what} {ids[int(np.argmin(found))]!r} is not in {self.path.name}")
        batch = np.searchsorted(self.starts, rows, side="right") - 1
        order = np.argsort(batch, kind="stable")
        cuts = np.flatnonzero(np.diff(batch[order])) + 1
        parts = [self.batches[batch[g[0]]].take(pa.array(rows[g] - self.starts[batch[g[0]]], type=pa.int64()))
                 for g in np.split(order, cuts) if len(g)]
        grouped = pa.Table.from_batches(parts, self.batches[0].schema).combine_chunks()
        return grouped.take(pa.array(np.argsort(order), type=pa.int64()))    # back to the order of ``ids``

    def columns(self, ids: Sequence[str], prefix: str = "", what: str = "id") -> dict[str, list[Any]]:
        """``{prefix + column: values}`` of ``ids`` (the ``id`` column left out)."""
        t = self.take(ids, what)
        return {f"{prefix}{name}": t.column(name).to_pylist() for name in t.column_names if name != "id"}

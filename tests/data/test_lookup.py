"""The memory-mapped id lookup the judge and mining join content with gives what a dict of the rows would."""

from __future__ import annotations

import pyarrow as pa
import pytest

from unime_ray.data.io import write_table_atomic
from unime_ray.data.lookup import RowLookup, build_lookup


@pytest.mark.parametrize("batch_rows", [4, 1 << 17])     # several record batches in the file, or one
def test_lookup_equals_a_dict_of_the_rows_across_shards(tmp_path, monkeypatch, batch_rows):
    monkeypatch.setattr("unime_ray.data.lookup.BATCH_ROWS", batch_rows)
    rows = [{"id": f"c{i % 7}", "query_text": f"text {i}", "query_image": bytes([i]) if i % 2 else None}
            for i in range(20)]                     # ids repeat: the last occurrence wins, as in a dict
    schema = pa.schema([("id", pa.string()), ("query_text", pa.string()), ("query_image", pa.binary())])
    for part, lo in enumerate(range(0, 20, 6)):
        write_table_atomic(pa.Table.from_pylist(rows[lo:lo + 6], schema=schema),
                           tmp_path / "t" / f"part-{part:05d}.parquet")
    path = build_lookup(tmp_path / "t", tmp_path / "t.arrow", ["query_text", "query_image"], strip="query_")
    as_dict = {r["id"]: r for r in rows}
    ids = ["c3", "c0", "c3", "c6", "c5", "c1", "c2", "c4", "c0"]
    got = RowLookup(path).columns(ids, "cand_")
    assert got == {"cand_text": [as_dict[i]["query_text"] for i in ids],
                   "cand_image": [as_dict[i]["query_image"] for i in ids]}
    assert build_lookup(tmp_path / "elsewhere", path, ["query_text"]) == path    # built once, then kept
    with pytest.raises(KeyError, match="candidate 'c9'"):
        RowLookup(path).take(["c1", "c9"], what="candidate")
    assert RowLookup(path).take([]).num_rows == 0
    _, found = RowLookup(path).find(["c2", "nope", "c6"])
    assert found.tolist() == [True, False, True]


"""What keeps S2-S3 memory bounded by a shard gives what the whole-table versions gave: the memory-mapped id lookup
(a dict of the rows) and the streamed JSON list (``json.dumps`` of the list)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from unime_ray.data.io import write_table_atomic
from unime_ray.data.lookup import RowLookup, build_lookup


def test_lookup_equals_a_dict_of_the_rows_across_shards(tmp_path):
    rows = [{"id": f"c{i % 7}", "query_text": f"text {i}", "query_image": bytes([i]) if i % 2 else None}
            for i in range(20)]                     # ids repeat: the last occurrence wins, as in a dict
    schema = pa.schema([("id", pa.string()), ("query_text", pa.string()), ("query_image", pa.binary())])
    for part, lo in enumerate(range(0, 20, 6)):
        write_table_atomic(pa.Table.from_pylist(rows[lo:lo + 6], schema=schema),
                           tmp_path / "t" / f"part-{part:05d}.parquet")
    path = build_lookup(tmp_path / "t", tmp_path / "t.arrow", ["query_text", "query_image"], strip="query_")
    as_dict = {r["id"]: r for r in rows}
    ids = ["c3", "c0", "c3", "c6"]
    got = RowLookup(path).columns(ids, "cand_")
    assert got == {"cand_text": [as_dict[i]["query_text"] for i in ids],
                   "cand_image": [as_dict[i]["query_image"] for i in ids]}
    assert build_lookup(tmp_path / "elsewhere", path, ["query_text"]) == path    # built once, then kept
    with pytest.raises(KeyError, match="candidate 'c9'"):
        RowLookup(path).take(["c1", "c9"], what="candidate")
    _, found = RowLookup(path).find(["c2", "nope", "c6"])
    assert found.tolist() == [True, False, True]


def test_streamed_json_list_equals_json_dumps_of_the_list(tmp_path):
    import numpy as np

    from unime_ray.utils.files import write_json_atomic, write_json_list_atomic

    for items in ([], [{}], [{"a": [1, {"b": "x\ny é"}], "c": np.float32(0.5)}, [], [1, 2], "s", {"n": None}]):
        write_json_atomic(items, tmp_path / "whole.json", ensure_ascii=False)
        assert write_json_list_atomic(iter(items), tmp_path / "streamed.json", ensure_ascii=False) == len(items)
        assert (tmp_path / "streamed.json").read_bytes() == (tmp_path / "whole.json").read_bytes()

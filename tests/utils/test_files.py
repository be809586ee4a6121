"""Files written whole: the streamed JSON list (a training table's export, one record in memory at a time) is
byte for byte what ``json.dumps`` of the whole list gives."""

from __future__ import annotations


def test_streamed_json_list_equals_json_dumps_of_the_list(tmp_path):
    import numpy as np

    from unime_ray.utils.files import write_json_atomic, write_json_list_atomic

    for items in ([], [{}], [{"a": [1, {"b": "x\ny é"}], "c": np.float32(0.5)}, [], [1, 2], "s", {"n": None}]):
        write_json_atomic(items, tmp_path / "whole.json", ensure_ascii=False)
        assert write_json_list_atomic(iter(items), tmp_path / "streamed.json", ensure_ascii=False) == len(items)
        assert (tmp_path / "streamed.json").read_bytes() == (tmp_path / "whole.json").read_bytes()

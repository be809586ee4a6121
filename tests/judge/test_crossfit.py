"""Cross-fitting of the stand-in judge: queries sharing content share a fold; folds split and merge shards."""

from __future__ import annotations

import pyarrow as pa
import pytest
import pyarrow.parquet as pq

from unime_ray.data.io import read_table, write_table_atomic
from unime_ray.judge.crossfit import fold_of, group_key, merge_score_tables, scoring_judge, split_candidates
from unime_ray.retrieval.stage import CANDIDATES_TABLE_SCHEMA


def test_queries_of_one_image_share_a_fold_and_folds_balance():
    i2t = {"id": "a", "query_image_path": "img/1F600.png", "pos_text": "grinning face"}
    t2i = {"id": "b", "query_text": "grinning face", "pos_image_path": "img/1F600.png"}
    cls = {"id": "c", "query_image_path": "img/1F600.png", "pos_text": "face-smiling"}
    assert group_key(i2t) == group_key(t2i) == group_key(cls)
    assert len({fold_of(r, 2) for r in (i2t, t2i, cls)}) == 1
    folds = [fold_of({"query_image_path": f"img/{i}.png"}, 2) for i in range(2000)]
    assert 900 < sum(folds) < 1100                       # about half in each fold
    assert [scoring_judge(f, 3) for f in range(3)] == [1, 2, 0]   # never a fold's own judge


def test_split_and_merge_keep_shard_names_and_rows(tmp_path):
    rows = [{"query_id": f"q{i}", "task": "t", "pos_id": f"p{i}", "pos_similarity": 0.5, "cand_ids": [f"c{i}"],
             "cand_scores": [0.1], "n_dropped": 0} for i in range(10)]
    for part in range(2):
        write_table_atomic(pa.Table.from_pylist(rows[part * 5:(part + 1) * 5], schema=CANDIDATES_TABLE_SCHEMA),
                           tmp_path / "cands" / f"part-{part:05d}.parquet")
    assignment = {f"q{i}": i % 2 for i in range(10)}
    split = split_candidates(tmp_path / "cands", assignment, 2, tmp_path / "split")
    for f, d in split.items():
        got = read_table(d).column("query_id").to_pylist()
        assert got and all(assignment[q] == f for q in got)
        assert sorted(p.name for p in (tmp_path / "split" / f"fold{f}").iterdir()) == ["part-00000.parquet",
                                                                                       "part-00001.parquet"]
    merged = merge_score_tables(list(split.values()), tmp_path / "merged")
    assert sorted(read_table(merged).column("query_id").to_pylist()) == sorted(r["query_id"] for r in rows)
    assert pq.read_table(tmp_path / "merged" / "part-00001.parquet").num_rows == 5


def test_positive_auc_counts_wins_and_half_ties(tmp_path):
    from unime_ray.judge.crossfit import positive_auc, score_summary

    rows = [("q1", True, 0.9, None), ("q1", False, 0.5, None), ("q1", False, 0.9, None), ("q1", False, 0.95, None),
            ("q2", True, 0.2, None), ("q2", False, 0.1, None), ("q2", False, 0.7, "bad image"),
            ("q3", True, None, "unreadable"), ("q3", False, 0.1, None)]
    t = pa.table({"query_id": [r[0] for r in rows], "is_positive": [r[1] for r in rows],
                  "score": [r[2] for r in rows], "error": [r[3] for r in rows]})
    write_table_atomic(t, tmp_path / "scores" / "part-00000.parquet")
    # q1: win, tie, loss; q2: win (the errored candidate is skipped); q3: no usable positive
    assert positive_auc(tmp_path / "scores") == (1 + 0.5 + 0 + 1) / 4
    summary = score_summary(tmp_path / "scores")
    assert summary["mean_score_positive"] == pytest.approx((0.9 + 0.2) / 2)
    assert summary["mean_score_candidates"] == pytest.approx((0.5 + 0.9 + 0.95 + 0.1 + 0.1) / 5)

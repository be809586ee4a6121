"""The hard-negative rule on hand-made cases, and the mining stage (accounting, resume, official export)."""

from __future__ import annotations

import json

import pytest

from unime_ray.mining import cyclic_order, mine_query, sample_hard_negatives

C = [f"c{i}" for i in range(12)]


def test_cyclic_order():
    assert cyclic_order(12, 5) == [0, 5, 10, 1, 6, 11, 2, 7, 3, 8, 4, 9]
    assert cyclic_order(3, 5) == [0, 1, 2]
    assert cyclic_order(7, 1) == list(range(7))
    with pytest.raises(ValueError):
        cyclic_order(3, 0)


def test_all_survive_takes_cyclic_order():
    scores = [0.1] * 12
    out = sample_hard_negatives(C, scores, positive_score=0.9)
    assert [c for c, _ in out] == ["c0", "c5", "c10", "c1", "c6", "c11", "c2", "c7", "c3", "c8"]
    assert all(s == 0.1 for _, s in out)


def test_filter_boundary():
    # s_pos - beta = 0.5: a score of exactly 0.5 survives (only s > 0.5 is dropped); 0.5000001 is dropped
    cands = ["a", "b", "c", "d"]
    scores = [0.5000001, 0.5, 0.2, 0.9]
    out = mine_query(cands, scores, positive_score=0.51, num_negatives=2, beta=0.01, interval=5)
    assert out.false_negatives == 2 and out.survivors == 2
    assert out.negatives == [("b", 0.5), ("c", 0.2)]


def test_survivors_keep_rank_order_and_stride():
    # ranks 0..11; the even ranks are false negatives -> survivors c1, c3, ..., c11 (6 of them)
    scores = [0.95 if i % 2 == 0 else 0.3 for i in range(12)]
    out = sample_hard_negatives(C, scores, positive_score=0.9, num_negatives=6, interval=5)
    # survivor positions 0..5 = c1 c3 c5 c7 c9 c11; order 0,5,1,2,3,4
    assert [c for c, _ in out] == ["c1", "c11", "c3", "c5", "c7", "c9"]


def test_fewer_survivors_repeat_the_order():
    out = sample_hard_negatives(["A", "B", "X"], [0.2, 0.1, 0.99], positive_score=0.5, num_negatives=5)
    assert [c for c, _ in out] == ["A", "B", "A", "B", "A"]
    out = sample_hard_negatives(C[:7], [0.0] * 7, positive_score=0.5, num_negatives=10, interval=5)
    # order over 7 survivors: 0,5,1,6,2,3,4 then again from the start
    assert [c for c, _ in out] == ["c0", "c5", "c1", "c6", "c2", "c3", "c4", "c0", "c5", "c1"]


def test_no_survivors_falls_back_to_seeded_random_with_score():
    scores = [0.99] * 12
    a = mine_query(C, scores, positive_score=0.5, seed=3)
    b = mine_query(C, scores, positive_score=0.5, seed=3)
    c = mine_query(C, scores, positive_score=0.5, seed=4)
    assert a.fallback and a.negatives == b.negatives and a.negatives != c.negatives
    assert len(a.negatives) == 10 and len({x for x, _ in a.negatives}) == 10  # distinct when possible
    assert all(s == 1.0 for _, s in a.negatives) and set(x for x, _ in a.negatives) <= set(C)
    few = mine_query(["p", "q"], [0.9, 0.8], positive_score=0.1, num_negatives=5, fallback_score=0.7)
    assert few.fallback and len(few.negatives) == 5 and {x for x, _ in few.negatives} == {"p", "q"}
    assert all(s == 0.7 for _, s in few.negatives)
    assert mine_query([], [], 0.5).negatives == []


def test_bad_arguments():
    with pytest.raises(ValueError):
        mine_query(["a"], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError):
        mine_query(["a"], [0.1], 0.5, num_negatives=0)


# ---------------------------------------------------------------------------------------------- the stage
def _write(path, rows, schema):
    from unime_ray.data.io import write_table_atomic, rows_to_table

    write_table_atomic(rows_to_table(rows, schema), path)


def test_mining_stage_accounts_resumes_and_exports(tmp_path):
    from unime_ray.data.convert import import_pairs
    from unime_ray.data.io import read_table
    from unime_ray.data.schema import CANDIDATE_SCHEMA, PAIR_SCHEMA, empty_row
    from unime_ray.judge.stage import SCORES_SCHEMA
    from unime_ray.mining.config import MineConfig
    from unime_ray.mining.stage import run_mining
    from unime_ray.retrieval.stage import CANDIDATES_TABLE_SCHEMA

    pool = [dict(empty_row(CANDIDATE_SCHEMA), id=f"c{i}", task="t", text=f"candidate {i}") for i in range(6)]
    pool.append(dict(empty_row(CANDIDATE_SCHEMA), id="pos0", task="t", text="answer zero"))
    pool.append(dict(empty_row(CANDIDATE_SCHEMA), id="pos1", task="t", text="answer one"))
    _write(tmp_path / "pool" / "part-00000.parquet", pool, CANDIDATE_SCHEMA)
    pairs, cands, scores = [], [], []
    for q in range(2):
        qid = f"q{q}"
        pairs.append(dict(empty_row(PAIR_SCHEMA), id=qid, task="t", query_text=f"question {q}", pos_id=f"pos{q}",
                          pos_text=f"answer {'zero' if q == 0 else 'one'}"))
        cands.append({"query_id": qid, "task": "t", "pos_id": f"pos{q}", "pos_similarity": 0.9,
                      "cand_ids": ["c0", "c1", "c2", "c3"], "cand_scores": [0.8, 0.7, 0.6, 0.5], "n_dropped": 0})
    judged = {("q0", "pos0"): 0.8, ("q0", "c0"): 0.95, ("q0", "c1"): 0.3, ("q0", "c2"): 0.795, ("q0", "c3"): 0.1,
              ("q1", "pos1"): float("nan"), ("q1", "c0"): 0.2, ("q1", "c1"): 0.2, ("q1", "c2"): 0.2,
              ("q1", "c3"): 0.2}
    for (qid, cid), s in judged.items():
        scores.append({"query_id": qid, "cand_id": cid, "is_positive": cid.startswith("pos"), "score": s,
                       "error": "image file not found" if s != s else None, "judge": "j", "prompt_version": "v"})
    # q2 in a second shard: its candidate c3 could not be judged
    pairs2 = [dict(empty_row(PAIR_SCHEMA), id="q2", task="t", query_text="question 2", pos_id="pos0",
                   pos_text="answer zero")]
    cands2 = [{"query_id": "q2", "task": "t", "pos_id": "pos0", "pos_similarity": 0.5,
               "cand_ids": ["c3", "c4", "c5"], "cand_scores": [0.4, 0.3, 0.2], "n_dropped": 0}]
    scores2 = [{"query_id": "q2", "cand_id": c, "is_positive": c == "pos0", "score": s, "error": e, "judge": "j",
                "prompt_version": "v"} for c, s, e in [("pos0", 0.6, None), ("c3", float("nan"), "bad"),
                                                        ("c4", 0.1, None), ("c5", 0.2, None)]]
    for name, p, c, s in (("part-00000.parquet", pairs, cands, scores), ("part-00001.parquet", pairs2, cands2,
                                                                          scores2)):
        _write(tmp_path / "pairs" / name, p, PAIR_SCHEMA)
        _write(tmp_path / "cands" / name, c, CANDIDATES_TABLE_SCHEMA)
        _write(tmp_path / "scores" / name, s, SCORES_SCHEMA)

    settings = MineConfig(num_negatives=4, beta=0.01, interval=2)
    args = (tmp_path / "cands", tmp_path / "scores", tmp_path / "pairs", tmp_path / "pool", tmp_path / "mine",
            settings)
    out = run_mining(*args)
    assert (out["queries"], out["mined"], out["quarantined"]) == (3, 2, 1)
    assert out["false_negatives"] == 2 and out["unscored_candidates"] == 1 and out["fallbacks"] == 0
    rows = {r["id"]: r for r in read_table(tmp_path / "mine" / "train").to_pylist()}
    # q0: survivors (s <= 0.79) in rank order c1, c3 -> order [0,1] over 2 survivors, repeated
    assert rows["q0"]["neg_id"] == ["c1", "c3", "c1", "c3"]
    assert rows["q0"]["neg_score"] == [0.3, 0.1, 0.3, 0.1] and rows["q0"]["pos_score"] == 0.8
    assert rows["q0"]["neg_text"] == ["candidate 1", "candidate 3", "candidate 1", "candidate 3"]
    assert rows["q2"]["neg_id"] == ["c4", "c5", "c4", "c5"]
    q = read_table(tmp_path / "mine" / "quarantine").to_pylist()
    assert [r["query_id"] for r in q] == ["q1"] and "image file not found" in q[0]["reason"]

    # the official JSON export carries the same negatives and scores, and imports back as a training table
    official = json.loads((tmp_path / "mine" / "train_official.json").read_text())
    assert [rec["hard_negatives_scores"] for rec in official] == [[0.3, 0.1, 0.3, 0.1], [0.1, 0.2, 0.1, 0.2]]
    acc = import_pairs(tmp_path / "mine" / "train_official.json", "official", tmp_path / "reimported",
                       quarantine_path=tmp_path / "rq.parquet")
    assert acc.rows_out == 2 and acc.rows_quarantined == 0

    # killed after the first shard: the rerun writes the missing shard only; the output is identical
    before = read_table(tmp_path / "mine" / "train").to_pylist()
    (tmp_path / "mine" / "train" / "part-00001.parquet").unlink()
    (tmp_path / "mine" / "stats" / "part-00001.parquet.json").unlink()
    again = run_mining(*args)
    assert read_table(tmp_path / "mine" / "train").to_pylist() == before
    assert again["mined"] == out["mined"] and again["queries"] == 3

"""Sharded FAISS search against brute force, the delta rule, and the resumable retrieval stage."""

from __future__ import annotations

import numpy as np
import pytest

from unime_ray.data.io import read_table
from unime_ray.models.encode import EmbedderSpec, read_embeddings
from unime_ray.retrieval import (RetrieveConfig, ShardedIndex, brute_force_topk, run_retrieval, search_topk,
                                 select_candidates)
from unime_ray.utils.pool import Pool


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_data(n=1200, nq=40, d=24, seed=0):
    rng = np.random.default_rng(seed)
    return _unit(rng.standard_normal((nq, d))), _unit(rng.standard_normal((n, d)))


def clustered_data(n=3000, nq=60, d=32, clusters=20, seed=1):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)) * 3
    c = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d)) * 0.5
    q = centres[rng.integers(0, clusters, nq)] + rng.standard_normal((nq, d)) * 0.5
    return _unit(q), _unit(c)


def numpy_reference(q, c, k):
    """Independent reference: a Python sort of every (score, id) pair."""
    sims = q.astype(np.float64) @ c.astype(np.float64).T
    ids = np.array([sorted(range(c.shape[0]), key=lambda j: (-sims[i, j], j))[:k] for i in range(len(q))])
    return np.take_along_axis(sims, ids, axis=1), ids


def assert_same_topk(ids, scores, ref_ids, ref_scores, eps=1e-5):
    """Equal ids and scores; inside a run of scores equal within float32 rounding, the order may differ
    (faiss and numpy round differently), so those runs compare as sets."""
    np.testing.assert_allclose(scores, ref_scores, atol=eps)
    for row in range(len(ids)):
        start = 0
        k = len(ids[row])
        while start < k:
            end = start + 1
            while end < k and abs(ref_scores[row, end] - ref_scores[row, end - 1]) < eps:
                end += 1
            if end == k and end - start > 1:  # a near-tie at the cut: compare by true score only
                break
            assert set(ids[row, start:end]) == set(ref_ids[row, start:end]), (row, start, end)
            start = end


@pytest.mark.parametrize("data", [random_data, clustered_data])
@pytest.mark.parametrize("num_shards", [1, 3, 8])
@pytest.mark.parametrize("k", [1, 50, 500])
def test_sharded_flat_search_equals_brute_force(data, num_shards, k):
    q, c = data()
    scores, ids = search_topk(q, c, k, num_shards=num_shards)
    ref_scores, ref_ids = numpy_reference(q, c, k)
    assert scores.shape == ids.shape == (len(q), k)
    assert_same_topk(ids, scores, ref_ids, ref_scores)
    assert np.all(np.diff(scores, axis=1) <= 1e-7)  # descending
    true = np.take_along_axis(q.astype(np.float64) @ c.astype(np.float64).T, ids, axis=1)
    np.testing.assert_allclose(scores, true, atol=1e-5)  # each returned score is that id's similarity
    b_scores, b_ids = brute_force_topk(q, c, k)
    assert_same_topk(ids, scores, b_ids, b_scores)


def test_k_larger_than_shards_and_pool():
    q, c = random_data(n=10, nq=3)
    scores, ids = search_topk(q, c, 25, num_shards=4)   # shards of 2-3 vectors, k > every shard and the pool
    ref_scores, ref_ids = numpy_reference(q, c, 10)
    np.testing.assert_array_equal(ids[:, :10], ref_ids)
    assert (ids[:, 10:] == -1).all() and np.isneginf(scores[:, 10:]).all()


def test_ties_break_by_lower_id():
    c = _unit(np.array([[1, 0], [0, 1], [1, 0], [1, 0]], dtype=np.float32))
    q = _unit(np.array([[1, 0]], dtype=np.float32))
    _, ids = search_topk(q, c, 4, num_shards=2)
    assert ids[0].tolist() == [0, 2, 3, 1]


def test_ivf_recall_on_clustered_data_and_save_load(tmp_path):
    q, c = clustered_data(n=4000, nq=50)
    flat_ids = search_topk(q, c, 20)[1]
    index = ShardedIndex.build(c, RetrieveConfig(index_kind="ivf", num_shards=2, nlist=32, nprobe=8))
    ivf_ids = index.search(q, 20)[1]
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(flat_ids, ivf_ids)])
    assert recall >= 0.9
    index.save(tmp_path / "idx")
    again = ShardedIndex.load(tmp_path / "idx")
    np.testing.assert_array_equal(again.search(q, 20)[1], ivf_ids)
    with pytest.raises(FileNotFoundError):
        ShardedIndex.load(tmp_path / "nothing")


def test_search_errors():
    q, c = random_data(n=20, nq=2)
    with pytest.raises(ValueError, match="dim"):
        ShardedIndex.build(c).search(q[:, :5], 3)
    with pytest.raises(ValueError, match="kind"):
        RetrieveConfig(index_kind="hnsw")


# ------------------------------------------------------------------------------------------ the delta rule
IDS = ["a", "pos", "b", "c", "d", "e"]
SCORES = np.array([0.9, 0.8, 0.8, 0.7, 0.5, 0.1], dtype=np.float32)


def test_delta_positive_drops_at_or_above_and_never_keeps_the_positive():
    s = RetrieveConfig(top_k=3, delta="positive")
    ids, scores, dropped = select_candidates(IDS, SCORES, "pos", 0.8, s)
    # top-3 without the positive: a (0.9), b (0.8), c (0.7); a and b are >= 0.8 -> dropped
    assert ids == ["c"] and dropped == 2
    assert scores == pytest.approx([0.7])


def test_delta_fill_keeps_top_k_below_threshold():
    s = RetrieveConfig(top_k=3, delta="positive", fill=True)
    ids, _, dropped = select_candidates(IDS, SCORES, "pos", 0.8, s)
    assert ids == ["c", "d", "e"] and dropped == 2


def test_delta_fixed_and_none():
    assert select_candidates(IDS, SCORES, "pos", 0.8, RetrieveConfig(top_k=4, delta=0.6))[0] == ["d"]
    ids, _, dropped = select_candidates(IDS, SCORES, "pos", 0.8, RetrieveConfig(top_k=4, delta=None))
    assert ids == ["a", "b", "c", "d"] and dropped == 0
    with pytest.raises(ValueError):
        RetrieveConfig(delta="median")


# ------------------------------------------------------------------------------------------ the stage
@pytest.fixture(scope="module")
def synthetic_split(tmp_path_factory):
    from unime_ray.demo.data import make_demo_data

    out = tmp_path_factory.mktemp("syn")
    make_demo_data(out, source="synthetic", max_items=40, rows_per_shard=25, progress=False)
    return out


def _check_candidates(out_dir, pairs_dir, settings):
    table = read_table(out_dir / "candidates").to_pylist()
    pairs = {r["id"]: r for r in read_table(pairs_dir).to_pylist()}
    assert sorted(r["query_id"] for r in table) == sorted(pairs)  # one row per query, none lost or duplicated
    q_ids, q_vecs = read_embeddings(out_dir / "query_embeddings")
    c_ids, c_vecs = read_embeddings(out_dir / "candidate_embeddings")
    qv, cv = dict(zip(q_ids, q_vecs)), dict(zip(c_ids, c_vecs))
    for r in table:
        p = pairs[r["query_id"]]
        assert r["pos_id"] == p["pos_id"] and r["pos_id"] not in r["cand_ids"]
        pos_sim = float(qv[r["query_id"]] @ cv[p["pos_id"]])
        assert r["pos_similarity"] == pytest.approx(pos_sim, abs=1e-5)
        assert all(s < pos_sim + 1e-6 for s in r["cand_scores"])
        assert len(r["cand_ids"]) <= settings.top_k
        assert r["cand_scores"] == sorted(r["cand_scores"], reverse=True)
        for cid, s in zip(r["cand_ids"], r["cand_scores"]):
            assert float(qv[r["query_id"]] @ cv[cid]) == pytest.approx(s, abs=1e-5)
        # brute force over the task's pool: the kept candidates are exactly the top ones below delta
        pool = [cid for cid in cv if cid != p["pos_id"] and cid.split(":")[0] == p["task"]]
        sims = sorted(((float(qv[r["query_id"]] @ cv[cid]), cid) for cid in pool), key=lambda t: (-t[0], t[1]))
        expected = [cid for s, cid in sims if s < pos_sim][: settings.top_k]
        assert r["cand_ids"] == expected
    return table


def test_retrieval_stage_matches_brute_force_and_resumes(tiny_models, synthetic_split, tmp_path):
    spec = EmbedderSpec(model=str(tiny_models["qwen2_vl"]), dtype="float32", image_root=str(synthetic_split))
    settings = RetrieveConfig(top_k=5, delta="positive", fill=True, num_shards=3, search_batch_size=7)
    pairs, cands = synthetic_split / "train" / "pairs", synthetic_split / "train" / "candidates"
    out = tmp_path / "ret"
    stats = run_retrieval(pairs, cands, out, spec, settings, pool=Pool.in_process(8))
    assert stats["queries"] == 3 * 32 and stats["pools"] == 3
    first = _check_candidates(out, pairs, settings)

    # Kill mid-way: lose one query-embedding shard and one output shard; the rerun redoes only those.
    (out / "query_embeddings" / "part-00001.parquet").unlink()
    (out / "candidates" / "part-00001.parquet").unlink()
    (out / "candidates" / "part-00002.parquet").unlink()
    (out / "index" / "shapes_i2t" / "vectors.npy").unlink()    # an index saved before the searchers' vectors file
    again = run_retrieval(pairs, cands, out, spec, settings, pool=Pool.in_process(8))
    assert again["query_embedding"]["rows_embedded"] == 25
    assert again["candidate_embedding"]["rows_embedded"] == 0
    assert again["search"]["shards_written"] == 2
    second = _check_candidates(out, pairs, settings)
    assert (out / "index" / "shapes_i2t" / "vectors.npy").is_file()
    assert sorted(first, key=lambda r: r["query_id"]) == sorted(second, key=lambda r: r["query_id"])


def test_retrieval_stage_on_ray_equals_local(tiny_models, ray_local, synthetic_split, tmp_path):
    spec = EmbedderSpec(model=str(tiny_models["qwen2_vl"]), dtype="float32", image_root=str(synthetic_split))
    settings = RetrieveConfig(top_k=4, delta="positive", fill=False, pool="global", search_actors=1)
    pairs = synthetic_split / "train" / "pairs"
    local = run_retrieval(pairs, None, tmp_path / "local", spec, settings)
    ray_run = run_retrieval(pairs, None, tmp_path / "ray", spec, settings, pool=Pool())
    assert local["pools"] == ray_run["pools"] == 1
    # which node searched what: every shard once, on the one node of this local Ray
    assert list(ray_run["search"]["shards_per_node"].values()) == [ray_run["search"]["shards_written"]]
    a = {r["query_id"]: r for r in read_table(tmp_path / "local" / "candidates").to_pylist()}
    b = {r["query_id"]: r for r in read_table(tmp_path / "ray" / "candidates").to_pylist()}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["cand_ids"] == b[k]["cand_ids"] and a[k]["n_dropped"] == b[k]["n_dropped"]
        assert a[k]["pos_id"] not in a[k]["cand_ids"]


def test_build_indexes_groups_by_the_pool_rows_last_wins_and_names_a_missing_one(tmp_path):
    """Each embedding goes to its pool row's task (an id listed twice: its last row, as a dict of the rows);
    an embedding without a pool row is an error naming it. The searchers find positives by id in each pool."""
    import pyarrow as pa

    from unime_ray.data.io import write_table_atomic
    from unime_ray.data.lookup import find_rows
    from unime_ray.data.schema import CANDIDATE_SCHEMA
    from unime_ray.models.encode import embeddings_table
    from unime_ray.retrieval.stage import SearchActor, build_indexes

    ids = [f"c{i}" for i in range(6)]
    vectors = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    pool = {"id": [*ids[:5], "c0"], "task": ["a", "b", "a", "b", "a", "b"]}       # c5 missing, c0 twice
    write_table_atomic(pa.table({f.name: pool.get(f.name, [None] * 6) for f in CANDIDATE_SCHEMA},
                                schema=CANDIDATE_SCHEMA), tmp_path / "pool" / "part-00000.parquet")
    write_table_atomic(embeddings_table(ids, vectors), tmp_path / "emb" / "part-00000.parquet")
    with pytest.raises(KeyError, match="candidate 'c5' has an embedding but no row"):
        build_indexes(tmp_path / "emb", tmp_path / "pool", tmp_path / "index", RetrieveConfig(top_k=2))
    write_table_atomic(embeddings_table(ids[:5], vectors[:5]), tmp_path / "emb" / "part-00000.parquet")
    groups = build_indexes(tmp_path / "emb", tmp_path / "pool", tmp_path / "index", RetrieveConfig(top_k=2))
    assert {g: read_table(f"{folder}/vectors", ["id"]).column("id").to_pylist() for g, folder in groups.items()} == {
        "a": ["c2", "c4"], "b": ["c0", "c1", "c3"]}
    searcher = SearchActor(str(tmp_path / "index"), RetrieveConfig(top_k=2).model_dump())
    at, found = find_rows(*searcher.positions["b"], ["zz", "c3"])
    assert found.tolist() == [False, True]
    np.testing.assert_array_equal(searcher.groups["b"][2][at[1]], vectors[3])

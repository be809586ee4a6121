"""The Ray Data embedding stage and the staged, resumable pipeline on a local Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unime_ray.run.config import load_run_config
from unime_ray.data.io import ShardWriter, count_rows, read_table
from unime_ray.data.schema import CANDIDATE_SCHEMA
from unime_ray.models.encode import EmbedderSpec, embed_table, read_embeddings
from unime_ray.utils.pool import Pool

from ..conftest import make_png


@pytest.fixture(scope="module")
def candidate_table(tmp_path_factory):
    out = tmp_path_factory.mktemp("cands") / "table"
    with ShardWriter(out, CANDIDATE_SCHEMA, rows_per_shard=7) as w:
        for i in range(20):
            img = make_png(30 + i, 30, seed=i) if i % 2 else None
            w.write({"id": f"c{i:03d}", "task": "t", "instruction": "Represent:", "text": f"item number {i}",
                     "image": img, "image_path": None})
    return out


def _as_dict(path):
    ids, vecs = read_embeddings(path)
    return dict(zip(ids, vecs))


def test_ray_embedding_equals_local_and_resumes(tiny_models, ray_local, candidate_table, tmp_path):
    spec = EmbedderSpec(model=str(tiny_models["qwen2_vl"]), dtype="float32")
    local = embed_table(spec.build(), candidate_table, tmp_path / "local", pool=Pool.in_process(4))
    assert local["rows_embedded"] == 20 and local["shards_written"] == 3
    stats = embed_table(spec, candidate_table, tmp_path / "ray", pool=Pool(batch_size=4, min_actors=1, max_actors=2))
    assert stats["rows_embedded"] == 20 and stats["shards_written"] == 3
    a, b = _as_dict(tmp_path / "local"), _as_dict(tmp_path / "ray")
    assert sorted(a) == sorted(b) == [f"c{i:03d}" for i in range(20)]
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5)
        assert abs(np.linalg.norm(b[k]) - 1) < 1e-5

    # A killed run: one shard's output missing and a stray temporary file. Rerun redoes just that shard.
    (tmp_path / "ray" / "part-00001.parquet").unlink()
    (tmp_path / "ray" / ".part-00001.parquet.tmp-999").write_bytes(b"partial")
    again = embed_table(spec, candidate_table, tmp_path / "ray", pool=Pool(batch_size=4))
    assert again["shards_written"] == 1 and again["rows_embedded"] == 7
    c = _as_dict(tmp_path / "ray")
    assert sorted(c) == sorted(a)  # nothing lost, nothing duplicated
    for k in a:
        np.testing.assert_allclose(a[k], c[k], atol=1e-5)
    # Complete: a rerun does nothing.
    assert embed_table(spec, candidate_table, tmp_path / "ray", pool=Pool())["rows_embedded"] == 0


def _run(tmp_path, *overrides):
    from unime_ray.run.runner import run_pipeline

    # training has its own tests (test_train_embedder.py); these exercise the data stages and their resume, with
    # the pools in process (on Ray they give the same tables: test_ray_embedding_equals_local_and_resumes)
    cfg = load_run_config(preset="synthetic", overrides=[f"run_dir={tmp_path / 'run'}", "data.max_items=40",
                                                         "models.tiny.vocab_size=512", "embed.pool.ray=false",
                                                         "judge.pool.ray=false",
                                                         "stages=[data, models, prepare, embed, retrieve, judge, "
                                                         "mine, report]", *overrides])
    return cfg, run_pipeline(cfg)


# the data stages only: S1-S3's resume is tests/test_pipeline_resume.py's, the whole chain test_pipeline_full.py's
DATA_STAGES = "stages=[data, models, prepare, embed, report]"


def test_pipeline_runs_resumes_and_accounts(tiny_models, ray_local, tmp_path):
    cfg, manifest = _run(tmp_path, DATA_STAGES)
    stages = manifest.data["stages"]
    assert [stages[s]["status"] for s in ("data", "models", "prepare", "embed", "report")] == ["complete"] * 5
    tables = stages["prepare"]["outputs"]["tables"]
    for name, acc in tables.items():
        assert acc["rows_in"] == acc["rows_out"] + acc["rows_quarantined"]
        assert count_rows(acc["path"]) == acc["rows_out"]
    emb = stages["embed"]["outputs"]["tables"]
    ids, vecs = read_embeddings(emb["eval_pairs"]["path"])
    assert sorted(ids) == sorted(read_table(tables["eval_pairs"]["path"], ["id"]).column("id").to_pylist())
    assert vecs.shape == (len(ids), 64)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Row accounting" in report and "eval_candidates" in report
    assert stages["models"]["outputs"]["tokenizer_corpus_texts"] > 0

    # A rerun skips every completed stage (their start times do not change).
    started = {k: v["started"] for k, v in stages.items()}
    _, manifest2 = _run(tmp_path, DATA_STAGES)
    for name in ("data", "models", "prepare", "embed"):
        assert manifest2.data["stages"][name]["started"] == started[name]

    # Changing the embed section reruns only embedding.
    _, manifest3 = _run(tmp_path, DATA_STAGES, "embed.pool.batch_size=5")
    s3 = manifest3.data["stages"]
    assert s3["embed"]["started"] != started["embed"]
    assert s3["data"]["started"] == started["data"] and s3["prepare"]["started"] == started["prepare"]


def test_pipeline_quarantines_bad_official_rows(tiny_models, ray_local, tmp_path):
    root = tmp_path / "imgs"
    (root / "images" / "T").mkdir(parents=True)
    (root / "images" / "T" / "ok.png").write_bytes(make_png(30, 30))
    (root / "images" / "T" / "bad.png").write_bytes(b"not an image")
    good = {"query_text": "<|image_1|>\nRepresent the given image\n", "query_image": "images/T/ok.png",
            "pos_text": "a caption", "pos_image": "", "query_pos_scores": 0.7,
            "hard_negatives": [["other caption", ""]], "hard_negatives_scores": [0.2]}
    records = [good, {**good, "query_image": "images/T/bad.png"}, {**good, "query_image": "images/T/none.png"},
               {**good, "query_text": "", "query_image": ""}, dict(good)]
    train = tmp_path / "train.json"
    train.write_text(json.dumps(records))
    cfg, manifest = _run(tmp_path, "data.source=official", f"data.train_path={train}",
                         f"data.image_root={root}", "embed.tables=[train_pairs]", "models.tiny.make=false",
                         "mine.from_imported=remine",   # S1 runs on the imported rows, so the embed stage embeds them
                         f"models.embedder={tiny_models['qwen2_vl']}", f"models.judge={tiny_models['qwen2_5_vl']}")
    acc = manifest.data["stages"]["prepare"]["outputs"]["tables"]["train_pairs"]
    assert (acc["rows_in"], acc["rows_out"], acc["rows_quarantined"]) == (5, 2, 3)
    q = read_table(tmp_path / "run" / "prepare" / "quarantine" / "train_pairs.parquet").to_pylist()
    assert sorted(r["row"] for r in q) == [1, 2, 3]
    assert {r["field"] for r in q} == {"query_image_path", "query_text"}
    assert all(r["source"] == str(train) for r in q)
    assert manifest.data["stages"]["embed"]["outputs"]["tables"]["train_pairs"]["rows_embedded"] == 2


def test_pipeline_rejects_unknown_model(tmp_path):
    from unime_ray.models.backbone import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="no-such-org/model"):
        _run(tmp_path, "models.tiny.make=false", "models.embedder=no-such-org/model",
             "models.judge=no-such-org/model", "stages=[data, models]")

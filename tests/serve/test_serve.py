"""The serving application: index build, Serve app over real HTTP on loopback, security and limits.

One application is started for the module (tiny models, a 20-candidate index in two partitions, an API
key); results are checked against the same models called in-process.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import contextlib
import os
import secrets
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from tests.conftest import make_png
from unime_ray.data.io import rows_to_table, write_table_atomic
from unime_ray.data.schema import CANDIDATE_SCHEMA, Item
from unime_ray.serve.config import (ApiKeyError, AutoscalingSettings, DeploymentSettings, LimitsConfig,
                                    ServeConfig, api_key_digest, check_api_key, read_api_key)

KEY_ENV = "UNIME_TEST_SERVE_KEY"
APP_NAME = "unime-test"
N_CANDIDATES = 20
TOL = 1e-5


# ------------------------------------------------------------------------------------------ data
def candidate_rows(image_root: Path) -> list[dict]:
    """20 candidates: texts, inline images, two images stored by path, two tasks."""
    image_root.mkdir(parents=True, exist_ok=True)
    words = ["red car", "blue circle", "green square", "yellow triangle", "small dog", "tall tree", "old house",
             "fast train", "white cloud", "black cat"]
    rows = []
    for i in range(N_CANDIDATES):
        row = {"id": f"cand-{i:02d}", "task": "captions" if i % 2 else "objects", "instruction": "",
               "text": f"a photo of a {words[i % len(words)]} number {i}", "image": None, "image_path": None}
        if i % 4 == 1:
            row["image"] = make_png(36 + i, 30, seed=100 + i)
            row["instruction"] = "Represent the given image."
        if i in (6, 14):
            name = f"img-{i}.png"
            (image_root / name).write_bytes(make_png(40, 40, seed=200 + i))
            row["image_path"] = name
        rows.append(row)
    return rows


def item_of(row: dict, image_root: Path) -> Item:
    image = row["image"] or ((image_root / row["image_path"]).read_bytes() if row["image_path"] else None)
    return Item(text=row["text"] or "", instruction=row["instruction"] or "", image=image)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def built_index(tiny_models, tmp_path_factory):
    from unime_ray.models.encode import EmbedderSpec
    from unime_ray.serve.index import build_serving_index
    from unime_ray.utils.pool import Pool

    root = tmp_path_factory.mktemp("serve")
    image_root = root / "images"
    rows = candidate_rows(image_root)
    cands = root / "candidates"
    write_table_atomic(rows_to_table(rows[:12], CANDIDATE_SCHEMA), cands / "part-00000.parquet")
    write_table_atomic(rows_to_table(rows[12:], CANDIDATE_SCHEMA), cands / "part-00001.parquet")
    spec = EmbedderSpec(model=str(tiny_models["qwen2_vl"]), dtype="float32", image_root=str(image_root))
    manifest = build_serving_index(cands, root / "index", spec, num_shards=2, pool=Pool.in_process(8))
    return {"root": root, "rows": rows, "image_root": image_root, "candidates": cands, "index": root / "index",
            "manifest": manifest}


@pytest.fixture(scope="module")
def reference(tiny_models, built_index):
    """The same models, in this process."""
    from unime_ray.models import Embedder
    from unime_ray.serve.deployments import RERANK_IMPL, reranker_implementation

    embedder = Embedder.from_pretrained(tiny_models["qwen2_vl"], dtype="float32")
    if reranker_implementation() == RERANK_IMPL:
        from unime_ray.rerank import Reranker

        score_pairs = Reranker.from_pretrained(tiny_models["qwen2_5_vl"], dtype="float32", batch_size=32).score_pairs
    else:
        from unime_ray.judge.hf_backend import TransformersJudge

        score_pairs = TransformersJudge(tiny_models["qwen2_5_vl"], dtype="float32", batch_size=32).score
    items = [item_of(r, built_index["image_root"]) for r in built_index["rows"]]
    return {"embedder": embedder, "score_pairs": score_pairs, "items": items,
            "vectors": embedder.encode(items, batch_size=8)}


@contextlib.contextmanager
def running_app(app_name: str, key_env: str, config: dict, index: Path, reranker: Path | None = None):
    """A Serve app on a free loopback port, its API key in ``key_env``; yields {url, key, auth}, then removes it."""
    from ray import serve

    from unime_ray.serve.app import build_app

    key = secrets.token_urlsafe(24)
    old = os.environ.get(key_env)
    os.environ[key_env] = key
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        args = {"index": str(index), "config": {**config, "api_key_env": key_env}}
        if reranker is not None:
            args["reranker"] = str(reranker)
        serve.run(build_app(args), name=app_name, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the serve application did not come up")
            time.sleep(0.5)
        yield {"url": url, "key": key, "auth": {"Authorization": f"Bearer {key}"}}
    finally:
        serve.delete(app_name)
        serve.shutdown()
        if old is None:
            os.environ.pop(key_env, None)
        else:
            os.environ[key_env] = old


FUSION_WEIGHT = 0.3


@pytest.fixture(scope="module")
def validated_reranker(tiny_models, tmp_path_factory):
    """A copy of the tiny reranker whose folder records a validation in fused mode (as the pipeline's eval
    writes it): the server reranks in that mode with that weight."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("reranker") / "model"
    shutil.copytree(tiny_models["qwen2_5_vl"], folder)
    (folder / "rerank_validation.json").write_text(json.dumps(
        {"used": True, "mode": "fused", "weight": FUSION_WEIGHT, "reason": "fixture: validated in fused mode"}))
    return folder


@pytest.fixture(scope="module")
def server(ray_local, tiny_models, built_index, validated_reranker):
    config = {
        "limits": {"max_body_bytes": 300_000, "max_image_bytes": 200_000, "max_image_pixels": 160 * 160,
                   "max_top_k": 30, "max_rerank_top_k": 10, "max_embed_items": 8, "max_text_chars": 2000},
        "ingress": {"num_cpus": 0},
        "embedder": {"num_cpus": 0, "dtype": "float32", "max_batch_size": 8, "batch_wait_timeout_s": 0.01},
        "index": {"num_cpus": 0, "partitions": 2},
        "reranker": {"num_cpus": 0, "dtype": "float32", "max_batch_size": 4},
    }
    with running_app(APP_NAME, KEY_ENV, config, built_index["index"], validated_reranker) as app:
        yield {**app, "config": {**config, "api_key_env": KEY_ENV}}


@pytest.fixture(scope="module")
def client(server):
    from unime_ray.serve.client import UniMEClient

    return UniMEClient(server["url"], api_key=server["key"])


def post(server, path, payload=None, data=None, headers=None, auth=True):
    h = dict(server["auth"]) if auth else {}
    h.update(headers or {})
    return requests.post(server["url"] + path, json=payload, data=data, headers=h, timeout=60)


def expected_search(reference, query: Item, k: int):
    q = reference["embedder"].encode([query])[0]
    sims = reference["vectors"] @ q
    order = np.argsort(-sims, kind="stable")[:k]
    return order, sims[order]


# ------------------------------------------------------------------------------------------ config (no Ray)
def test_serve_config_defaults_and_validation(tmp_path, monkeypatch):
    from pydantic import ValidationError

    cfg = ServeConfig()
    assert cfg.host == "127.0.0.1" and not cfg.auth_enabled
    with pytest.raises(ValidationError, match="extra"):
        ServeConfig(prot=1)
    with pytest.raises(ValidationError, match="extra"):
        ServeConfig(embedder={"max_batch_szie": 4})
    with pytest.raises(ValidationError, match="min_replicas"):
        AutoscalingSettings(min_replicas=3, max_replicas=2)
    opts = DeploymentSettings(num_replicas=3, num_cpus=0.5, num_gpus=1).deployment_options()
    assert opts["num_replicas"] == 3 and opts["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 1}
    auto = DeploymentSettings(autoscaling={"min_replicas": 1, "max_replicas": 4}).deployment_options()
    assert "num_replicas" not in auto and auto["autoscaling_config"]["max_replicas"] == 4
    # batching deployments hold at least two batches of requests
    assert ServeConfig(embedder={"max_batch_size": 32}).embedder.deployment_options()["max_ongoing_requests"] == 64

    # API key: env var, then file; configured but missing -> refuse to start
    monkeypatch.delenv("UNIME_X_KEY", raising=False)
    with pytest.raises(ApiKeyError):
        read_api_key(ServeConfig(api_key_env="UNIME_X_KEY"))
    monkeypatch.setenv("UNIME_X_KEY", " s3cret \n")
    assert read_api_key(ServeConfig(api_key_env="UNIME_X_KEY")) == "s3cret"
    keyfile = tmp_path / "key"
    keyfile.write_text("filekey\n")
    assert read_api_key(ServeConfig(api_key_file=str(keyfile))) == "filekey"
    with pytest.raises(ApiKeyError):
        read_api_key(ServeConfig(api_key_file=str(tmp_path / "missing")))
    digest = api_key_digest("filekey")
    assert check_api_key("filekey", digest)
    assert not check_api_key("filekeY", digest) and not check_api_key("", digest) and not check_api_key(None, digest)


def test_load_serve_config_from_run_config_yaml(tmp_path):
    from unime_ray.serve.app import load_serve_config

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run_dir": "x", "serve": {"port": 9001, "embedder": {"max_batch_size": 4}}}))
    cfg = load_serve_config({"embedder": {"num_cpus": 0}}, path)
    assert cfg.port == 9001 and cfg.embedder.max_batch_size == 4 and cfg.embedder.num_cpus == 0
    bare = tmp_path / "serve.yaml"
    bare.write_text(yaml.safe_dump({"host": "127.0.0.1", "limits": {"max_top_k": 7}}))
    assert load_serve_config(None, bare).limits.max_top_k == 7


def test_serve_config_yaml_is_valid_for_ray():
    import importlib
    import inspect

    from ray.serve.schema import ServeDeploySchema

    from unime_ray.serve.app import AppArgs

    path = Path(__file__).resolve().parents[2] / "unime_ray" / "serve" / "serve_config.yaml"
    raw = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host == "127.0.0.1"
    [app] = schema.applications
    module, _, attr = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder) and len(inspect.signature(builder).parameters) == 1
    args = AppArgs.model_validate(app.args)
    cfg = ServeConfig(**args.config)
    assert cfg.api_key_env == "UNIME_API_KEY" and cfg.host == "127.0.0.1"
    assert "api_key" not in args.config and "api_key" not in ServeConfig.model_fields  # names only, never keys


def test_request_validation_helpers():
    from unime_ray.serve.api import (QueryIn, RequestError, SearchRequest, check_search, decode_base64_image,
                                     rerank_order, to_item)

    limits = LimitsConfig(max_image_bytes=5000, max_image_pixels=60 * 60, max_top_k=10, max_rerank_top_k=5)
    png = make_png(40, 30)
    assert decode_base64_image(b64(png), limits) == png
    assert decode_base64_image("data:image/png;base64," + b64(png), limits) == png
    for bad, status in (("%%%", 422), ("data:image/png," + b64(png), 422), (b64(b"x" * 6000), 413)):
        with pytest.raises(RequestError) as err:
            decode_base64_image(bad, limits)
        assert err.value.status == status and err.value.message
    for q, status in ((QueryIn(), 422), (QueryIn(instruction="only an instruction"), 422),
                      (QueryIn(image=b64(make_png(70, 70))), 413), (QueryIn(image=b64(b"not an image")), 422),
                      (QueryIn(image=b64(make_png(40, 30)[:60])), 422), (QueryIn(image=b64(make_png(1, 300))), 422)):
        with pytest.raises(RequestError) as err:
            to_item(q, limits)
        assert err.value.status == status, (q, err.value.message)
    assert to_item(QueryIn(text="x", image=b64(png)), limits).image == png
    assert check_search(SearchRequest(query=QueryIn(text="x"), top_k=3), limits, can_rerank=False) == 0
    assert check_search(SearchRequest(query=QueryIn(text="x"), top_k=3, rerank=True), limits, can_rerank=True) == 3
    with pytest.raises(RequestError, match="without a reranker"):
        check_search(SearchRequest(query=QueryIn(text="x"), rerank=True), limits, can_rerank=False)
    with pytest.raises(RequestError, match="top_k"):
        check_search(SearchRequest(query=QueryIn(text="x"), top_k=11), limits, can_rerank=True)
    # reranked head by score (ties keep embedder order, unscored last)
    assert rerank_order("pairwise", [0.9, 0.8, 0.7, 0.6], [0.1, 0.9, None, 0.9]) == [1, 3, 0, 2]
    assert rerank_order("listwise", [0.9, 0.8, 0.7], [None] * 3, choice=2) == [2, 0, 1]


def test_rerank_plan_follows_the_folders_validation(tmp_path):
    """A reranker is served only if its folder records that it beat the embedder alone (or the guard is turned
    off), in the recorded mode and weight unless the settings name others."""
    import json

    from unime_ray.serve.app import rerank_plan
    from unime_ray.serve.config import RerankerSettings

    none = rerank_plan(tmp_path, RerankerSettings())
    assert not none["use"] and "records no validation" in none["reason"] and none["mode"] == "pairwise"
    assert rerank_plan(tmp_path, RerankerSettings(require_validation=False))["use"]
    (tmp_path / "rerank_validation.json").write_text(json.dumps({"used": False, "mode": "listwise", "weight": 0.2,
                                                                 "reason": "hurt on the dev split"}))
    refused = rerank_plan(tmp_path, RerankerSettings())
    assert not refused["use"] and refused["reason"].startswith("hurt on the dev split")
    (tmp_path / "rerank_validation.json").write_text(json.dumps({"used": True, "mode": "fused", "weight": 0.2,
                                                                 "reason": "helped"}))
    assert rerank_plan(tmp_path, RerankerSettings()) == {"use": True, "mode": "fused", "weight": 0.2,
                                                         "reason": "helped"}
    other = rerank_plan(tmp_path, RerankerSettings(mode="pairwise", fusion_weight=0.7))
    assert (other["mode"], other["weight"]) == ("pairwise", 0.7) and "validated in fused mode" in other["reason"]


def test_partitions_merge_exactly(tmp_path):
    from unime_ray.retrieval.config import RetrieveConfig
    from unime_ray.retrieval.index import ShardedIndex, brute_force_topk
    from unime_ray.serve.index import FAISS_DIR, load_partition, partition_shards

    assert partition_shards(5, 2) == [[0, 1], [2, 3, 4]] and partition_shards(3, 3) == [[0], [1], [2]]
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(103, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ShardedIndex.build(vecs, RetrieveConfig(num_shards=5)).save(tmp_path / FAISS_DIR)
    queries = vecs[:4] + 0.1
    ref_s, ref_i = brute_force_topk(queries, vecs, 7)
    parts = [load_partition(tmp_path, p, 3) for p in range(3)]
    assert sum(p.ntotal for p in parts) == 103
    got = [p.search(queries, 7) for p in parts]
    scores, ids = np.concatenate([g[0] for g in got], 1), np.concatenate([g[1] for g in got], 1)
    for q in range(4):
        order = sorted(range(scores.shape[1]), key=lambda j: (-scores[q, j], ids[q, j]))[:7]
        assert [int(ids[q, j]) for j in order] == ref_i[q].tolist()
        np.testing.assert_allclose(scores[q, order], ref_s[q], atol=1e-6)


# ------------------------------------------------------------------------------------------ index build
def test_index_layout_and_vectors(built_index, reference, tiny_models):
    from unime_ray.models.encode import read_embeddings
    from unime_ray.serve.index import MetadataStore, load_manifest

    m = load_manifest(built_index["index"])
    assert m["count"] == N_CANDIDATES and m["dim"] == 64 and m["index"]["num_shards"] == 2
    assert m["embedder"]["model"] == str(tiny_models["qwen2_vl"]) and m["embedder"]["dtype"] == "float32"
    assert m["image_root"] == str(built_index["image_root"].resolve())
    ids, vectors = read_embeddings(built_index["index"] / "embeddings")
    assert ids == [r["id"] for r in built_index["rows"]]
    np.testing.assert_allclose(vectors, reference["vectors"], atol=TOL)
    meta = MetadataStore(built_index["index"], built_index["image_root"])
    rows = meta.rows([6, 1, 0], with_image=True)
    assert [r["id"] for r in rows] == ["cand-06", "cand-01", "cand-00"]
    assert rows[0]["image"] == (built_index["image_root"] / "img-6.png").read_bytes()
    assert rows[1]["image"] == built_index["rows"][1]["image"] and rows[2]["image"] is None
    assert "image" not in meta.rows([1])[0] or meta.rows([1])[0]["image"] is None


def test_cli_register_and_index_command(built_index, tiny_models, tmp_path, capsys):
    from unime_ray.serve.cli import register
    from unime_ray.serve.index import load_manifest

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "idx"
    args = parser.parse_args(["index", "--model", str(tiny_models["qwen2_vl"]), "--candidates",
                              str(built_index["candidates"]), "--out", str(out), "--no-ray", "--dtype", "float32",
                              "--image-root", str(built_index["image_root"]), "--kind", "flat"])
    assert args.func(args) == 0
    assert load_manifest(out)["count"] == N_CANDIDATES
    assert "serving index" in capsys.readouterr().out
    s = parser.parse_args(["serve", "--index", str(out), "--port", "8123", "-o", "embedder.max_batch_size=4"])
    assert s.func.__name__ == "cmd_serve" and s.host is None
    from unime_ray.serve.cli import _serve_config

    cfg = _serve_config(s)
    assert cfg.host == "127.0.0.1" and cfg.port == 8123 and cfg.embedder.max_batch_size == 4
    # a public bind address without an API key is refused before anything starts
    s = parser.parse_args(["serve", "--index", str(out), "--host", "0.0.0.0"])
    assert s.func(s) == 2
    assert "refusing" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ over HTTP
def test_health_and_info(server, client):
    assert requests.get(server["url"] + "/healthz", timeout=10).json() == {"status": "ok"}  # open, no key
    info = client.info()
    assert info["index"]["count"] == N_CANDIDATES and info["index"]["dim"] == 64
    assert info["index"]["partitions"] == 2 and info["auth"] is True
    from unime_ray.serve.deployments import reranker_implementation

    assert info["reranker"]["implementation"] == reranker_implementation() and info["embedder"]["dim"] == 64
    assert (info["reranker"]["mode"], info["reranker"]["fusion_weight"]) == ("fused", FUSION_WEIGHT)
    spec = requests.get(server["url"] + "/openapi.json", timeout=10).json()
    assert {"/v1/search", "/v1/embed", "/v1/info", "/healthz", "/readyz"} <= set(spec["paths"])
    ready = client.readiness()      # open like /healthz; every deployment of the app, all running
    assert ready["ready"] is True and ready["not_ready"] == []
    assert set(ready["deployments"]) == {"QueryEmbedder", "CandidateIndex0", "CandidateIndex1", "Reranker"}
    assert "SearchRequest" in spec["components"]["schemas"]


@pytest.mark.parametrize("kind", ["text", "image", "text+image"])
def test_search_matches_in_process(client, reference, built_index, kind):
    png = make_png(48, 40, seed=7)
    query = {"text": Item(text="a photo of a red car"),
             "image": Item(image=png),
             "text+image": Item(text="what is this?", instruction="Represent the given image with the following "
                                "question:", image=png)}[kind]
    got = client.search(text=query.text or None, instruction=query.instruction or None, image=query.image, top_k=7)
    order, sims = expected_search(reference, query, 7)
    rows = built_index["rows"]
    assert [h["id"] for h in got["results"]] == [rows[i]["id"] for i in order]
    np.testing.assert_allclose([h["score"] for h in got["results"]], sims, atol=TOL)
    first = got["results"][0]
    assert first["rank"] == 1 and first["rerank_score"] is None and got["reranked"] is False
    row = rows[order[0]]
    assert first["text"] == row["text"] and first["task"] == row["task"] and first["image"] is None
    assert first["image_path"] == row["image_path"]


def test_search_top_k_larger_than_pool(client):
    got = client.search(text="a small dog", top_k=30)["results"]
    assert len(got) == N_CANDIDATES and len({h["id"] for h in got}) == N_CANDIDATES


def test_rerank_matches_in_process(client, reference, built_index):
    """The served order is the eval's: the eval's reranking function (eval.rerank.rerank_modes) in the mode and
    weight the reranker's validation recorded, on the same top-8 with the same cosines."""
    from types import SimpleNamespace

    from unime_ray.eval.rerank import rerank_modes

    png = make_png(44, 44, seed=3)
    query = Item(text="a photo of a black cat", image=png)
    got = client.search(text=query.text, image=png, top_k=5, rerank=True, rerank_top_k=8, include_image=True)
    assert got["reranked"] is True
    order, sims = expected_search(reference, query, 8)
    cands = [reference["items"][i] for i in order]
    p_yes = reference["score_pairs"]([(query, c) for c in cands])
    evaluated = rerank_modes(SimpleNamespace(score_pairs=reference["score_pairs"]), [query], [cands],
                             [list(range(8))], 8, ["fused"], similarities=[list(sims)], weight=FUSION_WEIGHT)
    new = evaluated["fused"].orders[0][:5]
    fused = (1 - FUSION_WEIGHT) * sims + FUSION_WEIGHT * p_yes
    assert new == sorted(range(8), key=lambda j: (-fused[j], j))[:5]           # and by the formula itself
    rows = built_index["rows"]
    assert [h["id"] for h in got["results"]] == [rows[order[j]]["id"] for j in new]
    np.testing.assert_allclose([h["rerank_score"] for h in got["results"]], p_yes[new], atol=TOL)
    np.testing.assert_allclose([h["score"] for h in got["results"]], sims[new], atol=TOL)
    assert [h["embed_rank"] for h in got["results"]] == [j + 1 for j in new]
    for h, j in zip(got["results"], new):   # images come back only when asked (inline or read from the root)
        it = cands[j]
        assert (base64.b64decode(h["image"]) if h["image"] else None) == it.image


def test_rerank_keeps_tail_in_embedder_order(client, reference, built_index):
    got = client.search(text="a tall tree", top_k=6, rerank=True, rerank_top_k=3)["results"]
    order, _ = expected_search(reference, Item(text="a tall tree"), 6)
    rows = built_index["rows"]
    assert {h["id"] for h in got[:3]} == {rows[i]["id"] for i in order[:3]}
    assert [h["id"] for h in got[3:]] == [rows[i]["id"] for i in order[3:]]
    assert all(h["rerank_score"] is not None for h in got[:3]) and all(h["rerank_score"] is None for h in got[3:])


def test_embed_matches_in_process(client, reference):
    png = make_png(50, 30, seed=11)
    items = [Item(text="hello world"), Item(image=png, instruction="Represent the given image."),
             Item(text="a red car", image=png)]
    got = client.embed([{"text": it.text or None, "instruction": it.instruction or None, "image": it.image}
                        for it in items])
    np.testing.assert_allclose(got, reference["embedder"].encode(items), atol=TOL)
    assert got.dtype == np.float32 and got.shape == (3, 64)


def test_openai_embeddings_with_the_official_client(server, reference):
    """POST /v1/embeddings with the `openai` client: texts (its default base64 encoding and float), and vLLM's
    multimodal messages form; the same vectors as the embedder in this process; the same auth and 4xx."""
    import base64

    import openai

    api = openai.OpenAI(base_url=server["url"] + "/v1", api_key=server["key"], max_retries=0)
    texts = ["hello world", "a red car"]
    want = reference["embedder"].encode([Item(text=t) for t in texts])
    for fmt in ({}, {"encoding_format": "float"}):   # by default the client asks for base64 and decodes it
        res = api.embeddings.create(model="unime", input=texts, **fmt)
        got = np.array([d.embedding for d in res.data], dtype=np.float32)
        np.testing.assert_allclose(got, want, atol=TOL)
        assert [d.index for d in res.data] == [0, 1] and res.model == "unime"
    raw = api.embeddings.create(model="unime", input=texts, encoding_format="base64").data[0].embedding
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(raw), dtype="<f4"), want[0], atol=TOL)
    one = api.embeddings.create(model="unime", input="hello world")
    np.testing.assert_allclose(one.data[0].embedding, want[0], atol=TOL)
    png = make_png(50, 30, seed=11)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    r = post(server, "/v1/embeddings", {"model": "unime", "messages": [
        {"role": "system", "content": "Represent the given image."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
    assert r.status_code == 200, r.text
    ref = reference["embedder"].encode([Item(text="<image>", image=png, instruction="Represent the given image.")])
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], ref[0], atol=TOL)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).embeddings.create(
            model="unime", input="x")
    with pytest.raises(openai.UnprocessableEntityError, match="64-dimensional"):
        api.embeddings.create(model="unime", input="x", dimensions=32)
    bad = [({"input": []}, "empty list"), ({"input": "x", "messages": []}, "either input"),
           ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                        "image_url": {"url": "http://x/a.png"}}]}]}, "data: URL"),
           ({"input": ["x"] * 9}, "more than the limit")]
    for payload, message in bad:
        r = post(server, "/v1/embeddings", payload)
        assert r.status_code in (413, 422) and message in r.json()["detail"], (payload, r.text)


def test_rerank_endpoint_scores_documents_as_the_reranker_does(server, reference):
    """POST /v1/rerank (Cohere/Jina shape): P(Yes) per document as the reranker in this process gives it, sorted,
    top_n, documents echoed on request; texts or items with images; the same auth and 4xx."""
    png = make_png(44, 44, seed=3)
    docs = ["a photo of a black cat", "a red car", {"text": "a cat", "image": base64.b64encode(png).decode()}]
    r = post(server, "/v1/rerank", {"model": "m", "query": "a black cat", "documents": docs, "top_n": 2,
                                    "return_documents": True})
    assert r.status_code == 200, r.text
    want = reference["score_pairs"]([(Item(text="a black cat"), Item(text="a photo of a black cat")),
                                     (Item(text="a black cat"), Item(text="a red car")),
                                     (Item(text="a black cat"), Item(text="a cat", image=png))])
    order = sorted(range(3), key=lambda i: (-want[i], i))[:2]
    got = r.json()["results"]
    assert [x["index"] for x in got] == order and r.json()["model"] == "m"
    np.testing.assert_allclose([x["relevance_score"] for x in got], want[order], atol=TOL)
    assert got[0]["document"]["text"] == (docs[order[0]] if isinstance(docs[order[0]], str) else "a cat")
    assert requests.post(server["url"] + "/v1/rerank", json={"query": "q", "documents": ["d"]},
                         timeout=30).status_code == 401
    for payload, status, message in [({"query": "q", "documents": []}, 422, "documents"),
                                      ({"query": "q", "documents": ["d"] * 11}, 413, "more than the limit"),
                                      ({"query": "", "documents": ["d"]}, 422, "empty")]:
        r = post(server, "/v1/rerank", payload)
        assert r.status_code == status and message in r.json()["detail"], (payload, r.text)


def test_auth(server):
    url = server["url"]
    payload = {"query": {"text": "a red car"}, "top_k": 2}
    assert requests.post(url + "/v1/search", json=payload, timeout=30).status_code == 401
    r = requests.post(url + "/v1/search", json=payload, headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 401 and "API key" in r.json()["detail"]
    r = requests.post(url + "/v1/search", json=payload, headers={"Authorization": server["key"]}, timeout=30)
    assert r.status_code == 401   # the key without the Bearer scheme
    assert requests.get(url + "/v1/info", timeout=30).status_code == 401
    assert requests.post(url + "/v1/embed", json={"items": [{"text": "x"}]}, timeout=30).status_code == 401
    # an unauthenticated bad request is answered 401, before its body is looked at
    assert requests.post(url + "/v1/search", data="{not json", timeout=30).status_code == 401
    assert post(server, "/v1/search", payload).status_code == 200


def test_bad_inputs_are_4xx_with_a_message(server):
    from ray import serve

    def deployment_replicas():
        st = serve.status().applications[APP_NAME]
        return st.status, {n: d.status for n, d in st.deployments.items()}

    png = make_png(40, 30)
    huge_pixels = make_png(170, 170, seed=1)            # 28,900 px > 160*160, 413
    cases = [
        ("invalid JSON", dict(data="{\"query\": ", headers={"Content-Type": "application/json"}), 400),
        ("JSON not an object", dict(payload=[1, 2]), 422),
        ("missing query", dict(payload={"top_k": 3}), 422),
        ("unknown field", dict(payload={"query": {"text": "x"}, "topk": 3}), 422),
        ("wrong type", dict(payload={"query": {"text": "x"}, "top_k": "many"}), 422),
        ("bad base64", dict(payload={"query": {"image": "not*base64!"}}), 422),
        ("corrupt image bytes", dict(payload={"query": {"image": b64(b"\x89PNG\r\n\x1a\nnot really")}}), 422),
        ("truncated image", dict(payload={"query": {"image": b64(png[: len(png) // 2])}}), 422),
        ("extreme aspect ratio", dict(payload={"query": {"image": b64(make_png(1, 250))}}), 422),
        ("empty query", dict(payload={"query": {}}), 422),
        ("blank text", dict(payload={"query": {"text": "   "}}), 422),
        ("top_k 0", dict(payload={"query": {"text": "x"}, "top_k": 0}), 422),
        ("top_k too large", dict(payload={"query": {"text": "x"}, "top_k": 31}), 422),
        ("rerank_top_k too large", dict(payload={"query": {"text": "x"}, "rerank": True, "rerank_top_k": 11}), 422),
        ("too many pixels", dict(payload={"query": {"image": b64(huge_pixels)}}), 413),
        ("image too many bytes", dict(payload={"query": {"text": "x", "image": b64(os.urandom(210_000))}}), 413),
        ("text too long", dict(payload={"query": {"text": "x" * 2001}}), 413),
        ("body too large", dict(payload={"query": {"text": "x" * 400_000}}), 413),
    ]
    failures = []
    for name, kw, status in cases:
        r = post(server, "/v1/search", kw.get("payload"), data=kw.get("data"), headers=kw.get("headers"))
        detail = r.json().get("detail") if r.headers.get("content-type", "").startswith("application/json") else None
        if r.status_code != status or not detail:
            failures.append((name, r.status_code, r.text[:200]))
    embed_cases = [
        ("no items", {"items": []}, 422),
        ("too many items", {"items": [{"text": "x"}] * 9}, 413),
        ("one bad item", {"items": [{"text": "ok"}, {"image": "@@"}]}, 422),
        ("one empty item", {"items": [{"text": "ok"}, {}]}, 422),
    ]
    for name, payload, status in embed_cases:
        r = post(server, "/v1/embed", payload)
        if r.status_code != status or not r.json().get("detail"):
            failures.append((name, r.status_code, r.text[:200]))
    assert not failures, failures
    # a body streamed without Content-Length is cut at the limit too
    chunks = (b"{\"query\": {\"text\": \"" + b"y" * 50_000 for _ in range(8))
    r = requests.post(server["url"] + "/v1/search", data=chunks,
                      headers={**server["auth"], "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text[:200]
    # still serving, nothing restarted
    assert post(server, "/v1/search", {"query": {"text": "a red car"}, "top_k": 3}).status_code == 200
    status, deps = deployment_replicas()
    assert str(status).endswith("RUNNING") and all(str(s).endswith("HEALTHY") for s in deps.values()), deps


def test_client_raises_with_detail(server):
    from unime_ray.serve.client import UniMEClient, UniMEError

    with pytest.raises(UniMEError) as err:
        UniMEClient(server["url"], api_key=server["key"]).search(top_k=3)
    assert err.value.status == 422 and "empty" in err.value.detail
    with pytest.raises(UniMEError) as err:
        UniMEClient(server["url"]).info()
    assert err.value.status == 401
    assert UniMEClient(server["url"]).health() == {"status": "ok"}


def test_concurrent_searches_are_batched_and_consistent(server, client):
    from ray import serve

    queries = [f"a photo of a {w}" for w in ("red car", "blue circle", "small dog", "old house")] * 4
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda q: client.search(text=q, top_k=4), queries))
    for q, r in zip(queries, results):
        assert [h["id"] for h in r["results"]] == [h["id"] for h in results[queries.index(q)]["results"]]
    stats = serve.get_deployment_handle("QueryEmbedder", app_name=APP_NAME).stats.remote().result()
    assert max(stats["batch_sizes"]) > 1, stats      # concurrent queries shared forwards
    assert max(stats["batch_sizes"]) <= server["config"]["embedder"]["max_batch_size"]


def test_image_file_query_via_client(client, tmp_path, reference, built_index):
    path = tmp_path / "q.png"
    path.write_bytes(make_png(32, 32, seed=5))
    got = client.search(image=path, top_k=3)
    order, _ = expected_search(reference, Item(image=path.read_bytes()), 3)
    assert [h["id"] for h in got["results"]] == [built_index["rows"][i]["id"] for i in order]


# ------------------------------------------------------------------------------------------ the command
CLI_WRAPPER = """
import argparse, sys
from unime_ray.serve.cli import register
from unime_ray.utils.console import setup_logging
setup_logging("WARNING")
parser = argparse.ArgumentParser(prog="unime-ray")
register(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


@pytest.mark.slow
def test_serve_command_end_to_end(built_index, tmp_path):
    """`serve` in its own process (its own local Ray): prints the URL, answers with the key, stops on Ctrl-C."""
    import queue
    import signal
    import subprocess
    import sys
    import threading

    from unime_ray.serve.client import UniMEClient, UniMEError

    port = free_port()
    keyfile = tmp_path / "api-key"
    keyfile.write_text("k3y-" + secrets.token_hex(8))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"serve": {"ingress": {"num_cpus": 0}, "index": {"num_cpus": 0},
                                             "embedder": {"num_cpus": 0, "dtype": "float32"}}}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", CLI_WRAPPER, "serve", "--index", str(built_index["index"]),
                             "--config", str(cfg), "--port", str(port), "--api-key-file", str(keyfile),
                             "--num-cpus", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[2])
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    try:
        deadline = time.time() + 240
        while not any("is serving at" in s for s in seen):
            assert proc.poll() is None, "".join(seen)[-3000:]
            assert time.time() < deadline, "".join(seen)[-3000:]
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        assert f"http://127.0.0.1:{port}" in "".join(seen)
        c = UniMEClient(f"http://127.0.0.1:{port}", api_key=keyfile.read_text())
        assert c.health() == {"status": "ok"} and c.info()["index"]["count"] == N_CANDIDATES
        assert len(c.search(text="a red car", top_k=3)["results"]) == 3
        with pytest.raises(UniMEError) as err:
            UniMEClient(f"http://127.0.0.1:{port}").search(text="a red car")
        assert err.value.status == 401
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

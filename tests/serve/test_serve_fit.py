"""Serving that fits the cluster and fails fast; index builds that account for every candidate.

* resource fitting (pure): defaults scaled to a 2-CPU Ray, explicit oversize refused with the numbers,
  an autoscaling cluster only warned about;
* deadlines and readiness of the ingress (pure, with fake deployment responses and statuses);
* live, on the shared 2-CPU local Ray: an app with default (fitted) resources and the reranker answers
  reranked searches and POSTs without a JSON Content-Type; then an app whose reranker cannot be scheduled
  answers rerank requests 503 at once, /readyz 503 listing it, /healthz 200;
* ``unime-ray index`` with a missing and a corrupt candidate image: 2 quarantined, the rest indexed; the
  build-stopping errors as one line and exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import requests

from tests.serve.test_serve import built_index, candidate_rows, free_port  # noqa: F401 (built_index: a fixture, reused)
from unime_ray.data.io import rows_to_table, write_table_atomic
from unime_ray.data.schema import CANDIDATE_SCHEMA
from unime_ray.serve.config import (ClusterCapacity, ResourceFitError, ServeConfig, fit_resources,
                                    resource_demands)

APP_FIT = "unime-fit-test"
APP_STUCK = "unime-stuck-test"
RAY_FORWARDED = re.compile(r"^(\x1b\[\d+m)?\((\w|:|-)+ pid=\d+")   # "(ServeReplica:app:Name pid=1) ..."
TWO_CPUS = ClusterCapacity(cpus=2, gpus=0, node_cpus=2, node_gpus=0)


# ------------------------------------------------------------------------------------------ fitting (pure)
def test_defaults_with_reranker_are_scaled_to_two_cpus():
    cfg = ServeConfig(embedder={"dtype": "float32"})          # no resources set: all defaults
    before = sum(d.total_cpus for d in resource_demands(cfg, 1, with_reranker=True))
    assert before == pytest.approx(2.75)
    fitted, layout = fit_resources(cfg, TWO_CPUS, partitions=1, with_reranker=True)
    assert layout.fits and layout.scaled_by is not None and layout.total_cpus <= 2
    assert 0 < fitted.reranker.num_cpus < 1 and 0 < fitted.embedder.num_cpus < 1
    assert fitted.embedder.dtype == "float32" and fitted.limits == cfg.limits     # nothing else changed
    line = layout.line()
    for name in ("UniMEIngress", "QueryEmbedder", "CandidateIndex", "Reranker", "of 2 CPUs", "scaled"):
        assert name in line, line
    # without the reranker the defaults fit as they are
    same, layout = fit_resources(cfg, TWO_CPUS, partitions=1, with_reranker=False)
    assert same is cfg and layout.fits and layout.scaled_by is None and layout.total_cpus == pytest.approx(1.75)


def test_explicit_requests_are_kept_and_defaults_make_room():
    cfg = ServeConfig(reranker={"num_cpus": 1}, index={"partitions": 2})
    fitted, layout = fit_resources(cfg, TWO_CPUS, partitions=2, with_reranker=True)
    assert fitted.reranker.num_cpus == 1 and layout.fits and layout.total_cpus <= 2
    assert fitted.index.num_cpus < 0.5 and "x2 partitions" in layout.line()
    # replicas count: an autoscaled embedder needs its min_replicas
    cfg = ServeConfig(embedder={"autoscaling": {"min_replicas": 2, "max_replicas": 4}})
    [_, emb, _] = resource_demands(cfg, 1)
    assert emb.replicas == 2 and emb.total_cpus == 2


def test_explicit_oversize_is_refused_with_the_numbers():
    for over, numbers in (({"reranker": {"num_cpus": 64}}, ("65.75 CPUs requested", "2 available", "Reranker")),
                          ({"reranker": {"num_gpus": 1}}, ("1 GPUs requested", "0 available", "Reranker"))):
        with pytest.raises(ResourceFitError) as err:
            fit_resources(ServeConfig(**over), TWO_CPUS, partitions=1, with_reranker=True)
        for n in numbers:
            assert n in str(err.value), str(err.value)
    # strict: defaults are not scaled either
    with pytest.raises(ResourceFitError, match="2.75 CPUs requested, 2 available"):
        fit_resources(ServeConfig(fit="strict"), TWO_CPUS, partitions=1, with_reranker=True)
    # off: no check at all
    cfg = ServeConfig(fit="off", reranker={"num_cpus": 64})
    same, layout = fit_resources(cfg, TWO_CPUS, partitions=1, with_reranker=True)
    assert same is cfg and not layout.fits


def test_autoscaling_cluster_only_warns():
    growing = ClusterCapacity(cpus=2, gpus=0, node_cpus=2, node_gpus=0, can_grow=True)
    cfg = ServeConfig(reranker={"num_cpus": 4, "num_gpus": 1})
    same, layout = fit_resources(cfg, growing, partitions=1, with_reranker=True)
    assert same is cfg and not layout.fits and layout.scaled_by is None
    assert "DOES NOT FIT" in layout.line() and "grow" in layout.line() and "1 GPUs requested" in layout.line()
    with pytest.raises(ResourceFitError):      # strict refuses even there
        fit_resources(cfg.model_copy(update={"fit": "strict"}), growing, partitions=1, with_reranker=True)


# ------------------------------------------------------------------------------------------ ingress (pure)
def _fake_ingress(timeout_s: float = 0.3):
    from unime_ray.serve.ingress import UniMEIngress

    # the class as written (below Serve's ASGI wrapper), without __init__: no handles, no replica context
    cls = next(k for k in UniMEIngress.func_or_class.__mro__ if "_await_all" in vars(k))
    obj = object.__new__(cls)
    obj.timeout_s = timeout_s
    obj.roles = {"QueryEmbedder": "embedder", "CandidateIndex": "index", "Reranker": "reranker"}
    obj._states_cache, obj._states_lock, obj._background = (-1e9, None), None, set()
    return obj


class _Response:
    """A stand-in for a DeploymentResponse: awaitable after ``delay`` seconds, cancellable."""

    def __init__(self, value, delay: float):
        self.value, self.delay, self.cancelled = value, delay, False

    def __await__(self):
        return self._get().__await__()

    async def _get(self):
        await asyncio.sleep(self.delay)
        return self.value

    def cancel(self):
        self.cancelled = True


def test_deadline_names_the_late_deployment():
    from unime_ray.serve.api import RequestError

    ingress = _fake_ingress(timeout_s=0.3)

    async def run():
        fast, slow = _Response("ok", 0.01), _Response("late", 30)
        assert await ingress._await_all([("QueryEmbedder", fast)], time.monotonic() + 5) == ["ok"]
        t0 = time.monotonic()
        with pytest.raises(RequestError) as err:
            await ingress._await_all([("CandidateIndex", _Response([], 0.01)), ("Reranker", slow)],
                                     time.monotonic() + ingress.timeout_s)
        return time.monotonic() - t0, err.value, slow

    took, err, slow = asyncio.run(run())
    assert err.status == 504 and "Reranker (reranker)" in err.message and "CandidateIndex" not in err.message
    assert "0.3 s" in err.message and took < 2 and slow.cancelled


def test_readiness_from_serve_status():
    from unime_ray.serve.api import RequestError
    from unime_ray.serve.ingress import deployment_readiness

    dep = SimpleNamespace
    app = SimpleNamespace(deployments={
        "QueryEmbedder": dep(status="HEALTHY", replica_states={"RUNNING": 1}, message=""),
        "CandidateIndex": dep(status="UPSCALING", replica_states={"RUNNING": 1, "STARTING": 1}, message=""),
        "Reranker": dep(status="UPDATING", replica_states={"STARTING": 1},
                        message="1 replicas that have taken more than 30s to be scheduled"),
    })
    ingress = _fake_ingress()
    states = deployment_readiness(app, ingress.roles)
    assert [n for n, s in states.items() if not s["ready"]] == ["Reranker"]
    assert deployment_readiness(None, ingress.roles)["QueryEmbedder"]["status"] == "MISSING"
    ingress._states_cache = (time.monotonic(), states)

    async def run():
        await ingress._ensure_ready(["QueryEmbedder", "CandidateIndex"])      # fine
        with pytest.raises(RequestError) as err:
            await ingress._ensure_ready(["QueryEmbedder", "Reranker"])
        return err.value, await ingress.readiness()

    err, ready = asyncio.run(run())
    assert err.status == 503 and "Reranker (reranker) is not ready" in err.message and "scheduled" in err.message
    assert ready["ready"] is False and ready["not_ready"] == ["Reranker"]


def test_json_content_type_detection():
    from unime_ray.serve.api import _is_json_type

    assert _is_json_type(b"application/json") and _is_json_type(b"application/json; charset=utf-8")
    assert _is_json_type(b"application/problem+json")
    assert not _is_json_type(None) and not _is_json_type(b"application/x-www-form-urlencoded")
    assert not _is_json_type(b"text/plain")


# ------------------------------------------------------------------------------------------ live apps
def _wait(pred, timeout: float, what: str):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = pred()
            if last:
                return last
        except requests.RequestException as exc:   # not up yet, or the proxy still routes to the old app
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"{what() if callable(what) else what}: not reached in {timeout} s (last: {last})")


@pytest.fixture(scope="module")
def serve_port(ray_local):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def fitted_server(serve_port, tiny_models, built_index):  # noqa: F811
    """Default resources (2.75 CPUs with the reranker), fitted to the 2-CPU local Ray by the app builder."""
    from ray import serve

    from unime_ray.serve.app import build_app

    config = {"cluster_autoscales": False, "embedder": {"dtype": "float32", "batch_wait_timeout_s": 0.01},
              "reranker": {"dtype": "float32", "require_validation": False}}
    app = build_app({"index": str(built_index["index"]), "reranker": str(tiny_models["qwen2_5_vl"]),
                     "config": config})
    serve.run(app, name=APP_FIT, route_prefix="/", blocking=False)   # returns once every replica runs
    try:
        yield f"http://127.0.0.1:{serve_port}"
    finally:
        serve.delete(APP_FIT)


def test_fitted_app_runs_everything_and_reranks(fitted_server):
    from ray import serve

    from unime_ray.serve.app import cluster_capacity

    assert cluster_capacity(can_grow=False).cpus == 2
    st = serve.status().applications[APP_FIT]
    assert str(st.status).endswith("RUNNING"), st
    assert all(str(d.status).endswith("HEALTHY") for d in st.deployments.values()), st.deployments
    ready = requests.get(fitted_server + "/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["ready"] is True, ready.text
    assert set(ready.json()["deployments"]) == {"QueryEmbedder", "CandidateIndex", "Reranker"}
    r = requests.post(fitted_server + "/v1/search", json={"query": {"text": "a photo of a black cat"}, "top_k": 4,
                                                          "rerank": True}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["reranked"] is True and all(h["rerank_score"] is not None for h in body["results"])
    assert "rerank" in body["timings_ms"]
    spec = requests.get(fitted_server + "/openapi.json", timeout=30).json()
    assert "/readyz" in spec["paths"] and "503" in spec["paths"]["/readyz"]["get"]["responses"]


def test_fit_line_for_the_running_index(built_index):  # noqa: F811
    from unime_ray.serve.app import fit_to_cluster

    cfg, layout = fit_to_cluster(built_index["index"], ServeConfig(), "some/reranker", TWO_CPUS)
    assert layout.fits and layout.total_cpus <= 2 and "Reranker" in layout.line()


def test_json_body_without_content_type(fitted_server):
    payload = json.dumps({"query": {"text": "a red car"}, "top_k": 3})
    for headers in ({}, {"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "text/plain"}):
        r = requests.post(fitted_server + "/v1/search", data=payload, headers=headers, timeout=60)
        if not headers:
            assert "content-type" not in {k.lower() for k in r.request.headers}
        assert r.status_code == 200 and len(r.json()["results"]) == 3, (headers, r.text[:300])
    r = requests.post(fitted_server + "/v1/embed", data=json.dumps({"items": [{"text": "x"}]}), timeout=60)
    assert r.status_code == 200 and len(r.json()["embeddings"]) == 1
    bad = requests.post(fitted_server + "/v1/search", data="{\"query\": ", timeout=60)
    assert bad.status_code == 400 and "JSON" in bad.json()["detail"]


@pytest.fixture(scope="module")
def stuck_server(serve_port, fitted_server, tiny_models, built_index):  # noqa: F811
    """A reranker that can never be scheduled (a GPU on a CPU-only Ray, fit off); the rest runs."""
    from ray import serve

    from unime_ray.serve.app import build_app

    serve.delete(APP_FIT)      # free the CPUs (the fitted app's own teardown then finds nothing to delete)
    config = {"fit": "off", "limits": {"request_timeout_s": 20},
              "ingress": {"num_cpus": 0}, "index": {"num_cpus": 0},
              "embedder": {"num_cpus": 0, "dtype": "float32"},
              "reranker": {"num_cpus": 0, "num_gpus": 1, "dtype": "float32", "graceful_shutdown_timeout_s": 1,
                           "require_validation": False}}
    app = build_app({"index": str(built_index["index"]), "reranker": str(tiny_models["qwen2_5_vl"]),
                     "config": config})
    serve.run_many([serve.RunTarget(app, name=APP_STUCK, route_prefix="/")], wait_for_applications_running=False)
    url = f"http://127.0.0.1:{serve_port}"
    try:
        seen = []

        def only_reranker_missing():
            r = requests.get(url + "/readyz", timeout=10)
            seen.append(r.text[:1000])
            return r.headers.get("content-type", "").startswith("application/json") and \
                r.json().get("not_ready") == ["Reranker"]
        _wait(only_reranker_missing, 90, lambda: f"embedder and index ready, reranker pending: {seen[-1:]}")
        yield url
    finally:
        serve.delete(APP_STUCK)


def test_unschedulable_reranker_fails_fast(stuck_server):
    url = stuck_server
    health = requests.get(url + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = requests.get(url + "/readyz", timeout=10)
    assert ready.status_code == 503, ready.text
    body = ready.json()
    assert body["ready"] is False and body["not_ready"] == ["Reranker"]
    rr = body["deployments"]["Reranker"]
    assert rr["role"] == "reranker" and rr["ready"] is False and not rr["replicas"].get("RUNNING")
    assert body["deployments"]["QueryEmbedder"]["ready"] is True
    t0 = time.monotonic()
    r = requests.post(url + "/v1/search", json={"query": {"text": "a red car"}, "top_k": 3, "rerank": True},
                      timeout=60)
    took = time.monotonic() - t0
    assert r.status_code == 503 and "Reranker" in r.json()["detail"], r.text
    assert took < 5, f"503 after {took:.1f} s (deadline 20 s)"
    plain = requests.post(url + "/v1/search", json={"query": {"text": "a red car"}, "top_k": 3}, timeout=60)
    assert plain.status_code == 200 and plain.json()["reranked"] is False
    from unime_ray.serve.client import UniMEClient, UniMEError

    client = UniMEClient(url)
    assert client.readiness()["not_ready"] == ["Reranker"]
    with pytest.raises(UniMEError) as err:
        client.search(text="a red car", top_k=3, rerank=True)
    assert err.value.status == 503 and "Reranker (reranker) is not ready" in err.value.detail


# ------------------------------------------------------------------------------------------ index build
def _bad_candidates(root: Path) -> tuple[list[dict], Path]:
    """The 20 test candidates, one inline image corrupt (cand-05), one image file missing (cand-14)."""
    image_root = root / "images"
    rows = candidate_rows(image_root)
    rows[5]["image"] = b"\x89PNG\r\n\x1a\nnot an image at all"
    rows[14]["image_path"] = "gone-14.png"
    return rows, image_root


def _write(rows: list[dict], folder: Path) -> Path:
    write_table_atomic(rows_to_table(rows[:12], CANDIDATE_SCHEMA), folder / "part-00000.parquet")
    write_table_atomic(rows_to_table(rows[12:], CANDIDATE_SCHEMA), folder / "part-00001.parquet")
    return folder


def _index_parser():
    from unime_ray.serve.cli import register

    parser = argparse.ArgumentParser(prog="unime-ray")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_index_build_quarantines_unreadable_candidates(tiny_models, tmp_path, capsys):
    from unime_ray.serve.index import QUARANTINE, MetadataStore, load_manifest

    rows, image_root = _bad_candidates(tmp_path)
    # the table as `run` writes it: RUN/prepare/eval_candidates, its image root in RUN/manifest.json
    run = tmp_path / "run"
    cands = _write(rows, run / "prepare" / "eval_candidates")
    (run / "manifest.json").write_text(json.dumps({"stages": {"prepare": {"status": "complete", "outputs": {
        "image_root": str(image_root), "tables": {"eval_candidates": {"path": str(cands)}}}}}}))
    out = tmp_path / "index"
    args = _index_parser().parse_args(["index", "--model", str(tiny_models["qwen2_vl"]), "--candidates", str(cands),
                                       "--out", str(out), "--no-ray", "--dtype", "float32"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert f"image root: {image_root}" in printed
    assert "candidates: 20 in = 18 indexed + 2 quarantined" in printed, printed
    m = load_manifest(out)
    acc = m["accounting"]
    assert m["count"] == 18 and acc["rows_in"] == 20 and acc["rows_out"] == 18 and acc["rows_quarantined"] == 2
    assert acc["rows_in"] == acc["rows_out"] + acc["rows_quarantined"] and acc["rows_indexed"] == 18
    q = pq.read_table(out / QUARANTINE).to_pylist()
    by_id = {r["id"]: r for r in q}
    assert set(by_id) == {"cand-05", "cand-14"}
    assert by_id["cand-05"]["field"] == "image" and "cannot decode" in by_id["cand-05"]["reason"]
    assert by_id["cand-14"]["field"] == "image_path" and "not found" in by_id["cand-14"]["reason"]
    assert by_id["cand-14"]["row"] == 2 and by_id["cand-14"]["source"].endswith("part-00001.parquet")
    meta_ids = [r["id"] for r in MetadataStore(out).rows(list(range(18)))]
    assert meta_ids == [r["id"] for r in rows if r["id"] not in by_id]
    assert not (out / ".screened-candidates").exists()


def test_index_build_stopping_errors_are_one_line(tiny_models, tmp_path, capsys):
    rows, _ = _bad_candidates(tmp_path)
    cands = _write(rows, tmp_path / "elsewhere")          # no run manifest: no recorded image root

    def index(*extra):
        args = _index_parser().parse_args(["index", "--candidates", str(cands), "--out", str(tmp_path / "idx"),
                                           "--dtype", "float32", "--no-ray", *extra])
        code = args.func(args)
        # the CLI's own lines: not the worker logs Ray forwards to the driver's stderr at any time
        lines = capsys.readouterr().err.splitlines()
        return code, [ln for ln in lines if ln.strip() and not RAY_FORWARDED.match(ln)]

    # relative image paths and no image root: not one image found -> stop (not: quarantine everything)
    code, err = index("--model", str(tiny_models["qwen2_vl"]))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: none of the 2 candidate images given by path can be found") and \
        "--image-root" in err[0] and ("img-6.png" in err[0] or "gone-14.png" in err[0]), err
    code, err = index("--model", str(tmp_path / "no-such-model"))
    assert code == 2 and err == [f"error: model folder {tmp_path / 'no-such-model'} does not exist"], err

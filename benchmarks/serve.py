"""Serving latency and throughput: the Ray Serve app over HTTP on loopback vs the same models in-process.

    python benchmarks/serve.py [--clients 16] [--seconds 25] [--batch-sizes 1,16] [--candidates 200] [--rerank]

Builds tiny random models (offline) and a serving index of ``--candidates`` candidates (a quarter with
images), then, for each embedder ``max_batch_size``, starts the application on a local Ray (2 CPUs), drives
``--clients`` concurrent aiohttp clients issuing ``POST /v1/search`` (top_k 10; 3 of 4 queries text, 1 of 4
an image) for ``--seconds``, and reports requests/s, p50/p99 latency and the count of 5xx answers. The
in-process baselines run the same work (embed the query, search the same FAISS index, look up the same
metadata) in this process: ``--clients`` threads sharing one model (calls serialised by a lock, as one
replica without batching), and batches of ``--clients`` queries (the ideal of batching). Every model
replica and the baselines use one torch thread, so they get the same compute.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from unime_ray.data.schema import Item  # noqa: E402

WORDS = ["red car", "blue circle", "green square", "yellow triangle", "small dog", "tall tree", "old house",
         "fast train", "white cloud", "black cat", "wooden chair", "silver spoon"]


def png(seed: int, size: int = 48) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def make_candidates(out: Path, n: int) -> None:
    from unime_ray.data.io import rows_to_table, write_table_atomic
    from unime_ray.data.schema import CANDIDATE_SCHEMA

    rows = [{"id": f"c{i:05d}", "task": "demo", "instruction": "Represent the given image." if i % 4 == 0 else "",
             "text": f"a photo of a {WORDS[i % len(WORDS)]}, item {i}", "image": png(i) if i % 4 == 0 else None,
             "image_path": None} for i in range(n)]
    write_table_atomic(rows_to_table(rows, CANDIDATE_SCHEMA), out / "part-00000.parquet")


def queries(n: int) -> list[Item]:
    out = []
    for i in range(n):
        if i % 4 == 3:
            out.append(Item(image=png(10_000 + i), instruction="Represent the given image."))
        else:
            out.append(Item(text=f"a picture of a {WORDS[(i * 5) % len(WORDS)]} number {i}"))
    return out


def payload(item: Item, rerank: bool) -> bytes:
    import base64

    q = {"text": item.text or None, "instruction": item.instruction or None,
         "image": base64.b64encode(item.image).decode() if item.image else None}
    return json.dumps({"query": {k: v for k, v in q.items() if v is not None}, "top_k": 10, "rerank": rerank,
                       "rerank_top_k": 10 if rerank else None}).encode()


def summarize(latencies: list[float], seconds: float, codes: collections.Counter) -> dict:
    lat = np.asarray(latencies) * 1e3
    n_5xx = sum(v for k, v in codes.items() if isinstance(k, int) and k >= 500)
    return {"requests": len(lat), "req_per_s": len(lat) / seconds, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "5xx": n_5xx,
            "other_errors": sum(v for k, v in codes.items() if not isinstance(k, int) or 300 <= k < 500),
            "codes": dict(codes)}


# ------------------------------------------------------------------------------------------ HTTP load
async def drive(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    server_ms: list[dict] = []
    codes: collections.Counter = collections.Counter()
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as session:
        stop = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() < stop:
                body = bodies[i % len(bodies)]
                i += clients
                t = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        raw = await resp.read()
                        codes[resp.status] += 1
                        if resp.status == 200:
                            server_ms.append(json.loads(raw)["timings_ms"])
                except Exception as exc:  # counted, reported
                    codes[f"exception {type(exc).__name__}"] += 1
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*[worker(w) for w in range(clients)])
        elapsed = time.perf_counter() - t0
    out = summarize(latencies, elapsed, codes)
    for key in ("embed", "search", "rerank", "total"):
        vals = [t[key] for t in server_ms if key in t]
        if vals:
            out[f"ingress_{key}_p50_ms"] = float(np.median(vals))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve(index: Path, reranker: str | None, batch: int, bodies: list[bytes], clients: int, seconds: float,
              single_seconds: float) -> tuple[dict, dict]:
    import requests
    from ray import serve

    from unime_ray.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = {"ingress": {"num_cpus": 0},
              "embedder": {"num_cpus": 1, "torch_threads": 1, "dtype": "float32", "max_batch_size": batch,
                           "batch_wait_timeout_s": 0.005 if batch > 1 else 0.0},
              "index": {"num_cpus": 0, "faiss_threads": 1},
              "reranker": {"num_cpus": 0, "torch_threads": 1, "dtype": "float32",
                           "max_batch_size": 1 if batch == 1 else 4}}
    try:
        serve.run(build_app({"index": str(index), "reranker": reranker, "config": config}), name="bench",
                  route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}/v1/search"
        for body in bodies[:8]:   # warm-up (first forwards, connections)
            requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60).raise_for_status()
        single = asyncio.run(drive(url, bodies, 1, single_seconds))

        async def batch_sizes() -> collections.Counter:   # in a loop: works in Serve's throughput-optimized mode
            handle = serve.get_deployment_handle("QueryEmbedder", app_name="bench")
            return collections.Counter((await handle.stats.remote())["batch_sizes"])

        before = asyncio.run(batch_sizes())
        result = asyncio.run(drive(url, bodies, clients, seconds))
        after = asyncio.run(batch_sizes())
        result["embedder_batches"] = dict(after - before)
        return result, single
    finally:
        serve.shutdown()
        _wait_controller_gone()


def _wait_controller_gone(timeout: float = 90.0) -> None:
    """On a busy machine the controller can outlive serve.shutdown(); the next serve.start must not find it."""
    import ray

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            actor = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        except ValueError:
            return
        if time.time() > deadline - timeout / 2:
            ray.kill(actor, no_restart=True)
        time.sleep(1.0)


# ------------------------------------------------------------------------------------------ in-process
def inprocess(index_dir: Path, model: str, reranker_model: str | None, items: list[Item], clients: int,
              seconds: float, single_seconds: float, rerank: bool) -> tuple[dict, dict, dict]:
    import torch

    from unime_ray.models import Embedder
    from unime_ray.serve.index import MetadataStore, load_partition

    torch.set_num_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)
    embedder = Embedder.from_pretrained(model, dtype="float32")
    index = load_partition(index_dir)
    meta = MetadataStore(index_dir)
    judge = None
    if rerank:
        from unime_ray.rerank import Reranker

        judge = Reranker.from_pretrained(reranker_model, dtype="float32", batch_size=32)

    def work(batch: list[Item]) -> None:
        vecs = embedder.encode(batch, batch_size=len(batch))
        _, pos = index.search(vecs, 10)
        for q, row in zip(batch, pos):
            rows = meta.rows([int(p) for p in row if p >= 0], with_image=rerank)
            if judge is not None:
                judge.score_pairs([(q, Item(text=r["text"] or "", instruction=r["instruction"] or "",
                                            image=r["image"])) for r in rows])

    for it in items[:8]:
        work([it])
    latencies = []
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < single_seconds:
        t = time.perf_counter()
        work([items[i % len(items)]])
        latencies.append(time.perf_counter() - t)
        i += 1
    single = summarize(latencies, time.perf_counter() - t0, collections.Counter({200: len(latencies)}))
    lock = threading.Lock()
    latencies = []
    stop = time.perf_counter() + seconds

    def client(w: int) -> None:
        i = w
        while time.perf_counter() < stop:
            t = time.perf_counter()
            with lock:
                work([items[i % len(items)]])
            latencies.append(time.perf_counter() - t)
            i += clients

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    threaded = summarize(latencies, time.perf_counter() - t0, collections.Counter({200: len(latencies)}))

    latencies = []
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        work([items[(i + j) % len(items)] for j in range(clients)])
        latencies.extend([time.perf_counter() - t] * clients)
        i += clients
    batched = summarize(latencies, time.perf_counter() - t0, collections.Counter({200: len(latencies)}))
    return single, threaded, batched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=25.0)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--single-seconds", type=float, default=8.0, help="the one-client phase of each configuration")
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--hidden-size", type=int, default=64, help="of the tiny models (heavier: more compute/query)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rerank", action="store_true", help="search with rerank=True (rerank_top_k 10)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import ray
    import torch

    from unime_ray.models.config import TinyModelConfig
    from unime_ray.demo.tiny import make_tiny_models
    from unime_ray.models.encode import EmbedderSpec
    from unime_ray.serve.index import build_serving_index
    from unime_ray.utils.ray_utils import init_ray

    tmp = Path(tempfile.mkdtemp(prefix="unime-serve-bench-"))
    heads = max(4, args.hidden_size // 64)
    spec = TinyModelConfig(hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size,
                           num_hidden_layers=args.layers, num_attention_heads=heads,
                           num_key_value_heads=max(1, heads // 2))
    models = make_tiny_models(tmp / "models", seed=0, spec=spec)
    make_candidates(tmp / "candidates", args.candidates)
    build_serving_index(tmp / "candidates", tmp / "index", EmbedderSpec(model=str(models["qwen2_vl"]),
                                                                        dtype="float32"), batch_size=32)
    items = queries(256)
    bodies = [payload(it, args.rerank) for it in items]
    reranker = str(models["qwen2_5_vl"])

    results, singles = {}, {}
    single, threaded, batched = inprocess(tmp / "index", str(models["qwen2_vl"]), reranker, items, args.clients,
                                          args.seconds, args.single_seconds, args.rerank)
    singles["in-process, one caller"] = single
    results[f"in-process, {args.clients} threads + lock (no batching)"] = threaded
    results[f"in-process, batches of {args.clients} (ideal batching)"] = batched

    init_ray(num_cpus=2, include_dashboard=False)
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        name = f"Serve over HTTP, embedder max_batch_size={b}"
        results[name], singles[name] = run_serve(tmp / "index", reranker if args.rerank else None, b, bodies,
                                                 args.clients, args.seconds, args.single_seconds)
    ray.shutdown()

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"torch {torch.__version__}, Ray {ray.__version__}; tiny random Qwen2-VL embedder (hidden "
          f"{args.hidden_size}, {args.layers} layers) "
          f"{'+ tiny Qwen2.5-VL reranker ' if args.rerank else ''}; {args.candidates} candidates (flat); "
          f"{args.clients} concurrent clients, {args.seconds:g} s per configuration; search top_k 10"
          f"{', rerank top 10' if args.rerank else ''}\n")
    print(f"{args.clients} concurrent clients:\n")
    print("| configuration | requests | req/s | p50 ms | p99 ms | 5xx | other errors | ingress p50 ms: embed / "
          "search / (rerank /) total |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        inner = " / ".join(f"{r[k]:.1f}" for k in ("ingress_embed_p50_ms", "ingress_search_p50_ms",
                                                    "ingress_rerank_p50_ms", "ingress_total_p50_ms") if k in r)
        print(f"| {name} | {r['requests']} | {r['req_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['5xx']} | {r['other_errors']} | {inner} |")
    base = singles["in-process, one caller"]["p50_ms"]
    print("\none client (unloaded latency):\n")
    print("| configuration | requests | req/s | p50 ms | p99 ms | 5xx | overhead vs in-process p50 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in singles.items():
        print(f"| {name} | {r['requests']} | {r['req_per_s']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['5xx']} | {r['p50_ms'] - base:+.2f} ms |")
    for name, r in results.items():
        if "embedder_batches" in r:
            hist = dict(sorted((int(k), v) for k, v in r["embedder_batches"].items()))
            n = sum(k * v for k, v in hist.items())
            print(f"\n{name}: {sum(hist.values())} embedder forwards for {n} queries "
                  f"(mean batch {n / max(sum(hist.values()), 1):.2f}); batch-size histogram {hist}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()

"""Global-retrieval search throughput: the stage (local and on Ray) vs raw faiss vs numpy brute force.

    python benchmarks/retrieval.py [--candidates 200000] [--queries 10000] [--dim 256] [--k 50]

All methods search the same L2-normalised clustered vectors for the top-k by inner product. The stage
times include reading query-embedding shards, the delta rule and writing the candidates table; "Ray"
adds a Ray Data actor pool (Ray start-up itself is excluded). IVF recall@k is measured against the flat
index on the same queries. Prints a Markdown table to paste into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unime_ray.data.io import write_rows, write_table_atomic  # noqa: E402
from unime_ray.data.schema import CANDIDATE_SCHEMA  # noqa: E402
from unime_ray.models.encode import embeddings_table  # noqa: E402
from unime_ray.retrieval.config import RetrieveConfig  # noqa: E402
from unime_ray.retrieval.index import ShardedIndex  # noqa: E402
from unime_ray.retrieval.stage import build_indexes, search_queries  # noqa: E402
from unime_ray.utils.pool import Pool  # noqa: E402


def clustered(n: int, d: int, clusters: int, rng) -> np.ndarray:
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_topk(q: np.ndarray, c: np.ndarray, k: int, batch: int = 1024) -> np.ndarray:
    out = np.empty((len(q), k), dtype=np.int64)
    for i in range(0, len(q), batch):
        sims = q[i:i + batch] @ c.T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
        out[i:i + batch] = np.take_along_axis(part, order, axis=1)
    return out


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t, result


def recall(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--nlist", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--skip-ivf", action="store_true")
    args = ap.parse_args()

    import faiss

    rng = np.random.default_rng(0)
    c = clustered(args.candidates, args.dim, args.clusters, rng)
    q = clustered(args.queries, args.dim, args.clusters, rng)
    k = args.k
    rows = []

    t_np, np_ids = timed(numpy_topk, q, c, k)
    rows.append(("numpy brute force", t_np, None))
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(c)
    t_faiss, (_, faiss_ids) = timed(flat.search, q, k)
    rows.append(("raw faiss IndexFlatIP", t_faiss, recall(faiss_ids, np_ids)))
    sharded = ShardedIndex.build(c, RetrieveConfig(num_shards=args.shards))
    t_sh, (_, sh_ids) = timed(sharded.search, q, k)
    rows.append((f"ShardedIndex flat x{args.shards}", t_sh, recall(sh_ids, faiss_ids)))

    work = Path(tempfile.mkdtemp(prefix="unime-bench-"))
    try:
        ids = [f"c{i}" for i in range(len(c))]
        write_rows(({"id": i, "task": "bench", "instruction": "", "text": i} for i in ids),
                   work / "cands", CANDIDATE_SCHEMA, rows_per_shard=len(ids))
        write_table_atomic(embeddings_table(ids, c), work / "cand_emb" / "part-00000.parquet")
        qt = embeddings_table([f"q{i}" for i in range(len(q))], q)
        import pyarrow as pa

        qt = qt.append_column("task", pa.array(["bench"] * len(q))).append_column(
            "pos_id", pa.array([ids[j] for j in faiss_ids[:, 0]]))
        per = max(1, len(q) // 4)
        for j, lo in enumerate(range(0, len(q), per)):
            write_table_atomic(qt.slice(lo, per), work / "q_emb" / f"part-{j:05d}.parquet")
        settings = RetrieveConfig(top_k=k, delta=None, pool="global", num_shards=args.shards)
        build_indexes(work / "cand_emb", work / "cands", work / "index", settings)
        t_stage, st = timed(search_queries, work / "q_emb", work / "index", work / "out_local", settings)
        rows.append(("stage search, one process", t_stage, None))
        rows.append(("  same, after the index load", t_stage - st["setup_seconds"], None))
        if not args.no_ray:
            import ray

            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = False
            cpus = os.cpu_count() or 1
            for actors, threads in ((1, cpus), (cpus, 1)):
                out = work / f"out_ray_{actors}"
                t_ray, st = timed(search_queries, work / "q_emb", work / "index", out, settings,
                                  pool=Pool(min_actors=actors, max_actors=actors), threads=threads)
                rows.append((f"stage search on Ray ({actors} actor(s) x {threads} faiss thread(s))", t_ray, None))
                rows.append(("  same, after actor start and index load", t_ray - st["setup_seconds"], None))
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ivf_rows = []
    for nlist in ([] if args.skip_ivf else args.nlist):
        t_build, ivf = timed(ShardedIndex.build, c, RetrieveConfig(index_kind="ivf", nlist=nlist))
        for nprobe in args.nprobe:
            for shard in ivf.shards:
                shard.nprobe = nprobe
            t_ivf, (_, ivf_ids) = timed(ivf.search, q, k)
            ivf_rows.append((nlist, t_build, nprobe, t_ivf, recall(ivf_ids, faiss_ids), t_faiss / t_ivf))

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, faiss {faiss.__version__}; "
          f"{args.candidates} x {args.dim} candidates, {args.queries} queries, k={k}, {args.clusters} clusters\n")
    print("| method | seconds | queries/s | vs raw faiss | recall@k vs reference |")
    print("|---|---|---|---|---|")
    for name, t, r in rows:
        print(f"| {name} | {t:.2f} | {args.queries / t:,.0f} | {t / t_faiss:.2f}x | "
              f"{'' if r is None else f'{r:.4f}'} |")
    print("\nIVF against flat (same queries; build = train + add):\n")
    print("| nlist | build s | nprobe | search s | queries/s | recall@k | speed-up vs flat |")
    print("|---|---|---|---|---|---|---|")
    for nlist, tb, nprobe, t, r, sp in ivf_rows:
        print(f"| {nlist} | {tb:.1f} | {nprobe} | {t:.2f} | {args.queries / t:,.0f} | {r:.4f} | {sp:.1f}x |")


if __name__ == "__main__":
    main()

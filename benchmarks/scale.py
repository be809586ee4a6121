"""Paper scale: how time and memory of S1-S3 (retrieve -> judge -> mine) and the training table's read grow with N.

    python benchmarks/scale.py --queries N [--candidates-per-query 50] [--dim 128] [--out DIR] [--address auto]

Generates a seeded MMEB-train-shaped pair table of N queries (20 tasks; text, image-by-path and image+text
queries and targets; each query's positive a distinct pool item, so the pool holds N candidates), then runs the
project's own stage code on a local Ray: index build + search (``retrieval.stage``), the judge's expand +
Ray actor-pool scoring + quarantine + summaries (``judge.stage``), mining (``mining.stage``) and the training
table's read as ``train.trainer.fit`` does it (one table in the object store, rows taken in ``BatchPlan`` order).

Two stand-ins, so that what is measured is the pipeline's own overhead:
* **embedding**: no model runs; queries and pool get seeded unit vectors of dim D (clustered, each query near
  its positive), written in the embeddings-table format the retrieval stage reads;
* **judge**: the real judge actor (content join from the lookups, Items, output rows), with a scorer that
  returns (1 + cosine)/2 of the pair's vectors, projected to 32 dims and stored as float16 (a gather and a dot
  product per pair; 64 bytes a row, so the stand-in's own mapped arrays stay small next to the pipeline's
  memory as N grows). It lives only here.

Every step resumes: rerun with the same ``--out`` and finished shards are skipped (``tests/test_scale_resume.py``
kills the whole process group during the judge and reruns). Memory: a thread samples the RSS of this process
and of every process under it (Ray's workers, raylet, GCS) every 0.2 s; "private" is RSS minus file-backed and
shared pages (the lookups and vectors are memory-mapped, Ray's object store is shared memory). The last line:
per stage, rows/s and peak RSS of the driver and of the largest worker.

``--address`` joins a running cluster instead of starting a local Ray (``ray job submit ... -- python
benchmarks/scale.py --address auto ...``): the searchers and judge actors spread over its nodes, and the results
record the nodes and how many shards each ran (``shards_per_node``); memory is then sampled for every Ray
worker on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unime_ray.data.io import read_table, shard_paths, write_table_atomic  # noqa: E402
from unime_ray.data.schema import CANDIDATE_SCHEMA, PAIR_SCHEMA  # noqa: E402
from unime_ray.judge.stage import JudgeActor, JudgeSpec  # noqa: E402

TASKS = 20          # MMEB-train's 20 training datasets
SCORER_DIM = 32     # the stand-in judge's vectors: a random projection of the embeddings
GIB = 2 ** 30


# ------------------------------------------------------------------------------------------------ data
def _items(rng: np.random.Generator, ids: np.ndarray, side: str) -> dict[str, list]:
    """Text, image-by-path or image+text items (a third each), MMEB-train-like lengths."""
    kind = rng.integers(0, 3, len(ids))
    words = rng.integers(6, 40, len(ids))
    text = [None if k == 1 else f"{side} {i} " + "word " * w for i, k, w in zip(ids, kind, words)]
    path = [f"images/{side}/{i}.jpg" if k else None for i, k in zip(ids, kind)]
    instr = [f"<|image_1|> Represent the given {side} for retrieval: " if k else None for k in kind]
    return {"instruction": instr, "text": text, "image": [None] * len(ids), "image_path": path}


def generate(out: Path, n: int, dim: int, rows_per_shard: int, seed: int) -> None:
    """Pairs, pool and both embedding tables, shard by shard (names aligned across the tables)."""
    if (out / "data.done").exists():
        return
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((256, dim)).astype(np.float32)
    (out / "vectors").mkdir(exist_ok=True)
    # one array per side, row = the id's number: what the benchmark's scorer reads
    vectors = {side: np.lib.format.open_memmap(out / "vectors" / f"{side}.npy", "w+", np.float16, (n, SCORER_DIM))
               for side in "qp"}
    projection = rng.standard_normal((dim, SCORER_DIM)).astype(np.float32)
    for j, lo in enumerate(range(0, n, rows_per_shard)):
        ids = np.arange(lo, min(n, lo + rows_per_shard))
        task = [f"task{i % TASKS:02d}" for i in ids]
        q, p = _items(rng, ids, "query"), _items(rng, ids, "target")
        pairs = {"id": [f"q{i}" for i in ids], "task": task, **{f"query_{k}": v for k, v in q.items()},
                 "pos_id": [f"p{i}" for i in ids], **{f"pos_{k}": v for k, v in p.items()}}
        name = f"part-{j:05d}.parquet"
        t = pa.table({f.name: pairs.get(f.name, [None] * len(ids)) for f in PAIR_SCHEMA}, schema=PAIR_SCHEMA)
        write_table_atomic(t, out / "pairs" / name)
        write_table_atomic(pa.table({"id": pairs["pos_id"], "task": task, **p}, schema=CANDIDATE_SCHEMA),
                           out / "pool" / name)
        pos = _unit(centers[rng.integers(0, len(centers), len(ids))] + 0.8 * rng.standard_normal((len(ids), dim)))
        qv = _unit(pos + 0.5 * rng.standard_normal((len(ids), dim)) / np.sqrt(dim))
        vectors["q"][ids], vectors["p"][ids] = _unit(qv @ projection), _unit(pos @ projection)
        _write_embeddings(out / "query_embeddings" / name, pairs["id"], qv, task=task, pos_id=pairs["pos_id"])
        _write_embeddings(out / "candidate_embeddings" / name, pairs["pos_id"], pos)
    for v in vectors.values():
        v.flush()
    (out / "data.done").touch()


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_embeddings(path: Path, ids: list[str], vectors: np.ndarray, **extra: list) -> None:
    from unime_ray.models.encode import embeddings_table

    t = embeddings_table(ids, vectors)
    for k, v in extra.items():
        t = t.append_column(k, pa.array(v, type=pa.string()))
    write_table_atomic(t, path)


# ------------------------------------------------------------------------------------------------ judge stand-in
class _CosineScorer:
    """(1 + cosine) / 2 of the pair's projected vectors; ``ids`` is set by the actor before each call."""

    def __init__(self, vectors: str, seconds_per_batch: float = 0.0):
        self.q = np.load(Path(vectors) / "q.npy", mmap_mode="r")
        self.p = np.load(Path(vectors) / "p.npy", mmap_mode="r")
        self.pause = seconds_per_batch
        self.ids: tuple[list, list] = ([], [])

    def score_or_errors(self, pairs):
        qi = np.fromiter((int(s[1:]) for s in self.ids[0]), dtype=np.int64, count=len(pairs))
        ci = np.fromiter((int(s[1:]) for s in self.ids[1]), dtype=np.int64, count=len(pairs))
        if self.pause:
            time.sleep(self.pause)
        cos = np.einsum("ij,ij->i", self.q[qi].astype(np.float32), self.p[ci].astype(np.float32))
        return (1 + cos.astype(np.float64)) / 2, [None] * len(pairs)


class CosineJudgeActor(JudgeActor):
    """The project's judge actor with the benchmark's scorer (never a pipeline judge)."""

    def __init__(self, spec, content, vectors, seconds_per_batch=0.0):
        super().__init__(spec, backend=_CosineScorer(vectors, seconds_per_batch), content=content)

    def __call__(self, batch):
        self.backend.ids = (batch["query_id"], batch["cand_id"])
        return super().__call__(batch)


# ------------------------------------------------------------------------------------------------ memory
class MemorySampler(threading.Thread):
    """Peak RSS (and private RSS) per stage of this process, of Ray workers and of Ray's other processes."""

    def __init__(self, every: float = 0.2, machine_wide: bool = False):
        super().__init__(daemon=True)
        self.every, self.stage, self.peaks, self.machine_wide = every, "setup", {}, machine_wide
        self.me = psutil.Process()
        self._kinds: dict[int, str] = {}
        self._done = threading.Event()

    def _kind(self, p: psutil.Process) -> str:
        if p.pid not in self._kinds:
            cmd = " ".join(p.cmdline())
            self._kinds[p.pid] = "worker" if "default_worker" in cmd or p.name().startswith("ray::") else "system"
        return self._kinds[p.pid]

    def sample(self) -> None:
        peak = self.peaks.setdefault(self.stage, {})
        others = ([p for p in psutil.process_iter() if p.pid != self.me.pid and _is_ray_worker(p)]
                  if self.machine_wide else self.me.children(recursive=True))
        for p in [self.me, *others]:
            try:
                kind = "driver" if p.pid == self.me.pid else self._kind(p)
                m = p.memory_info()
            except psutil.Error:
                continue
            for key, v in ((kind, m.rss), (f"{kind}_private", m.rss - m.shared)):
                peak[key] = max(peak.get(key, 0), v)

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.sample()

    def stop(self) -> None:
        self._done.set()


def _is_ray_worker(p: psutil.Process) -> bool:
    try:
        return p.name().startswith("ray::")
    except psutil.Error:
        return False


# ------------------------------------------------------------------------------------------------ stages
def retrieve(out: Path, n: int, k: int, ivf_above: int, seed: int) -> dict:
    from unime_ray.retrieval.config import RetrieveConfig
    from unime_ray.retrieval.index import ShardedIndex, brute_force_topk
    from unime_ray.retrieval.stage import build_indexes, search_queries
    from unime_ray.utils.pool import Pool

    per_pool = n // TASKS
    kind = "ivf" if per_pool > ivf_above else "flat"
    settings = RetrieveConfig(top_k=k, index_kind=kind, nprobe=32, search_batch_size=1024)
    groups = build_indexes(out / "candidate_embeddings", out / "pool", out / "index", settings, seed)
    stats = search_queries(out / "query_embeddings", out / "index", out / "candidates", settings,
                           pool=Pool(min_actors=2, max_actors=2, num_cpus_per_actor=1))
    # recall@k of the searched index against exact search, on a sample of one task's queries
    folder = groups["task00"]
    vec = read_table(Path(folder) / "vectors")
    pool_vectors = np.stack(vec.column("embedding").to_numpy(zero_copy_only=False))
    rng = np.random.default_rng(seed)
    sample = pool_vectors[rng.choice(len(pool_vectors), min(500, len(pool_vectors)), replace=False)]
    sample = _unit(sample + 0.3 * rng.standard_normal(sample.shape).astype(np.float32) / np.sqrt(sample.shape[1]))
    _, approx = ShardedIndex.load(folder).search(sample, k)
    _, exact = brute_force_topk(sample, pool_vectors, k)
    recall = float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)]))
    return {**stats, "index": kind, "pool_per_task": per_pool, "recall_at_k_vs_exact": round(recall, 4)}


def judge(out: Path, actors: int, batch: int, seconds_per_batch: float) -> dict:
    from unime_ray.judge.stage import _scores_table, expand_pairs, score_means, write_quarantine
    from unime_ray.utils.shards import map_shards_actors

    spec = JudgeSpec(model="benchmark-cosine-scorer")
    t0 = time.perf_counter()
    expanded = expand_pairs(out / "candidates", out / "pairs", out / "pool", out / "judge" / "pairs")
    expand_s = time.perf_counter() - t0
    kwargs = {"spec": spec.model_dump(), "content": expanded["content"], "vectors": str(out / "vectors"),
              "seconds_per_batch": seconds_per_batch}
    scores = out / "judge" / "scores" / spec.identity()
    stats = map_shards_actors(CosineJudgeActor, kwargs, out / "judge" / "pairs", scores, _scores_table,
                              batch_size=batch, max_actors=actors, what="judged pairs")
    quarantined = write_quarantine(scores, out / "judge" / "quarantine.parquet")
    return {**stats, "pairs": expanded["pairs"], "expand_seconds": round(expand_s, 2), "quarantined": quarantined,
            **score_means(scores), "scores_table": str(scores), "pair_shards": len(shard_paths(out / "judge" /
                                                                                              "pairs"))}


def mine(out: Path, scores: str) -> dict:
    from unime_ray.mining.config import MineConfig
    from unime_ray.mining.stage import run_mining

    res = run_mining(out / "candidates", scores, out / "pairs", out / "pool", out / "mine", MineConfig())
    return {k: res[k] for k in ("queries", "mined", "quarantined", "fallbacks", "mean_negative_score")}


def read_training(table: Path, micro: int = 64) -> dict:
    """``fit``'s read: the table in the object store once, a worker takes each step's rows in BatchPlan order."""
    import ray

    from unime_ray.train.trainer import read_training_table

    @ray.remote(num_cpus=1)
    def epoch(ref, rows: int) -> tuple[int, str]:
        from unime_ray.train.trainer import BatchPlan
        from unime_ray.utils.shards import node_id

        t = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
        plan = BatchPlan(rows, micro, 1, 1, 0)
        return sum(len(t.take(plan.rows(s, 0, 0)).to_pylist()) for s in range(plan.steps_per_epoch)), node_id()

    t = read_training_table(table)
    rows, node = ray.get(epoch.remote(ray.put(t), t.num_rows))
    return {"rows": rows, "table_mib": round(t.nbytes / 2 ** 20, 1), "node": node}


def cluster_nodes() -> list[dict]:
    """The cluster's nodes: id (as ``shards_per_node`` names them), head or not, CPUs; and the driver's."""
    import ray

    from unime_ray.utils.shards import node_id

    here = node_id()
    return [{"node": n["NodeID"][:12], "head": "node:__internal_head__" in n["Resources"],
             "cpus": n["Resources"].get("CPU", 0), "driver": n["NodeID"][:12] == here}
            for n in ray.nodes() if n["Alive"]]


def report(paths: list[Path], png: Path) -> str:
    """A Markdown table of seconds and peak RSS per stage against N, with the fitted log-log growth exponent
    (slope of log seconds / log peak RSS on log N), the ratio of the largest N's peak to the peak of the run
    nearest a tenth of it, and the plot of both."""
    from unime_ray.utils.plots import pyplot

    runs = sorted((json.loads(p.read_text()) for p in paths), key=lambda r: r["queries"])
    ns = np.array([r["queries"] for r in runs], dtype=float)
    stages = [k for k in runs[0]["stages"] if k != "generate"]
    tenth = int(np.argmin(np.abs(np.log(ns / (ns[-1] / 10)))))
    head = ["stage", *(f"N={int(n):,}: s / rows/s / peak RSS GiB: driver, largest worker (private)" for n in ns),
            "exponent: seconds", "exponent: peak RSS", f"peak RSS, N={int(ns[-1]):,} / N={int(ns[tenth]):,}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4)) if plt else (None, [None, None])
    for stage in stages:
        sec = np.array([r["stages"][stage]["seconds"] for r in runs])
        rss = np.array([max(r["stages"][stage]["peak"].get("driver", 0), r["stages"][stage]["peak"].get("worker", 0))
                        for r in runs]) / GIB
        peaks = [r["stages"][stage]["peak"] for r in runs]
        cells = [f"{r['stages'][stage]['seconds']:,.1f} / {r['stages'][stage]['rows_per_s']:,.0f} / "
                 f"{p.get('driver', 0) / GIB:.2f}, {p.get('worker', 0) / GIB:.2f} "
                 f"({p.get('worker_private', 0) / GIB:.2f})" for r, p in zip(runs, peaks)]
        slope = [f"{np.polyfit(np.log(ns), np.log(np.maximum(v, 1e-3)), 1)[0]:.2f}" if len(ns) > 1 else "-"
                 for v in (sec, rss)]
        lines.append("| " + " | ".join([stage, *cells, *slope, f"{rss[-1] / rss[tenth]:.2f}x"]) + " |")
        if plt:
            axes[0].loglog(ns, sec, "o-", label=stage)
            axes[1].loglog(ns, rss, "o-", label=stage)
    loads = [f"{max(v.get('load_average_1min', 0) for v in r['stages'].values()):.1f}" for r in runs]
    lines.append("| " + " | ".join(["highest 1-min load average at a stage's end (2 cores; shared machine)", *loads,
                                    "", "", ""]) + " |")
    if plt:
        axes[0].set(xlabel="queries N", ylabel="seconds", title="time per stage")
        axes[1].set(xlabel="queries N", ylabel="peak RSS, GiB (max of driver, largest worker)",
                    title="peak memory per stage")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(png, dpi=100)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int)
    ap.add_argument("--report", type=Path, nargs="+", help="results.json files: print the table, write --png")
    ap.add_argument("--png", type=Path, default=Path(__file__).with_name("scale.png"))
    ap.add_argument("--candidates-per-query", type=int, default=50)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rows-per-shard", type=int, default=2000, help="queries per shard (x51 judged pairs)")
    ap.add_argument("--judge-actors", type=int, default=2)
    ap.add_argument("--judge-batch", type=int, default=1024, help="pairs per judge actor call")
    ap.add_argument("--ivf-above", type=int, default=20_000, help="per-task pool size from which IVF is used")
    ap.add_argument("--judge-seconds-per-batch", type=float, default=0.0, help="slow the stand-in judge (tests)")
    ap.add_argument("--out", type=Path, default=None, help="working folder (rerun with it to resume)")
    ap.add_argument("--address", default=None, help="join this Ray cluster ('auto': the one of a submitted job) "
                                                    "instead of starting a local Ray")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.report:
        print(report(a.report, a.png))
        return
    if a.queries is None:
        ap.error("--queries is required (or --report)")
    out = (a.out or Path(f"/tmp/unime_scale_{a.queries}")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.address is None:
        os.environ.pop("RAY_ADDRESS", None)
    sampler = MemorySampler(machine_wide=a.address is not None)
    sampler.start()
    timings: dict[str, dict] = {}

    def step(name: str, rows_of, fn, *args):
        sampler.stage = name
        t0 = time.perf_counter()
        res = fn(*args)
        sampler.sample()
        s = time.perf_counter() - t0
        timings[name] = {"seconds": round(s, 2), "rows": rows_of(res), "rows_per_s": round(rows_of(res) / s, 1),
                         "load_average_1min": os.getloadavg()[0], "result": res}   # the machine is shared
        print(f"{name}: {json.dumps(timings[name], default=str)}", flush=True)
        return res

    step("generate", lambda r: a.queries, generate, out, a.queries, a.dim, a.rows_per_shard, a.seed)
    from unime_ray.utils.ray_utils import init_ray

    sampler.stage = "ray start"
    if a.address is None:
        init_ray(num_cpus=a.judge_actors + 1, include_dashboard=False)   # one CPU left for Ray Data's reads
    else:
        init_ray(address=a.address)
    nodes = cluster_nodes()
    print(f"nodes: {json.dumps(nodes)}", flush=True)
    step("retrieve", lambda r: a.queries, retrieve, out, a.queries, a.candidates_per_query, a.ivf_above, a.seed)
    judged = step("judge", lambda r: r["pairs"], judge, out, a.judge_actors, a.judge_batch,
                  a.judge_seconds_per_batch)
    step("mine", lambda r: r["queries"], mine, out, judged["scores_table"])
    step("train read", lambda r: r["rows"], read_training, out / "mine" / "train")
    sampler.stop()
    pairs = judged["pairs"]
    summary = {"queries": a.queries, "pairs": pairs, "nodes": nodes, "dim": a.dim,
               "args": {k: str(v) for k, v in vars(a).items()},
               "stand_ins": "embedding: seeded unit vectors; judge: (1+cos)/2 of the pair's 32-dim projected vectors "
                            "(benchmark only), so judge pairs/s is the pipeline's own per-pair overhead",
               "stages": {k: {**v, "peak": sampler.peaks.get(k, {})} for k, v in timings.items()}}
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    print(" | ".join(f"{k}: {v['rows_per_s']:.0f} rows/s, peak RSS driver "
                     f"{sampler.peaks.get(k, {}).get('driver', 0) / GIB:.2f} GiB, worker "
                     f"{sampler.peaks.get(k, {}).get('worker', 0) / GIB:.2f} GiB" for k, v in timings.items()))


if __name__ == "__main__":
    main()

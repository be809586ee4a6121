"""Stage S1, global retrieval: each query's top-K candidates below the similarity threshold delta.

For every query: search the candidate pool (its task's pool by default, as in MMEB, or one global pool),
remove the positive (it is never a candidate), keep the top ``top_k`` and drop those whose similarity is
at or above delta, where delta is the query's similarity to its own positive (``delta: positive``, the
paper's Fig. 2), a fixed number, or no threshold (``delta: null``). With ``fill: true`` the search goes
deeper so that ``top_k`` candidates remain after the drop when the pool has them (the paper's
Rank_50 over {x_i < delta}); by default the top_k are taken first and then filtered.

Output, one shard per query shard (resumable): ``query_id, task, pos_id, pos_similarity, cand_ids,
cand_scores, n_dropped`` with candidates in descending similarity.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..data.io import iter_rows, read_table, write_rows, write_table_atomic
from ..data.lookup import find_rows, sorted_ids
from ..data.schema import CANDIDATE_SCHEMA, empty_row
from ..models.encode import EmbedderSpec, embed_table, embeddings_table, read_embeddings
from ..utils.pool import Pool
from .config import RetrieveConfig
from .index import ShardedIndex

logger = logging.getLogger(__name__)

CANDIDATES_TABLE_SCHEMA = pa.schema([
    pa.field("query_id", pa.string()), pa.field("task", pa.string()), pa.field("pos_id", pa.string()),
    pa.field("pos_similarity", pa.float32()), pa.field("cand_ids", pa.list_(pa.string())),
    pa.field("cand_scores", pa.list_(pa.float32())), pa.field("n_dropped", pa.int32()),
])
GLOBAL_POOL = "__global__"


def select_candidates(cand_ids: list[str], cand_scores: np.ndarray, pos_id: str, pos_similarity: float,
                      settings: RetrieveConfig) -> tuple[list[str], list[float], int]:
    """Apply the rule to one query's ranked search results: (kept ids, kept scores, number dropped by delta).

    ``cand_ids``/``cand_scores`` are in descending similarity (padding ids of '' are ignored).
    """
    delta = settings.threshold(pos_similarity)
    ranked = [(c, float(s)) for c, s in zip(cand_ids, cand_scores) if c and c != pos_id]
    if not settings.fill:
        ranked = ranked[:settings.top_k]
    kept: list[tuple[str, float]] = []
    dropped = 0
    for c, s in ranked:
        if len(kept) == settings.top_k:
            break
        if s >= delta:
            dropped += 1
        else:
            kept.append((c, s))
    return [c for c, _ in kept], [s for _, s in kept], dropped


class SearchActor:
    """Holds the saved indexes and candidate vectors; maps query-embedding rows to candidate rows."""

    def __init__(self, index_dir: str, settings: dict[str, Any], threads: int | None = None):
        if threads:  # Ray sets OMP_NUM_THREADS to the actor's CPUs; faiss may use more when asked
            import faiss

            faiss.omp_set_num_threads(threads)
        self.settings = RetrieveConfig.model_validate(settings)
        # per pool: the index, its ids, and its vectors memory-mapped (read for the positives only), so the
        # pool's vectors are held once, by the index
        self.groups: dict[str, tuple[ShardedIndex, list[str], np.ndarray]] = {}
        self.positions: dict[str, tuple[np.ndarray, np.ndarray]] = {}     # sorted ids, for find_rows
        meta = json.loads((Path(index_dir) / "groups.json").read_text())
        for group, folder in meta.items():
            ids = read_table(Path(folder) / "vectors", ["id"]).column("id").to_pylist()
            self.groups[group] = (ShardedIndex.load(folder), ids, np.load(_vectors_file(folder), mmap_mode="r"))
            self.positions[group] = sorted_ids(ids)

    def __call__(self, batch: dict[str, list]) -> dict[str, Any]:
        n = len(batch["id"])
        out: dict[str, list] = {k: [None] * n for k in CANDIDATES_TABLE_SCHEMA.names}
        tasks = batch["task"]
        groups = [t if self.settings.pool == "task" else GLOBAL_POOL for t in tasks]
        for group in sorted(set(groups)):
            rows = [i for i, g in enumerate(groups) if g == group]
            if group not in self.groups:
                raise KeyError(f"no candidate pool for task {group!r}")
            index, ids, vecs = self.groups[group]
            q = np.stack([np.asarray(batch["embedding"][i], dtype=np.float32) for i in rows])
            at, found = find_rows(*self.positions[group], [batch["pos_id"][i] for i in rows])
            if not found.all():
                i = rows[int(np.argmin(found))]
                raise KeyError(f"query {batch['id'][i]!r}: its positive {batch['pos_id'][i]!r} is not in the "
                               f"candidate pool {group!r}")
            pos_sims = [float(vecs[p] @ qi) for p, qi in zip(at, q)]
            results = self._search(index, ids, q, rows, batch, pos_sims)
            for i, ps, (kept_ids, kept_scores, dropped) in zip(rows, pos_sims, results):
                out["query_id"][i] = batch["id"][i]
                out["task"][i] = tasks[i]
                out["pos_id"][i] = batch["pos_id"][i]
                out["pos_similarity"][i] = ps
                out["cand_ids"][i] = kept_ids
                out["cand_scores"][i] = kept_scores
                out["n_dropped"][i] = dropped
        return out

    def _search(self, index: ShardedIndex, ids: list[str], q: np.ndarray, rows: list[int], batch, pos_sims):
        s = self.settings
        depth = min(index.ntotal, s.top_k + 1)
        results: list[Any] = [None] * len(rows)
        todo = list(range(len(rows)))
        while todo:
            scores, pos = index.search(q[todo], depth)
            again = []
            for j, r in enumerate(todo):
                cids = [ids[p] if p >= 0 else "" for p in pos[j]]
                res = select_candidates(cids, scores[j], batch["pos_id"][rows[r]], pos_sims[r], s)
                results[r] = res
                if s.fill and len(res[0]) < s.top_k and depth < index.ntotal:
                    again.append(r)
            todo = again
            depth = min(index.ntotal, depth * 2)
        return results


def _candidates_table(cols: dict[str, list]) -> pa.Table:
    if not cols:
        return CANDIDATES_TABLE_SCHEMA.empty_table()
    return pa.table({k: cols[k] for k in CANDIDATES_TABLE_SCHEMA.names}, schema=CANDIDATES_TABLE_SCHEMA)


def candidate_pool_from_positives(pairs: str | os.PathLike, out_dir: str | os.PathLike,
                                  rows_per_shard: int = 10_000) -> int:
    """The pool when none is given: each task's distinct positives (MMEB-train's targets), ids = pos_id."""
    seen: set[str] = set()

    def rows():
        cols = ["task", "pos_id", "pos_instruction", "pos_text", "pos_image", "pos_image_path"]
        for r in iter_rows(pairs, columns=cols):
            if r["pos_id"] in seen:
                continue
            seen.add(r["pos_id"])
            row = empty_row(CANDIDATE_SCHEMA)
            row.update(id=r["pos_id"], task=r["task"], instruction=r["pos_instruction"], text=r["pos_text"],
                       image=r["pos_image"], image_path=r["pos_image_path"])
            yield row

    return write_rows(rows(), out_dir, CANDIDATE_SCHEMA, rows_per_shard)


def build_indexes(candidate_embeddings: str | os.PathLike, candidates: str | os.PathLike,
                  out_dir: str | os.PathLike, settings: RetrieveConfig, seed: int = 0) -> dict[str, str]:
    """One saved index per pool (task, or global); resumable per pool. Returns {pool: folder}."""
    out_dir = Path(out_dir)
    groups_file = out_dir / "groups.json"
    if groups_file.is_file():
        return json.loads(groups_file.read_text())
    # memory: the ids and pools of all rows (Arrow and numpy), the vectors of one pool at a time
    ids = read_table(candidate_embeddings, ["id"]).column("id")
    if settings.pool == "task":
        tasks = read_table(candidates, ["id", "task"])
        # an id listed twice: its last row, as a dict of the rows would hold
        wanted = ids.to_pylist()
        at, found = find_rows(*sorted_ids(tasks.column("id").to_pylist()), wanted)
        if not found.all():
            raise KeyError(f"candidate {wanted[int(np.argmin(found))]!r} has an embedding but no row in {candidates}")
        coded = tasks.column("task").take(pa.array(at)).combine_chunks().dictionary_encode()
        codes, names = coded.indices.to_numpy(zero_copy_only=False), coded.dictionary.to_pylist()
    else:
        codes, names = np.zeros(len(ids), dtype=np.int64), [GLOBAL_POOL]
    folders = {}
    for group in sorted(names):
        sel = np.flatnonzero(codes == names.index(group))
        folder = out_dir / _safe_name(group)
        if not (folder / "index.json").is_file():
            tmp = out_dir / f".{_safe_name(group)}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            vecs = _embedding_rows(candidate_embeddings, sel)
            write_table_atomic(embeddings_table(ids.take(sel).to_pylist(), vecs),
                               tmp / "vectors" / "part-00000.parquet")
            np.save(tmp / VECTORS_FILE, vecs)
            ShardedIndex.build(vecs, settings, seed).save(tmp)
            del vecs
            os.replace(tmp, folder)
        folders[group] = str(folder)
        logger.info("index %s: %d candidates, %s x%d shard(s)", group, len(sel), settings.index_kind,
                    settings.num_shards)
    groups_file.write_text(json.dumps(folders, indent=1))
    return folders


VECTORS_FILE = "vectors.npy"     # a pool's vectors in index order, for the searchers' memory maps


def _vectors_file(folder: str | os.PathLike) -> Path:
    """``folder``'s vectors as .npy (written here for an index built before the file existed)."""
    path = Path(folder) / VECTORS_FILE
    if not path.is_file():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
        np.save(tmp, read_embeddings(Path(folder) / "vectors")[1])
        os.replace(tmp, path)
    return path


def _embedding_rows(table: str | os.PathLike, rows: np.ndarray) -> np.ndarray:
    """[len(rows), dim] float32: the embeddings at these row numbers (ascending) of a table, shard by shard."""
    from ..data.io import shard_paths
    from ..utils.shards import shard_rows

    parts, start = [], 0
    for shard in shard_paths(table):
        n = shard_rows(shard)
        local = rows[(rows >= start) & (rows < start + n)] - start
        if len(local):
            col = pq.read_table(shard, columns=["embedding"]).column("embedding").take(pa.array(local))
            parts.append(col.combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(len(local), -1))
        start += n
    return np.concatenate(parts).astype(np.float32, copy=False)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


def search_shard(actor: "SearchActor", shard: str | os.PathLike, out: str | os.PathLike) -> int:
    """Search one query-embedding shard and write its candidates shard (atomically)."""
    from ..data.io import iter_batches

    parts = []
    for batch in iter_batches(shard, batch_size=actor.settings.search_batch_size,
                              columns=["id", "embedding", "task", "pos_id"]):
        parts.append(_candidates_table(actor(batch.to_pydict())))
    table = pa.concat_tables(parts) if parts else _candidates_table({})
    write_table_atomic(table, out)
    return table.num_rows


def search_queries(query_embeddings: str | os.PathLike, index_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   settings: RetrieveConfig, pool: Pool | None = None, threads: int | None = None) -> dict[str, Any]:
    """Search every pending query-embedding shard (columns id, embedding, task, pos_id); resumable per shard.

    With a Ray ``pool``, ``pool.max_actors`` searcher actors (``pool.num_cpus_per_actor`` CPUs each, faiss using
    ``threads`` or that many threads) load the saved indexes once and take whole shards from a queue, writing
    each candidates shard next to the inputs (the run directory is on shared storage on a cluster). Search is
    CPU-bound faiss work, so whole shards per call keep Ray's overhead to one round trip per shard.
    """
    from ..utils.progress import Progress
    from ..utils.shards import pending_shards, run_shards_on, shard_rows, spread_actors

    on_ray = pool is not None and pool.ray
    todo = pending_shards(query_embeddings, out_dir)
    total = sum(shard_rows(s) for s, _ in todo)
    progress = Progress(logger, f"searched ({Path(query_embeddings).name}{', Ray' if on_ray else ''})", total)
    kwargs = {"index_dir": str(index_dir), "settings": settings.model_dump(),
              "threads": threads or (max(1, int(pool.num_cpus_per_actor)) if on_ray else None)}
    per_node: dict[str, int] = {}
    if todo and on_ray:
        # process start + index load, timed apart from search
        searchers = spread_actors(_RemoteSearcher, min(pool.max_actors, len(todo)), kwargs,
                                  num_cpus=pool.num_cpus_per_actor)
        setup = progress.elapsed
        per_node = run_shards_on(searchers, todo, progress.update)
    elif todo:
        actor = SearchActor(**kwargs)
        setup = progress.elapsed
        for s, o in todo:
            progress.update(search_shard(actor, s, o))
    return {"rows": total, "shards_written": len(todo), "seconds": round(progress.elapsed, 3),
            "setup_seconds": round(setup, 3) if todo else 0.0,
            "rows_per_s": round(progress.rate, 2) if total else 0.0, "shards_per_node": per_node}


class _RemoteSearcher:
    """The Ray actor around :class:`SearchActor` (one index load per actor)."""

    def __init__(self, kwargs: dict[str, Any]):
        self.searcher = SearchActor(**kwargs)

    def ready(self) -> str:
        from ..utils.shards import node_id

        return node_id()

    def run(self, shard: str, out: str) -> int:
        return search_shard(self.searcher, shard, out)


def run_retrieval(pairs: str | os.PathLike, candidates: str | os.PathLike | None, out_dir: str | os.PathLike,
                  spec: EmbedderSpec, settings: RetrieveConfig, *, pool: Pool | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """The whole stage: pool -> embeddings -> indexes -> search. Every step resumes where it stopped.

    ``pool`` embeds (None: in this process); with a Ray pool and ``settings.search_actors`` > 0 the search runs
    on that many actors of the pool's CPUs each. ``seed``: the IVF training sample's."""
    out_dir = Path(out_dir)
    if candidates is None:
        cand_pool = out_dir / "pool"
        if not (out_dir / "pool.done").exists():
            shutil.rmtree(cand_pool, ignore_errors=True)
            candidate_pool_from_positives(pairs, cand_pool)
            (out_dir / "pool.done").touch()
        candidates = cand_pool
    q_stats = embed_table(spec, pairs, out_dir / "query_embeddings", prefix="query_", pool=pool,
                          passthrough=("task", "pos_id"))
    c_stats = embed_table(spec, candidates, out_dir / "candidate_embeddings", pool=pool)
    groups = build_indexes(out_dir / "candidate_embeddings", candidates, out_dir / "index", settings, seed)
    n = settings.search_actors
    searchers = Pool(min_actors=n, max_actors=n, num_cpus_per_actor=pool.num_cpus_per_actor) if (
        n and pool is not None and pool.ray) else None
    s_stats = search_queries(out_dir / "query_embeddings", out_dir / "index", out_dir / "candidates", settings,
                             pool=searchers)
    summary = retrieval_summary(out_dir / "candidates")
    from ..utils.tallies import merge_tallies

    return {"query_embedding": q_stats, "candidate_embedding": c_stats, "search": s_stats, "pools": len(groups),
            "candidates_table": str(out_dir / "candidates"), "candidate_pool": str(candidates), **summary,
            "settings": {**settings.model_dump(), "seed": seed},
            "visual_tokens": merge_tallies(q_stats.get("visual_tokens"), c_stats.get("visual_tokens"))}


def retrieval_summary(candidates_table: str | os.PathLike) -> dict[str, Any]:
    t = read_table(candidates_table, ["cand_ids", "n_dropped"])
    counts = np.array([len(x) for x in t.column("cand_ids").to_pylist()])
    dropped = np.array(t.column("n_dropped").to_pylist())
    return {"queries": int(len(counts)), "mean_candidates": float(counts.mean()) if len(counts) else 0.0,
            "queries_without_candidates": int((counts == 0).sum()),
            "mean_dropped_by_delta": float(dropped.mean()) if len(dropped) else 0.0}

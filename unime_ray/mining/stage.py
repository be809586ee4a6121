"""Stage S3: mine each query's hard negatives from the judge's scores and write the training table.

Per query: its candidates in retrieval order (the candidates table), their judge scores and the
positive's (the scores table), then :func:`~unime_ray.mining.sampling.mine_query`. The training table is
the canonical pair table: query, positive with its judge score, ``num_negatives`` negatives resolved to
their text/image with their scores. Shards follow the candidates shards, each written atomically with
its statistics, so a rerun resumes at the first missing shard. A query whose positive the judge could not
score is quarantined with the reason (it cannot be mined); candidates the judge could not score are left
out of that query's list and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..data.convert.official import export_official_json
from ..data.io import iter_rows, read_table, rows_to_table, shard_paths, write_table_atomic
from ..data.lookup import RowLookup, build_lookup
from ..data.schema import PAIR_SCHEMA, empty_row, item_from_row, item_to_columns, negatives_to_columns
from ..utils.plots import pyplot
from .config import MineConfig
from .sampling import mine_query

logger = logging.getLogger(__name__)

_ITEM = ("instruction", "text", "image", "image_path")
QUARANTINE_SCHEMA = pa.schema([pa.field("query_id", pa.string()), pa.field("reason", pa.string())])


def query_seed(seed: int, query_id: str) -> int:
    """A per-query seed from the run's: reproducible, and different queries draw different fallbacks."""
    return int(hashlib.sha1(f"{seed}:{query_id}".encode()).hexdigest()[:12], 16)


def mine_shard(candidates_shard: Path, scores_shard: Path, pairs_shard: Path, pool: RowLookup,
               settings: MineConfig, seed: int = 0
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(training rows, quarantined queries, statistics) of one shard; the negatives' content is read from
    ``pool`` once for the whole shard."""
    scores = {(r["query_id"], r["cand_id"]): (r["score"], r["error"]) for r in iter_rows(scores_shard)}
    queries = {r["id"]: r for r in iter_rows(pairs_shard)}
    rows, bad, mined = [], [], []
    stats = {"queries": 0, "mined": 0, "quarantined": 0, "fallbacks": 0, "false_negatives": 0,
             "unscored_candidates": 0, "no_candidates": 0, "repeated_fill": 0}
    for cand in iter_rows(candidates_shard, columns=["query_id", "pos_id", "cand_ids"]):
        qid = cand["query_id"]
        stats["queries"] += 1
        pos_score, pos_error = scores.get((qid, cand["pos_id"]), (None, "positive was not judged"))
        if pos_error or pos_score is None or math.isnan(pos_score):
            bad.append({"query_id": qid, "reason": f"positive could not be judged: {pos_error}"})
            stats["quarantined"] += 1
            continue
        ids, vals = [], []
        for cid in cand["cand_ids"]:
            s, err = scores.get((qid, cid), (None, "not judged"))
            if err or s is None or math.isnan(s):
                stats["unscored_candidates"] += 1
                continue
            ids.append(cid)
            vals.append(s)
        if not ids:  # nothing to mine from: a training row without negatives would only fail later
            bad.append({"query_id": qid, "reason": "no judged candidates (retrieval returned none below delta, "
                                                   "or none could be judged)"})
            stats["no_candidates"] += 1
            stats["quarantined"] += 1
            continue
        outcome = mine_query(ids, vals, pos_score, settings.num_negatives, settings.beta, settings.interval,
                             query_seed(seed, qid), settings.fallback_score)
        stats["false_negatives"] += outcome.false_negatives
        stats["fallbacks"] += int(outcome.fallback and bool(ids))
        stats["repeated_fill"] += int(0 < outcome.survivors < settings.num_negatives)
        mined.append((qid, float(pos_score), outcome.negatives))
        stats["mined"] += 1
    needed = sorted({cid for _, _, negatives in mined for cid, _ in negatives})
    content = dict(zip(needed, pool.take(needed, what="candidate").to_pylist()))
    for qid, pos_score, negatives in mined:
        q = queries[qid]
        row = empty_row(PAIR_SCHEMA)
        row.update(id=qid, task=q["task"], pos_id=q["pos_id"], pos_score=pos_score)
        row.update(item_to_columns(item_from_row(q, "query_"), "query_"))
        row.update(item_to_columns(item_from_row(q, "pos_"), "pos_"))
        row.update(negatives_to_columns([(item_from_row(content[cid], ""), s, cid) for cid, s in negatives]))
        rows.append(row)
    return rows, bad, stats


def run_mining(candidates_table: str | os.PathLike, scores_table: str | os.PathLike, pairs_table: str | os.PathLike,
               pool_table: str | os.PathLike, out_dir: str | os.PathLike, settings: MineConfig, *, seed: int = 0,
               image_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Mine every pending candidates shard; ``seed``: the run's (fallback draws); the official JSON is written
    when ``settings.export_official``."""
    out_dir = Path(out_dir)
    score_shards = {p.name: p for p in shard_paths(scores_table)}
    pair_shards = {p.name: p for p in shard_paths(pairs_table)}
    pool = None
    for shard in shard_paths(candidates_table):
        target = out_dir / "train" / shard.name
        if target.exists() and (out_dir / "stats" / f"{shard.name}.json").exists():
            continue
        if pool is None:
            pool = RowLookup(build_lookup(pool_table, out_dir / "content" / "pool.arrow", _ITEM))
        for needed, have in ((score_shards, "scores"), (pair_shards, "pairs")):
            if shard.name not in needed:
                raise FileNotFoundError(f"no {have} shard {shard.name} for candidates shard {shard}")
        rows, bad, stats = mine_shard(shard, score_shards[shard.name], pair_shards[shard.name], pool, settings, seed)
        write_table_atomic(rows_to_table(bad, QUARANTINE_SCHEMA), out_dir / "quarantine" / shard.name)
        write_table_atomic(rows_to_table(rows, PAIR_SCHEMA), target)
        (out_dir / "stats").mkdir(parents=True, exist_ok=True)
        (out_dir / "stats" / f"{shard.name}.json").write_text(json.dumps(stats))
    totals: dict[str, int] = {}
    for f in sorted((out_dir / "stats").glob("*.json")):
        for k, v in json.loads(f.read_text()).items():
            totals[k] = totals.get(k, 0) + v
    if totals.get("queries", 0) != totals.get("mined", 0) + totals.get("quarantined", 0):
        raise AssertionError(f"mining accounting broken: {totals}")
    out: dict[str, Any] = {**totals, "settings": {**settings.model_dump(), "seed": seed},
                           "training_table": str(out_dir / "train")}
    out.update(score_summary(out_dir / "train", out_dir / "score_histograms.png"))
    if settings.export_official and totals.get("mined", 0):
        path = out_dir / "train_official.json"
        export_official_json(out_dir / "train", path, image_dir=image_root or out_dir / "official_images")
        out["official_json"] = str(path)
    logger.info("mine: %d queries, %d mined, %d quarantined, %d fallbacks, %d false negatives dropped",
                totals.get("queries", 0), totals.get("mined", 0), totals.get("quarantined", 0),
                totals.get("fallbacks", 0), totals.get("false_negatives", 0))
    return out


def scored_negatives(pairs_table: str | os.PathLike) -> dict[str, Any]:
    """How many rows of a pair table carry judge-scored negatives (a score for the positive and for each of at
    least one negative, none missing or NaN), and the number of negatives per such row: what tells an imported
    training table (the official score JSON) from pairs still to be mined."""
    import pyarrow.compute as pc

    t = read_table(pairs_table, ["pos_score", "neg_score"])
    pos = t.column("pos_score").combine_chunks()
    neg = t.column("neg_score").combine_chunks()
    rows = len(t)
    if not rows:
        return {"rows": 0, "scored_rows": 0, "negatives": 0, "min_negatives": 0, "max_negatives": 0}
    pos_ok = np.asarray(pc.fill_null(pc.invert(pc.is_nan(pos)), False), dtype=bool)
    counts = np.asarray(pc.fill_null(pc.list_value_length(neg), 0), dtype=np.int64)
    flat = pc.list_flatten(neg)
    bad = np.asarray(pc.fill_null(pc.or_(pc.is_null(flat), pc.is_nan(flat)), True), dtype=bool)
    neg_ok = np.ones(rows, dtype=bool)
    neg_ok[np.asarray(pc.list_parent_indices(neg), dtype=np.int64)[bad]] = False
    scored = pos_ok & neg_ok & (counts > 0)
    n = counts[scored]
    return {"rows": rows, "scored_rows": int(scored.sum()), "negatives": int(n.sum()),
            "min_negatives": int(n.min()) if len(n) else 0, "max_negatives": int(n.max()) if len(n) else 0}


def score_summary(training_table: str | os.PathLike, plot_path: Path | None = None) -> dict[str, Any]:
    """Means of positive and negative judge scores, and a histogram plot of both (summed shard by shard)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    bins = np.linspace(0, 1, 41)
    n, sums, hist = np.zeros(2, dtype=np.int64), np.zeros(2), np.zeros((2, len(bins) - 1), dtype=np.int64)
    for shard in shard_paths(training_table):
        t = pq.read_table(shard, columns=["pos_score", "neg_score"])
        for j, col in enumerate((t.column("pos_score"), pc.list_flatten(t.column("neg_score")))):
            values = np.asarray(col.to_numpy(zero_copy_only=False), dtype=float)   # nulls read as NaN
            n[j] += len(values)
            sums[j] += values.sum()
            hist[j] += np.histogram(values, bins=bins)[0]
    out = {"mean_positive_score": float(sums[0] / n[0]) if n[0] else None,
           "mean_negative_score": float(sums[1] / n[1]) if n[1] else None}
    plt = pyplot() if plot_path is not None and n[0] else None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.stairs(hist[0], bins, fill=True, alpha=0.6, label=f"positives ({n[0]})", color="#4c72b0")
        ax.stairs(hist[1], bins, fill=True, alpha=0.6, label=f"mined negatives ({n[1]})", color="#dd8452")
        ax.set_xlabel("judge score s = e_yes / (e_yes + e_no)")
        ax.set_ylabel("count")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot_path, dpi=100)
        plt.close(fig)
        out["histogram"] = str(plot_path)
    return out

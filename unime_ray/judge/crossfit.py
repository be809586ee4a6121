"""K-fold cross-fitting of a stand-in judge (for runs with no pretrained MLLM judge, such as the offline demo).

A judge fine-tuned on the very pairs it then scores returns near-hard labels (it memorised them), which
would make UniME-V2's soft-label training indistinguishable from the hard-label ablation. So training
queries are split into folds; the judge fitted on fold f scores the queries of fold f+1 (mod k).

Folds group queries that share content (the same image, e.g. one emoji's image-to-name, name-to-image and
classification queries), so no query is scored by a judge that saw its pair from the other direction.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ..data.io import iter_rows, rows_to_table, shard_paths, write_table_atomic
from ..data.schema import PAIR_SCHEMA, item_from_row, negatives_to_columns

_ITEM = ["instruction", "text", "image", "image_path"]


def group_key(row: Mapping[str, Any]) -> str:
    """What ties queries together: the pair's image path, else its image bytes, else the positive's text."""
    for side in ("query_", "pos_"):
        if row.get(f"{side}image_path"):
            return "path:" + row[f"{side}image_path"]
    for side in ("query_", "pos_"):
        if row.get(f"{side}image"):
            return "bytes:" + hashlib.sha1(row[f"{side}image"]).hexdigest()
    return "text:" + (row.get("pos_text") or "") + "\x00" + (row.get("query_text") or "")


def fold_of(row: Mapping[str, Any], folds: int, seed: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}:{group_key(row)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % folds


def scoring_judge(fold: int, folds: int) -> int:
    """The fold whose judge scores ``fold``'s queries."""
    return (fold + 1) % folds


def query_folds(pairs_table: str | os.PathLike, folds: int, seed: int = 0) -> dict[str, int]:
    cols = ["id"] + [f"{s}{c}" for s in ("query_", "pos_") for c in ("text", "image", "image_path")]
    return {r["id"]: fold_of(r, folds, seed) for r in iter_rows(pairs_table, columns=cols)}


def build_fit_tables(candidates_table: str | os.PathLike, pairs_table: str | os.PathLike,
                     pool_table: str | os.PathLike, out_dir: str | os.PathLike, folds: int,
                     negatives_per_query: int, seed: int = 0) -> dict[int, dict[str, Any]]:
    """Per fold, a training table (canonical pairs) whose negatives are each query's top retrieved candidates
    in retrieval order (no judge scores: the judge learns Yes for the positive, No for these)."""
    out_dir = Path(out_dir)
    assignment = query_folds(pairs_table, folds, seed)
    retrieved = {r["query_id"]: r["cand_ids"] or [] for r in iter_rows(candidates_table,
                                                                        columns=["query_id", "cand_ids"])}
    pool = {r["id"]: r for r in iter_rows(pool_table, columns=["id", *_ITEM])}
    rows: dict[int, list[dict[str, Any]]] = {f: [] for f in range(folds)}
    for row in iter_rows(pairs_table):
        cands = [c for c in retrieved.get(row["id"], []) if c in pool][:negatives_per_query]
        if not cands:
            continue
        negs = [(item_from_row(pool[c]), None, c) for c in cands]
        rows[assignment[row["id"]]].append({**row, **negatives_to_columns(negs), "pos_score": None})
    result = {}
    for f, fold_rows in rows.items():
        path = out_dir / f"fold{f}" / "part-00000.parquet"
        write_table_atomic(rows_to_table(fold_rows, PAIR_SCHEMA), path)
        result[f] = {"table": str(path.parent), "queries": len(fold_rows)}
    return result


def split_candidates(candidates_table: str | os.PathLike, assignment: Mapping[str, int], folds: int,
                     out_dir: str | os.PathLike) -> dict[int, str]:
    """Per fold, the retrieval candidates of that fold's queries, keeping shard names (the judge and mining
    stages match shards by name)."""
    out_dir = Path(out_dir)
    for shard in shard_paths(candidates_table):
        t = pq.read_table(shard)
        ids = t.column("query_id").to_pylist()
        for f in range(folds):
            mask = pa.array([assignment.get(q, -1) == f for q in ids])
            write_table_atomic(t.filter(mask), out_dir / f"fold{f}" / shard.name)
    return {f: str(out_dir / f"fold{f}") for f in range(folds)}


def merge_score_tables(fold_dirs: list[str | os.PathLike], out_dir: str | os.PathLike) -> str:
    """Concatenate the folds' score shards of the same name into one scores table."""
    out_dir = Path(out_dir)
    names = sorted({p.name for d in fold_dirs for p in shard_paths(d)})
    for name in names:
        parts = [pq.read_table(Path(d) / name) for d in fold_dirs if (Path(d) / name).is_file()]
        write_table_atomic(pa.concat_tables(parts), out_dir / name)
    return str(out_dir)


def score_summary(scores_table: str | os.PathLike) -> dict[str, float | None]:
    """Mean score of positives and of candidates, and how well the judge separates them: the probability that
    a query's positive outscores one of its candidates (ties count half; 0.5 = chance). A quick check that a
    stand-in (or any) judge carries signal before its scores train anything. Read one shard at a time: the judge
    writes all pairs of a query into one shard."""
    import numpy as np
    import pyarrow.compute as pc

    wins = total = 0.0
    n, sums = np.zeros(2, dtype=np.int64), np.zeros(2)     # [candidates, positives]
    for shard in shard_paths(scores_table):
        t = pq.read_table(shard, columns=["query_id", "is_positive", "score", "error"])
        t = t.filter(pc.and_(pc.is_null(t.column("error")), pc.is_valid(t.column("score"))))
        positive = np.asarray(t.column("is_positive").to_numpy(zero_copy_only=False), dtype=bool)
        score = np.asarray(t.column("score").to_numpy(zero_copy_only=False), dtype=np.float64)
        query = t.column("query_id").combine_chunks()
        # a query's last positive row is its positive (reversed, so the first match is the last row)
        pos_query, pos_score = query.filter(pa.array(positive))[::-1], score[positive][::-1]
        _, first = np.unique(np.asarray(pos_query.to_pylist(), dtype=object), return_index=True)
        n[1] += len(first)
        sums[1] += pos_score[first].sum()
        n[0] += (~positive).sum()
        sums[0] += score[~positive].sum()
        at = pc.index_in(query.filter(pa.array(~positive)), value_set=pos_query)
        has = np.asarray(at.is_valid(), dtype=bool)
        d = pos_score[np.asarray(at.filter(at.is_valid()), dtype=np.int64)] - score[~positive][has]
        wins += float((d > 0).sum() + 0.5 * (d == 0).sum())
        total += float(has.sum())
    return {"mean_score_positive": float(sums[1] / n[1]) if n[1] else None,
            "mean_score_candidates": float(sums[0] / n[0]) if n[0] else None,
            "positive_auc": wins / total if total else None}


def positive_auc(scores_table: str | os.PathLike) -> float | None:
    return score_summary(scores_table)["positive_auc"]


def judge_crossfit(candidates_table: str | os.PathLike, pairs_table: str | os.PathLike,
                   pool_table: str | os.PathLike, out_dir: str | os.PathLike, judges: Sequence[Any],
                   pool=None, seed: int = 0, scorers: Sequence[Any] | None = None) -> dict[str, Any]:
    """Cross-fitted scoring: ``judges[f]`` is the judge fitted on fold ``f`` (of ``len(judges)``, folds of
    :func:`query_folds`), and the queries of fold f are scored by judge :func:`scoring_judge`, so no query is
    scored by a judge that saw it. ``judges``: :class:`~unime_ray.judge.stage.JudgeSpec` (``scorers``: the same
    judges loaded in this process, or None to build them where ``pool`` runs). Returns :func:`run_judge`'s
    summary over all folds, with ``folds`` (each fold's) and the merged ``scores_table``."""
    from .stage import run_judge

    k = len(judges)
    if k < 2:
        raise ValueError(f"cross-fitting needs at least 2 fold judges, got {k}")
    out_dir = Path(out_dir)
    split = split_candidates(candidates_table, query_folds(pairs_table, k, seed), k, out_dir / "candidates")
    per_fold = {}
    for f in range(k):
        j = scoring_judge(f, k)
        out = run_judge(split[f], pairs_table, pool_table, out_dir / f"fold{f}", judges[j], pool,
                        scorer=scorers[j] if scorers else None)
        per_fold[str(f)] = {**out, "judge_fold": j}
    scores = merge_score_tables([o["scores_table"] for o in per_fold.values()], out_dir / "scores" / "crossfit")
    total = {key: sum(o[key] for o in per_fold.values()) for key in ("pairs", "scored", "quarantined", "seconds")}
    return {**total, "crossfit": True, "folds": per_fold, "scores_table": scores, "seconds": round(total["seconds"], 2),
            "pairs_per_s": total["scored"] / max(1e-9, total["seconds"]), **score_summary(scores)}

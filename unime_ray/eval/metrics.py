"""Pure metric functions on score arrays, shared by every evaluator.

**Tie rule (everywhere):** a candidate that scores *exactly* as high as the ground truth is ranked
before it. A model that cannot separate the ground truth from a distractor gets no credit for it, so a
constant embedder scores 0, never 100 (``argmax`` would pick index 0 and call every tie a hit). The
ranking functions here follow the same rule, so "the top-1 of the dumped ranking is the ground truth"
and "P@1 counts a hit" always agree.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

TIE_RULE = "a distractor scoring exactly as high as the ground truth ranks above it (a tie is a miss)"


def _as_rows(score_rows: np.ndarray | Sequence[Sequence[float]]) -> list[np.ndarray]:
    if isinstance(score_rows, np.ndarray) and score_rows.ndim == 2:
        return list(score_rows)
    return [np.asarray(r, dtype=np.float64) for r in score_rows]


def gt_rank(scores: Sequence[float]) -> int:
    """0-based rank of the ground truth at index 0 (number of other candidates scoring >= it)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        raise ValueError("a row with no candidates has no ground truth at index 0")
    return int(np.count_nonzero(s[1:] >= s[0]))


def precision_at_1(score_rows: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Percent of rows whose ground truth (index 0) scores strictly above every other candidate.

    ``score_rows``: a [rows, candidates] matrix or a list of 1-D rows of varying length (MMEB
    classification rows have as many candidates as labels).
    """
    rows = _as_rows(score_rows)
    if not rows:
        raise ValueError("precision@1 of zero rows is undefined")
    return 100.0 * sum(gt_rank(r) == 0 for r in rows) / len(rows)


def rank_order(scores: Sequence[float], gt: Iterable[int] = (0,)) -> np.ndarray:
    """Candidate indices from best to worst under the tie rule (ties among equals: lower index first)."""
    s = np.asarray(scores, dtype=np.float64)
    is_gt = np.zeros(s.size, dtype=np.int8)
    is_gt[list(gt)] = 1
    # lexsort: last key is primary -> score descending, then non-GT before GT, then index
    return np.lexsort((np.arange(s.size), is_gt, -s))


def top_k(scores: Sequence[float], k: int, gt: Iterable[int] = (0,)) -> np.ndarray:
    return rank_order(scores, gt)[:k]


def pair_accuracy(pos_scores: Sequence[float], neg_scores: Sequence[float]) -> float:
    """Percent of pairs where the positive scores strictly above the negative (a tie is a miss)."""
    pos, neg = np.asarray(pos_scores, dtype=np.float64), np.asarray(neg_scores, dtype=np.float64)
    if pos.shape != neg.shape:
        raise ValueError(f"{pos.size} positive scores for {neg.size} negative scores")
    if pos.size == 0:
        raise ValueError("accuracy of zero pairs is undefined")
    return 100.0 * float(np.mean(pos > neg))


def mean_count(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """``{"mean": mean or None, "count": n}`` over the values that are present."""
    vals = [float(v) for v in values if v is not None]
    return {"mean": float(np.mean(vals)) if vals else None, "count": len(vals)}

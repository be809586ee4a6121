"""The hard-negative sampling rule of UniME-V2 (stage S3), exactly as specified.

Inputs per query: its candidates in retrieval-rank order (most similar first) with judge scores, and the
judge score of its positive.

1. **False-negative filter.** Drop every candidate whose score ``s > s_pos - beta`` (the judge thinks it
   matches the query about as well as the positive); the rest, the *survivors*, keep their rank order.
2. **Cyclical sampling.** Walk the survivors' positions with a stride of ``interval``: 0, 5, 10, ...,
   then 1, 6, 11, ..., up to 4, 9, ... (for interval 5), and take the first ``num_negatives``. With fewer
   survivors than that, repeat the same order from its start (two survivors A, B give A, B, A, B, ...).
   The stride spreads the picks over the whole ranked list instead of taking the top ones only.
3. **No survivors.** Take ``num_negatives`` candidates at random (seeded) from the original list, each
   with the fallback score (1.0 in the paper).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence


def cyclic_order(m: int, interval: int) -> list[int]:
    """Positions 0..m-1 visited with a stride: 0, i, 2i, ..., 1, 1+i, ..., i-1, 2i-1, ..."""
    if interval < 1:
        raise ValueError("interval must be >= 1")
    return [p for start in range(interval) for p in range(start, m, interval)]


@dataclass
class MiningOutcome:
    negatives: list[tuple[Any, float]]
    survivors: int
    false_negatives: int
    fallback: bool


def mine_query(candidates: Sequence[Any], scores: Sequence[float], positive_score: float, num_negatives: int = 10,
               beta: float = 0.01, interval: int = 5, seed: int = 0, fallback_score: float = 1.0) -> MiningOutcome:
    """The rule for one query, with the counts the run report needs."""
    if len(candidates) != len(scores):
        raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
    if num_negatives < 1:
        raise ValueError("num_negatives must be >= 1")
    threshold = positive_score - beta
    survivors = [(c, float(s)) for c, s in zip(candidates, scores) if not float(s) > threshold]
    m = len(survivors)
    if m:
        order = cyclic_order(m, interval)
        picks = [survivors[order[j % m]] for j in range(num_negatives)]
        return MiningOutcome(picks, m, len(candidates) - m, False)
    if not candidates:
        return MiningOutcome([], 0, 0, True)
    rng = random.Random(seed)
    if len(candidates) >= num_negatives:
        chosen = rng.sample(range(len(candidates)), num_negatives)
    else:  # fewer candidates than negatives: every one once, in a seeded order, then repeat
        base = rng.sample(range(len(candidates)), len(candidates))
        chosen = [base[j % len(base)] for j in range(num_negatives)]
    return MiningOutcome([(candidates[j], float(fallback_score)) for j in chosen], 0, len(candidates), True)


def sample_hard_negatives(candidates: Sequence[Any], scores: Sequence[float], positive_score: float,
                          num_negatives: int = 10, beta: float = 0.01, interval: int = 5, seed: int = 0,
                          fallback_score: float = 1.0) -> list[tuple[Any, float]]:
    """UniME-V2's hard negatives of one query: a list of ``num_negatives`` (candidate, judge score) pairs.

    ``candidates`` are in retrieval-rank order (most similar first); see the module docstring for the rule.
    Returns an empty list only when the query has no candidates at all.
    """
    return mine_query(candidates, scores, positive_score, num_negatives, beta, interval, seed,
                      fallback_score).negatives

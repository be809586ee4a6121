"""Statistics of the variant comparison (the paper's Table 4) over training seeds and eval queries.

Every variant is trained from the same initial weights, on the same data, for the same steps, once per seed, and
is evaluated on the same queries; so two variants' results pair up twice over: by seed and by query.

* per variant: the mean and the sample standard deviation (n - 1) over its seeds, of R@1 (= MMEB P@1), R@5,
  R@10 and MRR per eval set and averaged over the sets;
* per pair of variants: the mean paired difference and its 95 % interval from a two-way bootstrap that draws
  seeds and queries independently, with replacement (the same draws for both variants: paired). The interval
  so covers both the training noise (another seed) and the eval sample (other queries of the same kind). With
  one seed it covers the eval sample only; with two or three it still underestimates the seed spread (a
  bootstrap over n draws has variance (n-1)/n of the truth), which the report says; the seed-by-query noise
  is counted in both margins, which errs wide (tests/eval/test_report_stats.py measures its coverage);
* a difference is *resolved* when its interval excludes 0, and *not resolvable at this n* otherwise: no verdict
  is read off a mean whose interval straddles 0;
* the paper's order (Table 4: in-batch InfoNCE < mined negatives with hard labels < judge-score alignment)
  *holds* when every consecutive step is resolved and positive, is *contradicted* when a step is resolved and
  negative, and is *not resolvable at this n* otherwise;
* the reranker *helps* when the reranked minus the plain R@1 of the same seeds and queries is resolved and
  positive, and its picks are not one slot for nearly every query (a position bias is never reported as help).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

# Table 4, worst to best; the names are the variant names of the compare section (presets) and the pipeline.
PAPER_ORDER = ("infonce-inbatch", "hard-labels", "unime-v2")
MEAN_KEY = "mean"     # the headline P@1: MMEB Overall over the 36, else the mean over the custom eval sets


@dataclass(frozen=True)
class SeedSpread:
    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n - 1); None with fewer than two seeds."""
        if self.n < 2:
            return None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

    def text(self) -> str:
        return f"{self.mean:.2f}" if self.std is None else f"{self.mean:.2f} ± {self.std:.2f}"


def seed_spread(values: Iterable[float]) -> SeedSpread | None:
    vals = tuple(float(v) for v in values if v is not None)
    return SeedSpread(vals) if vals else None


def per_seed(models: Mapping[str, Any], reranked: bool = False) -> dict[str, dict[str, dict[int, float]]]:
    """{variant: {eval set or MEAN_KEY: {seed: P@1}}} from the eval stage's models (MEAN_KEY: the headline
    number, see ``eval.mmeb.headline``); ``reranked`` takes the
    reranked results (only models that have them). Models without a seed (external references) are left out."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for m in models.values():
        res = m.get("rerank") if reranked else m
        if m.get("seed") is None or not res or res.get("per_dataset") is None:
            continue
        from .mmeb import headline

        scores = {d: v for d, v in res["per_dataset"].items() if v is not None}
        mean = headline(res["summary"])[1] if res.get("summary") else None
        if mean is None and scores:
            mean = sum(scores.values()) / len(scores)
        if mean is not None:
            scores[MEAN_KEY] = mean
        for key, value in scores.items():
            out.setdefault(m["variant"], {}).setdefault(key, {})[int(m["seed"])] = value
    return out




# ------------------------------------------------------------------------------------ per-query paired intervals
RANK_METRICS = ("R@1", "R@5", "R@10", "MRR")
LEVEL = 0.95


def metric_values(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Per-query values in percent from 0-based ground-truth ranks: R@K = 100 if rank < K, MRR = 100 / (rank + 1)."""
    r = np.asarray(ranks, dtype=np.float64)
    if metric == "MRR":
        return 100.0 / (r + 1.0)
    if metric not in RANK_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(RANK_METRICS)}")
    return 100.0 * (r < int(metric[2:]))


def query_ranks(results_json: str | Path) -> dict[str, dict[str, np.ndarray]] | None:
    """``{"plain": {eval set: ranks}, "reranked": {eval set: ranks}}`` of one evaluated model, rows sorted by row id,
    from the ``topk.parquet`` its eval wrote beside ``results.json`` (None when there is none). A reranked rank is
    0 where the reranker's pick is the ground truth and the embedder's rank (at least 1) elsewhere: only R@1 is
    read from it."""
    path = Path(results_json).parent / "topk.parquet"
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    cols = pq.read_table(path).to_pydict()
    modes = [c[len("rerank_top1_"):] for c in cols if c.startswith("rerank_top1_")]
    out: dict[str, dict[str, np.ndarray]] = {"plain": {}, "reranked": {}, **{f"reranked:{m}": {} for m in modes}}
    by_set: dict[str, list[int]] = {}
    for i, d in enumerate(cols["dataset"]):
        by_set.setdefault(d, []).append(i)
    for d, idx in by_set.items():
        idx = sorted(idx, key=lambda i: str(cols["row_id"][i]))
        ranks = np.array([cols["gt_rank"][i] for i in idx], dtype=np.int64)
        out["plain"][d] = ranks
        for key, col in [("reranked", "rerank_top1")] + [(f"reranked:{m}", f"rerank_top1_{m}") for m in modes]:
            if col in cols:
                out[key][d] = np.array([0 if cols[col][i] == 0 else max(1, ranks[j]) for j, i in enumerate(idx)],
                                       dtype=np.int64)
    return out


def seeds_by_variant(models: Mapping[str, Any], reranked: bool = False,
                     mode: str | None = None) -> dict[str, dict[int, dict[str, np.ndarray]]]:
    """{variant: {seed: {eval set: per-query ranks}}} of the models that have a seed and per-query results
    (``reranked``: after the headline's reranking, or after ``mode``'s)."""
    out: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    key = "plain" if not reranked else ("reranked" if mode is None else f"reranked:{mode}")
    for m in models.values():
        if m.get("seed") is None or not m.get("results"):
            continue
        ranks = query_ranks(m["results"])
        sets = (ranks or {}).get(key)
        if sets:
            out.setdefault(m["variant"], {})[int(m["seed"])] = sets
    return out


@dataclass(frozen=True)
class PairedInterval:
    """``better - worse`` of one metric (points), averaged over seeds and queries, with its bootstrap interval."""

    better: str
    worse: str
    metric: str
    key: str                  # an eval set, or MEAN_KEY: the mean over the eval sets
    mean: float
    lo: float
    hi: float
    seeds: int
    queries: int

    @property
    def resolved(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def text(self) -> str:
        return f"{self.mean:+.2f} [{self.lo:+.2f}, {self.hi:+.2f}]"


def paired_interval(better: Mapping[int, Mapping[str, np.ndarray]], worse: Mapping[int, Mapping[str, np.ndarray]],
                    metric: str = "R@1", key: str = MEAN_KEY, better_name: str = "a", worse_name: str = "b",
                    n_boot: int = 2000, level: float = LEVEL, rng_seed: int = 0) -> PairedInterval | None:
    """The paired difference over the seeds and eval sets both hold, with a two-way bootstrap interval.

    ``better``/``worse``: {seed: {eval set: per-query ranks}}, queries aligned. Each bootstrap draw takes n seeds
    with replacement and, per eval set, as many queries with replacement, and averages the difference over that
    grid (the sets' means averaged for MEAN_KEY): the mean of ``c_s d[s, q] w_q`` with multinomial counts c, w.
    """
    seeds = sorted(s for s in better if s in worse)
    if not seeds:
        return None
    sets = [d for d in better[seeds[0]] if all(d in better[s] and d in worse[s] for s in seeds)]
    sets = sets if key == MEAN_KEY else [d for d in sets if d == key]
    if not sets:
        return None
    rng = np.random.default_rng(rng_seed)
    seed_counts = rng.multinomial(len(seeds), [1.0 / len(seeds)] * len(seeds), size=n_boot)    # [B, S]
    point, boot, queries = 0.0, np.zeros(n_boot), 0
    for d in sets:
        n = len(better[seeds[0]][d])
        if any(len(better[s][d]) != n or len(worse[s][d]) != n for s in seeds):
            raise ValueError(f"eval set {d}: the runs were evaluated on different numbers of queries")
        diff = np.stack([metric_values(better[s][d], metric) - metric_values(worse[s][d], metric) for s in seeds])
        counts = rng.multinomial(n, [1.0 / n] * n, size=n_boot)                                   # [B, Q]
        boot += np.einsum("bs,sq,bq->b", seed_counts, diff, counts) / (len(seeds) * n)
        point += float(diff.mean())
        queries += n
    point, boot = point / len(sets), boot / len(sets)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return PairedInterval(better_name, worse_name, metric, key, point, float(lo), float(hi), len(seeds), queries)


def one_slot(choice_ranks: Mapping[str, Mapping[str, int]] | None, share: float = 0.9, min_picks: int = 20) -> bool:
    """Whether a reranker named one slot of the embedder's top-K for ``share`` or more of its (at least
    ``min_picks``) usable answers over every eval set: it learned a position, not a judgement of the content."""
    total: dict[int, int] = {}
    for per_set in (choice_ranks or {}).values():
        for rank, n in per_set.items():
            total[int(rank)] = total.get(int(rank), 0) + int(n)
    n = sum(total.values())
    return n >= min_picks and max(total.values()) >= share * n


def _seed_note(steps: Iterable[PairedInterval]) -> str:
    n = min((p.seeds for p in steps), default=0)
    if n == 1:
        return " With one seed the intervals cover the eval sample only, not training noise."
    if 1 < n < 5:
        return f" With {n} seeds the intervals understate the seed spread (a bootstrap over n seeds has (n-1)/n of it)."
    return ""


@dataclass(frozen=True)
class OrderVerdict:
    steps: tuple[PairedInterval, ...]       # consecutive pairs of PAPER_ORDER, worse -> better
    missing: tuple[str, ...]                # variants of the order without results

    @property
    def holds(self) -> bool:
        return not self.missing and all(p.resolved and p.mean > 0 for p in self.steps)

    @property
    def contradicted(self) -> bool:
        return not self.missing and any(p.resolved and p.mean < 0 for p in self.steps)

    def sentence(self) -> str:
        if self.missing:
            return f"The paper's order cannot be checked: no results for {', '.join(self.missing)}."
        if self.holds:
            verdict = "holds: every step's 95 % interval lies above 0"
        elif self.contradicted:
            verdict = "is contradicted: " + "; ".join(f"{p.better} is below {p.worse}" for p in self.steps
                                                      if p.resolved and p.mean < 0)
        else:
            verdict = "is not resolvable at this n: " + "; ".join(
                f"{p.better} - {p.worse} has an interval that includes 0" for p in self.steps if not p.resolved)
        parts = "; ".join(f"{p.better} - {p.worse} = {p.text()}" for p in self.steps)
        n = self.steps[0]
        return (f"The paper's order ({' < '.join(PAPER_ORDER)}) {verdict}. Paired differences of R@1 (P@1) "
                f"averaged over the eval sets, points, with 95 % two-way bootstrap intervals over {n.seeds} seed(s) "
                f"and {n.queries} queries: {parts}." + _seed_note(self.steps))


def order_verdict(ranks: Mapping[str, Mapping[int, Mapping[str, np.ndarray]]], metric: str = "R@1",
                  key: str = MEAN_KEY) -> OrderVerdict:
    missing = tuple(v for v in PAPER_ORDER if v not in ranks)
    steps = []
    if not missing:
        for worse, better in zip(PAPER_ORDER, PAPER_ORDER[1:]):
            p = paired_interval(ranks[better], ranks[worse], metric, key, better, worse)
            if p is None:
                missing += (f"{better} and {worse} on common seeds",)
            else:
                steps.append(p)
    return OrderVerdict(tuple(steps), missing)


def rerank_verdict(plain: Mapping[str, Mapping[int, Mapping[str, np.ndarray]]],
                   reranked: Mapping[str, Mapping[int, Mapping[str, np.ndarray]]], variant: str = "unime-v2",
                   position_bias: bool = False, key: str = MEAN_KEY) -> tuple[PairedInterval | None, str]:
    """(reranked - plain R@1 over the same seeds and queries, a sentence): whether the reranker helps."""
    p = paired_interval(reranked.get(variant) or {}, plain.get(variant) or {}, "R@1", key,
                        f"{variant} + reranker", variant)
    if p is None:
        return None, f"No reranked results for {variant}: the reranker's effect is not measured."
    if position_bias:
        verdict = ("the reranker names one slot for nearly every query (a position bias), so whatever the "
                   "change, it is not reported as help")
    elif not p.resolved:
        verdict = "the change is not resolvable at this n (its interval includes 0)"
    else:
        verdict = "reranking helps" if p.mean > 0 else "reranking hurts"
    return p, (f"Reranking: {variant}'s R@1 (P@1) averaged over the eval sets changes by {p.text()} points "
               f"(95 % interval over {p.seeds} seed(s) and {p.queries} queries): {verdict}." + _seed_note([p]))

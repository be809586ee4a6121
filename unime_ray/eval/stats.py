"""Statistics of the variant comparison (the paper's Table 4) over training seeds.

Every variant is trained from the same initial weights, on the same data, for the same steps, once per seed; a
seed's runs of two variants therefore form a pair. Reported per eval set and for the mean over sets:

* per variant: the mean and the sample standard deviation (n - 1) over its seeds;
* per pair of variants: the paired differences (same seed), their mean and sample standard deviation, and
  ``d = mean / std``, how many standard deviations of the paired difference the mean difference is;
* the paper's order (Table 4: in-batch InfoNCE < mined negatives with hard labels < judge-score alignment)
  *holds* when every consecutive paired mean difference is positive, and holds *beyond the seed spread* when,
  in addition, each is at least one standard deviation of its paired differences (d >= 1). With three seeds
  this is weak evidence either way; the numbers are printed so a reader can judge.

The same pairing compares an embedder alone with the embedder followed by the reranker (the same seeds); the
reranker helps beyond the seed spread when its paired mean gain is at least one standard deviation of the
paired gains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

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


@dataclass(frozen=True)
class PairedDifference:
    """``better - worse`` over the seeds both were run with."""

    better: str
    worse: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]

    @property
    def spread(self) -> SeedSpread:
        return SeedSpread(self.differences)

    @property
    def mean(self) -> float:
        return self.spread.mean

    @property
    def std(self) -> float | None:
        return self.spread.std

    @property
    def in_stds(self) -> float | None:
        """mean / std of the paired differences (None without a spread; +-inf when all differences are equal)."""
        std = self.std
        if std is None:
            return None
        if std == 0:
            return math.copysign(math.inf, self.mean) if self.mean else 0.0
        return self.mean / std

    def text(self) -> str:
        d = self.in_stds
        sd = "" if d is None else f", {d:+.1f} sd"
        return f"{self.mean:+.2f} ± {self.std:.2f}{sd}" if self.std is not None else f"{self.mean:+.2f}"


def seed_spread(values: Iterable[float]) -> SeedSpread | None:
    vals = tuple(float(v) for v in values if v is not None)
    return SeedSpread(vals) if vals else None


def paired_difference(better: Mapping[int, float], worse: Mapping[int, float], better_name: str = "a",
                      worse_name: str = "b") -> PairedDifference | None:
    """The per-seed differences over the seeds both mappings hold (None when they share none)."""
    seeds = tuple(sorted(s for s in better if s in worse and better[s] is not None and worse[s] is not None))
    if not seeds:
        return None
    return PairedDifference(better_name, worse_name, seeds, tuple(float(better[s]) - float(worse[s]) for s in seeds))


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


@dataclass(frozen=True)
class OrderVerdict:
    steps: tuple[PairedDifference, ...]      # consecutive pairs of PAPER_ORDER, worse -> better
    missing: tuple[str, ...]                 # variants of the order without results

    @property
    def holds(self) -> bool:
        return not self.missing and all(p.mean > 0 for p in self.steps)

    @property
    def beyond_spread(self) -> bool:
        return self.holds and all(p.in_stds is not None and p.in_stds >= 1 for p in self.steps)

    def sentence(self) -> str:
        if self.missing:
            return f"The paper's order cannot be checked: no results for {', '.join(self.missing)}."
        parts = "; ".join(f"{p.better} - {p.worse} = {p.text()} (n={len(p.seeds)})" for p in self.steps)
        if self.beyond_spread:
            verdict = "holds, each step by at least one standard deviation of its paired differences"
        elif self.holds:
            verdict = "holds in the means, but not every step exceeds one standard deviation of its paired differences"
        else:
            wrong = [f"{p.better} is not above {p.worse}" for p in self.steps if p.mean <= 0]
            verdict = "does not hold (" + "; ".join(wrong) + ")"
        return (f"The paper's order ({' < '.join(PAPER_ORDER)}) {verdict}. Paired differences of the mean P@1 "
                f"over eval sets (mean ± sample std over seeds, in standard deviations): {parts}.")


def order_verdict(scores: Mapping[str, Mapping[str, Mapping[int, float]]], key: str = MEAN_KEY) -> OrderVerdict:
    missing = tuple(v for v in PAPER_ORDER if key not in scores.get(v, {}))
    steps = []
    if not missing:
        for worse, better in zip(PAPER_ORDER, PAPER_ORDER[1:]):
            p = paired_difference(scores[better][key], scores[worse][key], better, worse)
            if p is None:
                missing += (f"{better} and {worse} on common seeds",)
            else:
                steps.append(p)
    return OrderVerdict(tuple(steps), missing)


def rerank_effect(plain: Mapping[str, Mapping[str, Mapping[int, float]]],
                  reranked: Mapping[str, Mapping[str, Mapping[int, float]]], variant: str = "unime-v2",
                  key: str = MEAN_KEY) -> tuple[PairedDifference | None, str]:
    """(reranked - plain over the same seeds, a sentence saying whether reranking helps beyond the spread)."""
    p = paired_difference((reranked.get(variant) or {}).get(key) or {}, (plain.get(variant) or {}).get(key) or {},
                          f"{variant} + reranker", variant)
    if p is None:
        return None, f"No reranked results for {variant}: the reranker's effect is not measured."
    spread = seed_spread((plain.get(variant) or {}).get(key, {}).values())
    seed_sd = spread.std if spread else None
    if p.std is None:
        return p, (f"Reranking changes {variant}'s mean P@1 by {p.mean:+.2f} points on one seed; with one seed "
                   "there is no spread to compare it with.")
    beyond = abs(p.mean) >= p.std       # the order's rule: at least one sd of the paired differences
    direction = "helps" if p.mean > 0 else "hurts" if p.mean < 0 else "does not change P@1"
    return p, (f"Reranking {direction}: {variant}'s mean P@1 changes by {p.text()} over {len(p.seeds)} seeds "
               f"(the embedder alone spreads {seed_sd:.2f} across seeds); "
               + ("beyond" if beyond else "within") + " the seed spread of the paired differences.")

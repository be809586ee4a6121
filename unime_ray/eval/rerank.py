"""Reranking on top of the embedder's ranking (method reference 5.2 and 5.5).

The reranker is duck-typed (``unime_ray.rerank.Reranker`` or a test double):

* ``choose_many(queries, candidate_lists) -> [choice]`` with ``choice.index`` (0-based into that list, or
  None when the answer was unparsable / out of range) and ``choice.raw`` (the generated text);
* ``score_pairs([(query, candidate), ...]) -> np.ndarray`` of P(Yes) in [0, 1].

Listwise protocol: the reranker sees the embedder's top-K; its choice becomes rank 1 and every other
candidate keeps the embedder's order. An unusable answer falls back to the embedder's order and is
counted, so a reranker that mostly fails to answer cannot hide behind the embedder's numbers. Pairwise and
fused modes sort the top-K by P(Yes), or by ``(1 - w) * cosine + w * P(Yes)``
(:func:`~unime_ray.rerank.inference.reorder`, the rule the server applies too).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data.schema import Item
from ..rerank.inference import move_choice_first as apply_listwise_choice  # the one reorder rule
from ..utils.logs import Progress

logger = logging.getLogger(__name__)


@dataclass
class ListwiseResult:
    """Reranked orders (indices into each query's candidates) and what the reranker said."""

    orders: list[list[int]]
    fell_back: list[bool]
    raw: list[str] = field(default_factory=list)
    p_yes: list[list[float] | None] = field(default_factory=list)

    @property
    def fallbacks(self) -> int:
        return int(sum(self.fell_back))


def rerank_listwise(reranker, queries: Sequence[Item], candidates: Sequence[Sequence[Item]],
                    orders: Sequence[Sequence[int]], top_k: int, *, chunk: int = 64,
                    what: str = "reranked queries") -> ListwiseResult:
    """Rerank each query's first ``top_k`` candidates of ``orders`` (indices into ``candidates[q]``) listwise.

    The returned orders hold only the top-``top_k`` (reranked); deeper ranks are unchanged by construction.
    """
    return rerank_modes(reranker, queries, candidates, orders, top_k, ("listwise",), chunk=chunk,
                        what=what)["listwise"]


def rerank_modes(reranker, queries: Sequence[Item], candidates: Sequence[Sequence[Item]],
                 orders: Sequence[Sequence[int]], top_k: int, modes: Sequence[str], *,
                 similarities: Sequence[Sequence[float]] | None = None, weight: float = 0.5, chunk: int = 64,
                 what: str = "reranked queries") -> dict[str, ListwiseResult]:
    """Rerank each query's first ``top_k`` candidates of ``orders`` in every mode of ``modes`` (see
    :data:`~unime_ray.rerank.inference.RERANK_MODES`; ``similarities[q][i]``: the embedder's cosine of
    ``candidates[q][i]``, for ``fused``). The listwise answers are asked once and the pairs scored once, whatever
    the number of modes; each result's ``p_yes`` holds the top-K's P(Yes) where pairs were scored."""
    from ..rerank.inference import RERANK_MODES, reorder

    if top_k <= 0:
        raise ValueError("rerank top_k must be positive")
    if not (len(queries) == len(candidates) == len(orders)):
        raise ValueError(f"{len(queries)} queries, {len(candidates)} candidate lists, {len(orders)} orders")
    unknown = [m for m in modes if m not in RERANK_MODES]
    if unknown or not modes:
        raise ValueError(f"unknown rerank mode(s) {unknown}; choose from {', '.join(RERANK_MODES)}")
    if "fused" in modes and similarities is None:
        raise ValueError("fused reranking needs the embedder's similarities")
    out = {m: ListwiseResult([], [], []) for m in modes}
    pairwise = any(m != "listwise" for m in modes)
    progress = Progress(logger, what, len(queries))
    for start in range(0, len(queries), chunk):
        tops = [list(o[:top_k]) for o in orders[start:start + chunk]]
        lists = [[candidates[start + j][i] for i in top] for j, top in enumerate(tops)]
        choices: list[Any] = [None] * len(tops)
        if "listwise" in modes:
            choices = list(reranker.choose_many(list(queries[start:start + chunk]), lists))
            if len(choices) != len(tops):
                raise RuntimeError(f"reranker returned {len(choices)} choices for {len(tops)} queries")
        p_yes: list[np.ndarray | None] = [None] * len(tops)
        if pairwise:
            flat = score_pairs_chunked(reranker, [(queries[start + j], c) for j, cands in enumerate(lists)
                                                  for c in cands], what=f"{what}: pairs")
            bounds = np.cumsum([0] + [len(t) for t in tops])
            p_yes = [flat[bounds[j]:bounds[j + 1]] for j in range(len(tops))]
        for j, top in enumerate(tops):
            sims = [similarities[start + j][i] for i in top] if similarities is not None else None
            for mode in modes:
                index = getattr(choices[j], "index", None)
                new, fell = reorder(mode, top, choice=index, p_yes=p_yes[j], similarities=sims, weight=weight)
                res = out[mode]
                res.orders.append(new)
                res.fell_back.append(fell)
                res.raw.append(str(getattr(choices[j], "raw", "")) if mode == "listwise" else "")
                res.p_yes.append(None if p_yes[j] is None else [float(v) for v in p_yes[j]])
        progress.update(len(tops))
    for mode, res in out.items():
        if res.fallbacks:
            logger.warning("%s (%s): %d of %d reranker answers unusable; embedder order kept for those", what, mode,
                           res.fallbacks, len(queries))
    return out


def score_pairs_chunked(reranker, pairs: Sequence[tuple[Item, Item]], chunk: int = 256,
                        what: str = "scored pairs") -> np.ndarray:
    """P(Yes) per (query, candidate) pair, checked to be probabilities; NaN marks a pair the reranker could
    not score (the caller counts those; a comparison with NaN is never a hit)."""
    out = []
    progress = Progress(logger, what, len(pairs))
    for start in range(0, len(pairs), chunk):
        part = list(pairs[start:start + chunk])
        p = np.asarray(reranker.score_pairs(part), dtype=np.float64).reshape(-1)
        if p.size != len(part):
            raise RuntimeError(f"reranker returned {p.size} scores for {len(part)} pairs")
        out.append(p)
        progress.update(len(part))
    scores = np.concatenate(out) if out else np.zeros(0)
    finite = scores[~np.isnan(scores)]
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        raise RuntimeError("reranker scores must be probabilities in [0, 1] (or NaN for an unscored pair)")
    return scores


def load_reranker(reranker: Any, *, image_root: str | os.PathLike | None = None, dtype: str = "auto",
                  batch_size: int = 16, image_options: Any = None):
    """A reranker object as is, or ``unime_ray.rerank.Reranker.from_pretrained`` of a folder / hub id
    (``image_options``: its :class:`~unime_ray.models.budget.ImageBudget`; None: the checkpoint's)."""
    if reranker is None or not isinstance(reranker, (str, os.PathLike)):
        return reranker
    from ..rerank import Reranker  # the lead's module; imported only when a reranker path is given

    return Reranker.from_pretrained(str(reranker), dtype=dtype, image_root=image_root, batch_size=batch_size,
                                    image_options=image_options)


# ------------------------------------------------------------------------------------------- the guard
VALIDATION_FILE = "rerank_validation.json"
FUSION_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class RerankValidation:
    """Whether a reranker helps, measured on the dev split (rows no training step saw): the fused ranking's weight
    is chosen on one half of the dev rows, every mode is measured against the embedder alone on the other half,
    and the configured ``mode`` is used only if its gain's 95 % interval lies above 0 (and, listwise, its picks
    are not one slot for nearly every query)."""

    mode: str
    top_k: int
    embedder: str
    tuning_rows: int
    rows: int
    weight: float | None                  # the fused ranking's weight (chosen on the tuning half)
    weights_tried: dict[str, float]       # weight -> P@1 of the fused ranking on the tuning half
    embedder_p1: float                    # on the deciding half
    p1: dict[str, float]                  # every mode on the deciding half
    gain: float                           # mode - embedder alone, points, on the deciding half
    lo: float
    hi: float
    one_slot: bool
    used: bool

    def sentence(self) -> str:
        where = f"on {self.rows} dev rows (held out of training; the fused weight chosen on {self.tuning_rows} others)"
        change = f"{self.mode} reranking of the top-{self.top_k} changes P@1 by {self.gain:+.2f} [{self.lo:+.2f}, {self.hi:+.2f}] points"
        if self.used:
            return f"The reranker is used: {where}, {change} over the embedder alone ({self.embedder_p1:.2f} %)."
        why = ("its picks are one slot for nearly every query (a position bias)" if self.one_slot
               else "that interval does not lie above 0")
        return (f"The reranker is not used (eval and serving): {where}, {change} over the embedder alone "
                f"({self.embedder_p1:.2f} %), and {why}.")

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def validate_reranker(embedder: Any, reranker: Any, dev_table: str | os.PathLike, out_dir: str | os.PathLike, *,
                      mode: str = "listwise", top_k: int = 5, image_root: str | os.PathLike | None = None,
                      pool: Any = None, weights: Sequence[float] = FUSION_WEIGHTS,
                      embedder_label: str = "embedder") -> RerankValidation:
    """Measure every rerank mode against ``embedder`` alone on the dev pairs (the eval's own path,
    :func:`~unime_ray.eval.mmeb.evaluate_pairs_table`, writes ``out_dir``) and decide whether ``mode`` is used."""
    import hashlib

    import pyarrow.parquet as pq

    from ..rerank.inference import RERANK_MODES, reorder
    from .mmeb import evaluate_pairs_table
    from .stats import one_slot, paired_interval

    out = Path(out_dir)
    res = evaluate_pairs_table(embedder, dev_table, out, image_root=image_root, reranker=reranker,
                               rerank_top_k=top_k, rerank_modes=("listwise", "pairwise"), top_k_dump=top_k, pool=pool,
                               label="rerank validation (dev split)")
    t = pq.read_table(out / "topk.parquet").to_pydict()
    n = len(t["row_id"])
    tuning = np.array([hashlib.sha1(str(r).encode()).digest()[0] % 2 == 0 for r in t["row_id"]])

    def hits(m: str, weight: float = 0.5) -> np.ndarray:
        if m == "embedder":
            return np.array([r == 0 for r in t["gt_rank"]])
        if m == "listwise":
            return np.array([c == 0 for c in t["rerank_top1_listwise"]])
        return np.array([reorder(m, idx[:top_k], p_yes=p, similarities=s[:top_k], weight=weight)[0][0] == 0
                         for idx, p, s in zip(t["topk_index"], t["rerank_p_yes"], t["topk_score"])])

    tried = {str(w): float(100.0 * hits("fused", w)[tuning].mean()) for w in weights}
    best = max(tried.values())
    weight = min(float(w) for w, v in tried.items() if v == best)       # the least reliance on the reranker
    deciding = ~tuning
    base = hits("embedder")
    per_mode = {m: hits(m, weight) for m in RERANK_MODES}
    p1 = {m: float(100.0 * v[deciding].mean()) for m, v in per_mode.items()}
    as_ranks = lambda h: {0: {"dev": np.where(h[deciding], 0, 1)}}
    gap = paired_interval(as_ranks(per_mode[mode]), as_ranks(base), "R@1", "dev")
    biased = mode == "listwise" and one_slot(res["rerank"]["modes"]["listwise"]["choice_ranks"])
    return RerankValidation(mode=mode, top_k=top_k, embedder=embedder_label, tuning_rows=int(tuning.sum()),
                            rows=int(deciding.sum()), weight=weight, weights_tried=tried,
                            embedder_p1=float(100.0 * base[deciding].mean()), p1=p1, gain=gap.mean, lo=gap.lo,
                            hi=gap.hi, one_slot=biased, used=bool(gap.lo > 0 and not biased))

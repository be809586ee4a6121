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
from typing import Any, Sequence

import numpy as np

from ..data.schema import Item
from ..rerank.inference import move_choice_first as apply_listwise_choice  # noqa: F401 (the one reorder rule)
from ..utils.progress import Progress

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
